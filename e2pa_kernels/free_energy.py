"""Op 1 — ``free_energy``: per-voxel, per-modality free energy of a linear classifier head.

Math (``docs/method.md``), per voxel n and modality m, with ``x ∈ R^C``::

    z      = W·x + b                       K logits (never written to memory)
    energy = -T · logsumexp_k(z / T)
    ce     = logsumexp_k(z) - z[target]    (0 where target == ignore_index)

VJP, with ``s_T = softmax(z / T)`` and ``s_1 = softmax(z)``::

    dz = -d_energy · s_T + d_ce · (s_1 - onehot(target))       [K]   (d_ce term 0 where ignored)
    dx = Wᵀ dz                                                  [C]
    dW = Σ_{b,m,n} dz xᵀ                                        [K, C]
    db = Σ_{b,m,n} dz                                           [K]

Three implementations behind one entry point (:func:`free_energy`):
- Triton: the forward streams x once and keeps the logits in registers; the backward recomputes
  them (one pass over x for z, one for dx and dW) and reduces dW/db deterministically: a fixed
  number of persistent programs each owns a row of a partial buffer, summed afterwards in a fixed
  order (no atomics, bit-reproducible).
- torch (memory-lean): the same recompute-in-backward in PyTorch, in voxel chunks; saves only its
  inputs.
- reference: plain autograd (:func:`e2pa_kernels.reference.free_energy`).
"""

from __future__ import annotations

import itertools

import torch

