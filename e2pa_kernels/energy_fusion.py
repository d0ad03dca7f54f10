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
- Triton, one pass per direction (where the M × C tile fits, :func:`fits_one_pass`): a forward kernel
  that reads x (absent modalities never), ξ0 and the target once and writes every output once, and a
  persistent backward kernel that recomputes everything in registers, writes dx (and dξ0) once and
  per-program dW/db partials summed in a fixed order. Saves only its inputs.
- Triton, chunked-C (wider levels): the ops' kernels in sequence. They read an absent modality as
  zeros (HAS_MASK: no masked copy of x). energy_propagate's backward kernel writes dx, the mean's term
  is added in place, and free_energy's backward kernel adds Wᵀdz into the same buffer (ACCUMULATE).
  Saves its inputs and the energies ``[B, M, N]``.

File layout: Triton kernels (VJP in the comment above them) → launchers (:func:`energy_fusion_fwd`,
:func:`energy_fusion_bwd`) → memory-lean torch path → autograd Function → input checks and the API →
the normalised level (:func:`normalized_fusion`: EHF's default, RMS-normalised features through this op's
launchers and a gated mix of the raw features, one node whose backward writes dx once) → GPU compile variants.
- reference: the composition of the reference ops under plain autograd
  (:func:`e2pa_kernels.reference.energy_fusion`).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import energy_propagate as propagate_op
from . import free_energy as free_energy_op
from . import reference
from ._kernel_spec import KernelSpec, heaviest, spec_label, split_meta
from ._runtime import select_backend, small_interpreter_blocks
from ._triton_utils import cdiv, device_guard, head_fp32, next_pow2, persistent_programs
from ._validate import (
    INT32_LIMIT,
    accumulation_dtype,
    check_finite_scalar,
    check_same_device,
    check_shape,
    check_tensor,
    needs_int64,
    voxel_chunks,
    voxels_last,
)

try:
    import triton
    import triton.language as tl

    from .energy_propagate import gram_tile, lse_softmax, p_at, reverse_step
except ImportError:  # pragma: no cover - Triton is Linux-only; the torch path runs elsewhere
    triton = None

OP = "energy_fusion"


class EnergyFusion(NamedTuple):
    """Outputs of :func:`energy_fusion` (``*S`` = the level's spatial size)."""

    fused: torch.Tensor  # [B, C, *S]        ξ after ``steps`` updates
    weights: torch.Tensor  # [B, M, *S]        p of the last step (0 where absent)
    trace: torch.Tensor  # [B, steps + 1, *S] E(ξ_0) … E(ξ_steps)
    energies: torch.Tensor  # [B, M, *S]        free energy of each modality (+inf where absent)
    ce: torch.Tensor | None  # [B, M, *S]        head cross-entropy (0 where absent); None without target


@dataclass(frozen=True)
class FusionParams:
    """The scalar parameters of one level (validated by :func:`check_inputs`)."""

    temperature: float
    prior_temperature: float
    beta: float
    steps: int
    ignore_index: int


# --------------------------------------------------------------------------------------------------
# Triton kernels: one pass over x per direction (a voxel tile holds all M × C features of its voxels)
# --------------------------------------------------------------------------------------------------
# Per voxel, with X = [x̃_1 … x̃_M] ∈ R^{C×M} (absent modalities read as zeros), the tile does, reading
# x, xi0 and the target once and writing every output once:
#   forward   z = W X + b [K, M];  E_m = -T·lse_k(z_m/T);  ce_m = lse_k(z_m) − z_m[t];  a = -E/τ (−inf absent)
#             ξ0 = xi0 or Σ_m x̃_m/|μ|;  G = XᵀX, s0 = Xᵀξ0, n0 = ‖ξ0‖²;  the M-space recurrence
#             (energy_propagate's module docstring) → p_T, trace;  ξ_T = X p_T
#   backward  recompute the forward in registers; the propagation's reverse sweep gives dS (= dG + dGᵀ),
#             ds0, d_e0, da (energy_propagate's docstring); then, all from the same tile:
#             dξ0 = Σ_m ds0_m x̃_m + dE_0·ξ0
#             d_energy_m = μ_m·(dE_out_m − da_m/τ),
#             dz_m = −d_energy_m·softmax(z_m/T) + μ_m d_ce_m·(softmax(z_m) − onehot(t))
#             dx_m = μ_m·[ p_T,m dξ + Σ_j dS_mj x̃_j + ds0_m ξ0 + (dξ0/|μ| if ξ0 is the mean) + Wᵀ dz_m ]
#             dW_partial[program] += Σ_{m,n} dz xᵀ,  db_partial[program] += Σ dz   (fixed-order sums after)
# The tile [BLOCK_M, BLOCK_C, BLOCK_N] takes the whole channel axis (BLOCK_C = next_pow2(C)); levels whose
# M × C does not fit (FUSED_MAX_FEATURES) run the ops' kernels in sequence (energy_fusion_fwd/bwd).
FUSED_MAX_FEATURES = 256  # BLOCK_M · BLOCK_C of the one-pass kernels (e.g. 4 modalities × 64 channels)
# K <= 16 classes (BLOCK_K = 16): the logits [BLOCK_K, BLOCK_M, BLOCK_N] and W [BLOCK_K, BLOCK_C] next to the
# feature tile. At the same tiles BLOCK_K 32 / 64 spilled (Triton 3.9, sm_90, M = 4: forward up to 772 /
# 1868 bytes, backward 368-780 / 1068-1288 bytes); levels with more classes run the ops' kernels in sequence,
# whose tiles are chosen per BLOCK_K.
FUSED_MAX_CLASSES = 16
# The tile's channels per modality row: the head's dot runs over the tile's BLOCK_M · BLOCK_N (modality, voxel)
# columns, which the voxel tiles (sized by BLOCK_M · BLOCK_C) leave few of where the rows are few and the
# channels many. Compiled (Triton 3.9): 1 × 64 … 1 × 256 and 2 × 64 … 2 × 128 spilled (forward 120-620 bytes
# at 2 × 64 … 1 × 128, 1.8-5.7 KB at 1 × 128 fp32 and 1 × 256; backward 8 bytes at fp32 2 × 64 on sm_80 up to
# 6.6 KB at 1 × 128); a single modality's backward at 8 voxels does not compile for fp16/bf16 (tl.dot needs
# 16 columns) nor at 4 voxels for fp32 1 × 256. Those levels (M = 1; M = 2 with C > 32) run the ops' kernels.
FUSED_MAX_CHANNELS_PER_ROW = 16

