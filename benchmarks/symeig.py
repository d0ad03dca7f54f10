"""The sync-free Jacobi eigensolver (``e2pa_kernels.symeig``) against ``torch.linalg.eigh``, at ESA's sizes.

    python -m benchmarks.symeig --device cuda --out DIR                 # C = 32, 64, 128, 256; batch 2
    TRITON_INTERPRET=1 python -m benchmarks.symeig --device cpu --sizes 5,8 --out DIR   # the CPU dry run

Per size ``C``: the float64 second moment ``(1/N) Σ f̂ f̂ᵀ`` of ``B`` samples of unit vectors (ESA's input,
``N`` = 4096 voxels), then, timed (CUDA: ``triton.testing.do_bench``, CUDA events, median and 20/80th
percentiles; CPU: one interpreted call, which says nothing about speed):

- ``jacobi``: ``symeig.top_eigenvectors(G, r)`` — what ``factor_basis`` runs on the triton backend;
- ``eigh``: ``reference.top_eigenvectors(G, r)`` (``torch.linalg.eigh``; on CUDA cuSOLVER, with its host
  read of ``info``) — what it runs on the torch backend;
- ``host_ms``: wall-clock per call with the host waiting for the result (``torch.cuda.synchronize``), which
  also counts eigh's synchronisation and launch overheads.

And the accuracy of Jacobi against eigh (max eigenvalue error over ``‖G‖``, residual ``‖GV − VΛ‖``,
orthogonality ``‖VᵀV − I‖``, the top-r projector's max difference) and the sweeps it ran. With
``--configs`` (CUDA) the kernel's candidate block sizes / warps are timed too at the largest size, to pick
the launcher's config from a measurement. Writes ``symeig.json`` and ``symeig.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger("benchmarks.symeig")

SIZES = (32, 64, 128, 256)
BATCH, RANK, VOXELS = 2, 8, 4096
# candidate (BLOCK_P, BLOCK_R, BLOCK_N, num_warps); the launcher's own is timed as "jacobi"
CANDIDATES = ((32, 32, 64, 8), (16, 32, 32, 8), (32, 128, 64, 16), (16, 64, 64, 4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.symeig", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True, help="folder for symeig.json and symeig.md")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated matrix sizes C")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--configs", action="store_true", help="also time the candidate kernel configs (CUDA)")
    args = parser.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    return args


def second_moment(batch: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """ESA's input: (1/N) Σ_v f̂ f̂ᵀ of anisotropic unit vectors, [batch, n, n] float64."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mix = torch.randn(batch, n, n, generator=gen, dtype=torch.float64) * torch.linspace(
        1.0, 0.05, n, dtype=torch.float64
    )
    f = (mix @ torch.randn(batch, n, VOXELS, generator=gen, dtype=torch.float64)).to(device)
    f = f / f.norm(dim=1, keepdim=True)
    return f @ f.transpose(1, 2) / VOXELS


def _time(fn, device: torch.device) -> dict:
    if device.type != "cuda":  # the interpreter: one call, for the record only
        t0 = time.perf_counter()
        fn()
        return {"median_ms": (time.perf_counter() - t0) * 1e3, "p20_ms": None, "p80_ms": None, "host_ms": None}
    from .timing import measure

    timing = measure(fn, device)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        fn()
        torch.cuda.synchronize(device)
    host = (time.perf_counter() - t0) * 1e3 / 10
    return {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "host_ms": host}


def accuracy(g: torch.Tensor, rank: int) -> dict:
    from e2pa_kernels import reference, symeig

    values, vectors = symeig.eigh(g)
    ref_values, _ = torch.linalg.eigh(g)
    n = g.shape[-1]
    norm = torch.linalg.matrix_norm(g, ord=2)
    top, ref_top = symeig.top_eigenvectors(g, rank), reference.top_eigenvectors(g, rank)
    return {
        "eigenvalue_error_rel": ((values - ref_values).abs().amax(1) / norm).max().item(),
        "residual_rel": (torch.linalg.matrix_norm(g @ vectors - vectors * values[:, None, :], ord=1) / norm)
        .max()
        .item(),
        "orthogonality": torch.linalg.matrix_norm(
            vectors.transpose(1, 2) @ vectors - torch.eye(n, dtype=g.dtype, device=g.device), ord=1
        )
        .max()
        .item(),
        "projector_error": (top @ top.transpose(1, 2) - ref_top @ ref_top.transpose(1, 2)).abs().max().item(),
        "sweeps": symeig.jacobi_eigh_fwd(g)[2].tolist(),
    }


