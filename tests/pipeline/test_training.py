"""Training: outputs of a run, exact resume (also after SIGKILL), nothing overwritten, non-finite steps."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from e2pa.engine.checkpoint import load_checkpoint
from e2pa.engine.training import Trainer, TrainingError, modality_dropout_mask, train
from e2pa_kernels.testing import HostSyncCounter


def _weights(run: Path, name: str = "last.pt") -> dict:
    return load_checkpoint(run / "checkpoints" / name)["model"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_a_run_writes_checkpoints_metrics_and_curve(tiny_config):
    cfg = tiny_config()
    final = train(cfg)
    run = Path(cfg.out)
    assert {"config.json", "metrics.csv", "training_curve.png", "checkpoints"} <= {p.name for p in run.iterdir()}
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_task", "train_total", "val_dice_TC", "val_dice_WT", "val_dice_ET", "val_dice_mean"} <= set(rows[0])
    assert 0.0 <= final["val_dice_mean"] <= 1.0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["global_step"] == 4
    assert (run / "checkpoints" / "best.pt").is_file()
    assert not list(run.rglob("*.partial"))


def test_resume_continues_exactly(tiny_config, tmp_path):
    straight = tiny_config(out=str(tmp_path / "straight"))
    train(straight)
    halted = tiny_config(out=str(tmp_path / "halted"))
    Trainer(halted).run(stop_after_steps=3)  # mid-epoch 2, as an interruption would
    assert load_checkpoint(Path(halted.out) / "checkpoints" / "last.pt")["step_in_epoch"] == 1
    train(halted, resume=True)
    _assert_same_weights(_weights(Path(straight.out)), _weights(Path(halted.out)))
    a = load_checkpoint(Path(straight.out) / "checkpoints" / "last.pt")
    b = load_checkpoint(Path(halted.out) / "checkpoints" / "last.pt")
    for row_a, row_b in zip(a["history"], b["history"], strict=True):
        assert {k: v for k, v in row_a.items() if k != "samples_per_s"} == {
            k: v for k, v in row_b.items() if k != "samples_per_s"
        }
    torch.testing.assert_close(a["loss"], b["loss"])  # cohort prototypes continue too


def test_an_existing_run_is_never_overwritten(tiny_config):
    cfg = tiny_config(epochs=1, max_steps_per_epoch=1)
    train(cfg)
    before = (Path(cfg.out) / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run .*; pass --resume"):
        train(cfg)
    assert (Path(cfg.out) / "checkpoints" / "last.pt").read_bytes() == before
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny_config(out=cfg.out + "-missing"), resume=True)


def test_nonfinite_loss_skips_the_step_or_stops(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config(epochs=1, max_steps_per_epoch=2))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real = trainer.loss_fn.forward
    monkeypatch.setattr(
        trainer.loss_fn, "forward", lambda *a, **k: (lambda total, terms: (total * float("nan"), terms))(*real(*a, **k))
    )
    trainer.run()
    _assert_same_weights(before, trainer.model.state_dict())  # every step skipped: weights untouched
    assert trainer.history[-1]["skipped_steps"] == 2

    stopping = Trainer(tiny_config(out=trainer.cfg.out + "-stop", nonfinite="stop"))
    monkeypatch.setattr(
        stopping.loss_fn,
        "forward",
        lambda *a, **k: (lambda total, terms: (total * float("inf"), terms))(*real(*a, **k)),
    )
    with pytest.raises(TrainingError, match="loss is inf .* policy --nonfinite stop"):
        stopping.run()


def test_a_training_step_reads_no_device_value_on_the_host(tiny_config):
    """Forward with deep supervision and energies, the loss, backward, clipping, the non-finite guard and the
    optimiser step: no op that reads a tensor's value back to the host (a stream synchronisation on a GPU).
    The one op listed is LAPACK's ``eigh`` (ESA's default basis on the CPU's torch backend), one per ESA
    level: its info check reads host memory, no device synchronisation. On CUDA the basis comes from the
    sync-free Jacobi kernel (``e2pa_kernels.symeig``); tests/model/test_compile.py counts the network + loss
    step on the triton backend: zero; clipping, the guard and the optimiser are the same ops on either backend."""
    trainer = Trainer(tiny_config(modality_dropout=1.0))
    trainer.model.train()
    batch = next(iter(trainer._loader_factory([0, 1])))
    trainer._train_step(batch)  # the first step creates the optimiser's state
    with HostSyncCounter() as syncs:
        trainer._train_step(batch)
    assert [e for e in syncs.events if "_linalg_eigh" not in e] == []
    assert len(syncs.events) == len(trainer.model.esa) == 1


def test_modality_dropout_draws_non_empty_subsets():
    mask = modality_dropout_mask(2000, 4, 1.0, seed=0)
    assert mask.any(dim=1).all()
    assert len({tuple(row.tolist()) for row in mask}) == 15
    assert modality_dropout_mask(10, 4, 0.0, seed=0).all()
    assert torch.equal(modality_dropout_mask(50, 4, 0.5, seed=9), modality_dropout_mask(50, 4, 0.5, seed=9))


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_loses_nothing(phantom_json, tmp_path):
    """A training process killed with SIGKILL mid-run resumes from its last complete checkpoint and
    ends bit-identical to an uninterrupted run; no partial file is taken for a checkpoint."""
    args = [
        "--data",
        str(phantom_json),
        "--epochs",
        "2",
        "--batch-size",
        "1",
        "--roi",
        "16",
        "--features",
        "4",
        "8",
        "--max-steps-per-epoch",
        "3",
        "--checkpoint-every",
        "1",
        "--no-progress",
        "--seed",
        "5",
        "--lr",
        "0.003",
    ]
    env = {**os.environ, "E2PA_BACKEND": "torch"}
    straight = tmp_path / "straight"
    subprocess.run(
        [sys.executable, "-m", "e2pa", "train", "--out", str(straight), *args],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "e2pa", "train", "--out", str(killed), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and load_checkpoint(last)["global_step"] >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(last)  # the last complete checkpoint always loads
    assert 2 <= state["global_step"] < 6
    subprocess.run(
        [sys.executable, "-m", "e2pa", "train", "--out", str(killed), "--resume", "--no-progress"],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    _assert_same_weights(_weights(straight), _weights(killed))
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["global_step"] == 6


def _fp16_scaler(trainer: Trainer, init_scale: float) -> Trainer:
    """The gradient scaler an fp16 run has (CPU runs have none: no fp16 autocast there), and scaled
    gradients that pass through fp16 as an fp16 backward's do (above 65504 they become inf)."""
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    for parameter in trainer.model.parameters():
        parameter.register_hook(lambda grad: grad.half().to(grad.dtype))
    return trainer


