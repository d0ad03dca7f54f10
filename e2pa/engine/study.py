"""The fast 2-D fusion study: every ablation variant on the clean and the fault cohort, ranked by
paired comparisons with bootstrap confidence intervals (issue #14).

Why 2-D: a study that can rank needs >= 5 seeds and >= 12 held-out cases per variant and cohort;
in 3-D that is days of CPU. Here the cases are 3-D phantoms (64×64×56, ~2.9 mm, per-case anatomy,
optional per-modality faults) and the networks are the library's E2PANet with ``spatial_dims=2``
trained on axial slices, so every fusion layer, loss term and op is the one a 3-D user runs.

Protocol (one home: this module):
- cases ``0 … n_train-1`` train, the next ``n_val`` validate (curves, diagnosis and any tuning),
  the last ``n_test`` are held out and used only for the reported numbers;
- per seed, the batches (case, slice, flips, intensity jitter, modality-dropout mask) are drawn up
  front from the seed alone: every variant sees the same data in the same order;
- held-out scoring on each case's contiguous tumour slab (its tumour's axial extent ± 2 slices,
  predicted slice by slice and scored in 3-D): Dice and HD95 per region (TC, WT, ET) with all
  modalities, and the mean Dice over all 15 non-empty modality subsets;
- explainability (fusion="energy" only): for each fault of a held-out case, the faulted modality's
  mean level-0 weight inside its fault region and outside it (brain voxels of the slab).

Each run writes ``runs/<cohort>/<variant>/seed<k>.json`` atomically; a run whose file exists is
skipped, so a killed study resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.faults import FAULT_KINDS
from ..data.labels import get_convention
from ..data.modalities import MODALITIES
from ..io import atomic_write_json
from ..model.losses import E2PALoss, regions_to_classes
from ..model.registry import build_model
from .metrics import REGIONS, region_scores
from .stats import PairedResult, paired_bootstrap
from .training import derived_seed

logger = logging.getLogger(__name__)

COHORTS = ("clean", "faults")
SHAPE = (48, 48, 40)


@dataclasses.dataclass
class StudyConfig:
    out: str
    cohort: str = "faults"
    variants: tuple[str, ...] = ("implicit-mean", "implicit-concat", "EHF", "ESA", "EHF+ESA")
    seeds: int = 5
    n_train: int = 24
    n_val: int = 4
    n_test: int = 12
    steps: int = 400
    batch_size: int = 6
    lr: float = 6e-3
    features: tuple[int, ...] = (8, 16, 32)
    modality_dropout: float = 0.3
    fault_rate: float = 0.5
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    max_faulted: int = 2
    cohort_seed: int = 0
    crop: int = 0  # training patch (in-plane; 0 = whole slices); scoring runs on whole slices
    tumour_fraction: float = 0.7  # share of training slices drawn from the tumour's axial extent
    subset_stride: int = 3  # the 15-subset scores use every k-th slice of the slab
    curve_every: int = 50
    val_every: int = 100
    diagnose: bool = False  # also record weight entropies, energy scales and encoder gradients

    def __post_init__(self) -> None:
        if self.cohort not in COHORTS:
            raise ValueError(f"cohort must be one of {COHORTS}; got {self.cohort!r}")
        if min(self.seeds, self.n_train, self.n_test, self.steps, self.batch_size) < 1:
            raise ValueError("seeds, n_train, n_test, steps and batch_size must be >= 1")


# ----------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Case2D:
    name: str
    image: np.ndarray  # float32 [M, X, Y, Z], z-scored per modality over its non-zero voxels
    regions: np.ndarray  # uint8 [3, X, Y, Z] TC, WT, ET
    brain: np.ndarray  # bool [X, Y, Z]
    faultmap: np.ndarray | None  # uint8 [X, Y, Z, M] kind codes
    faults: list[dict]
    spacing: tuple[float, float, float]

    def tumour_slab(self, margin: int = 2) -> np.ndarray:
        z = np.flatnonzero(self.regions[1].any(axis=(0, 1)))
        if len(z) == 0:
            z = np.array([self.image.shape[-1] // 2])
        return np.arange(max(0, z[0] - margin), min(self.image.shape[-1], z[-1] + margin + 1))


def build_cohort(out: Path, cfg: StudyConfig) -> Path:
    """The cohort's ``dataset.json`` (built once; reused when it exists). The clean and the fault
    cohort share the seed: the clean cohort is the fault cohort's cases without their faults."""
    from ..data.phantom import write_phantom_cohort

    folder = out / f"cohort-{cfg.cohort}"
    if (folder / "dataset.json").is_file():
        return folder / "dataset.json"
    faulted = cfg.cohort == "faults"
    return write_phantom_cohort(
        folder,
        cfg.n_train + cfg.n_val + cfg.n_test,
        cfg.cohort_seed,
        shape=SHAPE,
        validation_fraction=0.0,
        vary_anatomy=True,
        faults=cfg.fault_kinds if faulted else (),
        fault_rate=cfg.fault_rate if faulted else 0.0,
        max_faulted=cfg.max_faulted,
    )