if triton is not None:

    @triton.jit
    def _lse_axis0(z):
        """logsumexp over axis 0 of a [K, M, N] tile whose padded rows are -inf → [M, N]."""
        z_max = tl.max(z, axis=0)
        return z_max + tl.log(tl.sum(tl.exp(z - tl.expand_dims(z_max, 0)), axis=0))

    @triton.jit
    def _head_params(w_ptr, b_ptr, offs_k, offs_c, C, K, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
        """The head's W [BK, BC] and bias [BK] (fp32, zero-padded), loaded once per program."""
        mask_k = offs_k < K
        w = tl.load(
            w_ptr + offs_k[:, None] * C + offs_c[None, :], mask=mask_k[:, None] & (offs_c < C)[None, :], other=0.0
        )
        bias = tl.zeros((BLOCK_K,), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        return w, bias

    @triton.jit
    def _level_tile(
        x_ptr,
        w,
        bias,
        present_ptr,
        xi0_ptr,
        target_ptr,
        b,
        offs_m,
        offs_c,
        offs_k,
        offs_n,
        mask_n,
        M,
        C,
        K,
        stride_xb,
        stride_xm,
        stride_xc,
        stride_ib,
        stride_ic,
        stride_tb,
        temperature,
        prior_temperature,
        ignore_index,
        HAS_MASK: tl.constexpr,
        HAS_XI0: tl.constexpr,
        HAS_TARGET: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Everything both directions need from one tile, read once: X [BM, BC, BN] (x's dtype, absent
        modalities and padding 0), the logits z [BK, BM, BN] (fp32, padded classes -inf), energy [BM, BN],
        the prior a [BM, BN] (padded and absent modalities -inf; all-absent voxels 0 on the real ones),
        absent [BN], ξ0 [BC, BN], |μ|, the target [BN], and which modalities are present [BM]."""
        mask_m = offs_m < M
        present = mask_m
        if HAS_MASK:
            present = mask_m & (tl.load(present_ptr + b * M + offs_m, mask=mask_m, other=0).to(tl.int32) != 0)
        mask_c = offs_c < C
        mask_k = offs_k < K
        X = tl.load(
            x_ptr
            + b * stride_xb
            + offs_m[:, None, None] * stride_xm
            + offs_c[None, :, None] * stride_xc
            + offs_n[None, None, :],
            mask=present[:, None, None] & mask_c[None, :, None] & mask_n[None, None, :],
            other=0.0,
        )
        # the head: one GEMM over the (modality, voxel) columns of the tile
        cols = tl.reshape(tl.permute(X, (1, 0, 2)), (BLOCK_C, BLOCK_M * BLOCK_N))
        # fp16/bf16 x: tensor-core dot with fp32 accumulation; fp32 x: exact fp32 products ("ieee", not tf32)
        z = tl.reshape(tl.dot(w.to(X.dtype), cols, input_precision="ieee"), (BLOCK_K, BLOCK_M, BLOCK_N))
        z = tl.where(mask_k[:, None, None], z + bias[:, None, None], float("-inf"))
        energy = -temperature * _lse_axis0(z / temperature)
        a = tl.where(present[:, None], -energy / prior_temperature, float("-inf"))
        absent = tl.max(a, axis=0) == float("-inf")
        a = tl.where(absent[None, :] & mask_m[:, None], 0.0, a)
        count = tl.maximum(tl.sum(present.to(tl.float32), axis=0), 1.0)
        Xf = X.to(tl.float32)
        if HAS_XI0:
            xi0 = tl.load(
                xi0_ptr + b * stride_ib + offs_c[:, None] * stride_ic + offs_n[None, :],
                mask=mask_c[:, None] & mask_n[None, :],
                other=0.0,
            ).to(tl.float32)
        else:
            xi0 = tl.sum(Xf, axis=0) / count
        if HAS_TARGET:
            target = tl.load(target_ptr + b * stride_tb + offs_n, mask=mask_n, other=ignore_index).to(tl.int32)
        else:
            target = offs_n * 0 + ignore_index
        return X, Xf, cols, z, energy, a, absent, xi0, count, target, present

    @triton.jit
    def _store_tile_rows(ptr, row_stride, rows, offs_m, offs_n, mask_n, value):
        """value [BM, BN] into rows 0 … rows-1 of a [rows, N] slab (unit stride along N)."""
        tl.store(
            ptr + offs_m[:, None] * row_stride + offs_n[None, :],
            value.to(ptr.dtype.element_ty),
            mask=(offs_m < rows)[:, None] & mask_n[None, :],
        )

    @triton.jit
    def _load_tile_rows(ptr, row_stride, rows, offs_m, offs_n, mask_n):
        return tl.load(
            ptr + offs_m[:, None] * row_stride + offs_n[None, :],
            mask=(offs_m < rows)[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)

    @triton.jit
    def _energy_fusion_fwd_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        present_ptr,
        xi0_ptr,
        target_ptr,
        fused_ptr,
        weights_ptr,
        trace_ptr,
        energies_ptr,
        ce_ptr,
        N,
        C,
        K,
        M,
        steps,
        stride_xb,
        stride_xm,
        stride_xc,
        stride_ib,
        stride_ic,
        stride_tb,
        temperature,
        prior_temperature,
        beta,
        ignore_index,
        HAS_BIAS: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_XI0: tl.constexpr,
        HAS_TARGET: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Grid (cdiv(N, BLOCK_N), B). x [B, M, C, N], xi0 [B, C, N] (unit stride along N), weight [K, C],
        bias [K], present [B, M] bool, target [B, N] → fused [B, C, N], weights [B, M, N],
        trace [B, steps + 1, N], energies [B, M, N] (+inf absent), ce [B, M, N] (0 absent), contiguous."""
        tl.static_assert(BLOCK_K >= 16 and BLOCK_C >= 16)  # tl.dot's minimum on GPUs
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_C)
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w, bias = _head_params(w_ptr, b_ptr, offs_k, offs_c, C, K, HAS_BIAS, BLOCK_K)
        X, Xf, cols, z, energy, a, absent, xi0, count, target, present = _level_tile(
            x_ptr,
            w,
            bias,
            present_ptr,
            xi0_ptr,
            target_ptr,
            b,
            offs_m,
            offs_c,
            offs_k,
            offs_n,
            mask_n,
            M,
            C,
            K,
            stride_xb,
            stride_xm,
            stride_xc,
            stride_ib,
            stride_ic,
            stride_tb,
            temperature,
            prior_temperature,
            ignore_index,
            HAS_MASK,
            HAS_XI0,
            HAS_TARGET,
            BLOCK_M,
            BLOCK_C,
            BLOCK_K,
            BLOCK_N,
        )
        bm_row = b * M * N
        _store_tile_rows(
            energies_ptr + bm_row, N, M, offs_m, offs_n, mask_n, tl.where(present[:, None], energy, float("inf"))
        )
        if HAS_TARGET:
            z_t = tl.sum(tl.where(offs_k[:, None, None] == target[None, None, :], z, 0.0), axis=0)
            ce = tl.where((target == ignore_index)[None, :] | ~present[:, None], 0.0, _lse_axis0(z) - z_t)
            _store_tile_rows(ce_ptr + bm_row, N, M, offs_m, offs_n, mask_n, ce)
        # the propagation, in registers (energy_propagate's forward kernel, with G from the resident tile)
        G, s0, n0 = gram_tile(Xf, xi0)
        e_t = trace_ptr + b * (steps + 1) * N + offs_n  # row t of the trace; advanced by N per step
        lse, p = lse_softmax(beta * s0 + a)
        tl.store(
            e_t, tl.where(absent, float("inf"), -lse / beta + 0.5 * n0).to(trace_ptr.dtype.element_ty), mask=mask_n
        )
        for _ in range(1, steps):
            u = tl.sum(G * p[None, :, :], axis=1)
            lse, p_next = lse_softmax(beta * u + a)
            e_t += N
            tl.store(
                e_t,
                tl.where(absent, float("inf"), -lse / beta + 0.5 * tl.sum(p * u, axis=0)).to(
                    trace_ptr.dtype.element_ty
                ),
                mask=mask_n,
            )
            p = p_next
        u = tl.sum(G * p[None, :, :], axis=1)  # the last step: E_T needs lse(β G p_T + a); p_T is the output
        lse, _ = lse_softmax(beta * u + a)
        e_t += N
        tl.store(
            e_t,
            tl.where(absent, float("inf"), -lse / beta + 0.5 * tl.sum(p * u, axis=0)).to(trace_ptr.dtype.element_ty),
            mask=mask_n,
        )
        p = tl.where(absent[None, :], 0.0, p)
        _store_tile_rows(weights_ptr + bm_row, N, M, offs_m, offs_n, mask_n, p)
        fused = tl.sum(tl.expand_dims(p, 1) * Xf, axis=0)  # ξ_T = X p_T  [BC, BN]
        tl.store(
            fused_ptr + b * C * N + offs_c[:, None] * N + offs_n[None, :],
            fused.to(fused_ptr.dtype.element_ty),
            mask=(offs_c < C)[:, None] & mask_n[None, :],
        )

    @triton.jit
    def _energy_fusion_bwd_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        present_ptr,
        xi0_ptr,
        target_ptr,
        d_fused_ptr,
        d_weights_ptr,
        d_trace_ptr,
        d_energies_ptr,
        d_ce_ptr,
        dx_ptr,
        dxi0_ptr,
        dw_partial_ptr,
        db_partial_ptr,
        N,
        C,
        K,
        M,
        steps,
        stride_xb,
        stride_xm,
        stride_xc,
        stride_ib,
        stride_ic,
        stride_tb,
        tiles_n,
        tiles,
        temperature,
        prior_temperature,
        beta,
        ignore_index,
        HAS_BIAS: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_XI0: tl.constexpr,
        HAS_TARGET: tl.constexpr,
        HAS_DFUSED: tl.constexpr,
        HAS_DWEIGHTS: tl.constexpr,
        HAS_DTRACE: tl.constexpr,
        HAS_DENERGIES: tl.constexpr,
        HAS_DCE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Persistent grid (P,): tiles (b, voxel block) go round-robin to programs. Inputs as in the
        forward; upstream gradients d_fused [B, C, N], d_weights / d_energies / d_ce [B, M, N],
        d_trace [B, steps + 1, N] (contiguous; absent ones: HAS_* False) → dx [B, M, C, N] and
        (HAS_XI0) dxi0 [B, C, N], contiguous, every element written; dw_partial [P, K, C] and
        db_partial [P, K] fp32, row p written once, by program p, at its end (no zero-fill)."""
        tl.static_assert(BLOCK_K >= 16 and BLOCK_C >= 16)
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_C)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_c = offs_c < C
        mask_k = offs_k < K
        # the register budget (see _GPU_CONFIGS): db accumulates elementwise in dz's layout and is reduced once,
        # at the end (a [BK] vector in a reduction's layout is held by every thread through the loop); d_fused
        # stays in its own dtype between its two uses; the dW row is stored as a flat vector
        dw_acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_K, BLOCK_M, BLOCK_N), dtype=tl.float32)  # Σ dz per (class, modality, voxel slot)
        w, bias = _head_params(w_ptr, b_ptr, offs_k, offs_c, C, K, HAS_BIAS, BLOCK_K)  # once per program
        for tile in range(pid, tiles, tl.num_programs(0)):
            b = (tile // tiles_n).to(tl.int64)
            offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            mask_cn = mask_c[:, None] & mask_n[None, :]
            X, Xf, cols, z, energy, a, absent, xi0, count, target, present = _level_tile(
                x_ptr,
                w,
                bias,
                present_ptr,
                xi0_ptr,
                target_ptr,
                b,
                offs_m,
                offs_c,
                offs_k,
                offs_n,
                mask_n,
                M,
                C,
                K,
                stride_xb,
                stride_xm,
                stride_xc,
                stride_ib,
                stride_ic,
                stride_tb,
                temperature,
                prior_temperature,
                ignore_index,
                HAS_MASK,
                HAS_XI0,
                HAS_TARGET,
                BLOCK_M,
                BLOCK_C,
                BLOCK_K,
                BLOCK_N,
            )
            G, s0, n0 = gram_tile(Xf, xi0)
            bm_row = b * M * N
            # the propagation's reverse sweep (energy_propagate's backward kernel)
            dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if HAS_DWEIGHTS:
                dp += _load_tile_rows(d_weights_ptr + bm_row, N, M, offs_m, offs_n, mask_n)
            if HAS_DFUSED:
                d_fused = tl.load(
                    d_fused_ptr + b * C * N + offs_c[:, None] * N + offs_n[None, :], mask=mask_cn, other=0.0
                )
                dp += tl.sum(Xf * tl.expand_dims(d_fused.to(tl.float32), 0), axis=1)  # q = Xᵀdξ
            de_row = d_trace_ptr + b * (steps + 1) * N + offs_n
            _, p1 = lse_softmax(beta * s0 + a)
            zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            g = zero
            d_a = zero
            dS = tl.zeros((BLOCK_M, BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, steps):
                t = steps - k
                d_e = tl.zeros((BLOCK_N,), dtype=tl.float32)
                if HAS_DTRACE:
                    d_e = tl.load(de_row + t * N, mask=mask_n, other=0.0).to(tl.float32)
                g, d_a, dS = reverse_step(G, a, p_at(G, p1, a, beta, t), g, d_a, dS, dp, d_e, beta)
                dp = zero
            p_last = p_at(G, p1, a, beta, steps)
            d_e0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            if HAS_DTRACE:
                d_e0 = tl.load(de_row, mask=mask_n, other=0.0).to(tl.float32)
            g = g - (d_e0 / beta)[None, :] * p1
            d_a += g
            keep = ~absent  # all-absent voxels: every gradient exactly 0 (selected, never NaN)
            ds0 = tl.where(keep[None, :], beta * g, 0.0)
            dS = tl.where(keep[None, None, :], dS, 0.0)
            d_e0 = tl.where(keep, d_e0, 0.0)
            d_a = tl.where(keep[None, :], d_a, 0.0)
            # dx_m = p_T,m dξ + Σ_j dS_mj x̃_j + ds0_m ξ0 (+ dξ0/|μ|) + Wᵀ dz_m
            dx = tl.sum(tl.expand_dims(dS, 2) * tl.expand_dims(Xf, 0), axis=1) + tl.expand_dims(
                ds0, 1
            ) * tl.expand_dims(xi0, 0)
            if HAS_DFUSED:
                p_keep = tl.where(keep[None, :], p_last, 0.0)
                dx += tl.expand_dims(p_keep, 1) * tl.expand_dims(d_fused, 0).to(tl.float32)
            d_xi0 = tl.sum(tl.expand_dims(ds0, 1) * Xf, axis=0) + d_e0[None, :] * xi0  # [BC, BN]
            if HAS_XI0:
                tl.store(
                    dxi0_ptr + b * C * N + offs_c[:, None] * N + offs_n[None, :],
                    d_xi0.to(dxi0_ptr.dtype.element_ty),
                    mask=mask_cn,
                )
            else:
                dx += tl.expand_dims(d_xi0 / count, 0)
            # the head: d_energy_m = μ_m (dE_out_m − da_m/τ), dz from it and d_ce
            d_en = -d_a / prior_temperature
            if HAS_DENERGIES:
                d_en += _load_tile_rows(d_energies_ptr + bm_row, N, M, offs_m, offs_n, mask_n)
            d_en = tl.where(present[:, None], d_en, 0.0)
            zt = z / temperature
            dz = -tl.expand_dims(d_en, 0) * tl.exp(zt - tl.expand_dims(_lse_axis0(zt), 0))
            if HAS_DCE:
                d_ce = _load_tile_rows(d_ce_ptr + bm_row, N, M, offs_m, offs_n, mask_n)
                d_ce = tl.where(present[:, None] & (target != ignore_index)[None, :], d_ce, 0.0)
                soft = tl.exp(z - tl.expand_dims(_lse_axis0(z), 0))
                onehot = (offs_k[:, None, None] == target[None, None, :]).to(tl.float32)
                dz += tl.expand_dims(d_ce, 0) * (soft - onehot)
            dz = tl.where(mask_k[:, None, None] & mask_n[None, None, :], dz, 0.0)
            db_acc += dz
            dz_cols = tl.reshape(dz, (BLOCK_K, BLOCK_M * BLOCK_N)).to(X.dtype)
            head = tl.dot(tl.trans(w).to(X.dtype), dz_cols, input_precision="ieee")  # Wᵀ dz  [BC, BM·BN]
            dx += tl.permute(tl.reshape(head, (BLOCK_C, BLOCK_M, BLOCK_N)), (1, 0, 2))
            dw_acc = tl.dot(dz_cols, tl.trans(cols), dw_acc, input_precision="ieee")  # Σ dz x̃ᵀ
            dx = tl.where(present[:, None, None], dx, 0.0)
            tl.store(
                dx_ptr
                + b * M * C * N
                + offs_m[:, None, None] * (C * N)
                + offs_c[None, :, None] * N
                + offs_n[None, None, :],
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask_m[:, None, None] & mask_c[None, :, None] & mask_n[None, None, :],
            )
        flat = tl.arange(0, BLOCK_K * BLOCK_C)  # dW [BK, BC] row-major: class fk, channel fc
        fk = flat // BLOCK_C
        fc = flat % BLOCK_C
        tl.store(
            dw_partial_ptr + (pid * K + fk) * C + fc,
            tl.reshape(dw_acc, (BLOCK_K * BLOCK_C,)),
            mask=(fk < K) & (fc < C),
        )
        if HAS_BIAS:
            tl.store(db_partial_ptr + pid * K + offs_k, tl.sum(tl.sum(db_acc, axis=2), axis=1), mask=mask_k)


# --------------------------------------------------------------------------------------------------
# Launchers: the one-pass kernels where the tile fits, else the ops' kernels in sequence
# --------------------------------------------------------------------------------------------------
def fits_one_pass(M: int, C: int, K: int) -> bool:
    """Whether a level runs on the one-pass kernels: its M × C tile (padded to powers of two, at least 16
    channels for tl.dot) within FUSED_MAX_FEATURES, at least 2 modality rows and at most 16 channels per row
    (FUSED_MAX_CHANNELS_PER_ROW), and at most FUSED_MAX_CLASSES classes."""
    block_m, block_c = next_pow2(M), max(16, next_pow2(C))
    return (
        2 <= block_m
        and block_c <= FUSED_MAX_CHANNELS_PER_ROW * block_m
        and block_m * block_c <= FUSED_MAX_FEATURES
        and K <= FUSED_MAX_CLASSES
    )


def _runs_one_pass(x: torch.Tensor, K: int, xi0: torch.Tensor | None, steps: int) -> bool:
    """The one dispatch predicate of the Triton levels (from shapes and strides, so also on fake tensors):
    the tile fits, and every offset inside the kernels fits int32 (the trace's ``t · N`` included, which
    can outgrow x where M · C < steps + 1); else the ops' kernels run in sequence."""
    B, M, C, N = x.shape
    return fits_one_pass(M, C, K) and not needs_int64(x, xi0) and (steps + 1) * N <= INT32_LIMIT


# (BLOCK_N, num_warps) of the one-pass kernels by (direction, BLOCK_M · BLOCK_C): the feature tile and the
# [BM, BM, BC, BN] Gram / dS products dominate the registers, so the voxel tile shrinks as the features grow
# (about 16 tile elements per thread forward, 8 backward). Swept on sm_90 for fp32, M = 4, C = 32 (forward
# 32×8: 218 registers, 16×4: 216; 32×4 spilled 220 bytes; backward 16×8: 250, 16×4 spilled 400 bytes); then
# every registered variant compiled spill-free for sm_80 and sm_90 with Triton 3.6 (ptxas 12.8 for both) and
# 3.9 (`python -m e2pa_kernels._compile`, README "How they are tested").
# The backward sits at 200-255 registers; the M-space state of a voxel (G, dS, p, g: ~16 + 16 + 4·BM values) is
# held by every thread of its column, so below 8 voxels per 8 warps a smaller voxel tile saves little (fp16
# C = 64 at 4 voxels: 255 registers and a spill at 3.6, as at 8).
# Triton 3.6 spilled (with the kernel as it was before db_acc/d_fused/the flat dW store): fp32 64 at 32×8
# (96-236 bytes at 255 registers; 3.9: 206-228) -- 16×4, the same tile per thread and threads per voxel, is
# spill-free (3.6: 206-219 registers, 3.9: 201-216); fp16/bf16 64 at 8×8 (128-196 bytes; 3.9: 235-255);
# fp16/bf16 256 at 8×8 on sm_80 (28 and 76 bytes, loop-invariant addresses of the final dW store kept live
# through the tile loop) -- the kernel's register budget changes above make it spill-free (3.6: 254-255,
# 3.9: 215-231).
_GPU_CONFIGS = {
    ("fwd", False, 64): (64, 8),
    ("fwd", False, 128): (32, 8),
    ("fwd", False, 256): (16, 8),
    ("fwd", True, 64): (64, 8),
    ("fwd", True, 128): (32, 8),
    ("fwd", True, 256): (16, 8),
    # fp32 256: 8×8 spilled 52 bytes on sm_80; fp32 64: 32×8 spilled at 3.6 (above)
    ("bwd", False, 64): (16, 4),
    ("bwd", False, 128): (16, 8),
    ("bwd", False, 256): (4, 8),
    # fp16/bf16 at C <= 16 run the 128 tiles (_triton_config); 64 is left to M <= 2
    ("bwd", True, 64): (8, 8),
    ("bwd", True, 128): (16, 8),
    ("bwd", True, 256): (8, 8),
}
# fp16/bf16 backward at C <= 16: a 16-channel tile takes more registers than a 32-channel one (the small
# tensor-core dots' layouts: 8×8 spilled 128-196 bytes at 3.6; in the first sweep 32×8 spilled 2.5 KB), so it
# runs the 32-channel tile (padded channels masked: they move no bytes) -- the very kernel C = 17 … 32 runs
# (16×8; 3.6: 255 registers, 3.9: 231-233, spill-free).
_LOW_PRECISION_BWD_MIN_CHANNELS = 32
# Tiles by (direction, low precision, BLOCK_M, BLOCK_M · BLOCK_C) where the class's tile spills: the fp32
# backward at 8 × 16 (Triton 3.6: 255 registers, 172-292 bytes at 16 voxels; 3.9: 242-255, spill-free) takes
# 8 voxels (3.6: 254, 3.9: 211 / 225 registers on sm_80 / sm_90, spill-free).
_GPU_CONFIGS_BY_ROWS = {("bwd", False, 8, 128): (8, 8)}
# Feature tiles below the smallest class (BLOCK_M · BLOCK_C < 64: M <= 2 at C <= 16, M = 1 at C <= 32) are
# padded to it (channels, masked): the class's tile per thread and register budget, one compiled variant per
# (BLOCK_M, class). The padded channels cost head and Gram FMAs only, on levels of at most 32 features.
_MIN_FEATURES = 64


def _triton_config(M: int, C: int, K: int, dtype: torch.dtype, kernel: str, interpret: bool | None = None) -> dict:
    """Block sizes of the one-pass ``kernel`` ("fwd"/"bwd"): the whole [BLOCK_M, BLOCK_C] feature tile of
    BLOCK_N voxels in registers. The interpreter gets 16-voxel tiles (tests span several)."""
    block_m, block_c, block_k = next_pow2(M), max(16, next_pow2(C)), max(16, next_pow2(K))
    if small_interpreter_blocks() if interpret is None else interpret:
        return dict(BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_N=16, num_warps=4)
    low_precision = dtype != torch.float32
    block_c = max(block_c, _MIN_FEATURES // block_m)
    if kernel == "bwd" and low_precision and block_m * _LOW_PRECISION_BWD_MIN_CHANNELS <= FUSED_MAX_FEATURES:
        block_c = max(block_c, _LOW_PRECISION_BWD_MIN_CHANNELS)
    key = (kernel, low_precision, block_m * block_c)
    block_n, warps = _GPU_CONFIGS_BY_ROWS.get((kernel, low_precision, block_m, key[2])) or _GPU_CONFIGS[key]
    return dict(BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=warps)


def _fwd_meta(
    M: int,
    C: int,
    K: int,
    dtype: torch.dtype,
    *,
    bias: bool,
    masked: bool,
    xi0: bool,
    target: bool,
    interpret: bool | None = None,
) -> dict:
    """The forward kernel's keyword arguments (constexprs, num_warps) for these inputs: what the launcher
    passes, and what ``gpu_compile_specs`` compiles."""
    cfg = _triton_config(M, C, K, dtype, "fwd", interpret)
    return dict(HAS_BIAS=bias, HAS_MASK=masked, HAS_XI0=xi0, HAS_TARGET=target, **cfg)


def _bwd_meta(
    M: int,
    C: int,
    K: int,
    dtype: torch.dtype,
    *,
    bias: bool,
    masked: bool,
    xi0: bool,
    target: bool,
    d_fused: bool,
    d_weights: bool,
    d_trace: bool,
    d_energies: bool,
    d_ce: bool,
    interpret: bool | None = None,
) -> dict:
    """The backward kernel's keyword arguments (constexprs, num_warps) for these inputs."""
    cfg = _triton_config(M, C, K, dtype, "bwd", interpret)
    return dict(
        HAS_BIAS=bias,
        HAS_MASK=masked,
        HAS_XI0=xi0,
        HAS_TARGET=target,
        HAS_DFUSED=d_fused,
        HAS_DWEIGHTS=d_weights,
        HAS_DTRACE=d_trace,
        HAS_DENERGIES=d_energies,
        HAS_DCE=d_ce,
        **cfg,
    )


def _scalars(params: FusionParams):
    return float(params.temperature), float(params.prior_temperature), float(params.beta), int(params.ignore_index)


def energy_fusion_fwd(x, weight, bias, mask, xi0, target, params: FusionParams):
    """The Triton forward of one level.

    Args:
        x: ``[B, M, C, N]`` (unit stride along N). weight ``[K, C]``, bias ``[K]`` or None (contiguous).
        mask: ``[B, M]`` bool contiguous or None. xi0: ``[B, C, N]`` (unit stride along N) or None (= the
        masked mean). target: ``[B, N]`` int64 (unit stride along N) or None.

    Returns:
        ``(fused [B, C, N], weights [B, M, N], trace [B, steps + 1, N], energies [B, M, N] (+inf absent),
        ce [B, M, N] (0 absent) or None, saved)``, contiguous in x's dtype; ``saved`` is what
        :func:`energy_fusion_bwd` needs besides the inputs (a tuple of tensors: empty after the one-pass
        kernel, the energies after the chunked-C path).
    """
    B, M, C, N = x.shape
    K = weight.shape[0]
    if not _runs_one_pass(x, K, xi0, params.steps):
        return _composed_fwd(x, weight, bias, mask, xi0, target, params)
    weight, bias = head_fp32(weight, bias)
    steps = params.steps
    fused = x.new_empty((B, C, N))
    weights = x.new_empty((B, M, N))
    trace = x.new_empty((B, steps + 1, N))
    energies = x.new_empty((B, M, N))
    ce = x.new_empty((B, M, N)) if target is not None else None
    if B == 0 or N == 0:
        return fused, weights, trace, energies, ce, ()
    meta = _fwd_meta(
        M, C, K, x.dtype, bias=bias is not None, masked=mask is not None, xi0=xi0 is not None, target=target is not None
    )
    with device_guard(x):
        _energy_fusion_fwd_kernel[(cdiv(N, meta["BLOCK_N"]), B)](
            x,
            weight,
            bias if bias is not None else weight,
            mask if mask is not None else x,
            xi0 if xi0 is not None else x,
            target if target is not None else x,
            fused,
            weights,
            trace,
            energies,
            ce if ce is not None else energies,
            N,
            C,
            K,
            M,
            steps,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            xi0.stride(0) if xi0 is not None else 0,
            xi0.stride(1) if xi0 is not None else 0,
            target.stride(0) if target is not None else 0,
            *_scalars(params),
            **meta,
        )
    return fused, weights, trace, energies, ce, ()


def energy_fusion_bwd(
    x, weight, bias, mask, xi0, target, saved, params: FusionParams, d_xi, d_w, d_trace, d_energy, d_ce
):
    """The Triton backward of one level: inputs as in :func:`energy_fusion_fwd`, ``saved`` from it, and
    the upstream gradients of its outputs (each its output's shape, any layout, or None).

    Returns:
        ``(dx [B, M, C, N] in x's dtype, dw [K, C] fp32, db [K] fp32 or None, dxi0 [B, C, N] or None)``.
    """
    if saved:
        return _composed_bwd(x, weight, bias, mask, xi0, target, saved, params, d_xi, d_w, d_trace, d_energy, d_ce)
    B, M, C, N = x.shape
    K = weight.shape[0]
    weight, bias = head_fp32(weight, bias)
    ups = [t.contiguous() if t is not None else None for t in (d_xi, d_w, d_trace, d_energy, d_ce)]
    cfg = _bwd_meta(
        M,
        C,
        K,
        x.dtype,
        bias=bias is not None,
        masked=mask is not None,
        xi0=xi0 is not None,
        target=target is not None,
        d_fused=ups[0] is not None,
        d_weights=ups[1] is not None,
        d_trace=ups[2] is not None,
        d_energies=ups[3] is not None,
        d_ce=ups[4] is not None and target is not None,
    )
    dx = torch.empty((B, M, C, N), dtype=x.dtype, device=x.device)
    dxi0 = torch.empty((B, C, N), dtype=xi0.dtype, device=x.device) if xi0 is not None else None
    tiles_n = cdiv(N, cfg["BLOCK_N"])
    tiles = tiles_n * B
    programs = persistent_programs(x.device, max(tiles, 1))
    dw_partial = (
        torch.zeros((programs, K, C), dtype=torch.float32, device=x.device)
        if tiles == 0
        else torch.empty((programs, K, C), dtype=torch.float32, device=x.device)
    )
    db_partial = (
        torch.zeros((programs, K), dtype=torch.float32, device=x.device)
        if tiles == 0
        else torch.empty((programs, K), dtype=torch.float32, device=x.device)
    )
    if tiles:
        with device_guard(x):
            _energy_fusion_bwd_kernel[(programs,)](
                x,
                weight,
                bias if bias is not None else weight,
                mask if mask is not None else x,
                xi0 if xi0 is not None else x,
                target if target is not None else x,
                *(u if u is not None else x for u in ups),
                dx,
                dxi0 if dxi0 is not None else dx,
                dw_partial,
                db_partial,
                N,
                C,
                K,
                M,
                params.steps,
                x.stride(0),
                x.stride(1),
                x.stride(2),
                xi0.stride(0) if xi0 is not None else 0,
                xi0.stride(1) if xi0 is not None else 0,
                target.stride(0) if target is not None else 0,
                tiles_n,
                tiles,
                *_scalars(params),
                **cfg,
            )
    dw = dw_partial.sum(dim=0)  # fixed-order sums of the per-program partials: deterministic
    db = db_partial.sum(dim=0) if bias is not None else None
    return dx, dw, db, dxi0


# The chunked-C path (the ops' kernels, one dx buffer)
def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_m x̃_m / |μ| [B, C, N] in x's dtype, one modality at a time (no x-sized temporary; ``where``,
    so an absent modality's NaN stays out)."""
    B, M = x.shape[:2]
    acc = accumulation_dtype(x)
    total = torch.zeros((B, *x.shape[2:]), dtype=acc, device=x.device)
    for m in range(M):
        total += x[:, m] if mask is None else torch.where(mask[:, m, None, None], x[:, m], 0.0)
    return (total / _count(mask, M, acc, B, x.device)).to(x.dtype)


def _prior_and_mean(x, energy, mask, xi0, params: FusionParams):
    """The log-prior a [B, M, N] and ξ0 [B, C, N] the propagation runs on (x's dtype)."""
    a = -energy / params.prior_temperature
    if mask is not None:
        a = torch.where(mask[:, :, None], a, float("-inf"))
    return a, (xi0 if xi0 is not None else _masked_mean(x, mask))


def _composed_fwd(x, weight, bias, mask, xi0, target, params: FusionParams):
    """The chunked-C forward (levels whose M × C tile does not fit): the ops' kernels in sequence.

    Args:
        x: ``[B, M, C, N]`` (unit stride along N). weight ``[K, C]``, bias ``[K]`` or None (contiguous).
        mask: ``[B, M]`` bool contiguous or None. xi0: ``[B, C, N]`` or None (= the masked mean).
        target: ``[B, N]`` int64 or None.

    Returns:
        ``(fused [B, C, N], weights [B, M, N], trace [B, steps + 1, N], energies [B, M, N] (+inf absent),
        ce [B, M, N] (0 absent) or None, saved)``: ``saved`` is what :func:`energy_fusion_bwd` needs
        besides the inputs (a tuple of tensors, possibly empty).
    """
    energy, ce = free_energy_op.free_energy_fwd(
        x, weight, bias, target, params.temperature, params.ignore_index, present=mask
    )
    a, initial = _prior_and_mean(x, energy, mask, xi0, params)
    fused, weights, trace = propagate_op.energy_propagate_fwd(x, initial, a, params.beta, params.steps, present=mask)
    if mask is not None:
        present = mask[:, :, None]
        ce = torch.where(present, ce, 0.0) if ce is not None else None
        return fused, weights, trace, torch.where(present, energy, float("inf")), ce, (energy,)
    return fused, weights, trace, energy, ce, (energy,)


def _composed_bwd(x, weight, bias, mask, xi0, target, saved, params: FusionParams, d_xi, d_w, d_trace, d_energy, d_ce):
    """The chunked-C backward: energy_propagate's backward kernel writes dx, the mean's term is added in
    place, free_energy's backward kernel adds Wᵀdz into the same buffer (one x-sized gradient buffer)."""
    (energy,) = saved
    B, M = x.shape[:2]
    a, initial = _prior_and_mean(x, energy, mask, xi0, params)
    dx, d_initial, da = propagate_op.energy_propagate_bwd(
        x, initial, a, params.beta, params.steps, d_xi, d_w, d_trace, present=mask
    )
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
    _, dw, db = free_energy_op.free_energy_bwd(
        x, weight, bias, target, params.temperature, params.ignore_index, d_en.to(x.dtype), d_ce, dx=dx, present=mask
    )
    if mask is not None:
        dx.masked_fill_(~mask[:, :, None, None], 0.0)
    return dx, dw, db, (d_initial if xi0 is not None else None)


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

    def __init__(
        self, x, weight, bias, mask, count, xi0, target, params: FusionParams, s: int, e: int, with_ce: bool = True
    ):
        acc = accumulation_dtype(x)
        xs = x[..., s:e].to(acc)
        self.present = None if mask is None else mask[:, :, None]  # [B, M, 1]
        self.xs = xs if mask is None else torch.where(self.present[..., None], xs, 0.0)  # [B, M, C, n]
        # the head in x's dtype, as the reference runs it
        self.z = free_energy_op.torch_logits(
            self.xs, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None
        )
        self.target = target[:, s:e] if target is not None else None
        self.energy, self.ce = free_energy_op.torch_energy_chunk(
            self.z, self.target if with_ce else None, params.temperature, params.ignore_index
        )
        self.log_prior = self.where_present(-self.energy / params.prior_temperature, float("-inf"))
        self.xis = xi0[..., s:e].to(acc) if xi0 is not None else self.xs.sum(dim=1) / count  # [B, C, n]

    def where_present(self, t: torch.Tensor, absent_value: float) -> torch.Tensor:
        return t if self.present is None else torch.where(self.present, t, absent_value)


def _count(mask: torch.Tensor | None, M: int, acc: torch.dtype, B: int, device) -> torch.Tensor:
    """|μ| per sample as ``[B, 1, 1]`` (at least 1: a sample without modalities gets ξ0 = 0)."""
    if mask is None:
        return torch.full((B, 1, 1), float(M), dtype=acc, device=device)
    return mask.sum(dim=1).clamp_min(1).to(acc)[:, None, None]


def _torch_forward(x, weight, bias, mask, xi0, target, params: FusionParams):
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
            c.xs, c.xis, c.log_prior, params.beta, params.steps
        )
        energies[..., s:e] = c.where_present(c.energy, float("inf"))
        if ce is not None:
            ce[..., s:e] = c.where_present(c.ce, 0.0)
    return fused, weights, trace, energies, ce


def _torch_backward(x, weight, bias, mask, xi0, target, params: FusionParams, d_xi, d_w, d_trace, d_energy, d_ce):
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
        cot = propagate_op.torch_backward_chunk(
            c.xs, c.xis, c.log_prior, params.beta, params.steps, dxs, chunk(d_w, s, e), chunk(d_trace, s, e)
        )
        d_en = -cot.da / params.prior_temperature
        if d_energy is not None:
            d_en = d_en + chunk(d_energy, s, e)
        d_c = chunk(d_ce, s, e)
        dz = free_energy_op.torch_logits_grad(
            c.z,
            c.target,
            params.temperature,
            params.ignore_index,
            c.where_present(d_en, 0.0),
            c.where_present(d_c, 0.0) if d_c is not None else None,
        )
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
# autograd
# --------------------------------------------------------------------------------------------------
# Registered as torch.library custom ops (forward and backward): one opaque node each for
# torch.compile (no graph break, fullgraph=True works), shapes from the fake implementations, the
# hand-written single-buffer backward for autograd. x [B, M, C, N] (unit stride along N), weight [K, C],
# bias [K]|None, mask [B, M] bool|None, xi0 [B, C, N]|None, target [B, N] int64|None. An optional output
# is an empty [0] tensor when absent (an op cannot return None). Saved for backward: the inputs, plus the
# unmasked head energies [B, M, N] on the Triton chunked-C path (what energy_fusion_bwd reads).
_NO_TENSOR = (0,)


def _saves_energy(x: torch.Tensor, K: int, xi0: torch.Tensor | None, steps: int, use_triton: bool) -> bool:
    """Whether energy_fusion_fwd takes the chunked-C path, whose backward reads the head energies (the
    one-pass kernels recompute everything): decided from shapes and strides, so also on fake tensors."""
    return use_triton and not _runs_one_pass(x, K, xi0, steps)


# the schema spelled out (not inferred from the postponed annotations of this module)
@torch.library.custom_op(
    "e2pa::energy_fusion",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? xi0, Tensor? target, float temperature, "
        "float prior_temperature, float beta, int steps, int ignore_index, bool use_triton) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
def _energy_fusion_op(
    x, weight, bias, mask, xi0, target, temperature, prior_temperature, beta, steps, ignore_index, use_triton
):
    """fused [B, C, N], weights [B, M, N], trace [B, steps + 1, N], energies [B, M, N], ce [B, M, N] (or
    empty without a target), and the unmasked head energies [B, M, N] that the chunked-C Triton backward
    reads (empty otherwise, and without a mask, where they are the energies output itself)."""
    params = FusionParams(temperature, prior_temperature, beta, steps, ignore_index)
    x = voxels_last(x, 3)
    xi0 = voxels_last(xi0, 2) if xi0 is not None else None
    if use_triton:
        fused, weights, trace, energies, ce, saved = energy_fusion_fwd(x, weight, bias, mask, xi0, target, params)
        raw = saved[0] if saved and mask is not None else None
    else:
        (fused, weights, trace, energies, ce), raw = _torch_forward(x, weight, bias, mask, xi0, target, params), None
    # outputs must not alias each other: one empty tensor per absent output
    return (
        fused,
        weights,
        trace,
        energies,
        ce if ce is not None else x.new_empty(_NO_TENSOR),
        raw if raw is not None else x.new_empty(_NO_TENSOR),
    )


@_energy_fusion_op.register_fake
def _(x, weight, bias, mask, xi0, target, temperature, prior_temperature, beta, steps, ignore_index, use_triton):
    B, M, C, N = x.shape
    raw = _saves_energy(voxels_last(x, 3), weight.shape[0], xi0, steps, use_triton) and mask is not None
    return (
        x.new_empty((B, C, N)),
        x.new_empty((B, M, N)),
        x.new_empty((B, steps + 1, N)),
        x.new_empty((B, M, N)),
        x.new_empty((B, M, N) if target is not None else _NO_TENSOR),
        x.new_empty((B, M, N) if raw else _NO_TENSOR),
    )


@torch.library.custom_op(
    "e2pa::energy_fusion_backward",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? xi0, Tensor? target, Tensor? energy, "
        "Tensor? d_xi, Tensor? d_w, Tensor? d_trace, Tensor? d_energy, Tensor? d_ce, float temperature, "
        "float prior_temperature, float beta, int steps, int ignore_index, bool use_triton) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
)
def _energy_fusion_backward_op(
    x,
    weight,
    bias,
    mask,
    xi0,
    target,
    energy,
    d_xi,
    d_w,
    d_trace,
    d_energy,
    d_ce,
    temperature,
    prior_temperature,
    beta,
    steps,
    ignore_index,
    use_triton,
):
    """dx [B, M, C, N] (contiguous, x's dtype), dw [K, C], db [K] (or empty without a bias) and dxi0
    [B, C, N] (or empty without xi0), in the dtypes of their inputs. ``energy``: the unmasked head
    energies (the chunked-C Triton path only)."""
    params = FusionParams(temperature, prior_temperature, beta, steps, ignore_index)
    x = voxels_last(x, 3)
    xi0 = voxels_last(xi0, 2) if xi0 is not None else None
    if use_triton:
        dx, dw, db, dxi0 = energy_fusion_bwd(
            x,
            weight,
            bias,
            mask,
            xi0,
            target,
            (energy,) if energy is not None else (),
            params,
            d_xi,
            d_w,
            d_trace,
            d_energy,
            d_ce,
        )
    else:
        dx, dw, db, dxi0 = _torch_backward(
            x, weight, bias, mask, xi0, target, params, d_xi, d_w, d_trace, d_energy, d_ce
        )
    return (
        dx,
        dw.to(weight.dtype),
        db.to(bias.dtype) if bias is not None else x.new_empty(_NO_TENSOR),
        dxi0 if dxi0 is not None else x.new_empty(_NO_TENSOR),
    )


@_energy_fusion_backward_op.register_fake
def _(
    x,
    weight,
    bias,
    mask,
    xi0,
    target,
    energy,
    d_xi,
    d_w,
    d_trace,
    d_energy,
    d_ce,
    temperature,
    prior_temperature,
    beta,
    steps,
    ignore_index,
    use_triton,
):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape) if bias is not None else x.new_empty(_NO_TENSOR),
        xi0.new_empty(xi0.shape) if xi0 is not None else x.new_empty(_NO_TENSOR),
    )


def _energy_fusion_setup_context(ctx, inputs, output):
    x, weight, bias, mask, xi0, target, *scalars, use_triton = inputs
    energy = None
    if _saves_energy(voxels_last(x, 3), weight.shape[0], xi0, scalars[3], use_triton):
        energy = output[5] if mask is not None else output[3]  # without a mask: the energies output itself
    ctx.save_for_backward(x, weight, bias, mask, xi0, target, energy)
    ctx.scalars, ctx.use_triton = scalars, use_triton
    ctx.set_materialize_grads(False)


def _energy_fusion_backward(ctx, d_xi, d_w, d_trace, d_energy, d_ce, d_raw):
    x, weight, bias, mask, xi0, target, energy = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if all(g is None for g in (d_xi, d_w, d_trace, d_energy, d_ce)) or not any(needs[:5]):
        return (None,) * 12
    dx, dw, db, dxi0 = _energy_fusion_backward_op(
        x,
        weight,
        bias,
        mask,
        xi0,
        target,
        energy,
        d_xi,
        d_w,
        d_trace,
        d_energy,
        d_ce if target is not None else None,
        *ctx.scalars,
        ctx.use_triton,
    )
    return (
        dx if needs[0] else None,
        dw if needs[1] else None,
        db if bias is not None and needs[2] else None,
        None,
        dxi0 if xi0 is not None and needs[4] else None,
    ) + (None,) * 7


_energy_fusion_op.register_autograd(_energy_fusion_backward, setup_context=_energy_fusion_setup_context)


def check_inputs(
    x,
    weight,
    bias,
    modality_mask,
    xi0,
    temperature,
    prior_temperature,
    beta,
    steps,
    target,
    ignore_index,
    validate=True,
) -> FusionParams:
    """Validate :func:`energy_fusion`'s arguments (``validate``: also target's values, one host read)."""
    check_tensor(OP, "x", x, min_ndim=4)
    B, M = x.shape[:2]
    spatial_dims = x.dim() - 3
    # the head's arguments (x, weight, bias, temperature, target, ignore_index), with the ops' own messages
    _, temperature = free_energy_op.check_inputs(
        x, weight, bias, temperature, target, ignore_index, spatial_dims, validate
    )
    if xi0 is not None:
        beta, steps = propagate_op.check_inputs(x, xi0, None, beta, steps)
    else:
        beta, steps = propagate_op.check_beta_and_steps(beta, steps)
    prior_temperature = check_finite_scalar(OP, "prior_temperature", prior_temperature, positive=True)
    if modality_mask is not None:
        check_tensor(OP, "modality_mask", modality_mask, dtypes=(torch.bool,), min_ndim=2, max_ndim=2)
        check_shape(OP, "modality_mask", modality_mask, (B, M), "[B, M] (x's batch and modalities; True = available)")
        check_same_device(OP, x=x, modality_mask=modality_mask)
    return FusionParams(temperature, prior_temperature, beta, steps, ignore_index)


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
    validate: bool = True,
) -> EnergyFusion:
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
        validate: check target's values (one host read); False when the caller has checked them.

    Returns:
        :class:`EnergyFusion` ``(fused, weights, trace, energies, ce)``, in x's dtype.
    """
    params = check_inputs(
        x, weight, bias, modality_mask, xi0, temperature, prior_temperature, beta, steps, target, ignore_index, validate
    )
    K, (B, M), spatial = weight.shape[0], x.shape[:2], x.shape[3:]
    limit = (
        f"{OP}: the Triton kernels take K <= {free_energy_op.TRITON_MAX_CLASSES} classes; got K = {K}"
        if K > free_energy_op.TRITON_MAX_CLASSES
        else f"{OP}: the Triton kernels take M <= {propagate_op.TRITON_MAX_MODALITIES} modalities; got M = {M}"
        if M > propagate_op.TRITON_MAX_MODALITIES
        else None
    )
    backend = select_backend(x, weight, bias, xi0, target, modality_mask, triton_limit=limit)
    if backend == "reference":
        return EnergyFusion(
            *reference.energy_fusion(
                x,
                weight,
                bias,
                modality_mask,
                xi0,
                temperature=params.temperature,
                prior_temperature=params.prior_temperature,
                beta=params.beta,
                steps=params.steps,
                target=target,
                ignore_index=ignore_index,
            )
        )
    x4 = voxels_last(x, 3)
    xi3 = voxels_last(xi0, 2) if xi0 is not None else None
    target2 = voxels_last(target.long(), 1) if target is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        outs = _energy_fusion_op(
            x4,
            weight.contiguous(),
            bias.contiguous() if bias is not None else None,
            modality_mask.contiguous() if modality_mask is not None else None,
            xi3,
            target2,
            params.temperature,
            params.prior_temperature,
            params.beta,
            params.steps,
            params.ignore_index,
            backend == "triton",
        )
    fused, weights, trace, energies = (o.view(o.shape[0], o.shape[1], *spatial) for o in outs[:4])
    ce = outs[4].view(B, M, *spatial) if target is not None else None
    return EnergyFusion(fused, weights, trace, energies, ce)


# --------------------------------------------------------------------------------------------------
# The normalised level (EHF's default, docs/method.md "Normalised fusion") as one node
# --------------------------------------------------------------------------------------------------
# Per sample, modality m and voxel (ε the RMS floor, g = sigmoid(γ) the gate, u_m = μ_m/|μ| the uniform share)::
#
#     r_m = sqrt(mean_c x̃_m² + ε²),  x̂_m = x̃_m / r_m               (absent: x̃ = 0, x̂ = 0)
#     ξ̂0 = xi0 / sqrt(mean_c xi0² + ε²)  (when xi0 is given)
#     _, p, trace, energies, ce = energy_fusion(x̂, W, b, μ, ξ̂0)     the op above (its launchers)
#     w_m = (1 − g)·u_m + g·p_m,   fused = Σ_m w_m x̃_m               (mixed one modality at a time)
#
# VJP, from the upstream gradients dF (fused), dw (weights), d_trace, d_energies, d_ce::
#
#     dw̄_m = dw_m + ⟨dF, x̃_m⟩_c      dp = g·dw̄      dg = Σ (p_m − u_m)·dw̄_m
#     dx̂, dW, db, dξ̂0 = energy_fusion's backward (dp as its weights' gradient; no fused gradient)
#     dx_m = μ_m·[ (dx̂_m − x̂_m·mean_c(x̂_m·dx̂_m)) / r_m + w_m·dF ]    (RMS VJP, the mix's term added)
#     dxi0 = (dξ̂0 − ξ̂0·mean_c(ξ̂0·dξ̂0)) / r_0
#
# Both directions run in voxel chunks: a chunk's x̃, r, x̂ (recomputed in the backward), dx̂ (turned into dx
# in place) and one product for the channel means are its only x-sized temporaries, so beyond its inputs a
# step holds dx and a few chunk-sized buffers. One chunk (the usual case on the Triton path below 4 Mi
# elements of x) hands its buffers out without a copy. Saved for backward: the inputs, p [B, M, N] (dg needs
# it; it cannot be recovered from w at g = 0) and, on the chunked-C Triton path, the head energies [B, M, N].
_TRITON_CHUNK_ELEMENTS = 1 << 22  # x elements per chunk on the Triton path (16 MiB of fp32 x)


def _normalized_chunks(x: torch.Tensor, K: int, steps: int, use_triton: bool):
    B, M, C, N = x.shape
    if use_triton:
        return voxel_chunks(N, B * M * C, _TRITON_CHUNK_ELEMENTS)
    return _chunks(x, K, steps)


def _rms_normalized(t: torch.Tensor, eps: float, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / r in t's dtype, r [..., 1, n] in the accumulation dtype) along the channel axis -2 of
    ``t`` ``[..., C, n]``, r = sqrt(mean_c t² + eps²) (as :func:`e2pa_kernels.reference.rms_normalize`).
    Triton path (GPU): the norm, which reads t once and writes no t-sized square; the torch path (CPU, small
    chunks) squares first: PyTorch's CPU norm over a non-innermost axis is ~20× slower than square + sum."""
    acc = accumulation_dtype(t)
    if use_triton:
        square_sum = torch.linalg.vector_norm(t, dim=-2, keepdim=True, dtype=acc).square_()
    else:
        square_sum = t.to(acc).square().sum(dim=-2, keepdim=True)
    r = square_sum.div_(t.shape[-2]).add_(eps * eps).sqrt_()
    return t / r.to(t.dtype), r


