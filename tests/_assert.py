"""Comparison against the reference, judged by PyTorch's own error at the same precision.

``truth`` is the reference on float64 copies of the inputs; ``torch_same`` the reference at the
implementation's dtype. An implementation passes when, on finite entries,
``max|out − truth| ≤ 2·max|torch_same − truth| + atol·scale`` (``scale = max(1, max|truth|)``),
and its non-finite entries (±inf energies of absent voxels) sit exactly where the truth has them.
"""
from __future__ import annotations

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_matches_reference(name: str, out: torch.Tensor, truth: torch.Tensor, torch_same: torch.Tensor | None,
                             dtype: torch.dtype | None = None) -> None:
    dtype = dtype or out.dtype
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(truth.shape)}"
    out64, truth64 = out.detach().double().cpu(), truth.detach().double().cpu()
    finite = torch.isfinite(truth64)
    mismatch = (torch.isfinite(out64) != finite) | (~finite & (out64 != truth64) & ~(out64.isnan() & truth64.isnan()))
    assert not bool(mismatch.any()), (
        f"{name}: non-finite pattern differs at {mismatch.nonzero()[:5].tolist()} "
        f"(got {out64[mismatch][:5].tolist()}, reference {truth64[mismatch][:5].tolist()})")
    if not bool(finite.any()):
        return
    err = (out64 - truth64)[finite].abs()
    own = 0.0 if torch_same is None else (torch_same.detach().double().cpu() - truth64)[finite].abs().max().item()
    scale = max(1.0, truth64[finite].abs().max().item())
    bound = 2 * own + ATOL[dtype] * scale
    worst = int(err.argmax())
    assert err.max().item() <= bound, (
        f"{name}: max error {err.max().item():.3e} > bound {bound:.3e} (PyTorch's own {dtype} error {own:.3e}, "
        f"scale {scale:.3g}); worst at flat finite index {worst}: got {out64[finite][worst].item():.6g}, "
        f"reference {truth64[finite][worst].item():.6g}")
