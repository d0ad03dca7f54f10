"""The one-shot GPU kit: everything we want from a lent GPU, in one command of under ten minutes.

    python3 -m benchmarks.gpu_kit --out DIR            # on the GPU machine, with its own python3
    python3 -m benchmarks.gpu_kit --out DIR --dry-run  # anywhere: every stage stubbed, seconds

A lent GPU machine is reachable for one command of at most 10 minutes (about 15 minutes in all),
has no internet, and brings its own ``python3`` with torch and triton but without monai and
nibabel: those travel as wheels in ``wheels/`` (``make gpu-kit-wheels`` fills it here). The kit
runs, in order, each stage in its own subprocess under its own time limit (so one slow stage
cannot eat the budget, and a crash or a hang costs only that stage):

====================  =====  ==========================================================================
stage                 limit  what
====================  =====  ==========================================================================
wheels                  60   install ``wheels/*.whl`` (if any) into a private folder put on PYTHONPATH
env                     60   device, driver, CUDA, torch/triton/numpy/monai versions (``env.json``)
compile-gate            60   ``python -m e2pa_kernels._compile`` with this machine's Triton (all cores;
                             it also warms Triton's cache for the stages after it)
gpu-tests              150   ``pytest -m gpu`` on the device (``gpu-tests.xml``, JUnit)
ops-<op>                70   ``python -m benchmarks --ops <op> --skip-providers compile`` at the
                             network's level sizes, copy bandwidth measured in the same run
symeig                  60   ``python -m benchmarks.symeig --configs``: the sync-free Jacobi
                             eigensolver (ESA's basis) vs ``torch.linalg.eigh`` at C = 32…256, B = 2,
                             accuracy and sweeps, and its candidate kernel configs
ehf, e2panet-step       75   the EHF layer cases and one E2PANet training step (same tool)
max-patch               75   ``python -m benchmarks --max-patch GIB``
compile-baseline       90*   torch.compile(reference) on the smallest level of ``free_energy`` -- only
                             when the rest of the budget covers it (*: capped to what is left)
====================  =====  ==========================================================================

The whole run keeps to ``--budget`` seconds (default 480): each stage gets the smaller of its limit
and what is left; a stage that would get less than ``MIN_STAGE_S`` is skipped and says so. After
every stage the kit re-packs everything into ``<out>/<device>-<date>.tar.gz`` (one folder
``<device>-<date>/`` inside: each stage's log and results, ``manifest.json``) and writes
``<out>/manifest.json`` beside it, so a run cut short still leaves what it finished. The manifest
holds the device name, driver, torch/triton versions, git commit, date, and what passed, failed,
timed out or was skipped. Unpack the archive into ``benchmarks/results/`` to commit it.

This module imports only the standard library: the stages import torch, in their own processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("benchmarks.gpu_kit")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 480.0
MIN_STAGE_S = 15.0
OPS = ("free_energy", "energy_propagate", "factor_align")
VERSIONED = ("torch", "triton", "numpy", "monai", "nibabel", "scipy", "pytest", "hypothesis")
SOURCE_DIRS = ("e2pa", "e2pa_kernels", "benchmarks", "tests")

# The probe the env stage runs on the machine (its python3): what the manifest says about it.
ENV_PROBE = r"""
import importlib.metadata as md, json, sys
info = {"python": sys.version.split()[0], "versions": {}}
for name in sys.argv[1].split(","):
    try:
        info["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        info["versions"][name] = None
if sys.argv[2] == "cuda":
    import torch
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device_name=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_bytes=p.total_memory,
                    sm_count=p.multi_processor_count)
print(json.dumps(info))
"""

# Stages that run for real in a dry run (cheap, no GPU: the env probe skips torch there).
DRY_REAL = ("env",)
# Dry-run stand-in for a stage: writes a small result file where the stage writes its results.
DRY_STAGE = r"""
import json, sys, pathlib
folder = pathlib.Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
(folder / (sys.argv[2] + ".json")).write_text(json.dumps({"stage": sys.argv[2], "dry_run": True}))
print("dry run of stage", sys.argv[2])
"""


@dataclasses.dataclass
class Context:
    """Where a kit run writes, what it runs with, and what earlier stages found."""

    python: str
    repo: Path
    run_dir: Path
    dry_run: bool
    max_patch_gib: float
    wheels: Path
    site: Path
    env: dict[str, str]
    facts: dict = dataclasses.field(default_factory=dict)  # what the env stage read


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the kit: ``command(ctx)`` returns argv, or a string saying why the stage is skipped.
    ``optional`` stages run only when the budget left covers their whole ``limit_s``."""

    name: str
    limit_s: float
    command: Callable[[Context], list[str] | str]
    optional: bool = False
    after: Callable[[Context, StageResult], None] | None = None


