"""Scoring label maps as BraTS does: global and lesion-wise Dice and HD95 per region, under two conventions.

The metrics work on any label maps in a :class:`~e2pa.data.LabelConvention`; the regions are the
convention's :meth:`~e2pa.data.LabelConvention.scored_regions` (TC, WT, ET, then NETC, SNFH and RC).

``convention="official"`` reproduces the official BraTS evaluator, ``brats-evaluation`` 0.0.10 with
its bundled ``config_gli.yaml`` (panoptica 2.1.7) and its ``parse_seg_results`` table, number for
number (tests compare against outputs frozen from that package, ``tests/data/official_brats_eval.json``):

- global Dice and HD95 on the binary region; HD95 is the 95th percentile of the *pooled* surface
  distances of both borders (borders by a 6-connected erosion), **in voxels** (no spacing);
- a region with no overlap between prediction and truth is an edge case: both empty → Dice and
  HD95 NaN (dropped from the mean); otherwise Dice 0 and HD95 ∞, which the table writes as 373
  ("the diagonal of the SRI-24 cube");
- lesions are 26-connected components; predicted and true lesions are matched one to one by
  maximum bipartite matching of their Dice (``linear_sum_assignment`` on 1 − Dice, pairs with
  Dice ≥ 1e-6); lesion-wise Dice and HD95 are the means over the *matched* pairs (panoptica's
  ``sq_dsc`` / ``sq_hd95``; missed and false-positive lesions show in ``tp``/``fp``/``fn``, not in
  the means); lesion-wise HD95 is in mm with the spacing the official reader pairs with the array
  (SimpleITK's ``GetSpacing()`` order against ``GetArrayFromImage``'s reversed axes: for a NIfTI
  with zooms (a, b, c) voxel axis 0 is measured with c and axis 2 with a — exact mm for isotropic
  BraTS data); with no match: both empty → NaN, else Dice 0 and HD95 ∞ (the official table keeps ∞);
- the average over cases skips NaN (pandas' mean), so a case with an empty region does not count
  for it; ∞ propagates.

``convention="e2pa"`` (the default) is ours, finite and in mm everywhere, so that every case counts:

- global Dice: both empty → 1, one empty → 0; HD95 in mm from the file's voxel spacing, the larger
  of the two directed 95th percentiles (MONAI's ``compute_hausdorff_distance``); both empty → 0,
  exactly one empty → the volume's diagonal in mm;
- lesion-wise: the same components and one-to-one matching; every missed true lesion and every
  unmatched predicted lesion scores Dice 0 and HD95 = the volume's diagonal in mm (BraTS 2023's
  penalties, with the image's own diagonal in place of 374); lesion-wise Dice = sum of matched
  Dice / (tp + fp + fn); both empty → Dice 1, HD95 0;
- the average over cases is a plain mean of finite numbers.

Why the default is ``e2pa``: the official numbers drop every case whose region is empty in both
masks, score ∞ for a region the model missed entirely, mix voxels (global) with mm (lesion-wise)
and — its lesion-wise means over matched lesions only — rate a prediction with many false
positives the same as a clean one; fine for a leaderboard that also ranks detection, misleading as
the one number of an experiment. ``--convention official`` gives the leaderboard's numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .metrics import volume_diagonal_mm as diagonal  # the volume's diagonal in mm (one home: metrics)

CONVENTIONS = ("e2pa", "official")
DEFAULT_CONVENTION = "e2pa"
OFFICIAL_MAX_HD95 = 373.0  # parse_seg_results: "diameter of the cube in SRI space"
OFFICIAL_MATCHING_THRESHOLD = 1e-6  # config_gli.yaml: MaxBipartiteMatching(matching_threshold=0.000001)
_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclasses.dataclass(frozen=True)
class RegionResult:
    """Scores of one region of one case. ``dice``/``hd95``: global; ``lesion_dice``/``lesion_hd95``:
    lesion-wise; ``tp``/``fp``/``fn``: matched, false-positive and missed lesions; ``ref_voxels`` /
    ``pred_voxels``: region sizes. HD95 units depend on the convention (see the module docstring)."""

    dice: float
    hd95: float
    lesion_dice: float
    lesion_hd95: float
    tp: int
    fp: int
    fn: int
    ref_voxels: int
    pred_voxels: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(f"metric convention must be one of {', '.join(CONVENTIONS)}; got {convention!r}")
    return convention


# ------------------------------------------------------------------------------------------------
# distances
# ------------------------------------------------------------------------------------------------
def surface_distances(
    reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each border voxel of ``reference`` to the border of ``prediction`` and back,
    for two non-empty boolean masks of one shape. Borders: the mask minus its 6-connected erosion
    (voxels at the array edge count as border). ``spacing``: per-axis voxel size (None: voxels)."""
    footprint = ndimage.generate_binary_structure(reference.ndim, 1)
    ref_border = reference ^ ndimage.binary_erosion(reference, structure=footprint, iterations=1)
    pred_border = prediction ^ ndimage.binary_erosion(prediction, structure=footprint, iterations=1)
    sampling = None if spacing is None else [float(s) for s in spacing]
    to_ref = ndimage.distance_transform_edt(~pred_border, sampling=sampling)[ref_border]
    to_pred = ndimage.distance_transform_edt(~ref_border, sampling=sampling)[pred_border]
    return to_ref, to_pred


