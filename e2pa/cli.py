"""The ``e2pa`` command line: ``e2pa <command> [options]`` (also ``python -m e2pa``).

Subcommands live in :mod:`e2pa.commands`. Errors the user can fix — bad data
(:class:`~e2pa.data.DataError`), bad option combinations (:class:`CommandError`) and file-system
errors (:class:`OSError`) — print one line ``e2pa <command>: error: <message>`` on stderr and exit
with status 2, like argparse's own usage errors; ``--traceback`` shows the full trace instead.
Anything else is a bug and keeps its traceback.

Logging is configured here, for one invocation (:mod:`e2pa.log`): messages on standard output, and
for a command that sets ``log_file`` (``p.set_defaults(log_file="train.log")``) a log file in its
``--out`` folder as well.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from e2pa import __version__
from e2pa import log as logs
from e2pa.commands import COMMANDS, CommandError
from e2pa.data.errors import DataError
from e2pa.engine.device import DeviceError

USAGE_ERROR = 2
INTERRUPTED = 130

# Errors whose message is the whole story for the user. A library module with its own user-facing
# error type (bad checkpoint, bad config) adds it here.
REPORTED_ERRORS = (CommandError, DataError, DeviceError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="e2pa", description="Energy-guided multi-modality MRI fusion (E2PA).", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages too (console and log file)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        importlib.import_module(f"e2pa.commands.{name}").register(subparsers)
    for command in subparsers.choices.values():  # --epoch is not --epochs: no prefix matching anywhere
        command.allow_abbrev = False
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help / --version (0) and on usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else USAGE_ERROR
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        with contextlib.ExitStack() as logging_set_up:
            logging_set_up.enter_context(logs.console(verbose=args.verbose))
            if getattr(args, "log_file", None) and getattr(args, "out", None):
                logging_set_up.enter_context(logs.run_log(Path(args.out) / args.log_file, verbose=args.verbose))
            return args.func(args) or 0
    except REPORTED_ERRORS as error:
        if args.traceback:
            raise
        from e2pa.io import write_error_message

        text = write_error_message(error) if isinstance(error, OSError) else str(error)
        message = " ".join(text.split()) or type(error).__name__  # one line, whatever the message
        print(f"e2pa {args.command}: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"e2pa {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
