"""The one-shot GPU kit (benchmarks/gpu_kit.py) on the CPU: a dry run packs one archive with a
manifest naming every stage; the real commands it would run on a GPU are valid for the tools they
call; a stage over its time limit is stopped and the next ones still run; the budget is kept."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import cli as bench_cli
from benchmarks import gpu_kit
from benchmarks import symeig as bench_symeig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kit-out")
    wheels = tmp_path_factory.mktemp("wheels")
    (wheels / "example-1.0-py3-none-any.whl").write_bytes(b"")  # only its presence matters in a dry run
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_kit", "--dry-run", "--out", str(out), "--wheels", str(wheels)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_dry_run_packs_one_archive_with_a_manifest(dry_run):
    archives = list(dry_run.glob("*.tar.gz"))
    assert len(archives) == 1 and sorted(p.name for p in dry_run.iterdir()) == [archives[0].name, "manifest.json"]
    folder = archives[0].name[: -len(".tar.gz")]
    assert folder.startswith("cpu-dry-run-")
    with tarfile.open(archives[0]) as tar:
        names = set(tar.getnames())
        inner = json.load(tar.extractfile(f"{folder}/manifest.json"))
    manifest = json.loads((dry_run / "manifest.json").read_text())
    assert inner == manifest and manifest["dry_run"] is True and manifest["finished"] is True
    stages = [s.name for s in gpu_kit.STAGES]
    assert [s["name"] for s in manifest["stages"]] == stages
    assert manifest["summary"]["passed"] == stages, manifest["summary"]
    for s in manifest["stages"]:
        assert f"{folder}/{s['log']}" in names, s
    # what the manifest says about the machine and the code
    assert manifest["torch"] == torch.__version__ and manifest["triton"] and manifest["python"]
    assert len(manifest["sources_sha256"]) == 12 and manifest["date_utc"].startswith("20")
    assert manifest["elapsed_s"] < manifest["budget_s"]


def test_dry_run_records_the_real_commands_and_they_are_valid(dry_run):
    stages = {s["name"]: s for s in json.loads((dry_run / "manifest.json").read_text())["stages"]}
    assert "pip install" in stages["wheels"]["command"] and "--no-index" in stages["wheels"]["command"]
    assert "-m pytest -v -m gpu" in stages["gpu-tests"]["command"]
    assert "-m e2pa_kernels._compile --jsonl --check" in stages["compile-gate"]["command"]
    cuda = torch.device("cuda")  # a device object only: selecting cases needs no GPU
    for name in (
        "ops-free_energy",
        "ops-energy_propagate",
        "ops-factor_align",
        "ehf",
        "e2panet-step",
        "compile-baseline",
    ):
        argv = stages[name]["command"].split(" -m benchmarks ", 1)[1].split()
        args = bench_cli.parse_args(argv)
        assert args.device == "cuda" and args.ops
        cases = bench_cli.select_cases(args, cuda, "quick")
        assert cases, f"{name}: {argv} selects no CUDA case"
        if name != "compile-baseline":
            assert all("compile" not in {p.name for p in c.providers} for c in cases), name
        else:
            assert all("compile" in {p.name for p in c.providers} for c in cases)
    args = bench_cli.parse_args(stages["max-patch"]["command"].split(" -m benchmarks ", 1)[1].split())
    assert args.max_patch == 8.0
    args = bench_symeig.parse_args(stages["symeig"]["command"].split(" -m benchmarks.symeig ", 1)[1].split())
    assert args.device == "cuda" and args.configs and args.sizes == [32, 64, 128, 256] and args.batch == 2


def test_the_eigensolver_benchmark_runs_on_the_cpu(tmp_path):
    """The symeig stage's tool, in the interpreter at tiny sizes: accuracy against eigh, sweeps, both timings."""
    assert bench_symeig.main(["--device", "cpu", "--sizes", "3,4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "symeig.json").read_text())
    assert [r["n"] for r in result["sizes"]] == [3, 4]
    for r in result["sizes"]:
        assert r["eigenvalue_error_rel"] < 1e-13 and r["residual_rel"] < 1e-13 and r["orthogonality"] < 1e-13
        assert r["projector_error"] < 1e-12 and all(0 < s <= 30 for s in r["sweeps"])
        assert r["jacobi"]["median_ms"] > 0 and r["eigh"]["median_ms"] > 0
    assert "| 4 | 2 |" in (tmp_path / "symeig.md").read_text()


def _stage(name, code, limit, optional=False):
    return gpu_kit.Stage(name, limit, lambda ctx: [sys.executable, "-c", code], optional=optional)


def test_a_stage_over_its_limit_is_stopped_and_the_budget_is_kept(tmp_path, monkeypatch):
    stages = (
        _stage("slow", "import time; time.sleep(60)", 1.0),
        _stage("broken", "raise SystemExit(3)", 10.0),
        _stage("fine", "print('ok')", 10.0),
        _stage("too-long-for-the-rest", "print('never')", 100.0, optional=True),
    )
    monkeypatch.setattr(gpu_kit, "MIN_STAGE_S", 0.5)
    archive = gpu_kit.run_kit(tmp_path, stages=stages, budget=20.0, python=sys.executable)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    by_name = {s["name"]: s for s in manifest["stages"]}
    assert by_name["slow"]["status"] == "timeout" and by_name["slow"]["seconds"] < 15
    assert by_name["broken"]["status"] == "failed" and by_name["broken"]["returncode"] == 3
    assert by_name["fine"]["status"] == "passed"
    assert by_name["too-long-for-the-rest"]["status"] == "skipped"
    assert "budget" in by_name["too-long-for-the-rest"]["reason"]
    assert manifest["summary"]["timeout"] == ["slow"] and manifest["summary"]["failed"] == ["broken"]
    with tarfile.open(archive) as tar:
        log = next(n for n in tar.getnames() if n.endswith("/fine.log"))
        assert tar.extractfile(log).read().decode().strip() == "ok"
