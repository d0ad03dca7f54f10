"""EHF and ESA: every backend against the float64 reference (outputs and gradients, 2-D and 3-D),
no influence of masked modalities, mask validation, a MONAI network with EHF inside, and AMP."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _assert import assert_matches_reference
from monai.networks.nets import SegResNet

import e2pa_kernels
from e2pa import EHF, ESA

SPATIAL = {2: (4, 4), 3: (4, 4, 2)}
BATCH, MODALITIES, CHANNELS, CLASSES = 2, 3, 5, 4
# sample 0 lacks modality 1: every comparison covers the masked path too
MASK = torch.tensor([[True, False, True], [True, True, True]])


def _flat_outputs(out) -> list[torch.Tensor]:
    """Every tensor a layer returned, in a fixed order (dataclass fields after the main output)."""
    main, details = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    extra = [] if details is None else [getattr(details, name) for name in details.__dataclass_fields__]
    return [main] + [t for t in extra if isinstance(t, torch.Tensor)]


def _run(layer: torch.nn.Module, inputs: dict, backend: str, dtype: torch.dtype, upstream: list | None):
    """Outputs and gradients (inputs named in ``inputs['grad']`` and every parameter) of ``layer`` on
    ``backend`` at ``dtype``; ``upstream`` (float64, one per output) weighs each finite output."""
    layer = copy.deepcopy(layer).to(dtype)
    prepared = {
        k: (v.detach().to(dtype).requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    with e2pa_kernels.use_backend(backend):
        outs = _flat_outputs(layer(**prepared))
    if upstream is None:
        upstream = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    loss = sum(
        (torch.where(torch.isfinite(o), o, 0) * g.to(dtype)).sum() for o, g in zip(outs, upstream) if o.requires_grad
    )
    wrt = {k: v for k, v in prepared.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    wrt.update(dict(layer.named_parameters()))
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    return outs, dict(zip(wrt, grads)), upstream


def _check_backend(layer: torch.nn.Module, inputs: dict, backend: str) -> None:
    truth, truth_grads, upstream = _run(layer, inputs, "reference", torch.float64, None)
    same, same_grads, _ = _run(layer, inputs, "reference", torch.float32, upstream)
    outs, grads, _ = _run(layer, inputs, backend, torch.float32, upstream)
    for index, (o, t, s) in enumerate(zip(outs, truth, same)):
        assert_matches_reference(f"{backend} output {index}", o, t, s, torch.float32)
    for name, g in grads.items():
        assert (g is None) == (truth_grads[name] is None), f"d{name}: gradient presence differs"
        if g is not None:
            assert_matches_reference(f"{backend} d{name}", g, truth_grads[name], same_grads[name], torch.float32)


def _ehf_case(spatial_dims: int, hierarchical: bool, score_norm: str = "rms"):
    spatial = SPATIAL[spatial_dims]
    layer = EHF(
        spatial_dims,
        CHANNELS,
        MODALITIES,
        CLASSES,
        temperature=1.5,
        prior_temperature=2.0,
        beta=0.5,
        steps=2,
        previous_channels=3 if hierarchical else None,
        score_norm=score_norm,
    )
    inputs = dict(
        x=torch.randn(BATCH, MODALITIES, CHANNELS, *spatial),
        modality_mask=MASK,
        target=torch.randint(0, CLASSES, (BATCH, *spatial)),
        return_energies=True,
    )
    if hierarchical:
        inputs["previous"] = torch.randn(BATCH, 3, *(2 * s for s in spatial))
    return layer, inputs


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("hierarchical", [False, True], ids=["first_level", "from_previous"])
@pytest.mark.parametrize("score_norm", ["rms", "none"])
def test_ehf_backends_match_reference(backend, spatial_dims, hierarchical, score_norm):
    _check_backend(*_ehf_case(spatial_dims, hierarchical, score_norm), backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("basis", ["eigh", "learned"])
def test_esa_backends_match_reference(backend, spatial_dims, basis):
    spatial = SPATIAL[spatial_dims]
    layer = ESA(CHANNELS, rank=2, basis=basis, moment_weight=0.5)
    inputs = dict(
        x=torch.randn(BATCH, MODALITIES, CHANNELS, *spatial),
        fused=torch.randn(BATCH, CHANNELS, *spatial),
        modality_mask=MASK,
        return_details=True,
    )
    _check_backend(layer, inputs, backend)


def test_ehf_energies_are_consistent():
    layer, inputs = _ehf_case(3, hierarchical=False)
    fused, energies = layer(**inputs)
    assert fused.shape == (BATCH, CHANNELS, *SPATIAL[3])
    assert energies.energies.shape == energies.weights.shape == energies.ce.shape == (BATCH, MODALITIES, *SPATIAL[3])
    assert energies.trace.shape == (BATCH, layer.steps + 1, *SPATIAL[3])
    assert torch.isinf(energies.energies[0, 1]).all() and (energies.weights[0, 1] == 0).all()
    assert (energies.ce[0, 1] == 0).all()
    torch.testing.assert_close(energies.weights.sum(dim=1), torch.ones(BATCH, *SPATIAL[3]))
    assert (energies.trace[:, 1:] <= energies.trace[:, :-1] + 1e-4).all(), "the energy trace must not increase"


def test_esa_energy_formula():
    x, fused = torch.randn(BATCH, MODALITIES, CHANNELS, 4, 4), torch.randn(BATCH, CHANNELS, 4, 4)
    layer = ESA(CHANNELS, rank=3, moment_weight=0.25)
    energy, details = layer(x, fused, MASK, return_details=True)
    basis = e2pa_kernels.factor_basis(fused, 3)
    present = torch.where(MASK[:, :, None, None, None], x, 0)
    dist, mom1, mom2 = e2pa_kernels.reference.factor_align(present, fused, basis)
    mu, nu = mom1 / 16, mom2 / 16
    gap = ((mu[:, :3] - mu[:, 3:]) ** 2 + (nu[:, :3] - nu[:, 3:]) ** 2).sum(-1)
    expected = (dist * MASK).sum(1) / 16 + 0.25 * (gap * MASK).sum(1)
    torch.testing.assert_close(energy, expected)
    torch.testing.assert_close(details.basis.transpose(1, 2) @ details.basis, torch.eye(3).expand(BATCH, 3, 3))
    learned = ESA(CHANNELS, rank=3, basis="learned")
    basis = learned(x, fused, return_details=True)[1].basis
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# a masked modality has no influence
# ------------------------------------------------------------------------------------------------
def _outputs_and_gradients(layer, call):
    """(outputs, input gradient, parameter gradients) of ``call(layer, x)`` for a fixed input."""
    torch.manual_seed(5)
    x = torch.randn(BATCH, MODALITIES, CHANNELS, 4, 4)

    def run(poison: float | None):
        data = x.clone()
        if poison is not None:
            data[0, 1] = poison  # sample 0's absent modality
        data.requires_grad_(True)
        outs = _flat_outputs(call(layer, data))
        loss = sum(
            (torch.where(torch.isfinite(o), o, 0) * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum()
            for o in outs
            if o.requires_grad
        )
        layer.zero_grad()
        loss.backward()
        return outs, data.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    return run


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e6])
@pytest.mark.parametrize("fusion", ["energy", "mean", "concat"])
def test_ehf_masked_modality_has_no_influence(poison, fusion):
    layer = EHF(2, CHANNELS, MODALITIES, CLASSES, fusion=fusion)
    target = torch.randint(0, CLASSES, (BATCH, 4, 4))
    run = _outputs_and_gradients(layer, lambda m, x: m(x, MASK, target=target, return_energies=True))
    clean, poisoned = run(None), run(poison)
    for a, b in zip(clean[0], poisoned[0]):
        torch.testing.assert_close(a, b, equal_nan=False)
    torch.testing.assert_close(clean[1], poisoned[1])
    assert (poisoned[1][0, 1] == 0).all(), "the absent modality must receive no gradient"
    assert clean[2].keys() == poisoned[2].keys()
    for name in clean[2]:
        torch.testing.assert_close(clean[2][name], poisoned[2][name], msg=f"gradient of {name}")


@pytest.mark.parametrize("basis", ["eigh", "learned"])
def test_esa_masked_modality_has_no_influence(basis):
    layer = ESA(CHANNELS, rank=2, basis=basis)
    fused = torch.randn(BATCH, CHANNELS, 4, 4)
    run = _outputs_and_gradients(layer, lambda m, x: m(x, fused, MASK, return_details=True))
    clean, poisoned = run(None), run(float("nan"))
    # dist / moments of the absent modality are reported from zeroed features: compare all outputs
    for a, b in zip(clean[0], poisoned[0]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(clean[1], poisoned[1])
    assert (poisoned[1][0, 1] == 0).all()


# ------------------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(BATCH, MODALITIES), "modality_mask must have dtype bool"),
        (torch.ones(BATCH, MODALITIES + 1, dtype=torch.bool), r"modality_mask must have shape \[B, M\] = \[2, 3\]"),
        (torch.ones(3, MODALITIES, dtype=torch.bool), r"modality_mask must have shape"),
        (torch.tensor([[True, True, False], [False, False, False]]), r"modality_mask: sample\(s\) \[1\] have no"),
        ([[True, True, True]] * 2, "modality_mask must be a bool torch.Tensor"),
    ],
)
def test_invalid_masks_raise_naming_the_argument(mask, message):
    x = torch.randn(BATCH, MODALITIES, CHANNELS, 4, 4)
    with pytest.raises((ValueError, TypeError), match=message):
        EHF(2, CHANNELS, MODALITIES, CLASSES)(x, mask)
    with pytest.raises((ValueError, TypeError), match=message):
        ESA(CHANNELS, 2)(x, x[:, 0], mask)


def test_shared_mask_broadcasts_over_the_batch():
    layer, x = EHF(2, CHANNELS, MODALITIES, CLASSES), torch.randn(BATCH, MODALITIES, CHANNELS, 4, 4)
    shared = torch.tensor([True, False, True])
    torch.testing.assert_close(layer(x, shared), layer(x, shared.expand(BATCH, -1)))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: EHF(4, 8, 2, 4), "EHF: spatial_dims must be 2 or 3"),
        (lambda: EHF(3, 8, 2, 1), "EHF: num_classes must be >= 2"),
        (lambda: EHF(3, 8, 2, 4, beta=0.0), "EHF: beta must be a finite positive"),
        (lambda: EHF(3, 8, 2, 4, temperature=float("nan")), "EHF: temperature must be a finite positive"),
        (lambda: EHF(3, 8, 2, 4, steps=0), "EHF: steps must be >= 1"),
        (lambda: EHF(3, 8, 2, 4, fusion="attention"), "EHF: fusion must be one of"),
        (lambda: ESA(8, 9), "ESA: rank must be <= in_channels"),
        (lambda: ESA(8, 2, basis="svd"), "ESA: basis must be one of"),
        (lambda: ESA(8, 2, moment_weight=-1.0), "ESA: moment_weight must be a finite non-negative"),
    ],
)
def test_invalid_layer_arguments(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_invalid_forward_arguments():
    x = torch.randn(BATCH, MODALITIES, CHANNELS, 4, 4)
    with pytest.raises(ValueError, match=r"EHF: x must have shape \[B, M=3, C=5, \*S\]"):
        EHF(2, CHANNELS, MODALITIES, CLASSES)(x[:, :2])
    with pytest.raises(ValueError, match="previous .* is required"):
        EHF(2, CHANNELS, MODALITIES, CLASSES, previous_channels=3)(x)
    with pytest.raises(ValueError, match=r"previous must have shape \[B, previous_channels, \*2S\] = \[2, 3, 8, 8\]"):
        EHF(2, CHANNELS, MODALITIES, CLASSES, previous_channels=3)(x, previous=torch.randn(BATCH, 3, 4, 4))
    with pytest.raises(ValueError, match="previous was given but this level was built with previous_channels=None"):
        EHF(2, CHANNELS, MODALITIES, CLASSES)(x, previous=torch.randn(BATCH, 3, 8, 8))
    with pytest.raises(ValueError, match="pass return_energies=True"):
        EHF(2, CHANNELS, MODALITIES, CLASSES)(x, target=torch.zeros(BATCH, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ESA: x .* and fused .* must share batch and spatial axes"):
        ESA(CHANNELS, 2)(x, torch.randn(BATCH, CHANNELS, 4, 2))


# ------------------------------------------------------------------------------------------------
# drop-in use inside an existing MONAI network
# ------------------------------------------------------------------------------------------------
class SegResNetWithEHF(torch.nn.Module):
    """MONAI's SegResNet encoder applied to each modality (modalities folded into the batch), EHF
    fusing every encoder level hierarchically, SegResNet's decoder on the fused features."""

    def __init__(self, modalities: int = 3):
        super().__init__()
        self.modalities = modalities
        self.backbone = SegResNet(
            spatial_dims=2, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1, 1), blocks_up=(1, 1)
        )
        widths = [8 * 2**level for level in range(3)]
        self.fusion = torch.nn.ModuleList(
            EHF(2, width, modalities, num_classes=2, previous_channels=widths[level - 1] if level else None)
            for level, width in enumerate(widths)
        )

    def forward(self, x, modality_mask=None):
        batch = x.shape[0]
        _, per_level = self.backbone.encode(x.reshape(batch * self.modalities, 1, *x.shape[2:]))
        fused = []
        for level_features, fuse in zip(per_level, self.fusion):
            stacked = level_features.view(batch, self.modalities, *level_features.shape[1:])
            fused.append(fuse(stacked, modality_mask, previous=fused[-1] if fused else None))
        return self.backbone.decode(fused[-1], fused[::-1])


