"""Where and how a run happened: device, CPU, versions, commit, date, command; and the results folder name."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_KNOBS = ("E2PA_BACKEND", "TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken (Triton is Linux-only)
        return None


def sources_digest(package: str = "e2pa_kernels") -> str:
    """sha256 (12 hex) of the package's .py files: with uncommitted changes, the commit alone does not
    say which kernels were measured."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / package).glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: CPU timings on a shared machine are only as good as its idleness."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe(device: torch.device) -> dict[str, Any]:
    # a copied tree without .git (a lent GPU machine): the commit the GPU kit was told
    commit = _run(["git", "rev-parse", "HEAD"]) or os.environ.get("E2PA_GIT_COMMIT")
    status = _run(["git", "status", "--porcelain"])
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "e2pa_kernels_sha256": sources_digest(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]]),
        "env": {k: os.environ[k] for k in ENV_KNOBS if k in os.environ},
        "load_average_at_start": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            cuda=torch.version.cuda,
            gpu_memory_bytes=props.total_memory,
            sm_count=props.multi_processor_count,
            driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    return info


def device_tag(info: dict[str, Any]) -> str:
    """Folder name: ``cuda-nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2t`` (CPU numbers depend on threads)."""
    slug = re.sub(r"[^a-z0-9]+", "-", info["device_name"].lower()).strip("-")
    if info["device"].startswith("cuda"):
        return f"cuda-{slug}"
    return f"cpu-{slug}-{info['torch_threads']}t"
