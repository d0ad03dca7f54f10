"""Traffic meter: the global-memory bytes each Triton path moves, over the bytes it cannot avoid.

Counted in Triton's CPU interpreter (``TRITON_INTERPRET=1``), element by element:

- every ``tl.load`` / ``tl.store`` of a kernel adds (number of elements its mask lets through) × (element
  size): the interpreter builder's ``create_masked_load`` / ``create_masked_store`` are wrapped while a
  :class:`TrafficMeter` is active (unmasked loads and stores go through them too);
- every PyTorch op the launchers run around the kernels (a masked fill, a mean, a fixed-order sum of
  partials, a zero-filled buffer) adds its tensor operands' bytes as read once and its results' bytes
  as written once (a ``TorchDispatchMode``; views, ``empty`` and other metadata-only ops move nothing;
  fills and ``zeros`` only write; ``copy_`` reads its source and writes its destination). Ops the
  interpreter itself issues while a kernel runs (its argument copies) are not counted.

The launchers pick the block sizes and persistent grids of a GPU (:func:`e2pa_kernels._runtime.launch_as_gpu`,
132 SMs by default), not the interpreter's small test blocks: the traffic depends on them (per-tile
re-reads of the weights, one partial row per program).

The *minimum* of a direction is the bytes of its tensors read or written once: forward = inputs +
outputs; backward = inputs + upstream gradients + input gradients (what the forward saved beyond its
inputs is not part of it; an absent modality's slab of x is not part of it either: it need not be read).
The meter reports ``ratio = counted / minimum``.

What it does not model: caches (a re-read that hits L1/L2 is counted as a DRAM read: the ratio is the
traffic the kernels *ask for*, an upper bound of what DRAM serves), the sector granularity of real
transactions (a masked-off element inside a 32-byte sector is free here, not on a GPU), instruction
overheads, and atomics (no kernel here uses them). Partial-sum buffers (dW/db/dU per program) are counted
as they are: written once by their kernel, read once by the fixed-order sum.

    TRITON_INTERPRET=1 python -m benchmarks.traffic          # the table (also: python -m benchmarks --traffic)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# op names (overload packet) that move no tensor data
_METADATA_OPS = frozenset(
    {
        "empty",
        "empty_strided",
        "empty_like",
        "new_empty",
        "new_empty_strided",
        "view",
        "_unsafe_view",
        "as_strided",
        "t",
        "transpose",
        "permute",
        "expand",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "detach",
        "alias",
        "lift_fresh",
        "unbind",
        "split",
        "split_with_sizes",
        "narrow",
        "diagonal",
        "_reshape_alias",
        "view_as_real",
        "view_as_complex",
        "set_",
        "resize_",
        "unfold",
        "movedim",
        "flatten",
        "reshape",
    }
)
# ops that write their output(s) without reading tensor data
_WRITE_ONLY_OPS = frozenset(
    {
        "zeros",
        "ones",
        "full",
        "zeros_like",
        "ones_like",
        "full_like",
        "fill_",
        "zero_",
        "scalar_tensor",
        "arange",
        "randn",
        "rand",
        "randint",
    }
)


def _nbytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a broadcast, stride-0 axis counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride != 0 else min(size, 1)
    return n * t.element_size()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


@dataclasses.dataclass
class Traffic:
    """Bytes counted by a :class:`TrafficMeter`: by kernels and by the PyTorch ops around them."""

    kernel_read: int = 0
    kernel_written: int = 0
    torch_read: int = 0
    torch_written: int = 0
    launches: int = 0

    @property
    def total(self) -> int:
        return self.kernel_read + self.kernel_written + self.torch_read + self.torch_written


class _TorchOpCounter(TorchDispatchMode):
    def __init__(self, meter: TrafficMeter):
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.meter.in_kernel:
            return out
        name = func.overloadpacket.__name__
        if name in _METADATA_OPS:
            return out
        t = self.meter.traffic
        written = sum(_nbytes(o) for o in _tensors(out))
        if name == "copy_":
            t.torch_read += _nbytes(args[1]) if isinstance(args[1], torch.Tensor) else 0
        elif name not in _WRITE_ONLY_OPS:
            t.torch_read += sum(_nbytes(a) for a in _tensors((args, kwargs)))
        t.torch_written += written
        return out


class TrafficMeter:
    """Count global-memory traffic inside a ``with`` block (module docstring). Needs the interpreter."""

    def __init__(self):
        self.traffic = Traffic()
        self.in_kernel = False

    def __enter__(self) -> TrafficMeter:
        from triton.runtime import interpreter

        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "the traffic meter counts in Triton's interpreter: set TRITON_INTERPRET=1 before "
                "e2pa_kernels is imported"
            )
        builder = interpreter.InterpreterBuilder
        executor = interpreter.GridExecutor
        self._saved = (builder.create_masked_load, builder.create_masked_store, executor.__call__)
        load, store, call = self._saved
        meter = self

        # the cache/eviction arguments after the mask differ between Triton versions (3.6: cache_modifier,
        # eviction_policy; 3.9: cache_policy): passed on as they come
        def counted_load(b, ptrs, mask, *args, **kwargs):
            ret = load(b, ptrs, mask, *args, **kwargs)
            meter.traffic.kernel_read += int(np.count_nonzero(mask.data)) * ret.data.dtype.itemsize
            return ret

        def counted_store(b, ptrs, value, mask, *args, **kwargs):
            meter.traffic.kernel_written += int(np.count_nonzero(mask.data)) * value.data.dtype.itemsize
            return store(b, ptrs, value, mask, *args, **kwargs)

        def counted_call(ex, *args, **kwargs):
            meter.traffic.launches += 1
            outer, meter.in_kernel = meter.in_kernel, True
            try:
                return call(ex, *args, **kwargs)
            finally:
                meter.in_kernel = outer

        builder.create_masked_load, builder.create_masked_store, executor.__call__ = (
            counted_load,
            counted_store,
            counted_call,
        )
        self._mode = _TorchOpCounter(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime import interpreter

        self._mode.__exit__(*exc)
        builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
        builder.create_masked_load, builder.create_masked_store, executor.__call__ = self._saved


def minimum_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of each given tensor read or written once (None entries are skipped)."""
    return sum(_nbytes(t) for t in tensors if t is not None)


