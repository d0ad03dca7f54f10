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


# ------------------------------------------------------------------------------------------------
# argument types: every range is checked when the arguments are parsed (argparse prints
# "argument --x: <message>" and exits with status 2), not when the value is first used.
# ------------------------------------------------------------------------------------------------
def _number(text: str, kind: type) -> float | int:
    import argparse
    import math

    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}; got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    import argparse

    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    import argparse

    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    import argparse

    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0; got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    import argparse

    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0; got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1] (a probability)."""
    import argparse

    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1]; got {text}")
    return value


def overlap_fraction(text: str) -> float:
    """A sliding-window overlap: a number in [0, 1)."""
    import argparse

    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(
            f"must be in [0, 1) (the fraction of a window shared with the next); got {text}"
        )
    return value
