"""One scoring path: validation during training and `e2pa evaluate` give the same Dice for the same
weights (same chain, same sliding window, same overlap)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from e2pa.data import REGIONS
from e2pa.engine.evaluation import evaluate, evaluate_cases
from e2pa.engine.inference import SW_OVERLAP, infer, predict_case, sliding_window_outputs
from e2pa.engine.training import TrainConfig, train


def test_one_overlap_everywhere():
    defaults = {TrainConfig(data="d", out="o").sw_overlap}
    defaults |= {
        inspect.signature(f).parameters["overlap"].default
        for f in (evaluate, evaluate_cases, infer, predict_case, sliding_window_outputs)
    }
    assert defaults == {SW_OVERLAP}


def test_validation_and_evaluate_score_the_last_checkpoint_alike(tiny_config, tmp_path):
    cfg = tiny_config(epochs=1, max_steps_per_epoch=2)
    final = train(cfg)
    result = evaluate(
        Path(cfg.out) / "checkpoints" / "last.pt", cfg.data, tmp_path / "eval", split="validation", device="cpu"
    )
    assert any(final[f"val_dice_{r}"] > 0 for r in REGIONS)  # something to compare
    for region in REGIONS:
        assert final[f"val_dice_{region}"] == pytest.approx(result.summary[region]["dice"], rel=1e-12, abs=1e-12)
    assert final["val_dice_mean"] == pytest.approx(result.summary["mean"]["dice"], rel=1e-12, abs=1e-12)
