"""Dice and HD95 per BraTS region (TC, WT, ET), with empty masks handled explicitly.

e2pa's convention (never silently dropped): both masks empty → Dice 1, HD95 0; exactly one empty →
Dice 0, HD95 = the volume's diagonal in millimetres (the largest distance possible in the image).
MONAI's metric would return NaN there and a mean would then skip the case, rewarding a model
that misses lesions (MONAI #9095). The official BraTS evaluator differs (NaN for both empty, 373
for one empty, HD95 in voxels): :mod:`e2pa.engine.scoring` has both conventions side by side.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from ..data.labels import REGIONS


@dataclasses.dataclass(frozen=True)
class RegionScore:
    dice: float
    hd95: float
    gt_empty: bool
    pred_empty: bool


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, g).sum()) / total


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric surface distance in mm; 0 when both empty, the diagonal when one is."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return volume_diagonal_mm(p.shape, spacing)
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():  # MONAI 1.6 warns about an argument its own code passes
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            torch.from_numpy(p)[None, None],
            torch.from_numpy(g)[None, None],
            include_background=True,
            percentile=95,
            spacing=list(spacing),
        )
    return float(value.item())


def region_scores(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, RegionScore]:
    """pred, gt ``[3, *S]`` boolean region masks in TC, WT, ET order → a score per region."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or pred.shape[0] != len(REGIONS):
        raise ValueError(
            f"region_scores: pred and gt must both be [3, *S] (TC, WT, ET); got {list(pred.shape)} and {list(gt.shape)}"
        )
    return {
        name: RegionScore(
            dice=dice_score(pred[i], gt[i]),
            hd95=hd95(pred[i], gt[i], spacing),
            gt_empty=not gt[i].any(),
            pred_empty=not pred[i].any(),
        )
        for i, name in enumerate(REGIONS)
    }


def summarize(per_case: Iterable[Mapping[str, RegionScore]]) -> dict[str, dict[str, float]]:
    """Mean Dice/HD95 per region over cases (every case counts) and how many had an empty ground truth."""
    cases = list(per_case)
    if not cases:
        raise ValueError("summarize: no cases to summarise")
    out: dict[str, dict[str, float]] = {}
    for name in REGIONS:
        scores = [c[name] for c in cases]
        out[name] = {
            "dice": float(np.mean([s.dice for s in scores])),
            "hd95": float(np.mean([s.hd95 for s in scores])),
            "empty_gt_cases": float(sum(s.gt_empty for s in scores)),
        }
    out["mean"] = {
        "dice": float(np.mean([out[r]["dice"] for r in REGIONS])),
        "hd95": float(np.mean([out[r]["hd95"] for r in REGIONS])),
    }
    return out