def test_ehf_inside_a_monai_segresnet_trains():
    net = SegResNetWithEHF()
    x, labels = torch.randn(2, 3, 16, 16), torch.randint(0, 2, (2, 16, 16))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logits = net(x, torch.tensor([[True, True, False], [True, True, True]]))
        assert logits.shape == (2, 2, 16, 16)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert (
        net.fusion[1].head.weight.grad.abs().sum() > 0
        and net.fusion[2].previous_to_initial_state.conv.weight.grad.abs().sum() > 0
    )


# ------------------------------------------------------------------------------------------------
# mixed precision
# ------------------------------------------------------------------------------------------------
def _amp_step(device: str, dtype: torch.dtype) -> None:
    ehf = EHF(3, CHANNELS, MODALITIES, CLASSES, previous_channels=3).to(device)
    esa = ESA(CHANNELS, 2).to(device)
    conv = torch.nn.Conv3d(CHANNELS, CHANNELS, 1).to(device)  # makes autocast produce low-precision features
    x = torch.randn(BATCH, MODALITIES, CHANNELS, 4, 4, 4, device=device, requires_grad=True)
    previous = torch.randn(BATCH, 3, 8, 8, 8, device=device)
    target = torch.randint(0, CLASSES, (BATCH, 4, 4, 4), device=device)
    with torch.autocast(device, dtype=dtype):
        features = conv(x.flatten(0, 1)).view_as(x)
        assert features.dtype == dtype
        fused, energies = ehf(features, MASK.to(device), previous=previous, target=target, return_energies=True)
        alignment = esa(features, fused, MASK.to(device))
        loss = (
            fused.float().square().mean()
            + energies.ce.float().mean()
            + alignment.mean()
            + energies.fused_energy.float().mean()
        )
    loss.backward()
    assert torch.isfinite(loss)
    assert alignment.dtype == torch.float32
    for tensor in [x.grad, ehf.head.weight.grad, conv.weight.grad]:
        assert torch.isfinite(tensor).all()


def test_cpu_autocast_bfloat16_forward_backward_is_finite():
    _amp_step("cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_autocast_forward_backward_is_finite(dtype):
    _amp_step("cuda", dtype)