def load_cases(dataset_json: Path) -> list[Case2D]:
    import nibabel as nib

    spec = json.loads(dataset_json.read_text())
    convention = get_convention(spec.get("label_convention", "brats2021"))
    root = dataset_json.parent
    cases = []
    for entry in spec["training"] + spec["validation"]:
        volumes = [np.asarray(nib.load(root / p).dataobj, dtype=np.float32) for p in entry["image"]]
        label_image = nib.load(root / entry["label"])
        label = np.asarray(label_image.dataobj).astype(np.uint8)
        brain = np.any([v != 0 for v in volumes], axis=0)
        image = np.stack([_zscore(v) for v in volumes])
        tc = (label == convention.necrotic) | (label == convention.enhancing)
        regions = np.stack([tc, label > 0, label == convention.enhancing]).astype(np.uint8)
        faultmap, faults = None, []
        if "faultmap" in entry:
            faultmap = np.asarray(nib.load(root / entry["faultmap"]).dataobj).astype(np.uint8)
            faults = json.loads((root / entry["faults"]).read_text())["faults"]
        spacing = tuple(float(s) for s in label_image.header.get_zooms()[:3])
        cases.append(Case2D(entry["case"], image, regions, brain, faultmap, faults, spacing))
    return cases


def _zscore(volume: np.ndarray) -> np.ndarray:
    inside = volume != 0
    if not inside.any():
        return volume
    mean, std = float(volume[inside].mean()), float(volume[inside].std())
    return np.where(inside, (volume - mean) / max(std, 1e-6), 0.0).astype(np.float32)


@dataclasses.dataclass
class BatchPlan:
    """Everything random about training, drawn from the seed alone (identical for every variant)."""

    cases: np.ndarray  # [steps, B] case index
    slices: np.ndarray  # [steps, B] z
    corners: np.ndarray  # [steps, B, 2] crop corner (x, y)
    flips: np.ndarray  # [steps, B, 2] bool
    scale: np.ndarray  # [steps, B, M] intensity scale jitter
    shift: np.ndarray  # [steps, B, M]
    masks: np.ndarray  # [steps, B, M] bool modality dropout


