"""`e2pa evaluate` scores exactly the label map `e2pa infer` writes: the same Dice and HD95 as
`e2pa score` (e2pa convention) on the written files."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2pa.data import REGIONS, discover
from e2pa.engine.evaluation import evaluate
from e2pa.engine.inference import infer
from e2pa.engine.scoring import score_folder
from e2pa.engine.training import train


def test_evaluate_equals_scoring_the_written_predictions(tiny_config, tmp_path):
    cfg = tiny_config(epochs=1, max_steps_per_epoch=2)
    train(cfg)
    checkpoint = Path(cfg.out) / "checkpoints" / "last.pt"
    result = evaluate(checkpoint, cfg.data, tmp_path / "eval", split="validation", device="cpu")
    folders = [str(Path(c["image"][0]).parent) for c in discover(cfg.data).validation]
    report = infer(checkpoint, folders, tmp_path / "pred", device="cpu", maps="none", layout="flat", log=lambda _: None)
    assert not report.failures
    scores = score_folder(tmp_path / "pred", cfg.data, split="validation")
    assert any(result.summary[r]["dice"] > 0 for r in REGIONS)  # something to compare
    for region in REGIONS:
        assert scores.summary[region]["dice"] == pytest.approx(result.summary[region]["dice"], abs=1e-9)
        assert scores.summary[region]["hd95"] == pytest.approx(result.summary[region]["hd95"], rel=1e-6)
