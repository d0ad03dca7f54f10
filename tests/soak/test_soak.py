"""Long-run check (``make soak``, not part of ``make test``): many small training steps and
inferences in one process keep memory flat and give the same results for the same seed."""

from __future__ import annotations

import dataclasses
import resource

import pytest
import torch

from e2pa.data import find_cases
from e2pa.engine.inference import load_model, predict_case
from e2pa.engine.training import TrainConfig, Trainer


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from e2pa.data import write_phantom_cohort

    return write_phantom_cohort(tmp_path_factory.mktemp("soak"), cases=6, seed=1, shape=32)


def test_many_steps_and_inferences_keep_memory_flat_and_results_deterministic(cohort, tmp_path):
    base = TrainConfig(
        data=str(cohort),
        out=str(tmp_path / "a"),
        epochs=30,
        batch_size=2,
        roi_size=(16, 16, 16),
        max_steps_per_epoch=4,
        val_every=10,
        progress=False,
        seed=4,
        model=dict(features=(4, 8)),
    )
    first = Trainer(base)
    samples = []
    for epoch in range(base.epochs):
        first.run(stop_after_steps=(epoch + 1) * 4)
        samples.append(_rss_mb())
    warm, last = sum(samples[5:10]) / 5, sum(samples[-5:]) / 5
    assert last - warm < 150, f"memory grew from {warm:.0f} MB to {last:.0f} MB over {len(samples)} epochs"

    second = Trainer(dataclasses.replace(base, out=str(tmp_path / "b")))
    second.run()
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), f"{key} differs between identical runs"

    loaded = load_model(tmp_path / "b" / "checkpoints" / "last.pt")
    case = find_cases([str(cohort.parent / "Phantom_005")])[0]
    reference = predict_case(loaded, case).label
    before = _rss_mb()
    for _ in range(40):
        assert (predict_case(loaded, case).label == reference).all()
    assert _rss_mb() - before < 100, "inference leaks memory"


def test_kill_resume_loop_ends_identical_to_an_uninterrupted_run(cohort, tmp_path):
    """``e2pa train`` SIGKILLed again and again at random moments (while starting, validating,
    training, writing a checkpoint) and restarted each time ends bit-identical to a run that was
    never interrupted. ``E2PA_SOAK_KILLS`` sets the number of kills (default 12)."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from e2pa.engine.checkpoint import load_checkpoint

    kills = int(os.environ.get("E2PA_SOAK_KILLS", "12"))
    args = [
        "--data",
        str(cohort),
        "--epochs",
        "4",
        "--batch-size",
        "1",
        "--roi",
        "16",
        "--features",
        "4",
        "8",
        "--max-steps-per-epoch",
        "4",
        "--checkpoint-every",
        "1",
        "--no-progress",
        "--seed",
        "9",
        "--lr",
        "0.003",
    ]
    env = {**os.environ, "E2PA_BACKEND": "torch"}
    command = [sys.executable, "-m", "e2pa", "train"]
    straight = tmp_path / "straight"
    subprocess.run([*command, "--out", str(straight), *args], env=env, check=True, capture_output=True, timeout=1800)

    run = tmp_path / "killed"
    rng = random.Random(2024)
    killed = 0
    for _ in range(kills + 50):
        started = (run / "config.json").is_file()
        argv = (
            [*command, "--out", str(run), "--resume", "--no-progress"]
            if started
            else [*command, "--out", str(run), *args]
        )
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if killed < kills:
            try:
                proc.wait(timeout=rng.uniform(0.5, 8.0))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                killed += 1
        _, err = proc.communicate(timeout=1800)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: {err}"
        time.sleep(0.05)
    else:
        pytest.fail("the run never finished")
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    reference = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert final["global_step"] == reference["global_step"] == 16
    for key, value in reference["model"].items():
        assert torch.equal(value, final["model"][key]), f"{key} differs after {killed} kill(s)"
    assert killed >= min(kills, 1)
