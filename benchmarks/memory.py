"""Memory of one implementation: what its forward saves for backward, and the peak of one step.

- Saved for backward: the unique storages handed to autograd during the forward (a
  ``saved_tensors_hooks`` pack hook sees every one, custom Functions and compiled graphs included),
  in total and beyond the inputs' own storages (an input kept for backward costs nothing extra: the
  caller holds it anyway).
- Peak on CUDA: the caching allocator's ``max_memory_allocated`` over one step, and its rise over
  what was allocated before (the inputs, mostly).
- Peak on CPU: resident memory of a subprocess that runs only this implementation (see
  :mod:`benchmarks.memory_worker`); the parent's allocations, imports and other implementations
  cannot leak into it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .workload import trainable

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_TIMEOUT_S = 900
# glibc serves blocks under its (adaptive, up to 32 MiB) mmap threshold from the heap and keeps them
# resident after free, so RSS would remember earlier steps; a fixed small threshold maps every tensor
# separately and returns it to the OS on free, so the resident peak tracks live tensors.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def saved_for_backward(fn: Callable[..., Any], inputs: Mapping[str, Any]) -> tuple[int, int]:
    """(bytes of unique storages saved by the forward, of which not an input's storage); a model
    step's own weights count as inputs (they exist whether or not anything is saved)."""
    storages: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.nbytes():
            storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = fn(**inputs)
    del outputs
    held = [v for v in inputs.values() if isinstance(v, torch.Tensor)] + list(trainable(fn).values())
    inputs_keys = {(str(v.device), v.untyped_storage().data_ptr()) for v in held}
    return sum(storages.values()), sum(n for k, n in storages.items() if k not in inputs_keys)


def cuda_peak(step: Callable[[], Any], device: torch.device) -> tuple[int, int]:
    """(max_memory_allocated during ``step``, its rise over the allocation before it)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak, peak - before


class ResidentPeak:
    """Peak resident memory of this process from :meth:`reset` on.

    Linux: writing 5 to /proc/self/clear_refs resets the high-water mark (VmHWM) to the current RSS.
    ``ru_maxrss`` cannot be reset and, after fork/exec, can even carry the parent's peak; it is the
    fallback where clear_refs is unavailable (the peak then includes everything since start-up, so
    the measured rise can only be an underestimate).
    """

    def __init__(self) -> None:
        self.method = ""

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(f"{field} not in /proc/self/status")

    @staticmethod
    def _ru_maxrss_bytes() -> int:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux

    def reset(self) -> int:
        """Reset the mark; returns the resident bytes now (the baseline)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM after clear_refs"
            return self._status_kib("VmRSS") * 1024
        except OSError:
            self.method = "ru_maxrss"
            return self._ru_maxrss_bytes()

    def peak(self) -> int:
        return self._status_kib("VmHWM") * 1024 if self.method.startswith("VmHWM") else self._ru_maxrss_bytes()


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), before a baseline."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_in_subprocess(case: str, provider: str, dtype: torch.dtype) -> dict[str, Any]:
    """Run :mod:`benchmarks.memory_worker` for one (case, provider, dtype), with this process's
    thread count (per-thread buffers are part of the peak); returns its JSON report."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.memory_worker",
        "--case",
        case,
        "--provider",
        provider,
        "--dtype",
        str(dtype).replace("torch.", ""),
        "--threads",
        str(torch.get_num_threads()),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env={**os.environ, **WORKER_ENV}, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory worker exited with {proc.returncode}: {tail}")
    return json.loads(lines[-1])
