"""Op 3 — ``factor_align`` (+ ``factor_basis``, ``orthonormalize``): modality directions inside the
factors of the fused space.

Math (``docs/method.md``), per sample, voxel n and vector v ∈ {x_1 … x_M, f} (index M is the fused
feature), with the basis U ∈ R^{C×r}::

    inv = 1 / max(‖v‖, eps)   (inv = 0 where v = 0 exactly: no direction, no gradient)
    c   = Uᵀ v · inv                                       r coefficients (never written to memory)
    dist_m = Σ_n ‖c_m − c_F‖²,   mom1_l = Σ_n c_l,   mom2_l = Σ_n c_l ⊙ c_l

VJP, with upstream d_dist [B, M], d_mom1 / d_mom2 [B, M+1, r], per voxel::

    dc_m = 2·d_dist_m·(c_m − c_F) + d_mom1_m + 2·d_mom2_m ⊙ c_m                          (m < M)
    dc_F = −Σ_m 2·d_dist_m·(c_m − c_F) + d_mom1_M + 2·d_mom2_M ⊙ c_F
    with v̂ = v·inv (so that v̂·(U dc) = c·dc, no extra pass):
    dv   = inv·(U dc − v̂·(c·dc))     where ‖v‖ ≥ eps   (the norm is differentiated)
         = inv·U dc                   where 0 < ‖v‖ < eps (the clamp: eps is a constant)
         = 0                          where v = 0        (inv = 0 makes both terms vanish)
    dU   = Σ_n v̂ dcᵀ                 (summed over the batch for a shared [C, r] basis)

Three implementations behind one entry point (:func:`factor_align`):
- Triton: the forward streams every vector once (fused first, its coefficients stay in registers
  while each modality streams by) and reduces dist/mom1/mom2 in registers; each persistent program
  stores one partial row at the end, summed afterwards in a fixed order. The backward recomputes the
  coefficients and writes dv and dU: where C <= 64 from one resident tile per vector (each vector read
  once, dU accumulated in registers, one row per program stored at its end); wider, in two passes over
  each vector's channel blocks (a zero-initialised partial row per program, read-modify-written per
  tile). No atomics, bit-reproducible.
- torch (memory-lean): the same math and hand-written backward in voxel chunks; saves only inputs.
- reference: plain autograd (:func:`e2pa_kernels.reference.factor_align`).

:func:`factor_basis` (top-r eigenvectors of the per-sample second moment; on the triton backend the
sync-free Jacobi kernel of :mod:`e2pa_kernels.symeig`) and :func:`orthonormalize` (QR of a learned
basis); see their docstrings.
"""

from __future__ import annotations

import torch