def pooled_hd95(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile of both directions' surface distances pooled (panoptica's HD95), cropped to
    the pair's bounding box first (exact: borders and distances inside it do not change)."""
    reference, prediction = _crop_to_union(reference, prediction)
    to_ref, to_pred = surface_distances(reference, prediction, spacing)
    return float(np.percentile(np.hstack((to_ref, to_pred)), 95))


def directed_max_hd95(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float]) -> float:
    """The larger of the two directed 95th percentiles, in the units of ``spacing`` (MONAI's HD95)."""
    from .metrics import hd95

    reference, prediction = _crop_to_union(reference, prediction)
    return hd95(prediction, reference, spacing)


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    union = a | b
    if not union.any():
        return a, b
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(union))
    return a[box], b[box]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


# ------------------------------------------------------------------------------------------------
# lesions
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LesionMatch:
    """One-to-one matching of 26-connected lesions: ``pairs`` (reference id, prediction id, Dice),
    ids counting from 1 in the component maps ``ref_lesions`` / ``pred_lesions``."""

    ref_lesions: np.ndarray
    pred_lesions: np.ndarray
    n_ref: int
    n_pred: int
    pairs: list[tuple[int, int, float]]


def match_lesions(reference: np.ndarray, prediction: np.ndarray) -> LesionMatch:
    """Connected components (26-connectivity) of both masks, matched one to one by maximum
    bipartite matching of Dice among overlapping pairs (panoptica's ``MaxBipartiteMatching``)."""
    ref_lesions, n_ref = ndimage.label(reference, structure=_CONNECTIVITY_26)
    pred_lesions, n_pred = ndimage.label(prediction, structure=_CONNECTIVITY_26)
    if n_ref == 0 or n_pred == 0:
        return LesionMatch(ref_lesions, pred_lesions, n_ref, n_pred, [])
    ref_sizes = np.bincount(ref_lesions.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_lesions.ravel(), minlength=n_pred + 1)
    both = (ref_lesions > 0) & (pred_lesions > 0)
    joint = np.bincount(
        ref_lesions[both].astype(np.int64) * (n_pred + 1) + pred_lesions[both], minlength=(n_ref + 1) * (n_pred + 1)
    ).reshape(n_ref + 1, n_pred + 1)
    overlap_dice = 2.0 * joint[1:, 1:] / (ref_sizes[1:, None] + pred_sizes[None, 1:])
    cost = np.full((n_ref, n_pred), 1.0 + 1e-6)
    eligible = overlap_dice >= OFFICIAL_MATCHING_THRESHOLD
    cost[eligible] = 1.0 - overlap_dice[eligible]
    rows, cols = linear_sum_assignment(cost)
    pairs = [(int(r) + 1, int(c) + 1, float(overlap_dice[r, c])) for r, c in zip(rows, cols) if cost[r, c] < 1.0]
    return LesionMatch(ref_lesions, pred_lesions, n_ref, n_pred, pairs)


