"""The fast 2-D fusion study on synthetic cases (seconds): the batches are a function of the seed
alone (identical for every variant), runs resume, faults are scored inside vs outside, and the
report marks significant paired differences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from e2pa.data.faults import FAULT_CODES
from e2pa.engine import study
from e2pa.engine.study import Case2D, StudyConfig, plan_batches


def _cases(n: int, seed: int = 0, faulted: bool = True) -> list[Case2D]:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        shape = (16, 16, 6)
        brain = np.zeros(shape, bool)
        brain[2:14, 2:14] = True
        regions = np.zeros((3, *shape), np.uint8)
        regions[1, 5:11, 5:11, 1:5] = 1
        regions[0, 6:10, 6:10, 2:4] = 1
        regions[2, 7:9, 7:9, 2:4] = 1
        image = (rng.standard_normal((4, *shape)) + regions[1][None] * 2).astype(np.float32) * brain
        faultmap, faults = None, []
        if faulted:
            faultmap = np.zeros((*shape, 4), np.uint8)
            faultmap[2:8, 2:14, :, 0] = FAULT_CODES["void"]
            faults = [{"modality": "flair", "kind": "void"}]
        cases.append(Case2D(f"c{i}", image, regions, brain, faultmap, faults, (1.0, 1.0, 1.0)))
    return cases


def test_batches_depend_on_the_seed_alone():
    cases = _cases(3)
    a, b, c = (plan_batches(cases, s, 5, 2, 0.5, 8) for s in (1, 1, 2))
    for field in ("cases", "slices", "corners", "flips", "scale", "shift", "masks"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.scale, c.scale)
    assert a.masks.any(axis=2).all(), "every sample keeps a modality"


def test_run_study_scores_resumes_and_reports(tmp_path, monkeypatch):
    cases = _cases(5)
    monkeypatch.setattr(study, "build_cohort", lambda out, cfg: tmp_path / "dataset.json")
    monkeypatch.setattr(study, "load_cases", lambda path: cases)
    cfg = StudyConfig(
        out=str(tmp_path / "out"),
        variants=("implicit-mean", "EHF"),
        seeds=1,
        n_train=2,
        n_val=1,
        n_test=2,
        steps=2,
        batch_size=2,
        features=(4, 8),
        curve_every=1,
        val_every=1,
    )
    runs = study.run_study(cfg)
    result = json.loads((runs / "EHF" / "seed0.json").read_text())
    assert len(result["per_case"]) == 2 and 0 <= result["subset_dice"] <= 1
    assert [c["step"] for c in result["curve"]] == [1, 2] and "val_dice" in result["curve"][-1]
    assert {w["kind"] for w in result["fault_weights"]} == {"void"}
    assert "fault_weights" not in json.loads((runs / "implicit-mean" / "seed0.json").read_text())
    before = (runs / "EHF" / "seed0.json").stat().st_mtime_ns
    study.run_study(cfg)  # resumes: nothing to do
    assert (runs / "EHF" / "seed0.json").stat().st_mtime_ns == before
    doc = study.write_report(cfg.out, "faults", tmp_path / "docs" / "report.md", command="test", provenance="here")
    text = doc.read_text()
    assert "| EHF | 1 |" in text and "void" in text
    assert (tmp_path / "docs" / "report.csv").is_file() and (tmp_path / "docs" / "report-curves.png").is_file()


def test_paired_table_marks_a_constant_gain_as_significant():
    def run(dice):
        return {"per_case": [{"dice_mean": dice, "subset_dice": dice, "hd95_mean": 1.0}] * 3}

    runs = {"implicit-mean": {0: run(0.5), 1: run(0.5)}, "EHF+ESA": {0: run(0.6), 1: run(0.6)}}
    table = study.paired_table(runs, n_boot=200)
    assert table["EHF+ESA"]["dice_mean"].mean == pytest.approx(0.1)
    assert table["EHF+ESA"]["dice_mean"].significant and not table["EHF+ESA"]["hd95_mean"].significant
