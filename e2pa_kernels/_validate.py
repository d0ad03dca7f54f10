"""Input checks and layout helpers shared by every op.

Errors name the op, the argument and what was expected, e.g.
``free_energy: weight must have shape [K, C] with C = 32 (x's channels); got [4, 31]``.
Layout: kernels see every feature tensor as ``[lead..., N]`` with the voxel axis last and unit
stride (so loads along voxels coalesce); leading axes keep their own strides, so slices along
batch / modality / channel reach the kernels without a copy. Anything else is copied once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT32_LIMIT = 2**31 - 1


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    min_ndim: int = 0,
    max_ndim: int | None = None,
) -> torch.Tensor:
    """``t`` is a tensor of an allowed dtype and rank; returns it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if t.dim() < min_ndim or (max_ndim is not None and t.dim() > max_ndim):
        span = (
            f"{min_ndim}"
            if max_ndim == min_ndim
            else f"at least {min_ndim}"
            if max_ndim is None
            else f"{min_ndim} to {max_ndim}"
        )
        raise ValueError(f"{op}: {name} must have {span} dimensions; got shape {_fmt_shape(t.shape)}")
    return t


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    """``t.shape == expected``; ``layout`` spells the axes (``"[K, C]"``) for the message."""
    if tuple(t.shape) != tuple(int(e) for e in expected):
        raise ValueError(f"{op}: {name} must have shape {layout} = {_fmt_shape(expected)}; got {_fmt_shape(t.shape)}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors live on one device; returns it."""
    present = {k: t for k, t in tensors.items() if t is not None}
    devices = {k: t.device for k, t in present.items()}
    first_name, first = next(iter(devices.items()))
    for k, d in devices.items():
        if d != first:
            raise ValueError(f"{op}: all tensors must be on one device; {first_name} is on {first} but {k} is on {d}")
    return first


def check_finite_scalar(op: str, name: str, value: object, *, positive: bool = False) -> float:
    """A Python number (not a tensor), finite and optionally > 0; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a Python float; got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{op}: {name} must be a finite{' positive' if positive else ''} number; got {value!r}")
    return v


def check_values(ok: torch.Tensor, summary: str, message: Callable[[], str] | None = None) -> None:
    """Raise ``ValueError(message())`` (or ``summary``) unless every entry of the bool tensor ``ok`` is True.

    A check of tensor *values* (labels in range, a mask with a modality per sample) reads a device
    value back to the host: one stream synchronisation on a GPU. So the public entry points run it
    once where data enters (``validate=True``, their default) and internal calls pass
    ``validate=False``. Inside ``torch.compile`` the check becomes ``torch._assert_async`` with the
    summary (no graph break, no host read; on CPU a RuntimeError, on CUDA a device-side assert), so a
    compiled model keeps it. ``message`` (which may read values, e.g. name the offending entries) runs
    only when the check fails eagerly.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), summary)
    elif not bool(ok.all()):
        raise ValueError(summary if message is None else message())


def voxels_last(x: torch.Tensor, lead: int) -> torch.Tensor:
    """View ``x`` as ``[x.shape[:lead]..., N]`` with unit stride along the flattened voxel axis.

    No copy when the spatial axes are already contiguous among themselves (the usual case, and also
    slices along the leading axes); otherwise one contiguous copy.
    """
    flat = x.flatten(lead) if x.dim() > lead else x.unsqueeze(-1)
    if flat.shape[-1] > 1 and flat.stride(-1) != 1:
        flat = x.contiguous().flatten(lead)
    return flat


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """True when some element offset of some tensor does not fit in int32 (switch kernels to int64)."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
        if span > INT32_LIMIT or t.numel() > INT32_LIMIT:
            return True
    return False


def has_modality_axis(
    op: str, x: torch.Tensor, channels: int, target: torch.Tensor | None = None, spatial_dims: int | None = None
) -> bool:
    """Whether ``x`` is ``[B, M, C, *S]`` (True) or ``[B, C, *S]`` (False), for ops that take both.

    Decided by, in order: ``spatial_dims``; ``target``'s rank (``[B, *S]``); which axis carries the
    ``channels`` that the op's weight expects. An undecidable case asks for ``spatial_dims``.
    """
    if spatial_dims is not None:
        if x.dim() == spatial_dims + 3:
            return True
        if x.dim() == spatial_dims + 2:
            return False
        raise ValueError(
            f"{op}: x with spatial_dims={spatial_dims} must be [B, M, C, *S] "
            f"({spatial_dims + 3} dims) or [B, C, *S] ({spatial_dims + 2} dims); "
            f"got shape {_fmt_shape(x.shape)}"
        )
    if target is not None:
        return x.dim() == target.dim() + 2
    at1 = x.dim() >= 3 and x.shape[1] == channels
    at2 = x.dim() >= 4 and x.shape[2] == channels
    if at1 and at2:
        raise ValueError(
            f"{op}: cannot tell whether x of shape {_fmt_shape(x.shape)} is [B, M, C, *S] or "
            f"[B, C, *S] (both axes 1 and 2 have C = {channels}); pass spatial_dims="
        )
    if not (at1 or at2):
        raise ValueError(
            f"{op}: x must be [B, M, C, *S] or [B, C, *S] with C = {channels} "
            f"(weight's channels); got shape {_fmt_shape(x.shape)}"
        )
    return at2


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """What the PyTorch paths compute in: float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def voxel_chunks(n_voxels: int, elements_per_voxel: int, budget: int) -> list[tuple[int, int]]:
    """``[start, stop)`` voxel ranges whose temporaries (``elements_per_voxel`` each) stay within
    ``budget`` elements: how the memory-lean PyTorch paths bound their working set."""
    step = max(1, budget // max(1, elements_per_voxel))
    return [(s, min(n_voxels, s + step)) for s in range(0, n_voxels, step)]
