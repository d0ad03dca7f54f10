"""Layer op — ``energy_fusion``: one EHF level (ops 1 and 2 and the masking around them) as one
autograd node, whose backward writes the x-sized gradient once.

Math (``docs/method.md``), per sample, modality m and voxel, with the modality mask ``μ_m`` (True =
available) and ``|μ|`` the number of available modalities::

    x̃_m       = x_m if μ_m else 0                            absent modalities are exact zeros
    E_m, ce_m = free_energy(x̃_m; W, b, T, target)            shared K-class head
    a_m       = -E_m/τ if μ_m else -inf                       log-prior
    ξ0        = xi0, or Σ_m x̃_m / |μ|                         (ψ of the previous level, or the masked mean)
    ξ, p, trace = energy_propagate(x̃, ξ0, a; β, steps)
    energies_m = E_m if μ_m else +inf,   ce_m = ce_m if μ_m else 0

VJP. x reaches the outputs along three paths: the propagation, the initial mean and the head. Plain
autograd gives each path its own x-sized gradient buffer and sums them (the floor of a level's
backward memory); here one buffer takes all three::

    d_energy_m = μ_m · (dE_out_m − da_m/τ)                    da: the propagation's log-prior gradient
    dz_m       = free_energy's VJP from d_energy_m and μ_m·d_ce_m
    dx_m       = μ_m · [ dx_m^prop + dξ0/|μ| (mean only) + Wᵀ dz_m ]
    dW = Σ dz x̃ᵀ,  db = Σ dz,  dxi0 = dξ0 (when xi0 is given)

Implementations behind :func:`energy_fusion`:
- torch (memory-lean): one pass over x per direction, in voxel chunks. A chunk is masked, its logits,
  energies, prior, initial mean and M-space recurrence formed together (forward); the backward
  recomputes them and writes the chunk's dx once, from all three terms. Saves only its inputs.
- Triton: the ops' kernels in sequence. They read an absent modality as zeros (HAS_MASK: no masked
  copy of x). energy_propagate's backward kernel writes dx, the mean's term is added in place, and
  free_energy's backward kernel adds Wᵀdz into the same buffer (ACCUMULATE). Saves its inputs and
  the energies ``[B, M, N]``.
- reference: the composition of the reference ops under plain autograd
  (:func:`e2pa_kernels.reference.energy_fusion`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import energy_propagate as propagate_op
from . import free_energy as free_energy_op
from . import reference
from ._runtime import select_backend
from ._validate import (accumulation_dtype, check_finite_scalar, check_same_device, check_shape, check_tensor,
                        voxel_chunks, voxels_last)

OP = "energy_fusion"


class EnergyFusion(NamedTuple):
    """Outputs of :func:`energy_fusion` (``*S`` = the level's spatial size)."""
    fused: torch.Tensor            # [B, C, *S]        ξ after ``steps`` updates
    weights: torch.Tensor          # [B, M, *S]        p of the last step (0 where absent)
    trace: torch.Tensor            # [B, steps + 1, *S] E(ξ_0) … E(ξ_steps)
    energies: torch.Tensor         # [B, M, *S]        free energy of each modality (+inf where absent)
    ce: torch.Tensor | None        # [B, M, *S]        head cross-entropy (0 where absent); None without target


@dataclass(frozen=True)
class _Params:
    temperature: float
    prior_temperature: float
    beta: float
    steps: int
    ignore_index: int


# --------------------------------------------------------------------------------------------------
# Memory-lean PyTorch path: one pass per direction, in voxel chunks
# --------------------------------------------------------------------------------------------------
# Budget of one chunk's per-voxel temporaries (2 MiB of fp32; the real working set is a few times
# that). Half the ops' budget: on a level-0 step (32³ × 16 channels, CPU) the peak fell from 17.0 to
# about 15.4 MiB for ~6 % more time; 1 MiB chunks cost 40 % more time.
_CHUNK_ELEMENTS = 1 << 19


def _chunks(x: torch.Tensor, K: int, steps: int):
    B, M, C, N = x.shape
    # per voxel and (b, m): the masked x, logits and their gradient, the propagation's M-space terms
    return voxel_chunks(N, B * M * (C + 2 * K + M + steps + propagate_op.TORCH_CHUNK_ROW), _CHUNK_ELEMENTS)


class _Chunk:
    """One voxel chunk ``[s, e)`` in the accumulation dtype: the masked features, logits, energies,
    prior and initial state, shared by the forward and the backward (which needs no ce: ``with_ce``)."""

    def __init__(self, x, weight, bias, mask, count, xi0, target, params: _Params, s: int, e: int,
                 with_ce: bool = True):
        acc = accumulation_dtype(x)
        xs = x[..., s:e].to(acc)
        self.present = None if mask is None else mask[:, :, None]  # [B, M, 1]
        self.xs = xs if mask is None else torch.where(self.present[..., None], xs, 0.0)  # [B, M, C, n]
        # the head in x's dtype, as the reference runs it
        self.z = free_energy_op.torch_logits(self.xs, weight.to(x.dtype),
                                             bias.to(x.dtype) if bias is not None else None)
        self.target = target[:, s:e] if target is not None else None
        self.energy, self.ce = free_energy_op.torch_energy_chunk(
            self.z, self.target if with_ce else None, params.temperature, params.ignore_index)
        self.log_prior = self.where_present(-self.energy / params.prior_temperature, float("-inf"))
        self.xis = (xi0[..., s:e].to(acc) if xi0 is not None
                    else self.xs.sum(dim=1) / count)  # [B, C, n]

    def where_present(self, t: torch.Tensor, absent_value: float) -> torch.Tensor:
        return t if self.present is None else torch.where(self.present, t, absent_value)


def _count(mask: torch.Tensor | None, M: int, acc: torch.dtype, B: int, device) -> torch.Tensor:
    """|μ| per sample as ``[B, 1, 1]`` (at least 1: a sample without modalities gets ξ0 = 0)."""
    if mask is None:
        return torch.full((B, 1, 1), float(M), dtype=acc, device=device)
    return mask.sum(dim=1).clamp_min(1).to(acc)[:, None, None]


def _torch_forward(x, weight, bias, mask, xi0, target, params: _Params):
    B, M, C, N = x.shape
    acc = accumulation_dtype(x)
    fused = x.new_empty((B, C, N))
    weights = x.new_empty((B, M, N))
    trace = x.new_empty((B, params.steps + 1, N))
    energies = x.new_empty((B, M, N))
    ce = x.new_empty((B, M, N)) if target is not None else None
    count = _count(mask, M, acc, B, x.device)
    for s, e in _chunks(x, weight.shape[0], params.steps):
        c = _Chunk(x, weight, bias, mask, count, xi0, target, params, s, e)
        fused[..., s:e], weights[..., s:e], trace[..., s:e] = propagate_op.torch_forward_chunk(
            c.xs, c.xis, c.log_prior, params.beta, params.steps)
        energies[..., s:e] = c.where_present(c.energy, float("inf"))
        if ce is not None:
            ce[..., s:e] = c.where_present(c.ce, 0.0)
    return fused, weights, trace, energies, ce


def _torch_backward(x, weight, bias, mask, xi0, target, params: _Params, d_xi, d_w, d_trace, d_energy, d_ce):
    B, M, C, N = x.shape
    K = weight.shape[0]
    acc = accumulation_dtype(x)
    dx = torch.empty((B, M, C, N), dtype=x.dtype, device=x.device)
    dxi0 = torch.empty((B, C, N), dtype=xi0.dtype, device=x.device) if xi0 is not None else None
    dw = torch.zeros((K, C), dtype=acc, device=x.device)
    db = torch.zeros((K,), dtype=acc, device=x.device)
    w_acc = weight.to(x.dtype).to(acc)
    count = _count(mask, M, acc, B, x.device)

    def chunk(t, s, e):
        return t[..., s:e].to(acc) if t is not None else None

    for s, e in _chunks(x, K, params.steps):
        c = _Chunk(x, weight, bias, mask, count, xi0, target, params, s, e, with_ce=False)
        dxs = chunk(d_xi, s, e)
        cot = propagate_op.torch_backward_chunk(c.xs, c.xis, c.log_prior, params.beta, params.steps, dxs,
                                                chunk(d_w, s, e), chunk(d_trace, s, e))
        d_en = -cot.da / params.prior_temperature
        if d_energy is not None:
            d_en = d_en + chunk(d_energy, s, e)
        d_c = chunk(d_ce, s, e)
        dz = free_energy_op.torch_logits_grad(c.z, c.target, params.temperature, params.ignore_index,
                                              c.where_present(d_en, 0.0),
                                              c.where_present(d_c, 0.0) if d_c is not None else None)
        d_initial = cot.dxi0(c.xs, c.xis)  # [B, C, n]
        if dxi0 is not None:
            dxi0[..., s:e] = d_initial
            share = None
        else:
            share = d_initial.div_(count)  # the mean's term, the same for every available modality
        for m in range(M):
            dxm = cot.dx_modality(m, c.xs, c.xis, dxs)  # [B, C, n], a fresh buffer
            if share is not None:
                dxm += share
            for b in range(B):
                free_energy_op.torch_head_grads(dxm[b], c.xs[b, m], w_acc, dz[b, m], dw, accumulate=True)
            if mask is not None:
                dxm = torch.where(mask[:, m, None, None], dxm, 0.0)
            dx[:, m, :, s:e] = dxm
        db += dz.sum(dim=(0, 1, 3))
    return dx, dw, (db if bias is not None else None), dxi0


# --------------------------------------------------------------------------------------------------
# Triton path: the ops' kernels, one dx buffer
# --------------------------------------------------------------------------------------------------
def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_m x̃_m / |μ| [B, C, N] in x's dtype, one modality at a time (no x-sized temporary; ``where``,
    so an absent modality's NaN stays out)."""
    B, M = x.shape[:2]
    acc = accumulation_dtype(x)
    total = torch.zeros((B, *x.shape[2:]), dtype=acc, device=x.device)
    for m in range(M):
        total += x[:, m] if mask is None else torch.where(mask[:, m, None, None], x[:, m], 0.0)
    return (total / _count(mask, M, acc, B, x.device)).to(x.dtype)


def _prior_and_mean(x, energy, mask, xi0, params: _Params):
    """The log-prior a [B, M, N] and ξ0 [B, C, N] the propagation runs on (x's dtype)."""
    a = -energy / params.prior_temperature
    if mask is not None:
        a = torch.where(mask[:, :, None], a, float("-inf"))
    return a, (xi0 if xi0 is not None else _masked_mean(x, mask))


def _triton_forward(x, weight, bias, mask, xi0, target, params: _Params):
    energy, ce = free_energy_op.free_energy_fwd(x, weight, bias, target, params.temperature, params.ignore_index,
                                                present=mask)
    a, initial = _prior_and_mean(x, energy, mask, xi0, params)
    fused, weights, trace = propagate_op.energy_propagate_fwd(x, initial, a, params.beta, params.steps, present=mask)
    if mask is not None:
        present = mask[:, :, None]
        ce = torch.where(present, ce, 0.0) if ce is not None else None
        return fused, weights, trace, torch.where(present, energy, float("inf")), ce, energy
    return fused, weights, trace, energy, ce, energy


def _triton_backward(x, weight, bias, mask, xi0, target, energy, params: _Params,
                     d_xi, d_w, d_trace, d_energy, d_ce):
    B, M = x.shape[:2]
    a, initial = _prior_and_mean(x, energy, mask, xi0, params)
    dx, d_initial, da = propagate_op.energy_propagate_bwd(x, initial, a, params.beta, params.steps,
                                                      d_xi, d_w, d_trace, present=mask)
    if xi0 is None:
        count = _count(mask, M, accumulation_dtype(x), B, x.device)
        dx += (d_initial / count).to(dx.dtype)[:, None]
    d_en = -da / params.prior_temperature
    if d_energy is not None:
        d_en = d_en + d_energy
    if mask is not None:
        present = mask[:, :, None]
        d_en = torch.where(present, d_en, 0.0)
        d_ce = torch.where(present, d_ce, 0.0) if d_ce is not None else None
    _, dw, db = free_energy_op.free_energy_bwd(x, weight, bias, target, params.temperature,
                                                params.ignore_index, d_en.to(x.dtype), d_ce, dx=dx, present=mask)
    if mask is not None:
        dx.masked_fill_(~mask[:, :, None, None], 0.0)
    return dx, dw, db, (d_initial if xi0 is not None else None)


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------
class _EnergyFusionFunction(torch.autograd.Function):
    """x [B, M, C, N] (unit stride along N), weight [K, C], bias [K]|None, mask [B, M] bool|None,
    xi0 [B, C, N]|None, target [B, N] int64|None. Returns fused [B, C, N], weights [B, M, N],
    trace [B, steps + 1, N], energies [B, M, N], and ce [B, M, N] when target is given."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, xi0, target, params, use_triton):
        if use_triton:
            *outs, energy = _triton_forward(x, weight, bias, mask, xi0, target, params)
            ctx.save_for_backward(x, weight, bias, mask, xi0, target, energy)
        else:
            outs = _torch_forward(x, weight, bias, mask, xi0, target, params)
            ctx.save_for_backward(x, weight, bias, mask, xi0, target)
        ctx.params, ctx.use_triton = params, use_triton
        ctx.set_materialize_grads(False)
        return tuple(outs) if target is not None else tuple(outs[:4])

    @staticmethod
    def backward(ctx, d_xi, d_w, d_trace, d_energy, d_ce=None):
        if all(g is None for g in (d_xi, d_w, d_trace, d_energy, d_ce)):
            return (None,) * 8
        if ctx.use_triton:
            x, weight, bias, mask, xi0, target, energy = ctx.saved_tensors
            dx, dw, db, dxi0 = _triton_backward(x, weight, bias, mask, xi0, target, energy, ctx.params,
                                                d_xi, d_w, d_trace, d_energy, d_ce)
        else:
            x, weight, bias, mask, xi0, target = ctx.saved_tensors
            dx, dw, db, dxi0 = _torch_backward(x, weight, bias, mask, xi0, target, ctx.params,
                                               d_xi, d_w, d_trace, d_energy, d_ce)
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None,
                dw.to(weight.dtype) if needs[1] else None,
                db.to(bias.dtype) if bias is not None and needs[2] else None,
                None,
                dxi0 if xi0 is not None and needs[4] else None,
                None, None, None)


def _check_inputs(x, weight, bias, modality_mask, xi0, temperature, prior_temperature, beta, steps, target,
                  ignore_index):
    check_tensor(OP, "x", x, min_ndim=4)
    B, M = x.shape[:2]
    spatial_dims = x.dim() - 3
    # the head's arguments (x, weight, bias, temperature, target, ignore_index), with the ops' own messages
    _, temperature = free_energy_op.check_inputs(x, weight, bias, temperature, target, ignore_index, spatial_dims)
    if xi0 is not None:
        beta, steps = propagate_op.check_inputs(x, xi0, None, beta, steps)
    else:
        beta, steps = propagate_op.check_beta_and_steps(beta, steps)
    prior_temperature = check_finite_scalar(OP, "prior_temperature", prior_temperature, positive=True)
    if modality_mask is not None:
        check_tensor(OP, "modality_mask", modality_mask, dtypes=(torch.bool,), min_ndim=2, max_ndim=2)
        check_shape(OP, "modality_mask", modality_mask, (B, M), "[B, M] (x's batch and modalities; True = available)")
        check_same_device(OP, x=x, modality_mask=modality_mask)
    return _Params(temperature, prior_temperature, beta, steps, ignore_index)


def energy_fusion(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  modality_mask: torch.Tensor | None = None, xi0: torch.Tensor | None = None, *,
                  temperature: float = 1.0, prior_temperature: float = 1.0, beta: float = 1.0, steps: int = 3,
                  target: torch.Tensor | None = None, ignore_index: int = -100) -> EnergyFusion:
    """One level of energy-guided fusion: the shared head's free energies, the prior, the initial
    state and the Hopfield propagation (module docstring), differentiable in x, weight, bias and xi0.

    Args:
        x: ``[B, M, C, *S]`` per-modality features, any float dtype; absent modalities may hold
            anything (NaN included): they are replaced by zeros and get exactly zero gradient.
        weight: ``[K, C]`` shared head. bias: ``[K]`` or None.
        modality_mask: ``[B, M]`` bool, True = available; None = all available. A sample with no
            available modality gets ξ = 0, weights 0 and +inf energies.
        xi0: ``[B, C, *S]`` initial state in x's dtype (ψ of the previous level); None = the masked
            mean of the modalities.
        temperature: ``T`` of the head's free energy. prior_temperature: ``τ`` of the prior.
        beta, steps: the propagation's inverse temperature and number of updates (1 … 8).
        target: optional ``[B, *S]`` class indices for the head's cross-entropy (``ignore_index`` → 0).

    Returns:
        :class:`EnergyFusion` ``(fused, weights, trace, energies, ce)``, in x's dtype.
    """
    params = _check_inputs(x, weight, bias, modality_mask, xi0, temperature, prior_temperature, beta, steps,
                           target, ignore_index)
    K, (B, M), spatial = weight.shape[0], x.shape[:2], x.shape[3:]
    limit = (f"{OP}: the Triton kernels take K <= {free_energy_op.TRITON_MAX_CLASSES} classes; got K = {K}"
             if K > free_energy_op.TRITON_MAX_CLASSES else
             f"{OP}: the Triton kernels take M <= {propagate_op.TRITON_MAX_MODALITIES} modalities; got M = {M}"
             if M > propagate_op.TRITON_MAX_MODALITIES else None)
    backend = select_backend(x, weight, bias, xi0, target, modality_mask, triton_limit=limit)
    if backend == "reference":
        return EnergyFusion(*reference.energy_fusion(
            x, weight, bias, modality_mask, xi0, temperature=params.temperature,
            prior_temperature=params.prior_temperature, beta=params.beta, steps=params.steps, target=target,
            ignore_index=ignore_index))
    x4 = voxels_last(x, 3)
    xi3 = voxels_last(xi0, 2) if xi0 is not None else None
    target2 = voxels_last(target.long(), 1) if target is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        outs = _EnergyFusionFunction.apply(x4, weight.contiguous(), bias.contiguous() if bias is not None else None,
                                           modality_mask.contiguous() if modality_mask is not None else None,
                                           xi3, target2, params, backend == "triton")
    fused, weights, trace, energies = (o.view(o.shape[0], o.shape[1], *spatial) for o in outs[:4])
    ce = outs[4].view(B, M, *spatial) if target is not None else None
    return EnergyFusion(fused, weights, trace, energies, ce)
