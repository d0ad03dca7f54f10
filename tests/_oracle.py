"""Run an op on one backend at one dtype, forward and every gradient, against the reference.

Shared by every op's tests: the same random upstream gradient (drawn once, in float64) is applied
to every output of every implementation, so each input gradient is compared, not just a sum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from _assert import assert_matches_reference

import e2pa_kernels


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def run_backend(
    call: Callable,
    inputs: Mapping[str, object],
    backend: str,
    dtype: torch.dtype | None,
    upstream: list[torch.Tensor] | None,
    grad_names: tuple[str, ...],
):
    """Outputs and input gradients of ``call(**inputs)`` on ``backend``; float inputs cast to ``dtype``
    (None keeps them). ``upstream`` (float64, one per output) weights each output in the loss."""
    prepared = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype) if dtype is not None else v.detach().clone()
            v.requires_grad_(k in grad_names)
        prepared[k] = v
    with e2pa_kernels.use_backend(backend):
        outs = _as_tuple(call(**prepared))
    if upstream is None:
        upstream = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    loss = 0
    for o, g in zip(outs, upstream):
        if o.is_floating_point() and o.requires_grad:
            g = torch.where(torch.isfinite(o.detach().double().cpu()), g, 0.0).to(o.dtype)
            loss = loss + (torch.where(torch.isfinite(o), o, 0.0) * g).sum()
    wrt = [prepared[k] for k in grad_names]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if isinstance(loss, torch.Tensor) else [None] * len(wrt)
    return outs, dict(zip(grad_names, grads)), upstream


def check_op(
    call: Callable,
    inputs: Mapping[str, object],
    backend: str,
    dtype: torch.dtype,
    grad_names: tuple[str, ...],
    output_names: tuple[str, ...],
) -> None:
    """Forward outputs and every gradient of ``backend`` at ``dtype`` match the float64 reference
    within twice PyTorch's own error at ``dtype`` (see ``_assert``)."""
    truth, truth_grads, upstream = run_backend(call, inputs, "reference", torch.float64, None, grad_names)
    same, same_grads, _ = run_backend(call, inputs, "reference", dtype, upstream, grad_names)
    outs, grads, _ = run_backend(call, inputs, backend, dtype, upstream, grad_names)
    assert len(outs) == len(output_names), f"expected outputs {output_names}, got {len(outs)}"
    for name, o, t, s in zip(output_names, outs, truth, same):
        assert o.dtype == s.dtype, f"{name}: dtype {o.dtype} != reference {s.dtype}"
        assert_matches_reference(f"{backend}/{dtype} {name}", o, t, s, dtype)
    for name in grad_names:
        g, t, s = grads[name], truth_grads[name], same_grads[name]
        assert (g is None) == (t is None), f"d{name}: gradient presence differs from the reference"
        if g is not None:
            assert g.dtype == inputs[name].to(dtype).dtype, f"d{name}: dtype {g.dtype}"
            assert_matches_reference(f"{backend}/{dtype} d{name}", g, t, s, dtype)