from . import reference, symeig
from ._kernel_spec import KernelSpec, spec_label, split_meta
from ._runtime import requested_backend, select_backend, small_interpreter_blocks
from ._triton_utils import cdiv, device_guard, next_pow2, persistent_programs
from ._validate import (
    accumulation_dtype,
    check_finite_scalar,
    check_same_device,
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

OP = "factor_align"
TRITON_MAX_RANK = 64  # coefficient tiles [BLOCK_R, BLOCK_N] live in registers
TRITON_MAX_MODALITIES = 15  # the forward's BLOCK_L = 16 rows of register accumulators (M modalities + fused)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _coefficients(
        v_base,
        ut_base,
        offs_r,
        mask_r,
        offs_n,
        mask_n,
        C,
        stride_vc,
        stride_ur,
        eps,
        INT64: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One pass over the channels of one vector tile v [C, BLOCK_N]:
        c = Uᵀv·inv [BLOCK_R, BLOCK_N] (padded rows and voxels are 0), inv and ‖v‖ [BLOCK_N], fp32."""
        tl.static_assert(BLOCK_R >= 16 and BLOCK_C >= 16 and BLOCK_N >= 16)  # tl.dot's minimum on GPUs
        raw = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        # ‖v‖²: 16-bit inputs (memory-bound) keep a [BLOCK_C, BLOCK_N] accumulator, reduced once after
        # the loop; fp32 reduces every block instead (its CUDA-core dot's operands need the registers)
        SQ_ROWS: tl.constexpr = 1 if v_base.dtype.element_ty == tl.float32 else BLOCK_C
        sq = tl.zeros((SQ_ROWS, BLOCK_N), dtype=tl.float32)
        offs_c = tl.arange(0, BLOCK_C)
        if INT64:
            offs_c = offs_c.to(tl.int64)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            mask_c = cc < C
            v = tl.load(
                v_base + cc[:, None] * stride_vc + offs_n[None, :], mask=mask_c[:, None] & mask_n[None, :], other=0.0
            )
            # Uᵀ rows are zero-padded to stride_ur: masking by it (not by C) keeps the loads wide
            ut = tl.load(
                ut_base + offs_r[:, None] * stride_ur + cc[None, :],
                mask=mask_r[:, None] & (cc < stride_ur)[None, :],
                other=0.0,
            )
            # fp16/bf16 v: tensor-core dot with fp32 accumulation (Uᵀ comes in v's dtype, as the
            # reference rounds it); fp32 v: exact fp32 products ("ieee", not tf32).
            raw = tl.dot(ut, v, raw, input_precision="ieee")
            vf = v.to(tl.float32)
            if SQ_ROWS == 1:
                sq += tl.sum(vf * vf, axis=0)[None, :]
            else:
                sq += vf * vf
        ssq = tl.sum(sq, axis=0)
        norm = tl.sqrt(ssq)
        inv = tl.where(ssq > 0.0, 1.0 / tl.maximum(norm, eps), 0.0)
        return raw * inv[None, :], inv, norm

    @triton.jit
    def _direction_backward(
        v_base,
        dv_base,
        ut_base,
        du_row,
        c,
        dc,
        inv,
        norm,
        offs_r,
        mask_r,
        offs_n,
        mask_n,
        C,
        stride_vc,
        stride_dvc,
        stride_ur,
        eps,
        INT64: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Pass 2 over one vector tile, given its coefficients c and their gradient dc [BLOCK_R, BLOCK_N]:

        dv = inv·U dc − v·k,  k = inv²·(c·dc) where ‖v‖ ≥ eps else 0      (stored, v's dtype)
        dU_partial[r, C] += dc v̂ᵀ,  v̂ = v·inv                           (owned row, fp32)
        """
        k = tl.where(norm >= eps, inv * inv * tl.sum(c * dc, axis=0), 0.0)
        offs_c = tl.arange(0, BLOCK_C)
        if INT64:
            offs_c = offs_c.to(tl.int64)
        lp = v_base.dtype.element_ty
        dc_lp = dc.to(lp)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            mask_c = cc < C
            mask_cn = mask_c[:, None] & mask_n[None, :]
            v = tl.load(v_base + cc[:, None] * stride_vc + offs_n[None, :], mask=mask_cn, other=0.0)
            mask_rc = mask_r[:, None] & (cc < stride_ur)[None, :]  # padded width: wide loads, pads stay 0
            ut = tl.load(ut_base + offs_r[:, None] * stride_ur + cc[None, :], mask=mask_rc, other=0.0)
            udc = tl.dot(tl.trans(ut), dc_lp, input_precision="ieee")
            vf = v.to(tl.float32)
            dv = inv[None, :] * udc - vf * k[None, :]
            tl.store(
                dv_base + cc[:, None] * stride_dvc + offs_n[None, :], dv.to(dv_base.dtype.element_ty), mask=mask_cn
            )
            v_hat = (vf * inv[None, :]).to(lp)  # |v̂| ≤ 1: safe in fp16
            du_ptrs = du_row + offs_r[:, None] * stride_ur + cc[None, :]
            du = tl.load(du_ptrs, mask=mask_rc, other=0.0)
            du = tl.dot(dc_lp, tl.trans(v_hat), du, input_precision="ieee")
            tl.store(du_ptrs, du, mask=mask_rc)
            # the next read-modify-write of this row may come from other threads of the program
            tl.debug_barrier()

    @triton.jit
    def _resident_coefficients(v, ut, eps):
        """The coefficients of a resident vector tile v [BLOCK_C, BLOCK_N] (its whole channel axis, v's
        dtype) with Uᵀ [BLOCK_R, BLOCK_C]: c = Uᵀv·inv [BLOCK_R, BLOCK_N], inv and ‖v‖ [BLOCK_N], fp32."""
        raw = tl.dot(ut, v, input_precision="ieee")
        vf = v.to(tl.float32)
        ssq = tl.sum(vf * vf, axis=0)
        norm = tl.sqrt(ssq)
        inv = tl.where(ssq > 0.0, 1.0 / tl.maximum(norm, eps), 0.0)
        return raw * inv[None, :], inv, norm

    @triton.jit
    def _resident_direction_backward(v, ut, c, dc, inv, norm, du, eps):
        """_direction_backward on a resident tile: returns dv [BLOCK_C, BLOCK_N] (fp32) and du + dc v̂ᵀ
        [BLOCK_R, BLOCK_C] (the program's register accumulator of dU)."""
        k = tl.where(norm >= eps, inv * inv * tl.sum(c * dc, axis=0), 0.0)
        lp = v.dtype
        dc_lp = dc.to(lp)
        vf = v.to(tl.float32)
        dv = inv[None, :] * tl.dot(tl.trans(ut), dc_lp, input_precision="ieee") - vf * k[None, :]
        v_hat = (vf * inv[None, :]).to(lp)  # |v̂| ≤ 1: safe in fp16
        return dv, tl.dot(dc_lp, tl.trans(v_hat), du, input_precision="ieee")

    @triton.jit
    def _factor_align_fwd_kernel(
        x_ptr,
        f_ptr,
        ut_ptr,
        dist_ptr,
        mom1_ptr,
        mom2_ptr,
        N,
        C,
        R,
        M,
        stride_xb,
        stride_xm,
        stride_xc,
        stride_fb,
        stride_fc,
        stride_ub,
        stride_ur,
        tiles_n,
        eps,
        INT64: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """Persistent grid (P, B): program (p, b) takes voxel tiles p, p + P, … of sample b.

        x [B, M, C, N], fused [B, C, N] (unit stride along N), ut [B|1, R, stride_ur] (Uᵀ in x's
        dtype, rows zero-padded to a multiple of 16 so that they load 16 bytes wide; stride_ub = 0 for
        a shared basis). Partials, written whole by their program at the end (no zero-fill needed):
        dist [B, P, M], mom1 / mom2 [B, P, M+1, R] fp32. BLOCK_L ≥ M + 1 rows of register
        accumulators (row M is the fused feature). Per-sample and per-modality base offsets are int64
        scalars; INT64 widens the offsets inside one [C, N] slab (a slab past 2^31 elements).
        """
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        programs = tl.num_programs(0)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        offs_l = tl.arange(0, BLOCK_L)
        ut_base = ut_ptr + b * stride_ub
        x_b = x_ptr + b * stride_xb
        f_b = f_ptr + b * stride_fb
        acc_dist = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)  # summed over factors at the end
        acc_mom1 = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
        acc_mom2 = tl.zeros((BLOCK_L, BLOCK_R), dtype=tl.float32)
        for tile in range(pid, tiles_n, programs):
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # < 2^31: the launcher checks N
            if INT64:
                offs_n = offs_n.to(tl.int64)
            mask_n = offs_n < N
            c_f, inv_f, norm_f = _coefficients(
                f_b,
                ut_base,
                offs_r,
                mask_r,
                offs_n,
                mask_n,
                C,
                stride_fc,
                stride_ur,
                eps,
                INT64,
                BLOCK_C,
                BLOCK_R,
                BLOCK_N,
            )
            row = offs_l[:, None] == M
            acc_mom1 += tl.where(row, tl.sum(c_f, axis=1)[None, :], 0.0)
            acc_mom2 += tl.where(row, tl.sum(c_f * c_f, axis=1)[None, :], 0.0)
            x_m = x_b  # advanced by stride_xm per modality: no m·stride_xm product to overflow int32
            for m in range(0, M):
                c_m, inv_m, norm_m = _coefficients(
                    x_m,
                    ut_base,
                    offs_r,
                    mask_r,
                    offs_n,
                    mask_n,
                    C,
                    stride_xc,
                    stride_ur,
                    eps,
                    INT64,
                    BLOCK_C,
                    BLOCK_R,
                    BLOCK_N,
                )
                diff = c_m - c_f
                row = offs_l[:, None] == m
                acc_dist += tl.where(row, tl.sum(diff * diff, axis=1)[None, :], 0.0)
                acc_mom1 += tl.where(row, tl.sum(c_m, axis=1)[None, :], 0.0)
                acc_mom2 += tl.where(row, tl.sum(c_m * c_m, axis=1)[None, :], 0.0)
                x_m += stride_xm
        part = b * programs + pid
        tl.store(dist_ptr + part * M + offs_l, tl.sum(acc_dist, axis=1), mask=offs_l < M)
        mom_ptrs = (part * (M + 1) + offs_l[:, None]) * R + offs_r[None, :]
        mask_lr = (offs_l[:, None] < M + 1) & mask_r[None, :]
        tl.store(mom1_ptr + mom_ptrs, acc_mom1, mask=mask_lr)
        tl.store(mom2_ptr + mom_ptrs, acc_mom2, mask=mask_lr)

    @triton.jit
    def _factor_align_bwd_kernel(
        x_ptr,
        f_ptr,
        ut_ptr,
        d_dist_ptr,
        d_mom1_ptr,
        d_mom2_ptr,
        dx_ptr,
        df_ptr,
        du_partial_ptr,
        N,
        C,
        R,
        M,
        stride_xb,
        stride_xm,
        stride_xc,
        stride_fb,
        stride_fc,
        stride_ub,
        stride_ur,
        tiles_n,
        eps,
        INT64: tl.constexpr,
        ONE_PASS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """Persistent grid (P, B), tiles and offsets as in the forward. d_dist [B, M], d_mom1 / d_mom2
        [B, M+1, R] fp32 contiguous; dx [B, M, C, N] and dfused [B, C, N] contiguous (every element
        written); du_partial [B, P, R, stride_ur] fp32, row (b, p) owned by program (p, b) alone.

        ONE_PASS (BLOCK_C >= C): the fused tile stays in registers for the whole voxel tile and each
        modality's tile for its coefficients and its gradient (every vector read once); Uᵀ is loaded
        once per program and dU accumulates in registers, stored once at the end (no zero-fill).
        Otherwise two passes over each vector's channel blocks, du_partial zero-initialised and
        read-modify-written per tile."""
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        programs = tl.num_programs(0)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        ut_base = ut_ptr + b * stride_ub
        x_b = x_ptr + b * stride_xb
        f_b = f_ptr + b * stride_fb
        du_row = du_partial_ptr + (b * programs + pid) * R * stride_ur
        if ONE_PASS:
            offs_c1 = tl.arange(0, BLOCK_C)
            ut_all = tl.load(
                ut_base + offs_r[:, None] * stride_ur + offs_c1[None, :],
                mask=mask_r[:, None] & (offs_c1 < stride_ur)[None, :],
                other=0.0,
            )
            du_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for tile in range(pid, tiles_n, programs):
            offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # < 2^31: the launcher checks N
            if INT64:
                offs_n = offs_n.to(tl.int64)
            mask_n = offs_n < N
            if ONE_PASS:
                mask_cn = (offs_c1 < C)[:, None] & mask_n[None, :]
                f_tile = tl.load(f_b + offs_c1[:, None] * stride_fc + offs_n[None, :], mask=mask_cn, other=0.0)
                c_f, inv_f, norm_f = _resident_coefficients(f_tile, ut_all, eps)
                g_f = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)  # Σ_m 2·d_dist_m·(c_m − c_F)
                x_m = x_b
                for m in range(0, M):
                    x_tile = tl.load(x_m + offs_c1[:, None] * stride_xc + offs_n[None, :], mask=mask_cn, other=0.0)
                    c_m, inv_m, norm_m = _resident_coefficients(x_tile, ut_all, eps)
                    dd = tl.load(d_dist_ptr + b * M + m)
                    diff = (2.0 * dd) * (c_m - c_f)
                    g_f += diff
                    d1 = tl.load(d_mom1_ptr + (b * (M + 1) + m) * R + offs_r, mask=mask_r, other=0.0)
                    d2 = tl.load(d_mom2_ptr + (b * (M + 1) + m) * R + offs_r, mask=mask_r, other=0.0)
                    dc_m = diff + d1[:, None] + (2.0 * d2)[:, None] * c_m
                    dv, du_acc = _resident_direction_backward(x_tile, ut_all, c_m, dc_m, inv_m, norm_m, du_acc, eps)
                    tl.store(
                        dx_ptr + (b * M + m) * C * N + offs_c1[:, None] * N + offs_n[None, :],
                        dv.to(dx_ptr.dtype.element_ty),
                        mask=mask_cn,
                    )
                    x_m += stride_xm
                d1 = tl.load(d_mom1_ptr + (b * (M + 1) + M) * R + offs_r, mask=mask_r, other=0.0)
                d2 = tl.load(d_mom2_ptr + (b * (M + 1) + M) * R + offs_r, mask=mask_r, other=0.0)
                dc_f = d1[:, None] + (2.0 * d2)[:, None] * c_f - g_f
                dv, du_acc = _resident_direction_backward(f_tile, ut_all, c_f, dc_f, inv_f, norm_f, du_acc, eps)
                tl.store(
                    df_ptr + b * C * N + offs_c1[:, None] * N + offs_n[None, :],
                    dv.to(df_ptr.dtype.element_ty),
                    mask=mask_cn,
                )
            else:
                # pass 1 (fused): c_F stays in registers while every modality streams by
                c_f, inv_f, norm_f = _coefficients(
                    f_b,
                    ut_base,
                    offs_r,
                    mask_r,
                    offs_n,
                    mask_n,
                    C,
                    stride_fc,
                    stride_ur,
                    eps,
                    INT64,
                    BLOCK_C,
                    BLOCK_R,
                    BLOCK_N,
                )
                g_f = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)  # Σ_m 2·d_dist_m·(c_m − c_F)
                x_m = x_b  # advanced by stride_xm per modality: no m·stride_xm product to overflow int32
                for m in range(0, M):
                    # pass 1 (modality m): recompute c_m; then dc_m and pass 2 (dx_m, dU)
                    c_m, inv_m, norm_m = _coefficients(
                        x_m,
                        ut_base,
                        offs_r,
                        mask_r,
                        offs_n,
                        mask_n,
                        C,
                        stride_xc,
                        stride_ur,
                        eps,
                        INT64,
                        BLOCK_C,
                        BLOCK_R,
                        BLOCK_N,
                    )
                    dd = tl.load(d_dist_ptr + b * M + m)
                    diff = (2.0 * dd) * (c_m - c_f)
                    g_f += diff
                    d1 = tl.load(d_mom1_ptr + (b * (M + 1) + m) * R + offs_r, mask=mask_r, other=0.0)
                    d2 = tl.load(d_mom2_ptr + (b * (M + 1) + m) * R + offs_r, mask=mask_r, other=0.0)
                    dc_m = diff + d1[:, None] + (2.0 * d2)[:, None] * c_m
                    _direction_backward(
                        x_m,
                        dx_ptr + (b * M + m) * C * N,
                        ut_base,
                        du_row,
                        c_m,
                        dc_m,
                        inv_m,
                        norm_m,
                        offs_r,
                        mask_r,
                        offs_n,
                        mask_n,
                        C,
                        stride_xc,
                        N,
                        stride_ur,
                        eps,
                        INT64,
                        BLOCK_C,
                        BLOCK_R,
                        BLOCK_N,
                    )
                    x_m += stride_xm
                # pass 2 (fused): dc_F = d_mom1_M + 2·d_mom2_M ⊙ c_F − Σ_m 2·d_dist_m·(c_m − c_F)
                d1 = tl.load(d_mom1_ptr + (b * (M + 1) + M) * R + offs_r, mask=mask_r, other=0.0)
                d2 = tl.load(d_mom2_ptr + (b * (M + 1) + M) * R + offs_r, mask=mask_r, other=0.0)
                dc_f = d1[:, None] + (2.0 * d2)[:, None] * c_f - g_f
                _direction_backward(
                    f_b,
                    df_ptr + b * C * N,
                    ut_base,
                    du_row,
                    c_f,
                    dc_f,
                    inv_f,
                    norm_f,
                    offs_r,
                    mask_r,
                    offs_n,
                    mask_n,
                    C,
                    stride_fc,
                    N,
                    stride_ur,
                    eps,
                    INT64,
                    BLOCK_C,
                    BLOCK_R,
                    BLOCK_N,
                )
        if ONE_PASS:
            tl.store(
                du_row + offs_r[:, None] * stride_ur + offs_c1[None, :],
                du_acc,
                mask=mask_r[:, None] & (offs_c1 < stride_ur)[None, :],
            )