def _rms_vjp(t_hat: torch.Tensor, r: torch.Tensor, d_hat: torch.Tensor | None, shape) -> torch.Tensor:
    """dt = dt̂/r − t̂·(mean_c(t̂·dt̂)/r) in the accumulation dtype (t̂, dt̂ ``[..., C, n]``, r ``[..., 1, n]``),
    formed in dt̂'s buffer when it is already in that dtype; zeros of ``shape`` when dt̂ is None."""
    acc = r.dtype
    if d_hat is None:
        return torch.zeros(shape, dtype=acc, device=r.device)
    t_hat, d = t_hat.to(acc), d_hat.to(acc)
    dot = (t_hat * d).mean(dim=-2, keepdim=True).div_(r)
    return d.div_(r).addcmul_(t_hat, dot, value=-1.0)


def _uniform(mask: torch.Tensor | None, B: int, M: int, acc: torch.dtype, device) -> torch.Tensor:
    """u = μ/|μ| as ``[B, M, 1]`` (0 for a sample without modalities)."""
    if mask is None:
        return torch.full((B, M, 1), 1.0 / M, dtype=acc, device=device)
    return (mask.to(acc) / mask.sum(dim=1, keepdim=True).clamp_min(1).to(acc))[:, :, None]


class _NormalizedChunk:
    """Voxels ``[s, e)`` of a normalised level: x̃ (x's dtype; absent modalities exact zeros), r and x̂, and
    ξ̂0 with its r0."""

    def __init__(self, x, mask, xi0, target, eps: float, s: int, e: int, use_triton: bool):
        whole = s == 0 and e == x.shape[-1]
        xs = x if whole else x[..., s:e]
        self.xs = xs if mask is None else torch.where(mask[:, :, None, None], xs, 0.0)  # [B, M, C, n]
        self.x_hat, self.r = _rms_normalized(self.xs, eps, use_triton)
        self.xi0_hat, self.r0 = (None, None)
        if xi0 is not None:
            self.xi0_hat, self.r0 = _rms_normalized(xi0 if whole else xi0[..., s:e], eps, use_triton)
        self.target = None if target is None else target if whole else target[:, s:e]