from . import reference
from ._kernel_spec import KernelSpec, heaviest, spec_label, split_meta
from ._runtime import select_backend, small_interpreter_blocks
from ._triton_utils import cdiv, device_guard, head_fp32, next_pow2, persistent_programs
from ._validate import (
    accumulation_dtype,
    check_finite_scalar,
    check_same_device,
    check_shape,
    check_tensor,
    check_values,
    has_modality_axis,
    needs_int64,
    voxel_chunks,
    voxels_last,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is Linux-only; the torch path runs elsewhere
    triton = None

OP = "free_energy"
TRITON_MAX_CLASSES = 64  # logits tile [BLOCK_K, BLOCK_N] lives in registers


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _logits_tile(
        x_base,
        w_ptr,
        b_ptr,
        offs_k,
        mask_k,
        offs_n,
        mask_n,
        C,
        K,
        stride_xc,
        HAS_BIAS: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """z = W·x + b for one [BLOCK_K, BLOCK_N] tile, fp32; padded classes are -inf."""
        tl.static_assert(BLOCK_K >= 16 and BLOCK_C >= 16 and BLOCK_N >= 16)  # tl.dot's minimum on GPUs
        z = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        offs_c = tl.arange(0, BLOCK_C)
        if INT64:
            offs_c = offs_c.to(tl.int64)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            mask_c = cc < C
            x = tl.load(
                x_base + cc[:, None] * stride_xc + offs_n[None, :], mask=mask_c[:, None] & mask_n[None, :], other=0.0
            )
            w = tl.load(w_ptr + offs_k[:, None] * C + cc[None, :], mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            # fp16/bf16 x: tensor-core dot with fp32 accumulation (autocast's numerics);
            # fp32 x: exact fp32 products ("ieee", not tf32).
            z = tl.dot(w.to(x.dtype), x, z, input_precision="ieee")
        if HAS_BIAS:
            z += tl.load(b_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[:, None]
        return tl.where(mask_k[:, None], z, float("-inf"))

    @triton.jit
    def logsumexp_cols(z):
        """(jit building block) logsumexp over axis 0 of a [K, N] tile whose padded rows are -inf."""
        z_max = tl.max(z, axis=0)
        return z_max + tl.log(tl.sum(tl.exp(z - z_max[None, :]), axis=0))

    @triton.jit
    def _read_mask(mask_n, present_ptr, pid_bm, HAS_MASK: tl.constexpr):
        """The voxels of x to read: all valid ones, none when HAS_MASK and present[b·m] is False (an
        absent modality reads as zeros, so its NaN cannot reach the logits)."""
        if HAS_MASK:
            present = tl.load(present_ptr + pid_bm).to(tl.int32)
            mask_n = mask_n & ((mask_n.to(tl.int32) * 0 + present) != 0)  # a [BN] mask: see _gram_pass
        return mask_n

    @triton.jit
    def _free_energy_fwd_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        target_ptr,
        present_ptr,
        energy_ptr,
        ce_ptr,
        N,
        C,
        K,
        M,
        stride_xb,
        stride_xm,
        stride_xc,
        stride_tb,
        temperature,
        ignore_index,
        HAS_BIAS: tl.constexpr,
        HAS_TARGET: tl.constexpr,
        HAS_MASK: tl.constexpr,
        INT64: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Grid (cdiv(N, BLOCK_N), B·M). x [B, M, C, N] (unit stride along N) → energy, ce [B·M, N].
        With HAS_MASK, present [B·M] bool: an absent modality's x is read as zeros."""
        pid_n = tl.program_id(0)
        pid_bm = tl.program_id(1)
        if INT64:
            pid_n = pid_n.to(tl.int64)
            pid_bm = pid_bm.to(tl.int64)
        b = pid_bm // M
        m = pid_bm % M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        z = _logits_tile(
            x_ptr + b * stride_xb + m * stride_xm,
            w_ptr,
            b_ptr,
            offs_k,
            mask_k,
            offs_n,
            _read_mask(mask_n, present_ptr, pid_bm, HAS_MASK),
            C,
            K,
            stride_xc,
            HAS_BIAS,
            INT64,
            BLOCK_C,
            BLOCK_K,
            BLOCK_N,
        )
        energy = -temperature * logsumexp_cols(z / temperature)
        tl.store(energy_ptr + pid_bm * N + offs_n, energy.to(energy_ptr.dtype.element_ty), mask=mask_n)
        if HAS_TARGET:
            target = tl.load(target_ptr + b * stride_tb + offs_n, mask=mask_n, other=ignore_index)
            z_target = tl.sum(tl.where(offs_k[:, None] == target[None, :], z, 0.0), axis=0)
            ce = tl.where(target == ignore_index, 0.0, logsumexp_cols(z) - z_target)
            tl.store(ce_ptr + pid_bm * N + offs_n, ce.to(ce_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _free_energy_bwd_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        target_ptr,
        present_ptr,
        d_energy_ptr,
        d_ce_ptr,
        dx_ptr,
        dw_partial_ptr,
        db_partial_ptr,
        N,
        C,
        K,
        M,
        stride_xb,
        stride_xm,
        stride_xc,
        stride_tb,
        tiles_n,
        tiles,
        temperature,
        ignore_index,
        HAS_BIAS: tl.constexpr,
        HAS_TARGET: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        HAS_MASK: tl.constexpr,
        INT64: tl.constexpr,
        ONE_PASS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Persistent grid (P,). Tiles (b·m, n-block) go round-robin to programs.

        dx [B, M, C, N] contiguous, overwritten, or with ACCUMULATE added to (dx += Wᵀdz: a fused
        layer's other x-gradient terms are already there, so dx is written once, never summed from
        two x-sized buffers); dw_partial [P, K, C] and db_partial [P, K] fp32, row p owned by program p.

        ONE_PASS (BLOCK_C >= C): the tile's x [BLOCK_C, BLOCK_N] is read once and stays in registers for
        the logits, dx and dW; W is loaded once per program and dW accumulates in registers, stored once
        at the end (dw_partial needs no zero-fill). Otherwise two passes over the channel blocks (logits,
        then dx and dW), dw_partial zero-initialised and read-modify-written per tile.
        """
        pid = tl.program_id(0)
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        offs_c = tl.arange(0, BLOCK_C)
        if INT64:
            offs_c = offs_c.to(tl.int64)
        dw_row = dw_partial_ptr + pid * K * C
        db_acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        if ONE_PASS:
            mask_c1 = offs_c < C
            w_all = tl.load(
                w_ptr + offs_k[:, None] * C + offs_c[None, :], mask=mask_k[:, None] & mask_c1[None, :], other=0.0
            )
            bias = tl.zeros((BLOCK_K,), dtype=tl.float32)
            if HAS_BIAS:
                bias = tl.load(b_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            dw_acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        for tile in range(pid, tiles, tl.num_programs(0)):
            pid_bm = tile // tiles_n
            pid_n = tile % tiles_n
            if INT64:
                pid_bm = pid_bm.to(tl.int64)
                pid_n = pid_n.to(tl.int64)
            b = pid_bm // M
            m = pid_bm % M
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            read_n = _read_mask(mask_n, present_ptr, pid_bm, HAS_MASK)
            x_base = x_ptr + b * stride_xb + m * stride_xm
            # pass 1: recompute the logits and form dz
            if ONE_PASS:
                x_all = tl.load(
                    x_base + offs_c[:, None] * stride_xc + offs_n[None, :],
                    mask=mask_c1[:, None] & read_n[None, :],
                    other=0.0,
                )
                z = tl.dot(w_all.to(x_all.dtype), x_all, input_precision="ieee") + bias[:, None]
                z = tl.where(mask_k[:, None], z, float("-inf"))
            else:
                z = _logits_tile(
                    x_base,
                    w_ptr,
                    b_ptr,
                    offs_k,
                    mask_k,
                    offs_n,
                    read_n,
                    C,
                    K,
                    stride_xc,
                    HAS_BIAS,
                    INT64,
                    BLOCK_C,
                    BLOCK_K,
                    BLOCK_N,
                )
            zt = z / temperature
            soft_t = tl.exp(zt - logsumexp_cols(zt)[None, :])
            d_energy = tl.load(d_energy_ptr + pid_bm * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            dz = -d_energy[None, :] * soft_t
            if HAS_TARGET:
                target = tl.load(target_ptr + b * stride_tb + offs_n, mask=mask_n, other=ignore_index)
                d_ce = tl.load(d_ce_ptr + pid_bm * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                d_ce = tl.where(target == ignore_index, 0.0, d_ce)
                soft_1 = tl.exp(z - logsumexp_cols(z)[None, :])
                onehot = (offs_k[:, None] == target[None, :]).to(tl.float32)
                dz += d_ce[None, :] * (soft_1 - onehot)
            dz = tl.where(mask_k[:, None] & mask_n[None, :], dz, 0.0)
            db_acc += tl.sum(dz, axis=1)
            # pass 2: dx = Wᵀ dz, dW += dz xᵀ (VJP of z = W x + b)
            dx_base = dx_ptr + pid_bm * C * N
            if ONE_PASS:
                mask_cn = mask_c1[:, None] & mask_n[None, :]
                dz_lp = dz.to(x_all.dtype)
                dx = tl.dot(tl.trans(w_all).to(x_all.dtype), dz_lp, input_precision="ieee")
                if ACCUMULATE:
                    dx += tl.load(dx_base + offs_c[:, None] * N + offs_n[None, :], mask=mask_cn, other=0.0).to(
                        tl.float32
                    )
                tl.store(dx_base + offs_c[:, None] * N + offs_n[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask_cn)
                dw_acc = tl.dot(dz_lp, tl.trans(x_all), dw_acc, input_precision="ieee")
            else:
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + offs_c
                    mask_c = cc < C
                    mask_cn = mask_c[:, None] & mask_n[None, :]
                    x = tl.load(
                        x_base + cc[:, None] * stride_xc + offs_n[None, :],
                        mask=mask_c[:, None] & read_n[None, :],
                        other=0.0,
                    )
                    w_t = tl.load(
                        w_ptr + offs_k[None, :] * C + cc[:, None], mask=mask_k[None, :] & mask_c[:, None], other=0.0
                    )
                    dz_lp = dz.to(x.dtype)
                    dx = tl.dot(w_t.to(x.dtype), dz_lp, input_precision="ieee")
                    if ACCUMULATE:
                        dx += tl.load(dx_base + cc[:, None] * N + offs_n[None, :], mask=mask_cn, other=0.0).to(
                            tl.float32
                        )
                    tl.store(dx_base + cc[:, None] * N + offs_n[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask_cn)
                    dw_ptrs = dw_row + offs_k[:, None] * C + cc[None, :]
                    mask_kc = mask_k[:, None] & mask_c[None, :]
                    dw = tl.load(dw_ptrs, mask=mask_kc, other=0.0)
                    dw = tl.dot(dz_lp, tl.trans(x), dw, input_precision="ieee")
                    tl.store(dw_ptrs, dw, mask=mask_kc)
        if ONE_PASS:
            tl.store(dw_row + offs_k[:, None] * C + offs_c[None, :], dw_acc, mask=mask_k[:, None] & mask_c1[None, :])
        if HAS_BIAS:
            tl.store(db_partial_ptr + pid * K + offs_k, db_acc, mask=mask_k)


# (BLOCK_N, BLOCK_C, num_warps) by (kernel, low-precision input, BLOCK_K): the largest tiles that
# ptxas fits without spills on sm_90 (sweep over BLOCK_N 64/128, BLOCK_C 16/32/64, 4/8 warps;
# `python -m e2pa_kernels._compile` shows registers and spills of each).
_GPU_CONFIGS = {
    ("fwd", False, 16): (128, 32, 8),
    ("fwd", False, 32): (64, 32, 8),
    ("fwd", False, 64): (64, 32, 8),
    ("fwd", True, 16): (128, 64, 8),
    ("fwd", True, 32): (128, 64, 8),
    ("fwd", True, 64): (64, 64, 8),
    # fp32 K 16: (128, 16, 8) spilled with a mask (the heaviest launch): Triton 3.6, sm_90, 32 bytes at 80
    # registers; 3.9, sm_80, 8 bytes at 128 with 64-bit offsets. The accumulating kernel's tile is spill-free
    # in all four (3.6: 80 / 102 registers on sm_80 / sm_90, 3.9: 80 / 106).
    ("bwd", False, 16): (64, 16, 8),
    ("bwd", False, 32): (64, 16, 8),
    ("bwd", False, 64): (64, 16, 8),
    ("bwd", True, 16): (128, 32, 8),
    ("bwd", True, 32): (64, 32, 8),
    ("bwd", True, 64): (64, 16, 8),
    # the accumulating backward (one more dx tile live): at fp32, K 16, (128, 16, 8) spills on sm_90 and
    # (128, 32, 8) with int64 offsets on sm_80
    ("bwd+acc", False, 16): (64, 16, 8),
    ("bwd+acc", False, 32): (64, 16, 8),
    ("bwd+acc", False, 64): (64, 16, 8),
    ("bwd+acc", True, 16): (128, 32, 8),
    ("bwd+acc", True, 32): (64, 32, 8),
    ("bwd+acc", True, 64): (64, 16, 8),
}


# The one-pass backward (ONE_PASS: the whole channel axis in one x tile) where C fits: (BLOCK_N, num_warps,
# maxnreg) by (low-precision input, BLOCK_K, BLOCK_C), the same for the accumulating kernel; x, dx, the logits
# and the dW accumulator [BLOCK_K, BLOCK_C] live in registers. Every entry compiled spill-free with 16-byte
# loads for sm_80 and sm_90 with Triton 3.6 and 3.9 (the registered variants; README "How they are tested").
ONE_PASS_MAX_CHANNELS = 64
# fp32 (CUDA-core dots) needs the smaller voxel tiles: K 16 × C 32 at 64 voxels spilled 4 bytes (sm_80),
# K 16 × C 64 at 64 voxels 4 bytes (sm_90, accumulating), K 64 × C 64 at 32 voxels 500 bytes.
# maxnreg: ptxas 12.8 (Triton 3.6) spilled 12 bytes to fit fp32 K 16 × C 64 at 32 voxels into 128 registers
# (sm_80; two 8-warp programs per SM); 3.9 takes 186 (one program per SM). Capping at 255 stops that trade:
# 3.6 206 registers (sm_80) / 206 (sm_90), 3.9 214 / 200 (accumulating: 210 / 212, 214 / 204), spill-free,
# the occupancy 3.9 had. The cap goes with the whole BLOCK_K · BLOCK_C = 1024 fp32 class.
# None: no one-pass variant (the two-pass kernel runs). An x tile [BLOCK_C, BLOCK_N] of fewer than 16 bytes per
# thread (256 threads) cannot load 16 bytes wide: fp16/bf16 at C <= 16 and K 64 × C 32 (32 voxels), fp32
# K 32 / 64 × C 16 and K 64 × C 32 (Triton 3.9: 8-byte loads at most); fp16/bf16 K 32 × C 32 at 64 voxels
# spilled 44-56 bytes at 255 registers on sm_90 (3.9), and at 32 voxels would load 8 bytes wide.
_ONE_PASS_TILES = {
    (False, 16, 16): (64, 8, None),
    (False, 16, 32): (32, 8, None),
    (False, 16, 64): (32, 8, 255),
    (False, 32, 16): None,
    (False, 32, 32): (32, 8, 255),
    (False, 32, 64): (16, 8, None),
    (False, 64, 16): None,
    (False, 64, 32): None,
    (False, 64, 64): (16, 8, None),
    (True, 16, 16): None,
    (True, 16, 32): (64, 8, None),
    (True, 16, 64): (64, 8, None),
    (True, 32, 16): None,
    (True, 32, 32): None,
    (True, 32, 64): (32, 8, None),
    (True, 64, 16): None,
    (True, 64, 32): None,
    (True, 64, 64): (32, 8, None),
}
_ONE_PASS_GPU_CONFIGS = {(kernel, *key): tile for kernel in ("bwd", "bwd+acc") for key, tile in _ONE_PASS_TILES.items()}


def _triton_config(
    K: int,
    dtype: torch.dtype,
    kernel: str,
    interpret: bool | None = None,
    C: int | None = None,
    int64: bool = False,
) -> dict:
    """Block sizes for ``kernel`` ("fwd"/"bwd"/"bwd+acc"): the logits tile [BLOCK_K, BLOCK_N] and an x tile
    [BLOCK_C, BLOCK_N] live in registers; the backward reads x once per tile (ONE_PASS) when its C channels
    fit one tile (not with 64-bit offsets: those inputs, past 2^31 elements, run the two-pass kernel, as in
    the other ops). The interpreter gets small blocks so that test sizes span several voxel and channel
    blocks (loops and tail masks run); its one-pass limit is 32 channels, so both paths are tested."""
    block_k = max(16, next_pow2(K))
    interp = small_interpreter_blocks() if interpret is None else interpret
    one_pass = kernel != "fwd" and C is not None and not int64 and C <= (32 if interp else ONE_PASS_MAX_CHANNELS)
    block_c = max(16, next_pow2(C)) if one_pass else None
    if one_pass and not interp and _ONE_PASS_GPU_CONFIGS[(kernel, dtype != torch.float32, block_k, block_c)] is None:
        one_pass, block_c = False, None
    if interp:
        return dict(BLOCK_K=block_k, BLOCK_N=32, BLOCK_C=block_c or 16, num_warps=4, ONE_PASS=one_pass)
    if one_pass:
        block_n, warps, maxnreg = _ONE_PASS_GPU_CONFIGS[(kernel, dtype != torch.float32, block_k, block_c)]
        cfg = dict(BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps, ONE_PASS=True)
        return cfg if maxnreg is None else dict(cfg, maxnreg=maxnreg)
    block_n, block_c, warps = _GPU_CONFIGS[(kernel, dtype != torch.float32, block_k)]
    return dict(BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps, ONE_PASS=False)


def _fwd_meta(
    K: int, dtype: torch.dtype, *, bias: bool, target: bool, masked: bool, int64: bool, interpret: bool | None = None
) -> dict:
    """The forward kernel's keyword arguments (constexprs, num_warps) for these inputs: what the launcher
    passes, and what ``gpu_compile_specs`` compiles."""
    cfg = _triton_config(K, dtype, "fwd", interpret)
    cfg.pop("ONE_PASS")
    return dict(HAS_BIAS=bias, HAS_TARGET=target, HAS_MASK=masked, INT64=int64, **cfg)


def _bwd_meta(
    K: int,
    C: int,
    dtype: torch.dtype,
    *,
    accumulate: bool,
    bias: bool,
    target: bool,
    masked: bool,
    int64: bool,
    interpret: bool | None = None,
) -> dict:
    """The backward kernel's keyword arguments (constexprs, num_warps, maxnreg) for these inputs."""
    cfg = _triton_config(K, dtype, "bwd+acc" if accumulate else "bwd", interpret, C=C, int64=int64)
    return dict(HAS_BIAS=bias, HAS_TARGET=target, ACCUMULATE=accumulate, HAS_MASK=masked, INT64=int64, **cfg)


# --------------------------------------------------------------------------------------------------
# Launchers (public: energy_fusion composes them; the autograd Function below calls them)
# --------------------------------------------------------------------------------------------------
def free_energy_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    present: torch.Tensor | None = None,
):
    """Launch the forward kernel: one read of x, logits kept in registers.

    Args:
        x: ``[B, M, C, N]`` features, unit stride along N (any other strides), fp32/fp16/bf16.
        weight: ``[K, C]`` contiguous, K <= ``TRITON_MAX_CLASSES``. bias: ``[K]`` contiguous or None.
        target: ``[B, N]`` int64 (unit stride along N) or None; values in [0, K) or ``ignore_index``
            (not checked here: :func:`check_inputs` does it).
        present: ``[B, M]`` bool contiguous or None: an absent modality's x is read as zeros (its
            energy is then that of the bias alone; the caller masks it).

    Returns:
        ``(energy, ce)``, each ``[B, M, N]`` contiguous in x's dtype; ce is None without a target.
    """
    B, M, C, N = x.shape
    K = weight.shape[0]
    weight, bias = head_fp32(weight, bias)
    energy = torch.empty((B, M, N), dtype=x.dtype, device=x.device)
    ce = torch.empty((B, M, N), dtype=x.dtype, device=x.device) if target is not None else None
    meta = _fwd_meta(
        K,
        x.dtype,
        bias=bias is not None,
        target=target is not None,
        masked=present is not None,
        int64=needs_int64(x, energy),
    )
    grid = (cdiv(N, meta["BLOCK_N"]), B * M)
    with device_guard(x):
        _free_energy_fwd_kernel[grid](
            x,
            weight,
            bias if bias is not None else weight,
            target if target is not None else energy,
            present if present is not None else x,
            energy,
            ce if ce is not None else energy,
            N,
            C,
            K,
            M,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            target.stride(0) if target is not None else 0,
            float(temperature),
            int(ignore_index),
            **meta,
        )
    return energy, ce


def free_energy_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    d_energy: torch.Tensor | None,
    d_ce: torch.Tensor | None,
    dx: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
):
    """Launch the backward kernel: recompute the logits, write dx, reduce dW/db deterministically.

    Args:
        x, weight, bias, target, temperature, ignore_index, present: as in :func:`free_energy_fwd`.
        d_energy: ``[B, M, N]`` upstream gradient of the energy (any layout; made contiguous) or None.
        d_ce: ``[B, M, N]`` upstream gradient of ce or None (ignored without a target).
        dx: optional ``[B, M, C, N]`` contiguous buffer in x's dtype to ADD ``Wᵀdz`` into (a fused
            layer's other x-gradient terms are already there); None = a fresh buffer, overwritten.

    Returns:
        ``(dx [B, M, C, N], dw [K, C] fp32, db [K] fp32 or None)``.
    """
    B, M, C, N = x.shape
    K = weight.shape[0]
    weight, bias = head_fp32(weight, bias)
    accumulate = dx is not None
    use_ce = target is not None and d_ce is not None
    cfg = _bwd_meta(
        K,
        C,
        x.dtype,
        accumulate=accumulate,
        bias=bias is not None,
        target=use_ce,
        masked=present is not None,
        int64=needs_int64(x, dx),  # a fresh dx is contiguous, as many elements as x
    )
    tiles_n = cdiv(N, cfg["BLOCK_N"])
    tiles = tiles_n * B * M
    programs = persistent_programs(x.device, tiles)
    if not accumulate:
        dx = torch.empty((B, M, C, N), dtype=x.dtype, device=x.device)
    # one pass: every program (each has a tile) stores its whole partial row at its end, no zero-fill
    partial = torch.empty if cfg["ONE_PASS"] and tiles > 0 else torch.zeros
    dw_partial = partial((programs, K, C), dtype=torch.float32, device=x.device)
    db_partial = partial((programs, K), dtype=torch.float32, device=x.device)
    if d_energy is None:
        d_energy = torch.zeros((B, M, N), dtype=x.dtype, device=x.device)
    with device_guard(x):
        _free_energy_bwd_kernel[(programs,)](
            x,
            weight,
            bias if bias is not None else weight,
            target if use_ce else d_energy,
            present if present is not None else x,
            d_energy.contiguous(),
            d_ce.contiguous() if use_ce else d_energy,
            dx,
            dw_partial,
            db_partial,
            N,
            C,
            K,
            M,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            target.stride(0) if use_ce else 0,
            tiles_n,
            tiles,
            float(temperature),
            int(ignore_index),
            **cfg,
        )
    dw = dw_partial.sum(dim=0)
    db = db_partial.sum(dim=0) if bias is not None else None
    return dx, dw, db


# --------------------------------------------------------------------------------------------------
# Memory-lean PyTorch path: the same recompute-in-backward, in voxel chunks
# --------------------------------------------------------------------------------------------------
# fp32 temporaries per chunk (4 MiB): bounds the logits/dz working set. 16 MiB chunks were no faster
# on CPU and raised a level-0 EHF step's peak by 7 MiB (32³ × 16 channels).
_CHUNK_ELEMENTS = 1 << 20


def _chunks(x: torch.Tensor, K: int):
    B, M, C, N = x.shape
    return voxel_chunks(N, B * M * max(K, C), _CHUNK_ELEMENTS)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, written in place when out's dtype allows it: ``addmm_`` with beta = 0 (out's old
    contents ignored, NaN included) hands BLAS out's row stride, so a voxel slice of a larger buffer
    needs no temporary and no copy (``mm(out=)`` would copy a non-contiguous out)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b, beta=0)
    else:
        out.copy_(a @ b)


def torch_logits(x, weight, bias):
    """Logits [B, M, K, n] of one voxel chunk x [B, M, C, n], in float32 (float64 for float64 x).

    One GEMM per (b, m) slab, reading the strided chunk as it is: a single broadcast matmul would
    first transpose-copy the whole chunk to [B, M, n, C]."""
    acc = accumulation_dtype(x)
    w = weight.to(x.dtype).to(acc)
    B, M, _, n = x.shape
    z = torch.empty((B, M, w.shape[0], n), dtype=acc, device=x.device)
    for b in range(B):
        for m in range(M):
            _mm_into(z[b, m], w, x[b, m].to(acc))
    return z.add_(bias.to(acc)[:, None]) if bias is not None else z


def torch_energy_chunk(z, target, temperature, ignore_index):
    """energy [B, M, n] and ce [B, M, n] (None without a target) of one chunk's logits z [B, M, K, n]."""
    lse = torch.logsumexp(z, dim=2) if target is not None or temperature == 1.0 else None
    # at T = 1 (the default) the energy is -lse itself: one reduction serves energy and ce
    energy = -lse if temperature == 1.0 else -temperature * torch.logsumexp(z / temperature, dim=2)
    if target is None:
        return energy, None
    B, M, _, n = z.shape
    valid = target != ignore_index
    z_t = z.gather(2, torch.where(valid, target, 0)[:, None, None].expand(B, M, 1, n)).squeeze(2)
    return energy, torch.where(valid[:, None], lse - z_t, 0.0)


def _torch_forward(x, weight, bias, target, temperature, ignore_index):
    B, M, C, N = x.shape
    energy = x.new_empty((B, M, N))
    ce = x.new_empty((B, M, N)) if target is not None else None
    for s, e in _chunks(x, weight.shape[0]):
        en, c = torch_energy_chunk(
            torch_logits(x[..., s:e], weight, bias),
            target[:, s:e] if target is not None else None,
            temperature,
            ignore_index,
        )
        energy[..., s:e] = en
        if ce is not None:
            ce[..., s:e] = c
    return energy, ce


def torch_logits_grad(z, target, temperature, ignore_index, d_energy, d_ce):
    """dz [B, M, K, n] (z's dtype) from one chunk's logits z and the upstream d_energy / d_ce [B, M, n]
    (z's dtype, or None; d_ce only counts with a target)."""
    B, M, _, n = z.shape
    wants_ce = d_ce is not None and target is not None
    p = torch.softmax(z, dim=2) if temperature == 1.0 or wants_ce else None
    dz = None
    if d_energy is not None:
        # dE/dz = -softmax(z/T), which at T = 1 (the default) is the ce's softmax: computed once
        p_t = p if temperature == 1.0 else torch.softmax(z / temperature, dim=2)
        dz = p_t * (-d_energy)[:, :, None]
    if wants_ce:
        valid = target != ignore_index
        g = p  # the energy term has used it already: turned into d_ce·(p - onehot(t)) in place
        g.scatter_add_(
            2,
            torch.where(valid, target, 0)[:, None, None].expand(B, M, 1, n),
            torch.full((B, M, 1, n), -1.0, dtype=z.dtype, device=z.device),
        )
        g.mul_(torch.where(valid[:, None], d_ce, 0.0)[:, :, None])
        dz = g if dz is None else dz.add_(g)
    return dz if dz is not None else torch.zeros_like(z)


def torch_head_grads(dx_slab, xs_slab, w_acc, dz_slab, dw, *, accumulate: bool) -> None:
    """One (b, m) slab: dx_slab (+)= Wᵀ dz [C, n] and dw += dz xᵀ [K, C] (xs, dz, dw in ``acc``)."""
    if accumulate:
        dx_slab.addmm_(w_acc.t(), dz_slab)
    else:
        _mm_into(dx_slab, w_acc.t(), dz_slab)
    dw.addmm_(dz_slab, xs_slab.t())


def _torch_backward(x, weight, bias, target, temperature, ignore_index, d_energy, d_ce):
    B, M, C, N = x.shape
    K = weight.shape[0]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    acc = accumulation_dtype(x)
    dw = torch.zeros((K, C), dtype=acc, device=x.device)
    db = torch.zeros((K,), dtype=acc, device=x.device)
    w_acc = weight.to(x.dtype).to(acc)
    for s, e in _chunks(x, K):
        xs = x[..., s:e]
        dz = torch_logits_grad(
            torch_logits(xs, weight, bias),
            target[:, s:e] if target is not None else None,
            temperature,
            ignore_index,
            d_energy[..., s:e].to(acc) if d_energy is not None else None,
            d_ce[..., s:e].to(acc) if d_ce is not None else None,
        )
        xs = xs.to(acc)
        for b in range(B):  # one GEMM per (b, m) slab, as in torch_logits
            for m in range(M):
                torch_head_grads(dx[b, m, :, s:e], xs[b, m], w_acc, dz[b, m], dw, accumulate=False)
        db += dz.sum(dim=(0, 1, 3))
    return dx, dw, (db if bias is not None else None)


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------
# Registered as torch.library custom ops (forward and backward), so that torch.compile treats each as
# one opaque node (no graph break, fullgraph=True works) with shapes from the fake implementations, and
# the hand-written backward stays what autograd runs. Layouts: x [B, M, C, N] (unit stride along N),
# weight [K, C], bias [K]|None, target [B, N] int64|None. Saved for backward: the inputs only.
_NO_TENSOR = (0,)  # the shape standing for "None" among a custom op's outputs (an op cannot return None)


# the schema spelled out (not inferred from the postponed annotations of this module)
@torch.library.custom_op(
    "e2pa::free_energy",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor? target, float temperature, int ignore_index, bool use_triton)"
        " -> (Tensor, Tensor)"
    ),
)
def _free_energy_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """energy [B, M, N], and ce [B, M, N] (an empty [0] tensor without a target), x's dtype."""
    fwd = free_energy_fwd if use_triton else _torch_forward
    energy, ce = fwd(voxels_last(x, 3), weight, bias, target, temperature, ignore_index)
    return energy, (ce if ce is not None else x.new_empty(_NO_TENSOR))


