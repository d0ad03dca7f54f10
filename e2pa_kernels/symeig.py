"""A symmetric eigensolver that never reads a value back to the host: cyclic parallel Jacobi in Triton.

Why: ``torch.linalg.eigh`` checks cuSOLVER's ``info`` on the host inside the op (``_linalg_eigh`` has no
``_ex`` variant), one stream synchronisation per call. ESA's default basis (:func:`factor_basis`) needs the
top-r eigenvectors of a ``[C, C]`` matrix per sample every forward; this kernel computes them with every
decision (convergence included) taken on the device.

Algorithm, per matrix ``A`` ``[n, n]`` (float64; one program per matrix; ``N`` = n rounded up to even, a
padded row/column of zeros that no rotation ever mixes in, since its off-diagonal entries stay exactly 0)::

    sweep: for step t = 0 … N-2 (round robin: every pair once per sweep, N/2 disjoint pairs per step)
        pair k of step t: (a, b) = ((t + k) mod (N-1), (t - k) mod (N-1)) for k ≥ 1, (t, N-1) for k = 0
        per pair, the symmetric Schur rotation (Golub & Van Loan, Alg. 8.5.2) zeroing A[a, b]:
            τ = (A_bb − A_aa) / (2 A_ab),  t = sign(τ) / (|τ| + √(1 + τ²)),  c = 1/√(1 + t²),  s = t c
            (c = 1, s = 0 where A_ab = 0);  with J = I except J_aa = J_bb = c, J_ab = s, J_ba = −s:
        A ← Jᵀ A J   (A'_aa = A_aa − t A_ab,  A'_bb = A_bb + t A_ab,  A'_ab = A'_ba = 0: Rutishauser's form)
        V ← V J      (V'[:, a] = c V[:, a] − s V[:, b],  V'[:, b] = s V[:, a] + c V[:, b])
    until off(A)² = Σ_{i≠j} A_ij² ≤ TOL² · ‖A‖_F²  (checked after every sweep, on the device) or MAX_SWEEPS.

Memory: A and V live in a global scratch ``[B, N, N]`` each (L1/L2-resident at these sizes), updated in
place. Per step, the rotations of all pairs are computed first (``cs`` scratch: c, s and the two new
diagonal entries), then the ``A`` update runs over the upper triangle of pair blocks: tile (K, L), K ≤ L,
loads the 2×2 blocks of pairs K × L, rotates rows by K's and columns by L's rotations, stores them and
their transposes (so A stays exactly symmetric whatever the compiler contracts into FMAs, and each
element is loaded once and stored once per step). A tile's reads are exactly the region it stores
(normal stores) plus a mirror region no tile reads in that step, so in-place is race-free with one
barrier between a tile's loads and its stores (the diagonal tile stores transposes into its own region).
``V`` tiles read and write their own columns. Barriers separate the phases.

Input contract: symmetric ``[B, n, n]``; the lower triangle is read (as ``torch.linalg.eigh``'s default).
Each matrix is divided by its largest absolute entry first (the eigenvectors do not change; eigenvalues
are scaled back) so that squared norms neither overflow nor underflow. A matrix with a non-finite entry
stops the kernel at once (NaN norms compare False) and :func:`eigh` returns NaN for it (no error: an
error would need a host read).

Accuracy (float64, measured in the interpreter against LAPACK on random PSD matrices, batch 2): the
eigenvalue error over ``‖A‖₂`` is 6e-16 at n = 8, 9e-16 at n = 33, 2.6e-15 at n = 128; the residual
``‖AV − VΛ‖/‖A‖`` 1.2e-15 at n = 128 (LAPACK's 3.8e-16) and ``‖VᵀV − I‖`` 3.2e-14 (LAPACK's 2.7e-15): within
LAPACK's own test ratios (``n ε`` units below 20; ``tests/kernels/test_symeig.py`` asserts them).

Cost: ``(N−1)·sweeps`` steps, each touching ~3.5·N² doubles; sweeps grow slowly with N (quadratic
convergence; measured 9–10 at N = 128, 9 at 64, 6–7 at 13–20). One program per matrix, so a batch of B
uses B SMs: the kernel is for the small matrices of ESA (C ≤ :data:`TRITON_MAX_N`); ``factor_basis``
runs LAPACK/cuSOLVER ``eigh`` above it. Its speed against cuSOLVER is measured by ``benchmarks/symeig.py``
(the GPU kit's ``symeig`` stage), not yet on a GPU.
"""

