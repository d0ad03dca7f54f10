"""Inputs, upstream gradients and the timed step of each mode, built identically in every process.

Everything random is drawn from generators seeded by the case name, so the memory worker
subprocess rebuilds exactly the inputs the gate checked and the timer ran.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .registry import Case


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def seed(case: Case, salt: str = "") -> int:
    return zlib.crc32(f"{case.name}{salt}".encode())


def _generator(device: torch.device, value: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(value)


def master_inputs(case: Case, device: torch.device) -> dict[str, Any]:
    """The case's inputs with float tensors in float32, from the case's own seed."""
    return case.make_inputs(device, _generator(device, seed(case)))


def at_dtype(masters: Mapping[str, Any], dtype: torch.dtype, grad_names: Sequence[str]) -> dict[str, Any]:
    """Fresh leaves: float tensors cast to ``dtype`` (``grad_names`` require grad), others as they are."""
    out = {}
    for name, value in masters.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(dtype, copy=True).requires_grad_(name in grad_names)
        out[name] = value
    return out


def trainable(fn: Callable[..., Any]) -> dict[str, torch.Tensor]:
    """Weights a built callable trains besides its inputs (a model step's parameters), named
    ``param:<name>``; empty for ops, whose every differentiable tensor is an input."""
    named = getattr(fn, "named_parameters", None)
    return {f"param:{n}": p for n, p in named() if p.requires_grad} if named is not None else {}


def upstream_gradients(case: Case, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One float64 standard-normal upstream gradient per output (a random one, not ones: a sum would
    hide layout bugs), the same for every provider and dtype."""
    gen = _generator(outputs[0].device, seed(case, "upstream"))
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64, device=o.device) for o in outputs]


def make_step(
    fn: Callable[..., Any],
    inputs: Mapping[str, Any],
    grad_names: Sequence[str],
    upstream: Sequence[torch.Tensor],
    mode: str,
) -> Callable[[], Any]:
    """The callable the timer runs for ``mode``:

    - ``fwd``: the forward with gradients enabled (it builds the graph and saves for backward, as in training);
    - ``bwd``: the backward alone, replayed on a graph built once here (``retain_graph``);
    - ``fwd+bwd``: forward then backward, i.e. one training step of the op.

    Gradients are returned by ``torch.autograd.grad`` (not accumulated into ``.grad``), so nothing
    grows between repetitions. ``upstream``: one gradient per output, already at the outputs' dtype
    (a cast inside the step would be timed). Besides ``grad_names`` the step differentiates w.r.t.
    the callable's own :func:`trainable` weights, as a training step does.
    """
    wrt = [inputs[n] for n in grad_names] + list(trainable(fn).values())

    def backward(outs, **kwargs):
        pairs = [(o, g) for o, g in zip(outs, upstream) if o.requires_grad]
        # allow_unused: a baseline model may hold weights its step never touches (the concatenation
        # U-Net keeps E2PANet's energy heads); the gate, not the timer, checks gradient presence
        return torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True, **kwargs)

    if mode == "fwd":
        return lambda: fn(**inputs)
    if mode == "bwd":
        outs = as_tuple(fn(**inputs))
        return lambda: backward(outs, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: backward(as_tuple(fn(**inputs)))
    raise ValueError(f"unknown mode {mode!r}")