# (BLOCK_N, BLOCK_C, num_warps) by (kernel, low-precision input, BLOCK_R). Picked from sweeps
# (BLOCK_N 32…256 × BLOCK_C 16/32/64 × 4/8/16 warps, compiled for sm_80 and sm_90 with
# e2pa_kernels._compile.report): spill-free on both archs for the 32-bit and the 64-bit offset
# variant, with 16-byte loads; <= 240 registers where possible; then the largest BLOCK_N·BLOCK_C, the
# larger BLOCK_N, fewer registers. fp32 ("ieee") dots run on CUDA cores, whose operand layout holds a
# K-strip per thread: that (and ptxas capping some 8-warp variants at 128 registers, with spills) is
# what limits the fp32 tiles; the backward's U·dc has K = BLOCK_R. The low-precision (fp16/bf16)
# kernels are memory-bound; fp32 ones are bound by CUDA-core FMAs (r FMAs per loaded element and
# vector in the forward, ~3r in the backward). `python -m e2pa_kernels._compile` prints the registers.
# Triton 3.6 (ptxas 12.8 for sm_90 too) spilled the fp32 forward at BLOCK_R = 32 with (128, 16, 8) (16 B; 24 B
# with 64-bit offsets) and the fp32 backward at BLOCK_R = 16 with 64-bit offsets (32 B): the entries below and
# the INT64 ones for them spill at neither 3.6 nor 3.9 (sm_80, sm_90).
_GPU_CONFIGS = {
    ("fwd", False, 16): (256, 16, 8),
    ("fwd", False, 32): (64, 16, 8),
    ("fwd", False, 64): (64, 16, 8),
    ("fwd", True, 16): (256, 32, 8),
    ("fwd", True, 32): (256, 16, 8),
    ("fwd", True, 64): (128, 32, 8),
    ("bwd", False, 16): (64, 32, 8),
    ("bwd", False, 32): (128, 16, 8),
    ("bwd", False, 64): (32, 16, 8),
    ("bwd", True, 16): (256, 16, 8),
    ("bwd", True, 32): (128, 16, 8),
    ("bwd", True, 64): (64, 16, 8),
}
# The 64-bit offset variant (one [C, N] slab past 2^31 elements) where the table above would spill.
_GPU_CONFIGS_INT64 = {
    ("bwd", True, 16): (128, 32, 8),
    ("bwd", True, 32): (32, 32, 4),
    ("bwd", True, 64): (32, 16, 4),
    ("fwd", False, 32): (64, 16, 4),
    ("bwd", False, 16): (64, 16, 8),
}