def _gather(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The chunks' pieces joined along the voxel axis (the piece itself for one chunk: no copy)."""
    if parts[0] is None:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def normalized_fusion_fwd(x, weight, bias, mask, xi0, target, gate, eps: float, params: FusionParams, use_triton):
    """The forward of a normalised level, on the Triton launchers (``use_triton``) or the memory-lean torch
    path, in voxel chunks.

    Args:
        x: ``[B, M, C, N]`` raw features (unit stride along N). weight ``[K, C]``, bias ``[K]`` or None.
        mask: ``[B, M]`` bool or None. xi0: ``[B, C, N]`` before normalisation (unit stride along N) or None.
        target: ``[B, N]`` int64 or None. gate: 0-d, g in [0, 1]. eps: the RMS floor.

    Returns:
        ``(fused [B, C, N], weights [B, M, N] (w), trace [B, steps + 1, N], energies [B, M, N], ce [B, M, N]
        or None, p [B, M, N] (energy_fusion's weights), head energies [B, M, N] or None)`` in x's dtype: the
        last two are what :func:`normalized_fusion_bwd` reads besides the inputs (the head energies only
        on the chunked-C Triton path).
    """
    B, M, C, N = x.shape
    acc = accumulation_dtype(x)
    g = gate.to(acc)
    mix_uniform = (1 - g) * _uniform(mask, B, M, acc, x.device)  # [B, M, 1]
    pieces = []  # per chunk: fused, weights, trace, energies, ce, p, head energies
    for s, e in _normalized_chunks(x, weight.shape[0], params.steps, use_triton):
        c = _NormalizedChunk(x, mask, xi0, target, eps, s, e, use_triton)
        if use_triton:
            _, p_c, trace_c, energies_c, ce_c, saved = energy_fusion_fwd(
                c.x_hat, weight, bias, mask, c.xi0_hat, c.target, params
            )
        else:
            _, p_c, trace_c, energies_c, ce_c = _torch_forward(c.x_hat, weight, bias, mask, c.xi0_hat, c.target, params)
            saved = ()
        del c.x_hat
        w_c = mix_uniform + g * p_c.to(acc)  # [B, M, n]
        # Σ_m w_m x̃_m one modality at a time, accumulated in place (no [B, M, C, n] product)
        xs = c.xs if acc == x.dtype else c.xs.to(acc)
        fused_c = w_c[:, 0, None] * xs[:, 0]
        for m in range(1, M):
            fused_c.addcmul_(w_c[:, m, None], xs[:, m])
        pieces.append(
            (fused_c.to(x.dtype), w_c.to(x.dtype), trace_c, energies_c, ce_c, p_c, saved[0] if saved else None)
        )
    if not pieces:  # no voxels
        empty = x.new_empty((B, M, 0))
        return x.new_empty((B, C, 0)), empty, x.new_empty((B, params.steps + 1, 0)), empty, None, empty, None
    return tuple(_gather(list(parts)) for parts in zip(*pieces))


def normalized_fusion_bwd(
    x, weight, bias, mask, xi0, target, gate, p, raw, eps: float, params: FusionParams, use_triton, ups
):
    """The backward of a normalised level: inputs as :func:`normalized_fusion_fwd`, its ``p`` and head
    energies ``raw`` (or None), and ``ups`` = (d_fused, d_weights, d_trace, d_energies, d_ce), each its
    output's shape or None.

    An absent modality's dx is exactly 0 without a final mask: x̃ = x̂ = 0 there, energy_fusion's backward
    gives dx̂ = 0 and w = 0.

    Returns:
        ``(dx [B, M, C, N] in x's dtype, dw [K, C], db [K] or None, dxi0 [B, C, N] in xi0's dtype or None,
        dgate 0-d)``; dw, db and dgate in the accumulation dtype.
    """
    B, M, C, N = x.shape
    K = weight.shape[0]
    acc = accumulation_dtype(x)
    d_fused, d_weights, d_trace, d_energy, d_ce = ups
    chunks = _normalized_chunks(x, K, params.steps, use_triton)
    whole = len(chunks) <= 1  # one chunk: its buffers are the results (no copy)
    dx = None if whole else torch.empty((B, M, C, N), dtype=x.dtype, device=x.device)
    dxi0 = None if whole or xi0 is None else torch.empty((B, C, N), dtype=xi0.dtype, device=x.device)
    dw = torch.zeros((K, C), dtype=acc, device=x.device)
    db = torch.zeros((K,), dtype=acc, device=x.device)
    dgate = torch.zeros((), dtype=acc, device=x.device)
    g = gate.to(acc)
    uniform = _uniform(mask, B, M, acc, x.device)  # [B, M, 1]

    def chunk(t, s, e):
        return t[..., s:e] if t is not None else None

    for s, e in chunks:
        c = _NormalizedChunk(x, mask, xi0, target, eps, s, e, use_triton)
        p_c = p[..., s:e].to(acc)
        dfc = d_fused[..., s:e].to(acc) if d_fused is not None else None
        # dw̄ = dw + ⟨dF, x̃⟩_c
        dwbar = d_weights[..., s:e].to(acc) if d_weights is not None else None
        if dfc is not None:
            mix = (c.xs * dfc[:, None]).sum(dim=2, dtype=acc)  # [B, M, n]
            dwbar = mix if dwbar is None else mix.add_(dwbar)
        if dwbar is not None:
            dgate += ((p_c - uniform) * dwbar).sum()
        op_ups = (
            None,
            (g * dwbar).to(x.dtype) if dwbar is not None else None,
            chunk(d_trace, s, e),
            chunk(d_energy, s, e),
            chunk(d_ce, s, e) if target is not None else None,
        )
        dx_hat = dxi0_hat = None
        if any(u is not None for u in op_ups):
            if use_triton:
                saved = (raw[..., s:e].contiguous(),) if raw is not None else ()
                dx_hat, dw_c, db_c, dxi0_hat = energy_fusion_bwd(
                    c.x_hat, weight, bias, mask, c.xi0_hat, c.target, saved, params, *op_ups
                )
            else:
                dx_hat, dw_c, db_c, dxi0_hat = _torch_backward(
                    c.x_hat, weight, bias, mask, c.xi0_hat, c.target, params, *op_ups
                )
            dw += dw_c
            if db_c is not None:
                db += db_c
        dx_c = _rms_vjp(c.x_hat, c.r, dx_hat, c.xs.shape)
        del dx_hat
        if dfc is not None:
            w_c = (1 - g) * uniform + g * p_c  # [B, M, n]
            dx_c.addcmul_(w_c[:, :, None], dfc[:, None])
        if xi0 is not None:
            dxi0_c = _rms_vjp(c.xi0_hat, c.r0, dxi0_hat, c.xi0_hat.shape).to(xi0.dtype)
            if whole:
                dxi0 = dxi0_c
            else:
                dxi0[..., s:e] = dxi0_c
        if whole:
            dx = dx_c.to(x.dtype)
        else:
            dx[..., s:e] = dx_c
    if dx is None:  # no voxels
        dx = torch.zeros((B, M, C, N), dtype=x.dtype, device=x.device)
        dxi0 = torch.zeros((B, C, N), dtype=xi0.dtype, device=x.device) if xi0 is not None else None
    return dx, dw, (db if bias is not None else None), dxi0, dgate


@torch.library.custom_op(
    "e2pa::normalized_fusion",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? xi0, Tensor? target, Tensor gate, "
        "float eps, float temperature, float prior_temperature, float beta, int steps, int ignore_index, "
        "bool use_triton) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
def _normalized_fusion_op(
    x, weight, bias, mask, xi0, target, gate, eps, temperature, prior_temperature, beta, steps, ignore_index, use_triton
):
    """fused [B, C, N], weights [B, M, N], trace [B, steps + 1, N], energies [B, M, N], ce [B, M, N] (or
    empty), p [B, M, N] (energy_fusion's weights, saved for dgate) and the head energies [B, M, N] the
    chunked-C Triton backward reads (empty otherwise, and without a mask, where they are the energies)."""
    params = FusionParams(temperature, prior_temperature, beta, steps, ignore_index)
    x = voxels_last(x, 3)
    xi0 = voxels_last(xi0, 2) if xi0 is not None else None
    fused, weights, trace, energies, ce, p, raw = normalized_fusion_fwd(
        x, weight, bias, mask, xi0, target, gate, eps, params, use_triton
    )
    if mask is None:  # the head energies are the energies output itself (outputs must not alias)
        raw = None
    return (
        fused,
        weights,
        trace,
        energies,
        ce if ce is not None else x.new_empty(_NO_TENSOR),
        p,
        raw if raw is not None else x.new_empty(_NO_TENSOR),
    )


@_normalized_fusion_op.register_fake
def _(x, weight, bias, mask, xi0, target, gate, eps, temperature, prior_temperature, beta, steps, ignore_index, use_t):
    B, M, C, N = x.shape
    return (
        x.new_empty((B, C, N)),
        x.new_empty((B, M, N)),
        x.new_empty((B, steps + 1, N)),
        x.new_empty((B, M, N)),
        x.new_empty((B, M, N) if target is not None else _NO_TENSOR),
        x.new_empty((B, M, N)),
        x.new_empty(
            (B, M, N)
            if _saves_energy(voxels_last(x, 3), weight.shape[0], xi0, steps, use_t) and mask is not None
            else _NO_TENSOR
        ),
    )


@torch.library.custom_op(
    "e2pa::normalized_fusion_backward",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? xi0, Tensor? target, Tensor gate, "
        "Tensor p, Tensor? energy, Tensor? d_fused, Tensor? d_weights, Tensor? d_trace, Tensor? d_energy, "
        "Tensor? d_ce, float eps, float temperature, float prior_temperature, float beta, int steps, "
        "int ignore_index, bool use_triton) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
)
def _normalized_fusion_backward_op(
    x,
    weight,
    bias,
    mask,
    xi0,
    target,
    gate,
    p,
    energy,
    d_fused,
    d_weights,
    d_trace,
    d_energy,
    d_ce,
    eps,
    temperature,
    prior_temperature,
    beta,
    steps,
    ignore_index,
    use_triton,
):
    """dx [B, M, C, N] (x's dtype), dw [K, C], db [K] (or empty), dxi0 [B, C, N] (or empty) and dgate (0-d),
    in the dtypes of their inputs."""
    params = FusionParams(temperature, prior_temperature, beta, steps, ignore_index)
    x = voxels_last(x, 3)
    xi0 = voxels_last(xi0, 2) if xi0 is not None else None
    dx, dw, db, dxi0, dgate = normalized_fusion_bwd(
        x,
        weight,
        bias,
        mask,
        xi0,
        target,
        gate,
        p,
        energy,
        eps,
        params,
        use_triton,
        (d_fused, d_weights, d_trace, d_energy, d_ce),
    )
    return (
        dx,
        dw.to(weight.dtype),
        db.to(bias.dtype) if bias is not None else x.new_empty(_NO_TENSOR),
        dxi0 if dxi0 is not None else x.new_empty(_NO_TENSOR),
        dgate.to(gate.dtype),
    )


@_normalized_fusion_backward_op.register_fake
def _(x, weight, bias, mask, xi0, target, gate, p, energy, d_fused, d_weights, d_trace, d_energy, d_ce, *scalars):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape) if bias is not None else x.new_empty(_NO_TENSOR),
        xi0.new_empty(xi0.shape) if xi0 is not None else x.new_empty(_NO_TENSOR),
        gate.new_empty(()),
    )


