"""The main job end to end at a tiny size: `make demo`'s run_demo builds the cohort, trains both
models, predicts with energy maps, scores and writes its report — and refuses to overwrite it."""

from __future__ import annotations

import pytest

from e2pa.engine.demo import DemoConfig, run_demo
from e2pa.io import OutputExistsError


def test_tiny_demo_runs_end_to_end_and_never_overwrites(tmp_path):
    cfg = DemoConfig(
        out=str(tmp_path / "demo"),
        cases=4,
        shape=32,
        roi=16,
        minutes=0.05,
        features=(4, 8),
        segresnet_filters=8,
        robustness_cases=1,
    )
    report = run_demo(cfg, log=lambda _: None)
    text = report.read_text()
    assert "| e2pa |" in text and "| segresnet |" in text and "not clinical data" in text
    for name in ("e2pa", "segresnet"):
        assert (tmp_path / "demo" / name / "checkpoints" / "last.pt").is_file()
    predictions = list((tmp_path / "demo" / "predictions").glob("*/*"))
    assert any(p.name.endswith("_overview.png") for p in predictions)
    assert any("energ" in p.name for p in predictions)

    before = report.read_bytes()
    with pytest.raises(OutputExistsError, match="already holds files"):
        run_demo(cfg, log=lambda _: None)
    assert report.read_bytes() == before


def test_segresnet_baseline_names_its_filter_constraint():
    from e2pa.model.baselines import SegResNetBaseline

    with pytest.raises(ValueError, match="init_filters must be a positive multiple of 8"):
        SegResNetBaseline(init_filters=4)
