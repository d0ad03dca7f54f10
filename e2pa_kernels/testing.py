"""The comparison rule every implementation is judged by, in tests and in benchmark gates.

With ``truth`` the reference on float64 copies of the inputs and ``same`` the reference at the
implementation's dtype (PyTorch's own error at that precision), an output passes when, on finite
entries, ``max|out − truth| ≤ 2·max|same − truth| + atol[dtype]·max(1, max|truth|)``, and its
non-finite entries (±inf energies of absent voxels) sit exactly where the truth has them
(flash-attention's convention: low precision is judged against PyTorch at that precision, never with
a tolerance picked to pass).
"""
from __future__ import annotations

import dataclasses

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass(frozen=True)
class Comparison:
    name: str
    error: float
    bound: float
    ok: bool
    detail: str = ""

    @property
    def message(self) -> str:
        return f"{self.name}: {self.detail}" if self.detail else \
            f"{self.name}: max error {self.error:.3e} {'<=' if self.ok else '>'} bound {self.bound:.3e}"


def compare_to_reference(name: str, out: torch.Tensor, truth: torch.Tensor, same: torch.Tensor | None,
                         dtype: torch.dtype | None = None) -> Comparison:
    """Judge ``out`` against ``truth`` with ``same`` as the yardstick (see the module docstring)."""
    dtype = dtype or out.dtype
    if out.shape != truth.shape:
        return Comparison(name, float("inf"), 0.0, False, f"shape {tuple(out.shape)} != reference {tuple(truth.shape)}")
    out64, truth64 = out.detach().double().cpu(), truth.detach().double().cpu()
    finite = torch.isfinite(truth64)
    mismatch = (torch.isfinite(out64) != finite) | (~finite & (out64 != truth64) & ~(out64.isnan() & truth64.isnan()))
    if bool(mismatch.any()):
        return Comparison(name, float("inf"), 0.0, False,
                          f"non-finite pattern differs at {int(mismatch.sum())} entries, e.g. "
                          f"{mismatch.nonzero()[:3].tolist()} (got {out64[mismatch][:3].tolist()}, "
                          f"reference {truth64[mismatch][:3].tolist()})")
    if not bool(finite.any()):
        return Comparison(name, 0.0, 0.0, True)
    err = (out64 - truth64)[finite].abs()
    own = 0.0 if same is None else (same.detach().double().cpu() - truth64)[finite].abs().max().item()
    scale = max(1.0, truth64[finite].abs().max().item())
    bound = 2 * own + ATOL[dtype] * scale
    error = err.max().item()
    if error <= bound:
        return Comparison(name, error, bound, True)
    worst = int(err.argmax())
    return Comparison(name, error, bound, False,
                      f"max error {error:.3e} > bound {bound:.3e} (PyTorch's own {dtype} error {own:.3e}, scale "
                      f"{scale:.3g}); worst at flat finite index {worst}: got {out64[finite][worst].item():.6g}, "
                      f"reference {truth64[finite][worst].item():.6g}")