@_free_energy_op.register_fake
def _(x, weight, bias, target, temperature, ignore_index, use_triton):
    B, M, _, N = x.shape
    return x.new_empty((B, M, N)), x.new_empty((B, M, N) if target is not None else _NO_TENSOR)


@torch.library.custom_op(
    "e2pa::free_energy_backward",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, Tensor? target, Tensor? d_energy, Tensor? d_ce, float temperature, "
        "int ignore_index, bool use_triton) -> (Tensor, Tensor, Tensor)"
    ),
)
def _free_energy_backward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor | None,
    d_energy: torch.Tensor | None,
    d_ce: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx [B, M, C, N] (contiguous, x's dtype), dw [K, C] and db [K] (weight's and bias's dtypes; an empty
    [0] tensor without a bias) from the upstream d_energy / d_ce [B, M, N] (either may be None)."""
    bwd = free_energy_bwd if use_triton else _torch_backward
    dx, dw, db = bwd(voxels_last(x, 3), weight, bias, target, temperature, ignore_index, d_energy, d_ce)
    return dx, dw.to(weight.dtype), (db.to(bias.dtype) if bias is not None else weight.new_empty(_NO_TENSOR))


@_free_energy_backward_op.register_fake
def _(x, weight, bias, target, d_energy, d_ce, temperature, ignore_index, use_triton):
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape) if bias is not None else weight.new_empty(_NO_TENSOR),
    )


def _free_energy_setup_context(ctx, inputs, output):
    x, weight, bias, target, temperature, ignore_index, use_triton = inputs
    ctx.save_for_backward(x, weight, bias, target)
    ctx.temperature, ctx.ignore_index, ctx.use_triton = temperature, ignore_index, use_triton
    ctx.set_materialize_grads(False)


def _free_energy_backward(ctx, d_energy, d_ce):
    x, weight, bias, target = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if (d_energy is None and d_ce is None) or not any(needs[:3]):
        return (None,) * 7
    dx, dw, db = _free_energy_backward_op(
        x,
        weight,
        bias,
        target,
        d_energy,
        d_ce if target is not None else None,
        ctx.temperature,
        ctx.ignore_index,
        ctx.use_triton,
    )
    return (
        dx if needs[0] else None,
        dw if needs[1] else None,
        db if bias is not None and needs[2] else None,
        None,
        None,
        None,
        None,
    )


_free_energy_op.register_autograd(_free_energy_backward, setup_context=_free_energy_setup_context)


def check_inputs(x, weight, bias, temperature, target, ignore_index, spatial_dims, validate=True):
    """Validate :func:`free_energy`'s arguments (clear errors naming the argument). Returns
    ``(modal, temperature)``: whether x has the modality axis, and the temperature as a float.
    ``validate``: check target's values (one host read, see :func:`check_values`)."""
    check_tensor(OP, "x", x, min_ndim=3)
    check_tensor(OP, "weight", weight, min_ndim=2, max_ndim=2)
    K, C = weight.shape
    if K < 1 or C < 1:
        raise ValueError(f"{OP}: weight must have shape [K, C] with K, C >= 1; got {list(weight.shape)}")
    if bias is not None:
        check_tensor(OP, "bias", bias)
        check_shape(OP, "bias", bias, (K,), "[K]")
    temperature = check_finite_scalar(OP, "temperature", temperature, positive=True)
    if target is not None:
        check_tensor(OP, "target", target, dtypes=(torch.int64, torch.int32, torch.uint8, torch.int16))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int; got {type(ignore_index).__name__}")
    check_same_device(OP, x=x, weight=weight, bias=bias, target=target)
    modal = has_modality_axis(OP, x, C, target, spatial_dims)
    lead = 3 if modal else 2
    if x.dim() <= lead:
        raise ValueError(f"{OP}: x must have at least one spatial axis; got shape {list(x.shape)}")
    if x.shape[lead - 1] != C:
        layout = "[B, M, C, *S]" if modal else "[B, C, *S]"
        raise ValueError(f"{OP}: x must be {layout} with C = {C} (weight's channels); got shape {list(x.shape)}")
    if target is not None:
        check_shape(OP, "target", target, (x.shape[0], *x.shape[lead:]), "[B, *S] (x's batch and spatial axes)")
        if validate:  # a host read of the values: once at entry (see check_values)
            ok = (target == ignore_index) | ((target >= 0) & (target < K))
            summary = (
                f"{OP}: target values must lie in [0, {K - 1}] (K = {K} classes) or equal ignore_index = {ignore_index}"
            )
            check_values(ok, summary, lambda: f"{summary}; found {target[~ok].unique()[:8].tolist()}")
    return modal, temperature


