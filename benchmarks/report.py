"""A run as JSON (everything), Markdown (tables and target verdicts) and a concise stdout table."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .records import ConfigResult, ProviderResult, Run
from .registry import MODES


# --------------------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    """JSON has no Infinity/NaN: non-finite floats become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def mib(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def _num(value: float) -> str:
    """Three significant digits without exponents for the usual ranges (1450, 12.3, 0.0421)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _ms(result: ProviderResult | None, mode: str) -> str:
    if result is None:
        return "—"
    if result.alias_of:
        return f"= {result.alias_of}"
    if result.skipped:
        return "skipped"
    t = result.times.get(mode)
    if t is None:
        return "failed" if mode in result.time_errors else "—"
    flag = " ✗gate" if result.gate.ok is False else ""
    return f"{_num(t.median_ms)} [{_num(t.p20_ms)}–{_num(t.p80_ms)}]{flag}"


def _speedup(config: ConfigResult, key: str, mode: str) -> str:
    value = config.speedups.get(key, {}).get(mode)
    return "—" if value is None else f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"


def _bandwidth(config: ConfigResult, mode: str) -> str:
    ours = config.providers.get("ours")
    if ours is None or mode not in ours.gbps:
        return "—"
    return f"{_num(ours.gbps[mode])} ({100 * ours.copy_fraction[mode]:.2g}%)"


def _tflops(config: ConfigResult, mode: str) -> str:
    ours = config.providers.get("ours")
    return f"{ours.tflops[mode]:.3g}" if ours is not None and mode in ours.tflops else "—"


def _label(config: ConfigResult) -> str:
    return config.case.split("/", 1)[1]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _providers(configs: Sequence[ConfigResult]) -> list[str]:
    return list(dict.fromkeys(name for c in configs for name in c.providers))


def _speedup_keys(configs: Sequence[ConfigResult]) -> list[str]:
    return list(dict.fromkeys(key for c in configs for key in c.speedups))


def _by_op(run: Run) -> dict[str, list[ConfigResult]]:
    ops: dict[str, list[ConfigResult]] = {}
    for config in run.configs:
        ops.setdefault(config.op, []).append(config)
    return ops


# --------------------------------------------------------------------------------------------------
# tables shared by Markdown and stdout
# --------------------------------------------------------------------------------------------------
def time_rows(configs: Sequence[ConfigResult]) -> tuple[list[str], list[list[str]]]:
    providers, keys = _providers(configs), _speedup_keys(configs)
    header = (
        ["case", "dtype", "mode"]
        + [f"{p} ms" for p in providers]
        + ["ours GB/s (% copy)", "ours TFLOP/s"]
        + [f"× {k}" for k in keys]
    )
    rows = []
    for c in configs:
        if c.error:
            rows.append([_label(c), c.dtype, "—", c.error] + [""] * (len(header) - 4))
            continue
        for mode in MODES:
            rows.append(
                [_label(c), c.dtype, mode]
                + [_ms(c.providers.get(p), mode) for p in providers]
                + [_bandwidth(c, mode), _tflops(c, mode)]
                + [_speedup(c, k, mode) for k in keys]
            )
    return header, rows


def memory_rows(configs: Sequence[ConfigResult]) -> tuple[list[str], list[list[str]]]:
    header = [
        "case",
        "dtype",
        "implementation",
        "saved for backward",
        "of which beyond inputs",
        "peak rise (step)",
        "peak (step)",
        "inputs",
    ]
    rows = []
    for c in configs:
        for name, r in c.providers.items():
            if r.skipped:
                continue
            m = r.memory
            shown = name if r.alias_of is None else f"{name} (= {r.alias_of})"
            rows.append(
                [
                    _label(c),
                    c.dtype,
                    shown,
                    mib(m.saved_bytes),
                    mib(m.saved_beyond_inputs_bytes),
                    mib(m.peak_delta_bytes),
                    mib(m.peak_bytes),
                    mib(c.input_bytes),
                ]
            )
    return header, rows


def gate_rows(configs: Sequence[ConfigResult]) -> tuple[list[str], list[list[str]]]:
    header = ["case", "dtype", "implementation", "gate", "worst check (error / bound)"]
    rows = []
    for c in configs:
        for name, r in c.providers.items():
            if r.alias_of:
                continue
            worst = max(r.gate.checks, key=lambda k: k.max_error / k.bound if k.bound else math.inf, default=None)
            note = " " + worst.detail if worst and worst.detail else ""
            detail = f"{worst.name}: {worst.max_error:.2e} / {worst.bound:.2e}{note}" if worst else "—"
            rows.append([_label(c), c.dtype, name, _gate_verdict(r), detail])
    return header, rows


def _gate_verdict(result: ProviderResult) -> str:
    if result.gate.error:
        return f"FAIL (raised {result.gate.error})"
    if result.skipped:
        return "not run"
    return {True: "pass", False: "FAIL", None: "not gated"}[result.gate.ok]


def _failures(run: Run) -> list[str]:
    lines = []
    for c in run.configs:
        if c.error:
            lines.append(f"- {c.case} {c.dtype}: {c.error}")
        for name, r in c.providers.items():
            if r.alias_of:
                continue
            if r.skipped:
                lines.append(f"- {c.case} {c.dtype} {name}: skipped — {r.skipped}")
            lines += [f"- {c.case} {c.dtype} {name} {mode}: {why}" for mode, why in r.time_errors.items()]
            lines += [f"- {c.case} {c.dtype} {name} memory: {why}" for why in r.memory.errors]
    return lines


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------
def write_json(run: Run, path: Path) -> None:
    path.write_text(json.dumps(_json_safe(dataclasses.asdict(run)), indent=1) + "\n")


def _identities(configs: Sequence[ConfigResult]) -> str:
    seen = {}
    for c in configs:
        for name, r in c.providers.items():
            if r.identity:
                seen.setdefault(name, set()).add(r.identity)
    return ", ".join(f"{name} → {'/'.join(sorted(ids))}" for name, ids in seen.items())


def _load_warning(machine: dict[str, Any]) -> list[str]:
    """CPU times from a machine busy with other work are inflated and noisy; say so next to them."""
    loads = [la[0] for la in (machine.get("load_average_at_start"), machine.get("load_average_at_end")) if la]
    if machine["device"] != "cpu" or not loads or max(loads) <= machine["cpu_count"]:
        return []
    return [
        "",
        f"> **Warning:** the machine was shared during this run (1-minute load average "
        f"{' → '.join(f'{x:.1f}' for x in loads)} on {machine['cpu_count']} CPUs). CPU times are inflated and "
        "noisy, and ratios between implementations timed minutes apart are unreliable; memory numbers and "
        "correctness gates are unaffected.",
    ]


def markdown(run: Run, plots: dict[str, str]) -> str:
    m, copy = run.machine, run.copy_bandwidth
    n = m["torch_threads"]
    threads = f" ({n} torch thread{'s' if n != 1 else ''}, {m['cpu_count']} CPUs)" if m["device"] == "cpu" else ""
    commit = (
        (m.get("git_commit") or "unknown")[:12]
        + (" + uncommitted changes" if m.get("git_dirty") else "")
        + f" (e2pa_kernels sources sha256 {m.get('e2pa_kernels_sha256')})"
    )
    lines = [f"# e2pa benchmarks — {run.suite} suite on {m['device_name']}", ""]
    lines += markdown_table(
        ["", ""],
        [
            ["device", f"{m['device']}: {m['device_name']}{threads}"],
            ["host CPU", m["cpu_model"]],
            [
                "versions",
                f"torch {m['torch']}, triton {m['triton']}, python {m['python']}"
                + (f", CUDA {m['cuda']}, driver {m.get('driver')}" if m.get("cuda") else ""),
            ],
            ["commit", commit],
            ["date (UTC)", m["date_utc"]],
            ["command", f"`{m['command']}`"],
            ["environment", ", ".join(f"{k}={v}" for k, v in m["env"].items()) or "—"],
            [
                "load average (1/5/15 min)",
                f"start {m.get('load_average_at_start')}, end {m.get('load_average_at_end')}",
            ],
            ["wall time", f"{m.get('wall_seconds', 0):.0f} s"],
            [
                "copy bandwidth",
                f"{copy['gbps']:.1f} GB/s (p20–p80 {copy['p20_gbps']:.1f}–{copy['p80_gbps']:.1f}; "
                f"{mib(copy['bytes_each_way'])} copied, read + write counted; measured in this run)",
            ],
        ],
    )
    lines += _load_warning(m)
    memory_source = (
        "CUDA allocator"
        if m["device"] != "cpu"
        else "resident memory of a subprocess running that implementation alone"
    )
    lines += [
        "",
        "**How to read.** Times: median [p20–p80] ms per call "
        f"({'triton.testing.do_bench, L2 flushed' if m['device'] != 'cpu' else 'wall clock after warm-up'}). "
        "`fwd`: forward with autograd recording; `bwd`: backward alone on a retained graph; `fwd+bwd`: both. "
        "GB/s: the byte model (every input read once, every output written once; see "
        "`benchmarks/cost_models.py`) over the median time; % of the copy bandwidth above. "
        "TFLOP/s: useful dot-product FLOPs (backward = 2× forward). "
        "× a/b: b's median time over a's, shown only when both passed the correctness gate. "
        "✗gate: the implementation failed the gate; its time is shown but enters no speedup or target. "
        f"Implementations: {_identities(run.configs)}. "
        "Memory: saved for backward = unique storages the forward saves; peak rise = peak during one step "
        "(fwd+bwd for ops) minus memory before it (inputs and upstream gradients already allocated; "
        "the step's own outputs, input gradients included, count); "
        f"{memory_source}.",
        "",
        "## Targets (issue #7)",
        "",
        "Rows marked *tracked* apply the issue's CPU target to each op alone; the issue states it for "
        "the level-0 EHF step (the EHF rows).",
        "",
    ]
    lines += markdown_table(
        ["target", "op", "verdict", "per configuration"],
        [[v.target, v.op, f"**{v.verdict}**", v.detail] for v in run.targets],
    )
    for op, configs in _by_op(run).items():
        lines += ["", f"## {op}", ""]
        if op in plots:
            lines += [f"![{op}]({plots[op]})", ""]
        lines += ["### Time", ""] + markdown_table(*time_rows(configs))
        lines += ["", "### Memory", ""] + markdown_table(*memory_rows(configs))
        lines += ["", "### Correctness gate (against the float64 reference)", ""] + markdown_table(*gate_rows(configs))
    failures = _failures(run)
    lines += ["", "## Failures and skips", ""] + (failures or ["None."])
    return "\n".join(lines) + "\n"


def stdout_summary(run: Run) -> str:
    m = run.machine
    lines = [
        f"e2pa benchmarks, {run.suite} suite: {m['device']} {m['device_name']} | torch {m['torch']} "
        f"triton {m['triton']} | copy {run.copy_bandwidth['gbps']:.1f} GB/s"
    ]
    for op, configs in _by_op(run).items():
        header, rows = time_rows(configs)
        keep = [i for i, h in enumerate(header) if h != "ours TFLOP/s"]
        lines += ["", f"{op}: time"] + text_table([header[i] for i in keep], ([r[i] for i in keep] for r in rows))
        lines += ["", f"{op}: memory"] + text_table(*memory_rows(configs))
    lines += ["", "targets"] + text_table(
        ["target", "op", "verdict"], ([v.target, v.op, v.verdict] for v in run.targets)
    )
    failures = _failures(run)
    if failures:
        lines += ["", "failures and skips"] + failures
    return "\n".join(lines)