def _normalized_fusion_setup_context(ctx, inputs, output):
    x, weight, bias, mask, xi0, target, gate, *scalars, use_triton = inputs
    p = output[5]
    energy = None
    if _saves_energy(voxels_last(x, 3), weight.shape[0], xi0, scalars[4], use_triton):
        energy = output[6] if mask is not None else output[3]  # without a mask: the energies output itself
    ctx.mark_non_differentiable(output[5], output[6])
    ctx.save_for_backward(x, weight, bias, mask, xi0, target, gate, p, energy)
    ctx.scalars, ctx.use_triton = scalars, use_triton
    ctx.set_materialize_grads(False)


def _normalized_fusion_backward(ctx, d_fused, d_weights, d_trace, d_energy, d_ce, d_p, d_raw):
    x, weight, bias, mask, xi0, target, gate, p, energy = ctx.saved_tensors
    needs = ctx.needs_input_grad
    ups = (d_fused, d_weights, d_trace, d_energy, d_ce if target is not None else None)
    if all(g is None for g in ups) or not any(needs[:7]):
        return (None,) * 14
    dx, dw, db, dxi0, dgate = _normalized_fusion_backward_op(
        x, weight, bias, mask, xi0, target, gate, p, energy, *ups, *ctx.scalars, ctx.use_triton
    )
    return (
        dx if needs[0] else None,
        dw if needs[1] else None,
        db if bias is not None and needs[2] else None,
        None,
        dxi0 if xi0 is not None and needs[4] else None,
        None,
        dgate if needs[6] else None,
    ) + (None,) * 7