@dataclasses.dataclass(frozen=True)
class TrafficResult:
    case: str
    direction: str  # "fwd" or "bwd"
    traffic: Traffic
    minimum: int

    @property
    def ratio(self) -> float:
        return self.traffic.total / self.minimum


def meter(fn: Callable[[], Any], sm_count: int = 132) -> tuple[Traffic, Any]:
    """Run ``fn()`` with GPU launch configs under a :class:`TrafficMeter`; (traffic, fn's result)."""
    from e2pa_kernels._runtime import launch_as_gpu

    with torch.no_grad(), launch_as_gpu(sm_count), TrafficMeter() as m:
        out = fn()
    return m.traffic, out


# --------------------------------------------------------------------------------------------------
# The metered paths: each op's public launchers, and one EHF level
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Level:
    """One EHF level's sizes (B samples, M modalities, C channels, K classes, edge³ voxels)."""

    name: str
    B: int
    M: int
    C: int
    K: int
    edge: int
    xi0: bool  # level > 0: ξ0 given (ψ of the previous level); level 0: the masked mean
    steps: int = 3

    @property
    def N(self) -> int:
        return self.edge**3


# The level (16³ voxels × 32 channels × 4 modalities), and the deeper levels of E2PANet's default
# features at the same patch (half the edge, twice the channels).
LEVELS = (
    Level("level0 C32 16³", 1, 4, 32, 4, 16, xi0=False),
    Level("level1 C64 8³", 1, 4, 64, 4, 8, xi0=True),
    Level("level2 C128 4³", 1, 4, 128, 4, 4, xi0=True),
)


