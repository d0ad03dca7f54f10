"""Timers: ``triton.testing.do_bench`` on CUDA, a wall-clock loop on CPU; and the copy bandwidth.

Both report the median and the 20th/80th percentiles of per-call times in milliseconds. do_bench
flushes L2 before every call and times with CUDA events; its default return is the mean, so the
quantiles are always asked for explicitly.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from .records import Timing

QUANTILES = [0.5, 0.2, 0.8]
GPU_WARMUP_MS, GPU_REP_MS = 25, 100
CPU_WARMUP_S, CPU_MIN_REPS, CPU_MAX_REPS, CPU_BUDGET_S = 0.05, 3, 50, 0.3
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}  # each of source and destination; far beyond any cache


def _from_quantiles(q) -> Timing:
    return Timing(median_ms=float(q[0]), p20_ms=float(q[1]), p80_ms=float(q[2]))


def _cpu_times(fn: Callable[[], Any]) -> list[float]:
    """Per-call milliseconds: warm-up for at least one call and CPU_WARMUP_S, then at least
    CPU_MIN_REPS calls and until CPU_BUDGET_S or CPU_MAX_REPS."""
    deadline = time.perf_counter() + CPU_WARMUP_S
    fn()
    while time.perf_counter() < deadline:
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < CPU_MIN_REPS or (time.perf_counter() - start < CPU_BUDGET_S and len(times) < CPU_MAX_REPS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(fn: Callable[[], Any], device: torch.device) -> Timing:
    gc.collect()
    if device.type == "cuda":
        import triton.testing  # here, not at the top: Triton is Linux-only and CPU runs do not need it

        return _from_quantiles(triton.testing.do_bench(fn, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, quantiles=QUANTILES))
    # the same estimator as do_bench: torch.quantile (linear interpolation)
    times = torch.tensor(_cpu_times(fn), dtype=torch.float64)
    return _from_quantiles(times.quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist())


def copy_bandwidth(device: torch.device) -> dict[str, Any]:
    """GB/s (1e9 bytes per second) of one large device-local tensor copy, read + write counted: the
    yardstick for every effective bandwidth in the same run."""
    nbytes = COPY_BYTES[device.type]
    if device.type == "cuda":
        nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 8)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device)
    moved = 2 * src.numel() * src.element_size()
    return dict(
        gbps=moved / (timing.median_ms * 1e-3) / 1e9,
        bytes_each_way=src.numel() * src.element_size(),
        p20_gbps=moved / (timing.p80_ms * 1e-3) / 1e9,
        p80_gbps=moved / (timing.p20_ms * 1e-3) / 1e9,
        method="torch copy_ of a float32 tensor, device-local, median of the timer",
    )