_normalized_fusion_op.register_autograd(_normalized_fusion_backward, setup_context=_normalized_fusion_setup_context)


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
    validate: bool = True,
) -> EnergyFusion:
    """One normalised EHF level (the section comment above; ``docs/method.md`` "Normalised fusion"): the
    RMS-normalised features through :func:`energy_fusion`, their weights mixed with the uniform share
    by the gate, the mix applied to the raw features. Differentiable in x, weight, bias, xi0 and gate;
    saves nothing x-sized beyond its inputs.

    Args:
        x: ``[B, M, C, *S]`` raw per-modality features (absent modalities may hold anything).
        weight, bias, modality_mask, target, temperature, prior_temperature, beta, steps, ignore_index,
            validate: as :func:`energy_fusion`.
        xi0: ``[B, C, *S]`` the initial state before normalisation (ψ of the previous level); None = the
            masked mean of the normalised features.
        gate: 0-d float tensor, g = sigmoid(γ) in [0, 1].
        eps: the RMS floor ε (> 0).

    Returns:
        :class:`EnergyFusion` ``(fused [B, C, *S], weights [B, M, *S] (the mixed shares w), trace,
        energies, ce)``, in x's dtype.
    """
    params = check_inputs(
        x, weight, bias, modality_mask, xi0, temperature, prior_temperature, beta, steps, target, ignore_index, validate
    )
    eps = check_finite_scalar(OP, "eps", eps, positive=True)
    check_tensor(OP, "gate", gate, max_ndim=0)
    check_same_device(OP, x=x, gate=gate)
    K, (B, M), spatial = weight.shape[0], x.shape[:2], x.shape[3:]
    limit = (
        f"{OP}: the Triton kernels take K <= {free_energy_op.TRITON_MAX_CLASSES} classes; got K = {K}"
        if K > free_energy_op.TRITON_MAX_CLASSES
        else f"{OP}: the Triton kernels take M <= {propagate_op.TRITON_MAX_MODALITIES} modalities; got M = {M}"
        if M > propagate_op.TRITON_MAX_MODALITIES
        else None
    )
    backend = select_backend(x, weight, bias, xi0, target, modality_mask, triton_limit=limit)
    if backend == "reference":
        return EnergyFusion(
            *reference.normalized_fusion(
                x,
                weight,
                bias,
                modality_mask,
                xi0,
                gate,
                eps=eps,
                temperature=params.temperature,
                prior_temperature=params.prior_temperature,
                beta=params.beta,
                steps=params.steps,
                target=target,
                ignore_index=ignore_index,
            )
        )
    with torch.autocast(device_type=x.device.type, enabled=False):
        outs = _normalized_fusion_op(
            voxels_last(x, 3),
            weight.contiguous(),
            bias.contiguous() if bias is not None else None,
            modality_mask.contiguous() if modality_mask is not None else None,
            voxels_last(xi0, 2) if xi0 is not None else None,
            voxels_last(target.long(), 1) if target is not None else None,
            gate,
            eps,
            params.temperature,
            params.prior_temperature,
            params.beta,
            params.steps,
            params.ignore_index,
            backend == "triton",
        )
    fused, weights, trace, energies = (o.view(o.shape[0], o.shape[1], *spatial) for o in outs[:4])
    ce = outs[4].view(B, M, *spatial) if target is not None else None
    return EnergyFusion(fused, weights, trace, energies, ce)


