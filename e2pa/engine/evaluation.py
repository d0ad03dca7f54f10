"""Evaluation: Dice and HD95 per region (TC, WT, ET) per case and on average, and the missing-modality
robustness table over all 2^M − 1 modality subsets.

Cases go through the validation chain (RAS, z-scored), are predicted whole by sliding window, and
are scored against their own label map in that space with the voxel spacing of that space. Empty
ground truths are scored by e2pa's convention (see :mod:`e2pa.engine.metrics`) and counted, never dropped.

Outputs in ``OUT/``: ``per_case.csv``, ``summary.csv``, ``summary.md`` and, with missing-modality
evaluation, ``robustness.csv`` and ``robustness.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.labels import REGIONS, nested_regions
from ..io import OutputExistsError, atomic_write_text, csv_text
from .device import resolve_device
from .inference import SW_OVERLAP, LoadedModel, load_model, sliding_window_outputs
from .metrics import RegionScore, region_scores, summarize

SPLITS = ("validation", "test", "training", "all")
_log = logging.getLogger(__name__)


def modality_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """All non-empty subsets, smallest first, each in the model's modality order (the full set last)."""
    return [combo for size in range(1, len(modalities) + 1) for combo in itertools.combinations(modalities, size)]


@dataclasses.dataclass
class EvaluationResult:
    rows: list[dict]  # one per (case, subset, region)
    summary: dict[str, dict[str, float]]  # all modalities: region → dice/hd95
    robustness: dict[tuple[str, ...], dict] | None  # subset → summarize() output


def prepare_case(transform, case: dict) -> tuple[torch.Tensor, np.ndarray, list[float]]:
    """A labelled case dict through the validation chain → (image ``[M, *S]`` float32, truth regions
    ``[3, *S]`` bool, voxel spacing in mm of that space)."""
    item = transform(dict(case))
    image = torch.as_tensor(item["image"]).as_subclass(torch.Tensor).float()
    truth = torch.as_tensor(item["label"]).numpy() > 0.5
    spacing = [float(v) for v in item["image"].pixdim[: image.dim() - 1]]
    return image, truth, spacing


