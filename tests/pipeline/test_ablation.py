"""e2pa ablate: variants and sweeps build what they say, and a tiny run writes its tables."""

from __future__ import annotations

import csv

import pytest

from e2pa.engine.ablation import PAPER_VARIANTS, VARIANTS, AblationConfig, experiments, parse_sweep, run_ablation


def test_variants_switch_exactly_the_paper_components():
    runs = experiments(AblationConfig(data="-", out="-"))
    assert list(runs) == list(PAPER_VARIANTS) and set(PAPER_VARIANTS) < set(VARIANTS)
    assert runs["implicit-mean"]["model"]["fusion"] == "mean" and runs["implicit-mean"]["model"]["esa_levels"] == ()
    assert runs["EHF"]["loss"]["lambda_esa"] == 0 and runs["EHF"]["model"]["fusion"] == "energy"
    assert runs["ESA"]["loss"]["lambda_ehf"] == 0 and runs["ESA"]["model"]["esa_levels"] == (-1,)
    assert runs["EHF+ESA"]["loss"] == {} and runs["EHF+ESA"]["model"]["fusion"] == "energy"
    # the first formulation stays runnable beside the paper's rows
    assert VARIANTS["EHF+ESA-raw"]["model"] == {**runs["EHF+ESA"]["model"], "fusion_norm": "none"}


def test_sweeps_vary_one_parameter_of_the_full_model():
    assert parse_sweep("steps=1,3,5") == ("steps", (1, 3, 5))
    runs = experiments(AblationConfig(data="-", out="-", sweep=parse_sweep("levels=2,3"), features=(8, 16, 32)))
    assert [r["model"]["features"] for r in runs.values()] == [(8, 16), (8, 16, 32)]
    runs = experiments(AblationConfig(data="-", out="-", sweep=("temperature", (0.5, 2.0))))
    assert [r["model"]["temperature"] for r in runs.values()] == [0.5, 2.0]
    for bad, message in (
        ("steps", "PARAM=v1"),
        ("depth=1,2", "unknown parameter"),
        ("steps=1", "at least two"),
        ("steps=a,b", "must be ints"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_sweep(bad)


@pytest.mark.slow
def test_a_tiny_ablation_writes_its_tables(phantom_json, tmp_path):
    cfg = AblationConfig(
        data=str(phantom_json),
        out=str(tmp_path / "ablation"),
        variants=("implicit-mean", "EHF+ESA"),
        seeds=1,
        epochs=1,
        roi=16,
        features=(4, 8),
        robustness_cases=1,
    )
    table = run_ablation(cfg, log=lambda _: None)
    rows = list(csv.DictReader(open(tmp_path / "ablation" / "ablation.csv")))
    assert [r["run"] for r in rows] == ["implicit-mean", "EHF+ESA"]
    for row in rows:
        assert 0 <= float(row["dice_mean"]) <= 1 and 0 <= float(row["missing_modality_dice"]) <= 1
    text = table.read_text()
    assert "implicit-mean" in text and "EHF+ESA" in text and "missing_modality_dice" in text
    assert (tmp_path / "ablation" / "ablation.png").stat().st_size > 1000
