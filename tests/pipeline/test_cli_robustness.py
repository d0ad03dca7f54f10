"""The command line under bad input: clear one-line errors and exit status 2 (1 when some inference
cases failed), never a traceback; untrusted checkpoints; batch inference that keeps going."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2pa.cli import main
from e2pa.engine.checkpoint import CheckpointError, save_checkpoint
from e2pa.engine.inference import load_model


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    (root / "empty").mkdir()
    (root / "garbage.json").write_text("{not json")
    (root / "list.json").write_text("[1, 2, 3]")

    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    torch.save({"format_version": 1, "model": Evil()}, root / "evil.pt")
    return {"missing": root / "missing", **{p.name: p for p in root.iterdir()}}


PATHS = st.sampled_from(["missing", "garbage.pt", "empty", "garbage.json", "list.json", "evil.pt"])
WORDS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)


@st.composite
def bad_command(draw):
    command = draw(st.sampled_from(["train", "infer", "evaluate", "ablate"]))
    data, checkpoint = draw(PATHS), draw(PATHS)
    number = draw(st.sampled_from(["-1", "0", "x", "1e9999", "", "nan"]) | WORDS)
    return {
        "train": ["train", "--data", data, "--out", "OUT", "--epochs", number],
        "infer": ["infer", "--checkpoint", checkpoint, "--input", data, "--out", "OUT", "--overlap", number],
        "evaluate": ["evaluate", "--checkpoint", checkpoint, "--data", data, "--out", "OUT", "--max-cases", number],
        "ablate": ["ablate", "--data", data, "--out", "OUT", "--seeds", number],
    }[command]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=bad_command())
def test_bad_arguments_give_one_line_errors_not_tracebacks(argv, bad_files, tmp_path, capfd):
    resolved = [str(bad_files[a]) if a in bad_files else (str(tmp_path / "out") if a == "OUT" else a) for a in argv]
    status, stdout, stderr = _run(resolved)
    assert status == 2, (resolved, status, stderr)
    assert "Traceback" not in stderr and "error:" in stderr, stderr
    assert "ran code from a checkpoint" not in stdout + capfd.readouterr().out


def test_untrusted_checkpoint_configurations_are_rejected_before_building(tmp_path):
    for config, message in (
        ({"architecture": "os.system"}, "unknown architecture"),
        ({"architecture": "e2pa", "features": [2**20] * 8}, "features"),
        ({"architecture": "e2pa", "__class__": "x"}, "unknown config keys"),
    ):
        path = save_checkpoint(
            tmp_path / "c.pt", {"model": {}, "model_config": config, "modalities": ["t1"], "train_config": {}}
        )
        with pytest.raises(CheckpointError, match=message):
            load_model(path)


@pytest.mark.slow
def test_infer_keeps_going_after_a_failing_case(tiny_config, phantom_json, tmp_path):
    from e2pa.engine.training import train

    cfg = tiny_config(epochs=1, max_steps_per_epoch=1)
    train(cfg)
    case = Path(phantom_json).parent / "Phantom_000"
    broken = tmp_path / "Broken_000"
    broken.mkdir()
    (broken / "Broken_000_flair.nii.gz").write_bytes(b"truncated")
    status, stdout, stderr = _run(
        [
            "infer",
            "--checkpoint",
            str(Path(cfg.out) / "checkpoints" / "last.pt"),
            "--input",
            str(broken),
            str(case),
            "--out",
            str(tmp_path / "pred"),
        ]
    )
    assert status == 1
    assert "Broken_000: FAILED" in stdout and "1 of 2 case(s) failed: Broken_000" in stderr
    log = (tmp_path / "pred" / "infer.log").read_text()  # the run's log file has the same story
    assert "WARNING e2pa.engine.inference: Broken_000: FAILED" in log and "Phantom_000: wrote" in log
    assert (tmp_path / "pred" / "Phantom_000" / "Phantom_000_pred.nii.gz").is_file()
    # and never overwrites what is there
    status, stdout, _ = _run(
        [
            "infer",
            "--checkpoint",
            str(Path(cfg.out) / "checkpoints" / "last.pt"),
            "--input",
            str(case),
            "--out",
            str(tmp_path / "pred"),
        ]
    )
    assert status == 1 and "already exist" in stdout
