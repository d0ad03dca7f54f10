"""Layer-level cases: the EHF and ESA layers of :mod:`e2pa.model.layers` as the network runs them.

- ``EHF/level0``: the first level (``ξ_0`` = masked modality mean): the shared head's free energies,
  the prior, the propagation — the layer behind issue #7's CPU memory target;
- ``EHF/rawscores-level0``: level 0 in the first formulation (``score_norm="none"``), beside the default
  normalised fusion in the same run;
- ``EHF/level1``: a deeper level, whose ``ξ_0 = ψ(F^(0))`` is a stride-2 convolution of the finer
  level's fused feature (so its cost includes that convolution);
- ``ESA``: the alignment energy on a 32³ × 64 level, with the per-sample eigen basis (no gradient
  through the basis) and with a learned one.

Each case is the layer's forward as a function of its inputs *and* its parameters
(``torch.func.functional_call``), so the float64 truth, the gate and the gradients cover the
weights too. Sizes: batch 1, the four BraTS modalities, the network's default channels at that
level (one case per device: on CPU every edge is divided by 4, as for the ops). Backends as for the
ops: ``ours`` (auto), ``reference`` (plain autograd), ``compile`` (``torch.compile`` of the layer on the reference
backend) and, on CPU, ``torch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch._functorch.config
from torch.func import functional_call

import e2pa_kernels
from e2pa.model.layers import EHF, ESA

from ..providers import backend
from ..registry import Case, Provider, register

B, M, CLASSES, STEPS = 1, 4, 4, 3
CPU_EDGE_DIVISOR = 4
F32, BF16 = torch.float32, torch.bfloat16
# (case suffix, level edge on CUDA, channels, previous channels) — E2PANet's default features (16, 32, 64, 128)
# at a 128³ patch: level l has edge 128 / 2^l
EHF_LEVELS = (("level0", 128, 16, None, "rms"), ("level1", 64, 32, 16, "rms"))
# the first formulation (raw scores, ξ as the fused feature; `EHF(score_norm="none")`) at level 0: what the
# normalised fusion (the default since issue #14) costs in time and memory, measured in the same run
EHF_FIRST_FORMULATION = ("rawscores-level0", 128, 16, None, "none")
# level 2 of a 128³ patch (the default network puts ESA on the deepest, 16³ × 128, a quarter of this
# work); on CPU halved, not quartered: a 4³ grid would time Python, not the layer
ESA_LEVEL, ESA_CPU_DIVISOR = (32, 64), 2
ESA_RANK = 8


# device type -> (edge divisor, suite -> dtypes); the full sweep adds bf16 on CUDA
DEVICE_PLANS = {
    "cuda": (1, {"quick": (F32,), "full": (F32, BF16)}),
    "cpu": (CPU_EDGE_DIVISOR, {"quick": (F32,), "full": (F32,)}),
}


def _seeded_module(factory: Callable[[], torch.nn.Module], gen: torch.Generator) -> torch.nn.Module:
    """``factory()`` with its parameters initialised from ``gen`` (so every process builds the same)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _parameters(module: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    return {name: p.detach().to(device) for name, p in module.named_parameters()}


def _reference_backend(call: Callable[..., Any]) -> Callable[..., Any]:
    def reference(**inputs):
        with e2pa_kernels.use_backend("reference"):
            return call(**inputs)

    return reference


def _compiled_layer() -> Provider:
    """``torch.compile`` of the layer running on the reference backend (fixed shapes): the best
    PyTorch does with the layer's own math."""

    def build(case: Case):
        torch._dynamo.reset()
        torch._functorch.config.donated_buffer = False  # see providers.compiled_reference
        compiled = torch.compile(case.call, dynamic=False)
        return _reference_backend(compiled)

    return Provider(name="compile", build=build, identity=lambda case, inputs: "compile:reference")


LAYER_PROVIDERS = (
    backend("ours", "auto"),
    backend("reference", "reference"),
    _compiled_layer(),
    backend("torch", "torch", devices=("cpu",)),
)


def _ehf_case(
    device_type: str, suffix: str, edge_cuda: int, C: int, previous_channels: int | None, score_norm: str
) -> Case:
    divisor, plans = DEVICE_PLANS[device_type]
    edge = edge_cuda // divisor

    def factory():
        # β/√C as E2PANet builds its levels
        return EHF(
            3,
            C,
            M,
            CLASSES,
            beta=1.0 / math.sqrt(C),
            steps=STEPS,
            previous_channels=previous_channels,
            score_norm=score_norm,
        )

    template = factory()
    param_names = tuple(name for name, _ in template.named_parameters())

    def make_inputs(device, gen):
        inputs = dict(x=torch.randn(B, M, C, edge, edge, edge, generator=gen, device=device))
        if previous_channels is not None:
            inputs["previous"] = torch.randn(
                B, previous_channels, 2 * edge, 2 * edge, 2 * edge, generator=gen, device=device
            )
        inputs.update(_parameters(_seeded_module(factory, gen), device))
        return inputs

    def call(x, previous=None, **params):
        fused, info = functional_call(template, params, (x,), dict(previous=previous, return_energies=True))
        return fused, info.energies, info.trace

    grad_names = ("x",) + (("previous",) if previous_channels is not None else ()) + param_names
    return Case(
        name=f"EHF/{suffix}-{edge}^3-C{C}",
        op="EHF",
        kind="layer",
        params=dict(
            edge=edge, C=C, K=CLASSES, M=M, B=B, steps=STEPS, previous_channels=previous_channels, score_norm=score_norm
        ),
        make_inputs=make_inputs,
        call=call,
        reference=_reference_backend(call),
        providers=LAYER_PROVIDERS,
        grad_names=grad_names,
        output_names=("fused", "energies", "trace"),
        plans={device_type: plans},
    )


def _esa_case(device_type: str, basis: str) -> Case:
    edge_cuda, C = ESA_LEVEL
    plans = DEVICE_PLANS[device_type][1]
    edge = edge_cuda // (ESA_CPU_DIVISOR if device_type == "cpu" else 1)

    def factory():
        return ESA(C, ESA_RANK, basis=basis)

    template = factory()
    param_names = tuple(name for name, _ in template.named_parameters())

    def make_inputs(device, gen):
        x = torch.randn(B, M, C, edge, edge, edge, generator=gen, device=device)
        inputs = dict(
            x=x, fused=x.mean(dim=1) + 0.5 * torch.randn(B, C, edge, edge, edge, generator=gen, device=device)
        )
        inputs.update(_parameters(_seeded_module(factory, gen), device))
        return inputs

    def call(x, fused, **params):
        energy, details = functional_call(template, params, (x, fused), dict(return_details=True))
        return energy, details.alignment, details.moments

    return Case(
        name=f"ESA/{basis}-{edge}^3-C{C}-r{ESA_RANK}",
        op="ESA",
        kind="layer",
        params=dict(edge=edge, C=C, r=ESA_RANK, M=M, B=B, basis=basis),
        make_inputs=make_inputs,
        call=call,
        reference=_reference_backend(call),
        providers=LAYER_PROVIDERS,
        grad_names=("x", "fused") + param_names,
        output_names=("energy", "alignment", "moments"),
        plans={device_type: plans},
    )


for _device_type in DEVICE_PLANS:
    for _level in (*EHF_LEVELS, EHF_FIRST_FORMULATION):
        register(_ehf_case(_device_type, *_level))
    for _basis in ("eigh", "learned"):
        register(_esa_case(_device_type, _basis))
