"""Every kernel variant a launcher can pick compiles for real GPUs (sm_80, sm_90) without one: no
register spills in the build Triton itself made (its assembler's log of that build; registers, frames
and loads from the cubin), and the main streams load 16 bytes per instruction.

The compiles run in one subprocess without TRITON_INTERPRET (interpreted kernels cannot be lowered
to PTX): ``python -m e2pa_kernels._compile --jsonl``, which answers cached variants at once (cache
keyed by kernel source, signature, constexprs, options, arch and Triton version; see ``_compile``)
and compiles the rest in parallel, streaming one JSON line per variant. Each test waits for its own
variant only: a variant that fails or takes longer than ``E2PA_COMPILE_TIMEOUT`` seconds (from when
its compile started) fails its own test, by name, and the others still pass.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from e2pa_kernels._compile import ARCHS, all_specs, local_traffic, resource_usage, spill_bytes, strip_locations

SPECS = all_specs()
LABELS = [spec.label for spec in SPECS]
VARIANTS = [(label, arch) for label in LABELS for arch in ARCHS]  # the order the compile subprocess works in
VARIANT_TIMEOUT = float(os.environ.get("E2PA_COMPILE_TIMEOUT", "300"))
JOBS = int(os.environ.get("E2PA_COMPILE_JOBS", str(min(2, os.cpu_count() or 1))))


class GateRun:
    """The compile subprocess and what it has said so far, read by a thread as lines arrive."""

    def __init__(self, selected: list[tuple[str, int]], folder):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        select = folder / "variants.json"
        select.write_text(json.dumps(selected))
        command = [
            sys.executable,
            "-m",
            "e2pa_kernels._compile",
            "--jsonl",
            "--jobs",
            str(JOBS),
            "--select",
            str(select),
        ]
        self.proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )  # its pool workers share its process group
        self.events: dict[tuple[str, int], dict] = {}
        self.started: dict[tuple[str, int], float] = {}
        self.progress = time.monotonic()
        self.stderr: list[str] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.progress = time.monotonic()
                key = (event.get("label"), event.get("arch"))
                if event["event"] == "start":
                    self.started[key] = time.monotonic()
                elif event["event"] in ("report", "error"):
                    self.events[key] = event

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr.append(line)
            del self.stderr[:-200]

    def wait(self, label: str, arch: int) -> dict:
        name = f"{label} on sm_{arch}"
        while True:
            with self.lock:
                event = self.events.get((label, arch))
                started = self.started.get((label, arch))
                idle = time.monotonic() - self.progress
            if event is not None:
                return event
            now = time.monotonic()
            if self.proc.poll() is not None:
                time.sleep(0.5)  # let the reader drain what the process wrote last
                if (label, arch) in self.events:
                    continue
                pytest.fail(
                    f"the compile subprocess exited ({self.proc.returncode}) without a report for "
                    f"{name}:\n{''.join(self.stderr)[-4000:]}"
                )
            if started is not None and now - started > VARIANT_TIMEOUT:
                pytest.fail(f"{name}: compiling took over {VARIANT_TIMEOUT:.0f} s (E2PA_COMPILE_TIMEOUT)")
            if started is None and idle > VARIANT_TIMEOUT:
                with self.lock:
                    running = [f"{lb} sm_{a}" for (lb, a) in self.started if (lb, a) not in self.events]
                pytest.fail(
                    f"{name}: not started; the compile subprocess made no progress for "
                    f"{idle:.0f} s, still compiling {running}"
                )
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def gate(request, tmp_path_factory):
    # only the variants this session runs (`-k` selects a few without compiling the rest)
    selected = [
        (item.callspec.params["label"], item.callspec.params["arch"])
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_compiles_without_spills_and_with_wide_loads"
    ]
    run = GateRun(selected, tmp_path_factory.mktemp("compile-gate"))
    yield run
    run.stop()


def test_every_op_registers_its_variants():
    for op in (
        "free_energy.fwd",
        "free_energy.bwd",
        "energy_propagate.fwd",
        "energy_propagate.bwd",
        "factor_align.fwd",
        "factor_align.bwd",
        "energy_fusion.fwd",
        "energy_fusion.bwd",
        "symeig.jacobi",
    ):
        assert any(label.startswith(op) for label in LABELS), f"no compile variants registered for {op}"


@pytest.mark.parametrize(("label", "arch"), VARIANTS, ids=[f"{label} sm{arch}" for label, arch in VARIANTS])
def test_compiles_without_spills_and_with_wide_loads(gate, label, arch):
    r = gate.wait(label, arch)
    assert r["event"] == "report", f"{label} on sm_{arch} did not compile:\n{r['error'][-4000:]}"
    where = f"{label} on sm_{arch} (triton {r['triton_version']}, {r['assembler']})"
    assert r["spill_store_bytes"] is not None, f"{where}: no assembler log of the build to read spills from"
    assert (r["spill_store_bytes"], r["spill_load_bytes"]) == (0, 0), (
        f"{where}: {r['registers']} registers, spills {r['spill_store_bytes']}/{r['spill_load_bytes']} B "
        f"(STACK {r['stack_bytes']} B, LOCAL {r['local_bytes']} B, {r['local_stores']} STL / {r['local_loads']} LDL)"
    )
    widths = {int(k): v for k, v in r["global_load_widths"].items()}
    assert widths.get(128, 0) > 0, f"{label} on sm_{arch}: no 16-byte global loads ({widths})"


# The readers of cuobjdump's output, on text it prints (so a format change fails here, by name).
RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _free_energy_bwd_kernel:
  REG:255 STACK:24 SHARED:1024 LOCAL:8 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_resource_usage_reads_the_function_not_the_module():
    assert resource_usage(RES_USAGE) == {"REG": 255, "STACK": 24, "SHARED": 1024, "LOCAL": 8}
    with pytest.raises(ValueError, match="one function"):
        resource_usage(RES_USAGE.split(" Function ")[0])


def test_spill_bytes_reads_the_assemblers_log():
    log = (
        "ptxas info    : Compiling entry function '_energy_propagate_bwd_kernel' for 'sm_80'\n"
        "ptxas info    : Function properties for _energy_propagate_bwd_kernel\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 72 registers, used 1 barriers, 8 bytes cumulative stack size, 496 bytes cmem[0]\n"
    )
    assert spill_bytes(log) == (4, 12)
    blackwell = (
        "ptxas-blackwell info    : Function properties for _free_energy_fwd_kernel\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas-blackwell info    : Used 64 registers, used 1 barriers\n"
    )  # triton 3.9, sm_90
    assert spill_bytes(blackwell) == (0, 0)
    assert spill_bytes("ptxas info    : 0 bytes gmem\n") is None


def test_local_traffic_counts_spill_instructions():
    sass = (
        "        /*0190*/                   STL.64 [R1+0x8], R4 ;\n"
        "        /*01a0*/                   STL [R1], R2 ;\n"
        "        /*01b0*/                   LDL.LU R3, [R1] ;\n"
        "        /*01c0*/                   LDG.E.128 R8, desc[UR4][R2.64] ;\n"
    )
    assert local_traffic(sass) == (2, 1)


def test_ir_key_ignores_source_locations_only():
    """The cache's second key is the IR without locations: a docstring or a moved line changes only these."""
    ir = (
        '#loc = loc("/a.py":100:5)\n'
        "module {\n"
        '  tt.func public @k(%arg0: !tt.ptr<f32> {tt.divisibility = 16 : i32} loc("x"(#loc))) {\n'
        "    %0 = tt.get_program_id x : i32 loc(#loc1)\n"
        "    tt.return loc(#loc5)\n"
        "  } loc(#loc)\n"
        "} loc(#loc)\n"
        '#loc1 = loc("/a.py":101:5)\n'
    )
    moved = ir.replace(":100:5", ":130:9").replace(":101:5", ":131:9")
    assert strip_locations(ir) == strip_locations(moved)
    assert "loc" not in strip_locations(ir) and "tt.get_program_id x : i32" in strip_locations(ir)
    assert strip_locations(ir) != strip_locations(ir.replace("program_id x", "program_id y"))