def run(args: argparse.Namespace) -> dict:
    from e2pa_kernels import reference, symeig

    from .machine import describe

    device = torch.device(args.device)
    rows, configs = [], []
    for n in args.sizes:
        rank = min(args.rank, n)
        g = second_moment(args.batch, n, device)
        row = {"n": n, "batch": args.batch, "rank": rank, **accuracy(g, rank)}
        row["jacobi"] = _time(lambda g=g, r=rank: symeig.top_eigenvectors(g, r), device)
        row["eigh"] = _time(lambda g=g, r=rank: reference.top_eigenvectors(g, r), device)
        logger.info("C=%d: jacobi %.3f ms, eigh %.3f ms", n, row["jacobi"]["median_ms"], row["eigh"]["median_ms"])
        rows.append(row)
    if args.configs and device.type == "cuda" and args.sizes:
        n = max(args.sizes)
        g = second_moment(args.batch, n, device)
        for p, r, c, w in CANDIDATES:
            config = dict(BLOCK_P=p, BLOCK_R=r, BLOCK_N=c, num_warps=w)
            try:
                timing = _time(lambda g=g, config=config: symeig.jacobi_eigh_fwd(g, config=config), device)
            except Exception as exc:  # a candidate that does not compile here: recorded, the others still run
                timing = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            configs.append({"n": n, **config, **timing})
    return {"machine": describe(device), "launcher_config": symeig.launcher_config(), "sizes": rows, "configs": configs}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Jacobi eigensolver vs torch.linalg.eigh — {m['device_name']}",
        "",
        f"torch {m['torch']}, triton {m['triton']}, commit {m['git_commit']}, {m['date_utc']}; "
        f"launcher config {result['launcher_config']}",
        "",
        "| C | B | jacobi ms (p20–p80) | eigh ms (p20–p80) | jacobi host ms | eigh host ms | sweeps | "
        "eigenvalue err/‖G‖ | residual/‖G‖ | ‖VᵀV−I‖ | projector err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(t, key="median_ms"):
        return "—" if t.get(key) is None else f"{t[key]:.3f}"

    for r in result["sizes"]:
        j, e = r["jacobi"], r["eigh"]
        lines.append(
            f"| {r['n']} | {r['batch']} | {ms(j)} ({ms(j, 'p20_ms')}–{ms(j, 'p80_ms')}) | {ms(e)} "
            f"({ms(e, 'p20_ms')}–{ms(e, 'p80_ms')}) | {ms(j, 'host_ms')} | {ms(e, 'host_ms')} | {r['sweeps']} | "
            f"{r['eigenvalue_error_rel']:.1e} | {r['residual_rel']:.1e} | {r['orthogonality']:.1e} | "
            f"{r['projector_error']:.1e} |"
        )
    if result["configs"]:
        lines += ["", "| config (C = {}) | ms |".format(result["configs"][0]["n"]), "|---|---|"]
        for c in result["configs"]:
            name = f"P{c['BLOCK_P']} R{c['BLOCK_R']} N{c['BLOCK_N']} w{c['num_warps']}"
            lines.append(f"| {name} | {c.get('error') or ms(c)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="symeig %(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.device == "cuda" and not torch.cuda.is_available():
        logger.error("--device cuda: torch sees no CUDA device")
        return 2
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "symeig.json").write_text(json.dumps(result, indent=2))
    (args.out / "symeig.md").write_text(markdown(result))
    logger.info("wrote %s", args.out / "symeig.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
