"""pytest-benchmark suites for the CPU paths: the memory-lean torch path against the eager reference,
one training step (fwd+bwd) of each op at the registry's ``small`` CPU size.

``make bench-cpu`` runs them (``pytest -q benchmarks/test_cpu_paths.py --benchmark-only``); ``make
test`` does not collect them (pytest's testpaths is ``tests/``). Each benchmark is timed only after
its implementation passes the correctness gate on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.correctness import evaluate, judge, references
from benchmarks.registry import select
from benchmarks.workload import at_dtype, make_step, master_inputs

DEVICE = torch.device("cpu")
PROVIDERS = ("torch", "reference")
CONFIGS = [(case, dtype) for case in select("cpu", "small") for dtype in case.dtypes("cpu", "small")]


@pytest.mark.parametrize("provider_name", PROVIDERS)
@pytest.mark.parametrize("case,dtype", CONFIGS, ids=[f"{c.name}-{str(d).replace('torch.', '')}" for c, d in CONFIGS])
def test_fwd_bwd(benchmark, case, dtype, provider_name):
    provider = next(p for p in case.providers if p.name == provider_name)
    fn = provider.build(case)
    masters = master_inputs(case, DEVICE)
    truth, same, upstream = references(case, masters, dtype)
    inputs = at_dtype(masters, dtype, case.grad_names)
    gate = judge(evaluate(fn, inputs, case.grad_names, upstream), truth, same, dtype, case.output_names)
    assert gate.ok, f"correctness gate failed: {[c for c in gate.checks if not c.ok] or gate.error}"
    benchmark.group = f"{case.name} {str(dtype).replace('torch.', '')} fwd+bwd"
    benchmark(make_step(fn, inputs, case.grad_names, [g.to(dtype) for g in upstream], "fwd+bwd"))
