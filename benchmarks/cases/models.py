"""Model-level cases: one training step of E2PANet against its reference backend and two baselines.

The step is what :class:`e2pa.engine.training.Trainer` runs: forward with energies and deep-supervision
targets, the full :class:`e2pa.model.losses.E2PALoss`, backward into every weight. Providers:

- ``ours`` / ``reference`` / ``torch``: the same E2PANet (same weights) on the auto, reference and
  (CPU) torch backends — gated against the float64 reference: logits, loss and every weight's gradient;
- ``ours+checkpointing``: the same network with ``use_checkpointing=True`` (encoder stages and
  decoder blocks recomputed in backward): the memory it saves and the time it costs, gated too;
- ``segresnet``: MONAI SegResNet (:class:`e2pa.model.baselines.SegResNetBaseline`), Dice-CE loss;
- ``concat-unet``: the same-size U-Net with concatenation fusion (E2PANet ``fusion="concat"``, no
  ESA), Dice-CE loss — the ablation's implicit baseline.

The baselines compute other functions, so they are timed and measured without a correctness claim.
Patches: 128³ on CUDA (BraTS training), 32³ on CPU (48³ too in the full sweep); batch 1, four
modalities. :data:`PATCH_EDGES` registers further edges, run by no suite, for the largest-patch
search (:mod:`benchmarks.max_patch`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.nn as nn

import e2pa_kernels
from e2pa.model.baselines import SegResNetBaseline
from e2pa.model.losses import E2PALoss
from e2pa.model.network import E2PANet
from e2pa.model.targets import regions_to_classes

from ..registry import Case, Provider, register

B, M, OUT = 1, 4, 3
F32 = torch.float32
SUITE_EDGES = {"cuda": {"quick": (128,), "full": (96, 128, 160)}, "cpu": {"quick": (32,), "full": (32, 48)}}
PATCH_EDGES = tuple(range(16, 257, 16))  # every multiple of 16 up to 256: candidates of the largest-patch search
MODELS: dict[str, Callable[[], nn.Module]] = {
    "e2pa": lambda: E2PANet(),
    "e2pa-checkpointed": lambda: E2PANet(use_checkpointing=True),  # same modules, so the same weights
    "concat-unet": lambda: E2PANet(fusion="concat", esa_levels=()),
    "segresnet": lambda: SegResNetBaseline(),
}


def weight_seed(case_name: str) -> int:
    """The seed every provider of a case (and its truth) draws its weights from."""
    return zlib.crc32(f"{case_name}/weights".encode())


class TrainingStep(nn.Module):
    """``(image [B, 4, *S], regions [B, 3, *S]) -> (logits [B, 3, *S], loss [])`` of one model on one
    backend, from weights drawn once from ``weight_seed``. The weights follow the inputs' dtype and
    device (kept as float64 masters, so every dtype starts from the same values); the loss is built
    fresh per call so its cohort prototypes never carry state from one call to the next."""

    def __init__(self, model: str, backend_name: str, weight_seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weight_seed)
            self.model = MODELS[model]()
        self.energies = model.startswith("e2pa")
        self.backend_name = backend_name
        self._masters = {n: p.detach().to(torch.float64, copy=True) for n, p in self.model.named_parameters()}
        self._placed: tuple[torch.dtype, torch.device] | None = None

    def _place(self, dtype: torch.dtype, device: torch.device) -> None:
        if self._placed != (dtype, device):
            for name, p in self.model.named_parameters():
                p.data = self._masters[name].to(device, dtype)
            self._placed = (dtype, device)

    def forward(self, image: torch.Tensor, regions: torch.Tensor):
        self._place(image.dtype, image.device)
        with e2pa_kernels.use_backend(self.backend_name):
            if self.energies:
                logits, energies = self.model(image, target=regions_to_classes(regions), return_energies=True)
                loss, _ = E2PALoss(len(self.model.features)).to(image.device)(logits, regions, energies)
            else:
                logits = self.model(image)
                loss, _ = E2PALoss(1, lambda_ds=0, lambda_ehf=0, lambda_esa=0)(logits, regions, None)
        return logits, loss


def _provider(name: str, model: str, backend_name: str, devices=("cpu", "cuda"), gated=True) -> Provider:
    def build(case: Case):
        return TrainingStep(model, backend_name, weight_seed(case.name))

    def identity(case: Case, inputs) -> str:
        if not model.startswith("e2pa"):
            return f"model:{model}"
        with e2pa_kernels.use_backend(backend_name):
            return f"{model}:{e2pa_kernels.select_backend(inputs['image'])}"

    return Provider(name=name, build=build, identity=identity, devices=devices, gated=gated)


MODEL_PROVIDERS = (
    _provider("ours", "e2pa", "auto"),
    _provider("reference", "e2pa", "reference"),
    _provider("torch", "e2pa", "torch", devices=("cpu",)),
    _provider("ours+checkpointing", "e2pa-checkpointed", "auto"),
    _provider("segresnet", "segresnet", "auto", gated=False),
    _provider("concat-unet", "concat-unet", "auto", gated=False),
)


class _ReferenceStep:
    """The case's float64 truth: the reference-backend E2PANet step, built on first use (registering
    every candidate patch edge must not build a network for each)."""

    def __init__(self, case_name: str):
        self.case_name = case_name
        self._step: TrainingStep | None = None

    def _built(self) -> TrainingStep:
        if self._step is None:
            self._step = TrainingStep("e2pa", "reference", weight_seed(self.case_name))
        return self._step

    def __call__(self, **inputs):
        return self._built()(**inputs)

    def named_parameters(self):
        return self._built().named_parameters()


def model_case(edge: int, plans, parameters: dict[str, int]) -> Case:
    """The E2PANet training step on a ``edge³`` patch."""
    name = f"E2PANet/step-{edge}^3"

    def make_inputs(device, gen):
        regions = (torch.rand(B, OUT, edge, edge, edge, generator=gen, device=device) < 0.3).float()
        regions[:, 0] *= regions[:, 1]  # BraTS nesting: ET ⊂ TC ⊂ WT (channels TC, WT, ET)
        regions[:, 2] *= regions[:, 0]
        return dict(image=torch.randn(B, M, edge, edge, edge, generator=gen, device=device), regions=regions)

    return Case(
        name=name,
        op="E2PANet",
        kind="model",
        params=dict(edge=edge, B=B, M=M, **parameters),
        make_inputs=make_inputs,
        reference=_ReferenceStep(name),
        providers=MODEL_PROVIDERS,
        grad_names=(),
        output_names=("logits", "loss"),
        plans=plans,
        baselines=("reference",),
    )


def _register_all() -> None:
    parameters = {f"parameters_{name}": sum(p.numel() for p in build().parameters()) for name, build in MODELS.items()}
    for edge in sorted(
        set(PATCH_EDGES) | {e for by_suite in SUITE_EDGES.values() for es in by_suite.values() for e in es}
    ):
        plans = {
            device: {suite: (F32,) for suite, edges in by_suite.items() if edge in edges}
            for device, by_suite in SUITE_EDGES.items()
        }
        register(model_case(edge, {d: p for d, p in plans.items() if p}, parameters))


_register_all()
