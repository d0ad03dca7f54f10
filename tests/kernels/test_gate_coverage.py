"""The compile gate's list covers what the launchers launch: each op's launchers are called (on meta
tensors, with the GPU configs of ``launch_as_gpu``) over a sample of their input ranges -- dtypes, sizes up
to the Triton limits and past 2^31 elements, optional inputs present or not -- with the kernels replaced by a
recorder; every recorded launch (its constexprs, options, and argument types as Triton's JIT specialises
them) must be covered by a variant of ``gpu_compile_specs()`` (``_kernel_spec.covers``). No kernel runs and
nothing is compiled here: tests/kernels/test_gpu_compile.py compiles the list.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import random

import pytest
import torch

from e2pa_kernels._kernel_spec import KernelSpec, covers, heaviest, split_meta
from e2pa_kernels._runtime import launch_as_gpu

fe = importlib.import_module("e2pa_kernels.free_energy")
ep = importlib.import_module("e2pa_kernels.energy_propagate")
ef = importlib.import_module("e2pa_kernels.energy_fusion")
fa = importlib.import_module("e2pa_kernels.factor_align")
se = importlib.import_module("e2pa_kernels.symeig")

mangle_type = pytest.importorskip("triton.runtime.jit").mangle_type

KERNELS = {
    fe: ("_free_energy_fwd_kernel", "_free_energy_bwd_kernel"),
    ep: ("_energy_propagate_fwd_kernel", "_energy_propagate_bwd_kernel"),
    ef: ("_energy_fusion_fwd_kernel", "_energy_fusion_bwd_kernel"),
    fa: ("_factor_align_fwd_kernel", "_factor_align_bwd_kernel"),
    se: ("_jacobi_kernel",),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
META = torch.device("meta")
LIST = {module: module.gpu_compile_specs() for module in KERNELS}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch as a
    KernelSpec whose signature holds the types the JIT would specialise the arguments to."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = self.kernel.arg_names
            bound = dict(zip(names, args)) | kwargs
            constexprs, warps, maxnreg = split_meta(kwargs)
            declared = inspect.signature(self.kernel.fn).parameters
            signature = {}
            for name in names:
                if "constexpr" in str(declared[name].annotation):
                    assert name in constexprs, f"constexpr {name} not passed by keyword"
                    continue
                ty = mangle_type(bound[name], True)
                signature[name] = "constexpr:1" if ty == "constexpr" and bound[name] == 1 else ty
            self.launches.append(
                KernelSpec(self.kernel.fn.__name__, self.kernel, signature, constexprs, warps, maxnreg=maxnreg)
            )

        return launch


@pytest.fixture
def record(monkeypatch):
    """Replace every kernel by a recorder; yields the list the launches land in (GPU configs inside)."""
    launches: list[KernelSpec] = []
    for module, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, Recorder(getattr(module, name), launches))
    with launch_as_gpu():
        yield launches


def _uncovered(launches: list[KernelSpec]) -> list[str]:
    missing = []
    for launch in launches:
        module = next(m for m, names in KERNELS.items() if launch.kernel.fn.__name__ in names)
        rules = dict(
            flags=getattr(module, "COVERED_FLAGS", ()),
            guarded=getattr(module, "GUARDED_ARGS", {}),
            widened=getattr(module, "WIDENED_ARGS", ()),
        )
        if not any(covers(spec, launch, **rules) for spec in LIST[module]):
            missing.append(f"{launch.label} {launch.constexprs} warps={launch.num_warps} maxnreg={launch.maxnreg}")
    return missing


def _x(B, M, C, N, dtype, rng):
    """[B, M, C, N] on meta, unit stride along N; sometimes a channel/modality slice of a larger tensor."""
    if rng.random() < 0.3:
        return torch.empty((B, M + 1, C + 3, N), dtype=dtype, device=META)[:, 1:, 2 : 2 + C]
    return torch.empty((B, M, C, N), dtype=dtype, device=META)


def _n(rng, big: bool, per_voxel: int) -> int:
    """Voxels per sample: small, or enough that one tensor passes 2^31 elements (64-bit offsets)."""
    return (2**31 // per_voxel) + rng.randrange(1, 4096) if big else rng.choice((1, 7, 16, 4096, 128**3))


def test_free_energy_launches_are_covered(record):
    rng = random.Random(0)
    for _ in range(160):
        dtype = rng.choice(DTYPES)
        K, C, M, B = rng.randint(1, fe.TRITON_MAX_CLASSES), rng.randint(1, 160), rng.randint(1, 8), rng.randint(1, 2)
        N = _n(rng, rng.random() < 0.2, M * C)
        x = _x(B, M, C, N, dtype, rng)
        weight = torch.empty((K, C), dtype=rng.choice(DTYPES), device=META)
        bias = torch.empty((K,), dtype=weight.dtype, device=META) if rng.random() < 0.7 else None
        target = torch.empty((B, N), dtype=torch.int64, device=META) if rng.random() < 0.7 else None
        present = torch.empty((B, M), dtype=torch.bool, device=META) if rng.random() < 0.5 else None
        fe.free_energy_fwd(x, weight, bias, target, 1.0, -100, present=present)
        d_energy = torch.empty((B, M, N), dtype=dtype, device=META) if rng.random() < 0.8 else None
        d_ce = torch.empty((B, M, N), dtype=dtype, device=META) if rng.random() < 0.7 else None
        dx = torch.empty((B, M, C, N), dtype=dtype, device=META) if rng.random() < 0.4 else None
        fe.free_energy_bwd(x, weight, bias, target, 1.0, -100, d_energy, d_ce, dx=dx, present=present)
    assert len(record) == 320
    assert not _uncovered(record), "\n".join(_uncovered(record))


def test_energy_propagate_launches_are_covered(record):
    rng = random.Random(1)
    for _ in range(160):
        dtype = rng.choice(DTYPES)
        M, B, steps = rng.randint(1, ep.TRITON_MAX_MODALITIES), rng.randint(1, 2), rng.randint(1, ep.MAX_STEPS)
        C = rng.choice((rng.randint(1, 40), rng.randint(1, 300)))
        N = _n(rng, rng.random() < 0.2, M * C)
        x = _x(B, M, C, N, dtype, rng)
        xi0 = torch.empty((B, C, N), dtype=dtype, device=META)
        prior = torch.empty((B, M, N), dtype=dtype, device=META) if rng.random() < 0.6 else None
        present = torch.empty((B, M), dtype=torch.bool, device=META) if rng.random() < 0.5 else None
        ep.energy_propagate_fwd(x, xi0, prior, 1.0, steps, present=present)
        ups = [t if rng.random() < 0.7 else None for t in (xi0, prior if prior is not None else xi0[:, :M], None)]
        d_e = torch.empty((B, steps + 1, N), dtype=dtype, device=META) if rng.random() < 0.7 else None
        ep.energy_propagate_bwd(x, xi0, prior, 1.0, steps, ups[0], ups[1], d_e, present=present)
    assert len(record) == 320
    assert not _uncovered(record), "\n".join(_uncovered(record))


def test_energy_fusion_launches_are_covered(record):
    """The one-pass kernels, and the ops' kernels on the levels that do not fit (wide C, K > 16, huge N)."""
    rng = random.Random(2)
    one_pass = 0
    for _ in range(160):
        dtype = rng.choice(DTYPES)
        M, B, steps = rng.randint(1, 8), rng.randint(1, 2), rng.randint(1, 8)
        C = rng.choice((rng.randint(1, 70), rng.randint(1, 300)))
        K = rng.choice((rng.randint(1, 16), rng.randint(1, 64)))
        N = _n(rng, rng.random() < 0.15, M * C)
        x = _x(B, M, C, N, dtype, rng)
        weight = torch.empty((K, C), dtype=rng.choice(DTYPES), device=META)
        bias = torch.empty((K,), dtype=weight.dtype, device=META) if rng.random() < 0.7 else None
        mask = torch.empty((B, M), dtype=torch.bool, device=META) if rng.random() < 0.6 else None
        xi0 = torch.empty((B, C, N), dtype=dtype, device=META) if rng.random() < 0.5 else None
        target = torch.empty((B, N), dtype=torch.int64, device=META) if rng.random() < 0.6 else None
        params = ef.FusionParams(1.0, 1.0, 1.0, steps, -100)
        *outs, saved = ef.energy_fusion_fwd(x, weight, bias, mask, xi0, target, params)
        one_pass += not saved
        ups = [o if o is not None and rng.random() < 0.7 else None for o in outs]
        ef.energy_fusion_bwd(x, weight, bias, mask, xi0, target, saved, params, *ups)
    assert 20 < one_pass < 140, one_pass  # both paths sampled
    assert not _uncovered(record), "\n".join(_uncovered(record))


