"""Nothing lost, nothing silent (issue 19): the run folder is self-contained and locked, a start
that fails leaves it reusable, checkpoints are checksummed, OS errors are one line naming the file,
infer writes whole case folders and continues a batch, evaluate scores the run's own hold-out."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from e2pa.cli import main
from e2pa.engine.checkpoint import CheckpointError, load_checkpoint

TINY = [
    "--epochs",
    "1",
    "--batch-size",
    "1",
    "--roi",
    "16",
    "--features",
    "4",
    "8",
    "--max-steps-per-epoch",
    "2",
    "--no-progress",
    "--seed",
    "5",
    "--lr",
    "0.003",
]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(phantom_json, tmp_path_factory) -> Path:
    """A finished one-epoch tiny run (2 steps), written by the command line."""
    run = tmp_path_factory.mktemp("robust") / "run"
    status, _, err = _run(["train", "--data", phantom_json, "--out", run, *TINY, "--checkpoint-every", "1"])
    assert status == 0, err
    return run


@pytest.fixture
def fail_fsync(monkeypatch):
    """``fail_fsync(name, errno)``: fsync of a file whose name contains ``name`` fails like a full
    (or read-only) disk would — the real write path, with the error the kernel gives."""
    real = os.fsync

    def install(name: str, code: int = errno.ENOSPC):
        def fsync(fd):
            if name in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(code, os.strerror(code))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    return install


# ------------------------------------------------------------------------------------------------ the run folder
def test_config_is_self_contained_and_a_copied_run_resumes_into_the_copy(run_dir, tmp_path, monkeypatch):
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["out"] == "." and os.path.isabs(saved["data"])
    split = json.loads((run_dir / "split.json").read_text())
    assert split["training"] and split["validation"] and not set(split["training"]) & set(split["validation"])
    copy = tmp_path / "copies" / "copy"
    shutil.copytree(run_dir, copy)
    original = _snapshot(run_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resume from another working directory, with a relative --out
    status, _, err = _run(["train", "--out", "../copies/copy", "--resume", "--epochs", "2", "--no-progress"])
    assert status == 0, err
    assert _snapshot(run_dir) == original, "resuming the copy wrote into the original run"
    assert load_checkpoint(copy / "checkpoints" / "last.pt")["epoch"] == 2
    assert not list(elsewhere.iterdir())


def test_a_second_process_on_a_locked_run_stops_naming_the_holder(run_dir):
    script = (
        "import sys, time; from e2pa.io import FolderLock; "
        "lock = FolderLock(sys.argv[1], 'e2pa train').acquire(); print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(run_dir)
        status, _, err = _run(["train", "--out", run_dir, "--resume", "--epochs", "2", "--no-progress"])
        assert status == 2
        assert "in use by another e2pa process" in err and f"pid {holder.pid}" in err and "e2pa train" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert _snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    from e2pa.io import FolderLock

    with FolderLock(run_dir, "test"):  # the kernel dropped the killed holder's lock
        pass


def test_a_start_that_fails_leaves_no_trace_or_a_reusable_folder(phantom_json, tmp_path, fail_fsync, monkeypatch):
    out = tmp_path / "run"
    status, _, err = _run(["train", "--data", tmp_path / "typo", "--out", out, *TINY])
    assert status == 2 and "typo" in err and not out.exists()

    bad = tmp_path / "bad"
    shutil.copytree(Path(phantom_json).parent, bad)
    seg = next((bad / "Phantom_002").glob("*_seg.nii.gz"))
    image = nib.load(seg)
    label = np.asanyarray(image.dataobj).copy()
    label[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(label, image.affine, image.header), seg)
    status, _, err = _run(["train", "--data", bad / "dataset.json", "--out", out, *TINY])
    assert status == 2 and "Phantom_002" in err and "7" in err, err
    assert not out.exists(), "the run folder was written before the data was validated"

    fail_fsync("last.pt")  # the disk fills up while the first checkpoint is written
    status, _, err = _run(["train", "--data", phantom_json, "--out", out, *TINY])
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "No space left on device" in err and str(out / "checkpoints" / "last.pt") in err, err
    assert not [p for p in out.rglob("*") if p.name.endswith(".partial")]
    monkeypatch.undo()
    status, _, err = _run(["train", "--out", out, "--resume", "--no-progress"])  # nothing to resume: starts over
    assert status == 0, err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["global_step"] == 2


def test_a_fresh_start_reuses_a_folder_whose_first_start_stopped_early(phantom_json, tmp_path):
    from e2pa.engine.training import TrainConfig, Trainer, TrainingError

    cfg = TrainConfig(
        data=str(phantom_json),
        out=str(tmp_path / "run"),
        epochs=1,
        batch_size=1,
        roi_size=(16,) * 3,
        max_steps_per_epoch=1,
        progress=False,
        model={"features": (4, 8)},
    )
    Trainer(cfg).lock.release()  # wrote config.json and split.json, then "died" before its first checkpoint
    assert {p.name for p in Path(cfg.out).iterdir()} >= {"config.json", "split.json"}
    Trainer(cfg).run()  # a fresh start is allowed: nothing of value is there
    (Path(cfg.out) / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="already holds a run"):
        Trainer(cfg)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="not from an e2pa run"):
        Trainer(TrainConfig(**{**cfg.to_json(), "out": str(other)}))
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_then_resume(phantom_json, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "e2pa", "train", "--data", str(phantom_json), "--out", str(out), *TINY],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "config.json").is_file() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "config.json").is_file() and not (out / "checkpoints" / "last.pt").exists()
    status, _, err = _run(["train", "--out", out, "--resume", "--no-progress"])
    assert status == 0, err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["global_step"] == 2


_KILLED_IN_WRITE = """
import os, sys, time
real = os.fsync
def fsync(fd):
    if sys.argv[1] in os.readlink(f"/proc/self/fd/{fd}"):
        count = int(os.environ.get("_E2PA_WRITES", "0")) + 1
        os.environ["_E2PA_WRITES"] = str(count)
        if count == int(sys.argv[2]):
            open(sys.argv[3], "w").close()  # the marker: the parent kills us now, mid-write
            time.sleep(300)
    return real(fd)
