"""The ``e2pa`` command line and its ``phantom`` command: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from e2pa.cli import main
from e2pa.commands import COMMANDS


def test_phantom_writes_a_cohort(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert (
        main(
            [
                "phantom",
                "--cases",
                "2",
                "--out",
                str(out),
                "--shape",
                "24",
                "--seed",
                "3",
                "--labels",
                "brats2023",
                "--validation-fraction",
                "0.5",
            ]
        )
        == 0
    )
    spec = json.loads((out / "dataset.json").read_text())
    assert (spec["numTraining"], spec["numValidation"], spec["label_convention"]) == (1, 1, "brats2023")
    assert spec["phantom"] == {
        "seed": 3,
        "shape": [24, 24, 24],
        "spacing_mm": 2.0,
        "vary_anatomy": False,
        "faults": [],
        "fault_rate": 0.0,
        "max_faulted": 2,
        "fault_codes": {},
    }
    assert "wrote 2 phantom case(s)" in capsys.readouterr().out


def test_existing_cohort_is_a_one_line_error_until_overwrite(tmp_path, capsys):
    arguments = ["phantom", "--cases", "1", "--out", str(tmp_path), "--shape", "24"]
    assert main(arguments) == 0
    capsys.readouterr()
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("e2pa phantom: error: ") and "would overwrite" in error
    assert "Traceback" not in error
    assert main([*arguments, "--overwrite"]) == 0


def test_out_pointing_at_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["phantom", "--cases", "1", "--out", str(tmp_path / "file"), "--shape", "24"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--cases", "0"], "argument --cases: must be a positive integer"),
        (["--cases", "two"], "argument --cases: must be a positive integer, got 'two'"),
        (
            ["--cases", "1", "--shape", "8"],
            "invalid --shape/--spacing: shape must be one or three integers between 24 and 256",
        ),
        (["--cases", "1", "--shape", "24", "24"], "--shape takes one integer, three integers or 'full'"),
        (["--cases", "1", "--spacing", "inf"], "argument --spacing: must be a finite number"),
        (["--cases", "1", "--spacing", "0.2"], "spacing must be a voxel size in mm between 1 and 8"),
        (["--cases", "1", "--labels", "msd"], "argument --labels: invalid choice"),
        (["--cases", "1", "--seed", "-4"], "argument --seed: must be an integer in [0, 2**63)"),
        (["--cases", "1", "--validation-fraction", "1"], "--validation-fraction must be in [0, 1)"),
        ([], "the following arguments are required: --cases"),
    ],
)
def test_bad_values_exit_2_with_a_message(tmp_path, capsys, arguments, message):
    assert main(["phantom", "--out", str(tmp_path / "o"), *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "o").exists(), "nothing is written when the arguments are bad"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "phantom" in capsys.readouterr().err


def test_traceback_flag_shows_the_library_error(tmp_path):
    from e2pa.data import DataError

    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError):
        main(["--traceback", "phantom", "--cases", "1", "--out", str(tmp_path / "file"), "--shape", "24"])


def test_every_registered_command_module_has_register():
    for name in COMMANDS:
        assert callable(importlib.import_module(f"e2pa.commands.{name}").register)


def test_python_dash_m_entry_point(tmp_path):
    """A real process: the exit status and stderr the user sees (one run: importing e2pa takes seconds)."""
    bad = subprocess.run(
        [sys.executable, "-m", "e2pa", "phantom", "--cases", "-1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "argument --cases: must be a positive integer" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    assert "phantom" in capsys.readouterr().out


def test_phantom_with_faults_writes_fault_maps(tmp_path, capsys):
    out = tmp_path / "faulty"
    assert (
        main(
            [
                "phantom",
                "--cases",
                "1",
                "--out",
                str(out),
                "--shape",
                "24",
                "--vary-anatomy",
                "--faults",
                "void,coverage",
                "--fault-rate",
                "1",
                "--max-faulted",
                "1",
            ]
        )
        == 0
    )
    spec = json.loads((out / "dataset.json").read_text())
    entry = (spec["training"] + spec["validation"])[0]
    described = json.loads((out / entry["faults"]).read_text())
    assert len(described["faults"]) == 1 and described["faults"][0]["kind"] in ("void", "coverage")
    assert (out / entry["faultmap"]).is_file() and spec["phantom"]["vary_anatomy"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--fault-rate", "0.5"], "--fault-rate needs --faults"),
        (["--faults", "wobble"], "--faults"),
        (["--faults", "all", "--fault-rate", "2"], "--fault-rate must be in [0, 1]"),
    ],
)
def test_phantom_fault_arguments_are_checked(tmp_path, capsys, arguments, message):
    assert main(["phantom", "--cases", "1", "--out", str(tmp_path / "o"), "--shape", "24", *arguments]) == 2
    assert message in capsys.readouterr().err