def test_factor_align_launches_are_covered(record):
    rng = random.Random(3)
    for _ in range(120):
        dtype = rng.choice(DTYPES)
        r = rng.randint(1, fa.TRITON_MAX_RANK)
        C, M, B = rng.randint(r, r + 100), rng.randint(1, fa.TRITON_MAX_MODALITIES), rng.randint(1, 3)
        big = rng.random()
        # a [C, N] slab past 2^31 elements (INT64), or only a sample's M · C · N (64-bit base strides)
        N = (2**31 // C) + 5 if big < 0.15 else (2**31 // (M * C)) + 5 if big < 0.3 else rng.randint(1, 5000)
        x = _x(B, M, C, N, dtype, rng)
        fused = torch.empty((B, C, N), dtype=dtype, device=META)
        basis = torch.empty((rng.choice((1, B)), C, r), dtype=rng.choice(DTYPES), device=META)
        fa.factor_align_fwd(x, fused, basis, 1e-6)
        fa.factor_align_bwd(x, fused, basis, 1e-6, None, None, None)
    assert len(record) == 240
    assert not _uncovered(record), "\n".join(_uncovered(record))


def test_symeig_launches_are_covered(record):
    for n in (1, 2, 7, 64, 255, se.TRITON_MAX_N):
        se.jacobi_eigh_fwd(torch.empty((2, n, n), dtype=torch.float64, device=META))
    assert len(record) == 6
    assert not _uncovered(record), "\n".join(_uncovered(record))


def test_a_launch_the_list_lacks_is_not_covered(record):
    """The check can fail: the same launch with another voxel tile, another dtype or a flag the list has only
    set is not covered; with the flag left False (what the heaviest variant covers) it is."""
    x = torch.empty((1, 4, 32, 4096), dtype=torch.float16, device=META)
    weight = torch.empty((4, 32), dtype=torch.float32, device=META)
    fe.free_energy_fwd(x, weight, None, None, 1.0, -100)
    (launch,) = record
    assert not _uncovered([launch])
    wider = {**launch.constexprs, "BLOCK_N": 2 * launch.constexprs["BLOCK_N"]}
    other_tile = dataclasses.replace(launch, constexprs=wider)
    other_dtype = dataclasses.replace(launch, signature={**launch.signature, "x_ptr": "*fp32"})
    other_warps = dataclasses.replace(launch, num_warps=2 * launch.num_warps)
    assert _uncovered([other_tile]) and _uncovered([other_dtype]) and _uncovered([other_warps])
    assert launch.constexprs["HAS_BIAS"] is False  # covered by the listed variant with a bias


def test_heaviest_keeps_the_variant_with_every_flag_of_its_group():
    def spec(tile, mask, prior):
        return KernelSpec("s", _FakeKernel, {"x": "*fp32"}, dict(BLOCK=tile, HAS_MASK=mask, HAS_PRIOR=prior), 4)

    specs = [spec(t, m, p) for t in (16, 32) for m in (False, True) for p in (False, True)]
    specs.append(spec(64, False, False))  # a tile only ever launched without either flag
    chosen = heaviest(specs, ("HAS_MASK", "HAS_PRIOR"))
    assert [(s.constexprs["BLOCK"], s.constexprs["HAS_MASK"], s.constexprs["HAS_PRIOR"]) for s in chosen] == [
        (16, True, True),
        (32, True, True),
        (64, False, False),
    ]
    with pytest.raises(ValueError, match="heaviest"):
        heaviest([spec(16, True, False), spec(16, False, True)], ("HAS_MASK", "HAS_PRIOR"))


class _FakeKernel:
    pass
