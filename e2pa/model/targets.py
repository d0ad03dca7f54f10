"""Training targets of the energy heads, derived from the BraTS regions.

The segmentation head predicts the nested regions ``[B, 3, *S]`` (TC, WT, ET; :data:`e2pa.data.REGIONS`);
the energy heads of every EHF level classify each voxel into ``K = 4`` classes
``TC + WT + ET`` ∈ {0 background, 1 ED, 2 NCR/NET, 3 ET} (:func:`regions_to_classes`), at the
level's own grid (:func:`resize_labels`). Used by the network (the heads' deep supervision) and by
the losses (the cohort energy loss); neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

import e2pa_kernels

from ..data.labels import REGIONS


def regions_to_classes(regions: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """Nested BraTS regions ``[B, 3, *S]`` (TC, WT, ET; values 0/1, any dtype) → classes ``[B, *S]`` int64.

    ``class = TC + WT + ET``: 0 background, 1 ED (WT only), 2 NCR/NET (TC, not ET), 3 ET.
    Raises when the values are not 0/1 or the regions are not nested (ET ⊆ TC ⊆ WT), since the sum
    would then name a wrong class: a check of the values (host reads, see
    :func:`e2pa_kernels.check_values`) that ``validate=False`` skips — for labels built nested by the
    data pipeline (the trainer's).
    """
    if not isinstance(regions, torch.Tensor) or regions.dim() < 3 or regions.shape[1] != len(REGIONS):
        raise ValueError(
            f"regions must be a tensor [B, 3, *S] (channels TC, WT, ET); got "
            f"{list(regions.shape) if isinstance(regions, torch.Tensor) else type(regions).__name__}"
        )
    if validate:
        e2pa_kernels.check_values(
            (regions == 0) | (regions == 1), "regions must hold only 0 and 1 (binary TC, WT, ET masks)"
        )
    tc, wt, et = regions.bool().unbind(dim=1)
    if validate:
        nested = ~((et & ~tc) | (tc & ~wt))
        e2pa_kernels.check_values(
            nested,
            "regions must be nested (ET ⊆ TC ⊆ WT)",
            lambda: f"regions must be nested (ET ⊆ TC ⊆ WT); {int((~nested).sum())} voxel(s) are not",
        )
    return tc.long() + wt.long() + et.long()


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Class indices ``[B, *S]`` resized to ``[B, *size]`` by nearest neighbour (same as a level's grid)."""
    if tuple(labels.shape[1:]) == tuple(size):
        return labels
    # Exact for class indices: nearest interpolation copies values, and float32 holds integers < 2^24.
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(labels.dtype)
