"""Plain-autograd references: the oracle every implementation is compared with.

Written as the literal formulas of ``docs/method.md`` in PyTorch autograd, at the precision of the
inputs (tests upcast the inputs to get the float32/float64 truth). No kernel, no hand-written
backward, no memory tricks: independence from the fast paths is the point, so never change a
reference to match an implementation.
"""

from __future__ import annotations

import torch

from ._validate import has_modality_axis


def free_energy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
    *,
    spatial_dims: int | None = None,
):
    """Free energy of a linear classifier head, per voxel and modality.

    x ``[B, M, C, *S]`` or ``[B, C, *S]``; weight ``[K, C]``; bias ``[K]``; target ``[B, *S]`` int64.
    Returns energy ``[B, M, *S]`` (``[B, *S]`` without the modality axis), and ``(energy, ce)`` when
    ``target`` is given::

        z      = W·x + b
        energy = -T · logsumexp_k(z / T)
        ce     = logsumexp_k(z) - z[target]      (0 where target == ignore_index)
    """
    modal = has_modality_axis("free_energy", x, weight.shape[1], target, spatial_dims)
    xm = x if modal else x.unsqueeze(1)
    z = torch.einsum("kc,bmc...->bmk...", weight.to(x.dtype), xm)
    if bias is not None:
        z = z + bias.to(x.dtype).view(1, 1, -1, *([1] * (xm.dim() - 3)))
    energy = -temperature * torch.logsumexp(z / temperature, dim=2)
    if target is None:
        return energy if modal else energy.squeeze(1)
    valid = target != ignore_index
    index = torch.where(valid, target, torch.zeros_like(target))
    index = index.unsqueeze(1).unsqueeze(1).expand(z.shape[0], z.shape[1], 1, *target.shape[1:])
    z_target = z.gather(2, index).squeeze(2)
    ce = torch.where(valid.unsqueeze(1), torch.logsumexp(z, dim=2) - z_target, torch.zeros_like(z_target))
    if not modal:
        energy, ce = energy.squeeze(1), ce.squeeze(1)
    return energy, ce


def hopfield_energy(x: torch.Tensor, xi: torch.Tensor, log_prior: torch.Tensor, beta: float) -> torch.Tensor:
    """``E(ξ) = -(1/β)·log Σ_m exp(β⟨x_m, ξ⟩ + a_m) + ½‖ξ‖²`` per voxel; +inf where every a_m = -inf.

    x ``[B, M, C, *S]``, xi ``[B, C, *S]``, log_prior ``[B, M, *S]`` → ``[B, *S]``.
    """
    scores = beta * torch.einsum("bmc...,bc...->bm...", x, xi) + log_prior
    absent = torch.isneginf(log_prior).all(dim=1)
    safe = torch.where(absent.unsqueeze(1), torch.zeros_like(scores), scores)
    energy = -torch.logsumexp(safe, dim=1) / beta + 0.5 * (xi * xi).sum(dim=1)
    return torch.where(absent, torch.full_like(energy, float("inf")), energy)


def energy_propagate(
    x: torch.Tensor, xi0: torch.Tensor, log_prior: torch.Tensor | None = None, beta: float = 1.0, steps: int = 3
):
    """Hopfield energy descent of the fused state over the modality features, per voxel.

    x ``[B, M, C, *S]``, xi0 ``[B, C, *S]``, log_prior ``[B, M, *S]`` (None = 0, -inf = absent).
    Returns xi ``[B, C, *S]``, weights ``[B, M, *S]`` (p of the last step) and
    energies ``[B, steps + 1, *S]`` (E(ξ_0) … E(ξ_steps))::

        p = softmax_m(β⟨x_m, ξ⟩ + a_m),   ξ ← Σ_m p_m x_m          (repeated `steps` times)

    A voxel with every a_m = -inf gets ξ = 0, weights 0 and energy +inf.
    """
    if log_prior is None:
        log_prior = torch.zeros(x.shape[:2] + x.shape[3:], dtype=x.dtype, device=x.device)
    absent = torch.isneginf(log_prior).all(dim=1, keepdim=True)
    xi = xi0
    energies = [hopfield_energy(x, xi, log_prior, beta)]
    weights = None
    for _ in range(steps):
        scores = beta * torch.einsum("bmc...,bc...->bm...", x, xi) + log_prior
        scores = torch.where(absent, torch.zeros_like(scores), scores)
        weights = torch.softmax(scores, dim=1) * (~absent)
        xi = torch.einsum("bm...,bmc...->bc...", weights, x)
        energies.append(hopfield_energy(x, xi, log_prior, beta))
    return xi, weights, torch.stack(energies, dim=1)