def predict_regions(
    loaded: LoadedModel,
    image: torch.Tensor,
    subset: Sequence[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    sw_batch_size: int = 2,
    overlap: float = SW_OVERLAP,
) -> np.ndarray:
    """Whole-volume region prediction of one case with the modalities in ``subset`` (default all):
    image ``[M, *S]`` in the model's modality order → bool regions ``[3, *S]``: the regions of the
    label map ``e2pa infer`` writes (sigmoid > 0.5, then :func:`~e2pa.data.nested_regions`: ET ⊆ TC
    ⊆ WT), not the raw thresholded channels, which need not be nested.

    The scoring path of both validation during training and :func:`evaluate_cases`, so the two give
    the same Dice for the same weights, and the same Dice as scoring the written files."""
    subset = tuple(loaded.modalities) if subset is None else tuple(subset)
    mask = torch.tensor([m in subset for m in loaded.modalities])
    masked = torch.where(mask.view(-1, *([1] * (image.dim() - 1))), image, torch.zeros((), dtype=image.dtype))
    outputs = sliding_window_outputs(
        loaded, masked, mask, sw_batch_size=sw_batch_size, overlap=overlap, device=device, energy_maps=False
    )
    return nested_regions(torch.sigmoid(outputs["logits"][0].float()).cpu().numpy(), loaded.label_convention)


def evaluate_cases(
    loaded: LoadedModel,
    cases: Sequence[dict],
    label_convention,
    *,
    subsets=None,
    device: torch.device | str = "cpu",
    sw_batch_size: int = 2,
    overlap: float = SW_OVERLAP,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Score ``cases`` (case dicts with ``image`` and ``label``) under every modality subset in
    ``subsets`` (default: only all modalities)."""
    from ..data import val_transforms

    log = log or _log.info
    full_set = tuple(loaded.modalities)
    subsets = list(subsets) if subsets else [full_set]
    transform = val_transforms(label_convention=label_convention, modalities=full_set)
    rows: list[dict] = []
    per_subset: dict[tuple[str, ...], list[dict[str, RegionScore]]] = {s: [] for s in subsets}
    for case in cases:
        image, truth, spacing = prepare_case(transform, case)
        for subset in subsets:
            pred = predict_regions(loaded, image, subset, device=device, sw_batch_size=sw_batch_size, overlap=overlap)
            scores = region_scores(pred, truth, spacing)
            per_subset[subset].append(scores)
            for region in REGIONS:
                s = scores[region]
                rows.append(
                    {
                        "case": case.get("case", "?"),
                        "modalities": "+".join(subset),
                        "region": region,
                        "dice": s.dice,
                        "hd95": s.hd95,
                        "gt_empty": s.gt_empty,
                        "pred_empty": s.pred_empty,
                    }
                )
        log(
            f"{case.get('case', '?')}: "
            + ", ".join(f"{r} Dice {per_subset[subsets[-1]][-1][r].dice:.3f}" for r in REGIONS)
            + f" ({'+'.join(subsets[-1])})"
        )
    summary = summarize(per_subset[full_set]) if full_set in per_subset else summarize(per_subset[subsets[-1]])
    robustness = {s: summarize(v) for s, v in per_subset.items()} if len(subsets) > 1 else None
    return EvaluationResult(rows=rows, summary=summary, robustness=robustness)


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def summary_rows(summary: dict[str, dict[str, float]]) -> list[dict]:
    return [
        {
            "region": r,
            "dice": summary[r]["dice"],
            "hd95": summary[r]["hd95"],
            "empty_gt_cases": int(summary[r].get("empty_gt_cases", 0)),
        }
        for r in REGIONS
    ] + [{"region": "mean", "dice": summary["mean"]["dice"], "hd95": summary["mean"]["hd95"], "empty_gt_cases": ""}]


def robustness_rows(robustness: dict[tuple[str, ...], dict]) -> list[dict]:
    rows = []
    for subset, s in robustness.items():
        row = {"modalities": "+".join(subset)}
        for r in REGIONS:
            row[f"dice_{r}"], row[f"hd95_{r}"] = s[r]["dice"], s[r]["hd95"]
        row["dice_mean"] = s["mean"]["dice"]
        rows.append(row)
    average = {"modalities": f"average over {len(rows)} subsets"}
    for key in rows[0]:
        if key != "modalities":
            average[key] = float(np.mean([row[key] for row in rows]))
    return rows + [average]


def markdown_table(rows: list[dict], digits: int = 3) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    result: EvaluationResult, out_dir: str | os.PathLike, *, overwrite: bool = False, title: str = ""
) -> list[Path]:
    """Write the CSV/Markdown outputs; with ``overwrite=False`` nothing is written if any exists."""
    out = Path(out_dir)
    files = {
        "per_case.csv": csv_text(result.rows),
        "summary.csv": csv_text(summary_rows(result.summary)),
        "summary.md": (f"# {title}\n\n" if title else "") + "Dice and HD95 (mm) per region, mean over cases "
        "(all modalities). Empty ground truths follow e2pa's convention (both empty: Dice 1, "
        "HD95 0; one empty: Dice 0, HD95 = the volume diagonal); `e2pa score --convention "
        "official` gives the official BraTS numbers.\n\n" + markdown_table(summary_rows(result.summary)),
    }
    if result.robustness:
        rows = robustness_rows(result.robustness)
        files["robustness.csv"] = csv_text(rows)
        files["robustness.md"] = (
            (f"# {title}\n\n" if title else "")
            + f"Missing-modality robustness: Dice and HD95 (mm) per region for each of the {len(rows) - 1} "
            "non-empty modality subsets, mean over cases.\n\n" + markdown_table(rows)
        )
    existing = [str(out / name) for name in files if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} already exists; pass --overwrite to replace the evaluation outputs")
    return [atomic_write_text(out / name, text) for name, text in files.items()]


def evaluate(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "validation",
    missing_modalities: bool = False,
    max_cases: int | None = None,
    overwrite: bool = False,
    device: str = "auto",
    overlap: float = SW_OVERLAP,
    include_training: bool = False,
    labels: str = "auto",
    allow_outside_paths: bool = False,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Evaluate a checkpoint on a data set split and write the tables (see the module docstring).

    ``split="validation"`` means the cases the run validated on, as recorded in the checkpoint (or
    in ``RUN/split.json`` beside its ``checkpoints/`` folder); without a record, the data set's own
    validation list. Scoring a case the model was trained on needs ``include_training=True`` and
    is flagged in the log and the summary's title. ``out_dir`` is checked (existing outputs,
    writable) before anything is computed.
    """
    from ..data import DataError, discover
    from ..data.validation import validate_cases

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1); got {overlap!r}")
    planned = list(OUTPUT_NAMES) + (list(ROBUSTNESS_NAMES) if missing_modalities else [])
    check_output_folder(out_dir, planned, overwrite=overwrite)
    dev = resolve_device(device)
    loaded = load_model(checkpoint, dev)
    cohort = discover(data, label_convention=labels, allow_outside_paths=allow_outside_paths)
    recorded = recorded_split(loaded)
    warn = log if log is not None else _log.warning
    every = cohort.training + cohort.validation + [c for c in cohort.test if "label" in c]
    if recorded is not None and split in ("validation", "training"):
        wanted = set(recorded[split])
        cases = [c for c in every if c.get("case") in wanted]
        if len(cases) < len(wanted):
            warn(f"{len(wanted) - len(cases)} of the run's {split} case(s) are not in {data}")
    else:
        pools = {
            "validation": cohort.validation,
            "test": [c for c in cohort.test if "label" in c],
            "training": cohort.training,
            "all": every,
        }
        cases = pools[split]
    cases = cases[: max_cases or None]
    if not cases:
        raise DataError(f"{data}: no labelled cases in the '{split}' split")
    if tuple(cohort.modalities) != tuple(loaded.modalities):
        raise DataError(
            f"{data}: the data's modalities {cohort.modalities} differ from the model's {loaded.modalities}"
        )
    title = f"{Path(checkpoint).name} on {len(cases)} {split} case(s)"
    trained_on = set(recorded["training"]) if recorded is not None else set()
    seen = [c["case"] for c in cases if c.get("case") in trained_on]
    if seen and not include_training:
        raise DataError(
            f"{len(seen)} of the {len(cases)} case(s) to score were used to train this checkpoint "
            f"(e.g. {seen[0]}); scores on them are not a held-out estimate. Pass --include-training "
            f"to score them anyway"
        )
    if seen:
        warn(
            f"{len(seen)} of {len(cases)} scored case(s) were used to train this checkpoint; "
            f"the scores are not a held-out estimate"
        )
        title += f" ({len(seen)} of them training cases)"
    if recorded is None and split in ("training", "all"):
        warn(f"{checkpoint} records no training split; some of these cases may have been trained on")
    validate_cases(
        cases, modalities=cohort.modalities, label_convention=cohort.label_convention, progress=False, what=str(data)
    )
    subsets = modality_subsets(loaded.modalities) if missing_modalities else None
    result = evaluate_cases(
        loaded, cases, cohort.label_convention, subsets=subsets, device=dev, overlap=overlap, log=log
    )
    write_results(result, out_dir, overwrite=overwrite, title=title)
    return result


OUTPUT_NAMES = ("per_case.csv", "summary.csv", "summary.md")
ROBUSTNESS_NAMES = ("robustness.csv", "robustness.md")


def check_output_folder(out_dir: str | os.PathLike, names: Sequence[str], *, overwrite: bool) -> None:
    """Before computing: the outputs do not exist yet (or ``overwrite``) and the folder takes files."""
    import tempfile

    from ..io import os_errors_name

    out = Path(out_dir)
    existing = [str(out / name) for name in names if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{existing[0]} already exists; pass --overwrite to replace the evaluation outputs")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out")
    with os_errors_name(out):
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".e2pa-write-test-"):
            pass


def recorded_split(loaded: LoadedModel) -> dict | None:
    """The training / validation case ids of the run that wrote the checkpoint: from the checkpoint
    itself, else ``split.json`` in its run folder; None when neither records one."""
    import json

    split = loaded.split
    if isinstance(split, dict) and "training" in split and "validation" in split:
        return split
    record = loaded.source.resolve().parent.parent / "split.json"
    if record.is_file():
        try:
            split = json.loads(record.read_text())
            if isinstance(split, dict) and "training" in split and "validation" in split:
                return split
        except (OSError, ValueError):
            pass
    return None
