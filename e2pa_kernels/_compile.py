"""Compile kernels for real GPUs on a machine without one, and read what runs: the cubin Triton built.

Each op module lists, in ``gpu_compile_specs()``, every (kernel, constexprs, num_warps, maxnreg, argument
types) its launchers can pick, generated from the very functions the launchers build their keyword arguments
with (``_kernel_spec``; flags that only add code are compiled set). This module compiles each for sm_80 and
sm_90 with ``triton.compile`` -- which picks the
assembler and its flags per arch and per Triton version (3.9: ``ptxas`` for sm_80 and
``ptxas-blackwell --regAllocOptLevel=2`` for sm_90; 3.6: ``ptxas`` for both) -- and reads the cubin
it produced (``k.asm["cubin"]``) with the ``cuobjdump`` bundled with that Triton:

- ``cuobjdump -res-usage``: registers, shared memory, and the ``STACK``/``LOCAL`` frame (non-zero:
  spills or local arrays);
- ``cuobjdump -sass``: ``STL``/``LDL`` (local-memory stores/loads) and the width of every global
  load (``LDG.E`` 4 bytes, ``LDG.E.128`` 16 bytes);
- the assembler's own ``-v`` log of that build (Triton runs its assembler with ``-v`` and prints the
  log under ``knobs.nvidia.dump_ptxas_log``): spill store/load bytes and the stack frame, which tell
  spills from local arrays or call frames (a non-zero ``STACK`` alone can be either).

The PTX is never re-assembled with an assembler of our choosing: that can report other registers
and spills than the real build.

Reports are cached, one JSON file per variant, keyed by everything that decides the cubin (the
kernel's source and dependencies as Triton hashes them, signature, constexprs, alignment, options,
arch, Triton version, Triton's cache-invalidating environment) and by ``GATE_VERSION``; a rerun
compiles only what changed. Usage from a shell::

    python -m e2pa_kernels._compile                  # table of every kernel variant
    python -m e2pa_kernels._compile --only bwd --arch 90
    python -m e2pa_kernels._compile --jsonl          # one JSON line per event (what the tests read)

TRITON_INTERPRET must be unset: interpreted kernels cannot be lowered to PTX.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ._kernel_spec import KernelSpec

logger = logging.getLogger(__name__)

ARCHS = (80, 90)
OP_MODULES = ("free_energy", "energy_propagate", "factor_align", "energy_fusion", "symeig")
# Bump when what a report holds or how it is read changes: old cache entries are then ignored.
GATE_VERSION = 3
CACHE_ENV = "E2PA_COMPILE_CACHE"


@dataclasses.dataclass
class CompileReport:
    """What the cubin of one variant on one arch says. ``stack_bytes``/``local_bytes`` are the
    per-thread frames ``cuobjdump -res-usage`` reports; ``local_stores``/``local_loads`` count the
    ``STL``/``LDL`` instructions in the SASS; ``spill_store_bytes``/``spill_load_bytes`` are what
    the assembler reported for this build (None where its log could not be had)."""

    label: str
    arch: int
    registers: int
    stack_bytes: int
    local_bytes: int
    local_stores: int
    local_loads: int
    shared_bytes: int
    global_load_widths: dict[int, int]  # load width in bits -> count in the SASS
    triton_version: str
    assembler: str  # the assembler Triton used for this arch, as far as this Triton version says
    compile_seconds: float
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    cached: bool = False

    @property
    def spills(self) -> bool:
        """Spill bytes in the assembler's log; without the log, any local frame or traffic counts."""
        if self.spill_store_bytes is not None and self.spill_load_bytes is not None:
            return bool(self.spill_store_bytes or self.spill_load_bytes)
        return bool(self.stack_bytes or self.local_bytes or self.local_stores or self.local_loads)

    @classmethod
    def from_dict(cls, d: dict) -> CompileReport:
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["global_load_widths"] = {int(k): int(v) for k, v in d["global_load_widths"].items()}
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One (kernel variant, arch) pair the gate checks; ``index`` is the spec's place in ``all_specs()``."""

    index: int
    spec: KernelSpec
    arch: int

    @property
    def name(self) -> str:
        return f"{self.spec.label} sm{self.arch}"


# ---------------------------------------------------------------------------------------------
# Triton's toolchain
# ---------------------------------------------------------------------------------------------