def free_energy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    target: torch.Tensor | None = None,
    ignore_index: int = -100,
    *,
    spatial_dims: int | None = None,
    validate: bool = True,
):
    """Per-voxel free energy of each modality under a linear K-class head, without storing logits.

    Args:
        x: ``[B, M, C, *S]`` modality features (or ``[B, C, *S]`` without the modality axis), any
            float dtype; non-contiguous inputs are fine.
        weight: ``[K, C]`` classifier weight. bias: ``[K]`` or None.
        temperature: ``T > 0`` of ``energy = -T·logsumexp(z/T)``.
        target: optional ``[B, *S]`` class indices (shared by all modalities); entries equal to
            ``ignore_index`` contribute ``ce = 0``.
        spatial_dims: only needed when the layout is ambiguous (``x.shape[1] == x.shape[2] == C``).
        validate: check target's values (one host read); False when the caller has checked them.

    Returns:
        ``energy`` ``[B, M, *S]`` (``[B, *S]``), in x's dtype; ``(energy, ce)`` when ``target`` is given.
        Differentiable in x, weight and bias.
    """
    modal, temperature = check_inputs(x, weight, bias, temperature, target, ignore_index, spatial_dims, validate)
    K = weight.shape[0]
    backend = select_backend(
        x,
        weight,
        bias,
        target,
        triton_limit=(
            f"{OP}: the Triton kernels take K <= {TRITON_MAX_CLASSES} classes; got K = {K}"
            if K > TRITON_MAX_CLASSES
            else None
        ),
    )
    if backend == "reference":
        return reference.free_energy(x, weight, bias, temperature, target, ignore_index, spatial_dims=spatial_dims)
    x4 = voxels_last(x if modal else x.unsqueeze(1), 3)
    spatial = x.shape[3:] if modal else x.shape[2:]
    target2 = voxels_last(target.long(), 1) if target is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        energy, ce = _free_energy_op(
            x4,
            weight.contiguous(),
            bias.contiguous() if bias is not None else None,
            target2,
            temperature,
            ignore_index,
            backend == "triton",
        )
    outs = (energy, ce) if target is not None else (energy,)
    shaped = tuple(o.view(x.shape[0], x4.shape[1], *spatial) if modal else o.view(x.shape[0], *spatial) for o in outs)
    return shaped if target is not None else shaped[0]