# The one-pass backward (ONE_PASS: each vector's whole channel axis in one resident tile) where C <= 64:
# (BLOCK_N, num_warps) by (low-precision input, BLOCK_R, BLOCK_C); the fused tile, one modality's tile,
# its gradient, the coefficient tiles and the dU accumulator [BLOCK_R, BLOCK_C] live in registers.
# Compiled spill-free for sm_80 and sm_90 (the registered variants).
ONE_PASS_MAX_CHANNELS = 64
# (low-precision, BLOCK_R, BLOCK_C) -> (BLOCK_N, num_warps); at the next larger BLOCK_N each of these spilled
# on sm_80 or sm_90 (e.g. fp32 r16 × C64 at 32 voxels: 56 bytes; fp16 r32 × C32 at 64: 400 bytes; fp16 r16 ×
# C16 at 64 voxels 180 bytes, where C32 at 64 voxels fits: the small dot's layout costs registers).
# None: no one-pass variant there (the two-pass kernel runs): fp32 r32 × C64 and fp16/bf16 except r16 × C32/C64
# compiled without 16-byte global loads at the voxel tiles that fit the registers.
_ONE_PASS_GPU_CONFIGS = {
    (False, 16, 16): (64, 8),
    (False, 16, 32): (32, 8),
    (False, 16, 64): (16, 8),
    (False, 32, 32): (32, 8),
    (False, 32, 64): None,
    (False, 64, 64): (16, 8),
    (True, 16, 16): None,
    (True, 16, 32): (64, 8),
    (True, 16, 64): (64, 8),
    (True, 32, 32): None,
    (True, 32, 64): None,
    (True, 64, 64): None,
}


def _triton_config(
    r: int, dtype: torch.dtype, kernel: str, int64: bool = False, interpret: bool | None = None, C: int | None = None
) -> dict:
    """Block sizes for ``kernel`` ("fwd"/"bwd"); the 64-bit offset variant has its own table where
    its wider offsets need smaller tiles; the backward reads each vector once (ONE_PASS) where its C
    channels fit one tile. The interpreter gets small blocks so that test sizes span several voxel and
    channel blocks (loops and tail masks run); its one-pass limit is 20 channels (both paths tested)."""
    block_r = max(16, next_pow2(r))
    interp = small_interpreter_blocks() if interpret is None else interpret
    limit = 20 if interp else ONE_PASS_MAX_CHANNELS
    one_pass = kernel == "bwd" and not int64 and C is not None and C <= limit
    block_c1 = max(16, next_pow2(C)) if one_pass else None
    if one_pass and not interp and _ONE_PASS_GPU_CONFIGS[(dtype != torch.float32, block_r, block_c1)] is None:
        one_pass, block_c1 = False, None
    if interp:
        return dict(BLOCK_R=block_r, BLOCK_N=32, BLOCK_C=block_c1 or 16, num_warps=4, ONE_PASS=one_pass)
    if one_pass:
        block_n, warps = _ONE_PASS_GPU_CONFIGS[(dtype != torch.float32, block_r, block_c1)]  # r <= C
        return dict(BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_C=block_c1, num_warps=warps, ONE_PASS=True)
    key = (kernel, dtype != torch.float32, block_r)
    block_n, block_c, warps = (_GPU_CONFIGS_INT64.get(key) if int64 else None) or _GPU_CONFIGS[key]
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps, ONE_PASS=False)


def _block_l(M: int) -> int:
    """Rows of the forward's register accumulators (M modalities and the fused feature): 8 up to M = 7, 16 up
    to ``TRITON_MAX_MODALITIES``. Smaller M runs the 8-row kernel (the rows past M + 1 are never stored; their
    updates cost 3 · BLOCK_R per thread and modality next to the BLOCK_N · BLOCK_C · BLOCK_R dot): two
    compiled variants per tile instead of four."""
    return max(8, next_pow2(M + 1))


# The forward at BLOCK_L = 16 (M = 8 … 15: three [16, BLOCK_R] accumulators) where the tiles above spill:
# (BLOCK_N, BLOCK_C, num_warps, maxnreg) by (low-precision input, BLOCK_R), 32- and 64-bit offsets alike.
# fp32 r 17 … 32 (Triton 3.9): at (64, 16, 8) ptxas took 128 registers and spilled 16-40 bytes, at the int64
# (64, 16, 4) 255 registers and 8 bytes (sm_80); capped at 255 on 8 warps 212 / 211 and int64 214 / 207
# registers (sm_80 / sm_90), spill-free (one program per SM instead of two).
_WIDE_L_GPU_CONFIGS = {(False, 32): (64, 16, 8, 255)}


def _fwd_meta(r: int, M: int, dtype: torch.dtype, int64: bool, interpret: bool | None = None) -> dict:
    """The forward kernel's keyword arguments (constexprs, num_warps, maxnreg): what the launcher passes, and
    what ``gpu_compile_specs`` compiles."""
    interp = small_interpreter_blocks() if interpret is None else interpret
    cfg = _triton_config(r, dtype, "fwd", int64, interp)
    cfg.pop("ONE_PASS")
    block_l = _block_l(M)
    wide = None if interp or block_l < 16 else _WIDE_L_GPU_CONFIGS.get((dtype != torch.float32, cfg["BLOCK_R"]))
    if wide is not None:
        block_n, block_c, warps, maxnreg = wide
        cfg.update(BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps, maxnreg=maxnreg)
    return dict(INT64=int64, BLOCK_L=block_l, **cfg)


def _bwd_meta(r: int, C: int, dtype: torch.dtype, int64: bool, interpret: bool | None = None) -> dict:
    """The backward kernel's keyword arguments (constexprs, num_warps)."""
    return dict(INT64=int64, **_triton_config(r, dtype, "bwd", int64, interpret, C=C))


