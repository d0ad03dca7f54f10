"""Op 2 — ``energy_propagate``: per-voxel modern-Hopfield descent of the fused state over the modalities.

Math (``docs/method.md``), per voxel, with the modality features as columns ``X = [x_1 … x_M] ∈ R^{C×M}``,
the log-prior ``a ∈ R^M`` (-inf = absent) and ``β > 0``::

    E(ξ)  = -(1/β) · lse_m(β·⟨x_m, ξ⟩ + a_m) + ½‖ξ‖²
    step:   p = softmax_m(β·⟨x_m, ξ⟩ + a_m),   ξ ← X p               (``steps`` = T times)

After the first step ξ is a convex mix of the x_m, so everything after it lives in the M-space of the
per-voxel Gram matrix ``G = XᵀX`` (M×M). With ``s0 = Xᵀξ0`` and ``n0 = ‖ξ0‖²``::

    z_1 = β·s0 + a                      E_0 = -(1/β)·lse(z_1) + ½·n0
    for t = 1 … T:
        p_t = softmax(z_t),  u_t = G p_t,  z_{t+1} = β·u_t + a
                                        E_t = -(1/β)·lse(z_{t+1}) + ½·p_tᵀu_t
    ξ_T = X p_T,  weights = p_T,  energies = (E_0 … E_T)

So the forward reads x and ξ0 once to form G, s0, n0 (pass 1), runs all T updates in registers, and
reads x once more to write ξ_T (pass 2). Nothing of size N·T is ever stored or saved.

VJP (reverse mode through the M-space recurrence; upstream dξ_T, dw = d weights, dE_t). With
``q = Xᵀ dξ_T`` and σ(z) = softmax(z) (note σ(z_{t+1}) = p_{t+1})::

    g ← 0  (the gradient of z_{t+1}),  dS ← 0 (M×M),  da ← 0
    for t = T … 1:
        g   += -(dE_t/β) · σ(z_{t+1});           da += g
        du   = β·g + ½·dE_t·p_t                                   (u_t feeds z_{t+1} and ½ p_tᵀu_t)
        dp_t = [t = T](dw + q) + ½·dE_t·u_t + G du                 (G symmetric)
        dS  += du p_tᵀ + p_t duᵀ                                   (dS = dG + dGᵀ)
        g    = p_t ⊙ (dp_t − ⟨p_t, dp_t⟩)                          (softmax backward: now d z_t)
    g += -(dE_0/β) · p_1;  da += g;  ds0 = β·g;  dn0 = ½·dE_0
    dx_m = p_{T,m}·dξ_T + Σ_j dS_mj·x_j + ds0_m·ξ0                (from ξ_T = Xp_T, G = XᵀX, s0 = Xᵀξ0)
    dξ0  = Σ_m ds0_m·x_m + dE_0·ξ0                                 (2·dn0 = dE_0: n0 = ξ0ᵀξ0)
    da   = the log_prior gradient

The backward saves only the inputs: pass A recomputes G, s0, n0 and q; the p_t are recomputed from
p_1 (O(T²) tiny M-space steps, no storage); pass B writes dx and dξ0. Memory traffic per voxel and
channel: forward 2 reads of x + 1 of ξ0 + 1 write of ξ; backward 2 reads of x, ξ0 and dξ + writes of
dx and dξ0 (plus O(M + T) per voxel for the prior, weights and energies).

Absent modalities (a_m = -inf) get p_m = 0 exactly and therefore no gradient; a voxel whose priors
are all -inf runs with a = 0 internally and its outputs are then overwritten: ξ = 0, weights 0,
energies +inf, and every gradient 0 (selected with ``where``, never multiplied, so never NaN).

Three implementations behind one entry point (:func:`energy_propagate`):
- Triton: one program per (voxel block, sample); G [BLOCK_M, BLOCK_M, BLOCK_N] stays in registers.
- torch (memory-lean): the same G-based math and hand-written backward in PyTorch, in voxel chunks (the
  p_t of one chunk are kept during its backward; the chunk size bounds them); saves only its inputs.
  Float64 inputs accumulate in float64, everything else in float32.
- reference: the literal loop with plain autograd (:func:`e2pa_kernels.reference.energy_propagate`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from . import reference
from ._kernel_spec import KernelSpec, heaviest, spec_label, split_meta
from ._runtime import select_backend, small_interpreter_blocks
from ._triton_utils import cdiv, device_guard, next_pow2
from ._validate import (
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
except ImportError:  # pragma: no cover - Triton is Linux-only; the torch path runs elsewhere
    triton = None

OP = "energy_propagate"
TRITON_MAX_MODALITIES = 8  # G [BLOCK_M, BLOCK_M, BLOCK_N] lives in registers
MAX_STEPS = 8  # the backward recomputes p_t from p_1: O(steps²) M-space steps per voxel


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gram_pass(
        x_base,
        xi_base,
        dxi_base,
        C,
        N,
        offs_m,
        mask_m,
        offs_n,
        mask_n,
        stride_xm,
        stride_xc,
        stride_ic,
        WITH_Q: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One pass over the channels: G = XᵀX [BM, BM, BN], s0 = Xᵀξ0 [BM, BN], n0 = ‖ξ0‖² [BN] and,
        with WITH_Q, q = Xᵀdξ [BM, BN] (dξ is a contiguous [C, N] slab: channel stride N).

        Channel by channel (BLOCK_C of them unrolled per iteration): x_c [BM, BN] is loaded along voxels
        and G += x_c x_cᵀ is an element-wise update, so no [BM, BM, BLOCK_C, BN] product is ever live.
        s0 and q go through the same [BM, 1, BN] expansion of x_c as G, so that they come out in G's
        register layout (all modalities of a voxel in one thread): the M-space recurrence then runs
        without a single layout conversion. (A plain ``tl.sum(x * xi[None, :], axis=0)`` leaves them in
        the load layout, vectorised along voxels with the modalities spread over warps, and every step
        would shuffle p through shared memory.)"""
        G = tl.zeros((BLOCK_M, BLOCK_M, BLOCK_N), dtype=tl.float32)
        s0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        q = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        x_rows = x_base + offs_m[:, None] * stride_xm + offs_n[None, :]
        mask_x = mask_m[:, None] & mask_n[None, :]
        for c0 in range(0, C, BLOCK_C):
            for i in tl.static_range(BLOCK_C):
                c = c0 + i
                if INT64:
                    c = c.to(tl.int64)
                ok = (offs_n * 0 + c) < C  # a [BN] tensor: the interpreter cannot mask with a scalar
                x = tl.load(x_rows + c * stride_xc, mask=mask_x & ok[None, :], other=0.0).to(tl.float32)
                xi = tl.load(xi_base + c * stride_ic + offs_n, mask=mask_n & ok, other=0.0).to(tl.float32)
                G += x[:, None, :] * x[None, :, :]
                s0 += tl.sum(x[:, None, :] * xi[None, None, :], axis=1)
                n0 += xi * xi
                if WITH_Q:
                    dxi = tl.load(dxi_base + c * N + offs_n, mask=mask_n & ok, other=0.0).to(tl.float32)
                    q += tl.sum(x[:, None, :] * dxi[None, None, :], axis=1)
        return G, s0, n0, q

    @triton.jit
    def load_feature_tile(x_base, offs_m, mask_m, offs_c, C, offs_n, mask_n, stride_xm, stride_xc):
        """(jit building block) The whole [BM, BC, BN] feature tile of a voxel block, fp32 (masked
        modalities, channels and voxels 0): read once, kept in registers (the one-pass kernels)."""
        return tl.load(
            x_base + offs_m[:, None, None] * stride_xm + offs_c[None, :, None] * stride_xc + offs_n[None, None, :],
            mask=mask_m[:, None, None] & (offs_c < C)[None, :, None] & mask_n[None, None, :],
            other=0.0,
        ).to(tl.float32)

    @triton.jit
    def gram_tile(X, xi0):
        """(jit building block) From a resident tile X [BM, BC, BN] and ξ0 [BC, BN] (fp32):
        G = XᵀX [BM, BM, BN], s0 = Xᵀξ0 [BM, BN], n0 = ‖ξ0‖² [BN]."""
        G = tl.sum(tl.expand_dims(X, 1) * tl.expand_dims(X, 0), axis=2)
        s0 = tl.sum(X * tl.expand_dims(xi0, 0), axis=1)
        n0 = tl.sum(xi0 * xi0, axis=0)
        return G, s0, n0

    @triton.jit
    def lse_softmax(z):
        """(jit building block, shared with energy_fusion's kernels) logsumexp and softmax over axis 0 of
        z [BM, BN]; every column has a finite entry."""
        z_max = tl.max(z, axis=0)
        e = tl.exp(z - z_max[None, :])
        total = tl.sum(e, axis=0)
        return z_max + tl.log(total), e / total[None, :]

    @triton.jit
    def p_at(G, p1, a, beta, t):
        """(jit building block) p_t, recomputed from p_1 by t - 1 updates (the backward stores no history)."""
        p = p1
        for _ in range(1, t):
            _, p = lse_softmax(beta * tl.sum(G * p[None, :, :], axis=1) + a)
        return p

    @triton.jit
    def reverse_step(G, a, p, g, d_a, dS, dp, d_e, beta):
        """(jit building block) One step t of the reverse sweep (module docstring). In: p = p_t, g = the
        gradient of z_{t+1} so far, dp = what reaches p_t from outside (dw + q at t = T, else 0), d_e = dE_t.
        Out: g = the gradient of z_t, and the running d_a and dS = dG + dGᵀ."""
        u = tl.sum(G * p[None, :, :], axis=1)
        _, sig = lse_softmax(beta * u + a)
        g = g - (d_e / beta)[None, :] * sig
        d_a += g
        du = beta * g + (0.5 * d_e)[None, :] * p
        dp = dp + (0.5 * d_e)[None, :] * u + tl.sum(G * du[None, :, :], axis=1)
        dS += du[:, None, :] * p[None, :, :] + p[:, None, :] * du[None, :, :]
        g = p * (dp - tl.sum(p * dp, axis=0)[None, :])
        return g, d_a, dS

    @triton.jit
    def _load_rows(ptr, row_stride, M, offs_m, offs_n, mask_n, other, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Rows 0 … M-1 of a [M, N] slab (unit stride along N) as a [BLOCK_M, BLOCK_N] fp32 tile, padded
        rows = ``other``. Row by row, so that the M-space tiles keep every modality of a voxel in one
        thread (a 2-D load would be vectorised along voxels and spread the modalities over warps)."""
        out = tl.full((BLOCK_M, BLOCK_N), other, dtype=tl.float32)
        row_ptr = ptr + offs_n
        for m in tl.static_range(BLOCK_M):
            row = tl.load(row_ptr, mask=mask_n & ((offs_n * 0 + m) < M), other=other).to(tl.float32)
            out = tl.where(offs_m[:, None] == m, row[None, :], out)
            row_ptr += row_stride
        return out

    @triton.jit
    def _store_rows(ptr, row_stride, M, offs_m, offs_n, mask_n, value, BLOCK_M: tl.constexpr):
        """Store rows 0 … M-1 of a [BLOCK_M, BLOCK_N] tile into a [M, N] slab, row by row (see _load_rows)."""
        row_ptr = ptr + offs_n
        for m in tl.static_range(BLOCK_M):
            row = tl.sum(tl.where(offs_m[:, None] == m, value, 0.0), axis=0)
            tl.store(row_ptr, row.to(ptr.dtype.element_ty), mask=mask_n & ((offs_n * 0 + m) < M))
            row_ptr += row_stride

    @triton.jit
    def _load_prior(
        a_ptr,
        stride_am,
        M,
        offs_m,
        offs_n,
        mask_n,
        HAS_PRIOR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """The log-prior [BM, BN] in fp32 with padded modalities -inf and all-absent voxels set to 0 on
        the real modalities (so the M-space math stays finite); returns (a, absent [BN])."""
        if HAS_PRIOR:
            a = _load_rows(a_ptr, stride_am, M, offs_m, offs_n, mask_n, float("-inf"), BLOCK_M, BLOCK_N)
        else:
            a = tl.where(offs_m[:, None] < M, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), float("-inf"))
        absent = tl.max(a, axis=0) == float("-inf")
        a = tl.where(absent[None, :] & (offs_m[:, None] < M), 0.0, a)
        return a, absent

    @triton.jit
    def _present_modalities(present_row, M, offs_m, HAS_MASK: tl.constexpr):
        """[BM] mask of the modalities to read: the real ones, and with HAS_MASK only those whose
        present[b, m] is set (an absent modality reads as zeros: its NaN cannot reach G; a = -inf
        already gives it weight 0)."""
        mask_m = offs_m < M
        if HAS_MASK:
            mask_m = mask_m & (tl.load(present_row + offs_m, mask=mask_m, other=0).to(tl.int32) != 0)
        return mask_m

    @triton.jit
    def _energy_propagate_fwd_kernel(
        x_ptr,
        xi0_ptr,
        a_ptr,
        present_ptr,
        xi_ptr,
        w_ptr,
        e_ptr,
        N,
        C,
        M,
        steps,
        stride_xb,
        stride_xm,
        stride_xc,
        stride_ib,
        stride_ic,
        stride_ab,
        stride_am,
        beta,
        HAS_PRIOR: tl.constexpr,
        HAS_MASK: tl.constexpr,
        INT64: tl.constexpr,
        ONE_PASS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Grid (cdiv(N, BLOCK_N), B). x [B, M, C, N], xi0 [B, C, N], a [B, M, N] (unit stride along N)
        → xi [B, C, N], w [B, M, N], e [B, steps + 1, N] (contiguous). With HAS_MASK, present [B, M]
        bool (contiguous): absent modalities are read as zeros. ONE_PASS (BLOCK_C >= C): the whole
        [BM, BC, BN] tile of x is read once and kept for ξ_T (else pass 2 reads x again)."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        if INT64:
            pid_n = pid_n.to(tl.int64)
            b = b.to(tl.int64)
            offs_m = offs_m.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_m = _present_modalities(present_ptr + b * M, M, offs_m, HAS_MASK)
        x_base = x_ptr + b * stride_xb
        # pass 1: G, s0, n0
        if ONE_PASS:
            offs_c = tl.arange(0, BLOCK_C)
            X = load_feature_tile(x_base, offs_m, mask_m, offs_c, C, offs_n, mask_n, stride_xm, stride_xc)
            xi0 = tl.load(
                xi0_ptr + b * stride_ib + offs_c[:, None] * stride_ic + offs_n[None, :],
                mask=(offs_c < C)[:, None] & mask_n[None, :],
                other=0.0,
            ).to(tl.float32)
            G, s0, n0 = gram_tile(X, xi0)
        else:
            G, s0, n0, _ = _gram_pass(
                x_base,
                xi0_ptr + b * stride_ib,
                xi0_ptr,
                C,
                N,
                offs_m,
                mask_m,
                offs_n,
                mask_n,
                stride_xm,
                stride_xc,
                stride_ic,
                False,
                INT64,
                BLOCK_M,
                BLOCK_C,
                BLOCK_N,
            )
        a, absent = _load_prior(
            a_ptr + b * stride_ab, stride_am, M, offs_m, offs_n, mask_n, HAS_PRIOR, BLOCK_M, BLOCK_N
        )
        # the M-space recurrence, in registers
        # (G v)_i = Σ_j G_ij v_j per voxel is written tl.sum(G * v[None, :, :], axis=1) throughout.
        e_t = e_ptr + b * (steps + 1) * N + offs_n  # row t of the energies; advanced by N per step
        lse, p = lse_softmax(beta * s0 + a)
        energy = -lse / beta + 0.5 * n0
        tl.store(e_t, tl.where(absent, float("inf"), energy).to(e_ptr.dtype.element_ty), mask=mask_n)
        for _ in range(1, steps):
            u = tl.sum(G * p[None, :, :], axis=1)
            lse, p_next = lse_softmax(beta * u + a)
            energy = -lse / beta + 0.5 * tl.sum(p * u, axis=0)
            e_t += N
            tl.store(e_t, tl.where(absent, float("inf"), energy).to(e_ptr.dtype.element_ty), mask=mask_n)
            p = p_next
        u = tl.sum(G * p[None, :, :], axis=1)  # the last step: E_T needs lse(β G p_T + a); p_T stays the output
        lse, _ = lse_softmax(beta * u + a)
        energy = -lse / beta + 0.5 * tl.sum(p * u, axis=0)
        e_t += N
        tl.store(e_t, tl.where(absent, float("inf"), energy).to(e_ptr.dtype.element_ty), mask=mask_n)
        p = tl.where(absent[None, :], 0.0, p)
        _store_rows(w_ptr + b * M * N, N, M, offs_m, offs_n, mask_n, p, BLOCK_M)
        # pass 2: ξ_T = X p_T
        if ONE_PASS:
            tl.store(
                xi_ptr + b * C * N + offs_c[:, None] * N + offs_n[None, :],
                tl.sum(tl.expand_dims(p, 1) * X, axis=0).to(xi_ptr.dtype.element_ty),
                mask=(offs_c < C)[:, None] & mask_n[None, :],
            )
        else:
            x_rows = x_base + offs_m[:, None] * stride_xm + offs_n[None, :]
            mask_x = mask_m[:, None] & mask_n[None, :]
            xi_base = xi_ptr + b * C * N + offs_n
            for c0 in range(0, C, BLOCK_C):
                for i in tl.static_range(BLOCK_C):
                    c = c0 + i
                    if INT64:
                        c = c.to(tl.int64)
                    ok = (offs_n * 0 + c) < C  # a [BN] tensor: the interpreter cannot mask with a scalar
                    x = tl.load(x_rows + c * stride_xc, mask=mask_x & ok[None, :], other=0.0).to(tl.float32)
                    tl.store(xi_base + c * N, tl.sum(p * x, axis=0).to(xi_ptr.dtype.element_ty), mask=mask_n & ok)

    @triton.jit
    def _energy_propagate_bwd_kernel(
        x_ptr,
        xi0_ptr,
        a_ptr,
        present_ptr,
        dxi_ptr,
        dw_ptr,
        de_ptr,
        dx_ptr,
        dxi0_ptr,
        da_ptr,
        N,
        C,
        M,
        steps,
        stride_xb,
        stride_xm,
        stride_xc,
        stride_ib,
        stride_ic,
        stride_ab,
        stride_am,
        beta,
        HAS_PRIOR: tl.constexpr,
        HAS_DXI: tl.constexpr,
        HAS_MASK: tl.constexpr,
        INT64: tl.constexpr,
        ONE_PASS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Grid (cdiv(N, BLOCK_N), B). Inputs as in the forward; dxi [B, C, N], dw [B, M, N] and
        de [B, steps + 1, N] contiguous upstream gradients → dx [B, M, C, N], dxi0 [B, C, N] and
        (HAS_PRIOR) da [B, M, N], contiguous. The VJP formulas are in the module docstring. ONE_PASS
        (BLOCK_C >= C): x, ξ0 and dξ are read once and kept for pass B (else pass B reads them again)."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        if INT64:
            pid_n = pid_n.to(tl.int64)
            b = b.to(tl.int64)
            offs_m = offs_m.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_m = offs_m < M
        load_m = _present_modalities(present_ptr + b * M, M, offs_m, HAS_MASK)
        x_base = x_ptr + b * stride_xb
        xi0_base = xi0_ptr + b * stride_ib
        dxi_base = dxi_ptr + b * C * N
        # pass A: G, s0, n0 and q = Xᵀdξ
        if ONE_PASS:
            offs_c = tl.arange(0, BLOCK_C)
            mask_cn = (offs_c < C)[:, None] & mask_n[None, :]
            X = load_feature_tile(x_base, offs_m, load_m, offs_c, C, offs_n, mask_n, stride_xm, stride_xc)
            xi0 = tl.load(xi0_base + offs_c[:, None] * stride_ic + offs_n[None, :], mask=mask_cn, other=0.0).to(
                tl.float32
            )
            G, s0, n0 = gram_tile(X, xi0)
            q = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if HAS_DXI:
                d_xi = tl.load(dxi_base + offs_c[:, None] * N + offs_n[None, :], mask=mask_cn, other=0.0).to(tl.float32)
                q = tl.sum(X * tl.expand_dims(d_xi, 0), axis=1)
        else:
            G, s0, n0, q = _gram_pass(
                x_base,
                xi0_base,
                dxi_base,
                C,
                N,
                offs_m,
                load_m,
                offs_n,
                mask_n,
                stride_xm,
                stride_xc,
                stride_ic,
                HAS_DXI,
                INT64,
                BLOCK_M,
                BLOCK_C,
                BLOCK_N,
            )
        a, absent = _load_prior(
            a_ptr + b * stride_ab, stride_am, M, offs_m, offs_n, mask_n, HAS_PRIOR, BLOCK_M, BLOCK_N
        )
        dw = _load_rows(dw_ptr + b * M * N, N, M, offs_m, offs_n, mask_n, 0.0, BLOCK_M, BLOCK_N)
        de_row = de_ptr + b * (steps + 1) * N + offs_n
        # reverse mode through the M-space recurrence; p_t recomputed from p_1 (nothing stored).
        # t = T is peeled: only it receives dw + q, and those need not stay live through the loop.
        _, p1 = lse_softmax(beta * s0 + a)
        de_t = de_row + tl.cast(steps, tl.int64 if INT64 else tl.int32) * N
        d_e = tl.load(de_t, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        g, d_a, dS = reverse_step(
            G,
            a,
            p_at(G, p1, a, beta, steps),
            zero,
            zero,
            tl.zeros((BLOCK_M, BLOCK_M, BLOCK_N), dtype=tl.float32),
            dw + q,
            d_e,
            beta,
        )
        for k in range(1, steps):
            de_t -= N
            d_e = tl.load(de_t, mask=mask_n, other=0.0).to(tl.float32)
            g, d_a, dS = reverse_step(G, a, p_at(G, p1, a, beta, steps - k), g, d_a, dS, zero, d_e, beta)
        p_last = p_at(G, p1, a, beta, steps)
        d_e0 = tl.load(de_row, mask=mask_n, other=0.0).to(tl.float32)
        g = g - (d_e0 / beta)[None, :] * p1
        d_a += g
        # all-absent voxels: every gradient is exactly 0 (selected, so never NaN)
        keep = ~absent
        ds0 = tl.where(keep[None, :], beta * g, 0.0)
        p_last = tl.where(keep[None, :], p_last, 0.0)
        dS = tl.where(keep[None, None, :], dS, 0.0)
        c0_xi = tl.where(keep, d_e0, 0.0)
        if HAS_PRIOR:
            _store_rows(da_ptr + b * M * N, N, M, offs_m, offs_n, mask_n, tl.where(keep[None, :], d_a, 0.0), BLOCK_M)
        # pass B: dx_m = p_T,m dξ + Σ_j dS_mj x_j + ds0_m ξ0,  dξ0 = Σ_m ds0_m x_m + dE_0 ξ0
        if ONE_PASS:
            dx = tl.sum(tl.expand_dims(dS, 2) * tl.expand_dims(X, 0), axis=1) + tl.expand_dims(ds0, 1) * tl.expand_dims(
                xi0, 0
            )
            if HAS_DXI:
                dx += tl.expand_dims(p_last, 1) * tl.expand_dims(d_xi, 0)
            tl.store(
                dx_ptr
                + b * M * C * N
                + offs_m[:, None, None] * (C * N)
                + offs_c[None, :, None] * N
                + offs_n[None, None, :],
                dx.to(dx_ptr.dtype.element_ty),
                mask=mask_m[:, None, None] & mask_cn[None, :, :],
            )  # absent modalities' rows: zeros
            tl.store(
                dxi0_ptr + b * C * N + offs_c[:, None] * N + offs_n[None, :],
                (tl.sum(tl.expand_dims(ds0, 1) * X, axis=0) + c0_xi[None, :] * xi0).to(dxi0_ptr.dtype.element_ty),
                mask=mask_cn,
            )
        else:
            x_rows = x_base + offs_m[:, None] * stride_xm + offs_n[None, :]
            load_x = load_m[:, None] & mask_n[None, :]
            mask_x = mask_m[:, None] & mask_n[None, :]  # absent modalities' dx rows are written (zeros)
            dx_rows = dx_ptr + b * M * C * N + offs_m[:, None] * C * N + offs_n[None, :]
            dxi0_base = dxi0_ptr + b * C * N + offs_n
            for c0 in range(0, C, BLOCK_C):
                for i in tl.static_range(BLOCK_C):
                    c = c0 + i
                    if INT64:
                        c = c.to(tl.int64)
                    ok = (offs_n * 0 + c) < C  # a [BN] tensor: the interpreter cannot mask with a scalar
                    x = tl.load(x_rows + c * stride_xc, mask=load_x & ok[None, :], other=0.0).to(tl.float32)
                    xi = tl.load(xi0_base + c * stride_ic + offs_n, mask=mask_n & ok, other=0.0).to(tl.float32)
                    dx = tl.sum(dS * x[None, :, :], axis=1) + ds0 * xi[None, :]
                    if HAS_DXI:
                        dxi = tl.load(dxi_base + c * N + offs_n, mask=mask_n & ok, other=0.0).to(tl.float32)
                        dx += p_last * dxi[None, :]
                    tl.store(dx_rows + c * N, dx.to(dx_ptr.dtype.element_ty), mask=mask_x & ok[None, :])
                    dxi0 = tl.sum(ds0 * x, axis=0) + c0_xi * xi
                    tl.store(dxi0_base + c * N, dxi0.to(dxi0_ptr.dtype.element_ty), mask=mask_n & ok)


# (BLOCK_N, BLOCK_C, num_warps) by (kernel, low-precision I/O, BLOCK_M). The x tile [BLOCK_M, BLOCK_N] is
# BLOCK_M·BLOCK_N / (32·num_warps) elements per thread: 4 (fp32) or 8 (fp16/bf16) make its loads 16 bytes
# wide; G costs ~BLOCK_M²·BLOCK_N / (32·num_warps) registers. Picked from a sweep (BLOCK_N at 1× and 2× that
# minimum, BLOCK_C 2/4, 2/4/8 warps), then every variant the launchers can pick (INT64, HAS_PRIOR,
# HAS_DXI; fp16 and bf16 for the low-precision rows) was compiled for sm_80 and sm_90: these are the
# configs with no spill in any of them. ptxas sometimes spills a few bytes to reach an occupancy step
# (e.g. 168, 128 or 72 registers at 4 warps) even far below 255 registers, so a neighbouring config is
# not necessarily safe. `python -m e2pa_kernels._compile` prints the registers of the registered ones.
# Triton 3.6 (ptxas 12.8 for sm_80 and sm_90) spilled 4-16 bytes at ("fwd", True, 2) = (512, 4, 4) and
# ("bwd", False, 1) = (512, 2, 4); the same work per thread on 8 warps (1024 voxels) spills at neither 3.6 nor 3.9.
_GPU_CONFIGS = {
    ("fwd", False, 1): (512, 4, 4),
    ("fwd", False, 2): (256, 4, 4),
    ("fwd", False, 4): (256, 4, 8),
    ("fwd", False, 8): (64, 4, 4),
    ("fwd", True, 1): (1024, 4, 4),
    ("fwd", True, 2): (1024, 4, 8),
    ("fwd", True, 4): (256, 4, 4),
    ("fwd", True, 8): (128, 4, 4),
    ("bwd", False, 1): (1024, 2, 8),
    ("bwd", False, 2): (256, 4, 4),
    ("bwd", False, 4): (256, 4, 8),
    ("bwd", False, 8): (128, 4, 8),
    ("bwd", True, 1): (1024, 2, 4),
    ("bwd", True, 2): (1024, 4, 8),
    ("bwd", True, 4): (512, 4, 8),
    ("bwd", True, 8): (128, 4, 4),
}


def _block_m(M: int) -> int:
    return next_pow2(M)


# HAS_MASK variants (energy_fusion) that spill with the unmasked config: bf16 fwd at M = 1 spilled 8 bytes
# on sm_90 at (1024, 4, 4).
_MASKED_GPU_CONFIGS = {("fwd", True, 1): (1024, 2, 4)}


# The one-pass kernels (ONE_PASS: the whole [BLOCK_M, BLOCK_C] feature tile of BLOCK_N voxels in registers,
# read once) where BLOCK_M · BLOCK_C <= ONE_PASS_MAX_FEATURES: (BLOCK_N, num_warps, maxnreg) by (kernel,
# BLOCK_M · BLOCK_C), the same tiles as energy_fusion's one-pass kernels (which do this and the head); compiled
# spill-free for sm_80 and sm_90 with Triton 3.6 and 3.9 (the registered variants).
# maxnreg (the backward): ptxas 12.8 (Triton 3.6) squeezed the fp32 backward into 128 registers (two 8-warp
# programs per SM) and spilled 8-36 bytes doing it (64: sm_80 and sm_90, 128 and 256: sm_90); 3.9 takes
# 200-208 (one program per SM). A smaller voxel tile would fit 128 but multiplies the M-space recurrence,
# which every thread of a voxel's column computes. Capped at 255, 3.6 takes 151-166 (fp32) and 214-233
# (fp16/bf16), spill-free; 3.9 builds the same registers as without the cap (200-208 fp32, 219-240 fp16/bf16).
ONE_PASS_MAX_FEATURES = 256
# Smaller feature tiles are padded (channels, masked: they move no bytes) to the smallest class, 64 features:
# the class's tile per thread and register budget, and one compiled variant per (BLOCK_M, class) instead of
# one per power of two of C (C = 1 … 8 at BLOCK_M = 8, C = 1 … 64 at BLOCK_M = 1). The padded channels cost
# Gram-tile FMAs only (at most 64 per voxel and modality pair).
ONE_PASS_MIN_FEATURES = 64
_ONE_PASS_GPU_CONFIGS = {
    ("fwd", 64): (64, 8, None),
    ("fwd", 128): (32, 8, None),
    ("fwd", 256): (16, 8, None),
    ("bwd", 64): (32, 8, 255),
    ("bwd", 128): (16, 8, 255),
    ("bwd", 256): (8, 8, 255),
}
# The forward's register cap by BLOCK_M. The assemblers squeezed some tiles to an occupancy step and spilled:
# Triton 3.9 (sm_90) fp16/bf16 1 × 64 and fp32 2 × 64 into 80 registers (4 bytes), Triton 3.6 (sm_90)
# fp16/bf16 8 × 16 into 128 (12 bytes). Capped at 255: 101 / 106 and 139-154 registers, spill-free at both
# versions. The cap goes with all tiles of BLOCK_M 1, 2 and 8; BLOCK_M = 4 (the four MRI contrasts) compiles
# spill-free without it at 92-128 registers (two 8-warp programs per SM), so it stays uncapped.
_ONE_PASS_FWD_MAXNREG = {1: 255, 2: 255, 8: 255}
# The two-pass kernels' register cap with 64-bit offsets where Triton 3.6 (sm_80) spilled: fp32 forward at
# BLOCK_M = 4 (64 registers, 16 bytes; capped: 88 at 3.6 and 3.9) and the fp16/bf16 backward at BLOCK_M = 1
# (bf16: 128 registers, 4 bytes; capped: 163 / 135 at 3.6, 168 / 150 at 3.9 on sm_80 / sm_90).
_INT64_MAXNREG = {("fwd", False, 4): 255, ("bwd", True, 1): 255}


def _triton_config(
    M: int,
    dtype: torch.dtype,
    kernel: str,
    interpret: bool | None = None,
    masked: bool = False,
    C: int | None = None,
    int64: bool = False,
) -> dict:
    """Block sizes for ``kernel`` ("fwd"/"bwd"): G [BLOCK_M, BLOCK_M, BLOCK_N] lives in registers and
    x is read as [BLOCK_M, BLOCK_N] tiles, one channel each, BLOCK_C of them unrolled per loop iteration;
    or, where the C channels fit (ONE_PASS; not with 64-bit offsets), as one resident tile (padded to at least
    ONE_PASS_MIN_FEATURES). The interpreter gets small blocks so that test sizes span several voxel and channel
    blocks (loops and tail masks run); its one-pass limit is 16 features, so the tests run both paths."""
    block_m = _block_m(M)
    interp = small_interpreter_blocks() if interpret is None else interpret
    block_c1 = next_pow2(C) if C is not None else None
    limit = 16 if interp else ONE_PASS_MAX_FEATURES
    one_pass = block_c1 is not None and not int64 and block_m * block_c1 <= limit
    if interp:
        return dict(BLOCK_M=block_m, BLOCK_N=16, BLOCK_C=block_c1 if one_pass else 2, num_warps=1, ONE_PASS=one_pass)
    if one_pass:
        block_c = max(block_c1, ONE_PASS_MIN_FEATURES // block_m)
        block_n, warps, maxnreg = _ONE_PASS_GPU_CONFIGS[(kernel, block_m * block_c)]
        if kernel == "fwd":
            maxnreg = _ONE_PASS_FWD_MAXNREG.get(block_m)
        cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps, ONE_PASS=True)
        return cfg if maxnreg is None else dict(cfg, maxnreg=maxnreg)
    key = (kernel, dtype != torch.float32, block_m)
    block_n, block_c, warps = (_MASKED_GPU_CONFIGS.get(key) if masked else None) or _GPU_CONFIGS[key]
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps, ONE_PASS=False)
    maxnreg = _INT64_MAXNREG.get(key) if int64 else None
    return cfg if maxnreg is None else dict(cfg, maxnreg=maxnreg)


def _fwd_meta(
    M: int, C: int, dtype: torch.dtype, *, prior: bool, masked: bool, int64: bool, interpret: bool | None = None
) -> dict:
    """The forward kernel's keyword arguments (constexprs, num_warps) for these inputs: what the launcher
    passes, and what ``gpu_compile_specs`` compiles."""
    cfg = _triton_config(M, dtype, "fwd", interpret, masked=masked, C=C, int64=int64)
    return dict(HAS_PRIOR=prior, HAS_MASK=masked, INT64=int64, **cfg)


def _bwd_meta(
    M: int,
    C: int,
    dtype: torch.dtype,
    *,
    prior: bool,
    dxi: bool,
    masked: bool,
    int64: bool,
    interpret: bool | None = None,
) -> dict:
    """The backward kernel's keyword arguments (constexprs, num_warps, maxnreg) for these inputs."""
    cfg = _triton_config(M, dtype, "bwd", interpret, masked=masked, C=C, int64=int64)
    return dict(HAS_PRIOR=prior, HAS_DXI=dxi, HAS_MASK=masked, INT64=int64, **cfg)


def _strides(x, xi0, log_prior):
    return (
        x.stride(0),
        x.stride(1),
        x.stride(2),
        xi0.stride(0),
        xi0.stride(1),
        log_prior.stride(0) if log_prior is not None else 0,
        log_prior.stride(1) if log_prior is not None else 0,
    )


# --------------------------------------------------------------------------------------------------
# Launchers (public: energy_fusion composes them; the autograd Function below calls them)
# --------------------------------------------------------------------------------------------------
def energy_propagate_fwd(
    x: torch.Tensor,
    xi0: torch.Tensor,
    log_prior: torch.Tensor | None,
    beta: float,
    steps: int,
    present: torch.Tensor | None = None,
):
    """Launch the forward kernel (G, s0, n0 in one pass over x and ξ0; the recurrence in registers;
    a second pass over x writes ξ_T).

    Args:
        x: ``[B, M, C, N]`` features, unit stride along N, M <= ``TRITON_MAX_MODALITIES``.
        xi0: ``[B, C, N]`` initial state, unit stride along N, x's dtype.
        log_prior: ``[B, M, N]`` (unit stride along N) or None (= 0); -inf marks an absent modality.
        beta: ``β > 0``. steps: 1 … ``MAX_STEPS``.
        present: ``[B, M]`` bool contiguous or None: an absent modality's x is read as zeros (give it
            a -inf prior as well).

    Returns:
        ``(xi [B, C, N], weights [B, M, N], energies [B, steps + 1, N])``, contiguous, x's dtype.
    """
    B, M, C, N = x.shape
    xi = torch.empty((B, C, N), dtype=x.dtype, device=x.device)
    weights = torch.empty((B, M, N), dtype=x.dtype, device=x.device)
    energies = torch.empty((B, steps + 1, N), dtype=x.dtype, device=x.device)
    if N == 0 or B == 0:
        return xi, weights, energies
    meta = _fwd_meta(
        M,
        C,
        x.dtype,
        prior=log_prior is not None,
        masked=present is not None,
        int64=needs_int64(x, xi0, log_prior, xi, weights, energies),  # energies: steps + 1 rows, maybe more than x
    )
    grid = (cdiv(N, meta["BLOCK_N"]), B)
    with device_guard(x):
        _energy_propagate_fwd_kernel[grid](
            x,
            xi0,
            log_prior if log_prior is not None else x,
            present if present is not None else x,
            xi,
            weights,
            energies,
            N,
            C,
            M,
            steps,
            *_strides(x, xi0, log_prior),
            float(beta),
            **meta,
        )
    return xi, weights, energies


def energy_propagate_bwd(
    x: torch.Tensor,
    xi0: torch.Tensor,
    log_prior: torch.Tensor | None,
    beta: float,
    steps: int,
    d_xi: torch.Tensor | None,
    d_w: torch.Tensor | None,
    d_e: torch.Tensor | None,
    present: torch.Tensor | None = None,
):
    """Launch the backward kernel (recompute G, s0, n0, q = Xᵀdξ; the reverse sweep in registers; a
    second pass writes dx and dξ0).

    Args:
        x, xi0, log_prior, beta, steps, present: as in :func:`energy_propagate_fwd`.
        d_xi: ``[B, C, N]`` upstream gradient of xi, or None. d_w: ``[B, M, N]`` of the weights, or None.
        d_e: ``[B, steps + 1, N]`` of the energies, or None. (Any layout: made contiguous.)

    Returns:
        ``(dx [B, M, C, N], dxi0 [B, C, N], da [B, M, N] or None without a prior)``, contiguous, in
        the dtypes of x, xi0 and log_prior; absent modalities' dx rows are zeros.
    """
    B, M, C, N = x.shape
    # dx, dxi0 and da (contiguous) hold as many elements as x, xi0 and log_prior
    meta = _bwd_meta(
        M,
        C,
        x.dtype,
        prior=log_prior is not None,
        dxi=d_xi is not None,
        masked=present is not None,
        int64=needs_int64(x, xi0, log_prior, d_xi, d_w, d_e),
    )
    dx = torch.empty((B, M, C, N), dtype=x.dtype, device=x.device)
    dxi0 = torch.empty((B, C, N), dtype=xi0.dtype, device=x.device)
    da = torch.empty((B, M, N), dtype=log_prior.dtype, device=x.device) if log_prior is not None else None
    if N == 0 or B == 0:
        return dx, dxi0, da
    d_w = d_w.contiguous() if d_w is not None else torch.zeros((B, M, N), dtype=x.dtype, device=x.device)
    d_e = d_e.contiguous() if d_e is not None else torch.zeros((B, steps + 1, N), dtype=x.dtype, device=x.device)
    grid = (cdiv(N, meta["BLOCK_N"]), B)
    with device_guard(x):
        _energy_propagate_bwd_kernel[grid](
            x,
            xi0,
            log_prior if log_prior is not None else x,
            present if present is not None else x,
            d_xi.contiguous() if d_xi is not None else x,
            d_w,
            d_e,
            dx,
            dxi0,
            da if da is not None else dx,
            N,
            C,
            M,
            steps,
            *_strides(x, xi0, log_prior),
            float(beta),
            **meta,
        )
    return dx, dxi0, da


# --------------------------------------------------------------------------------------------------
# Memory-lean PyTorch path: the same G-based recompute, in voxel chunks
# --------------------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 20  # fp32 temporaries per chunk (4 MiB; 16 MiB was no faster on CPU and peaked higher)
# temporaries per voxel and (b, m): x, G and dS rows, the p_t / u_t of the recurrence, and a few more
TORCH_CHUNK_ROW = 4


def _chunks(x: torch.Tensor, steps: int):
    B, M, C, N = x.shape
    return voxel_chunks(N, B * M * (C + M + steps + TORCH_CHUNK_ROW), _CHUNK_ELEMENTS)


def _torch_prior(a: torch.Tensor | None, B: int, M: int, n: int, acc: torch.dtype, device: torch.device):
    """One chunk's log-prior a [B, M, n] (None = 0) in ``acc`` with all-absent voxels set to 0; and that
    mask [B, n]."""
    if a is None:
        return torch.zeros((B, M, n), dtype=acc, device=device), torch.zeros((B, n), dtype=torch.bool, device=device)
    a = a.to(acc)
    absent = torch.isneginf(a).all(dim=1)
    return torch.where(absent[:, None], 0.0, a), absent


def _lse_softmax_torch(z):
    """logsumexp and softmax over the modality axis (1), as the kernels compute them: p = e / Σe with
    e = exp(z − max) is normalised to rounding, unlike exp(z − lse) whose error grows with |lse|."""
    z_max = z.amax(dim=1, keepdim=True)
    e = torch.exp(z - z_max)
    total = e.sum(dim=1, keepdim=True)
    return (z_max + torch.log(total)).squeeze(1), e / total


# Per-voxel contractions over the small modality axis. Written as loops of elementwise products over
# [B, C, n] slabs: einsum turns them into batched matmuls with one tiny matrix per voxel, which on a
# CPU costs far more in permute-copies than the arithmetic.
def _gram_matrix(xs: torch.Tensor) -> torch.Tensor:
    """xs [B, M, C, n] → G [B, M, M, n], G_ij = ⟨x_i, x_j⟩ per voxel (each pair once)."""
    B, M, _, n = xs.shape
    G = xs.new_empty((B, M, M, n))
    for i in range(M):
        for j in range(i, M):
            G[:, i, j] = (xs[:, i] * xs[:, j]).sum(dim=1)
            G[:, j, i] = G[:, i, j]
    return G


def _project(xs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xs [B, M, C, n], v [B, C, n] → [B, M, n], ⟨x_m, v⟩ per voxel."""
    return torch.stack([(xs[:, m] * v).sum(dim=1) for m in range(xs.shape[1])], dim=1)


def _mix(w: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """w [B, M, n], xs [B, M, C, n] → Σ_m w_m x_m [B, C, n]."""
    out = w[:, 0, None] * xs[:, 0]
    for m in range(1, xs.shape[1]):
        out.addcmul_(w[:, m, None], xs[:, m])
    return out


def _matvec(G: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """G [B, M, M, n], p [B, M, n] → G p [B, M, n] per voxel."""
    return (G * p[:, None]).sum(dim=2)


def _torch_recurrence(G, s0, n0, a, beta, steps):
    """The M-space forward on one chunk: p [p_1 … p_{T+1}] (p_{T+1} = softmax(z_{T+1}), needed by the
    backward), u [u_1 … u_T] and energies [B, T+1, n]."""
    lse, p = _lse_softmax_torch(beta * s0 + a)
    ps, us, energies = [p], [], [-lse / beta + 0.5 * n0]
    for _ in range(steps):
        u = _matvec(G, p)
        lse, p_next = _lse_softmax_torch(beta * u + a)
        energies.append(-lse / beta + 0.5 * (p * u).sum(dim=1))
        ps.append(p_next)
        us.append(u)
        p = p_next
    return ps, us, torch.stack(energies, dim=1)


def _torch_gram(xs, xi):
    return _gram_matrix(xs), _project(xs, xi), (xi * xi).sum(dim=1)


def torch_forward_chunk(xs, xis, a, beta, steps):
    """One voxel chunk in ``acc``: xs [B, M, C, n], xis [B, C, n], a [B, M, n] or None →
    xi [B, C, n], weights [B, M, n], energies [B, steps + 1, n] (all-absent voxels: 0, 0, +inf)."""
    B, M, _, n = xs.shape
    a, absent = _torch_prior(a, B, M, n, xs.dtype, xs.device)
    G, s0, n0 = _torch_gram(xs, xis)
    ps, _, energies = _torch_recurrence(G, s0, n0, a, beta, steps)
    p = torch.where(absent[:, None], 0.0, ps[steps - 1])
    return _mix(p, xs), p, torch.where(absent[:, None], float("inf"), energies)


@dataclass
class ChunkCotangents:
    """The backward of one voxel chunk in M-space (``acc``), every entry 0 at all-absent voxels::

    dx_m = Σ_j dS_mj·x_j + ds0_m·ξ0 + p_last_m·dξ          (``dx_modality``)
    dξ0  = Σ_m ds0_m·x_m + d_e0·ξ0                          (``dxi0``)
    """

    dS: torch.Tensor  # [B, M, M, n]
    ds0: torch.Tensor  # [B, M, n]
    p_last: torch.Tensor  # [B, M, n]
    d_e0: torch.Tensor  # [B, 1, n]
    da: torch.Tensor  # [B, M, n], the log-prior gradient

    def dx_modality(self, m: int, xs: torch.Tensor, xis: torch.Tensor, dxs: torch.Tensor | None) -> torch.Tensor:
        dxm = _mix(self.dS[:, m], xs).addcmul_(self.ds0[:, m, None], xis)
        return dxm if dxs is None else dxm.addcmul_(self.p_last[:, m, None], dxs)

    def dxi0(self, xs: torch.Tensor, xis: torch.Tensor) -> torch.Tensor:
        return _mix(self.ds0, xs).addcmul_(self.d_e0, xis)


def torch_backward_chunk(xs, xis, a, beta, steps, dxs, d_w, d_e) -> ChunkCotangents:
    """The VJP of :func:`torch_forward_chunk` (module docstring) from the upstream dxs [B, C, n],
    d_w [B, M, n], d_e [B, steps + 1, n] (each in ``acc`` or None)."""
    B, M, _, n = xs.shape
    a, absent = _torch_prior(a, B, M, n, xs.dtype, xs.device)
    G, s0, n0 = _torch_gram(xs, xis)
    ps, us, _ = _torch_recurrence(G, s0, n0, a, beta, steps)
    dE = d_e if d_e is not None else torch.zeros((B, steps + 1, n), dtype=xs.dtype, device=xs.device)
    dp = d_w if d_w is not None else torch.zeros_like(s0)
    if dxs is not None:
        dp = dp + _project(xs, dxs)
    g = torch.zeros_like(s0)
    da = torch.zeros_like(s0)
    dS = torch.zeros_like(G)
    for t in range(steps, 0, -1):
        p, u, sig, d_et = ps[t - 1], us[t - 1], ps[t], dE[:, t, None]
        g = g - (d_et / beta) * sig
        da += g
        du = beta * g + 0.5 * d_et * p
        dp = dp + 0.5 * d_et * u + _matvec(G, du)
        dS.addcmul_(du[:, :, None], p[:, None]).addcmul_(p[:, :, None], du[:, None])  # in place: G-sized
        g = p * (dp - (p * dp).sum(dim=1, keepdim=True))
        dp = torch.zeros_like(dp)
    d_e0 = dE[:, 0, None]
    g = g - (d_e0 / beta) * ps[0]
    da += g
    keep = ~absent[:, None]
    return ChunkCotangents(
        dS=torch.where(keep[:, None], dS, 0.0),
        ds0=torch.where(keep, beta * g, 0.0),
        p_last=torch.where(keep, ps[steps - 1], 0.0),
        d_e0=torch.where(keep, d_e0, 0.0),
        da=torch.where(keep, da, 0.0),
    )


def _torch_forward(x, xi0, log_prior, beta, steps):
    B, M, C, N = x.shape
    acc = accumulation_dtype(x)
    xi = x.new_empty((B, C, N))
    weights = x.new_empty((B, M, N))
    energies = x.new_empty((B, steps + 1, N))
    for s, e in _chunks(x, steps):
        a = log_prior[..., s:e] if log_prior is not None else None
        xi[..., s:e], weights[..., s:e], energies[..., s:e] = torch_forward_chunk(
            x[..., s:e].to(acc), xi0[..., s:e].to(acc), a, beta, steps
        )
    return xi, weights, energies


def _torch_backward(x, xi0, log_prior, beta, steps, d_xi, d_w, d_e):
    B, M, C, N = x.shape
    acc = accumulation_dtype(x)
    dx = torch.empty((B, M, C, N), dtype=x.dtype, device=x.device)
    dxi0 = torch.empty((B, C, N), dtype=xi0.dtype, device=x.device)
    da = torch.empty((B, M, N), dtype=log_prior.dtype, device=x.device) if log_prior is not None else None

    def chunk(t, s, e):
        return t[..., s:e].to(acc) if t is not None else None

    for s, e in _chunks(x, steps):
        xs, xis, dxs = chunk(x, s, e), chunk(xi0, s, e), chunk(d_xi, s, e)
        cot = torch_backward_chunk(
            xs, xis, chunk(log_prior, s, e), beta, steps, dxs, chunk(d_w, s, e), chunk(d_e, s, e)
        )
        for m in range(M):
            dx[:, m, :, s:e] = cot.dx_modality(m, xs, xis, dxs)
        dxi0[..., s:e] = cot.dxi0(xs, xis)
        if da is not None:
            da[..., s:e] = cot.da
    return dx, dxi0, da


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------
# Registered as torch.library custom ops (forward and backward): one opaque node each for
# torch.compile (no graph break), shapes from the fake implementations, the hand-written backward
# for autograd. x [B, M, C, N], xi0 [B, C, N], log_prior [B, M, N]|None (unit stride along N).
# Saved for backward: the inputs only.
_NO_TENSOR = (0,)  # the shape standing for "None" among a custom op's outputs


# the schema spelled out (not inferred from the postponed annotations of this module)
@torch.library.custom_op(
    "e2pa::energy_propagate",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor xi0, Tensor? log_prior, float beta, int steps, bool use_triton) -> (Tensor, Tensor, Tensor)"
    ),
)
def _energy_propagate_op(
    x: torch.Tensor, xi0: torch.Tensor, log_prior: torch.Tensor | None, beta: float, steps: int, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xi [B, C, N], weights [B, M, N], energies [B, steps + 1, N] in x's dtype."""
    fwd = energy_propagate_fwd if use_triton else _torch_forward
    return fwd(
        voxels_last(x, 3),
        voxels_last(xi0, 2),
        voxels_last(log_prior, 2) if log_prior is not None else None,
        beta,
        steps,
    )


@_energy_propagate_op.register_fake
def _(x, xi0, log_prior, beta, steps, use_triton):
    B, M, C, N = x.shape
    return x.new_empty((B, C, N)), x.new_empty((B, M, N)), x.new_empty((B, steps + 1, N))


@torch.library.custom_op(
    "e2pa::energy_propagate_backward",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor xi0, Tensor? log_prior, Tensor? d_xi, Tensor? d_w, Tensor? d_e, float beta, int steps, "
        "bool use_triton) -> (Tensor, Tensor, Tensor)"
    ),
)
def _energy_propagate_backward_op(
    x: torch.Tensor,
    xi0: torch.Tensor,
    log_prior: torch.Tensor | None,
    d_xi: torch.Tensor | None,
    d_w: torch.Tensor | None,
    d_e: torch.Tensor | None,
    beta: float,
    steps: int,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx [B, M, C, N], dxi0 [B, C, N], da [B, M, N] (an empty [0] tensor without a prior), contiguous,
    in the dtypes of x, xi0 and log_prior."""
    bwd = energy_propagate_bwd if use_triton else _torch_backward
    dx, dxi0, da = bwd(
        voxels_last(x, 3),
        voxels_last(xi0, 2),
        voxels_last(log_prior, 2) if log_prior is not None else None,
        beta,
        steps,
        d_xi,
        d_w,
        d_e,
    )
    return dx, dxi0, (da if da is not None else x.new_empty(_NO_TENSOR))


@_energy_propagate_backward_op.register_fake
def _(x, xi0, log_prior, d_xi, d_w, d_e, beta, steps, use_triton):
    return (
        x.new_empty(x.shape),
        xi0.new_empty(xi0.shape),
        log_prior.new_empty(log_prior.shape) if log_prior is not None else x.new_empty(_NO_TENSOR),
    )


def _energy_propagate_setup_context(ctx, inputs, output):
    x, xi0, log_prior, beta, steps, use_triton = inputs
    ctx.save_for_backward(x, xi0, log_prior)
    ctx.beta, ctx.steps, ctx.use_triton = beta, steps, use_triton
    ctx.set_materialize_grads(False)


def _energy_propagate_backward(ctx, d_xi, d_w, d_e):
    x, xi0, log_prior = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if (d_xi is None and d_w is None and d_e is None) or not any(needs[:3]):
        return (None,) * 6
    dx, dxi0, da = _energy_propagate_backward_op(x, xi0, log_prior, d_xi, d_w, d_e, ctx.beta, ctx.steps, ctx.use_triton)
    return (
        dx if needs[0] else None,
        dxi0 if needs[1] else None,
        da if log_prior is not None and needs[2] else None,
        None,
        None,
        None,
    )


_energy_propagate_op.register_autograd(_energy_propagate_backward, setup_context=_energy_propagate_setup_context)


def check_inputs(x, xi0, log_prior, beta, steps):
    """Validate :func:`energy_propagate`'s arguments; returns ``(beta, steps)`` as float and int."""
    check_tensor(OP, "x", x, min_ndim=4)
    B, M, C = x.shape[:3]
    spatial = tuple(x.shape[3:])
    if M < 1 or C < 1:
        raise ValueError(f"{OP}: x must be [B, M, C, *S] with M, C >= 1; got shape {list(x.shape)}")
    check_tensor(OP, "xi0", xi0, min_ndim=3)
    check_shape(OP, "xi0", xi0, (B, C, *spatial), "[B, C, *S] (x's batch, channels and spatial axes)")
    if log_prior is not None:
        check_tensor(OP, "log_prior", log_prior, min_ndim=3)
        check_shape(OP, "log_prior", log_prior, (B, M, *spatial), "[B, M, *S] (x's batch, modalities and spatial axes)")
    for name, t in (("xi0", xi0), ("log_prior", log_prior)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"{OP}: {name} must have x's dtype {str(x.dtype).replace('torch.', '')}; "
                f"got {str(t.dtype).replace('torch.', '')}"
            )
    check_same_device(OP, x=x, xi0=xi0, log_prior=log_prior)
    return check_beta_and_steps(beta, steps)


def check_beta_and_steps(beta: object, steps: object) -> tuple[float, int]:
    """Validate β (finite, > 0) and steps (an int in 1 … MAX_STEPS)."""
    beta = check_finite_scalar(OP, "beta", beta, positive=True)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{OP}: steps must be an int; got {type(steps).__name__}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{OP}: steps must lie in [1, {MAX_STEPS}]; got {steps}")
    return beta, steps


def energy_propagate(
    x: torch.Tensor, xi0: torch.Tensor, log_prior: torch.Tensor | None = None, beta: float = 1.0, steps: int = 3
):
    """Hopfield energy descent of the fused state over the modality features, per voxel.

    Args:
        x: ``[B, M, C, *S]`` modality features (the stored patterns), any float dtype; slices along
            batch / modality / channel reach the kernels without a copy.
        xi0: ``[B, C, *S]`` initial fused state, x's dtype.
        log_prior: ``[B, M, *S]`` per-modality log-prior ``a_m`` (None = 0), x's dtype; ``-inf`` marks an
            absent modality (exactly excluded: weight 0, no gradient). A NaN or +inf prior makes its
            voxel NaN, as a NaN feature does (not checked: a scan of the prior would cost a host sync
            per call, and a NaN upstream must reach the loss, where training's non-finite policy acts).
        beta: inverse temperature ``β > 0``.
        steps: number of updates ``ξ ← Σ_m softmax_m(β⟨x_m, ξ⟩ + a_m)·x_m``, 1 … 8.

    Returns:
        ``xi`` ``[B, C, *S]`` (state after ``steps`` updates), ``weights`` ``[B, M, *S]`` (p of the last
        step) and ``energies`` ``[B, steps + 1, *S]`` (E(ξ_0) … E(ξ_steps), never increasing), all in
        x's dtype. A voxel whose priors are all -inf gets ξ = 0, weights 0 and energies +inf.
        Differentiable in x, xi0 and log_prior through all three outputs.
    """
    beta, steps = check_inputs(x, xi0, log_prior, beta, steps)
    backend = select_backend(
        x,
        xi0,
        log_prior,
        triton_limit=(
            f"{OP}: the Triton kernels take M <= {TRITON_MAX_MODALITIES} modalities; got M = {x.shape[1]}"
            if x.shape[1] > TRITON_MAX_MODALITIES
            else None
        ),
    )
    if backend == "reference":
        return reference.energy_propagate(x, xi0, log_prior, beta, steps)
    B, M, C = x.shape[:3]
    spatial = x.shape[3:]
    x4 = voxels_last(x, 3)
    xi3 = voxels_last(xi0, 2)
    a3 = voxels_last(log_prior, 2) if log_prior is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        xi, weights, energies = _energy_propagate_op(x4, xi3, a3, beta, steps, backend == "triton")
    return xi.view(B, C, *spatial), weights.view(B, M, *spatial), energies.view(B, steps + 1, *spatial)


# --------------------------------------------------------------------------------------------------
# GPU compile variants (tests compile each for sm_80 / sm_90 and check spills and load widths)
# --------------------------------------------------------------------------------------------------
# Flags whose True value only adds code (an optional input's loads and math): a variant compiled with them set
# covers the launches that leave them False (_kernel_spec.heaviest) -- where the launcher picks the same tiles
# either way: HAS_MASK picks its own tiles at one config (_MASKED_GPU_CONFIGS), so both are compiled there.
COVERED_FLAGS = ("HAS_PRIOR", "HAS_DXI", "HAS_MASK")
GUARDED_ARGS = {
    "HAS_PRIOR": ("a_ptr", "da_ptr", "stride_ab", "stride_am"),
    "HAS_DXI": ("dxi_ptr",),
    "HAS_MASK": ("present_ptr",),
}


def gpu_compile_specs() -> list[KernelSpec]:
    """Every variant the launchers can pick, from their own ``_fwd_meta`` / ``_bwd_meta``: fp32 / fp16 / bf16
    × every M up to ``TRITON_MAX_MODALITIES`` (BLOCK_M 1 / 2 / 4 / 8) × every C (the one-pass tiles where
    BLOCK_M · next_pow2(C) <= ``ONE_PASS_MAX_FEATURES``, padded to at least ``ONE_PASS_MIN_FEATURES``; the
    two-pass tiles do not depend on C; C = ``ONE_PASS_MAX_FEATURES`` + 1 stands for all wider ones) × masked
    (energy_fusion's chunked-C path) × 32- and 64-bit offsets (two-pass only). HAS_PRIOR / HAS_DXI / HAS_MASK
    are compiled set wherever the launcher picks the same tiles without them (COVERED_FLAGS); the unmasked
    forward at the one config whose masked variant has its own tiles is compiled as well."""
    if triton is None:
        return []
    specs = []
    for dtype, ty in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        seen = set()  # the tiles met so far (the other flags do not enter _triton_config): each once
        for name in ("fwd", "bwd"):
            for M in range(1, TRITON_MAX_MODALITIES + 1):
                for C in range(1, ONE_PASS_MAX_FEATURES + 2):
                    for masked, int64 in itertools.product((False, True), repeat=2):
                        tile = (name, masked, int64, *_triton_config(M, dtype, name, False, masked, C, int64).items())
                        if tile in seen:
                            continue
                        seen.add(tile)
                        for prior, dxi in itertools.product((False, True), repeat=2):
                            flags = dict(prior=prior, masked=masked, int64=int64, interpret=False)
                            if name == "fwd":
                                meta = _fwd_meta(M, C, dtype, **flags) if not dxi else None
                            else:
                                meta = _bwd_meta(M, C, dtype, dxi=dxi, **flags)
                            if meta is not None:
                                specs.append(_spec(name, ty, meta))
    return heaviest(specs, COVERED_FLAGS)


def _spec(name: str, ty: str, meta: dict) -> KernelSpec:
    kernel = _energy_propagate_fwd_kernel if name == "fwd" else _energy_propagate_bwd_kernel
    constexprs, warps, maxnreg = split_meta(meta)
    sig = _signature(kernel, ty, "i64" if constexprs["INT64"] else "i32")
    return KernelSpec(
        label=spec_label(OP, name, ty, constexprs, COVERED_FLAGS, warps=warps, maxnreg=maxnreg),
        kernel=kernel,
        signature=sig,
        constexprs=constexprs,
        num_warps=warps,
        aligned=tuple(a for a in sig if a.endswith("_ptr") or a == "N" or a.startswith("stride_")),
        maxnreg=maxnreg,
    )


def _signature(kernel, ty: str, index: str) -> dict[str, str]:
    base = {"N": index, "C": "i32", "M": "i32", "steps": "i32", "beta": "fp32"}
    for a in kernel.arg_names:
        if a.startswith("stride_"):
            base[a] = index
        elif a.endswith("_ptr"):
            base[a] = "*u1" if a == "present_ptr" else f"*{ty}"  # bool, as the JIT types it
    return {a: base.get(a, "constexpr") for a in kernel.arg_names}
