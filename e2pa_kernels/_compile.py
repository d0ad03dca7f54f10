"""Compile kernels for real GPUs on a machine without one, and read what the assembler says.

Each op module lists, in ``gpu_compile_specs()``, every (kernel, constexprs, num_warps) its launcher
can pick; the test suite compiles each for sm_80 and sm_90 and checks registers, spills and the
width of global loads. Usage from a shell::

    python -m e2pa_kernels._compile            # table of every kernel variant
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Callable

from ._kernel_spec import KernelSpec

ARCHS = (80, 90)


@dataclasses.dataclass
class CompileReport:
    label: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    global_load_widths: dict[int, int]  # load width in bits -> count in the SASS


def _bin(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_spec(spec: KernelSpec, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = spec.kernel.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})


def _ptxas(ptx: str) -> str:
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([_bin("ptxas-blackwell"), "-v", "--gpu-name", target, path,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    return out.stdout + out.stderr


def _sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout


def load_widths(sass: str) -> dict[int, int]:
    """Count global loads by width in bits, direct (``LDG``) and asynchronous copies to shared
    memory (``LDGSTS``, what pipelined loops use): ``.E`` is 32-bit, ``.64``/``.128`` wider."""
    widths: dict[int, int] = {}
    for m in re.finditer(r"\bLDG(?:STS)?\.E((?:\.[A-Z0-9_]+)*)", sass):
        mods = m.group(1).split(".")
        bits = 32
        for mod in mods:
            if mod in ("64", "128"):
                bits = int(mod)
            elif mod in ("U16", "S16"):
                bits = 16
            elif mod in ("U8", "S8"):
                bits = 8
        widths[bits] = widths.get(bits, 0) + 1
    return widths


def report(spec: KernelSpec, arch: int) -> CompileReport:
    compiled = compile_spec(spec, arch)
    text = _ptxas(compiled.asm["ptx"])
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return CompileReport(label=spec.label, arch=arch, registers=regs,
                         spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                         shared_bytes=int(compiled.metadata.shared),
                         global_load_widths=load_widths(_sass(compiled.asm["cubin"])))


OP_MODULES = ("free_energy", "energy_propagate", "factor_align")


def all_specs() -> list[KernelSpec]:
    # importlib, because the package namespace binds these names to the op functions
    import importlib
    specs: list[KernelSpec] = []
    for name in OP_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        getter: Callable[[], list[KernelSpec]] | None = getattr(module, "gpu_compile_specs", None)
        if getter is not None:
            specs.extend(getter())
    return specs


def main() -> None:
    import argparse
    import json
    parser = argparse.ArgumentParser(description="Compile every e2pa kernel variant for sm_80/sm_90.")
    parser.add_argument("--json", action="store_true", help="one JSON list of reports on stdout")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    specs = all_specs()
    jobs = [(i, arch) for i in range(len(specs)) for arch in ARCHS]
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        reports = list(pool.map(_report_by_index, jobs))
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in reports]))
        return
    print(f"{'kernel variant':64s} arch  regs  spills(st/ld)  smem  global loads (bits:count)")
    for r in reports:
        widths = " ".join(f"{b}:{n}" for b, n in sorted(r.global_load_widths.items()))
        print(f"{r.label:64s} sm{r.arch}  {r.registers:4d}  {r.spill_stores:5d}/{r.spill_loads:<5d}"
              f"  {r.shared_bytes:6d}  {widths}")


def _report_by_index(job: tuple[int, int]) -> CompileReport:
    index, arch = job
    return report(all_specs()[index], arch)


if __name__ == "__main__":
    main()
