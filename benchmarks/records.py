"""What one run measures, as plain dataclasses (serialised to JSON with :func:`dataclasses.asdict`)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


@dataclasses.dataclass
class Check:
    """One output or gradient against the float64 reference (rule: benchmarks.correctness)."""

    name: str
    max_error: float
    bound: float
    ok: bool
    detail: str = ""


@dataclasses.dataclass
class Gate:
    """ok: True/False, or None for an ungated provider; error: the provider raised instead."""

    ok: bool | None
    checks: list[Check] = dataclasses.field(default_factory=list)
    error: str | None = None


@dataclasses.dataclass
class Memory:
    saved_bytes: int | None = None  # unique storages saved for backward by the forward
    saved_beyond_inputs_bytes: int | None = None  # ... of which not an input's storage
    peak_bytes: int | None = None  # CUDA: max_memory_allocated; CPU: peak RSS of the worker process
    peak_delta_bytes: int | None = None  # peak minus what was allocated/resident before the step
    method: str = ""
    errors: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ProviderResult:
    name: str
    identity: str = ""
    alias_of: str | None = None  # measured once under this provider's name (same identity)
    gate: Gate = dataclasses.field(default_factory=lambda: Gate(ok=None))
    skipped: str | None = None  # why nothing was timed
    times: dict[str, Timing] = dataclasses.field(default_factory=dict)
    time_errors: dict[str, str] = dataclasses.field(default_factory=dict)
    gbps: dict[str, float] = dataclasses.field(default_factory=dict)
    copy_fraction: dict[str, float] = dataclasses.field(default_factory=dict)
    tflops: dict[str, float] = dataclasses.field(default_factory=dict)
    memory: Memory = dataclasses.field(default_factory=Memory)

    @property
    def verified(self) -> bool:
        """May this provider's numbers enter a speedup or a target? (gate passed, or not gated)"""
        return self.skipped is None and self.gate.error is None and self.gate.ok is not False


@dataclasses.dataclass
class ConfigResult:
    """One case at one dtype on one device."""

    case: str
    op: str
    kind: str
    params: dict[str, Any]
    dtype: str
    device: str
    input_bytes: int = 0
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    flops: dict[str, float] | None = None
    providers: dict[str, ProviderResult] = dataclasses.field(default_factory=dict)
    speedups: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # "a/b" -> mode -> b/a time
    error: str | None = None  # the configuration could not run at all (inputs or truth failed)


@dataclasses.dataclass
class Verdict:
    target: str
    op: str
    verdict: str  # "pass", "fail", "not evaluated", "n/a"
    detail: str


@dataclasses.dataclass
class Run:
    suite: str
    machine: dict[str, Any]
    copy_bandwidth: dict[str, Any]
    configs: list[ConfigResult]
    targets: list[Verdict] = dataclasses.field(default_factory=list)