os.fsync = fsync
from e2pa.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _kill_during_write(name: str, nth: int, argv: list, tmp_path: Path) -> None:
    """Run ``e2pa argv`` in a process killed with SIGKILL inside the ``nth`` write of a file named ``name``."""
    marker = tmp_path / f"marker-{name}-{nth}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_IN_WRITE, name, str(nth), str(marker), *map(str, argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), f"the process ended (status {proc.poll()}) before its write of {name}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume(phantom_json, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", phantom_json, "--out", out, *TINY, "--epochs", "2", "--checkpoint-every", "1"]
    _kill_during_write("last.pt", 2, argv, tmp_path)  # the second save replaces the first one's last.pt
    assert list((out / "checkpoints").glob(".last.pt.*.partial")), "no write was in progress"
    assert load_checkpoint(out / "checkpoints" / "last.pt")["global_step"] == 1  # the previous one, intact
    status, _, err = _run(["train", "--out", out, "--resume", "--no-progress"])
    assert status == 0, err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["global_step"] == 4


# ------------------------------------------------------------------------------------------------ checkpoints
def test_a_corrupt_last_checkpoint_is_reported_and_the_previous_one_resumes(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    last = copy / "checkpoints" / "last.pt"
    assert (copy / "checkpoints" / "last.previous.pt").is_file()  # the last two are kept
    data = bytearray(last.read_bytes())
    weights = load_checkpoint(last)["model"]
    tensor = max(weights.values(), key=lambda t: t.numel())
    raw = tensor.contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at > 0
    data[at + len(raw) // 2] ^= 0x10  # one flipped bit inside the largest weight tensor
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="last.pt is corrupt"):
        load_checkpoint(last)
    status, _, err = _run(["train", "--out", copy, "--resume", "--epochs", "2", "--no-progress"])
    assert status == 2 and "corrupt" in err and "last.previous.pt" in err and "--resume-from" in err, err
    status, _, err = _run(["infer", "--checkpoint", last, "--input", tmp_path, "--out", tmp_path / "pred"])
    assert status == 2 and "corrupt" in err
    status, _, err = _run(
        ["train", "--out", copy, "--resume", "--resume-from", "previous", "--epochs", "2", "--no-progress"]
    )
    assert status == 0, err
    assert load_checkpoint(last)["epoch"] == 2


# ------------------------------------------------------------------------------------------------ infer
def _perturbed_case(source: Path, target: Path, modality: str = "t1ce", delta: float = 1e-4) -> Path:
    """A copy of a case whose ``modality`` has its affine moved by ``delta`` mm (scanner rounding)."""
    shutil.copytree(source, target)
    for path in target.iterdir():
        path.rename(target / path.name.replace(source.name, target.name))
    path = next(target.glob(f"*_{modality}.nii.gz"))
    image = nib.load(path)
    affine = image.affine.copy()
    affine[0, 3] += delta
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), path)
    return target