def plan_batches(
    cases: list[Case2D], seed: int, steps: int, batch: int, dropout: float, crop: int, tumour_fraction: float = 0.7
) -> BatchPlan:
    rng = np.random.default_rng(derived_seed(seed, "study-batches"))
    pools = []
    for case in cases:
        tumour = case.tumour_slab(margin=4)
        brain_z = np.flatnonzero(case.brain.sum(axis=(0, 1)) > 0.2 * case.brain.sum(axis=(0, 1)).max())
        pools.append((tumour, brain_z))
    n_mod = cases[0].image.shape[0]
    case_idx = rng.integers(0, len(cases), size=(steps, batch))
    from_tumour = rng.random((steps, batch)) < tumour_fraction
    slices = np.zeros((steps, batch), dtype=np.int64)
    corners = np.zeros((steps, batch, 2), dtype=np.int64)
    size = cases[0].image.shape[1:3]
    crop = crop or int(min(size))
    for s in range(steps):
        for b in range(batch):
            case = cases[case_idx[s, b]]
            tumour, brain_z = pools[case_idx[s, b]]
            pool = tumour if from_tumour[s, b] else brain_z
            z = pool[rng.integers(len(pool))]
            slices[s, b] = z
            # centred on a tumour voxel of the slice when it has one (else a brain voxel), jittered
            where = np.argwhere(case.regions[1, :, :, z]) if from_tumour[s, b] else np.empty((0, 2))
            if len(where) == 0:
                where = np.argwhere(case.brain[:, :, z])
            if len(where) == 0:
                where = np.array([[size[0] // 2, size[1] // 2]])
            centre = where[rng.integers(len(where))] + rng.integers(-crop // 4, crop // 4 + 1, size=2)
            corners[s, b] = np.clip(centre - crop // 2, 0, np.array(size) - crop)
    masks = np.ones((steps, batch, n_mod), dtype=bool)
    drop = rng.random((steps, batch)) < dropout
    subsets = rng.integers(1, 2**n_mod, size=(steps, batch))
    for m in range(n_mod):
        masks[..., m] = np.where(drop, ((subsets >> m) & 1) == 1, True)
    return BatchPlan(
        case_idx,
        slices,
        corners,
        rng.random((steps, batch, 2)) < 0.5,
        rng.uniform(0.9, 1.1, (steps, batch, n_mod)),
        rng.uniform(-0.1, 0.1, (steps, batch, n_mod)),
        masks,
    )


def _batch(cases: list[Case2D], plan: BatchPlan, step: int, crop: int):
    images, regions = [], []
    for b in range(plan.cases.shape[1]):
        case = cases[plan.cases[step, b]]
        z = plan.slices[step, b]
        x0, y0 = plan.corners[step, b]
        window = (slice(x0, x0 + crop), slice(y0, y0 + crop), z)
        image, region = case.image[(slice(None), *window)], case.regions[(slice(None), *window)].astype(np.float32)
        for axis in range(2):
            if plan.flips[step, b, axis]:
                image, region = np.flip(image, axis + 1), np.flip(region, axis + 1)
        image = np.where(
            image != 0, image * plan.scale[step, b][:, None, None] + plan.shift[step, b][:, None, None], 0.0
        )
        images.append(np.ascontiguousarray(image))
        regions.append(np.ascontiguousarray(region))
    return (
        torch.from_numpy(np.stack(images)).float(),
        torch.from_numpy(np.stack(regions)).float(),
        torch.from_numpy(plan.masks[step]),
    )


# ----------------------------------------------------------------------------------------- run
def variant_overrides(name: str) -> dict:
    from .ablation import VARIANTS

    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[name]


def train_and_score(
    cfg: StudyConfig,
    variant: str,
    seed: int,
    train_cases: list[Case2D],
    val_cases: list[Case2D],
    test_cases: list[Case2D],
) -> dict:
    overrides = variant_overrides(variant)
    torch.manual_seed(derived_seed(seed, "init"))
    model_cfg = dict(
        spatial_dims=2,
        in_channels=len(MODALITIES),
        modalities=MODALITIES,
        features=cfg.features,
        esa_rank=4,
        **overrides["model"],
    )
    model = build_model(model_cfg)
    loss_fn = E2PALoss(num_levels=len(cfg.features), **overrides["loss"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-5)
    warmup = max(1, cfg.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
    )
    plan = plan_batches(
        train_cases, seed, cfg.steps, cfg.batch_size, cfg.modality_dropout, cfg.crop, cfg.tumour_fraction
    )
    curve, window, started = [], [], time.perf_counter()
    for step in range(cfg.steps):
        model.train()
        image, regions, mask = _batch(train_cases, plan, step, cfg.crop or int(min(train_cases[0].image.shape[1:3])))
        logits, energies = model(
            image, modality_mask=mask, target=regions_to_classes(regions.long()), return_energies=True
        )
        total, terms = loss_fn(logits, regions, energies)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grads = _encoder_grad_norms(model) if cfg.diagnose and (step + 1) % cfg.curve_every == 0 else None
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        optimizer.step()
        scheduler.step()
        window.append({k: float(v) for k, v in terms.items()})
        if (step + 1) % cfg.curve_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, **{k: float(np.mean([w[k] for w in window])) for k in window[0]}}
            window = []
            if grads is not None:
                row["encoder_grad_norm"] = grads
            if val_cases and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
                val = score_cases(model, val_cases, subsets=False, hd=False, diagnose=cfg.diagnose)
                row["val_dice"] = val["dice_mean"]
                if cfg.diagnose and "fusion" in val:
                    row["fusion"] = val["fusion"]
            curve.append(row)
    train_s = time.perf_counter() - started
    result = score_cases(model, test_cases, subsets=True, hd=True, diagnose=True, subset_stride=cfg.subset_stride)
    result.update(
        variant=variant,
        seed=seed,
        cohort=cfg.cohort,
        curve=curve,
        train_seconds=train_s,
        total_seconds=time.perf_counter() - started,
        model=model_cfg,
        loss=overrides["loss"],
        learned=_learned_fusion_parameters(model),
    )
    return result


def _encoder_grad_norms(model) -> list[float]:
    return [
        float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in stage.parameters() if p.grad is not None)))
        for stage in model.encoder
    ]


def _learned_fusion_parameters(model) -> dict:
    out = {}
    for level, fuse in enumerate(getattr(model, "fusion_levels", [])):
        for name, p in fuse.named_parameters():
            if p.numel() == 1:
                out[f"level{level}.{name}"] = float(p.detach())
    return out


# ------------------------------------------------------------------------------------- scoring
ALL_SUBSETS = [tuple(bool((s >> m) & 1) for m in range(len(MODALITIES))) for s in range(1, 2 ** len(MODALITIES))]


@torch.no_grad()
def _predict(model, image: torch.Tensor, mask: tuple[bool, ...] | None, want_energies: bool):
    """image ``[k, M, X, Y]`` → (probabilities ``[k, 3, X, Y]``, per-level energies or None)."""
    modality_mask = None if mask is None else torch.tensor(mask)
    if want_energies:
        logits, energies = model(image, modality_mask=modality_mask, return_energies=True)
        return torch.sigmoid(logits), energies
    return torch.sigmoid(model(image, modality_mask=modality_mask)), None


@torch.no_grad()
def score_cases(model, cases: list[Case2D], *, subsets: bool, hd: bool, diagnose: bool, subset_stride: int = 1) -> dict:
    """Per-case scores on each case's tumour slab (see the module docstring) and their means."""
    model.eval()
    per_case, weight_rows, fusion_stats = [], [], []
    energy_fusion = getattr(model, "fusion", None) == "energy"
    for case in cases:
        zs = case.tumour_slab()
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(case.image[..., zs], -1, 0)))  # [k, M, X, Y]
        gt = case.regions[..., zs].astype(bool)  # [3, X, Y, k]
        probs, energies = _predict(model, image, None, want_energies=diagnose)
        pred = np.moveaxis(probs.numpy(), 0, -1) > 0.5  # [3, X, Y, k]
        row = {"case": case.name}
        if hd:
            scores = region_scores(pred, gt, case.spacing)
            for r in REGIONS:
                row[f"dice_{r}"], row[f"hd95_{r}"] = scores[r].dice, scores[r].hd95
        else:
            from .metrics import dice_score

            for i, r in enumerate(REGIONS):
                row[f"dice_{r}"] = dice_score(pred[i], gt[i])
        row["dice_mean"] = float(np.mean([row[f"dice_{r}"] for r in REGIONS]))
        if hd:
            row["hd95_mean"] = float(np.mean([row[f"hd95_{r}"] for r in REGIONS]))
        if subsets:
            from .metrics import dice_score

            dices, every = [], slice(None, None, subset_stride)
            for subset in ALL_SUBSETS:
                p, _ = _predict(model, image[every], subset, want_energies=False)
                p = np.moveaxis(p.numpy(), 0, -1) > 0.5
                dices.append(float(np.mean([dice_score(p[i], gt[i][..., every]) for i in range(3)])))
            row["subset_dice"] = float(np.mean(dices))
        per_case.append(row)
        if energies is not None and energy_fusion:
            brain = np.moveaxis(case.brain[..., zs], -1, 0)  # [k, X, Y]
            weights = energies.levels[0].weights.numpy()  # [k, M, X, Y]
            for fault in case.faults:
                m = MODALITIES.index(fault["modality"])
                region = np.moveaxis(case.faultmap[..., zs, m] > 0, -1, 0) & brain
                outside = brain & ~region
                if region.sum() == 0 or outside.sum() == 0:
                    continue
                weight_rows.append(
                    {
                        "case": case.name,
                        "modality": fault["modality"],
                        "kind": fault["kind"],
                        "inside": float(weights[:, m][region].mean()),
                        "outside": float(weights[:, m][outside].mean()),
                        "voxels_inside": int(region.sum()),
                        "voxels_outside": int(outside.sum()),
                    }
                )
            fusion_stats.append(_fusion_stats(energies, torch.from_numpy(brain)))
    summary = {k: float(np.mean([r[k] for r in per_case])) for k in per_case[0] if k != "case"}
    summary["per_case"] = per_case
    if weight_rows:
        summary["fault_weights"] = weight_rows
    if fusion_stats:
        summary["fusion"] = {k: float(np.mean([s[k] for s in fusion_stats])) for k in fusion_stats[0]}
    return summary