def _rand(gen: torch.Generator, *shape: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _level_inputs(level: Level, dtype: torch.dtype, masked: bool, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    B, M, C, K, N = level.B, level.M, level.C, level.K, level.N
    mask = None
    if masked:
        mask = torch.ones(B, M, dtype=torch.bool)
        mask[0, 1] = False
    return dict(
        x=_rand(gen, B, M, C, N, dtype=dtype, scale=C**-0.5),
        weight=_rand(gen, K, C),
        bias=_rand(gen, K),
        mask=mask,
        xi0=_rand(gen, B, C, N, dtype=dtype, scale=C**-0.5) if level.xi0 else None,
        target=torch.randint(0, K, (B, N), generator=gen),
    )


def measure_energy_fusion(
    level: Level, dtype: torch.dtype = torch.float32, masked: bool = True, seed: int = 0
) -> tuple[TrafficResult, TrafficResult]:
    """(forward, backward) of one level through energy_fusion's Triton launchers."""
    ef = importlib.import_module("e2pa_kernels.energy_fusion")  # the package binds the name to the op
    i = _level_inputs(level, dtype, masked, seed)
    params = ef.FusionParams(
        temperature=1.0, prior_temperature=1.0, beta=C_BETA / level.C**0.5, steps=level.steps, ignore_index=-100
    )
    args = (i["x"], i["weight"], i["bias"], i["mask"], i["xi0"], i["target"])
    fwd, outs = meter(lambda: ef.energy_fusion_fwd(*args, params))
    *outputs, saved = outs
    outputs = [o for o in outputs if o is not None]
    gen = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    bwd, (dx, dw, db, dxi0) = meter(lambda: ef.energy_fusion_bwd(*args, saved, params, *grads))
    # an absent modality's features need not be read: x counts only its present (b, m) slabs
    x = i["x"]
    x_absent = 0 if i["mask"] is None else _nbytes(x) // (x.shape[0] * x.shape[1]) * int((~i["mask"]).sum())
    inputs = [t for t in args if t is not None]
    name = f"energy_fusion {level.name}{' masked' if masked else ''} {_dtype(dtype)}"
    return (
        TrafficResult(name, "fwd", fwd, minimum_bytes(*inputs, *outputs) - x_absent),
        TrafficResult(name, "bwd", bwd, minimum_bytes(*inputs, *grads, dx, dw, db, dxi0) - x_absent),
    )


C_BETA = 1.0  # E2PANet's beta before the 1/√C scaling
GATE = 0.12  # the normalised level's initial gate, sigmoid(-2)


def measure_normalized_fusion(
    level: Level, dtype: torch.dtype = torch.float32, masked: bool = True, seed: int = 0
) -> tuple[TrafficResult, TrafficResult]:
    """(forward, backward) of one normalised level (EHF's default) through normalized_fusion's launchers on
    the Triton path: the kernels plus the RMS normalisation, the mix and the RMS VJP around them (PyTorch
    ops). Its minimum is the normalised level's own inputs, outputs and gradients; p and the head energies
    it saves are not part of it."""
    ef = importlib.import_module("e2pa_kernels.energy_fusion")  # the package binds the name to the op
    i = _level_inputs(level, dtype, masked, seed)
    params = ef.FusionParams(
        temperature=1.0, prior_temperature=1.0, beta=C_BETA / level.C**0.5, steps=level.steps, ignore_index=-100
    )
    gate = torch.tensor(GATE)
    args = (i["x"], i["weight"], i["bias"], i["mask"], i["xi0"], i["target"], gate)
    fwd, outs = meter(lambda: ef.normalized_fusion_fwd(*args, 1e-5, params, True))
    *outputs, p, raw = outs
    outputs = [o for o in outputs if o is not None]
    gen = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    if len(grads) == 4:
        grads.append(None)
    bwd, (dx, dw, db, dxi0, dgate) = meter(
        lambda: ef.normalized_fusion_bwd(*args, p, raw, 1e-5, params, True, tuple(grads))
    )
    x = i["x"]
    x_absent = 0 if i["mask"] is None else _nbytes(x) // (x.shape[0] * x.shape[1]) * int((~i["mask"]).sum())
    inputs = [t for t in args if t is not None]
    name = f"normalized_fusion {level.name}{' masked' if masked else ''} {_dtype(dtype)}"
    return (
        TrafficResult(name, "fwd", fwd, minimum_bytes(*inputs, *outputs) - x_absent),
        TrafficResult(name, "bwd", bwd, minimum_bytes(*inputs, *grads, dx, dw, db, dxi0, dgate) - x_absent),
    )


def measure_free_energy(level: Level, dtype: torch.dtype = torch.float32, seed: int = 0):
    fe = importlib.import_module("e2pa_kernels.free_energy")  # the package binds the name to the op
    i = _level_inputs(level, dtype, False, seed)
    args = (i["x"], i["weight"], i["bias"], i["target"], 1.0, -100)
    fwd, (energy, ce) = meter(lambda: fe.free_energy_fwd(*args))
    gen = torch.Generator().manual_seed(seed + 1)
    d_energy, d_ce = (torch.randn(t.shape, generator=gen).to(dtype) for t in (energy, ce))
    bwd, (dx, dw, db) = meter(lambda: fe.free_energy_bwd(*args, d_energy, d_ce))
    inputs = (i["x"], i["weight"], i["bias"], i["target"])
    name = f"free_energy {level.name} {_dtype(dtype)}"
    return (
        TrafficResult(name, "fwd", fwd, minimum_bytes(*inputs, energy, ce)),
        TrafficResult(name, "bwd", bwd, minimum_bytes(*inputs, d_energy, d_ce, dx, dw, db)),
    )


def measure_energy_propagate(level: Level, dtype: torch.dtype = torch.float32, seed: int = 0):
    ep = importlib.import_module("e2pa_kernels.energy_propagate")  # the package binds the name to the op
    gen = torch.Generator().manual_seed(seed)
    B, M, C, N = level.B, level.M, level.C, level.N
    x = _rand(gen, B, M, C, N, dtype=dtype, scale=C**-0.5)
    xi0 = _rand(gen, B, C, N, dtype=dtype, scale=C**-0.5)
    a = _rand(gen, B, M, N, dtype=dtype)
    beta = C_BETA / C**0.5
    fwd, outs = meter(lambda: ep.energy_propagate_fwd(x, xi0, a, beta, level.steps))
    grads = [torch.randn(o.shape, generator=gen).to(dtype) for o in outs]
    bwd, (dx, dxi0, da) = meter(lambda: ep.energy_propagate_bwd(x, xi0, a, beta, level.steps, *grads))
    name = f"energy_propagate {level.name} {_dtype(dtype)}"
    return (
        TrafficResult(name, "fwd", fwd, minimum_bytes(x, xi0, a, *outs)),
        TrafficResult(name, "bwd", bwd, minimum_bytes(x, xi0, a, *grads, dx, dxi0, da)),
    )


def measure_factor_align(level: Level, dtype: torch.dtype = torch.float32, rank: int = 16, seed: int = 0):
    fa = importlib.import_module("e2pa_kernels.factor_align")  # the package binds the name to the op
    gen = torch.Generator().manual_seed(seed)
    B, M, C, N = level.B, level.M, level.C, level.N
    x = _rand(gen, B, M, C, N, dtype=dtype)
    fused = _rand(gen, B, C, N, dtype=dtype)
    basis = torch.linalg.qr(torch.randn(B, C, rank, generator=gen))[0]
    fwd, outs = meter(lambda: fa.factor_align_fwd(x, fused, basis, 1e-6))
    grads = [torch.randn(o.shape, generator=gen).to(dtype) for o in outs]
    bwd, (dx, dfused, dbasis) = meter(lambda: fa.factor_align_bwd(x, fused, basis, 1e-6, *grads))
    name = f"factor_align {level.name} r{rank} {_dtype(dtype)}"
    return (
        TrafficResult(name, "fwd", fwd, minimum_bytes(x, fused, basis, *outs)),
        TrafficResult(name, "bwd", bwd, minimum_bytes(x, fused, basis, *grads, dx, dfused, dbasis)),
    )


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def measure_all(levels: Iterable[Level] = LEVELS, dtypes=(torch.float32, torch.float16)) -> list[TrafficResult]:
    results: list[TrafficResult] = []
    for dtype in dtypes:
        for level in levels:
            results += measure_energy_fusion(level, dtype, masked=False)
            results += measure_energy_fusion(level, dtype, masked=True)
            results += measure_normalized_fusion(level, dtype, masked=True)
            results += measure_free_energy(level, dtype)
            results += measure_energy_propagate(level, dtype)
            if level.C >= 16:
                results += measure_factor_align(level, dtype)
    return results


def table(results: list[TrafficResult]) -> list[str]:
    """A Markdown table: one row per case, forward and backward side by side."""
    rows: dict[str, dict[str, TrafficResult]] = {}
    for r in results:
        rows.setdefault(r.case, {})[r.direction] = r
    lines = [
        "| path | fwd ratio | fwd MiB (kernels + torch ops) | bwd ratio | bwd MiB (kernels + torch ops) |",
        "|---|---|---|---|---|",
    ]

    def cell(r: TrafficResult | None) -> tuple[str, str]:
        if r is None:
            return "—", "—"
        t = r.traffic
        k = (t.kernel_read + t.kernel_written) / 2**20
        o = (t.torch_read + t.torch_written) / 2**20
        return f"{r.ratio:.2f}×", f"{k:.2f} + {o:.2f} (min {r.minimum / 2**20:.2f})"

    for case, by_dir in rows.items():
        f, b = cell(by_dir.get("fwd")), cell(by_dir.get("bwd"))
        lines.append(f"| {case} | {f[0]} | {f[1]} | {b[0]} | {b[1]} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.traffic", description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="0,1,2", help="comma-separated EHF levels to meter (default 0,1,2)")
    parser.add_argument("--dtypes", default="float32,float16", help="comma-separated (default float32,float16)")
    args = parser.parse_args(argv)
    levels = [LEVELS[int(i)] for i in args.levels.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    print("\n".join(table(measure_all(levels, dtypes))))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
