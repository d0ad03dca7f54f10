"""Op-level cases: ``free_energy``, ``energy_propagate`` and ``factor_align`` on real 3-D levels.

Sizes follow the network: batch 1, 4 modalities (BraTS), and the first three encoder levels
(128³ voxels with 32 channels, 64³ with 64, 32³ with 128). The full sweep crosses those edges
with C in 32…320. On CPU every edge is divided by 4 (64× fewer voxels) so the quick run takes
minutes on a couple of cores.
"""

from __future__ import annotations

import collections
import math

import torch

import e2pa_kernels
from e2pa_kernels import reference

from ..cost_models import forward_and_backward, io_bytes
from ..providers import OP_PROVIDERS
from ..registry import Case, register

B, M = 1, 4
CLASSES = 4  # free_energy: background + 3 tumour classes
STEPS = 3  # energy_propagate
RANKS_QUICK, RANKS_FULL = (16,), (8, 16)  # factor_align

LEVELS = ((128, 32), (64, 64), (32, 128))  # (edge, channels) on CUDA
GRID_EDGES, GRID_CHANNELS = (128, 64, 32), (32, 64, 128, 256, 320)
CPU_EDGE_DIVISOR = 4
SMALL_CPU = (16, 64)  # the pytest-benchmark size

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = {
    ("cuda", "quick"): (F32, BF16),
    ("cuda", "full"): (F32, BF16, F16),
    ("cpu", "quick"): (F32,),
    ("cpu", "full"): (F32,),
    ("cpu", "small"): (F32,),
}


def _size_plans() -> dict[tuple[int, int], dict[str, dict[str, tuple[torch.dtype, ...]]]]:
    """(edge, channels) -> device type -> suite -> dtypes; one size can serve both devices."""
    plans: dict = collections.defaultdict(lambda: collections.defaultdict(dict))
    for device, divisor in (("cuda", 1), ("cpu", CPU_EDGE_DIVISOR)):
        for edge, C in LEVELS:
            plans[(edge // divisor, C)][device]["quick"] = DTYPES[(device, "quick")]
        for edge in GRID_EDGES:
            for C in GRID_CHANNELS:
                plans[(edge // divisor, C)][device]["full"] = DTYPES[(device, "full")]
    plans[SMALL_CPU]["cpu"]["small"] = DTYPES[("cpu", "small")]
    return {size: {d: dict(s) for d, s in by_device.items()} for size, by_device in plans.items()}


def _full_only(plans):
    """The plans of a variant that only the full sweep runs (e.g. the second factor rank)."""
    return {d: {"full": by_suite["full"]} for d, by_suite in plans.items() if "full" in by_suite}


def _free_energy_flops(p) -> dict[str, float]:
    return forward_and_backward(2.0 * p["B"] * p["M"] * p["edge"] ** 3 * p["C"] * p["K"])  # z = W·x


def _energy_propagate_flops(p) -> dict[str, float]:
    # scores ⟨x_m, ξ_t⟩ for t = 0…steps (shared by update and energy) and `steps` mixes Σ p_m x_m
    return forward_and_backward(2.0 * p["B"] * p["M"] * p["edge"] ** 3 * p["C"] * (2 * p["steps"] + 1))


def _factor_align_flops(p) -> dict[str, float]:
    # c = Uᵀv and ‖v‖ for the M modality vectors and the fused one, per voxel
    return forward_and_backward(2.0 * p["B"] * (p["M"] + 1) * p["edge"] ** 3 * p["C"] * (p["r"] + 1))


def _randn(gen, *shape, device):
    return torch.randn(*shape, generator=gen, device=device)


def _free_energy_case(edge: int, C: int, plans) -> Case:
    S = (edge,) * 3

    def make_inputs(device, gen):
        return dict(
            x=_randn(gen, B, M, C, *S, device=device),
            weight=_randn(gen, CLASSES, C, device=device) / math.sqrt(C),
            bias=0.1 * _randn(gen, CLASSES, device=device),
            target=torch.randint(0, CLASSES, (B, *S), generator=gen, device=device),
            temperature=1.0,
        )

    return Case(
        name=f"free_energy/{edge}^3-C{C}-K{CLASSES}",
        op="free_energy",
        kind="op",
        params=dict(edge=edge, C=C, K=CLASSES, B=B, M=M),
        make_inputs=make_inputs,
        call=e2pa_kernels.free_energy,
        reference=reference.free_energy,
        providers=OP_PROVIDERS,
        grad_names=("x", "weight", "bias"),
        output_names=("energy", "ce"),
        plans=plans,
        byte_model=io_bytes,
        flop_model=_free_energy_flops,
    )


def _energy_propagate_case(edge: int, C: int, plans) -> Case:
    S = (edge,) * 3

    def make_inputs(device, gen):
        # C^-1/4 keeps the scores β⟨x_m, ξ⟩ of order 1 at every C, so the softmax neither saturates
        # nor flattens; ξ0 is the mean of the modalities, as at level 0 of the network.
        x = _randn(gen, B, M, C, *S, device=device) * C**-0.25
        return dict(x=x, xi0=x.mean(dim=1), log_prior=_randn(gen, B, M, *S, device=device), beta=1.0, steps=STEPS)

    return Case(
        name=f"energy_propagate/{edge}^3-C{C}-steps{STEPS}",
        op="energy_propagate",
        kind="op",
        params=dict(edge=edge, C=C, steps=STEPS, B=B, M=M),
        make_inputs=make_inputs,
        call=e2pa_kernels.energy_propagate,
        reference=reference.energy_propagate,
        providers=OP_PROVIDERS,
        grad_names=("x", "xi0", "log_prior"),
        output_names=("xi", "weights", "energies"),
        plans=plans,
        byte_model=io_bytes,
        flop_model=_energy_propagate_flops,
    )


def _factor_align_case(edge: int, C: int, r: int, plans) -> Case:
    S = (edge,) * 3

    def make_inputs(device, gen):
        x = _randn(gen, B, M, C, *S, device=device)
        # a learned basis (orthonormal columns, with gradient): the heavier of the two uses in docs
        basis, _ = torch.linalg.qr(_randn(gen, C, r, device=device))
        return dict(
            x=x, fused=x.mean(dim=1) + 0.5 * _randn(gen, B, C, *S, device=device), basis=basis.contiguous(), eps=1e-6
        )

    return Case(
        name=f"factor_align/{edge}^3-C{C}-r{r}",
        op="factor_align",
        kind="op",
        params=dict(edge=edge, C=C, r=r, B=B, M=M),
        make_inputs=make_inputs,
        call=e2pa_kernels.factor_align,
        reference=reference.factor_align,
        providers=OP_PROVIDERS,
        grad_names=("x", "fused", "basis"),
        output_names=("dist", "mom1", "mom2"),
        plans=plans,
        byte_model=io_bytes,
        flop_model=_factor_align_flops,
    )


def _register_all() -> None:
    sizes = sorted(_size_plans().items(), key=lambda item: (-item[0][0], item[0][1]))  # large edges first
    for size, plans in sizes:
        register(_free_energy_case(*size, plans))
    for size, plans in sizes:
        register(_energy_propagate_case(*size, plans))
    for r in RANKS_FULL:
        for size, plans in sizes:
            rank_plans = plans if r in RANKS_QUICK else _full_only(plans)
            if any(rank_plans.values()):
                register(_factor_align_case(*size, r, rank_plans))


_register_all()