from __future__ import annotations

import torch

from ._kernel_spec import KernelSpec, spec_label, split_meta
from ._runtime import small_interpreter_blocks, triton_unavailable_reason
from ._triton_utils import cdiv, device_guard

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is Linux-only
    triton = None

OP = "symeig"
# One program per matrix and O(N³) work per sweep in it: past this size one SM is too slow and the
# batched LAPACK/cuSOLVER path (with its one host read) is the better deal.
TRITON_MAX_N = 256
MAX_SWEEPS = 30
TOL = 1e-15  # relative off-diagonal norm at which a matrix counts as diagonal

# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _pair(t, k, N):
        """Round-robin pair k of step t for even N: (a, b), a ≠ b; the pairs of one step are disjoint."""
        m = N - 1
        a = (t + k) % m
        b = tl.where(k == 0, m, (t - k + m) % m)
        return a, b

    @triton.jit
    def _schur(a_aa, a_bb, a_ab):
        """(c, s, t) of the rotation zeroing a_ab (GVL 8.5.2); identity where a_ab = 0, NaN in → NaN out."""
        nonzero = a_ab != 0.0
        tau = (a_bb - a_aa) / (2.0 * tl.where(nonzero, a_ab, 1.0))
        mag = tl.abs(tau)
        t = 1.0 / (mag + tl.sqrt(1.0 + mag * mag))
        t = tl.where(mag > 1e150, 0.5 / tl.maximum(mag, 1.0), t)  # τ² would overflow: t = 1/(2|τ|) to double precision
        t = tl.where(tau < 0.0, -t, t)
        t = tl.where(nonzero, t, 0.0)
        c = 1.0 / tl.sqrt(1.0 + t * t)
        return c, t * c, t

    @triton.jit
    def _off_and_total(a_base, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """(Σ_{i≠j} A_ij², Σ A_ij²) of one [N, N] matrix, in float64."""
        off = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float64)
        tot = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float64)
        for r0 in range(0, N, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                m = (rows[:, None] < N) & (cols[None, :] < N)
                x = tl.load(a_base + rows[:, None] * N + cols[None, :], mask=m, other=0.0)
                sq = x * x
                tot += sq
                off += tl.where(rows[:, None] != cols[None, :], sq, 0.0)
        return tl.sum(tl.sum(off, axis=1), axis=0), tl.sum(tl.sum(tot, axis=1), axis=0)

    @triton.jit
    def _jacobi_kernel(
        a_ptr,
        v_ptr,
        cs_ptr,
        ab_ptr,
        sweeps_ptr,
        N,
        tol2,
        BLOCK_P: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MAX_SWEEPS: tl.constexpr,
    ):
        """One program per matrix. a_ptr / v_ptr: [B, N, N] float64 contiguous (A, symmetric; V = I on
        entry), overwritten with diag(λ) (up to off(A) ≤ √tol2·‖A‖) and the eigenvectors (columns).
        cs_ptr: [B, 4, NPB] float64 and ab_ptr: [B, 2, NPB] int32 scratch (each step's rotations and pairs;
        NPB = N/2 rounded up to BLOCK_P). sweeps_ptr: [B] int32, the sweeps run. N even; N² < 2^31."""
        pid = tl.program_id(0).to(tl.int64)
        NP = N // 2
        nblk = tl.cdiv(NP, BLOCK_P)
        NPB = nblk * BLOCK_P
        a_base = a_ptr + pid * N * N
        v_base = v_ptr + pid * N * N
        cs_base = cs_ptr + pid * 4 * NPB
        ab_base = ab_ptr + pid * 2 * NPB
        off2, tot2 = _off_and_total(a_base, N, BLOCK_R, BLOCK_N)
        sweep = 0
        while (sweep < MAX_SWEEPS) & (off2 > tol2 * tot2):  # NaN compares False: stops at once
            for t in range(0, N - 1):
                # 1. every pair's rotation, from A before this step
                for kb in range(0, nblk):
                    k = kb * BLOCK_P + tl.arange(0, BLOCK_P)
                    valid = k < NP
                    a, b = _pair(t, tl.where(valid, k, 0), N)
                    a_aa = tl.load(a_base + a * N + a, mask=valid, other=0.0)
                    a_bb = tl.load(a_base + b * N + b, mask=valid, other=0.0)
                    a_ab = tl.load(a_base + a * N + b, mask=valid, other=0.0)
                    c, s, tt = _schur(a_aa, a_bb, a_ab)
                    tl.store(ab_base + k, a, mask=valid)
                    tl.store(ab_base + NPB + k, b, mask=valid)
                    tl.store(cs_base + k, c, mask=valid)
                    tl.store(cs_base + NPB + k, s, mask=valid)
                    tl.store(cs_base + 2 * NPB + k, a_aa - tt * a_ab, mask=valid)
                    tl.store(cs_base + 3 * NPB + k, a_bb + tt * a_ab, mask=valid)
                tl.debug_barrier()
                # 2. A ← Jᵀ A J over the upper triangle of pair blocks (K ≤ L), stored with its mirror
                for kb in range(0, nblk):
                    k = kb * BLOCK_P + tl.arange(0, BLOCK_P)
                    vk = k < NP
                    ak = tl.load(ab_base + k, mask=vk, other=0)
                    bk = tl.load(ab_base + NPB + k, mask=vk, other=0)
                    ck = tl.load(cs_base + k, mask=vk, other=1.0)[:, None]
                    sk = tl.load(cs_base + NPB + k, mask=vk, other=0.0)[:, None]
                    dak = tl.load(cs_base + 2 * NPB + k, mask=vk, other=0.0)[:, None]
                    dbk = tl.load(cs_base + 3 * NPB + k, mask=vk, other=0.0)[:, None]
                    ak2 = ak[:, None]
                    bk2 = bk[:, None]
                    row_a = a_base + ak2 * N  # rows a_k, b_k of A
                    row_b = a_base + bk2 * N
                    for lb in range(kb, nblk):
                        kl = lb * BLOCK_P + tl.arange(0, BLOCK_P)
                        vl = kl < NP
                        al = tl.load(ab_base + kl, mask=vl, other=0)
                        bl = tl.load(ab_base + NPB + kl, mask=vl, other=0)
                        cl = tl.load(cs_base + kl, mask=vl, other=1.0)[None, :]
                        sl = tl.load(cs_base + NPB + kl, mask=vl, other=0.0)[None, :]
                        al2 = al[None, :]
                        bl2 = bl[None, :]
                        p_aa = row_a + al2
                        p_ab = row_a + bl2
                        p_ba = row_b + al2
                        p_bb = row_b + bl2
                        m = vk[:, None] & vl[None, :]
                        x_aa = tl.load(p_aa, mask=m, other=0.0)
                        x_ab = tl.load(p_ab, mask=m, other=0.0)
                        x_ba = tl.load(p_ba, mask=m, other=0.0)
                        x_bb = tl.load(p_bb, mask=m, other=0.0)
                        # rows: Jᵀ (row a ← c·a − s·b, row b ← s·a + c·b), with pair k's rotation
                        r_aa = ck * x_aa - sk * x_ba
                        r_ab = ck * x_ab - sk * x_bb
                        r_ba = sk * x_aa + ck * x_ba
                        r_bb = sk * x_ab + ck * x_bb
                        # columns: J (col a ← c·a − s·b, col b ← s·a + c·b), with pair l's rotation
                        n_aa = r_aa * cl - r_ab * sl
                        n_ab = r_aa * sl + r_ab * cl
                        n_ba = r_ba * cl - r_bb * sl
                        n_bb = r_ba * sl + r_bb * cl
                        same = k[:, None] == kl[None, :]  # the pair's own 2×2 block
                        n_aa = tl.where(same, dak, n_aa)
                        n_bb = tl.where(same, dbk, n_bb)
                        n_ab = tl.where(same, 0.0, n_ab)
                        n_ba = tl.where(same, 0.0, n_ba)
                        upper = m & (k[:, None] <= kl[None, :])
                        strict = m & (k[:, None] < kl[None, :])
                        tl.debug_barrier()  # every thread has loaded before any mirror store lands
                        tl.store(p_aa, n_aa, mask=upper)
                        tl.store(p_ab, n_ab, mask=upper)
                        tl.store(p_ba, n_ba, mask=upper)
                        tl.store(p_bb, n_bb, mask=upper)
                        mirror_a = a_base + al2 * N  # rows a_l, b_l: the mirror of this tile
                        mirror_b = a_base + bl2 * N
                        tl.store(mirror_a + ak2, n_aa, mask=strict)
                        tl.store(mirror_b + ak2, n_ab, mask=strict)
                        tl.store(mirror_a + bk2, n_ba, mask=strict)
                        tl.store(mirror_b + bk2, n_bb, mask=strict)
                # 3. V ← V J (each tile reads and writes its own columns)
                for lb in range(0, nblk):
                    kl = lb * BLOCK_P + tl.arange(0, BLOCK_P)
                    vl = kl < NP
                    al = tl.load(ab_base + kl, mask=vl, other=0)[None, :]
                    bl = tl.load(ab_base + NPB + kl, mask=vl, other=0)[None, :]
                    cl = tl.load(cs_base + kl, mask=vl, other=1.0)[None, :]
                    sl = tl.load(cs_base + NPB + kl, mask=vl, other=0.0)[None, :]
                    for r0 in range(0, N, BLOCK_R):
                        rows = (r0 + tl.arange(0, BLOCK_R))[:, None]
                        m = (rows < N) & vl[None, :]
                        pa = v_base + rows * N + al
                        pb = v_base + rows * N + bl
                        va = tl.load(pa, mask=m, other=0.0)
                        vb = tl.load(pb, mask=m, other=0.0)
                        tl.store(pa, va * cl - vb * sl, mask=m)
                        tl.store(pb, va * sl + vb * cl, mask=m)
                tl.debug_barrier()
            sweep += 1
            off2, tot2 = _off_and_total(a_base, N, BLOCK_R, BLOCK_N)
        tl.store(sweeps_ptr + pid, sweep)


# --------------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------------
# (BLOCK_P pairs per tile side, BLOCK_R rows of V per tile, BLOCK_N norm-pass columns, num_warps)
_GPU_CONFIG = dict(BLOCK_P=32, BLOCK_R=64, BLOCK_N=64, num_warps=16)
# small tiles in the interpreter, so that test sizes span several pair and row blocks
_INTERPRETER_CONFIG = dict(BLOCK_P=8, BLOCK_R=16, BLOCK_N=16, num_warps=1)


def launcher_config(interpret: bool | None = None) -> dict:
    """The block sizes and warps the launcher picks here (GPU tiles, or small interpreter tiles)."""
    interp = small_interpreter_blocks() if interpret is None else interpret
    return dict(_INTERPRETER_CONFIG if interp else _GPU_CONFIG)


def _meta(cfg: dict, max_sweeps: int) -> dict:
    """The kernel's keyword arguments (constexprs, num_warps) for a config: what the launcher passes, and
    what ``gpu_compile_specs`` compiles."""
    return dict(
        BLOCK_P=cfg["BLOCK_P"],
        BLOCK_R=cfg["BLOCK_R"],
        BLOCK_N=cfg["BLOCK_N"],
        MAX_SWEEPS=int(max_sweeps),
        num_warps=cfg["num_warps"],
    )


def jacobi_eigh_fwd(matrix: torch.Tensor, tol: float = TOL, max_sweeps: int = MAX_SWEEPS, config: dict | None = None):
    """Launch the Jacobi kernel on ``matrix`` ``[B, n, n]`` float64 (lower triangle read, any strides).

    ``config``: block sizes and warps (``BLOCK_P``, ``BLOCK_R``, ``BLOCK_N``, ``num_warps``) instead of the
    launcher's (benchmarks compare candidates). Returns ``(eigenvalues [B, n], eigenvectors [B, n, n],
    sweeps [B] int32)`` in float64, unsorted (Jacobi's order: eigenvalue i belongs to column i). No host
    read of a value.
    """
    B, n, _ = matrix.shape
    N = n + (n & 1)
    if B == 0 or n == 0:
        return matrix.new_empty((B, n)), matrix.new_empty((B, n, n)), matrix.new_zeros((B,), dtype=torch.int32)
    sym = torch.tril(matrix) + torch.tril(matrix, -1).transpose(1, 2)
    scale = sym.abs().amax(dim=(1, 2))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # 0 stays 0; NaN stays in the matrix
    work = torch.zeros((B, N, N), dtype=torch.float64, device=matrix.device)
    work[:, :n, :n] = sym / scale[:, None, None]
    vectors = torch.eye(N, dtype=torch.float64, device=matrix.device).repeat(B, 1, 1)
    cfg = dict(config) if config is not None else launcher_config()
    npb = cdiv(N // 2, cfg["BLOCK_P"]) * cfg["BLOCK_P"]
    cs = torch.empty((B, 4, npb), dtype=torch.float64, device=matrix.device)
    ab = torch.empty((B, 2, npb), dtype=torch.int32, device=matrix.device)
    sweeps = torch.empty((B,), dtype=torch.int32, device=matrix.device)
    with device_guard(matrix):
        _jacobi_kernel[(B,)](
            work,
            vectors,
            cs,
            ab,
            sweeps,
            N,
            float(tol) ** 2,  # a Python float: the JIT passes it as fp32 (1e-30 is a normal fp32)
            **_meta(cfg, max_sweeps),
        )
    values = torch.diagonal(work, dim1=1, dim2=2)[:, :n] * scale[:, None]
    return values, vectors[:, :n, :n], sweeps


# --------------------------------------------------------------------------------------------------
# custom op (opaque to torch.compile; no gradient)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("e2pa::symeig_jacobi", mutates_args=(), schema="(Tensor matrix) -> (Tensor, Tensor, Tensor)")
def _symeig_op(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """eigenvalues [B, n] ascending, eigenvectors [B, n, n] (columns, in that order), sweeps [B] int32."""
    values, vectors, sweeps = jacobi_eigh_fwd(matrix)
    values, order = torch.sort(values, dim=1, stable=True)
    vectors = vectors.gather(2, order.unsqueeze(1).expand_as(vectors))
    return values, vectors, sweeps


@_symeig_op.register_fake
def _(matrix):
    B, n = matrix.shape[:2]
    return matrix.new_empty((B, n)), matrix.new_empty((B, n, n)), matrix.new_empty((B,), dtype=torch.int32)


def check_matrix(name: str, matrix: object) -> torch.Tensor:
    """``matrix`` is a float64 ``[B, n, n]`` tensor the kernel can run on (else a clear error)."""
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{name}: matrix must be a torch.Tensor; got {type(matrix).__name__}")
    if matrix.dtype != torch.float64:
        raise TypeError(f"{name}: matrix must be float64 (the Jacobi kernel works in float64); got {matrix.dtype}")
    if matrix.dim() != 3 or matrix.shape[1] != matrix.shape[2]:
        raise ValueError(f"{name}: matrix must be [B, n, n] (a batch of square matrices); got {list(matrix.shape)}")
    if matrix.shape[1] > TRITON_MAX_N:
        raise ValueError(f"{name}: the Jacobi kernel takes n <= {TRITON_MAX_N}; got n = {matrix.shape[1]}")
    reason = triton_unavailable_reason((matrix,), dtypes=(torch.float64,))
    if reason is not None:
        raise RuntimeError(f"{name}: {reason}")
    return matrix


def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` without the host read, on the Triton Jacobi kernel.

    Args:
        matrix: ``[B, n, n]`` float64, symmetric (its lower triangle is read), ``n <= TRITON_MAX_N``; CUDA,
            or CPU under ``TRITON_INTERPRET=1``. Any strides.

    Returns:
        ``(eigenvalues [B, n] ascending, eigenvectors [B, n, n])`` (column i belongs to eigenvalue i), float64,
        no gradient. A matrix with a non-finite entry gives NaN eigenvalues and vectors (no error, no sync).
    """
    check_matrix("symeig.eigh", matrix)
    values, vectors, _ = _symeig_op(matrix.detach())
    finite = torch.isfinite(matrix).all(dim=2).all(dim=1)
    nan = torch.full((), float("nan"), dtype=matrix.dtype, device=matrix.device)
    return torch.where(finite[:, None], values, nan), torch.where(finite[:, None, None], vectors, nan)


def top_eigenvectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """:func:`e2pa_kernels.reference.top_eigenvectors` on the Jacobi kernel: the top-``rank`` eigenvectors
    of symmetric ``[B, n, n]`` float64 → ``[B, n, rank]``, largest eigenvalue first, each column's
    largest-magnitude entry positive; NaN columns for a matrix with a non-finite entry. No host read."""
    _, vectors = eigh(matrix)
    top = vectors.flip(-1)[..., :rank]
    pivot = top.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(top.gather(1, pivot))
    return top * torch.where(sign == 0, torch.ones_like(sign), sign)


# --------------------------------------------------------------------------------------------------
# GPU compile variant (tests compile it for sm_80 / sm_90 and check spills)
# --------------------------------------------------------------------------------------------------
def gpu_compile_specs() -> list[KernelSpec]:
    """The one variant the launcher picks on a GPU (``launcher_config``, ``MAX_SWEEPS``: what ``eigh``,
    ``top_eigenvectors`` and ``factor_basis`` run; ``jacobi_eigh_fwd``'s ``config`` / ``max_sweeps`` are for
    the benchmarks' candidate sweeps). n only sets the runtime size N."""
    if triton is None:
        return []
    constexprs, warps, maxnreg = split_meta(_meta(launcher_config(interpret=False), MAX_SWEEPS))
    sig = {
        "a_ptr": "*fp64",
        "v_ptr": "*fp64",
        "cs_ptr": "*fp64",
        "ab_ptr": "*i32",
        "sweeps_ptr": "*i32",
        "N": "i32",
        "tol2": "fp32",  # a Python float, as the JIT types it
    }
    sig.update({name: "constexpr" for name in _jacobi_kernel.arg_names if name not in sig})
    return [
        KernelSpec(
            label=spec_label("symeig", "jacobi", "fp64", constexprs, (), warps=warps, maxnreg=maxnreg),
            kernel=_jacobi_kernel,
            signature=sig,
            constexprs=constexprs,
            num_warps=warps,
            maxnreg=maxnreg,
            aligned=("a_ptr", "v_ptr", "cs_ptr", "ab_ptr", "sweeps_ptr", "N"),
        )
    ]