def test_a_loss_scale_overflow_is_not_a_nonfinite_step(tiny_config):
    """fp16 loss scaling: GradScaler skipping a step whose scaled gradients overflowed (and halving
    the scale) is routine; it must not count as non-finite nor stop a run under --nonfinite stop."""
    trainer = _fp16_scaler(Trainer(tiny_config(epochs=1, max_steps_per_epoch=2, nonfinite="stop")), 2.0**40)
    trainer.run()  # at scales 2^40 and 2^39 any gradient above 1.2e-7 overflows fp16
    row = trainer.history[-1]
    assert row["overflow_steps"] == 2 and row["skipped_steps"] == 0
    assert trainer.scaler.get_scale() == 2.0**38
    state = load_checkpoint(Path(trainer.cfg.out) / "checkpoints" / "last.pt")
    assert state["running"]["overflows"] == 0 and state["history"][-1]["overflow_steps"] == row["overflow_steps"]


def test_a_nonfinite_gradient_at_unit_loss_scale_still_stops(tiny_config):
    """With the scale at 1 there is no scaling left to blame: an inf gradient is the gradient's own."""
    trainer = _fp16_scaler(Trainer(tiny_config(epochs=1, max_steps_per_epoch=2, nonfinite="stop")), 1.0)
    weight = next(trainer.model.parameters())
    weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(TrainingError, match="gradient norm is (inf|nan) .* policy --nonfinite stop"):
        trainer.run()
