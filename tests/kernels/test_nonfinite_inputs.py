"""NaN inputs propagate as NaN where they belong — never a crash, a hang, or a silently finite answer —
on every implementation of every op."""

from __future__ import annotations

import pytest
import torch

import e2pa_kernels

BACKENDS = ("reference", "torch", "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_free_energy_nan_stays_in_its_voxel(backend):
    x = torch.randn(2, 3, 20, 37)
    x[1, 2, 5, 11] = float("nan")
    with e2pa_kernels.use_backend(backend):
        energy, ce = e2pa_kernels.free_energy(
            x, torch.randn(4, 20), torch.randn(4), target=torch.randint(0, 4, (2, 37))
        )
    for out in (energy, ce):
        assert out[1, 2, 11].isnan()
        out[1, 2, 11] = 0
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_energy_propagate_nan_stays_in_its_voxel(backend):
    x, xi0 = torch.randn(2, 3, 12, 41), torch.randn(2, 12, 41)
    x[0, 1, 3, 7] = float("nan")
    with e2pa_kernels.use_backend(backend):
        xi, weights, energies = e2pa_kernels.energy_propagate(x, xi0, torch.zeros(2, 3, 41), 0.5, 3)
    for out in (xi, weights, energies):
        assert out[0, :, 7].isnan().all()
        out[0, :, 7] = 0
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_energy_propagate_nan_or_posinf_prior_stays_in_its_voxel(backend, bad):
    x, xi0, log_prior = torch.randn(2, 3, 12, 41), torch.randn(2, 12, 41), torch.randn(2, 3, 41)
    log_prior[1, 2, 30] = bad
    log_prior[0, 1, 5] = -float("inf")  # an absent modality elsewhere stays exactly excluded
    with e2pa_kernels.use_backend(backend):
        xi, weights, energies = e2pa_kernels.energy_propagate(x, xi0, log_prior, 0.5, 3)
    for out in (xi, weights, energies):
        assert not torch.isfinite(out[1, :, 30]).any()  # NaN (the reference's E(ξ_0) is -inf for +inf)
        out[1, :, 30] = 0
        assert torch.isfinite(out).all()
    assert weights[0, 1, 5] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_factor_align_nan_reaches_its_sums_only(backend):
    x, fused = torch.randn(2, 3, 16, 50), torch.randn(2, 16, 50)
    x[1, 0, 2, 9] = float("nan")
    basis = torch.linalg.qr(torch.randn(16, 4))[0]
    with e2pa_kernels.use_backend(backend):
        dist, mom1, mom2 = e2pa_kernels.factor_align(x, fused, basis)
    assert dist[1, 0].isnan() and mom1[1, 0].isnan().all() and mom2[1, 0].isnan().all()
    dist[1, 0], mom1[1, 0], mom2[1, 0] = 0, 0, 0
    assert torch.isfinite(dist).all() and torch.isfinite(mom1).all() and torch.isfinite(mom2).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_factor_basis_of_a_nan_sample_is_nan_and_the_others_are_untouched(backend):
    fused = torch.randn(3, 6, 40)
    fused[1, 4, 17] = float("nan")
    with e2pa_kernels.use_backend(backend):
        basis = e2pa_kernels.factor_basis(fused, 3)
        clean = e2pa_kernels.factor_basis(fused[[0, 2]], 3)
    assert basis[1].isnan().all()
    torch.testing.assert_close(basis[[0, 2]], clean, rtol=0, atol=0)
