"""``python -m benchmarks``: run a suite of registered cases and write the results.

    python -m benchmarks                     quick suite on CUDA if present, else CPU
    python -m benchmarks --full              the sweep
    python -m benchmarks --ops free_energy --device cpu --out /tmp/bench
    python -m benchmarks --cases 'C32-' --list
    python -m benchmarks --max-patch 2      the largest training patch per model within 2 GiB
    python -m benchmarks --traffic          only the traffic meter (bytes moved / minimum, per op and EHF level)

A suite run ends with the traffic meter's table (``benchmarks/traffic.py``; counted in Triton's
interpreter, in a subprocess with TRITON_INTERPRET=1; ``--no-traffic`` skips it).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

import torch

from . import registry, report, targets
from .machine import describe, device_tag, load_average
from .plots import plot_op
from .records import Run
from .runner import run_config
from .timing import copy_bandwidth

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="e2pa op benchmarks (issue #7).")
    parser.add_argument("--full", action="store_true", help="run the full sweep instead of the quick suite")
    parser.add_argument("--ops", help="comma-separated ops (default: every registered one)")
    parser.add_argument("--cases", help="only cases whose name matches this regular expression")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N (default: cuda when available)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results root (default: benchmarks/results)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU: torch intra-op threads (default: torch's choice). On a shared, oversubscribed "
        "machine 1 avoids OpenMP threads waiting for each other",
    )
    parser.add_argument(
        "--skip-providers",
        metavar="NAMES",
        help="comma-separated implementations to leave out, e.g. 'compile' where torch.compile's "
        "compile time does not fit a time budget (their speedups and targets are then absent)",
    )
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.add_argument(
        "--traffic",
        action="store_true",
        help="only the traffic meter: global-memory bytes of each Triton path over its minimum",
    )
    parser.add_argument("--no-traffic", action="store_true", help="skip the traffic meter after a suite run")
    parser.add_argument(
        "--max-patch",
        type=float,
        metavar="GIB",
        help="instead of a suite: the largest cubic training patch each model fits in GIB GiB",
    )
    return parser.parse_args(argv)


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def select_cases(args: argparse.Namespace, device: torch.device, suite: str) -> list[registry.Case]:
    known = sorted({c.op for c in registry.load_cases().values()})
    ops = args.ops.split(",") if args.ops else None
    unknown = sorted(set(ops or ()) - set(known))
    if unknown:
        raise SystemExit(f"--ops: unknown {', '.join(unknown)}; registered: {', '.join(known)}")
    cases = registry.select(device.type, suite, ops)
    if args.cases:
        cases = [c for c in cases if re.search(args.cases, c.name)]
    if args.skip_providers:
        skip = set(args.skip_providers.split(","))
        names = {p.name for c in registry.load_cases().values() for p in c.providers}
        if skip - names:
            raise SystemExit(
                f"--skip-providers: unknown {', '.join(sorted(skip - names))}; registered: {', '.join(sorted(names))}"
            )
        cases = [dataclasses.replace(c, providers=tuple(p for p in c.providers if p.name not in skip)) for c in cases]
    return cases


def _stem(args: argparse.Namespace, suite: str) -> str:
    """Results file stem: the suite, plus the filters of a partial run (so it never overwrites a whole one)."""
    filters = "-".join(
        ([args.ops] if args.ops else [])
        + ([args.cases] if args.cases else [])
        + ([f"without-{args.skip_providers}"] if args.skip_providers else [])
    )
    slug = re.sub(r"[^A-Za-z0-9]+", "-", filters).strip("-")
    return f"{suite}-{slug}" if slug else suite


def _run(cases: list[registry.Case], device: torch.device, suite: str) -> Run:
    started = time.monotonic()
    machine = describe(device)
    if device.type == "cuda" and machine["env"].get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("warning: TRITON_INTERPRET is set, so 'ours' cannot use the Triton kernels on CUDA", file=sys.stderr)
    copy = copy_bandwidth(device)
    print(
        f"{suite} suite, {len(cases)} cases on {device} ({machine['device_name']}); "
        f"copy bandwidth {copy['gbps']:.1f} GB/s",
        file=sys.stderr,
    )
    configs = [
        run_config(case, dtype, device, copy["gbps"]) for case in cases for dtype in case.dtypes(device.type, suite)
    ]
    machine["wall_seconds"] = round(time.monotonic() - started, 1)
    machine["load_average_at_end"] = load_average()
    return Run(
        suite=suite,
        machine=machine,
        copy_bandwidth=copy,
        configs=configs,
        targets=targets.evaluate(configs, device.type),
    )


def _write(run: Run, folder: Path, stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    plots = {}
    for op in dict.fromkeys(c.op for c in run.configs):
        plots[op] = f"{stem}-{op}.png"
        plot_op(op, [c for c in run.configs if c.op == op], run, folder / plots[op])
    report.write_json(run, folder / f"{stem}.json")
    (folder / f"{stem}.md").write_text(report.markdown(run, plots))
    print(report.stdout_summary(run))
    print(
        f"\nwrote {folder}/{stem}.json, {stem}.md and {len(plots)} plot(s); "
        f"the run took {run.machine['wall_seconds']:.0f} s"
    )


def _traffic(out: Path, full: bool) -> int:
    """Run the traffic meter in the interpreter (a subprocess: the flag must precede the kernels' import),
    print its table and write it to ``out/traffic.md``."""
    import os
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "benchmarks.traffic"] + ([] if full else ["--dtypes", "float32"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"traffic meter failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return proc.returncode
    out.mkdir(parents=True, exist_ok=True)
    (out / "traffic.md").write_text(proc.stdout)
    print("\nTraffic (global-memory bytes / minimum; Triton interpreter, GPU tiles):\n" + proc.stdout)
    print(f"wrote {out}/traffic.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suite = "full" if args.full else "quick"
    if args.traffic:
        return _traffic(args.out / "traffic", args.full)
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_patch is not None:
        from .max_patch import main as max_patch

        return max_patch(args.max_patch, device, args.out)
    cases = select_cases(args, device, suite)
    if args.list or not cases:
        for case in cases:
            dtypes = ", ".join(str(d).replace("torch.", "") for d in case.dtypes(device.type, suite))
            print(f"{case.name}  [{dtypes}]")
        if not cases:
            print(f"no {suite} cases for {device.type} match the filters", file=sys.stderr)
        return 0 if cases else 1
    run = _run(cases, device, suite)
    _write(run, args.out / device_tag(run.machine), _stem(args, suite))
    return 0 if args.no_traffic else _traffic(args.out / "traffic", args.full)