# --------------------------------------------------------------------------------------------------
# GPU compile variants (tests compile each for sm_80 / sm_90 and check spills and load widths)
# --------------------------------------------------------------------------------------------------
# Flags whose True value only adds code (an optional input's loads and math): a variant compiled with them set
# covers the launches that leave them False (_kernel_spec.heaviest). HAS_XI0 is not one of them -- it swaps
# the masked mean for a load (forward) and the mean's dx term for a dξ0 store (backward) -- so both are compiled.
COVERED_FLAGS = (
    "HAS_BIAS",
    "HAS_MASK",
    "HAS_TARGET",
    "HAS_DFUSED",
    "HAS_DWEIGHTS",
    "HAS_DTRACE",
    "HAS_DENERGIES",
    "HAS_DCE",
)
GUARDED_ARGS = {
    "HAS_BIAS": ("b_ptr",),
    "HAS_MASK": ("present_ptr",),
    "HAS_XI0": ("xi0_ptr", "dxi0_ptr", "stride_ib", "stride_ic"),
    "HAS_TARGET": ("target_ptr", "stride_tb"),
    "HAS_DFUSED": ("d_fused_ptr",),
    "HAS_DWEIGHTS": ("d_weights_ptr",),
    "HAS_DTRACE": ("d_trace_ptr",),
    "HAS_DENERGIES": ("d_energies_ptr",),
    "HAS_DCE": ("d_ce_ptr",),
}


