"""Byte model shared by the op cases: the unavoidable memory traffic of each mode.

Every tensor a mode consumes is read once and every tensor it produces is written once:

- ``fwd``:     forward inputs read, outputs written;
- ``bwd``:     forward inputs read (the backward needs them, saved or recomputed) plus the upstream
               gradient of each float output, input gradients written;
- ``fwd+bwd``: the union: forward inputs and upstream gradients read, outputs and input gradients
               written (each tensor counted once across the two passes).

Effective bandwidth = these bytes / measured time, so an implementation that re-reads a tensor or
spills temporaries to memory shows up as a lower fraction of the copy bandwidth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def io_bytes(inputs: Mapping[str, Any], outputs: Sequence[torch.Tensor], grad_names: Sequence[str]) -> dict[str, int]:
    read = sum(tensor_bytes(v) for v in inputs.values() if isinstance(v, torch.Tensor))
    written = sum(tensor_bytes(o) for o in outputs)
    upstream = sum(tensor_bytes(o) for o in outputs if o.is_floating_point())
    grads = sum(tensor_bytes(inputs[n]) for n in grad_names)
    return {"fwd": read + written, "bwd": read + upstream + grads, "fwd+bwd": read + upstream + written + grads}


def forward_and_backward(forward_flops: float) -> dict[str, float]:
    """FLOPs per mode for dot-product ops: the backward does the two products of each VJP (2×
    forward); recomputation inside a backward is not counted, so TFLOP/s is useful work."""
    return {"fwd": forward_flops, "bwd": 2 * forward_flops, "fwd+bwd": 3 * forward_flops}