def test_infer_batch_survives_bad_cases_writes_whole_folders_and_continues(run_dir, phantom_json, tmp_path):
    cohort = Path(phantom_json).parent
    _perturbed_case(cohort / "Phantom_001", tmp_path / "inputs" / "Rounded_001")
    broken = tmp_path / "inputs" / "Broken_002"
    shutil.copytree(cohort / "Phantom_002", broken)
    next(broken.glob("*_flair.nii.gz")).write_bytes(b"not a nifti")
    shutil.copytree(cohort / "Phantom_000", tmp_path / "inputs" / "Phantom_000")
    out = tmp_path / "pred"
    ckpt = run_dir / "checkpoints" / "last.pt"
    status, stdout, err = _run(["infer", "--checkpoint", ckpt, "--input", tmp_path / "inputs", "--out", out])
    assert status == 1 and "1 of 3 case(s) failed: Broken_002" in err, (stdout, err)
    assert {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")} == {
        "Phantom_000",
        "Rounded_001",
    }
    files = sorted(p.name for p in (out / "Rounded_001").iterdir())
    assert files == [
        "Rounded_001_overview.png",
        "Rounded_001_pred.nii.gz",
        *sorted(f"Rounded_001_weight_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2")),
    ]
    weights = nib.load(out / "Rounded_001" / "Rounded_001_weight_t1.nii.gz")
    assert weights.get_data_dtype() == np.int16 and 0 <= weights.get_fdata().min() <= weights.get_fdata().max() <= 1

    # an interrupted batch: one complete case, one half-written (hidden) folder; --skip-existing continues
    kept = (out / "Phantom_000" / "Phantom_000_pred.nii.gz").stat().st_mtime_ns
    shutil.rmtree(out / "Rounded_001")
    (out / ".Rounded_001.partial-x").mkdir()
    (out / ".Rounded_001.partial-x" / "Rounded_001_pred.nii.gz").write_bytes(b"half")
    shutil.rmtree(broken)
    status, _, err = _run(
        [
            "infer",
            "--checkpoint",
            ckpt,
            "--input",
            tmp_path / "inputs",
            "--out",
            out,
            "--skip-existing",
            "--maps",
            "none",
        ]
    )
    assert status == 0, err
    assert (out / "Phantom_000" / "Phantom_000_pred.nii.gz").stat().st_mtime_ns == kept
    assert sorted(p.name for p in (out / "Rounded_001").iterdir()) == [
        "Rounded_001_overview.png",
        "Rounded_001_pred.nii.gz",
    ]
    assert not list(out.glob(".*partial*"))
    status, stdout, err = _run(["infer", "--checkpoint", ckpt, "--input", tmp_path / "inputs", "--out", out])
    assert status == 1 and "--skip-existing" in stdout


def test_infer_disk_full_stops_with_one_line_naming_the_file(run_dir, phantom_json, tmp_path, fail_fsync):
    fail_fsync("_pred.nii.gz")
    out = tmp_path / "pred"
    status, _, err = _run(
        [
            "infer",
            "--checkpoint",
            run_dir / "checkpoints" / "last.pt",
            "--input",
            Path(phantom_json).parent / "Phantom_000",
            "--out",
            out,
            "--maps",
            "none",
        ]
    )
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "Phantom_000_pred.nii.gz" in err and "--skip-existing" in err
    assert not [p.name for p in out.iterdir() if p.is_dir()]  # no partial case left behind