def _bin(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not bundled with triton {triton.__version__} (looked in {path})")
    return path


def _source(spec: KernelSpec):
    from triton.compiler import ASTSource

    names = spec.kernel.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
    return ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def compile_spec(spec: KernelSpec, arch: int):
    import triton

    return triton.compile(_source(spec), target=_target(arch), options=spec.options)


def compile_with_log(spec: KernelSpec, arch: int):
    """``compile_spec`` with the assembler's ``-v`` log of that very build: Triton assembles afresh
    (its cache skipped, so the assembler runs) and prints the log, captured here. Returns
    (compiled kernel, log text or None where this Triton has no such switch)."""
    import contextlib
    import io

    try:
        from triton import knobs

        saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    except (ImportError, AttributeError):
        return compile_spec(spec, arch), None
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            compiled = compile_spec(spec, arch)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    text = out.getvalue()
    return compiled, (text if spill_bytes(text) is not None else None)  # "ptxas info", "ptxas-blackwell info"


def spill_bytes(log: str) -> tuple[int, int] | None:
    """(spill store bytes, spill load bytes) from an assembler ``-v`` log of one function."""
    m = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if len(m) != 1:
        return None
    return int(m[0][0]), int(m[0][1])


def assembler(arch: int) -> str:
    """The assembler Triton runs for ``arch`` (its file name), read from Triton's NVIDIA backend;
    ``"ptxas"`` where that Triton version has no per-arch choice."""
    from triton.backends.nvidia import compiler as nv

    get = getattr(nv, "get_ptxas", None)
    if get is None:
        return "ptxas"
    try:
        tool = get(arch)
    except TypeError:  # versions whose get_ptxas takes no arch use one assembler for all
        tool = get()
    return os.path.basename(getattr(tool, "path", str(tool)))


def _env_vars() -> list:
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
    except ImportError:  # pragma: no cover - older layouts
        return []
    return sorted(get_cache_invalidating_env_vars().items())


def cache_key(spec: KernelSpec, arch: int) -> str:
    """Everything that decides the cubin, hashed as Triton's own compile cache does (source with
    its dependencies, signature, constexprs, alignment attributes, parsed options, target, the
    environment variables Triton declares cache-invalidating), plus Triton's version and ours."""
    import triton
    from triton.compiler.compiler import make_backend

    backend = make_backend(_target(arch))
    options = backend.parse_options(spec.options)
    payload = json.dumps([GATE_VERSION, triton.__version__, _source(spec).hash(), arch, options.hash(), _env_vars()])
    return hashlib.sha256(payload.encode()).hexdigest()[:40]


_LOC = re.compile(r"^#loc\d* = .*$\n?|\s*loc\([^()]*(?:\([^()]*\)[^()]*)*\)", re.MULTILINE)


def strip_locations(ir_text: str) -> str:
    """Triton IR without its source locations (``#locN = loc(...)`` lines and ``loc(...)`` suffixes)."""
    return _LOC.sub("", ir_text)


def ir_key(spec: KernelSpec, arch: int) -> str:
    """The second key, asked when ``cache_key`` misses: the Triton IR the front end makes of the
    variant (source locations removed) with the same options, arch and versions. An edit that leaves
    the IR unchanged (a docstring, a comment, a reflowed line, a moved function) changes Triton's
    source hash but not the cubin, and is answered from the cache without running LLVM or ptxas."""
    import triton
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend

    target = _target(arch)
    backend = make_backend(target)
    options = backend.parse_options(spec.options)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = _source(spec).make_ir(
        target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context
    )
    text = strip_locations(str(module))
    payload = json.dumps([GATE_VERSION, triton.__version__, arch, options.hash(), _env_vars(), text])
    return "ir-" + hashlib.sha256(payload.encode()).hexdigest()[:40]


# ---------------------------------------------------------------------------------------------
# Reading the cubin
# ---------------------------------------------------------------------------------------------


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_bin("cuobjdump"), flag, path], capture_output=True, text=True, check=True).stdout


_RES_FIELD = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


def resource_usage(text: str) -> dict[str, int]:
    """``REG``/``STACK``/``SHARED``/``LOCAL`` of the one function in ``cuobjdump -res-usage`` output
    (the ``Common:`` section before it holds module globals, not a function's resources)."""
    functions = text.split(" Function ")[1:]
    if len(functions) != 1:
        raise ValueError(f"expected one function in the cubin, cuobjdump reported {len(functions)}:\n{text}")
    fields = {k: int(v) for k, v in _RES_FIELD.findall(functions[0])}
    missing = {"REG", "STACK", "SHARED", "LOCAL"} - set(fields)
    if missing:
        raise ValueError(f"cuobjdump -res-usage output lacks {sorted(missing)}:\n{text}")
    return fields


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


def local_traffic(sass: str) -> tuple[int, int]:
    """(stores, loads) to local memory in the SASS: ``STL``/``LDL``, the instructions spills use."""
    return len(re.findall(r"\bSTL(?:\.[A-Z0-9_]+)*\s", sass)), len(re.findall(r"\bLDL(?:\.[A-Z0-9_]+)*\s", sass))


