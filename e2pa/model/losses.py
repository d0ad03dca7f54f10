"""Training losses of E²PA: the cohort ("same energy among patients") loss and the full objective.

Labels: BraTS regions ``[B, 3, *S]`` in MONAI's channel order TC, WT, ET (sigmoid targets of the
segmentation head), and the energy heads' classes ``TC + WT + ET`` ∈ {0 background, 1 ED, 2 NCR/NET,
3 ET} (:func:`e2pa.model.targets.regions_to_classes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

import e2pa_kernels

from ..checks import check_finite_float, check_positive_int
from ..data.labels import REGIONS
from .targets import regions_to_classes, resize_labels

if TYPE_CHECKING:  # the loss only reads the energies' fields
    from .network import E2PAEnergies


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 when it is: loss terms are sums over many voxels (no float16/bfloat16),
    and a float64 run (gradient checks, the benchmarks' truth) stays float64 end to end."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def class_conditional_means(energy: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Mean energy per sample and class over finite voxels.

    energy ``[B, *S]`` float, labels ``[B, *S]`` in ``[0, K)`` → (means ``[B, K]``, present ``[B, K]`` bool);
    means are 0 where a class has no finite voxel.
    """
    batch = energy.shape[0]
    finite = torch.isfinite(energy).flatten(1)
    values = torch.where(finite, energy.flatten(1), torch.zeros((), dtype=energy.dtype, device=energy.device))
    index = labels.flatten(1).long()
    sums = values.new_zeros(batch, num_classes).scatter_add(1, index, values)
    counts = values.new_zeros(batch, num_classes).scatter_add(1, index, finite.to(values.dtype))
    return sums / counts.clamp_min(1), counts > 0


class DiceCELoss(nn.Module):
    """MONAI's ``DiceCELoss(sigmoid=True)`` with its defaults, written out so that ``torch.compile`` traces it
    in one graph (MONAI's computes its reduction axes with ``torch.arange(...).tolist()``, a graph break):
    ``mean_{b,c}(1 − (2·tp + 1e-5) / (2·tp + fp + fn + 1e-5)) + CrossEntropyLoss(logits, regions)``, with
    ``tp, fp, fn`` the soft counts of ``sigmoid(logits)`` against ``regions`` over the spatial axes and the
    cross-entropy MONAI's (a softmax over the channels with the regions as soft targets). logits and
    regions ``[B, C, *S]`` float → scalar. tests/model/test_losses.py checks it against MONAI's."""

    smooth = 1e-5

    def forward(self, logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(2, logits.dim()))
        probabilities = torch.sigmoid(logits)
        tp = (probabilities * regions).sum(dim=spatial)
        fp = probabilities.sum(dim=spatial) - tp
        fn = regions.sum(dim=spatial) - tp
        dice = 1 - (2 * tp + self.smooth) / (2 * (tp + 0.5 * fp + 0.5 * fn) + self.smooth)
        return dice.mean() + F.cross_entropy(logits, regions)


