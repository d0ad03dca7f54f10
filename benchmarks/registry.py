"""The one place that declares what can be benchmarked.

A *case* is one computation at one size (an op, a layer, a training step) with everything the
harness needs to run it: how to build its inputs, the float64 truth to gate correctness against,
the implementations (*providers*) to time, and its byte/FLOP models. Case modules live in
``benchmarks/cases/``; each calls :func:`register` at import, and :func:`load_cases` imports every
module in that package, so a new family of cases (layer-level EHF/ESA, model-level training steps)
is a new file there and needs no change to the harness.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
SUITES = ("quick", "full", "small")  # "small": the pytest-benchmark suite (benchmarks/test_cpu_paths.py)

Inputs = Mapping[str, Any]
# (inputs, outputs, grad_names) -> bytes per mode; see benchmarks.cost_models.io_bytes
ByteModel = Callable[[Inputs, Sequence[torch.Tensor], Sequence[str]], dict[str, int]]
FlopModel = Callable[[Mapping[str, Any]], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Provider:
    """One implementation of a case's computation.

    ``build(case)`` returns a callable taking the case's inputs as keyword arguments; it is called
    once per (case, dtype), so it may compile. ``identity(case, inputs)`` names the code that will
    actually run: providers of one case with equal identities are measured once and the others are
    reported as aliases (on CPU, "ours" resolves to the torch path). ``gated`` providers compute the
    case's function and are compared with the float64 reference before anything is timed; an
    ungated one (another model, say) is timed without a correctness claim.
    """

    name: str
    build: Callable[[Case], Callable[..., Any]]
    identity: Callable[[Case, Inputs], str]
    devices: tuple[str, ...] = ("cpu", "cuda")
    gated: bool = True


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration (dtypes aside).

    ``make_inputs(device, generator)`` returns the inputs with float tensors in float32 (the harness
    casts them per dtype and upcasts them to float64 for the truth). ``reference`` is the
    plain-autograd oracle (truth, eager baseline, and what torch.compile compiles); ``call`` the
    public entry point that backend providers run. ``plans`` maps device type -> suite -> dtypes: a
    case runs only where it has a plan. Speedups are reported for every provider against each of
    ``baselines``; without a byte model there is no GB/s, without a FLOP model no TFLOP/s.
    """

    name: str
    op: str
    kind: str  # "op", "layer" or "model": what the result tables and targets group by
    params: Mapping[str, Any]
    make_inputs: Callable[[torch.device, torch.Generator], dict[str, Any]]
    reference: Callable[..., Any]
    providers: tuple[Provider, ...]
    grad_names: tuple[str, ...]
    output_names: tuple[str, ...]
    plans: Mapping[str, Mapping[str, tuple[torch.dtype, ...]]]
    call: Callable[..., Any] | None = None
    byte_model: ByteModel | None = None
    flop_model: FlopModel | None = None
    baselines: tuple[str, ...] = ("reference", "compile")
    modes: tuple[str, ...] = MODES
    memory_mode: str = "fwd+bwd"  # the step whose peak memory is measured

    def dtypes(self, device_type: str, suite: str) -> tuple[torch.dtype, ...]:
        return tuple(self.plans.get(device_type, {}).get(suite, ()))

    def providers_for(self, device_type: str) -> tuple[Provider, ...]:
        return tuple(p for p in self.providers if device_type in p.devices)


_CASES: dict[str, Case] = {}


def register(case: Case) -> Case:
    if case.name in _CASES:
        raise ValueError(f"benchmark case {case.name!r} is registered twice")
    unknown = {s for plan in case.plans.values() for s in plan} - set(SUITES)
    if unknown:
        raise ValueError(f"benchmark case {case.name!r}: unknown suite(s) {sorted(unknown)}")
    _CASES[case.name] = case
    return case


def load_cases() -> dict[str, Case]:
    """Every registered case, by name (imports each module of ``benchmarks.cases`` once)."""
    package = importlib.import_module(f"{__package__}.cases")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return dict(_CASES)


def select(device_type: str, suite: str, ops: Sequence[str] | None = None) -> list[Case]:
    """Cases with a plan for ``device_type`` and ``suite``, optionally only those of ``ops``."""
    return [c for c in load_cases().values() if c.dtypes(device_type, suite) and (ops is None or c.op in ops)]
