"""The correctness gate: an implementation's outputs and gradients against the float64 reference.

The rule is the test suite's (:func:`e2pa_kernels.testing.compare_to_reference`): within twice
PyTorch's own error at the dtype plus a small atol, non-finite entries where the truth has them;
here the output's dtype must also be the reference's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from e2pa_kernels.testing import compare_to_reference

from .records import Check, Gate
from .registry import Case
from .workload import as_tuple, at_dtype, trainable, upstream_gradients


def input_grads(
    outputs: Sequence[torch.Tensor],
    inputs: Mapping[str, Any],
    grad_names: Sequence[str],
    upstream: Sequence[torch.Tensor],
    weights: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor | None]:
    """Gradient of ``Σ_o ⟨o, upstream_o⟩`` w.r.t. each of ``grad_names`` and of ``weights`` (a model
    step's own parameters, by name); upstream entries where the output is non-finite are zeroed (as
    in the tests), so ±inf outputs do not poison the gradients."""
    diff = [
        (o, torch.where(torch.isfinite(o.detach()), g.to(o.device, o.dtype), 0.0))
        for o, g in zip(outputs, upstream)
        if o.requires_grad
    ]
    wrt = {**{n: inputs[n] for n in grad_names}, **(weights or {})}
    grads = (
        torch.autograd.grad([o for o, _ in diff], list(wrt.values()), [g for _, g in diff], allow_unused=True)
        if diff
        else (None,) * len(wrt)
    )
    return dict(zip(wrt, grads))


def evaluate(
    fn: Callable[..., Any], inputs: Mapping[str, Any], grad_names: Sequence[str], upstream: Sequence[torch.Tensor]
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor | None]]:
    """(detached outputs of ``fn(**inputs)``, :func:`input_grads` of them, the callable's own
    :func:`~benchmarks.workload.trainable` weights included)."""
    outputs = as_tuple(fn(**inputs))
    return tuple(o.detach() for o in outputs), input_grads(outputs, inputs, grad_names, upstream, trainable(fn))


def references(case: Case, masters: Mapping[str, Any], dtype: torch.dtype):
    """(truth, same, upstream): the reference on float64 copies of the inputs and at ``dtype``, both
    as :func:`evaluate` returns them, for one float64 upstream gradient per output."""
    truth_inputs = at_dtype(masters, torch.float64, case.grad_names)
    outputs = as_tuple(case.reference(**truth_inputs))
    upstream = upstream_gradients(case, outputs)
    truth = (
        tuple(o.detach() for o in outputs),
        input_grads(outputs, truth_inputs, case.grad_names, upstream, trainable(case.reference)),
    )
    del outputs, truth_inputs
    same = evaluate(case.reference, at_dtype(masters, dtype, case.grad_names), case.grad_names, upstream)
    return truth, same, upstream


def compare(name: str, out: torch.Tensor, truth: torch.Tensor, same: torch.Tensor | None, dtype: torch.dtype) -> Check:
    """One tensor against the truth, with PyTorch's own error at ``dtype`` (``same``) as the yardstick."""
    if same is not None and out.dtype != same.dtype and out.shape == truth.shape:
        return Check(name, float("inf"), 0.0, False, f"dtype {out.dtype} != reference {same.dtype}")
    result = compare_to_reference(name, out, truth, same, dtype)
    return Check(name, result.error, result.bound, result.ok, result.detail)


def judge(result, truth, same, dtype: torch.dtype, output_names: Sequence[str]) -> Gate:
    """``result``, ``truth``, ``same``: (outputs, grads) as :func:`evaluate` returns them."""
    (outs, grads), (t_outs, t_grads), (s_outs, s_grads) = result, truth, same
    if len(outs) != len(t_outs):
        return Gate(ok=False, error=f"{len(outs)} outputs, the reference has {len(t_outs)}")
    checks = [compare(n, o, t, s, dtype) for n, o, t, s in zip(output_names, outs, t_outs, s_outs)]
    missing = sorted(set(t_grads) - set(grads))
    if missing:
        return Gate(ok=False, error=f"no gradient for {', '.join(missing)} (the reference has one)")
    for name, g in grads.items():
        if name not in t_grads:
            checks.append(Check(f"d{name}", float("inf"), 0.0, False, "the reference has no such gradient"))
        elif (g is None) != (t_grads[name] is None):
            checks.append(Check(f"d{name}", float("inf"), 0.0, False, "gradient presence differs from the reference"))
        elif g is not None:
            checks.append(compare(f"d{name}", g, t_grads[name], s_grads[name], dtype))
    return Gate(ok=all(c.ok for c in checks), checks=checks)