def report(spec: KernelSpec, arch: int) -> CompileReport:
    """Compile ``spec`` for ``arch`` and read the cubin Triton built."""
    import triton

    start = time.perf_counter()
    compiled, log = compile_with_log(spec, arch)
    seconds = time.perf_counter() - start
    spilled = spill_bytes(log) if log else None
    cubin = compiled.asm["cubin"]
    res = resource_usage(_cuobjdump("-res-usage", cubin))
    sass = _cuobjdump("-sass", cubin)
    stores, loads = local_traffic(sass)
    return CompileReport(
        label=spec.label,
        arch=arch,
        registers=res["REG"],
        stack_bytes=res["STACK"],
        local_bytes=res["LOCAL"],
        local_stores=stores,
        local_loads=loads,
        shared_bytes=res["SHARED"],
        global_load_widths=load_widths(sass),
        triton_version=triton.__version__,
        assembler=assembler(arch),
        compile_seconds=round(seconds, 3),
        spill_store_bytes=spilled[0] if spilled else None,
        spill_load_bytes=spilled[1] if spilled else None,
    )


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "e2pa" / "compile-gate"


def _cache_read(cache: Path | None, key: str, spec: KernelSpec) -> CompileReport | None:
    if cache is None:
        return None
    path = cache / f"{key}.json"
    try:
        rep = CompileReport.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if rep.spill_store_bytes is None:  # made without the assembler's log: compile again, the log may come now
        return None
    return dataclasses.replace(rep, label=spec.label, cached=True)


def _cache_write(cache: Path | None, key: str, rep: CompileReport) -> None:
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{key}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dataclasses.asdict(rep), f)
    os.replace(tmp, cache / f"{key}.json")  # atomic: a concurrent reader sees all of it or nothing


# ---------------------------------------------------------------------------------------------
# Variants and the (parallel, incremental) run
# ---------------------------------------------------------------------------------------------


def all_specs() -> list[KernelSpec]:
    # importlib, because the package namespace binds these names to the op functions
    import importlib

    specs: list[KernelSpec] = []
    for name in OP_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        getter: Callable[[], list[KernelSpec]] | None = getattr(module, "gpu_compile_specs", None)
        if getter is not None:
            specs.extend(getter())
    labels = [s.label for s in specs]
    duplicated = sorted({x for x in labels if labels.count(x) > 1})
    if duplicated:
        raise ValueError(f"kernel variant labels must be unique; repeated: {duplicated}")
    return specs


def variants(
    specs: list[KernelSpec] | None = None, archs: Iterable[int] = ARCHS, only: str | None = None
) -> list[Variant]:
    """Every (spec, arch) pair in a fixed order: spec by spec, arch by arch (the tests' order)."""
    specs = all_specs() if specs is None else specs
    return [Variant(i, s, a) for i, s in enumerate(specs) for a in archs if only is None or only in s.label]


def _emit(event: dict) -> None:
    # one write per line: lines from several processes on one pipe do not interleave (< PIPE_BUF)
    os.write(sys.stdout.fileno(), (json.dumps(event) + "\n").encode())


_WORKER_SPECS: list[KernelSpec] | None = None


def _worker_init() -> None:
    global _WORKER_SPECS
    _WORKER_SPECS = all_specs()


def _worker_report(index: int, arch: int, key: str | None, cache: str | None, stream: bool) -> dict:
    spec = _WORKER_SPECS[index]
    if stream:
        _emit({"event": "start", "label": spec.label, "arch": arch, "pid": os.getpid(), "time": time.time()})
    folder = Path(cache) if cache else None
    try:
        second = ir_key(spec, arch) if folder is not None else None
    except Exception as exc:  # Triton internals moved: compile without the second key
        logger.warning("no IR key for %s sm%d (%s)", spec.label, arch, exc)
        second = None
    rep = _cache_read(folder, second, spec) if second else None
    if rep is None:
        rep = report(spec, arch)
        if second:
            _cache_write(folder, second, rep)
    if key is not None:
        _cache_write(folder, key, dataclasses.replace(rep, cached=False))
    return dataclasses.asdict(rep)


