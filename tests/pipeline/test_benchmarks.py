"""The benchmark harness itself: its correctness gate rejects a wrong implementation (so no speedup
is ever reported for one), layer and model cases are gated on every gradient, weights included, and
the largest-patch search stops at the first patch over the budget. Timings are never asserted."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import e2pa_kernels
from benchmarks import max_patch, memory, targets
from benchmarks.cases.models import TrainingStep, weight_seed
from benchmarks.correctness import evaluate, judge, references
from benchmarks.providers import backend
from benchmarks.registry import Case, Provider, load_cases
from benchmarks.runner import run_config
from benchmarks.workload import at_dtype, make_step, master_inputs, trainable


def _free_energy_case(providers) -> Case:
    def make_inputs(device, gen):
        return dict(
            x=torch.randn(1, 3, 7, 5, 6, 5, generator=gen, device=device),
            weight=torch.randn(4, 7, generator=gen, device=device) / 3,
            bias=torch.randn(4, generator=gen, device=device),
            temperature=1.0,
        )

    return Case(
        name="test/free_energy",
        op="free_energy",
        kind="op",
        params={},
        make_inputs=make_inputs,
        call=e2pa_kernels.free_energy,
        reference=e2pa_kernels.reference.free_energy,
        providers=providers,
        grad_names=("x", "weight", "bias"),
        output_names=("energy",),
        plans={"cpu": {"quick": (torch.float32,)}},
        baselines=("reference",),
    )


def _one_percent_off() -> Provider:
    def build(case):
        return lambda **inputs: 1.01 * e2pa_kernels.free_energy(**inputs)

    return Provider(name="wrong", build=build, identity=lambda case, inputs: "wrong")


def test_gate_rejects_a_wrong_implementation_and_it_enters_no_speedup_or_target(monkeypatch):
    # the CPU peak runs each implementation in a subprocess that only knows registered cases
    monkeypatch.setattr(
        memory, "cpu_peak_in_subprocess", lambda *args: dict(peak_bytes=1, peak_delta_bytes=1, method="stub")
    )
    case = _free_energy_case((backend("ours", "torch"), backend("reference", "reference"), _one_percent_off()))
    config = run_config(case, torch.float32, torch.device("cpu"), copy_gbps=10.0)

    assert config.providers["ours"].gate.ok is True
    wrong = config.providers["wrong"]
    assert wrong.gate.ok is False and not wrong.verified
    assert {c.name for c in wrong.gate.checks if not c.ok} == {"energy", "dx", "dweight", "dbias"}
    assert "ours/reference" in config.speedups and "wrong/reference" not in config.speedups

    as_ours = dataclasses.replace(config, providers={"ours": wrong, "reference": config.providers["reference"]})
    slower = targets.Target("t", targets._time_ratio("ours", "reference"), 0.0)
    assert targets._verdict(slower, "free_energy", [as_ours]).verdict == "fail"
    assert targets._verdict(slower, "free_energy", [config]).verdict == "pass"


@pytest.mark.parametrize("name", ["EHF/level1-16^3-C32", "ESA/learned-16^3-C64-r8"])
def test_layer_cases_gate_every_gradient_parameters_included(name):
    case = load_cases()[name]
    masters = master_inputs(case, torch.device("cpu"))
    truth, same, upstream = references(case, masters, torch.float32)
    ours = backend("ours", "torch").build(case)
    gate = judge(
        evaluate(ours, at_dtype(masters, torch.float32, case.grad_names), case.grad_names, upstream),
        truth,
        same,
        torch.float32,
        case.output_names,
    )
    assert gate.ok, [c for c in gate.checks if not c.ok]
    parameters = [n for n in case.grad_names if n not in ("x", "fused", "previous")]  # head.weight, basis_weight…
    assert parameters and {f"d{n}" for n in parameters} <= {c.name for c in gate.checks}


@pytest.mark.parametrize("model", ["e2pa", "e2pa-checkpointed"])
def test_model_step_differentiates_every_weight_and_its_gate_can_fail(model):
    case = load_cases()["E2PANet/step-16^3"]
    masters = master_inputs(case, torch.device("cpu"))
    truth, same, upstream = references(case, masters, torch.float32)
    inputs = at_dtype(masters, torch.float32, case.grad_names)

    ours = TrainingStep(model, "torch", weight_seed(case.name))
    gate = judge(evaluate(ours, inputs, case.grad_names, upstream), truth, same, torch.float32, case.output_names)
    assert gate.ok, [c for c in gate.checks if not c.ok]
    weights = trainable(ours)
    assert len(weights) == sum(1 for _ in ours.model.parameters()) > 20
    assert {f"d{n}" for n in weights} <= {c.name for c in gate.checks}

    grads = make_step(ours, inputs, case.grad_names, [g.float() for g in upstream], "fwd+bwd")()
    assert len(grads) == len(weights) and all(g is not None and torch.isfinite(g).all() for g in grads)

    other_weights = TrainingStep(model, "torch", weight_seed(case.name) + 1)
    gate = judge(
        evaluate(other_weights, inputs, case.grad_names, upstream), truth, same, torch.float32, case.output_names
    )
    assert gate.ok is False


def test_max_patch_search_stops_at_the_first_patch_over_budget(monkeypatch):
    needs = {16: 100, 32: 800, 48: 2700, 64: 6400}
    calls = []

    def fake(case_name, provider, device):
        edge = int(case_name.split("-")[1].split("^")[0])
        calls.append((provider, edge))
        return needs[edge] * (2 if provider == "reference" else 1), ""

    monkeypatch.setattr(max_patch, "_step_bytes", fake)
    results = max_patch.search(3000, torch.device("cpu"))
    assert set(results) == set(max_patch.PROVIDERS)
    assert results["ours"]["largest_edge"] == 48
    assert results["reference"]["largest_edge"] == 32
    assert ("ours", 64) in calls and ("ours", 80) not in calls and ("reference", 64) not in calls
