"""Op 2 — ``energy_propagate`` (Triton kernels: issue #3; until then every backend runs the reference)."""
from __future__ import annotations

import torch

from . import reference


def energy_propagate(x: torch.Tensor, xi0: torch.Tensor, log_prior: torch.Tensor | None = None,
                     beta: float = 1.0, steps: int = 3):
    """x ``[B, M, C, *S]``, xi0 ``[B, C, *S]``, log_prior ``[B, M, *S]`` →
    (xi ``[B, C, *S]``, weights ``[B, M, *S]``, energies ``[B, steps+1, *S]``)."""
    return reference.energy_propagate(x, xi0, log_prior, beta, steps)
