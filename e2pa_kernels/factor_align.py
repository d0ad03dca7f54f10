"""Op 3 — ``factor_align`` and ``factor_basis`` (Triton kernels: issue #4; until then the reference runs)."""
from __future__ import annotations

import torch

from . import reference


def factor_align(x: torch.Tensor, fused: torch.Tensor, basis: torch.Tensor, eps: float = 1e-6):
    """x ``[B, M, C, *S]``, fused ``[B, C, *S]``, basis ``[B, C, r]`` or ``[C, r]`` →
    (dist ``[B, M]``, mom1 ``[B, M+1, r]``, mom2 ``[B, M+1, r]``)."""
    return reference.factor_align(x, fused, basis, eps)


def factor_basis(fused: torch.Tensor, rank: int, method: str = "eigh") -> torch.Tensor:
    """fused ``[B, C, *S]`` → ``[B, C, rank]`` orthonormal columns, no gradient."""
    return reference.factor_basis(fused, rank)