# --------------------------------------------------------------------------------------------------
# GPU compile variants (tests compile each for sm_80 / sm_90 and check spills and load widths)
# --------------------------------------------------------------------------------------------------
# Flags whose True value only adds code (an optional input's loads and math): a variant compiled with them set
# covers the launches that leave them False (_kernel_spec.heaviest); the arguments each guards get a
# placeholder tensor when it is False.
COVERED_FLAGS = ("HAS_BIAS", "HAS_TARGET", "HAS_MASK")
GUARDED_ARGS = {
    "HAS_BIAS": ("b_ptr",),
    "HAS_TARGET": ("target_ptr", "d_ce_ptr", "stride_tb"),
    "HAS_MASK": ("present_ptr",),
}
_GATE_DTYPES = ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"))


def gpu_compile_specs() -> list[KernelSpec]:
    """Every variant the launchers can pick, from their own ``_fwd_meta`` / ``_bwd_meta``: x fp32 / fp16 /
    bf16 (the head is read as fp32 whatever its dtype, ``head_fp32``) × every K up to
    ``TRITON_MAX_CLASSES`` (BLOCK_K 16 / 32 / 64) × every C (the backward's one-pass tiles BLOCK_C 16 / 32 / 64
    where ``_ONE_PASS_GPU_CONFIGS`` has one; any C for the two-pass kernels: their tiles do not depend on C;
    C = ``ONE_PASS_MAX_CHANNELS`` + 1 stands for all wider ones) × the accumulating backward (energy_fusion's
    chunked-C path) × 32- and 64-bit offsets (the two-pass kernels; the one-pass backward is not picked with
    64-bit offsets). HAS_BIAS / HAS_TARGET / HAS_MASK (an optional input's loads and math) are compiled set:
    the launches without them run the same code less those loads (COVERED_FLAGS)."""
    if triton is None:
        return []
    specs = []
    for dtype, ty in _GATE_DTYPES:
        for int64 in (False, True):
            seen = set()  # the tiles met so far: the flags do not enter _triton_config, so each once
            for name in ("fwd", "bwd", "bwd+acc"):
                for K in range(1, TRITON_MAX_CLASSES + 1):
                    for C in range(1, ONE_PASS_MAX_CHANNELS + 2) if name != "fwd" else (None,):
                        tile = (name, *_triton_config(K, dtype, name, False, C=C, int64=int64).items())
                        if tile in seen:
                            continue
                        seen.add(tile)
                        for bias, target, masked in itertools.product((False, True), repeat=3):
                            flags = dict(bias=bias, target=target, masked=masked, int64=int64, interpret=False)
                            if name == "fwd":
                                meta = _fwd_meta(K, dtype, **flags)
                            else:
                                meta = _bwd_meta(K, C, dtype, accumulate=name == "bwd+acc", **flags)
                            specs.append(_spec(name, ty, meta))
    return heaviest(specs, COVERED_FLAGS)