@pytest.mark.slow
def test_sigkill_during_infer_write_leaves_no_partial_case(run_dir, phantom_json, tmp_path):
    out = tmp_path / "pred"
    cohort = Path(phantom_json).parent
    argv = [
        "infer",
        "--checkpoint",
        run_dir / "checkpoints" / "last.pt",
        "--input",
        cohort / "Phantom_000",
        cohort / "Phantom_001",
        "--out",
        out,
        "--maps",
        "none",
    ]
    _kill_during_write("_pred.nii.gz", 2, argv, tmp_path)  # while writing the second case
    assert [p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")] == ["Phantom_000"]
    status, _, err = _run([*argv, "--skip-existing"])
    assert status == 0 and "1 of 2 case(s) were already complete" in err, err
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["Phantom_000", "Phantom_001"]
    assert not list(out.glob(".*partial*"))


# ------------------------------------------------------------------------------------------------ evaluate
def test_evaluate_scores_the_runs_hold_out_and_checks_its_output_first(run_dir, phantom_json, tmp_path, monkeypatch):
    from e2pa.engine import evaluation

    ckpt = run_dir / "checkpoints" / "last.pt"
    split = json.loads((run_dir / "split.json").read_text())
    out = tmp_path / "eval"
    status, _, err = _run(["evaluate", "--checkpoint", ckpt, "--data", phantom_json, "--out", out])
    assert status == 0, err
    assert {r.split(",")[0] for r in (out / "per_case.csv").read_text().splitlines()[1:]} == set(split["validation"])

    status, _, err = _run(
        ["evaluate", "--checkpoint", ckpt, "--data", phantom_json, "--out", tmp_path / "all", "--split", "all"]
    )
    assert status == 2 and "used to train this checkpoint" in err and "--include-training" in err

    def never(*args, **kwargs):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(evaluation, "evaluate_cases", never)
    status, _, err = _run(["evaluate", "--checkpoint", ckpt, "--data", phantom_json, "--out", out])
    assert status == 2 and "already exists" in err
    import tempfile

    real = tempfile.NamedTemporaryFile

    def read_only(*args, **kwargs):
        if str(tmp_path / "ro") in str(kwargs.get("dir", "")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    (tmp_path / "ro").mkdir()
    status, _, err = _run(["evaluate", "--checkpoint", ckpt, "--data", phantom_json, "--out", tmp_path / "ro"])
    assert status == 2 and "Read-only file system" in err and str(tmp_path / "ro") in err, err


def test_evaluate_accepts_scanner_rounding_and_training_cases_only_when_asked(run_dir, phantom_json, tmp_path, caplog):
    cohort = tmp_path / "cohort"
    shutil.copytree(Path(phantom_json).parent, cohort)
    split = json.loads((run_dir / "split.json").read_text())
    held_out = split["validation"][0]
    shutil.rmtree(cohort / held_out)
    _perturbed_case(Path(phantom_json).parent / held_out, tmp_path / held_out)
    shutil.move(tmp_path / held_out, cohort / held_out)
    status, _, err = _run(
        [
            "evaluate",
            "--checkpoint",
            run_dir / "checkpoints" / "last.pt",
            "--data",
            cohort / "dataset.json",
            "--out",
            tmp_path / "eval",
            "--split",
            "all",
            "--include-training",
        ]
    )
    assert status == 0, err
    assert "were used to train this checkpoint" in caplog.text
    assert "training cases" in (tmp_path / "eval" / "summary.md").read_text()


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "d", "--out", "o", "--epoch", "3"], "unrecognized arguments: --epoch"),
        (
            ["infer", "--checkpoint", "c", "--input", "i", "--out", "o", "--overlap", "1.5"],
            "--overlap: must be in [0, 1)",
        ),
        (["evaluate", "--checkpoint", "c", "--data", "d", "--out", "o", "--overlap", "-0.1"], "must be in [0, 1)"),
        (["train", "--data", "d", "--out", "o", "--modality-dropout", "2"], "--modality-dropout: must be in [0, 1]"),
        (["train", "--data", "d", "--out", "o", "--lr", "nan"], "--lr: expected a finite number"),
        (["train", "--data", "d", "--out", "o", "--validation-fraction", "1"], "must be in [0, 1)"),
        (["infer", "--checkpoint", "c", "--input", "i", "--out", "o", "--sw-batch-size", "0"], "positive integer"),
        (
            ["infer", "--checkpoint", "c", "--input", "i", "--out", "o", "--overwrite", "--skip-existing"],
            "not allowed with",
        ),
    ],
)
def test_arguments_are_checked_when_parsed_and_never_abbreviated(argv, message, tmp_path):
    status, _, err = _run(argv)  # the files do not exist: the error must come from parsing
    assert status == 2 and message in err, err
    assert not (Path("o")).exists()
