"""Scoring: the official convention against the official BraTS evaluator's frozen outputs, our own
convention's definitions on hand-made cases, and ``e2pa score`` on folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _official_cases import AFFINE, SHAPE, all_cases, hand_made_cases

from e2pa.cli import main
from e2pa.data import DataError
from e2pa.engine.scoring import diagonal, score_folder, score_label_maps, score_region

FROZEN = json.loads((Path(__file__).parent / "official_brats_eval.json").read_text(), parse_constant=float)
ZOOMS = (1.0, 1.25, 1.5)


def _agree(ours: float, official: float | None, metric: str) -> bool:
    official = math.nan if official is None else official
    if math.isnan(official) or math.isinf(official):
        return (math.isnan(ours) and math.isnan(official)) or ours == official
    return abs(ours - official) <= (0.1 if "hd95" in metric else 1e-3)


@pytest.fixture(scope="module")
def cases():
    return all_cases()


def test_official_convention_reproduces_the_official_evaluator(cases):
    """Every region of every hand-made and phantom case, every column the official table ranks on."""
    assert set(cases) == set(FROZEN["cases"])
    checked, worst = 0, 0.0
    for case, (ref, pred, affine) in cases.items():
        zooms = nib.Nifti1Image(ref, affine).header.get_zooms()[:3]
        ours = score_label_maps(ref, pred, zooms, "brats2024", convention="official")
        for region, expected in FROZEN["cases"][case].items():
            for metric, value in expected.items():
                got = getattr(ours[region], metric)
                assert _agree(got, value, metric), (case, region, metric, got, value)
                if value is not None and math.isfinite(value):
                    worst = max(worst, abs(got - value))
                checked += 1
    assert checked == len(cases) * 6 * 7 and worst < 1e-9


def test_the_frozen_outputs_cover_the_edge_cases():
    """The fixture holds what the cases are meant to show (so a regenerated fixture cannot go stale silently)."""
    frozen = FROZEN["cases"]
    assert frozen["00004-000"]["WT"]["hd95"] == 373 and frozen["00004-000"]["WT"]["lesion_hd95"] == math.inf
    assert frozen["00006-000"]["WT"]["dice"] is None  # both empty: NaN
    assert frozen["00003-000"]["WT"]["hd95"] == 373  # no overlap: the zero-TP edge case
    assert frozen["00007-000"]["WT"]["fn"] == 1 and frozen["00008-000"]["WT"]["fp"] >= 1
    assert frozen["00009-000"]["ET"]["tp"] == 1 and frozen["00009-000"]["ET"]["fp"] == 1  # touching = one lesion
    # the official reader measures voxel axis 0 with the last zoom (1.5 mm) and axis 2 with the first (1 mm):
    assert frozen["00001-000"]["TC"]["lesion_hd95"] == 3.0 and frozen["00002-000"]["TC"]["lesion_hd95"] == 2.0
    assert frozen["00001-000"]["TC"]["hd95"] == 2.0 == frozen["00002-000"]["TC"]["hd95"]  # global: voxels


def test_e2pa_convention_definitions():
    empty = np.zeros(SHAPE, bool)
    ref, pred = (hand_made_cases()["00007-000"][i] > 0 for i in (0, 1))  # two lesions, one found
    both_empty = score_region(empty, empty, ZOOMS)
    assert (both_empty.dice, both_empty.hd95, both_empty.lesion_dice, both_empty.lesion_hd95) == (1.0, 0.0, 1.0, 0.0)
    missed = score_region(ref, empty, ZOOMS)
    assert missed.dice == 0 and missed.hd95 == pytest.approx(diagonal(SHAPE, ZOOMS)) and missed.fn == 2
    one_missed = score_region(ref, pred, ZOOMS)
    official = score_region(ref, pred, ZOOMS, convention="official")
    assert (one_missed.tp, one_missed.fn, one_missed.fp) == (1, 1, 0)
    assert one_missed.lesion_dice == pytest.approx(official.lesion_dice / 2)  # the missed lesion scores 0
    assert one_missed.lesion_hd95 > diagonal(SHAPE, ZOOMS) / 2  # and the diagonal
    extra = pred | np.roll(empty, 0)
    extra[35:38, 30:33, 26:29] = True
    with_fp = score_region(ref, extra, ZOOMS)
    assert with_fp.fp == 1 and with_fp.lesion_dice == pytest.approx(official.lesion_dice / 3)


def test_e2pa_hd95_is_in_mm(cases):
    from e2pa.engine.metrics import hd95

    ref, pred, _ = cases["00001-000"]  # shifted by 2 voxels along axis 0
    a = score_region(ref > 0, pred > 0, (1.0, 1.0, 1.0))
    b = score_region(ref > 0, pred > 0, (2.0, 2.0, 2.0))
    assert b.hd95 == pytest.approx(2 * a.hd95) and b.lesion_hd95 == pytest.approx(2 * a.lesion_hd95)
    assert a.hd95 == pytest.approx(hd95(pred > 0, ref > 0, (1.0, 1.0, 1.0)))  # MONAI's HD95 on the full arrays
    c = score_region(ref > 0, pred > 0, (1.0, 1.25, 1.5))
    assert c.hd95 == pytest.approx(hd95(pred > 0, ref > 0, (1.0, 1.25, 1.5)))  # true zooms, no axis reversal


def _write_folder(tmp_path: Path, names: list[str]) -> tuple[Path, Path]:
    refs, preds = tmp_path / "ref", tmp_path / "pred"
    refs.mkdir()
    preds.mkdir()
    made = hand_made_cases()
    for name in names:
        ref, pred = made[name]
        nib.save(nib.Nifti1Image(ref, AFFINE), refs / f"BraTS-GLI-{name}-seg.nii.gz")
        nib.save(nib.Nifti1Image(pred, AFFINE), preds / f"BraTS-GLI-{name}.nii.gz")
    return refs, preds


def test_score_command_official_matches_the_frozen_table(tmp_path, capsys):
    names = ["00001-000", "00004-000", "00006-000", "00008-000"]
    refs, preds = _write_folder(tmp_path, names)
    out = tmp_path / "scores"
    argv = [
        "score",
        "--pred",
        str(preds),
        "--data",
        str(refs),
        "--labels",
        "brats2024",
        "--convention",
        "official",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "lesion-wise Dice" in capsys.readouterr().out
    scores = json.loads((out / "scores.json").read_text(), parse_constant=float)
    for name in names:
        for region, expected in FROZEN["cases"][name].items():
            for metric, value in expected.items():
                assert _agree(scores["per_case"][f"BraTS-GLI-{name}"][region][metric], value, metric)
    # the mean skips NaN (both-empty case 00006 does not count for WT) as the official table's pandas mean does
    wt = [FROZEN["cases"][n]["WT"]["dice"] for n in names if FROZEN["cases"][n]["WT"]["dice"] is not None]
    assert scores["summary"]["WT"]["dice"] == pytest.approx(np.mean(wt)) and scores["summary"]["WT"]["cases"] == 3
    assert {p.name for p in out.iterdir()} == {"scores.json", "scores.md", "scores_per_case.csv", "scores_summary.csv"}
    assert main(argv) == 2  # never overwritten without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_score_matches_cases_and_names_missing_and_extra_ones(tmp_path):
    refs, preds = _write_folder(tmp_path, ["00001-000", "00002-000"])
    (preds / "BraTS-GLI-00002-000.nii.gz").rename(preds / "Other-case.nii.gz")
    with pytest.raises(DataError, match=r"match no labelled case.*Other-case\.nii\.gz"):
        score_folder(preds, refs, label_convention="brats2024")
    (preds / "Other-case.nii.gz").unlink()
    with pytest.raises(DataError, match=r"no prediction for 1 of 2 case\(s\): BraTS-GLI-00002-000"):
        score_folder(preds, refs, label_convention="brats2024")
    assert list(score_folder(preds, refs, label_convention="brats2024", missing="skip").per_case) == [
        "BraTS-GLI-00001-000"
    ]
    penalised = score_folder(preds, refs, label_convention="brats2024", missing="penalize", convention="official")
    assert penalised.missing == ["BraTS-GLI-00002-000"]
    assert penalised.per_case["BraTS-GLI-00002-000"]["ET"].hd95 == 373
    with pytest.raises(DataError, match="--labels"):
        score_folder(preds, refs)


def test_score_reads_e2pa_infer_layout_and_checks_values(tmp_path):
    refs, preds = _write_folder(tmp_path, ["00001-000"])
    nested = tmp_path / "infer_out" / "BraTS-GLI-00001-000"
    nested.mkdir(parents=True)
    (preds / "BraTS-GLI-00001-000.nii.gz").rename(nested / "BraTS-GLI-00001-000_pred.nii.gz")
    report = score_folder(tmp_path / "infer_out", refs, label_convention="brats2024")
    assert report.per_case["BraTS-GLI-00001-000"]["WT"].dice > 0.5
    with pytest.raises(DataError, match=r"label values \[3\] are not in the brats2021"):
        score_folder(tmp_path / "infer_out", refs, label_convention="brats2021")
