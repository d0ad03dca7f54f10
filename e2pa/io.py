"""Atomic file writes, folder locks and file-system errors that name their path.

Every file e2pa writes for a user (checkpoints, metrics, reports, pictures, predictions) goes
through here or through :func:`e2pa.data.nifti.save_volume`: write a temporary file in the target's
folder, flush it to disk, rename it over the target — a crash leaves the old file or the new one,
never a torn one. An error from the operating system (no space left, read-only file system,
permission denied) comes out as an :class:`OSError` whose message names the file it was writing.

A folder that one process owns while it writes (a training run, an inference output folder) is
claimed with :func:`folder_lock`: an exclusive ``fcntl.flock`` on ``FOLDER/.e2pa.lock``, released
by the kernel when the process ends however it ends (SIGKILL included), so a stale lock never
blocks a restart. A second claimant gets :class:`FolderBusyError` naming the holder.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import fcntl
import io
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

LOCK_NAME = ".e2pa.lock"


class OutputExistsError(FileExistsError):
    """An output would overwrite a file the user has; the message says how to allow it."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, overwrite: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync, then rename onto ``path``.

    With ``overwrite=False`` an existing ``path`` raises :class:`OutputExistsError` and is untouched.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise OutputExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    with os_errors_name(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


@contextlib.contextmanager
def os_errors_name(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an :class:`OSError` without a file name (a failed ``write``/``fsync`` has none) as one
    that names ``path`` and says what it means: ``[Errno 28] No space left on device: 'RUN/x.pt'``.
    Errors that already name a file keep theirs."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None or isinstance(error, FolderBusyError):
            raise
        raise type(error)(error.errno, error.strerror or os.strerror(error.errno), str(path)) from error


def write_error_message(error: OSError) -> str:
    """One line for an OS error while writing: the path, the reason and what the user can do."""
    where = f"{error.filename}: " if error.filename else ""
    hint = {
        errno.ENOSPC: "free some space (or write elsewhere) and run the command again",
        errno.EDQUOT: "free some space (or write elsewhere) and run the command again",
        errno.EROFS: "the file system is read-only; choose a writable --out",
        errno.EACCES: "no permission to write there; choose another --out or fix its permissions",
        errno.EPERM: "no permission to write there; choose another --out or fix its permissions",
    }.get(error.errno)
    reason = error.strerror or str(error)
    return f"{where}{reason}" + (f" ({hint})" if hint else "")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n", overwrite=overwrite)


def atomic_save_figure(figure: Any, path: str | os.PathLike, *, overwrite: bool = True, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format from the path's suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: figure.savefig(f, format=fmt, **savefig_kwargs), overwrite=overwrite)


def csv_text(rows: list[dict], fieldnames: list[str] | None = None) -> str:
    """Rows of dicts as CSV text (columns: ``fieldnames`` or the first row's keys)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames or list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# folder locks and folders written as a whole
# ------------------------------------------------------------------------------------------------
class FolderBusyError(BlockingIOError):
    """Another live process holds the folder's lock; the message names it (pid, host, start time)."""

    def __str__(self) -> str:
        return str(self.strerror)


class FolderLock:
    """An exclusive lock on ``folder`` (created if missing): ``flock`` on ``folder/.e2pa.lock``.

    The file records the holder (pid, host, start time, ``purpose``) so that a second process can
    say who has it. The kernel drops the lock when the holder exits, even on SIGKILL; the file
    itself stays (it is how the next holder finds it). :meth:`acquire` raises
    :class:`FolderBusyError` when another process (or another open lock in this one) holds it.
    Use as a context manager or call :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, folder: str | os.PathLike, purpose: str) -> None:
        self.folder, self.purpose = Path(folder), purpose
        self.path = self.folder / LOCK_NAME
        self._file: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> FolderLock:
        if self._file is not None:
            return self
        with os_errors_name(self.path):
            self.folder.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+b")  # noqa: SIM115 — held open for the lock's lifetime
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise FolderBusyError(
                errno.EWOULDBLOCK,
                f"{self.folder} is in use by another e2pa process "
                f"({_describe_holder(self.path)}); wait for it to finish or stop it "
                f"first (lock file {self.path})",
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        with contextlib.suppress(OSError):  # the record is a courtesy; a full disk must not block the lock
            os.ftruncate(file.fileno(), 0)
            os.pwrite(file.fileno(), (json.dumps(holder) + "\n").encode(), 0)
        self._file = file
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "holder unknown"
    return (
        f"{holder.get('purpose', 'e2pa')}: pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}"
    )


def is_lock_file(path: Path) -> bool:
    return path.name == LOCK_NAME


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder's contents in a hidden temporary sibling (``.NAME.partial-XXXX``) and rename it
    to ``path`` when the block completes; on any error (or a kill) ``path`` is untouched and the
    temporary folder is removed (a kill leaves it behind, hidden, and the next call removes it).

    ``overwrite=True`` replaces an existing ``path`` (the old folder is removed only after the new
    one is complete); otherwise an existing ``path`` raises :class:`OutputExistsError`.
    """
    import shutil

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    with os_errors_name(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.partial-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        with os_errors_name(path):
            if path.exists():
                old = path.parent / f".{path.name}.partial-old-{os.getpid()}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