def _fusion_stats(energies, brain: torch.Tensor) -> dict:
    """Per level: normalised entropy of the modality weights (1 = uniform, 0 = one modality), the
    share of voxels where one modality takes > 90 %, and the spread of the modality energies."""
    out = {}
    for level, e in enumerate(energies.levels):
        w = e.weights
        if w is None or e.energies is None:
            continue
        inside = torch.nn.functional.interpolate(brain[:, None].float(), size=w.shape[2:], mode="nearest")[:, 0] > 0
        m = w.shape[1]
        entropy = -(w.clamp_min(1e-12).log() * w).sum(dim=1) / math.log(m)
        out[f"L{level}_entropy"] = float(entropy[inside].mean())
        out[f"L{level}_onehot"] = float((w.max(dim=1).values > 0.9)[inside].float().mean())
        finite = e.energies.clamp(-1e6, 1e6)
        out[f"L{level}_energy_spread"] = float(finite.std(dim=1)[inside].mean())
        out[f"L{level}_energy_abs"] = float(finite.abs().mean(dim=1)[inside].mean())
    return out


# ------------------------------------------------------------------------------------- driver
def run_study(cfg: StudyConfig, log: Callable[[str], None] = logger.info) -> Path:
    """Train and score every (variant, seed) of ``cfg`` not done yet; returns the runs folder."""
    out = Path(cfg.out)
    dataset = build_cohort(out, cfg)
    cases = load_cases(dataset)
    train_cases = cases[: cfg.n_train]
    val_cases = cases[cfg.n_train : cfg.n_train + cfg.n_val]
    test_cases = cases[cfg.n_train + cfg.n_val : cfg.n_train + cfg.n_val + cfg.n_test]
    if len(test_cases) < cfg.n_test:
        raise ValueError(f"{dataset}: {len(cases)} cases, fewer than n_train + n_val + n_test")
    runs = out / "runs" / cfg.cohort
    for seed in range(cfg.seeds):
        for variant in cfg.variants:
            path = runs / variant / f"seed{seed}.json"
            if path.is_file():
                log(f"{cfg.cohort} {variant} seed {seed}: done already ({path})")
                continue
            result = train_and_score(cfg, variant, seed, train_cases, val_cases, test_cases)
            atomic_write_json(path, {"config": dataclasses.asdict(cfg), **result})
            log(
                f"{cfg.cohort} {variant} seed {seed}: dice {result['dice_mean']:.3f} subsets "
                f"{result['subset_dice']:.3f} ({result['total_seconds']:.0f} s)"
            )
    return runs