def gpu_compile_specs() -> list[KernelSpec]:
    """Every variant of the one-pass kernels the launchers can pick, from their own ``_fwd_meta`` /
    ``_bwd_meta``: fp32 / fp16 / bf16 (the head is read as fp32, ``head_fp32``) × every (M, C, K) that
    ``fits_one_pass`` (BLOCK_M 2 / 4 / 8, BLOCK_C 16 … 64 at most 16 per modality row, BLOCK_M · BLOCK_C 64 /
    128 / 256 after padding; K <= ``FUSED_MAX_CLASSES``: BLOCK_K 16) × ξ0 given or the masked mean (HAS_XI0).
    The optional inputs and upstream gradients are compiled present: the launches without them run the same
    code less those loads (COVERED_FLAGS). Levels that do not fit run free_energy's and energy_propagate's
    kernels (their variants)."""
    if triton is None:
        return []
    specs = []
    for dtype, ty in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        seen = set()  # the tiles met so far (the flags do not enter _triton_config): each once
        for name in ("fwd", "bwd"):
            for M in range(1, propagate_op.TRITON_MAX_MODALITIES + 1):
                for C in range(1, FUSED_MAX_FEATURES + 1):
                    for K in range(1, FUSED_MAX_CLASSES + 2):  # K = FUSED_MAX_CLASSES + 1: all wider heads
                        if not fits_one_pass(M, C, K):
                            continue
                        tile = (name, *_triton_config(M, C, K, dtype, name, False).items())
                        if tile in seen:
                            continue
                        seen.add(tile)
                        for flags in itertools.product((False, True), repeat=4 if name == "fwd" else 9):
                            meta = _meta(name, M, C, K, dtype, flags)
                            if meta is not None:
                                specs.append(_spec(name, ty, meta))
    return heaviest(specs, COVERED_FLAGS)


def _meta(name: str, M: int, C: int, K: int, dtype: torch.dtype, flags: tuple[bool, ...]) -> dict | None:
    """The launcher's keyword arguments for one combination of optional inputs (None where it cannot occur:
    a d_ce without a target)."""
    bias, masked, xi0, target, *grads = flags
    common = dict(bias=bias, masked=masked, xi0=xi0, target=target, interpret=False)
    if name == "fwd":
        return _fwd_meta(M, C, K, dtype, **common)
    d_fused, d_weights, d_trace, d_energies, d_ce = grads
    if d_ce and not target:
        return None
    return _bwd_meta(
        M,
        C,
        K,
        dtype,
        d_fused=d_fused,
        d_weights=d_weights,
        d_trace=d_trace,
        d_energies=d_energies,
        d_ce=d_ce,
        **common,
    )


def _spec(name: str, ty: str, meta: dict) -> KernelSpec:
    kernel = _energy_fusion_fwd_kernel if name == "fwd" else _energy_fusion_bwd_kernel
    constexprs, warps, maxnreg = split_meta(meta)
    sig, aligned = _signature_of(name, ty)
    return KernelSpec(
        label=spec_label(OP, name, ty, constexprs, COVERED_FLAGS, warps=warps, maxnreg=maxnreg),
        kernel=kernel,
        signature=sig,
        constexprs=constexprs,
        num_warps=warps,
        maxnreg=maxnreg,
        aligned=aligned,
    )


@functools.cache
def _signature_of(name: str, ty: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """(argument types, the arguments assumed 16-aligned) of the ``name`` kernel for ``ty`` features."""
    sig = _signature(_energy_fusion_fwd_kernel if name == "fwd" else _energy_fusion_bwd_kernel, ty)
    return sig, tuple(a for a in sig if a.endswith("_ptr") or a == "N" or a.startswith("stride_"))


def _signature(kernel, ty: str) -> dict[str, str]:
    base = {
        "N": "i32",
        "C": "i32",
        "K": "i32",
        "M": "i32",
        "steps": "i32",
        "tiles_n": "i32",
        "tiles": "i32",
        "temperature": "fp32",
        "prior_temperature": "fp32",
        "beta": "fp32",
        "ignore_index": "i32",
        "w_ptr": "*fp32",
        "b_ptr": "*fp32",
        "present_ptr": "*u1",  # a bool tensor, as the JIT types it
        "target_ptr": "*i64",
        "dw_partial_ptr": "*fp32",
        "db_partial_ptr": "*fp32",
    }
    for a in kernel.arg_names:
        if a.startswith("stride_"):
            base[a] = "i32"
        elif a.endswith("_ptr") and a not in base:
            base[a] = f"*{ty}"
    return {a: base.get(a, "constexpr") for a in kernel.arg_names}
