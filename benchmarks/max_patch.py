"""The largest cubic training patch whose step fits a memory budget, per implementation.

``python -m benchmarks --max-patch GIB`` tries the patch edges of
:data:`benchmarks.cases.models.PATCH_EDGES` in increasing order for each model provider (E2PANet on
the auto backend, with and without activation checkpointing, and on the reference backend;
SegResNet; the concatenation U-Net) and stops at the first that
does not fit. Memory of one training step (batch 1, float32, forward + loss + backward):

- CUDA: ``max_memory_allocated`` over the step (weights, inputs, activations, gradients: everything
  the caching allocator handed out), in this process; out of memory counts as not fitting;
- CPU: the rise of resident memory over one step after a warm-up step, in a subprocess per trial
  (:mod:`benchmarks.memory_worker`): what the step adds on top of weights and inputs.

Memory grows with the patch volume, so the first edge that does not fit ends the search.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from . import memory
from .cases.models import MODEL_PROVIDERS, PATCH_EDGES
from .machine import describe, device_tag
from .registry import load_cases
from .report import markdown_table, mib
from .runner import reason
from .workload import as_tuple, make_step, master_inputs, upstream_gradients

PROVIDERS = ("ours", "ours+checkpointing", "reference", "segresnet", "concat-unet")
GIB = 1 << 30


def _step_bytes(case_name: str, provider_name: str, device: torch.device) -> tuple[int | None, str]:
    """(bytes one training step needs, or None when it fails, with why)."""
    if device.type == "cpu":
        try:
            report = memory.cpu_peak_in_subprocess(case_name, provider_name, torch.float32)
        except Exception as exc:  # noqa: BLE001 - a failed trial (killed for memory, say) does not fit
            return None, reason(exc)
        return report["peak_delta_bytes"], ""
    case = load_cases()[case_name]
    provider = next(p for p in MODEL_PROVIDERS if p.name == provider_name)
    try:
        fn = provider.build(case)
        inputs = master_inputs(case, device)
        upstream = upstream_gradients(case, as_tuple(fn(**inputs)))
        step = make_step(fn, inputs, (), [g.to(torch.float32) for g in upstream], "fwd+bwd")
        peak, _ = memory.cuda_peak(step, device)
        return peak, ""
    except Exception as exc:  # noqa: BLE001 - out of memory is the expected end of the search
        return None, reason(exc)
    finally:
        fn = inputs = upstream = step = None
        torch.cuda.empty_cache()


def search(budget_bytes: int, device: torch.device) -> dict[str, Any]:
    results = {}
    for provider in PROVIDERS:
        trials, largest = [], None
        for edge in PATCH_EDGES:
            needed, why = _step_bytes(f"E2PANet/step-{edge}^3", provider, device)
            trials.append(dict(edge=edge, bytes=needed, error=why or None))
            print(f"  {provider} {edge}³: {mib(needed) if needed is not None else why}", file=sys.stderr, flush=True)
            if needed is None or needed > budget_bytes:
                break
            largest = edge
        results[provider] = dict(largest_edge=largest, trials=trials)
    return results


def criterion(device: torch.device) -> str:
    return (
        "CUDA max_memory_allocated over one training step (weights, inputs, activations, gradients)"
        if device.type == "cuda"
        else "rise of resident memory over one training step after a warm-up step (subprocess per trial)"
    )


def markdown(run: dict[str, Any]) -> str:
    rows = []
    for provider, result in run["results"].items():
        largest = result["largest_edge"]
        fitted = next((t for t in result["trials"] if t["edge"] == largest), None)
        stopped = result["trials"][-1]
        over = (
            (
                f"{stopped['edge']}³: {mib(stopped['bytes'])}"
                if stopped["bytes"] is not None
                else f"{stopped['edge']}³: {stopped['error']}"
            )
            if stopped["edge"] != largest
            else "—"
        )
        rows.append(
            [
                provider,
                f"{largest}³" if largest else "none",
                mib(fitted["bytes"]) if fitted else "—",
                over,
                f"{largest**3 / 1e6:.2f} M" if largest else "—",
            ]
        )
    machine = run["machine"]
    lines = [
        f"# Largest training patch within {run['budget_gib']:g} GiB ({machine['device_name']})",
        "",
        f"Batch 1, float32, 4 modalities; E2PANet default features; memory = {run['criterion']}. "
        f"Edges tried: multiples of 16. Commit {(machine['git_commit'] or '?')[:10]}"
        f"{' (uncommitted changes)' if machine['git_dirty'] else ''}, torch {machine['torch']}, "
        f"{machine['torch_threads']} thread(s), {machine['date_utc']}. Command: `{machine['command']}`.",
        "",
    ]
    lines += markdown_table(
        ["implementation", "largest patch", "memory at that patch", "first that did not fit", "voxels"], rows
    )
    return "\n".join(lines) + "\n"


def main(budget_gib: float, device: torch.device, out: Path) -> int:
    if not math.isfinite(budget_gib) or budget_gib <= 0:
        raise SystemExit(f"--max-patch: the budget must be a positive number of GiB; got {budget_gib}")
    machine = describe(device)
    print(f"largest patch within {budget_gib:g} GiB on {device} ({machine['device_name']})", file=sys.stderr)
    run = dict(
        budget_gib=budget_gib,
        budget_bytes=int(budget_gib * GIB),
        criterion=criterion(device),
        machine=machine,
        results=search(int(budget_gib * GIB), device),
    )
    folder = out / device_tag(machine)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"max-patch-{budget_gib:g}GiB"
    (folder / f"{stem}.json").write_text(json.dumps(run, indent=1, default=str))
    (folder / f"{stem}.md").write_text(markdown(run))
    print(markdown(run))
    print(f"wrote {folder}/{stem}.json and {stem}.md")
    return 0