class CohortEnergyLoss(nn.Module):
    """ "Same energy among patients": ``L = Σ_l mean_{(b,k) present} ((e_bk^(l) − μ_k^(l)) / (|μ_k^(l)| + 1))²``.

    ``e_bk^(l)`` is sample b's mean final fused energy over the voxels of class k at level l (labels
    resized to the level by nearest neighbour; +inf voxels — no modality — are ignored).
    ``μ_k^(l)`` are running prototypes (buffers ``prototypes [L, K]`` and ``initialized [L, K]``, both
    in the state dict): in training mode, a class seen for the first time is initialised to its batch
    mean, later batches move it by EMA ``μ ← m·μ + (1−m)·batch mean``; the loss of a batch is taken
    against the prototypes before this batch's EMA step. In eval mode nothing is updated and classes
    without a prototype are left out. Works at batch size 1.

    Args:
        num_levels: ``L``. num_classes: ``K``. momentum: ``m`` in ``[0, 1)``.
    """

    def __init__(self, num_levels: int, num_classes: int, momentum: float = 0.99):
        super().__init__()
        owner = "CohortEnergyLoss"
        self.num_levels = check_positive_int(owner, "num_levels", num_levels)
        self.num_classes = check_positive_int(owner, "num_classes", num_classes, minimum=2)
        self.momentum = check_finite_float(owner, "momentum", momentum)
        if self.momentum >= 1:
            raise ValueError(f"{owner}: momentum must lie in [0, 1); got {momentum!r}")
        self.register_buffer("prototypes", torch.zeros(num_levels, num_classes))
        self.register_buffer("initialized", torch.zeros(num_levels, num_classes, dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}, num_classes={self.num_classes}, momentum={self.momentum}"

    def forward(
        self, fused_energies: Sequence[torch.Tensor], labels: torch.Tensor, validate: bool = True
    ) -> torch.Tensor:
        """fused_energies: one ``[B, *S_l]`` final fused energy per level; labels ``[B, *S]`` int class
        indices at full resolution → scalar loss (float32). ``validate``: check the labels' range (a host
        read; False when they come from :func:`regions_to_classes`, in range by construction)."""
        if len(fused_energies) != self.num_levels:
            raise ValueError(
                f"CohortEnergyLoss: fused_energies must hold num_levels = {self.num_levels} tensors; "
                f"got {len(fused_energies)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"CohortEnergyLoss: labels must be integer class indices [B, *S]; got {labels.dtype}")
        if validate:
            e2pa_kernels.check_values(
                (labels >= 0) & (labels < self.num_classes),
                f"CohortEnergyLoss: labels must lie in [0, {self.num_classes - 1}]",
            )
        total = torch.zeros((), dtype=torch.float32, device=labels.device)
        for level, energy in enumerate(fused_energies):
            if energy.shape[0] != labels.shape[0] or energy.dim() != labels.dim():
                raise ValueError(
                    f"CohortEnergyLoss: fused_energies[{level}] must be [B, *S_l] with B = "
                    f"{labels.shape[0]} and {labels.dim() - 1} spatial axes; got {list(energy.shape)}"
                )
            means, present = class_conditional_means(
                energy.float(), resize_labels(labels, energy.shape[1:]), self.num_classes
            )
            reference = self._observe(level, means.detach(), present) if self.training else self.prototypes[level]
            known = present & self.initialized[level]
            # relative deviation: energies scale with the feature norms, which training changes freely;
            # measured against the prototype's own size the term stays O(1) and cannot blow up
            relative = (means - reference) / (reference.abs() + 1)
            squared = torch.where(known, relative.pow(2), torch.zeros_like(means)).sum()
            count = known.sum().to(squared.dtype)
            if _distributed():
                # mean over the pairs of the global batch: DDP averages gradients over ranks, so
                # each rank scales its sum by world_size / global count (= one process on that batch)
                count = count.detach().clone()
                torch.distributed.all_reduce(count)
                count = count / torch.distributed.get_world_size()
            total = total + squared / count.clamp_min(1)
        return total

    @torch.no_grad()
    def _observe(self, level: int, means: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """EMA step of level ``level``'s prototypes from one batch; returns the prototypes ``[K]`` the
        batch's loss is measured against (the previous ones, or the batch mean for a first sighting).

        Under torch.distributed the class statistics are summed over all ranks first, so every rank
        takes the same step from the global batch and the prototypes stay identical everywhere."""
        stats = torch.stack(
            [torch.where(present, means, torch.zeros_like(means)).sum(dim=0), present.sum(dim=0).to(means.dtype)]
        )
        if _distributed():
            torch.distributed.all_reduce(stats)
        sums, counts = stats
        seen = counts > 0
        batch_mean = sums / counts.clamp_min(1)
        first = seen & ~self.initialized[level]
        previous = self.prototypes[level].clone()
        reference = torch.where(first, batch_mean, previous)
        moved = self.momentum * previous + (1 - self.momentum) * batch_mean
        self.prototypes[level] = torch.where(first, batch_mean, torch.where(seen, moved, previous))
        self.initialized[level] |= seen
        return reference


class E2PALoss(nn.Module):
    """The E²PA objective:
    ``task + λ_ds·deep_supervision + λ_ehf·cohort + λ_esa·esa`` where

    - task: MONAI's ``DiceCELoss(sigmoid=True)`` of the logits on the regions (TC, WT, ET), as
      :class:`DiceCELoss`;
    - deep_supervision: mean over levels of the mean per-modality head cross-entropy, averaged over
      available modalities only (needs the network run with ``target=`` classes);
    - cohort: :class:`CohortEnergyLoss` on every level's final fused energy (levels without one —
      the implicit baselines ``fusion="mean"|"concat"`` — contribute nothing);
    - esa: batch mean of E_ESA, summed over the network's ESA levels (none: no term).

    A zero weight removes its term: it is not computed (no prototype update either) and not reported.

    Args:
        num_levels: number of network levels (cohort prototypes per level). num_classes: ``K`` of the
            energy heads.
        lambda_ds, lambda_ehf, lambda_esa: term weights ``>= 0``. The cohort term is a squared energy
            gap, energies grow with the feature norm, and the prototypes lag the moving energies, so it
            starts large: its default weight is small (0.01 made early training spike on the CPU
            overfit case, 0.001 did not).
        momentum: EMA momentum of the cohort prototypes.
    """

    def __init__(
        self,
        num_levels: int,
        num_classes: int = 4,
        lambda_ds: float = 0.1,
        lambda_ehf: float = 0.01,
        lambda_esa: float = 0.1,
        momentum: float = 0.99,
    ):
        super().__init__()
        owner = "E2PALoss"
        self.lambda_ds = check_finite_float(owner, "lambda_ds", lambda_ds)
        self.lambda_ehf = check_finite_float(owner, "lambda_ehf", lambda_ehf)
        self.lambda_esa = check_finite_float(owner, "lambda_esa", lambda_esa)
        self.task = DiceCELoss()
        self.cohort = CohortEnergyLoss(num_levels, num_classes, momentum)

    def extra_repr(self) -> str:
        return f"lambda_ds={self.lambda_ds}, lambda_ehf={self.lambda_ehf}, lambda_esa={self.lambda_esa}"

    def forward(
        self, logits: torch.Tensor, regions: torch.Tensor, energies: E2PAEnergies | None, *, validate: bool = True
    ):
        """logits ``[B, 3, *S]``, regions ``[B, 3, *S]`` (TC, WT, ET, 0/1), energies from
        ``E2PANet(..., return_energies=True)`` (None — a network without energies — only when every
        energy weight is 0) → (total scalar, {term name: detached unweighted value, "total": detached
        total}) with terms ``task`` and, when weighted, ``deep_supervision``, ``cohort``, ``esa``.
        ``validate``: check the regions' values (host reads; the trainer's labels are valid by
        construction and it passes False)."""
        if logits.shape != regions.shape:
            raise ValueError(
                f"E2PALoss: regions must have the logits' shape {list(logits.shape)}; got {list(regions.shape)}"
            )
        if energies is None and max(self.lambda_ds, self.lambda_ehf, self.lambda_esa) > 0:
            raise ValueError(
                "E2PALoss: energies is None but lambda_ds, lambda_ehf or lambda_esa is > 0; pass the "
                "network's energies (return_energies=True) or set those weights to 0"
            )
        scores = at_least_float32(logits)
        terms = {"task": self.task(scores, regions.to(scores.dtype))}
        total = terms["task"]
        if self.lambda_ds > 0:
            terms["deep_supervision"] = self._deep_supervision(energies)
            total = total + self.lambda_ds * terms["deep_supervision"]
        if self.lambda_ehf > 0 and all(level.fused_energy is not None for level in energies.levels):
            # classes from regions lie in [0, 3] by construction: checked again only if the heads have fewer
            terms["cohort"] = self.cohort(
                [level.fused_energy for level in energies.levels],
                regions_to_classes(regions, validate=validate),
                validate=self.cohort.num_classes <= len(REGIONS),
            )
            total = total + self.lambda_ehf * terms["cohort"]
        if self.lambda_esa > 0 and energies.esa:
            terms["esa"] = torch.stack([at_least_float32(e).mean() for e in energies.esa.values()]).sum()
            total = total + self.lambda_esa * terms["esa"]
        report = {name: value.detach() for name, value in terms.items()}
        report["total"] = total.detach()
        return total, report

    @staticmethod
    def _deep_supervision(energies: E2PAEnergies) -> torch.Tensor:
        """Mean over levels of the head cross-entropy averaged over voxels and available modalities."""
        if any(level.ce is None for level in energies.levels):
            raise ValueError(
                "E2PALoss: lambda_ds > 0 needs each modality's head cross-entropy: run the network "
                "with target=regions_to_classes(regions) and return_energies=True (or set lambda_ds=0)"
            )
        mask = energies.modality_mask
        per_level = []
        for level in energies.levels:
            per_modality = at_least_float32(level.ce).flatten(2).mean(dim=2)  # [B, M]
            per_level.append(torch.where(mask, per_modality, torch.zeros_like(per_modality)).sum() / mask.sum())
        return torch.stack(per_level).mean()