# ------------------------------------------------------------------------------------- report
REFERENCE = "implicit-mean"
METRICS = ("dice_TC", "dice_WT", "dice_ET", "dice_mean", "hd95_TC", "hd95_WT", "hd95_ET", "hd95_mean", "subset_dice")
ORDER = ("implicit-mean", "implicit-concat", "EHF", "ESA", "EHF+ESA", "EHF-raw", "EHF+ESA-raw")


def load_runs(out: str | Path, cohort: str) -> dict[str, dict[int, dict]]:
    """variant → seed → the run's JSON, for every finished run of ``cohort``."""
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted((Path(out) / "runs" / cohort).glob("*/seed*.json")):
        result = json.loads(path.read_text())
        runs.setdefault(result["variant"], {})[int(result["seed"])] = result
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(runs.items(), key=lambda item: (rank.get(item[0], len(ORDER)), item[0])))


def per_case_matrix(variant_runs: dict[int, dict], metric: str, seeds: list[int]) -> np.ndarray:
    """``[n_cases, n_seeds]`` of one metric (cases in the held-out order)."""
    return np.array([[row[metric] for row in variant_runs[s]["per_case"]] for s in seeds]).T


def paired_table(
    runs: dict[str, dict[int, dict]],
    metrics=("dice_mean", "subset_dice", "hd95_mean"),
    reference: str = REFERENCE,
    n_boot: int = 10000,
) -> dict[str, dict[str, PairedResult]]:
    """variant → metric → paired bootstrap of (variant − reference) over held-out cases × common seeds."""
    out = {}
    if reference not in runs:
        return out
    for variant, variant_runs in runs.items():
        if variant == reference:
            continue
        seeds = sorted(set(variant_runs) & set(runs[reference]))
        if not seeds:
            continue
        out[variant] = {
            m: paired_bootstrap(
                per_case_matrix(variant_runs, m, seeds) - per_case_matrix(runs[reference], m, seeds), n_boot=n_boot
            )
            for m in metrics
        }
    return out