def energy_fusion(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    modality_mask: torch.Tensor | None = None,
    xi0: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    prior_temperature: float = 1.0,
    beta: float = 1.0,
    steps: int = 3,
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
):
    """One EHF level: the shared head's energies, the prior, the initial state, the propagation.

    x ``[B, M, C, *S]``, weight ``[K, C]``, bias ``[K]``, modality_mask ``[B, M]`` bool (None = all
    available), xi0 ``[B, C, *S]`` (None = the masked mean), target ``[B, *S]``. Returns
    ``(fused [B, C, *S], weights [B, M, *S], trace [B, steps + 1, *S], energies [B, M, *S], ce | None)``::

        x̃_m = x_m if available else 0;   E, ce = free_energy(x̃);   a_m = -E_m/τ (-inf if absent)
        ξ0 = xi0 or Σ_m x̃_m / #available;   fused, weights, trace = energy_propagate(x̃, ξ0, a)
        energies_m = E_m (+inf if absent);   ce_m = ce_m (0 if absent)
    """
    B, M = x.shape[:2]
    mask = torch.ones(B, M, dtype=torch.bool, device=x.device) if modality_mask is None else modality_mask
    present = mask.view(B, M, *([1] * (x.dim() - 3)))
    if modality_mask is not None:
        x = torch.where(present.unsqueeze(2), x, torch.zeros((), dtype=x.dtype, device=x.device))
    head = free_energy(x, weight, bias, temperature, target, ignore_index, spatial_dims=x.dim() - 3)
    energy, ce = head if target is not None else (head, None)
    log_prior = torch.where(present, -energy / prior_temperature, torch.full_like(energy, float("-inf")))
    if xi0 is None:
        count = mask.sum(dim=1).clamp_min(1).to(x.dtype).view(B, *([1] * (x.dim() - 2)))
        xi0 = x.sum(dim=1) / count
    fused, weights, trace = energy_propagate(x, xi0, log_prior, beta, steps)
    energies = torch.where(present, energy, torch.full_like(energy, float("inf")))
    if ce is not None:
        ce = torch.where(present, ce, torch.zeros_like(ce))
    return fused, weights, trace, energies, ce


def rms_normalize(x: torch.Tensor, eps: float, channel_dim: int) -> torch.Tensor:
    """``x / sqrt(mean_c x² + eps²)`` along ``channel_dim`` (per voxel): unit root-mean-square features,
    the RMS formed in float32 (float64 for float64 x). An all-zero vector (an absent modality) stays
    exactly zero with a finite gradient."""
    rms = x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).mean(dim=channel_dim, keepdim=True)
    return x / rms.add(eps * eps).sqrt().to(x.dtype)


def normalized_fusion(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    modality_mask: torch.Tensor | None,
    xi0: torch.Tensor | None,
    gate: torch.Tensor,
    *,
    eps: float,
    temperature: float = 1.0,
    prior_temperature: float = 1.0,
    beta: float = 1.0,
    steps: int = 3,
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
):
    """One normalised EHF level (``docs/method.md``, "Normalised fusion"): x ``[B, M, C, *S]``, xi0
    ``[B, C, *S]`` before normalisation (None = the masked mean of the normalised features), gate a 0-d
    tensor g = sigmoid(γ), the rest as :func:`energy_fusion`. Returns ``(fused [B, C, *S], weights
    [B, M, *S], trace, energies, ce | None)``::

        x̃ = x (0 if absent);  x̂ = rms_normalize(x̃);  ξ̂0 = rms_normalize(xi0)
        _, p, trace, energies, ce = energy_fusion(x̂, W, b, mask, ξ̂0)
        w_m = (1 − g)·mask_m/#available + g·p_m;   fused = Σ_m w_m x̃_m
    """
    B, M = x.shape[:2]
    mask = torch.ones(B, M, dtype=torch.bool, device=x.device) if modality_mask is None else modality_mask
    spatial = x.dim() - 3
    raw = x
    if modality_mask is not None:
        raw = torch.where(mask.view(B, M, 1, *([1] * spatial)), x, torch.zeros((), dtype=x.dtype, device=x.device))
    normalized = rms_normalize(raw, eps, channel_dim=2)
    xi0 = None if xi0 is None else rms_normalize(xi0, eps, channel_dim=1)
    _, p, trace, energies, ce = energy_fusion(
        normalized,
        weight,
        bias,
        modality_mask,
        xi0,
        temperature=temperature,
        prior_temperature=prior_temperature,
        beta=beta,
        steps=steps,
        target=target,
        ignore_index=ignore_index,
    )
    g = gate.to(p.dtype)
    uniform = mask.to(p.dtype) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(p.dtype)
    weights = (1 - g) * uniform.view(B, M, *([1] * spatial)) + g * p
    fused = (weights.unsqueeze(2).to(raw.dtype) * raw).sum(dim=1)
    return fused, weights, trace, energies, ce


