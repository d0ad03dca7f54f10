"""Subcommands of the ``e2pa`` command line.

Each name in :data:`COMMANDS` is a module ``e2pa.commands.<name>`` exposing
``register(subparsers)``: it adds its parser with ``subparsers.add_parser(...)`` and sets
``func=<callable(args) -> int | None>`` as a default. Adding a command = adding a module and one
line here. Keep module imports cheap (import torch / MONAI / nilearn inside the function), since
every command's module is imported to build ``e2pa --help``. A command signals options it cannot
act on by raising :class:`CommandError`; the CLI prints its message and exits with status 2.
"""

COMMANDS: tuple[str, ...] = (
    "phantom",
    "train",
    "infer",
    "evaluate",
    "score",
    "demo",
    "ablate",
)


class CommandError(Exception):
    """A command was given options it cannot act on; the message is shown to the user as is."""