def fault_weight_ratios(variant_runs: dict[int, dict]) -> dict[str, dict[str, float]]:
    """kind → mean inside, mean outside, their ratio and the count, over held-out faults and seeds."""
    rows = [w for result in variant_runs.values() for w in result.get("fault_weights", [])]
    out = {}
    for kind in FAULT_KINDS:
        mine = [w for w in rows if w["kind"] == kind]
        if mine:
            inside, outside = float(np.mean([w["inside"] for w in mine])), float(np.mean([w["outside"] for w in mine]))
            out[kind] = {
                "inside": inside,
                "outside": outside,
                "ratio": inside / max(outside, 1e-12),
                "faults": len(mine),
            }
    return out


def write_report(out: str | Path, cohort: str, doc_path: str | Path, *, command: str, provenance: str) -> Path:
    """``doc_path`` (Markdown), a CSV of every run × case beside it, and plots (bars with paired CIs,
    training curves). Returns the Markdown path."""
    from ..io import atomic_write_text, csv_text

    runs = load_runs(out, cohort)
    if not runs:
        raise ValueError(f"{out}: no finished runs of the {cohort} cohort")
    doc_path = Path(doc_path)
    stem = doc_path.with_suffix("")
    rows = []
    for variant, variant_runs in runs.items():
        for seed, result in sorted(variant_runs.items()):
            for row in result["per_case"]:
                rows.append({"variant": variant, "seed": seed, **row})
    atomic_write_text(stem.with_suffix(".csv"), csv_text(rows))
    paired = paired_table(runs)
    lines = [
        "| variant | seeds | " + " | ".join(METRICS) + " | Δ dice_mean vs mean [95% CI] | "
        "Δ 15-subset vs mean [95% CI] | Δ HD95 vs mean [95% CI] |",
        "|" + "---|" * (len(METRICS) + 5),
    ]
    for variant, variant_runs in runs.items():
        cells = []
        for m in METRICS:
            values = [r[m] for r in variant_runs.values()]
            digits = 1 if m.startswith("hd95") else 3
            spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{np.mean(values):.{digits}f} ± {spread:.{digits}f}")
        deltas = (
            ["—"] * 3
            if variant not in paired
            else [
                paired[variant][m].format(digits=1 if m == "hd95_mean" else 3)
                for m in ("dice_mean", "subset_dice", "hd95_mean")
            ]
        )
        lines.append(f"| {variant} | {len(variant_runs)} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    table = "\n".join(lines)
    explain = []
    for variant, variant_runs in runs.items():
        ratios = fault_weight_ratios(variant_runs)
        for kind, r in ratios.items():
            explain.append(
                f"| {variant} | {kind} | {r['faults']} | {r['inside']:.3f} | {r['outside']:.3f} | "
                f"{r['ratio']:.2f} | {'yes' if r['ratio'] <= 0.5 else 'no'} |"
            )
    explain_md = (
        (
            "| variant | fault kind | faults × seeds | weight inside | weight outside | ratio | ≤ 0.5 |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(explain)
        )
        if explain
        else ("(the clean cohort has no faults)" if cohort == "clean" else "(no energy-fusion runs)")
    )
    diag = []
    for variant, variant_runs in runs.items():
        stats = [r["fusion"] for r in variant_runs.values() if r.get("fusion")]
        if stats:
            keys = sorted(stats[0])
            diag.append(f"| {variant} | " + ", ".join(f"{k} {np.mean([s[k] for s in stats]):.2f}" for k in keys) + " |")
    diag_md = (
        (
            "| variant | held-out fusion statistics (level: weight entropy / share one-hot / energy spread, |E|) |\n"
            "|---|---|\n" + "\n".join(diag)
        )
        if diag
        else ""
    )
    _plot(runs, paired, stem)
    any_run = next(iter(next(iter(runs.values())).values()))
    cfg = any_run["config"]
    text = (
        f"# Fusion study, {cohort} cohort (2-D fast variant)\n\n"
        f"Generated by `e2pa.engine.study.write_report` from the runs in `{out}`.\n\n"
        f"- Command: `{command}`\n- {provenance}\n"
        f"- Cohort: {cfg['n_train']} training, {cfg['n_val']} validation, {cfg['n_test']} held-out phantom cases "
        f"({'x'.join(map(str, SHAPE))}, per-case anatomy"
        + (
            f"; faults: rate {cfg['fault_rate']} per modality, at most {cfg['max_faulted']} per case, kinds "
            f"{', '.join(cfg['fault_kinds'])}"
            if cohort == "faults"
            else "; no faults"
        )
        + ").\n"
        f"- Training: {cfg['steps']} steps, batch {cfg['batch_size']} whole axial slices, AdamW lr {cfg['lr']} "
        f"(warm-up, cosine), modality dropout {cfg['modality_dropout']}, features {cfg['features']}; the same "
        f"batches per seed for every variant.\n"
        f"- Scores on each held-out case's tumour slab; mean ± std over seeds; Δ = paired difference to "
        f"implicit-mean over held-out cases × seeds with a two-way (cases, seeds) bootstrap 95 % CI; `*` = the "
        f"CI excludes 0 (for HD95 lower is better).\n\n"
        + table
        + "\n\n![study]("
        + stem.name
        + ".png)\n\n![curves]("
        + stem.name
        + "-curves.png)\n\n"
        "## Explainability: faulted modality's level-0 weight inside vs outside its fault\n\n"
        + explain_md
        + "\n\n"
        + ("## Fusion statistics\n\n" + diag_md + "\n" if diag_md else "")
    )
    atomic_write_text(doc_path, text)
    return doc_path


def _plot(runs, paired, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_save_figure

    names = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, metric, title in ((axes[0], "dice_mean", "all modalities"), (axes[1], "subset_dice", "15-subset mean")):
        means = [np.mean([r[metric] for r in runs[n].values()]) for n in names]
        ax.bar(range(len(names)), means, color="#8fb3d9")
        for i, n in enumerate(names):
            if n in paired:
                p = paired[n][metric]
                base = np.mean([r[metric] for r in runs[REFERENCE].values()])
                ax.errorbar(i, base + p.mean, yerr=[[p.mean - p.low], [p.high - p.mean]], fmt="o", color="k", capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set(title=f"{title} (dots: mean + paired Δ, 95% CI)", ylabel="mean Dice (TC, WT, ET)", ylim=(0, 1))
    fig.tight_layout()
    atomic_save_figure(fig, stem.parent / (stem.name + ".png"), dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for n in names:
        curves = [r["curve"] for r in runs[n].values()]
        steps = [c["step"] for c in curves[0]]
        axes[0].plot(steps, np.mean([[c["task"] for c in cur] for cur in curves], axis=0), label=n)
        val_steps = [c["step"] for c in curves[0] if "val_dice" in c]
        axes[1].plot(
            val_steps,
            np.mean([[c["val_dice"] for c in cur if "val_dice" in c] for cur in curves], axis=0),
            marker=".",
            label=n,
        )
    axes[0].set(xlabel="step", ylabel="task loss (Dice + CE), mean over seeds", title="training")
    axes[1].set(xlabel="step", ylabel="validation mean Dice", title="validation cases (not held-out)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, stem.parent / (stem.name + "-curves.png"), dpi=100)
    plt.close(fig)