# ------------------------------------------------------------------------------------------------
# one region, one case
# ------------------------------------------------------------------------------------------------
def score_region(
    reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float], *, convention: str = DEFAULT_CONVENTION
) -> RegionResult:
    """Global and lesion-wise scores of one binary region (``[X, Y, Z]`` masks in the file's voxel
    order, ``spacing`` the file's zooms in mm) under ``convention`` (see the module docstring)."""
    check_convention(convention)
    reference, prediction = np.asarray(reference, bool), np.asarray(prediction, bool)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference and prediction shapes differ: {reference.shape} vs {prediction.shape}")
    spacing = tuple(float(s) for s in spacing)
    match = match_lesions(reference, prediction)
    tp = len(match.pairs)
    fp, fn = match.n_pred - tp, match.n_ref - tp
    sizes = {"ref_voxels": int(reference.sum()), "pred_voxels": int(prediction.sum())}
    if convention == "official":
        return RegionResult(
            **_official_global(reference, prediction), **_official_lesions(match, spacing), tp=tp, fp=fp, fn=fn, **sizes
        )
    return RegionResult(
        **_e2pa_global(reference, prediction, spacing),
        **_e2pa_lesions(match, reference.shape, spacing),
        tp=tp,
        fp=fp,
        fn=fn,
        **sizes,
    )


def _official_global(reference: np.ndarray, prediction: np.ndarray) -> dict:
    if not (reference & prediction).any():  # panoptica's zero-TP edge case for global metrics
        if not reference.any() and not prediction.any():
            return {"dice": math.nan, "hd95": math.nan}
        return {"dice": 0.0, "hd95": OFFICIAL_MAX_HD95}
    return {"dice": dice(reference, prediction), "hd95": pooled_hd95(reference, prediction, None)}


def _official_lesions(match: LesionMatch, spacing: tuple[float, ...]) -> dict:
    if not match.pairs:
        if match.n_ref + match.n_pred == 0:
            return {"lesion_dice": math.nan, "lesion_hd95": math.nan}
        return {"lesion_dice": 0.0, "lesion_hd95": math.inf}
    reader_spacing = spacing[::-1]  # SimpleITK's spacing order against its reversed array axes
    dices, distances = [], []
    for r, p, pair_dice in match.pairs:
        dices.append(pair_dice)
        distances.append(pooled_hd95(match.ref_lesions == r, match.pred_lesions == p, reader_spacing))
    return {"lesion_dice": float(np.mean(dices)), "lesion_hd95": float(np.mean(distances))}


def _e2pa_global(reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...]) -> dict:
    if not reference.any() and not prediction.any():
        return {"dice": 1.0, "hd95": 0.0}
    if not reference.any() or not prediction.any():
        return {"dice": 0.0, "hd95": diagonal(reference.shape, spacing)}
    return {"dice": dice(reference, prediction), "hd95": directed_max_hd95(reference, prediction, spacing)}


def _e2pa_lesions(match: LesionMatch, shape: tuple[int, ...], spacing: tuple[float, ...]) -> dict:
    if match.n_ref + match.n_pred == 0:
        return {"lesion_dice": 1.0, "lesion_hd95": 0.0}
    penalty = diagonal(shape, spacing)
    unmatched = match.n_ref + match.n_pred - 2 * len(match.pairs)
    dices = [d for _, _, d in match.pairs] + [0.0] * unmatched
    distances = [
        directed_max_hd95(match.ref_lesions == r, match.pred_lesions == p, spacing) for r, p, _ in match.pairs
    ] + [penalty] * unmatched
    return {"lesion_dice": float(np.mean(dices)), "lesion_hd95": float(np.mean(distances))}


