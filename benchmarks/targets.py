"""Issue #7's targets, checked on the op-level results of one run (all ratios from the same run).

A target holds for an op when it holds in every configuration (case × dtype) of that op. A
configuration where the implementation under test failed the correctness gate fails the target; one
where a baseline is missing or wrong (compile unavailable, out of memory) is "not evaluated".
Another family's targets are entries with their own ``kind`` (and ``cases`` to narrow them: the
layer target is about the level-0 EHF step only).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

from .records import ConfigResult, Verdict


@dataclasses.dataclass(frozen=True)
class Value:
    """The measured quantity of one configuration, or why there is none (``failed``: because the
    implementation under test failed its correctness gate, which fails the target)."""

    value: float | None
    why: str = ""
    failed: bool = False


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    value: Callable[[ConfigResult], Value]
    threshold: float
    strict: bool = False  # value > threshold instead of >=
    kind: str = "op"
    devices: tuple[str, ...] = ("cpu", "cuda")
    unit: str = "×"
    cases: str = ""  # only configurations whose case name matches this regular expression ("" = all)

    def passes(self, value: float) -> bool:
        return value > self.threshold if self.strict else value >= self.threshold

    def show(self, value: float) -> str:
        if self.unit == "%":
            return f"{100 * value:.0f}%"
        return "∞" if math.isinf(value) else f"{value:.2f}×"


def _unusable(config: ConfigResult, candidate: str, *baselines: str) -> Value | None:
    """Why the numbers of the candidate or its baselines cannot be used (None when they can)."""
    for name in (candidate, *baselines):
        result = config.providers.get(name)
        if result is None:
            return Value(None, f"{name} not run")
        if result.gate.ok is False:
            return Value(None, f"{name} failed the correctness gate", failed=name == candidate)
        if result.skipped:
            return Value(None, f"{name} skipped ({result.skipped})")
    return None


def _copy_fraction(mode: str) -> Callable[[ConfigResult], Value]:
    def value(config: ConfigResult) -> Value:
        unusable = _unusable(config, "ours")
        if unusable:
            return unusable
        fraction = config.providers["ours"].copy_fraction.get(mode)
        return Value(fraction) if fraction is not None else Value(None, f"ours {mode} not timed")

    return value


def _time_ratio(candidate: str, baseline: str, mode: str = "fwd+bwd") -> Callable[[ConfigResult], Value]:
    """baseline time / candidate time (> 1: candidate faster)."""

    def value(config: ConfigResult) -> Value:
        unusable = _unusable(config, candidate, baseline)
        if unusable:
            return unusable
        a, b = config.providers[candidate].times.get(mode), config.providers[baseline].times.get(mode)
        return Value(b.median_ms / a.median_ms) if a and b else Value(None, f"{mode} not timed")

    return value


def _memory_ratio(candidate: str, field: str) -> Callable[[ConfigResult], Value]:
    """reference bytes / candidate bytes of a Memory field (∞ when the candidate needs none)."""

    def value(config: ConfigResult) -> Value:
        unusable = _unusable(config, candidate, "reference")
        if unusable:
            return unusable
        ours = getattr(config.providers[candidate].memory, field)
        ref = getattr(config.providers["reference"].memory, field)
        if ours is None or ref is None:
            return Value(None, f"{field} not measured")
        if ours <= 0:
            return Value(math.inf if ref > 0 else 1.0)
        return Value(ref / ours)

    return value


TARGETS = (
    Target("GPU forward ≥ 80% of measured copy bandwidth", _copy_fraction("fwd"), 0.80, devices=("cuda",), unit="%"),
    Target("GPU backward ≥ 50% of measured copy bandwidth", _copy_fraction("bwd"), 0.50, devices=("cuda",), unit="%"),
    Target("faster than torch.compile(reference), fwd+bwd", _time_ratio("ours", "compile"), 1.0, strict=True),
    Target(
        "saved for backward ≥ 4× below reference (bytes beyond the inputs)",
        _memory_ratio("ours", "saved_beyond_inputs_bytes"),
        4.0,
    ),
    Target(
        "saved for backward ≥ 4× below reference (all saved bytes, inputs included)",
        _memory_ratio("ours", "saved_bytes"),
        4.0,
    ),
    # The issue states its CPU target for the level-0 EHF step (below); these apply it to each op alone,
    # tracked but not the issue's: an op's own x-sized input gradient can exceed a third of the
    # reference's peak (free_energy: dx = x), so the memory row cannot pass for every op by construction.
    Target(
        "tracked (beyond the issue): CPU memory-lean op peak memory ≥ 3× below reference (fwd+bwd)",
        _memory_ratio("torch", "peak_delta_bytes"),
        3.0,
        devices=("cpu",),
    ),
    Target(
        "tracked (beyond the issue): CPU memory-lean op not slower than reference (fwd+bwd)",
        _time_ratio("torch", "reference"),
        1.0,
        devices=("cpu",),
    ),
    Target(
        "CPU: level-0 EHF step peak memory ≥ 3× below reference (memory-lean path)",
        _memory_ratio("torch", "peak_delta_bytes"),
        3.0,
        kind="layer",
        devices=("cpu",),
        cases=r"^EHF/level0-",
    ),
    Target(
        "CPU: level-0 EHF step not slower than reference (memory-lean path)",
        _time_ratio("torch", "reference"),
        1.0,
        kind="layer",
        devices=("cpu",),
        cases=r"^EHF/level0-",
    ),
)


def evaluate(configs: list[ConfigResult], device_type: str) -> list[Verdict]:
    verdicts = []
    for target in TARGETS:
        relevant = [c for c in configs if c.kind == target.kind and re.search(target.cases, c.case)]
        for op in dict.fromkeys(c.op for c in relevant):
            if device_type not in target.devices:
                verdicts.append(
                    Verdict(target.name, op, "n/a", f"{'/'.join(target.devices)} target; this run: {device_type}")
                )
                continue
            verdicts.append(_verdict(target, op, [c for c in relevant if c.op == op]))
    return verdicts


def _verdict(target: Target, op: str, configs: list[ConfigResult]) -> Verdict:
    measured, failed, gate_failures, missing = [], [], [], []
    for config in configs:
        label = f"{config.case.split('/', 1)[1]} {config.dtype}"
        v = target.value(config) if config.error is None else Value(None, config.error)
        if v.value is not None:
            measured.append(f"{label}: {target.show(v.value)}")
            if not target.passes(v.value):
                failed.append(label)
        elif v.failed:
            failed.append(label)
            gate_failures.append(f"{label}: {v.why}")
        else:
            missing.append(f"{label}: {v.why}")
    detail = " | ".join(
        part
        for part in (
            "; ".join(measured),
            "; ".join(gate_failures),
            f"not evaluated: {'; '.join(missing)}" if missing else "",
        )
        if part
    )
    if failed:
        verdict = "fail"
    elif not measured:
        verdict = "not evaluated"
    elif missing:
        verdict = "incomplete"
    else:
        verdict = "pass"
    return Verdict(target.name, op, verdict, detail)