@dataclasses.dataclass
class StageResult:
    name: str
    status: str  # passed, failed, timeout, skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    returncode: int | None = None
    reason: str = ""
    command: str = ""
    log: str = ""


# ---------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------


def _wheels(ctx: Context) -> list[str] | str:
    wheels = sorted(ctx.wheels.glob("*.whl")) if ctx.wheels.is_dir() else []
    if not wheels:
        return f"no wheels in {ctx.wheels} (fill it with `make gpu-kit-wheels` before carrying it)"
    return [
        ctx.python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(ctx.site),
        *map(str, wheels),
    ]


def _env(ctx: Context) -> list[str]:
    return [ctx.python, "-c", ENV_PROBE, ",".join(VERSIONED), "cpu" if ctx.dry_run else "cuda"]


def _read_env(ctx: Context, result: StageResult) -> None:
    lines = [ln for ln in (ctx.run_dir / result.log).read_text().splitlines() if ln.startswith("{")]
    if result.status == "passed" and lines:
        ctx.facts.update(json.loads(lines[-1]))
        (ctx.run_dir / "env.json").write_text(json.dumps(ctx.facts, indent=2))


def _needs_cuda(ctx: Context) -> str | None:
    if ctx.dry_run:
        return None
    if not ctx.facts.get("cuda_available"):
        return "torch sees no CUDA device (see env.log)"
    return None


def _gpu_tests(ctx: Context) -> list[str] | str:
    # -v: one line per test as it ends, so a stage stopped at its limit still says which passed
    return _needs_cuda(ctx) or [
        ctx.python,
        "-m",
        "pytest",
        "-v",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        "--durations=15",
        "--continue-on-collection-errors",
        f"--junitxml={ctx.run_dir / 'gpu-tests.xml'}",
        "tests",
    ]


def _compile_gate(ctx: Context) -> list[str]:
    # --jsonl: one line per variant as it completes, so a stage stopped at its limit keeps what it did
    return [
        ctx.python,
        "-m",
        "e2pa_kernels._compile",
        "--jsonl",
        "--check",
        "--jobs",
        str(os.cpu_count() or 1),
        "--cache",
        str(ctx.run_dir / "compile-gate-cache"),
    ]


def _bench(*args: str) -> Callable[[Context], list[str] | str]:
    def command(ctx: Context) -> list[str] | str:
        return _needs_cuda(ctx) or [
            ctx.python,
            "-m",
            "benchmarks",
            "--device",
            "cuda",
            "--out",
            str(ctx.run_dir / "bench"),
            *args,
        ]

    return command


def _symeig(ctx: Context) -> list[str] | str:
    return _needs_cuda(ctx) or [
        ctx.python,
        "-m",
        "benchmarks.symeig",
        "--device",
        "cuda",
        "--configs",
        "--out",
        str(ctx.run_dir / "symeig"),
    ]


def _max_patch(ctx: Context) -> list[str] | str:
    return _bench("--max-patch", f"{ctx.max_patch_gib:g}")(ctx)


STAGES: tuple[Stage, ...] = (
    Stage("wheels", 60, _wheels),
    Stage("env", 60, _env, after=_read_env),
    # first: on all the machine's cores, it also fills Triton's cache for the JIT launches that follow
    Stage("compile-gate", 60, _compile_gate),
    Stage("gpu-tests", 150, _gpu_tests),
    *(Stage(f"ops-{op}", 70, _bench("--ops", op, "--skip-providers", "compile")) for op in OPS),
    Stage("symeig", 60, _symeig),
    Stage("ehf", 75, _bench("--ops", "EHF", "--skip-providers", "compile")),
    Stage("e2panet-step", 75, _bench("--ops", "E2PANet", "--skip-providers", "compile")),
    Stage("max-patch", 75, _max_patch),
    Stage("compile-baseline", 90, _bench("--ops", "free_energy", "--cases", r"^free_energy/32\^3"), optional=True),
)