def score_label_maps(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing: Sequence[float],
    label_convention,
    *,
    convention: str = DEFAULT_CONVENTION,
) -> dict[str, RegionResult]:
    """Every scored region of a case: label maps ``[X, Y, Z]`` in ``label_convention`` → region →
    :class:`RegionResult`."""
    from ..data import get_convention

    regions = get_convention(label_convention).scored_regions()
    return {
        name: score_region(np.isin(reference, codes), np.isin(prediction, codes), spacing, convention=convention)
        for name, codes in regions.items()
    }


def official_missing_case(regions: Sequence[str]) -> dict[str, RegionResult]:
    """What the official table fills in for a case without a prediction: HD95 373, everything else 0."""
    return {
        name: RegionResult(
            dice=0.0,
            hd95=OFFICIAL_MAX_HD95,
            lesion_dice=0.0,
            lesion_hd95=OFFICIAL_MAX_HD95,
            tp=0,
            fp=0,
            fn=0,
            ref_voxels=0,
            pred_voxels=0,
        )
        for name in regions
    }


def average(per_case: Mapping[str, Mapping[str, RegionResult]], *, convention: str = DEFAULT_CONVENTION) -> dict:
    """Region → metric → mean over cases, and ``cases`` (how many entered each mean). NaN entries
    are skipped (only the official convention produces them, for regions empty in both masks)."""
    check_convention(convention)
    regions = list(next(iter(per_case.values()))) if per_case else []
    out: dict[str, dict[str, float]] = {}
    for region in regions:
        out[region] = {}
        for metric in ("dice", "hd95", "lesion_dice", "lesion_hd95", "tp", "fp", "fn"):
            values = np.array([float(getattr(case[region], metric)) for case in per_case.values()])
            kept = values[~np.isnan(values)]
            out[region][metric] = float(np.mean(kept)) if kept.size else math.nan
            if metric == "dice":
                out[region]["cases"] = int(kept.size)
    return out


# ------------------------------------------------------------------------------------------------
# folders
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScoreReport:
    """Everything :func:`score_folder` computed: per case and region, averages, and the cases the
    official convention penalised for having no prediction (``missing``)."""

    convention: str
    label_convention: str
    per_case: dict[str, dict[str, RegionResult]]
    summary: dict[str, dict[str, float]]
    missing: list[str]
    source: dict[str, str]

    def rows(self) -> list[dict]:
        return [
            {"case": case, "region": region, **result.as_dict()}
            for case, regions in self.per_case.items()
            for region, result in regions.items()
        ]

    def summary_rows(self) -> list[dict]:
        return [{"region": region, **values} for region, values in self.summary.items()]

    def to_json(self) -> dict:
        return {
            "convention": self.convention,
            "label_convention": self.label_convention,
            "source": self.source,
            "missing_predictions": self.missing,
            "summary": self.summary,
            "per_case": {case: {r: v.as_dict() for r, v in regions.items()} for case, regions in self.per_case.items()},
        }


PREDICTION_PATTERNS = (
    "{case}.nii.gz",
    "{case}.nii",
    "{case}_pred.nii.gz",
    "{case}/{case}_pred.nii.gz",
    "{case}/{case}.nii.gz",
)


