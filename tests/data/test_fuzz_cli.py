"""Fuzzing ``e2pa phantom``'s arguments: the exit status is 0 exactly when every value is valid,
otherwise 2 with an ``error:`` line on stderr; never a traceback, never files for bad arguments."""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2pa.cli import main

# Per option: (value, is_valid). Valid runs write one 24-voxel case, so the suite stays fast.
OPTIONS = {
    "--cases": [("1", True), ("0", False), ("-2", False), ("1.5", False), ("one", False), ("", False)],
    "--seed": [("0", True), ("98765", True), ("-1", False), ("1e3", False), (str(2**64), False)],
    "--shape": [
        (["24"], True),
        (["24", "26", "28"], True),
        (["8"], False),
        (["300"], False),
        (["24", "24"], False),
        (["full", "24"], False),
        (["x"], False),
        (["-24"], False),
    ],
    "--spacing": [("2.0", True), ("3", True), ("0.5", False), ("9", False), ("nan", False), ("-inf", False)],
    "--labels": [("brats2021", True), ("brats2023", True), ("msd", False), ("BRATS2021", False)],
    "--validation-fraction": [("0.2", True), ("0", True), ("1", False), ("-0.5", False), ("nan", False)],
}
# Free text whose fate is not predicted (validity None); not for --cases, where a stray "٩٩٩٩"
# parses as 9999 cases.
FREE_TEXT_OPTIONS = ("--seed", "--spacing", "--labels")


@st.composite
def phantom_arguments(draw) -> tuple[list[str], list[bool | None]]:
    """Arguments for every option and their validity; half the draws are all-valid."""
    all_valid = draw(st.booleans())
    argv, validity = [], []
    for option, choices in OPTIONS.items():
        pool = [c for c in choices if c[1]] if all_valid else choices
        strategy = st.sampled_from(pool)
        if option in FREE_TEXT_OPTIONS and not all_valid:
            strategy = strategy | st.text(max_size=12).map(lambda text: (text, None))
        value, valid = draw(strategy)
        argv += [option, *value] if isinstance(value, list) else [f"{option}={value}"]
        validity.append(valid)
    return argv, validity


_runs = itertools.count()


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-fuzz")


def _run(argv: list[str]) -> tuple[int, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    return status, stderr.getvalue()


@settings(max_examples=50, deadline=None)
@given(arguments=phantom_arguments(), out_is_file=st.booleans())
def test_phantom_arguments(runs_dir, arguments, out_is_file):
    options, validity = arguments
    out = runs_dir / f"run{next(_runs)}"
    if out_is_file:
        out.write_text("not a folder")
    argv = ["phantom", "--out", str(out), *options]
    validity = [*validity, not out_is_file]

    status, stderr = _run(argv)

    assert status in (0, 2), (argv, status, stderr)
    assert "Traceback" not in stderr
    if status == 2:
        assert "error:" in stderr.strip().splitlines()[-1], stderr
        assert out_is_file or not out.exists(), "bad arguments must not write anything"
    else:
        assert (out / "dataset.json").is_file()
    if all(v is True for v in validity):
        assert status == 0, (argv, stderr)
    if any(v is False for v in validity):
        assert status == 2, (argv, stderr)
