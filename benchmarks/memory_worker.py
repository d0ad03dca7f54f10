"""Peak resident memory of one implementation's training step, alone in this process (CPU).

``python -m benchmarks.memory_worker --case NAME --provider NAME --dtype float32`` builds the case's
inputs (the same seeded ones the parent gated and timed), runs one step of the case's memory mode
(fwd+bwd for ops) as warm-up (one-time allocations, compilation), releases what it freed, then
measures the rise of resident memory over one more step. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from .memory import ResidentPeak, release_freed_memory
from .registry import load_cases
from .workload import as_tuple, at_dtype, make_step, master_inputs, upstream_gradients


def measure(case_name: str, provider_name: str, dtype: torch.dtype) -> dict:
    case = load_cases()[case_name]
    provider = next(p for p in case.providers if p.name == provider_name)
    device = torch.device("cpu")
    masters = master_inputs(case, device)
    inputs = at_dtype(masters, dtype, case.grad_names)
    del masters
    fn = provider.build(case)
    upstream = [g.to(dtype) for g in upstream_gradients(case, as_tuple(fn(**inputs)))]
    step = make_step(fn, inputs, case.grad_names, upstream, case.memory_mode)
    step()
    release_freed_memory()
    tracker = ResidentPeak()
    baseline = tracker.reset()
    result = step()
    peak = tracker.peak()
    del result
    return dict(
        peak_bytes=peak,
        baseline_bytes=baseline,
        peak_delta_bytes=peak - baseline,
        method=f"subprocess RSS ({tracker.method}), rise over one {case.memory_mode} step after a warm-up one",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True)
    parser.add_argument("--provider", required=True)
    parser.add_argument("--dtype", required=True, help="torch dtype name, e.g. float32")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.case, args.provider, getattr(torch, args.dtype))))


if __name__ == "__main__":
    main()