def find_predictions(pred_dir: str | os.PathLike, cases: Sequence[str]) -> tuple[dict[str, Path], list[str]]:
    """Match prediction files to case ids: ``<case>.nii.gz`` (nnU-Net, official naming),
    ``<case>_pred.nii.gz`` or ``<case>/<case>_pred.nii.gz`` (``e2pa infer``). Returns the matches and
    the NIfTI files (or case folders) that belong to no case (extras)."""
    from ..data import DataError

    root = Path(pred_dir)
    if not root.is_dir():
        raise DataError(f"--pred {root}: not a folder" + ("" if root.exists() else " (it does not exist)"))
    found: dict[str, Path] = {}
    for case in cases:
        hits = [root / p.format(case=case) for p in PREDICTION_PATTERNS if (root / p.format(case=case)).is_file()]
        if len(hits) > 1:
            raise DataError(f"--pred {root}: case {case} has several predictions: {', '.join(map(str, hits))}")
        if hits:
            found[case] = hits[0]
    used = {p.resolve() for p in found.values()}
    used_folders = {p.parent.resolve() for p in found.values() if p.parent.resolve() != root.resolve()}
    extras = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.endswith((".nii.gz", ".nii")) and entry.resolve() not in used:
            extras.append(entry.name)
        elif entry.is_dir() and entry.resolve() not in used_folders and any(entry.glob("*.nii*")):
            extras.append(entry.name + "/")
    return found, extras


def score_folder(
    pred_dir: str | os.PathLike,
    data: str | os.PathLike,
    *,
    convention: str = DEFAULT_CONVENTION,
    split: str = "all",
    missing: str = "error",
    label_convention: str | None = None,
) -> ScoreReport:
    """Score every prediction in ``pred_dir`` against the labelled cases of ``data`` (a BraTS folder,
    a Decathlon or nnU-Net ``dataset.json`` or its folder), matched by case id.

    ``split``: which labelled cases must have a prediction (``all``, ``training``, ``validation``;
    nnU-Net ``labelsTs`` count as ``test``). A prediction for no such case is an error; a case
    without a prediction is an error (``missing="error"``), left out (``"skip"``) or scored with the
    official table's penalty (``"penalize"``: HD95 373, the rest 0). Predictions must hold label
    values of the data's convention and lie on the reference's grid.
    """
    from ..data import DataError, discover, get_convention, read_label_map
    from ..data.nifti import load_image

    check_convention(convention)
    if missing not in ("error", "skip", "penalize"):
        raise ValueError(f"missing must be error, skip or penalize; got {missing!r}")
    plain = _label_folder(Path(data))
    if plain is not None:
        if not label_convention:
            raise DataError(
                f"--data {data}: a folder of label maps does not say its label convention; pass "
                "--labels (brats2021, brats2023, brats2024 or msd)"
            )
        pools = {"training": plain, "validation": [], "test": []}
        labels = get_convention(label_convention)
    else:
        cohort = discover(data, label_convention=label_convention or "auto")
        pools = {
            "training": cohort.training,
            "validation": cohort.validation,
            "test": [c for c in cohort.test if "label" in c],
        }
        labels = get_convention(cohort.label_convention)
    if split == "all":
        references = [c for pool in pools.values() for c in pool]
    elif split in pools:
        references = pools[split]
    else:
        raise ValueError(f"split must be all, training, validation or test; got {split!r}")
    if not references:
        raise DataError(f"--data {data}: no labelled cases in split '{split}'")
    by_case = {c["case"]: c for c in references}
    all_labelled = {c["case"] for pool in pools.values() for c in pool}
    found, extras = find_predictions(pred_dir, sorted(all_labelled))
    outside = sorted(set(found) - set(by_case))
    if extras or outside:
        listed = extras + [f"{c} (in another split than '{split}')" for c in outside]
        raise DataError(
            f"--pred {pred_dir}: {len(listed)} prediction(s) match no labelled case of {data}: "
            f"{', '.join(listed[:8])}{' ...' if len(listed) > 8 else ''} (expected <case>.nii.gz, "
            "<case>_pred.nii.gz or <case>/<case>_pred.nii.gz for cases "
            f"{', '.join(sorted(by_case)[:3])} ...)"
        )
    absent = sorted(set(by_case) - set(found))
    if absent and missing == "error":
        raise DataError(
            f"--pred {pred_dir}: no prediction for {len(absent)} of {len(by_case)} case(s): "
            f"{', '.join(absent[:8])}{' ...' if len(absent) > 8 else ''}; pass --split to score one "
            "split, --missing skip to score the predicted cases only, or --missing penalize for "
            "the official penalty"
        )
    per_case: dict[str, dict[str, RegionResult]] = {}
    for case in sorted(by_case):
        if case not in found:
            if missing == "penalize":
                per_case[case] = official_missing_case(list(labels.scored_regions()))
            continue
        reference, reference_image = read_label_map(by_case[case]["label"], labels)
        prediction, prediction_image = read_label_map(found[case], labels)
        if prediction.shape != reference.shape or not np.allclose(
            prediction_image.affine, reference_image.affine, atol=1e-3
        ):
            raise DataError(
                f"{found[case]}: prediction grid {prediction.shape} does not match the reference "
                f"{by_case[case]['label']} grid {reference.shape} (shape or affine differ)"
            )
        spacing = load_image(by_case[case]["label"]).header.get_zooms()[:3]
        per_case[case] = score_label_maps(reference, prediction, spacing, labels, convention=convention)
    if not per_case:
        raise DataError(f"--pred {pred_dir}: no case to score")
    return ScoreReport(
        convention=convention,
        label_convention=labels.name,
        per_case=per_case,
        summary=average(per_case, convention=convention),
        missing=absent if missing == "penalize" else [],
        source={"pred": str(pred_dir), "data": str(data), "split": split},
    )


