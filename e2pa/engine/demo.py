"""The main job on the embedded default: phantom cohort → train E2PA → infer → evaluate → report.

Everything is offline and on whatever device there is (a CPU takes a few minutes): a BraTS-like
phantom cohort is built from nilearn's MNI152 anatomy, a small E2PANet and a MONAI SegResNet of
similar size train under the same wall-clock budget on the same data, the held-out cases are
predicted (with energy maps and pictures) and scored, and ``report.md`` says what happened.
Phantom numbers are a smoke test of learning, not clinical results.

Layout of ``OUT/``::

    data/            the phantom cohort (BraTS folders + dataset.json)
    e2pa/            E2PANet run (checkpoints, metrics.csv, training_curve.png)
    segresnet/       SegResNet run, same budget
    predictions/     held-out predictions, energy maps (NIfTI) and overview PNGs
    evaluation/      Dice/HD95 tables of both models; the E2PA missing-modality table
    report.md
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.labels import REGIONS
from ..io import OutputExistsError, atomic_write_text
from .evaluation import evaluate, markdown_table, robustness_rows
from .training import TrainConfig, train

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class DemoConfig:
    out: str = "e2pa-demo"
    cases: int = 12
    shape: int = 48
    roi: int = 32
    minutes: float = 3.0  # training budget per model
    batch_size: int = 2
    features: tuple[int, ...] = (8, 16, 32)
    segresnet_filters: int = 8
    seed: int = 0
    robustness_cases: int = 1
    overwrite: bool = False


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_demo(cfg: DemoConfig, log: Callable[[str], None] | None = None) -> Path:
    """Run the whole job; returns the path of ``report.md``. Progress goes to ``log`` (default: this
    module's logger), and to the inference and evaluation steps' too."""
    steps_log, log = log, log or _log.info  # the steps log through their own modules unless given one
    from ..data import write_phantom_cohort
    from .inference import infer, load_model

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise OutputExistsError(
            f"{out} already holds files; choose another --out or pass --overwrite "
            f"(which replaces the demo's own outputs there)"
        )
    if cfg.overwrite and out.exists():
        import shutil

        for name in ("data", "e2pa", "segresnet", "predictions", "evaluation"):
            shutil.rmtree(out / name, ignore_errors=True)
    started = time.perf_counter()
    log(f"[1/5] phantom cohort: {cfg.cases} cases at {cfg.shape}³ → {out / 'data'}")
    dataset = write_phantom_cohort(out / "data", cfg.cases, cfg.seed, shape=cfg.shape, validation_fraction=0.25)

    common = dict(
        data=str(dataset),
        epochs=10_000,
        batch_size=cfg.batch_size,
        roi_size=(cfg.roi,) * 3,
        lr=2e-3,
        time_budget_s=cfg.minutes * 60,
        val_every=5,
        seed=cfg.seed,
        sw_batch_size=4,
        modality_dropout=0.3,
        progress=True,
    )
    runs = {
        "e2pa": TrainConfig(out=str(out / "e2pa"), model=dict(features=cfg.features, esa_rank=4), **common),
        "segresnet": TrainConfig(
            out=str(out / "segresnet"),
            model=dict(architecture="segresnet", init_filters=cfg.segresnet_filters, blocks_down=(1, 2, 2)),
            **common,
        ),
    }
    finals = {}
    for i, (name, run_cfg) in enumerate(runs.items()):
        log(
            f"[{2 + i}/5] training {name} for {cfg.minutes:g} min on "
            f"{'CUDA' if torch.cuda.is_available() else 'CPU'} → {run_cfg.out}"
        )
        finals[name] = train(run_cfg)

    log(f"[4/5] predicting the held-out cases with E2PA (labels, energy maps, pictures) → {out / 'predictions'}")
    from ..data import discover

    held_out = discover(dataset).validation
    folders = [str(Path(case["image"][0]).parent) for case in held_out]
    infer(out / "e2pa" / "checkpoints" / "last.pt", folders, out / "predictions", maps="all", log=steps_log)

    log(f"[5/5] evaluating both models on {len(held_out)} held-out case(s) → {out / 'evaluation'}")
    results = {
        name: evaluate(Path(run_cfg.out) / "checkpoints" / "last.pt", dataset, out / "evaluation" / name, log=steps_log)
        for name, run_cfg in runs.items()
    }
    robustness = evaluate(
        out / "e2pa" / "checkpoints" / "last.pt",
        dataset,
        out / "evaluation" / "e2pa-missing",
        missing_modalities=True,
        max_cases=cfg.robustness_cases,
        log=steps_log,
    )
    models = {name: load_model(Path(run_cfg.out) / "checkpoints" / "last.pt").model for name, run_cfg in runs.items()}
    report = _report(cfg, out, finals, results, robustness, models, time.perf_counter() - started, held_out)
    path = atomic_write_text(out / "report.md", report)
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min — report: {path.resolve()}")
    return path


def _report(cfg, out, finals, results, robustness, models, seconds, held_out) -> str:
    rows = []
    for name, result in results.items():
        row = {
            "model": name,
            "parameters": f"{_parameters(models[name]) / 1e6:.2f} M",
            "steps": int(finals[name].get("step", 0)),
        }
        for r in REGIONS:
            row[f"Dice {r}"] = result.summary[r]["dice"]
        row["Dice mean"] = result.summary["mean"]["dice"]
        row["HD95 mean (mm)"] = result.summary["mean"]["hd95"]
        rows.append(row)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    cases = ", ".join(c.get("case", "?") for c in held_out)
    predictions = sorted((out / "predictions").glob("*/*_overview.png"))
    lines = [
        "# e2pa demo report",
        "",
        f"Phantom cohort of {cfg.cases} cases at {cfg.shape}³ (BraTS-like, built offline on MNI152 anatomy; "
        "**not clinical data**). Both models trained on the same cases with the same "
        f"{cfg.minutes:g}-minute budget on {device}, patches {cfg.roi}³, batch {cfg.batch_size}, random modality "
        f"dropout. Held-out cases: {cases}. Total time {seconds / 60:.1f} min.",
        "",
        "## Held-out Dice / HD95 (all modalities)",
        "",
        markdown_table(rows),
        "",
        "Training curves: `e2pa/training_curve.png`, `segresnet/training_curve.png`.",
        "",
        f"## E2PA with missing modalities ({cfg.robustness_cases} case(s))",
        "",
        markdown_table(robustness_rows(robustness.robustness)),
        "",
        "## Outputs",
        "",
        "- predictions, energy maps and modality weights (NIfTI, in each input's geometry): `predictions/`",
        *(f"- overview: `{p.relative_to(out)}`" for p in predictions),
        "- tables: `evaluation/`",
        "",
    ]
    return "\n".join(lines)
