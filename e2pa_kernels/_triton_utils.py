"""Host-side helpers every op's launcher shares: block sizes, grid sizing, device queries.

Nothing here queries CUDA at import; device properties are read once per device, on first launch.
"""

from __future__ import annotations

import functools

import torch

from ._runtime import emulated_sm_count, interpreter_enabled


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, tiles: int, per_sm: int = 4) -> int:
    """How many programs a persistent (grid-stride) kernel launches for ``tiles`` tiles.

    GPUs: a few per SM so every SM stays busy while the per-program partial buffers stay small.
    The interpreter runs programs one after another, so a handful is enough to exercise the
    grid-stride loop (under :func:`~e2pa_kernels._runtime.launch_as_gpu`: as many as on that GPU).
    """
    emulated = emulated_sm_count()
    if emulated is not None:
        return max(1, min(tiles, per_sm * emulated))
    if interpreter_enabled() or device.type != "cuda":
        return max(1, min(tiles, 3))
    return max(
        1,
        min(tiles, per_sm * _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())),
    )


def head_fp32(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A classifier head's W and b as fp32 (a [K, C] copy where they are not): the kernels read the head in
    one dtype whatever the caller's, so one compiled variant serves every weight dtype. The values are those
    the kernels used when they converted after the load (fp16/bf16 -> fp32 is exact)."""
    return weight.float(), (bias.float() if bias is not None else None)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s device (Triton otherwise launches on the current CUDA device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    import contextlib

    return contextlib.nullcontext()