# ---------------------------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------------------------


def _run_stage(stage: Stage, ctx: Context, limit: float) -> StageResult:
    result = StageResult(stage.name, "skipped", limit_s=round(limit, 1), log=f"{stage.name}.log")
    command = stage.command(ctx)
    if isinstance(command, str):
        result.reason, result.log = command, ""
        return result
    result.command = " ".join(command if len(" ".join(command)) < 400 else command[:3] + ["..."])
    if ctx.dry_run and stage.name not in DRY_REAL:  # the real command is recorded, a stand-in runs
        command = [ctx.python, "-c", DRY_STAGE, str(ctx.run_dir / stage.name), stage.name]
        result.reason = "dry run: stubbed"
    started = time.monotonic()
    with open(ctx.run_dir / result.log, "w") as log:
        proc = subprocess.Popen(
            command,
            cwd=ctx.repo,
            env=ctx.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            result.returncode = proc.wait(timeout=limit)
            result.status = "passed" if result.returncode == 0 else "failed"
            if result.returncode:
                result.reason = f"exit status {result.returncode} (see {result.log})"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            result.status, result.reason = "timeout", f"stopped after its limit of {limit:.0f} s"
    result.seconds = round(time.monotonic() - started, 1)
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    """End the stage and whatever it started (its own process group, made for it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def sources_digest(repo: Path) -> str:
    """sha256 (12 hex) of the project's Python sources: names what ran where git cannot (a copied tree)."""
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((repo / folder).rglob("*.py")):
            digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _nvidia_smi() -> dict:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"nvidia-smi: {exc}"}
    if out.returncode != 0:
        return {"error": f"nvidia-smi exit {out.returncode}: {out.stderr.strip()[:200]}"}
    name, driver, memory = (x.strip() for x in out.stdout.splitlines()[0].split(",", 2))
    return {"name": name, "driver": driver, "memory": memory}


def _device_tag(ctx: Context, smi: dict) -> str:
    name = ctx.facts.get("device_name") or smi.get("name") or ("cpu-dry-run" if ctx.dry_run else "unknown-device")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _manifest(
    ctx: Context,
    results: list[StageResult],
    smi: dict,
    commit: str | None,
    dirty: bool | None,
    started: str,
    budget: float,
    elapsed: float,
    finished: bool,
) -> dict:
    versions = ctx.facts.get("versions", {})
    return {
        "kit": "benchmarks.gpu_kit",
        "dry_run": ctx.dry_run,
        "finished": finished,
        "date_utc": started,
        "device_name": ctx.facts.get("device_name") or smi.get("name"),
        "capability": ctx.facts.get("capability"),
        "gpu_memory_bytes": ctx.facts.get("gpu_memory_bytes"),
        "driver": smi.get("driver"),
        "nvidia_smi": smi,
        "cuda": ctx.facts.get("torch_cuda"),
        "python": ctx.facts.get("python"),
        "torch": versions.get("torch"),
        "triton": versions.get("triton"),
        "versions": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "sources_sha256": sources_digest(ctx.repo),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.gpu_kit", *sys.argv[1:]]),
        "budget_s": budget,
        "elapsed_s": round(elapsed, 1),
        "summary": {s: [r.name for r in results if r.status == s] for s in ("passed", "failed", "timeout", "skipped")},
        "stages": [dataclasses.asdict(r) for r in results],
    }


def _pack(run_dir: Path, out: Path, manifest: dict) -> Path:
    """Write the manifest into the run folder and beside the archive; (re)build the archive atomically."""
    text = json.dumps(manifest, indent=2) + "\n"
    (run_dir / "manifest.json").write_text(text)
    archive = out / f"{run_dir.name}.tar.gz"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".kit-", suffix=".tmp")
    os.close(fd)
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(
            run_dir,
            arcname=run_dir.name,
            filter=lambda info: None if "compile-gate-cache" in Path(info.name).parts else info,
        )
    os.chmod(tmp, 0o644)
    os.replace(tmp, archive)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".kit-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / "manifest.json")
    return archive


