"""Logging set-up of the command line: console messages and a per-run log file.

Library modules only log (``logging.getLogger(__name__)``, under the ``e2pa`` logger) and never
configure logging, at import time or otherwise: a program that imports e2pa keeps its own set-up.
The command line (:func:`e2pa.cli.main`) configures it for one invocation:

- :func:`console`: INFO and above on standard output, as plain lines (``warning: …`` for warnings),
  written to whatever ``sys.stdout`` is when a message is emitted;
- :func:`run_log`: every message, time-stamped, appended to a file in the command's output folder
  (``RUN/train.log``, ``OUT/infer.log``, …). The file and its folder are created with the first
  message, so a command that refuses a non-empty folder has not made it non-empty by looking.

Under ``torchrun`` only rank 0 (``RANK``) writes: other ranks show warnings and errors only, with a
``[rank k]`` prefix, and write no file — unless ``E2PA_LOG_ALL_RANKS=1``, when each rank logs like
rank 0, into ``<name>.rank<k>.log``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOGGER = "e2pa"
ALL_RANKS_VARIABLE = "E2PA_LOG_ALL_RANKS"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def process_rank() -> int:
    """This process's rank under torchrun (``RANK``), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def logs_this_rank() -> bool:
    """Whether this process logs in full (rank 0, or every rank with ``E2PA_LOG_ALL_RANKS=1``)."""
    return process_rank() == 0 or os.environ.get(ALL_RANKS_VARIABLE, "") not in ("", "0")


class _ConsoleFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"[rank {rank}] " if rank else ""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return self.prefix + level + record.getMessage()


class _StdoutHandler(logging.StreamHandler):
    """A stream handler on the ``sys.stdout`` of the moment (it may be redirected after set-up)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


class _RunFileHandler(logging.FileHandler):
    """Appends to its file, which (with its folder) is created when the first message arrives."""

    def __init__(self, path: Path):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

        self.failed = False

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A file that cannot be written (disk full, folder removed, read-only) stops this handler with
        one warning on the console -- not logging's traceback per message; the command goes on."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        self.failed = True  # set first: the warning below reaches this handler too
        logging.getLogger(LOGGER).warning(
            "cannot write the log file %s (%s); messages go to the console only from here", self.baseFilename, error
        )


@contextmanager
def _attached(handler: logging.Handler, level: int) -> Iterator[None]:
    logger = logging.getLogger(LOGGER)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, previous) if previous != logging.NOTSET else level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()


@contextmanager
def console(verbose: bool = False) -> Iterator[None]:
    """Show the package's messages on standard output while the block runs (DEBUG with ``verbose``)."""
    rank = process_rank()
    level = (logging.DEBUG if verbose else logging.INFO) if logs_this_rank() else logging.WARNING
    handler = _StdoutHandler()
    handler.setFormatter(_ConsoleFormatter(rank))
    handler.setLevel(level)
    with _attached(handler, level):
        yield


@contextmanager
def run_log(path: str | os.PathLike, verbose: bool = False) -> Iterator[Path | None]:
    """Append the package's messages to ``path`` while the block runs; yields the file's path (None
    on a rank that does not log, see the module docstring)."""
    if not logs_this_rank():
        yield None
        return
    path = Path(path)
    if process_rank():
        path = path.with_name(f"{path.stem}.rank{process_rank()}{path.suffix}")
    level = logging.DEBUG if verbose else logging.INFO
    handler = _RunFileHandler(path)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(level)
    with _attached(handler, level):
        yield path