def run(
    selected: list[Variant],
    jobs: int,
    cache: Path | None,
    on_result: Callable[[Variant, dict], None],
    stream: bool = False,
) -> None:
    """Report every variant in ``selected``: from the cache where it holds one, else compiled in
    ``jobs`` processes (submitted in order). ``on_result(variant, event)`` gets a report event
    (``{"event": "report", ...fields}``) or an error event (``{"event": "error", "error": ...}``);
    one variant's failure does not stop the others."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    todo: list[tuple[Variant, str | None]] = []
    for v in selected:
        try:
            key = cache_key(v.spec, v.arch)
        except Exception as exc:  # an API change in Triton's internals: compile without the cache
            logger.warning("no cache key for %s (%s); compiling it", v.name, exc)
            key = None
        hit = _cache_read(cache, key, v.spec) if key else None
        if hit is not None:
            on_result(v, {"event": "report", **dataclasses.asdict(hit)})
        else:
            todo.append((v, key))
    if not todo:
        return
    with ProcessPoolExecutor(max(1, min(jobs, len(todo))), initializer=_worker_init) as pool:
        futures = {
            pool.submit(_worker_report, v.index, v.arch, key, str(cache) if cache else None, stream): v
            for v, key in todo
        }
        for fut in as_completed(futures):
            v = futures[fut]
            try:
                event = {"event": "report", **fut.result()}
            except BrokenProcessPool as exc:
                event = {
                    "event": "error",
                    "label": v.spec.label,
                    "arch": v.arch,
                    "error": f"the compile worker died ({exc}) before this variant finished",
                }
            except Exception as exc:
                detail = getattr(exc, "stderr", "") or ""
                event = {
                    "event": "error",
                    "label": v.spec.label,
                    "arch": v.arch,
                    "error": f"{type(exc).__name__}: {exc}\n{detail}".strip(),
                }
            on_result(v, event)


def _table(reports: list[CompileReport]) -> str:
    lines = [
        f"{'kernel variant':66s} arch  regs  spill st/ld  stack/local  STL/LDL  smem    assembler        "
        f"global loads (bits:count)"
    ]
    for r in reports:
        widths = " ".join(f"{b}:{n}" for b, n in sorted(r.global_load_widths.items()))
        spill = "?" if r.spill_store_bytes is None else f"{r.spill_store_bytes}/{r.spill_load_bytes}"
        lines.append(
            f"{r.label:66s} sm{r.arch}  {r.registers:4d}  {spill:>11s}  {r.stack_bytes:5d}/{r.local_bytes:<5d}"
            f"  {r.local_stores:3d}/{r.local_loads:<3d}  {r.shared_bytes:6d}  {r.assembler:15s}  {widths}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m e2pa_kernels._compile",
        description="Compile every e2pa kernel variant for sm_80/sm_90 and read the "
        "cubins Triton built (registers, spills, load widths).",
    )
    parser.add_argument(
        "--jsonl", action="store_true", help="one JSON line per event on stdout: start, report, error, done"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="only this arch (repeatable)")
    parser.add_argument("--only", help="only variants whose label contains this text")
    parser.add_argument("--select", type=Path, help="only the variants of this JSON file: a list of [label, arch]")
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"report cache (default: ${CACHE_ENV} or ~/.cache/e2pa/compile-gate)"
    )
    parser.add_argument("--no-cache", action="store_true", help="compile everything, read and write no cache")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a variant spills or has no 16-byte global load (what the suite requires)",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    cache = None if args.no_cache else (args.cache or default_cache_dir())
    selected = variants(archs=tuple(args.arch or ARCHS), only=args.only)
    if args.select:
        wanted = {(label, arch) for label, arch in json.loads(args.select.read_text())}
        selected = [v for v in selected if (v.spec.label, v.arch) in wanted]
    if args.jsonl:
        _emit({"event": "plan", "variants": [[v.spec.label, v.arch] for v in selected]})
    results: dict[tuple[str, int], dict] = {}

    def on_result(v: Variant, event: dict) -> None:
        results[(v.spec.label, v.arch)] = event
        if args.jsonl:
            _emit(event)

    run(selected, args.jobs, cache, on_result, stream=args.jsonl)
    errors = [e for e in results.values() if e["event"] == "error"]
    reports = [
        CompileReport.from_dict(results[(v.spec.label, v.arch)])
        for v in selected
        if results[(v.spec.label, v.arch)]["event"] == "report"
    ]
    failed = [r for r in reports if r.spills or not r.global_load_widths.get(128)] if args.check else []
    if args.jsonl:
        _emit({"event": "done", "errors": len(errors), "failed_checks": len(failed)})
    else:
        sys.stdout.write(_table(reports) + "\n")
    for e in errors:
        sys.stderr.write(f"FAILED {e['label']} sm{e['arch']}: {e['error']}\n")
    for r in failed:
        sys.stderr.write(
            f"CHECK {r.label} sm{r.arch}: {r.registers} registers, spills "
            f"{r.spill_store_bytes}/{r.spill_load_bytes} B, STACK {r.stack_bytes} B, "
            f"LOCAL {r.local_bytes} B, {r.local_stores} STL / {r.local_loads} LDL, "
            f"loads {r.global_load_widths}\n"
        )
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