def _spec(name: str, ty: str, meta: dict) -> KernelSpec:
    kernel = _free_energy_fwd_kernel if name == "fwd" else _free_energy_bwd_kernel
    constexprs, warps, maxnreg = split_meta(meta)
    extra = {} if name == "fwd" else _bwd_args(ty)
    sig = _signature(kernel, ty, extra, "i64" if constexprs["INT64"] else "i32")
    return KernelSpec(
        label=spec_label(OP, name.split("+")[0], ty, constexprs, COVERED_FLAGS, warps=warps, maxnreg=maxnreg),
        kernel=kernel,
        signature=sig,
        constexprs=constexprs,
        num_warps=warps,
        maxnreg=maxnreg,
        aligned=tuple(
            a for a in sig if a.endswith("_ptr") or a in ("N", "stride_xb", "stride_xm", "stride_xc", "stride_tb")
        ),
    )


def _bwd_args(ty: str) -> dict[str, str]:
    return {
        "tiles_n": "i32",
        "tiles": "i32",
        "d_energy_ptr": f"*{ty}",
        "d_ce_ptr": f"*{ty}",
        "dx_ptr": f"*{ty}",
        "dw_partial_ptr": "*fp32",
        "db_partial_ptr": "*fp32",
    }


def _signature(kernel, ty: str, extra: dict[str, str], index: str) -> dict[str, str]:
    base = {
        "x_ptr": f"*{ty}",
        "w_ptr": "*fp32",
        "b_ptr": "*fp32",
        "target_ptr": "*i64",
        "present_ptr": "*u1",  # a bool tensor, as the JIT types it
        "energy_ptr": f"*{ty}",
        "ce_ptr": f"*{ty}",
        "N": index,
        "C": "i32",
        "K": "i32",
        "M": "i32",
        "stride_xb": index,
        "stride_xm": index,
        "stride_xc": index,
        "stride_tb": index,
        "temperature": "fp32",
        "ignore_index": "i32",
    }
    base.update(extra)
    return {a: base.get(a, "constexpr") for a in kernel.arg_names}
