"""Shared builders for the model tests: synthetic BraTS-like labels and tiny networks."""

from __future__ import annotations

import torch

from e2pa import E2PANet


def nested_regions(batch: int, spatial: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Random nested regions ``[B, 3, *S]`` float (TC, WT, ET with ET ⊆ TC ⊆ WT): every class appears."""
    draw = torch.rand((batch, 3, *spatial), generator=generator)
    wt = draw[:, 0] < 0.6
    tc = wt & (draw[:, 1] < 0.6)
    et = tc & (draw[:, 2] < 0.5)
    return torch.stack([tc, wt, et], dim=1).float()


def blob_case(spatial: tuple[int, ...], modalities: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """One learnable synthetic case: a sphere-like tumour (ET core, NCR shell, ED rim) that every
    modality shows with its own contrast, plus noise. Returns image ``[1, M, *S]`` and regions ``[1, 3, *S]``."""
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in spatial], indexing="ij")
    radius = torch.sqrt(sum(g**2 for g in grids))
    et, tc, wt = radius < 0.25, radius < 0.45, radius < 0.7
    regions = torch.stack([tc, wt, et]).float()[None]
    contrasts = torch.tensor([[1.0, 0.5, 2.0, 0.2], [0.3, 1.5, 0.4, 1.0], [2.0, 0.3, 1.0, 0.6], [0.8, 1.2, 0.2, 1.6]])
    image = torch.stack(
        [c[0] * wt + c[1] * tc + c[2] * et + c[3] * torch.ones_like(radius) for c in contrasts[:modalities]]
    ).float()
    return image[None] + 0.1 * torch.randn(1, modalities, *spatial), regions


def tiny_net(**overrides) -> E2PANet:
    """A two-level 3-D E2PANet small enough for CPU tests in well under a second per step."""
    config = dict(spatial_dims=3, features=(4, 8), esa_rank=2)
    config.update(overrides)
    return E2PANet(**config)