def _slab_needs_int64(x: torch.Tensor, fused: torch.Tensor) -> bool:
    """Whether offsets inside one [C, N] slab (of x, fused or their contiguous gradients) pass 2^31;
    the kernels compute per-sample / per-modality base offsets in int64 anyway. Voxel indices
    themselves stay int32 (N < 2^31 - 256, checked here)."""
    C, N = x.shape[2:]
    if N >= 2**31 - 256:
        raise ValueError(f"{OP}: the Triton kernels take fewer than 2^31 - 256 voxels per sample; got {N}")
    return needs_int64(x[0, 0], fused[0]) or C * N > 2**31 - 1


def _grid(x: torch.Tensor, N: int, block_n: int) -> tuple[int, int]:
    """(programs per sample, tiles per sample): persistent programs spread over the batch."""
    B = x.shape[0]
    tiles_n = cdiv(N, block_n)
    total = persistent_programs(x.device, tiles_n * B)
    return max(1, min(tiles_n, cdiv(total, B))), tiles_n


def _row_stride(C: int) -> int:
    """Row stride of Uᵀ and of the dU partial rows: C rounded up to 16 elements, so that the JIT sees
    an aligned stride and loads both 16 bytes wide (the padding is zero, or never read)."""
    return cdiv(C, 16) * 16


def _basis_t(basis: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uᵀ as [B|1, r, row stride] in the features' dtype (the reference's ``basis.to(x.dtype)``);
    tiny, so the copy costs nothing."""
    Bb, C, r = basis.shape
    ut = torch.zeros((Bb, r, _row_stride(C)), dtype=dtype, device=basis.device)
    ut[..., :C] = basis.detach().transpose(1, 2)
    return ut


# --------------------------------------------------------------------------------------------------
# Launchers (public; the autograd Function below calls them)
# --------------------------------------------------------------------------------------------------
def factor_align_fwd(x: torch.Tensor, fused: torch.Tensor, basis: torch.Tensor, eps: float):
    """Launch the forward kernel (every vector streamed once; reductions in registers, per-program
    partials summed in a fixed order).

    Args:
        x: ``[B, M, C, N]`` features, unit stride along N. fused: ``[B, C, N]``, unit stride along N,
        x's dtype. basis: ``[B|1, C, r]`` (r <= ``TRITON_MAX_RANK``), any float dtype. eps: the norm clamp.

    Returns:
        ``(dist [B, M], mom1 [B, M+1, r], mom2 [B, M+1, r])`` in x's dtype.
    """
    B, M, C, N = x.shape
    r = basis.shape[2]
    if B == 0:
        return _empty_outputs(x, M, r)
    meta = _fwd_meta(r, M, x.dtype, _slab_needs_int64(x, fused))
    programs, tiles_n = _grid(x, N, meta["BLOCK_N"])
    ut = _basis_t(basis, x.dtype)
    dist_p = torch.empty((B, programs, M), dtype=torch.float32, device=x.device)
    mom1_p = torch.empty((B, programs, M + 1, r), dtype=torch.float32, device=x.device)
    mom2_p = torch.empty((B, programs, M + 1, r), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _factor_align_fwd_kernel[(programs, B)](
            x,
            fused,
            ut,
            dist_p,
            mom1_p,
            mom2_p,
            N,
            C,
            r,
            M,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            fused.stride(0),
            fused.stride(1),
            ut.stride(0) if ut.shape[0] > 1 else 0,
            ut.stride(1),
            tiles_n,
            float(eps),
            **meta,
        )
    # fixed-order sums of the per-program partials: deterministic
    return dist_p.sum(1).to(x.dtype), mom1_p.sum(1).to(x.dtype), mom2_p.sum(1).to(x.dtype)


def factor_align_bwd(
    x: torch.Tensor,
    fused: torch.Tensor,
    basis: torch.Tensor,
    eps: float,
    d_dist: torch.Tensor | None,
    d_mom1: torch.Tensor | None,
    d_mom2: torch.Tensor | None,
):
    """Launch the backward kernel (recompute each vector's coefficients, then write its gradient and
    the dU partials; deterministic two-stage reduction).

    Args:
        x, fused, basis, eps: as in :func:`factor_align_fwd`.
        d_dist: ``[B, M]``, d_mom1 / d_mom2: ``[B, M+1, r]`` upstream gradients, or None (= 0).

    Returns:
        ``(dx [B, M, C, N], dfused [B, C, N], dbasis [B|1, C, r] fp32)``.
    """
    B, M, C, N = x.shape
    r = basis.shape[2]
    if B == 0:
        return torch.zeros_like(x), torch.zeros_like(fused), torch.zeros_like(basis, dtype=torch.float32)
    cfg = _bwd_meta(r, C, x.dtype, _slab_needs_int64(x, fused))
    programs, tiles_n = _grid(x, N, cfg["BLOCK_N"])
    ut = _basis_t(basis, x.dtype)
    d_dist, d_mom1, d_mom2 = _upstream(x, r, d_dist, d_mom1, d_mom2, torch.float32)
    dx = torch.empty((B, M, C, N), dtype=x.dtype, device=x.device)
    dfused = torch.empty((B, C, N), dtype=fused.dtype, device=x.device)
    # one pass: every program (each has a tile) stores its whole dU row at its end, no zero-fill
    partial = torch.empty if cfg["ONE_PASS"] and tiles_n > 0 else torch.zeros
    du_partial = partial((B, programs, r, ut.shape[2]), dtype=torch.float32, device=x.device)
    with device_guard(x):
        _factor_align_bwd_kernel[(programs, B)](
            x,
            fused,
            ut,
            d_dist,
            d_mom1,
            d_mom2,
            dx,
            dfused,
            du_partial,
            N,
            C,
            r,
            M,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            fused.stride(0),
            fused.stride(1),
            ut.stride(0) if ut.shape[0] > 1 else 0,
            ut.stride(1),
            tiles_n,
            float(eps),
            **cfg,
        )
    du = du_partial.sum(1)[..., :C].transpose(1, 2)  # [B, C, r], fixed-order sum of the partials
    return dx, dfused, (du if basis.shape[0] == B else du.sum(0, keepdim=True))


def _empty_outputs(x, M, r):
    B = x.shape[0]
    return (x.new_zeros((B, M)), x.new_zeros((B, M + 1, r)), x.new_zeros((B, M + 1, r)))


def _upstream(x, r, d_dist, d_mom1, d_mom2, dtype):
    """Upstream gradients as contiguous ``dtype`` tensors; zeros stand in for outputs without one."""
    B, M = x.shape[:2]
    zeros = lambda *shape: torch.zeros(shape, dtype=dtype, device=x.device)  # noqa: E731
    d_dist = zeros(B, M) if d_dist is None else d_dist.to(dtype).contiguous()
    d_mom1 = zeros(B, M + 1, r) if d_mom1 is None else d_mom1.to(dtype).contiguous()
    d_mom2 = zeros(B, M + 1, r) if d_mom2 is None else d_mom2.to(dtype).contiguous()
    return d_dist, d_mom1, d_mom2


# --------------------------------------------------------------------------------------------------
# Memory-lean PyTorch path: the same math and backward, in voxel chunks
# --------------------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 18  # elements of one [B, L, C, n] chunk temporary (1 MiB in fp32)


def _chunks(B: int, L: int, C: int, r: int, N: int):
    return voxel_chunks(N, B * L * max(C, r), _CHUNK_ELEMENTS)


def _torch_basis(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """U [B|1, 1, C, r] in the accumulation dtype, rounded to x's dtype first (as the reference does);
    the singleton axis broadcasts over the vectors of a sample in ``matmul``."""
    return basis.to(x.dtype).to(accumulation_dtype(x)).unsqueeze(1)


def _torch_coefficients(v: torch.Tensor, U: torch.Tensor, eps: float):
    """v [B, L, C, n] (accumulation dtype; any stride along n) → c [B, L, r, n], inv and ‖v‖ [B, L, 1, n].
    ``matmul`` batches over (B, L) and reads v in place (an einsum would permute it into a copy);
    ``square().sum()`` is ~15× faster than ``vector_norm`` over this strided axis on CPU."""
    norm = v.square().sum(dim=2, keepdim=True).sqrt_()
    inv = torch.where(norm > 0, 1.0 / norm.clamp_min(eps), torch.zeros_like(norm))
    return torch.matmul(U.transpose(2, 3), v).mul_(inv), inv, norm


def _torch_forward(x, fused, basis, eps):
    B, M, C, N = x.shape
    r = basis.shape[2]
    acc = accumulation_dtype(x)
    U = _torch_basis(basis, x)
    dist = torch.zeros((B, M), dtype=acc, device=x.device)
    mom1 = torch.zeros((B, M + 1, r), dtype=acc, device=x.device)
    mom2 = torch.zeros((B, M + 1, r), dtype=acc, device=x.device)
    for s, e in _chunks(B, M + 1, C, r, N):
        c_m = _torch_coefficients(x[..., s:e].to(acc), U, eps)[0]
        c_f = _torch_coefficients(fused[:, None, :, s:e].to(acc), U, eps)[0]
        dist += (c_m - c_f).square_().sum(dim=(2, 3))
        mom1[:, :M] += c_m.sum(dim=3)
        mom1[:, M:] += c_f.sum(dim=3)
        mom2[:, :M] += c_m.square_().sum(dim=3)
        mom2[:, M:] += c_f.square_().sum(dim=3)
    return dist.to(x.dtype), mom1.to(x.dtype), mom2.to(x.dtype)


def _torch_direction_backward(v, c, dc, inv, norm, U, eps):
    """dv = U·(dc·inv) − v·k with k = inv²·(c·dc) where ‖v‖ ≥ eps (else 0), and this chunk's
    dU = Σ_{l,n} v (dc·inv)ᵀ [B, C, r] (v̂ dcᵀ, with the small factor moved onto dc)."""
    k = torch.where(norm >= eps, inv * inv * (c * dc).sum(dim=2, keepdim=True), torch.zeros_like(norm))
    dci = dc * inv
    dv = torch.matmul(U, dci).addcmul_(v, k, value=-1.0)
    return dv, torch.matmul(v, dci.transpose(2, 3)).sum(dim=1)


def _torch_backward(x, fused, basis, eps, d_dist, d_mom1, d_mom2):
    B, M, C, N = x.shape
    r = basis.shape[2]
    acc = accumulation_dtype(x)
    U = _torch_basis(basis, x)
    d_dist, d_mom1, d_mom2 = _upstream(x, r, d_dist, d_mom1, d_mom2, acc)
    dx = torch.empty((B, M, C, N), dtype=x.dtype, device=x.device)
    dfused = torch.empty((B, C, N), dtype=fused.dtype, device=x.device)
    du = torch.zeros((B, C, r), dtype=acc, device=x.device)
    for s, e in _chunks(B, M + 1, C, r, N):
        xs, fs = x[..., s:e].to(acc), fused[:, None, :, s:e].to(acc)
        c_m, inv_m, norm_m = _torch_coefficients(xs, U, eps)
        c_f, inv_f, norm_f = _torch_coefficients(fs, U, eps)
        diff = 2.0 * d_dist[:, :, None, None] * (c_m - c_f)
        dc_m = diff + d_mom1[:, :M, :, None] + 2.0 * d_mom2[:, :M, :, None] * c_m
        dc_f = d_mom1[:, M:, :, None] + 2.0 * d_mom2[:, M:, :, None] * c_f - diff.sum(dim=1, keepdim=True)
        dx[..., s:e], du_m = _torch_direction_backward(xs, c_m, dc_m, inv_m, norm_m, U, eps)
        df, du_f = _torch_direction_backward(fs, c_f, dc_f, inv_f, norm_f, U, eps)
        dfused[..., s:e] = df[:, 0]
        du += du_m + du_f
    return dx, dfused, (du if basis.shape[0] == B else du.sum(0, keepdim=True))


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------
# Registered as torch.library custom ops (forward and backward): one opaque node each for
# torch.compile, shapes from the fake implementations, the hand-written backward for autograd.
# x [B, M, C, N], fused [B, C, N] (unit stride along N), basis [B|1, C, r] (any float dtype).
# Saved for backward: the inputs only.
# the schema spelled out (not inferred from the postponed annotations of this module)
@torch.library.custom_op(
    "e2pa::factor_align",
    mutates_args=(),
    schema=("(Tensor x, Tensor fused, Tensor basis, float eps, bool use_triton) -> (Tensor, Tensor, Tensor)"),
)
def _factor_align_op(
    x: torch.Tensor, fused: torch.Tensor, basis: torch.Tensor, eps: float, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dist [B, M], mom1 / mom2 [B, M+1, r] in x's dtype."""
    fwd = factor_align_fwd if use_triton else _torch_forward
    return fwd(voxels_last(x, 3), voxels_last(fused, 2), basis, eps)


