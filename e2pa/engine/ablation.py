"""The paper's ablation and the sensitivity questions it left open, reproducible with one command.

Variants (``VARIANTS``): implicit fusion baselines (masked ``mean``, masked ``concat``), EHF only,
ESA only, EHF + ESA. Each trains under the same budget and seeds on the same cases and is scored on
the same held-out cases: Dice and HD95 per region with all modalities, and the mean Dice over all
2^M − 1 modality subsets (the missing-modality average). ``--sweep`` varies one energy parameter of
the full model instead: temperature T, prior temperature τ, β, propagation steps, or the number of
levels (depth of the hierarchy).

Outputs in ``OUT/``: ``runs/<variant>/seed<k>/`` (each a normal training run), ``evaluation/…``,
``ablation.csv`` (one row per variant and seed), ``ablation.md`` (mean ± std over seeds) and
``ablation.png``. Phantom numbers answer "does the machinery behave", not clinical questions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..data.labels import REGIONS
from ..io import OutputExistsError, atomic_save_figure, atomic_write_text, csv_text
from .evaluation import evaluate
from .training import TrainConfig, train

# model / loss overrides of each variant of the paper's table (everything else identical)
VARIANTS: dict[str, dict] = {
    "implicit-mean": dict(model=dict(fusion="mean", esa_levels=()), loss=dict(lambda_ehf=0.0, lambda_esa=0.0)),
    "implicit-concat": dict(model=dict(fusion="concat", esa_levels=()), loss=dict(lambda_ehf=0.0, lambda_esa=0.0)),
    "EHF": dict(model=dict(fusion="energy", esa_levels=()), loss=dict(lambda_esa=0.0)),
    "ESA": dict(model=dict(fusion="mean", esa_levels=(-1,)), loss=dict(lambda_ehf=0.0)),
    "EHF+ESA": dict(model=dict(fusion="energy", esa_levels=(-1,)), loss=dict()),
    # the first formulation (raw features in the head and the Hopfield scores), kept for comparison
    "EHF-raw": dict(model=dict(fusion="energy", esa_levels=(), fusion_norm="none"), loss=dict(lambda_esa=0.0)),
    # the normalised fusion with the agreement prior (docs/method.md): an extra row, not a paper variant
    "EHF+ESA-agree": dict(model=dict(fusion="energy", esa_levels=(-1,), fusion_prior="agreement"), loss=dict()),
    "EHF+ESA-raw": dict(model=dict(fusion="energy", esa_levels=(-1,), fusion_norm="none"), loss=dict()),
}
PAPER_VARIANTS = ("implicit-mean", "implicit-concat", "EHF", "ESA", "EHF+ESA")
_log = logging.getLogger(__name__)
SWEEPABLE = {"temperature": float, "prior_temperature": float, "beta": float, "steps": int, "levels": int}


@dataclasses.dataclass
class AblationConfig:
    data: str
    out: str
    variants: tuple[str, ...] = PAPER_VARIANTS
    sweep: tuple[str, tuple] | None = None  # (parameter, values): vary one energy parameter of EHF+ESA
    seeds: int = 2
    epochs: int = 80
    minutes: float = 0.0  # optional wall-clock budget per run (0: epochs only)
    batch_size: int = 2
    roi: int = 32
    features: tuple[int, ...] = (8, 16, 32)
    robustness_cases: int = 2
    overwrite: bool = False


def parse_sweep(text: str) -> tuple[str, tuple]:
    """``"steps=1,3,5"`` → ("steps", (1, 3, 5)), checking the parameter and the values."""
    if "=" not in text:
        raise ValueError(f"--sweep takes PARAM=v1,v2,...; got {text!r}")
    name, values = text.split("=", 1)
    name = name.strip().replace("-", "_")
    if name not in SWEEPABLE:
        raise ValueError(f"--sweep: unknown parameter {name!r}; choose one of {', '.join(SWEEPABLE)}")
    try:
        parsed = tuple(SWEEPABLE[name](v) for v in values.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--sweep {name}: values must be {SWEEPABLE[name].__name__}s; got {values!r}") from None
    if len(parsed) < 2:
        raise ValueError(f"--sweep {name}: give at least two values")
    return name, parsed


def experiments(cfg: AblationConfig) -> dict[str, dict]:
    """Name → model/loss overrides of every run family (variants, or the sweep's values)."""
    if cfg.sweep is None:
        unknown = [v for v in cfg.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        return {v: VARIANTS[v] for v in cfg.variants}
    name, values = cfg.sweep
    runs = {}
    for value in values:
        model = dict(VARIANTS["EHF+ESA"]["model"])
        if name == "levels":
            if not 2 <= value <= len(cfg.features) + 2:
                raise ValueError(f"--sweep levels: {value} is outside 2..{len(cfg.features) + 2}")
            model["features"] = tuple(cfg.features[0] * 2**i for i in range(value))
        else:
            model[name] = value
        runs[f"{name}={value}"] = dict(model=model, loss=dict())
    return runs


def run_ablation(cfg: AblationConfig, log: Callable[[str], None] | None = None) -> Path:
    """Train and evaluate every run; write the tables and the plot; returns ``ablation.md``.
    Progress goes to ``log`` (default: this module's logger)."""
    log = log or _log.info
    out = Path(cfg.out)
    families = experiments(cfg)
    table_md = out / "ablation.md"
    if table_md.exists() and not cfg.overwrite:
        raise OutputExistsError(f"{table_md} already exists; choose another --out or pass --overwrite")
    rows = []
    for name, overrides in families.items():
        for seed in range(cfg.seeds):
            run_dir = out / "runs" / name / f"seed{seed}"
            if cfg.overwrite and run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            model = dict(features=cfg.features, esa_rank=4, **overrides["model"])
            train_cfg = TrainConfig(
                data=cfg.data,
                out=str(run_dir),
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                roi_size=(cfg.roi,) * 3,
                lr=2e-3,
                seed=seed,
                time_budget_s=cfg.minutes * 60,
                val_every=max(1, cfg.epochs),
                modality_dropout=0.3,
                progress=False,
                model=model,
                loss=dict(overrides["loss"]),
            )
            log(f"{name} seed {seed}: training → {run_dir}")
            final = train(train_cfg)
            checkpoint = run_dir / "checkpoints" / "last.pt"
            evaluation = out / "evaluation" / name / f"seed{seed}"
            full = evaluate(
                checkpoint, cfg.data, evaluation / "all-modalities", overwrite=cfg.overwrite, log=lambda _: None
            )
            missing = evaluate(
                checkpoint,
                cfg.data,
                evaluation / "missing-modalities",
                missing_modalities=True,
                max_cases=cfg.robustness_cases,
                overwrite=cfg.overwrite,
                log=lambda _: None,
            )
            row = {"run": name, "seed": seed, "steps": int(final.get("step", 0))}
            for r in REGIONS:
                row[f"dice_{r}"] = full.summary[r]["dice"]
                row[f"hd95_{r}"] = full.summary[r]["hd95"]
            row["dice_mean"] = full.summary["mean"]["dice"]
            row["missing_modality_dice"] = float(np.mean([s["mean"]["dice"] for s in missing.robustness.values()]))
            rows.append(row)
            log(
                f"{name} seed {seed}: Dice mean {row['dice_mean']:.3f}, missing-modality average "
                f"{row['missing_modality_dice']:.3f}"
            )
    atomic_write_text(out / "ablation.csv", csv_text(rows))
    atomic_write_text(table_md, summary_markdown(rows, cfg))
    plot_ablation(rows, out / "ablation.png")
    return table_md


def _mean_std(values: Sequence[float]) -> str:
    values = list(values)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return f"{np.mean(values):.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")


def summary_markdown(rows: list[dict], cfg: AblationConfig) -> str:
    metrics = (
        [f"dice_{r}" for r in REGIONS] + ["dice_mean"] + [f"hd95_{r}" for r in REGIONS] + ["missing_modality_dice"]
    )
    names = list(dict.fromkeys(r["run"] for r in rows))
    lines = ["| run | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for name in names:
        mine = [r for r in rows if r["run"] == name]
        lines.append(f"| {name} | " + " | ".join(_mean_std(r[m] for r in mine) for m in metrics) + " |")
    budget = f"{cfg.epochs} epochs" + (f" or {cfg.minutes:g} min" if cfg.minutes else "")
    return (
        f"# Ablation ({'sweep of ' + cfg.sweep[0] if cfg.sweep else 'paper variants'})\n\n"
        f"Mean ± std over {cfg.seeds} seed(s); budget {budget} per run, batch {cfg.batch_size}, patches "
        f"{cfg.roi}³, features {list(cfg.features)}; Dice/HD95 (mm) on the held-out cases with all modalities; "
        f"missing_modality_dice = mean Dice over all non-empty modality subsets on {cfg.robustness_cases} "
        f"held-out case(s).\n\n" + "\n".join(lines) + "\n"
    )


def plot_ablation(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["run"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.5))
    width = 0.38
    for offset, metric, label in (
        (-width / 2, "dice_mean", "all modalities"),
        (width / 2, "missing_modality_dice", "missing-modality average"),
    ):
        means = [np.mean([r[metric] for r in rows if r["run"] == n]) for n in names]
        # the table's spread (sample std, ddof=1); one seed has none
        stds = [
            np.std(v, ddof=1) if len(v) > 1 else 0.0
            for v in ([r[metric] for r in rows if r["run"] == n] for n in names)
        ]
        ax.bar(np.arange(len(names)) + offset, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
    ax.set(ylabel="mean Dice (TC, WT, ET)", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
