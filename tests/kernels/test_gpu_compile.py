"""Every kernel variant a launcher can pick compiles for real GPUs (sm_80, sm_90) without one:
no register spills, and the main streams load 16 bytes per instruction.

The compile runs once, in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be
lowered to PTX), through ``python -m e2pa_kernels._compile --json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from e2pa_kernels._compile import ARCHS, all_specs

LABELS = [spec.label for spec in all_specs()]


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "e2pa_kernels._compile", "--json"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"GPU compile failed:\n{proc.stderr[-4000:]}"
    return {(r["label"], r["arch"]): r for r in json.loads(proc.stdout)}


def test_every_op_registers_its_variants():
    for op in ("free_energy.fwd", "free_energy.bwd", "energy_propagate.fwd", "energy_propagate.bwd",
               "factor_align.fwd", "factor_align.bwd"):
        assert any(label.startswith(op) for label in LABELS), f"no compile variants registered for {op}"


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm{a}" for a in ARCHS])
@pytest.mark.parametrize("label", LABELS)
def test_compiles_without_spills_and_with_wide_loads(reports, label, arch):
    r = reports[(label, arch)]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, \
        f"{label} on sm_{arch}: {r['registers']} registers, spills {r['spill_stores']}/{r['spill_loads']} bytes"
    widths = {int(k): v for k, v in r["global_load_widths"].items()}
    assert widths.get(128, 0) > 0, f"{label} on sm_{arch}: no 16-byte global loads ({widths})"
