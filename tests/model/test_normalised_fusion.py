"""EHF's normalised fusion (docs/method.md, "Normalised fusion"): with the gate closed it is exactly the
masked mean of the raw features; the shares are convex and ignore absent modalities (NaN there
cannot leak); the raw form is the energy_fusion op itself; old checkpoints keep the raw form."""

from __future__ import annotations

import math

import pytest
import torch

import e2pa_kernels
from e2pa import EHF
from e2pa.model.layers import masked_mean, rms_normalize
from e2pa.model.registry import build_model, checkpoint_model_config

B, M, C, K = 2, 3, 6, 4
MASK = torch.tensor([[True, False, True], [True, True, True]])


def _x(*spatial):
    torch.manual_seed(0)
    return 3.0 * torch.randn(B, M, C, *spatial) + 1.0


def test_closed_gate_is_exactly_the_masked_mean_of_raw_features():
    layer = EHF(2, C, M, K)
    with torch.no_grad():
        layer.gate_logit.fill_(-math.inf)  # g = 0
    x = _x(5, 3)
    fused, energies = layer(x, MASK, return_energies=True)
    torch.testing.assert_close(fused, masked_mean(torch.where(MASK[:, :, None, None, None], x, 0), MASK))
    expected = (MASK / MASK.sum(1, keepdim=True))[:, :, None, None].expand(B, M, 5, 3)
    torch.testing.assert_close(energies.weights, expected.float())


def test_shares_are_convex_and_follow_the_gate():
    layer = EHF(2, C, M, K, beta=4.0)
    x = _x(4, 4)
    with torch.no_grad():
        layer.gate_logit.fill_(math.inf)  # g = 1: the energy weights alone
    fused_open, open_ = layer(x, MASK, return_energies=True)
    raw = torch.where(MASK[:, :, None, None, None], x, 0)
    torch.testing.assert_close(fused_open, (open_.weights.unsqueeze(2) * raw).sum(1))
    torch.testing.assert_close(open_.weights.sum(1), torch.ones(B, 4, 4))
    assert (open_.weights[0, 1] == 0).all() and (open_.weights >= 0).all()
    assert not torch.allclose(open_.weights[1], torch.full_like(open_.weights[1], 1 / M)), "g=1 must not be uniform"
    with torch.no_grad():
        layer.gate_logit.fill_(0.0)  # g = 1/2: halfway between uniform and the energy weights
    _, half = layer(x, MASK, return_energies=True)
    uniform = (MASK / MASK.sum(1, keepdim=True))[:, :, None, None]
    torch.testing.assert_close(half.weights, 0.5 * uniform + 0.5 * open_.weights)


def test_nan_in_an_absent_modality_reaches_no_output_and_no_gradient():
    layer = EHF(2, C, M, K)
    x = _x(4, 4)
    x[0, 1] = float("nan")
    x.requires_grad_(True)
    fused, energies = layer(x, MASK, target=torch.randint(0, K, (B, 4, 4)), return_energies=True)
    assert torch.isfinite(fused).all() and torch.isfinite(energies.weights).all()
    loss = fused.sum() + energies.ce.sum() + energies.trace.sum()
    loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0, 1] == 0).all()
    assert layer.gate_logit.grad is not None and torch.isfinite(layer.gate_logit.grad)


def test_raw_form_is_the_energy_fusion_op():
    layer = EHF(3, C, M, K, score_norm="none", temperature=1.5, prior_temperature=2.0, beta=0.5, steps=2)
    assert layer.gate_logit is None
    x = _x(3, 2, 2)
    fused, energies = layer(x, MASK, return_energies=True)
    op = e2pa_kernels.energy_fusion(
        x, layer.head.weight, layer.head.bias, MASK, temperature=1.5, prior_temperature=2.0, beta=0.5, steps=2
    )
    torch.testing.assert_close(fused, op[0])
    torch.testing.assert_close(energies.weights, op[1])


def test_rms_normalize_unit_rms_and_zero_stays_zero():
    x = _x(4)
    x[0, 1] = 0
    x.requires_grad_(True)
    y = rms_normalize(x, 1e-5, channel_dim=2)
    rms = y.pow(2).mean(dim=2).sqrt()
    torch.testing.assert_close(rms[1], torch.ones_like(rms[1]), atol=1e-4, rtol=1e-4)
    assert (y[0, 1] == 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_checkpoints_from_before_the_option_keep_the_raw_form():
    old = {"spatial_dims": 2, "in_channels": 4, "modalities": ["flair", "t1", "t1ce", "t2"], "features": [4, 8]}
    assert checkpoint_model_config(old)["fusion_norm"] == "none"
    assert checkpoint_model_config({**old, "fusion_norm": "rms"})["fusion_norm"] == "rms"
    assert checkpoint_model_config({"architecture": "segresnet"}) == {"architecture": "segresnet"}
    net = build_model(checkpoint_model_config(old))
    assert all(level.score_norm == "none" for level in net.fusion_levels)
    assert build_model(old).config["fusion_norm"] == "rms", "new networks use the normalised fusion"
    with pytest.raises(ValueError, match="fusion_norm"):
        build_model({**old, "fusion_norm": "layer"})


def test_agreement_prior_lowers_the_modality_that_contradicts_the_others():
    layer = EHF(2, 4, 3, 4, prior="agreement", prior_temperature=1e6)  # the agreement term alone
    with torch.no_grad():
        layer.head.weight.copy_(5 * torch.eye(4))
        layer.head.bias.zero_()
        layer.gate_logit.fill_(math.inf)
    x = torch.zeros(1, 3, 4, 2, 2)
    x[:, 0, 0] = x[:, 1, 0] = 1.0  # two modalities say class 0
    x[:, 2, 3] = 1.0  # one says class 3
    _, energies = layer(x, return_energies=True)
    w = energies.weights
    assert (w[:, 2] < 0.5 * w[:, 0]).all() and torch.allclose(w[:, 0], w[:, 1])


def test_agreement_prior_masks_absent_modalities_and_keeps_nan_out():
    layer = EHF(2, C, M, K, prior="agreement")
    x = _x(4, 4)
    x[0, 1] = float("nan")
    x.requires_grad_(True)
    fused, energies = layer(x, MASK, target=torch.randint(0, K, (B, 4, 4)), return_energies=True)
    assert torch.isfinite(fused).all() and (energies.weights[0, 1] == 0).all()
    assert torch.isinf(energies.energies[0, 1]).all() and (energies.ce[0, 1] == 0).all()
    (fused.sum() + energies.ce.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0, 1] == 0).all()
    with pytest.raises(ValueError, match="agreement"):
        EHF(2, C, M, K, prior="agreement", score_norm="none")