def factor_coefficients(v: torch.Tensor, basis: torch.Tensor, eps: float) -> torch.Tensor:
    """``c = Uᵀ v / max(‖v‖, eps)`` per voxel; exactly 0 (value and gradient) where v = 0.

    v ``[B, L, C, N]`` (L vectors per sample), basis ``[B, C, r]`` → ``[B, L, r, N]``.
    """
    norm = torch.linalg.vector_norm(v, dim=2, keepdim=True)
    inv = torch.where(norm > 0, 1.0 / norm.clamp_min(eps), torch.zeros_like(norm))
    return torch.einsum("bcr,blcn->blrn", basis, v * inv)


def factor_align(x: torch.Tensor, fused: torch.Tensor, basis: torch.Tensor, eps: float = 1e-6):
    """Agreement of modality and fused directions inside the factors of the fused space.

    x ``[B, M, C, *S]``, fused ``[B, C, *S]``, basis ``[B, C, r]`` or ``[C, r]``.
    Returns dist ``[B, M]`` = Σ_v ‖c_m − c_F‖², mom1 ``[B, M+1, r]`` = Σ_v c, mom2 ``[B, M+1, r]`` = Σ_v c²
    (index M is the fused feature).
    """
    B, M, C = x.shape[:3]
    U = basis.to(x.dtype)
    U = U.expand(B, *U.shape) if U.dim() == 2 else U
    c_modal = factor_coefficients(x.reshape(B, M, C, -1), U, eps)
    c_fused = factor_coefficients(fused.reshape(B, 1, C, -1), U, eps)
    dist = ((c_modal - c_fused) ** 2).sum(dim=(2, 3))
    c_all = torch.cat([c_modal, c_fused], dim=1)
    return dist, c_all.sum(dim=3), (c_all * c_all).sum(dim=3)


def factor_basis(fused: torch.Tensor, rank: int, eps: float = 1e-6) -> torch.Tensor:
    """Top-``rank`` eigenvectors of ``(1/N) Σ_v f̂ f̂ᵀ`` per sample, largest first, no gradient.

    fused ``[B, C, *S]`` → ``[B, C, rank]``; each column's largest-magnitude entry is positive.
    """
    with torch.no_grad():
        B, C = fused.shape[:2]
        f = fused.reshape(B, 1, C, -1).double()
        norm = torch.linalg.vector_norm(f, dim=2, keepdim=True)
        # a product, not a where on f: a NaN feature must stay NaN (zero vectors still give 0)
        f_hat = (f * torch.where(norm > 0, 1.0 / norm.clamp_min(eps), torch.zeros_like(norm)))[:, 0]
        second_moment = f_hat @ f_hat.transpose(1, 2) / f_hat.shape[-1]
        return top_eigenvectors(second_moment, rank).to(fused.dtype)


def top_eigenvectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors of symmetric ``[B, C, C]`` → ``[B, C, rank]``, largest eigenvalue first,
    each column's largest-magnitude entry positive. A sample whose matrix is not finite (NaN features)
    gets NaN columns, as any op propagates NaN, where ``eigh`` itself would raise."""
    finite = torch.isfinite(matrix).all(dim=-1).all(dim=-1)[:, None, None]
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    _, vectors = torch.linalg.eigh(torch.where(finite, matrix, identity))
    top = vectors.flip(-1)[..., :rank]
    pivot = top.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(top.gather(1, pivot))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return torch.where(finite, top * sign, torch.full((), float("nan"), dtype=top.dtype, device=top.device))
