import numpy as np
import pytest

from e2pa.engine.metrics import REGIONS, dice_score, hd95, region_scores, summarize, volume_diagonal_mm


def _ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_dice_values():
    a = _ball((20, 20, 20), (10, 10, 10), 4)
    assert dice_score(a, a) == 1.0
    assert dice_score(a, np.zeros_like(a)) == 0.0
    assert dice_score(np.zeros_like(a), np.zeros_like(a)) == 1.0
    b = np.zeros_like(a)
    b[:10] = a[:10]
    assert dice_score(a, b) == pytest.approx(2 * b.sum() / (a.sum() + b.sum()))


def test_hd95_empty_cases_are_explicit():
    a = _ball((20, 22, 24), (10, 10, 10), 4)
    empty = np.zeros_like(a)
    assert hd95(empty, empty, (1, 1, 1)) == 0.0
    assert hd95(a, empty, (1, 2, 1)) == pytest.approx(volume_diagonal_mm(a.shape, (1, 2, 1)))
    assert hd95(empty, a, (1, 1, 1)) == pytest.approx(np.sqrt(20**2 + 22**2 + 24**2))


def test_hd95_of_a_shift_scales_with_spacing():
    a = _ball((30, 30, 30), (15, 15, 15), 5)
    b = np.roll(a, 2, axis=0)
    assert hd95(a, b, (1, 1, 1)) == pytest.approx(2.0, abs=0.3)
    assert hd95(a, b, (2, 2, 2)) == pytest.approx(2 * hd95(a, b, (1, 1, 1)))
    assert hd95(a, b, (2, 1, 1)) > hd95(a, b, (1, 1, 1))  # the shift is along the stretched axis


def test_region_scores_and_summary_keep_empty_cases():
    gt = np.zeros((3, 16, 16, 16), bool)
    gt[1] = _ball((16, 16, 16), (8, 8, 8), 5)
    missed = np.zeros_like(gt)  # predicts nothing: WT Dice 0 with the maximal HD95
    perfect = gt.copy()
    s_missed, s_perfect = region_scores(missed, gt, (1, 1, 1)), region_scores(perfect, gt, (1, 1, 1))
    assert s_missed["WT"].dice == 0 and s_missed["TC"].dice == 1 and s_missed["TC"].gt_empty
    summary = summarize([s_missed, s_perfect])
    assert summary["WT"]["dice"] == 0.5
    assert summary["WT"]["hd95"] == pytest.approx(volume_diagonal_mm((16, 16, 16), (1, 1, 1)) / 2)
    assert summary["TC"]["empty_gt_cases"] == 2
    assert set(summary) == set(REGIONS) | {"mean"}
    with pytest.raises(ValueError, match=r"\[3, \*S\]"):
        region_scores(missed[:2], gt[:2], (1, 1, 1))