@_factor_align_op.register_fake
def _(x, fused, basis, eps, use_triton):
    B, M = x.shape[:2]
    r = basis.shape[2]
    return x.new_empty((B, M)), x.new_empty((B, M + 1, r)), x.new_empty((B, M + 1, r))


@torch.library.custom_op(
    "e2pa::factor_align_backward",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor fused, Tensor basis, Tensor? d_dist, Tensor? d_mom1, Tensor? d_mom2, float eps, "
        "bool use_triton) -> (Tensor, Tensor, Tensor)"
    ),
)
def _factor_align_backward_op(
    x: torch.Tensor,
    fused: torch.Tensor,
    basis: torch.Tensor,
    d_dist: torch.Tensor | None,
    d_mom1: torch.Tensor | None,
    d_mom2: torch.Tensor | None,
    eps: float,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx [B, M, C, N], dfused [B, C, N] (x's and fused's dtypes), dbasis [B|1, C, r] (basis's dtype)."""
    bwd = factor_align_bwd if use_triton else _torch_backward
    dx, dfused, dbasis = bwd(voxels_last(x, 3), voxels_last(fused, 2), basis, eps, d_dist, d_mom1, d_mom2)
    return dx, dfused, dbasis.to(basis.dtype)


@_factor_align_backward_op.register_fake
def _(x, fused, basis, d_dist, d_mom1, d_mom2, eps, use_triton):
    return x.new_empty(x.shape), fused.new_empty(fused.shape), basis.new_empty(basis.shape)


def _factor_align_setup_context(ctx, inputs, output):
    x, fused, basis, eps, use_triton = inputs
    ctx.save_for_backward(x, fused, basis)
    ctx.eps, ctx.use_triton = eps, use_triton
    ctx.set_materialize_grads(False)


def _factor_align_backward(ctx, d_dist, d_mom1, d_mom2):
    x, fused, basis = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if (d_dist is None and d_mom1 is None and d_mom2 is None) or not any(needs[:3]):
        return (None,) * 5
    dx, dfused, dbasis = _factor_align_backward_op(x, fused, basis, d_dist, d_mom1, d_mom2, ctx.eps, ctx.use_triton)
    return (dx if needs[0] else None, dfused if needs[1] else None, dbasis if needs[2] else None, None, None)


_factor_align_op.register_autograd(_factor_align_backward, setup_context=_factor_align_setup_context)


def check_inputs(x, fused, basis, eps):
    """Validate :func:`factor_align`'s arguments; returns ``(eps, r)``."""
    check_tensor(OP, "x", x, min_ndim=4)
    check_tensor(OP, "fused", fused, min_ndim=3)
    check_tensor(OP, "basis", basis, min_ndim=2, max_ndim=3)
    eps = check_finite_scalar(OP, "eps", eps, positive=True)
    check_same_device(OP, x=x, fused=fused, basis=basis)
    B, M, C = x.shape[:3]
    if M < 1:
        raise ValueError(f"{OP}: x must be [B, M, C, *S] with at least one modality; got shape {list(x.shape)}")
    if fused.dtype != x.dtype:
        raise TypeError(
            f"{OP}: fused must have x's dtype {str(x.dtype).replace('torch.', '')}; "
            f"got {str(fused.dtype).replace('torch.', '')}"
        )
    expected = (B, C, *x.shape[3:])
    if tuple(fused.shape) != expected:
        raise ValueError(
            f"{OP}: fused must have shape [B, C, *S] = {list(expected)} (x's batch, channel and "
            f"spatial axes); got {list(fused.shape)}"
        )
    Cb, r = basis.shape[-2:]
    if Cb != C or (basis.dim() == 3 and basis.shape[0] != B):
        layout = f"[C, r] or [B, C, r] with B = {B}, C = {C}"
        raise ValueError(f"{OP}: basis must have shape {layout} (x's batch and channels); got {list(basis.shape)}")
    if not 1 <= r <= C:
        raise ValueError(f"{OP}: basis rank r must satisfy 1 <= r <= C = {C}; got r = {r}")
    return eps, r


def factor_align(x: torch.Tensor, fused: torch.Tensor, basis: torch.Tensor, eps: float = 1e-6):
    """How far each modality's direction is from the fused feature's, inside the factors of ``basis``.

    Per voxel, ``c = Uᵀv / max(‖v‖, eps)`` for every modality and the fused feature (``c = 0`` with
    zero gradient where ``v = 0``); nothing of size ``N`` is stored or saved.

    Args:
        x: ``[B, M, C, *S]`` modality features, float16/bfloat16/float32/float64; non-contiguous fine.
        fused: ``[B, C, *S]`` fused feature, x's dtype.
        basis: ``[B, C, r]`` per-sample or ``[C, r]`` shared factors (orthonormal columns, e.g. from
            :func:`factor_basis` or :func:`orthonormalize`), ``1 <= r <= C``; the Triton kernels take
            ``r <= 64`` (``auto`` runs larger ranks on the torch path).
        eps: the norm clamp, a positive float.

    Returns:
        ``dist`` ``[B, M]`` = Σ_v ‖c_m − c_F‖², ``mom1`` ``[B, M+1, r]`` = Σ_v c and ``mom2`` = Σ_v c²
        (index M is the fused feature), in x's dtype; differentiable in x, fused and basis. Note that
        they are sums over voxels: float16 overflows past 65504 (divide by N in float32 upstream).
    """
    eps, r = check_inputs(x, fused, basis, eps)
    backend = select_backend(
        x,
        fused,
        basis,
        triton_limit=(
            f"{OP}: the Triton kernels take rank r <= {TRITON_MAX_RANK}; got r = {r}"
            if r > TRITON_MAX_RANK
            else f"{OP}: the Triton kernels take M <= {TRITON_MAX_MODALITIES} modalities; got M = {x.shape[1]}"
            if x.shape[1] > TRITON_MAX_MODALITIES
            else None
        ),
    )
    if backend == "reference":
        return reference.factor_align(x, fused, basis, eps)
    x4 = voxels_last(x, 3)
    f3 = voxels_last(fused, 2)
    basis3 = basis if basis.dim() == 3 else basis.unsqueeze(0)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _factor_align_op(x4, f3, basis3, eps, backend == "triton")


# --------------------------------------------------------------------------------------------------
# factor_basis: top-r eigenvectors of the per-sample second moment of the normalised fused feature
# --------------------------------------------------------------------------------------------------
# Gram matrix G = (1/N) Σ_v f̂ f̂ᵀ: a chunked batched matmul in float64, then a float64 symmetric
# eigendecomposition of [B, C, C]:
# - triton (CUDA by default): the cyclic Jacobi kernel of `symeig` (one program per sample, convergence
#   decided on the device): no host read, so a training step can be captured in a CUDA graph. cuSOLVER's
#   `eigh` (syevd) would check its `info` on the host, one stream synchronisation per ESA level.
#   C <= symeig.TRITON_MAX_N; wider levels run `eigh` (auto) or raise (an explicit "triton" request).
# - torch (CPU by default): LAPACK `eigh`. Its info check reads host memory, which on CPU is no device
#   synchronisation (the sync counter still lists the op: it cannot tell CPU from CUDA by name).
# - The Gram matrix is 2·N·C² flops, ≤ 1 GFLOP per sample at the ESA levels (the deepest: 8³…32³
#   voxels), i.e. tens of microseconds on float64 tensor cores (A100 19.5, H100 67 TFLOP/s; ~1 ms where
#   float64 runs at 1/64 rate). A fused Triton Gram would save one read of f in an op that runs once per
#   forward.
# - float64 keeps the eigenvectors independent of TF32 settings and of the chunking, and equal to the
#   float64 reference's even for close eigenvalues (error ≈ rounding / eigengap); bmm is
#   deterministic for fixed shapes. Measured on CPU (1 thread, B = 1): 32³ × C128: Gram 107 ms in
#   float64 (18 ms float32), eigh 1.5 ms; 16³ × C256: 14.5 (6.9) and 7.1 ms; 8³ × C320: 2.9 (1.1)
#   and 9.9 ms. So on CPU float64 costs up to ~6× on the Gram at the larger levels: accepted for a
#   basis that must not change with precision flags (CPU runs are tests and small inference).
# - Chunking over voxels bounds the float64 temporaries (two of _BASIS_CHUNK_ELEMENTS, 32 MiB each).
_BASIS_CHUNK_ELEMENTS = 1 << 22
BASIS_METHODS = ("eigh",)


def _second_moment(fused3: torch.Tensor, eps: float) -> torch.Tensor:
    """(1/N) Σ_v f̂ f̂ᵀ in float64 for fused [B, C, N]; f̂ = f / max(‖f‖, eps), 0 where f = 0."""
    B, C, N = fused3.shape
    gram = torch.zeros((B, C, C), dtype=torch.float64, device=fused3.device)
    step = max(1, _BASIS_CHUNK_ELEMENTS // max(1, B * C))
    for s in range(0, N, step):
        f = fused3[..., s : s + step].double()
        norm = f.square().sum(dim=1, keepdim=True).sqrt_()
        f_hat = f * torch.where(norm > 0, 1.0 / norm.clamp_min(eps), torch.zeros_like(norm))
        gram += f_hat @ f_hat.transpose(1, 2)
    return gram / max(N, 1)


def factor_basis(fused: torch.Tensor, rank: int, method: str = "eigh") -> torch.Tensor:
    """Top-``rank`` eigenvectors of ``(1/N) Σ_v f̂ f̂ᵀ`` per sample (``f̂`` the unit-norm fused feature).

    Args:
        fused: ``[B, C, *S]`` fused feature, any float dtype.
        rank: ``1 <= rank <= C``.
        method: ``"eigh"`` (float64 second moment, float64 symmetric eigendecomposition).

    Returns:
        ``[B, C, rank]`` in fused's dtype, orthonormal columns ordered by decreasing eigenvalue; the
        sign of each column makes its largest-magnitude entry positive (deterministic). No gradient.
        A sample with non-finite features gets NaN columns (NaN propagates; eigh would raise).

    Backends (:func:`~e2pa_kernels.select_backend`): ``triton`` (CUDA by default) — the Jacobi kernel of
    :mod:`e2pa_kernels.symeig`, no host read (C <= ``symeig.TRITON_MAX_N``; wider levels fall back to
    ``torch``); ``torch`` — LAPACK/cuSOLVER ``torch.linalg.eigh``, whose status check is a host read
    (on CPU a read of host memory, not a device synchronisation; on CUDA a stream synchronisation);
    ``reference`` — :func:`e2pa_kernels.reference.factor_basis`.
    """
    name = "factor_basis"
    check_tensor(name, "fused", fused, min_ndim=3)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name}: rank must be an int; got {type(rank).__name__}")
    C = fused.shape[1]
    if not 1 <= rank <= C:
        raise ValueError(f"{name}: rank must satisfy 1 <= rank <= C = {C} (fused's channels); got {rank}")
    if method not in BASIS_METHODS:
        raise ValueError(f"{name}: method must be one of {', '.join(BASIS_METHODS)}; got {method!r}")
    if requested_backend() == "reference":
        return reference.factor_basis(fused, rank)
    with torch.no_grad():
        gram = _second_moment(voxels_last(fused.detach(), 2), 1e-6)
        limit = (
            f"{name}: the Jacobi kernel takes C <= {symeig.TRITON_MAX_N} channels; got C = {C}"
            if C > symeig.TRITON_MAX_N
            else None
        )
        if select_backend(gram, triton_limit=limit, dtypes=(torch.float64,)) == "triton":
            return symeig.top_eigenvectors(gram, rank).to(fused.dtype)
        return reference.top_eigenvectors(gram, rank).to(fused.dtype)


def orthonormalize(basis: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``basis`` ``[C, r]`` or ``[B, C, r]`` (``r <= C``), for a learned basis.

    Reduced QR with ``R``'s diagonal made non-negative (column j of the result has a non-negative inner
    product with column j of the input), so the result is unique, deterministic and an orthonormal
    input comes back unchanged. Differentiable (through ``torch.linalg.qr``); float16/bfloat16 inputs
    are orthonormalised in float32 and returned in their own dtype.
    """
    name = "orthonormalize"
    check_tensor(name, "basis", basis, min_ndim=2, max_ndim=3)
    C, r = basis.shape[-2:]
    if not 1 <= r <= C:
        raise ValueError(f"{name}: basis must be [C, r] or [B, C, r] with 1 <= r <= C; got {list(basis.shape)}")
    work = basis if basis.dtype in (torch.float32, torch.float64) else basis.float()
    q, rr = torch.linalg.qr(work, mode="reduced")
    diag = torch.diagonal(rr, dim1=-2, dim2=-1)
    sign = torch.where(diag < 0, -1.0, 1.0).to(q.dtype).detach()
    return (q * sign.unsqueeze(-2)).to(basis.dtype)


# --------------------------------------------------------------------------------------------------
# GPU compile variants (tests compile each for sm_80 / sm_90 and check spills and load widths)
# --------------------------------------------------------------------------------------------------
# Arguments the kernels only use in 64-bit arithmetic whatever their own width (per-sample and per-modality
# base strides: multiplied by the int64 sample index or added to a pointer): the JIT types them i64 past 2^31
# without INT64 (which widens the offsets inside one [C, N] slab only); the code differs by a sign extension.
WIDENED_ARGS = ("stride_xb", "stride_xm", "stride_fb", "stride_ub")
_ALIGNED = ("N", "stride_xb", "stride_xm", "stride_xc", "stride_fb", "stride_fc", "stride_ur")


def gpu_compile_specs() -> list[KernelSpec]:
    """Every variant the launchers can pick, from their own ``_fwd_meta`` / ``_bwd_meta``: fp32 / fp16 / bf16
    × every rank r up to ``TRITON_MAX_RANK`` (BLOCK_R 16 / 32 / 64) × every C >= r (the backward's one-pass
    tiles BLOCK_C 16 / 32 / 64 where ``_ONE_PASS_GPU_CONFIGS`` has one; C = ``ONE_PASS_MAX_CHANNELS`` + 1
    stands for all wider ones) × every M up to ``TRITON_MAX_MODALITIES`` (the forward's BLOCK_L 8 / 16)
    × 32- and 64-bit slab offsets (INT64; the one-pass backward is not picked with them). No optional inputs."""
    if triton is None:
        return []
    specs = []
    for dtype, ty in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for int64 in (False, True):
            metas = []
            for r in range(1, TRITON_MAX_RANK + 1):
                metas += [("fwd", _fwd_meta(r, M, dtype, int64, False)) for M in range(1, TRITON_MAX_MODALITIES + 1)]
                metas += [("bwd", _bwd_meta(r, C, dtype, int64, False)) for C in range(r, ONE_PASS_MAX_CHANNELS + 2)]
            for name, meta in dict.fromkeys((name, tuple(meta.items())) for name, meta in metas):
                specs.append(_spec(name, ty, dict(meta)))
    return specs


def _spec(name: str, ty: str, meta: dict) -> KernelSpec:
    kernel = _factor_align_fwd_kernel if name == "fwd" else _factor_align_bwd_kernel
    constexprs, warps, maxnreg = split_meta(meta)
    sig = _signature(kernel, ty, "i64" if constexprs["INT64"] else "i32")
    return KernelSpec(
        label=spec_label(OP, name, ty, constexprs, (), warps=warps, maxnreg=maxnreg),
        kernel=kernel,
        signature=sig,
        constexprs=constexprs,
        num_warps=warps,
        maxnreg=maxnreg,
        aligned=tuple(a for a in sig if a.endswith("_ptr") or a in _ALIGNED),
    )


def _signature(kernel, ty: str, index: str) -> dict[str, str]:
    base = {
        "x_ptr": f"*{ty}",
        "f_ptr": f"*{ty}",
        "ut_ptr": f"*{ty}",
        "dist_ptr": "*fp32",
        "mom1_ptr": "*fp32",
        "mom2_ptr": "*fp32",
        "d_dist_ptr": "*fp32",
        "d_mom1_ptr": "*fp32",
        "d_mom2_ptr": "*fp32",
        "dx_ptr": f"*{ty}",
        "df_ptr": f"*{ty}",
        "du_partial_ptr": "*fp32",
        "N": index,
        "C": "i32",
        "R": "i32",
        "M": "i32",
        "stride_xb": index,
        "stride_xm": index,
        "stride_xc": index,
        "stride_fb": index,
        "stride_fc": index,
        "stride_ub": index,
        "stride_ur": "i32",
        "tiles_n": "i32",
        "eps": "fp32",
    }
    return {a: base.get(a, "constexpr") for a in kernel.arg_names}