def run_kit(
    out: Path,
    *,
    stages: tuple[Stage, ...] = STAGES,
    budget: float = DEFAULT_BUDGET_S,
    dry_run: bool = False,
    max_patch_gib: float = 8.0,
    wheels: Path | None = None,
    python: str | None = None,
    only: set[str] | None = None,
    commit: str | None = None,
) -> Path:
    """Run the stages and pack their results; returns the archive's path (see the module docstring)."""
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="e2pa-gpu-kit-"))
    site = work / "site"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(
            [str(REPO_ROOT), str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        ),
    )
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # nothing may reach for a GPU
    else:
        env["TRITON_INTERPRET"] = "0"
    commit = commit or _git(REPO_ROOT, "rev-parse", "HEAD") or os.environ.get("E2PA_GIT_COMMIT")
    status = _git(REPO_ROOT, "status", "--porcelain")
    dirty = bool(status) if status is not None else None
    if commit:
        env["E2PA_GIT_COMMIT"] = commit  # the benchmarks' own records read it where git is absent
    staging = work / "run"
    staging.mkdir()
    ctx = Context(
        python=python or sys.executable,
        repo=REPO_ROOT,
        run_dir=staging,
        dry_run=dry_run,
        max_patch_gib=max_patch_gib,
        wheels=wheels or REPO_ROOT / "wheels",
        site=site,
        env=env,
    )
    smi = {"error": "dry run: not queried"} if dry_run else _nvidia_smi()
    results: list[StageResult] = []
    stamp = started.strftime("%Y%m%d-%H%M")
    run_dir = staging

    def pack(finished: bool) -> Path:
        nonlocal run_dir
        name = f"{_device_tag(ctx, smi)}-{stamp}"
        if run_dir.name != name:  # the device's name is known (better) after the env stage
            (out / f"{run_dir.name}.tar.gz").unlink(missing_ok=True)
            run_dir = run_dir.rename(work / name)
            ctx.run_dir = run_dir
        manifest = _manifest(
            ctx,
            results,
            smi,
            commit,
            dirty,
            started.isoformat(timespec="seconds"),
            budget,
            time.monotonic() - t0,
            finished,
        )
        return _pack(run_dir, out, manifest)

    try:
        for stage in stages:
            if only is not None and stage.name not in only:
                continue
            left = budget - (time.monotonic() - t0)
            limit = min(stage.limit_s, left)
            if limit < MIN_STAGE_S or (stage.optional and left < stage.limit_s):
                results.append(
                    StageResult(
                        stage.name,
                        "skipped",
                        limit_s=round(max(limit, 0), 1),
                        reason=f"{max(left, 0):.0f} s of the {budget:.0f} s budget left",
                    )
                )
            else:
                logger.info("stage %s (limit %.0f s)", stage.name, limit)
                result = _run_stage(stage, ctx, limit)
                results.append(result)
                if stage.after is not None:
                    stage.after(ctx, result)
                logger.info("stage %s: %s in %.0f s %s", stage.name, result.status, result.seconds, result.reason)
            archive = pack(finished=False)
        archive = pack(finished=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_kit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the archive and manifest.json")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all stages together")
    parser.add_argument("--dry-run", action="store_true", help="every stage stubbed (CPU, seconds): checks the kit")
    parser.add_argument("--max-patch-gib", type=float, default=8.0, help="GPU memory budget of the max-patch stage")
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install first (default: wheels/)")
    parser.add_argument("--only", help="comma-separated stage names to run (default: all)")
    parser.add_argument("--commit", help="git commit to record where the tree has no .git (else $E2PA_GIT_COMMIT)")
    parser.add_argument("--list", action="store_true", help="list the stages and their limits, and exit")
    args = parser.parse_args(argv)
    if args.list:
        for s in STAGES:
            sys.stdout.write(f"{s.name:18s} {s.limit_s:4.0f} s{'  (optional)' if s.optional else ''}\n")
        return 0
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {s.name for s in STAGES}
    if unknown:
        parser.error(f"--only: unknown stage(s) {sorted(unknown)}; see --list")
    logging.basicConfig(level=logging.INFO, format="gpu-kit %(asctime)s %(message)s", datefmt="%H:%M:%S")
    archive = run_kit(
        args.out,
        budget=args.budget,
        dry_run=args.dry_run,
        max_patch_gib=args.max_patch_gib,
        wheels=args.wheels,
        only=only,
        commit=args.commit,
    )
    manifest = json.loads((args.out / "manifest.json").read_text())
    logger.info("wrote %s; %s", archive, {k: len(v) for k, v in manifest["summary"].items()})
    return 1 if manifest["summary"]["failed"] or manifest["summary"]["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