def _label_folder(path: Path) -> list[dict] | None:
    """Reference cases of a plain folder of label maps (``<case>.nii.gz``, ``<case>-seg.nii.gz``,
    ``<case>_seg.nii.gz``; the official evaluator's reference folder), or None for other data layouts."""
    if not path.is_dir() or (path / "dataset.json").is_file() or (path.parent / "dataset.json").is_file():
        return None
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith(".")
    )
    if not files or any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        return None
    cases = []
    for file in files:
        stem = file.name[: -len(".nii.gz")] if file.name.endswith(".nii.gz") else file.name[: -len(".nii")]
        for suffix in ("-seg", "_seg"):
            stem = stem.removesuffix(suffix)
        cases.append({"case": stem, "label": str(file)})
    return cases


def markdown(report: ScoreReport, digits: int = 4) -> str:
    units = (
        "global HD95 in voxels, lesion-wise HD95 in mm (official reader's axis pairing); NaN = empty "
        "in both, skipped in means"
        if report.convention == "official"
        else "HD95 in mm"
    )
    lines = [
        f"# Scores ({report.convention} convention)",
        "",
        f"{len(report.per_case)} case(s), labels: {report.label_convention}; {units}.",
        "",
        "| region | cases | Dice | HD95 | lesion-wise Dice | lesion-wise HD95 | TP | FP | FN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for region, v in report.summary.items():
        cells = [f"{v[k]:.{digits}f}" for k in ("dice", "hd95", "lesion_dice", "lesion_hd95")]
        counts = [f"{v[k]:.2f}" for k in ("tp", "fp", "fn")]
        lines.append(f"| {region} | {v['cases']} | " + " | ".join(cells + counts) + " |")
    if report.missing:
        lines += ["", f"Cases without a prediction (penalised as the official table does): {', '.join(report.missing)}"]
    return "\n".join(lines) + "\n"


def write_report(report: ScoreReport, out_dir: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """``scores_per_case.csv``, ``scores_summary.csv``, ``scores.json`` and ``scores.md`` in
    ``out_dir``, atomically; nothing is written when any exists and ``overwrite`` is False."""
    import json

    from ..io import OutputExistsError, atomic_write_text, csv_text

    out = Path(out_dir)
    files = {
        "scores_per_case.csv": csv_text(report.rows()),
        "scores_summary.csv": csv_text(report.summary_rows()),
        "scores.json": json.dumps(report.to_json(), indent=2, allow_nan=True) + "\n",
        "scores.md": markdown(report),
    }
    existing = [str(out / name) for name in files if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} already exists; pass --overwrite to replace the score files")
    return [atomic_write_text(out / name, text) for name, text in files.items()]
