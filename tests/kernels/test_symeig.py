"""symeig: the sync-free Jacobi eigensolver (Triton; the interpreter on CPU) against LAPACK's float64 ``eigh``.

Judged as LAPACK's own test suite judges an eigensolver (its test ratios, threshold ``THRESH``): eigenvalue
error and residual ``‖A V − V Λ‖`` over ``n ε ‖A‖``, orthogonality ``‖VᵀV − I‖`` over ``n ε``. Eigenvectors
are compared column by column only where the spectrum is separated (bound: the sin θ theorem, ``n ε ‖A‖ /
gap``); where eigenvalues repeat, the top-r subspace (its projector) is compared instead. Odd n (a padded
row), sizes above one tile (tiny interpreter tiles), a NaN sample in a batch, non-contiguous inputs, no host
read, torch.compile, input errors, and a hypothesis property test.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import e2pa_kernels
from e2pa_kernels import reference, symeig
from e2pa_kernels.testing import HostSyncCounter

EPS = torch.finfo(torch.float64).eps
THRESH = 20.0  # LAPACK's testing/sep.in threshold for these ratios
fa_module = importlib.import_module("e2pa_kernels.factor_align")


def _with_spectrum(values, batch: int = 1) -> torch.Tensor:
    """Q diag(values) Qᵀ with a random orthogonal Q per sample: [batch, n, n] float64, exactly symmetric."""
    values = torch.as_tensor(values, dtype=torch.float64)
    n = values.numel()
    q = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64))[0]
    a = (q * values) @ q.transpose(1, 2)
    return (a + a.transpose(1, 2)) / 2


def _separated(n: int, batch: int = 1) -> torch.Tensor:
    """PSD with eigenvalues 1, 2, …, n scaled to [0, 1] (gap 1/n) — the eigenvectors are unique."""
    return _with_spectrum(torch.arange(1, n + 1, dtype=torch.float64) / n, batch)


def _sign_normalised(v: torch.Tensor) -> torch.Tensor:
    pivot = v.abs().argmax(dim=-2, keepdim=True)
    return v * torch.sign(v.gather(-2, pivot))


def _check_decomposition(a: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> dict[str, float]:
    """LAPACK's test ratios of (values ascending, vectors) for each matrix of the batch; asserts them."""
    n = a.shape[-1]
    norm = torch.linalg.matrix_norm(a, ord=2).clamp_min(torch.finfo(torch.float64).tiny)  # [B]
    truth = torch.linalg.eigvalsh(a)
    assert torch.all(values[:, 1:] >= values[:, :-1]), "eigenvalues must ascend"
    ratios = {
        "eigenvalues": ((values - truth).abs().amax(1) / (n * EPS * norm)).max().item(),
        "residual": (torch.linalg.matrix_norm(a @ vectors - vectors * values[:, None, :], ord=1) / (n * EPS * norm))
        .max()
        .item(),
        "orthogonality": (
            torch.linalg.matrix_norm(vectors.transpose(1, 2) @ vectors - torch.eye(n, dtype=a.dtype), ord=1) / (n * EPS)
        )
        .max()
        .item(),
    }
    assert max(ratios.values()) < THRESH, ratios
    return ratios


@pytest.mark.parametrize(("n", "batch"), ((1, 2), (2, 2), (3, 2), (8, 2), (13, 1)))
def test_matches_lapack_on_separated_spectra(n, batch):
    a = _separated(n, batch)
    values, vectors = symeig.eigh(a)
    _check_decomposition(a, values, vectors)
    ref_values, ref_vectors = torch.linalg.eigh(a)
    # sin θ bound per column: n ε ‖A‖ / gap, gap = 1/n, ‖A‖ = 1
    bound = THRESH * n * EPS * n
    err = (_sign_normalised(vectors) - _sign_normalised(ref_vectors)).abs().max().item()
    assert err < bound, (err, bound)
    r = (n + 1) // 2
    top = symeig.top_eigenvectors(a, r)
    assert top.shape == (batch, n, r)
    assert (top - reference.top_eigenvectors(a, r)).abs().max().item() < bound


def test_sizes_above_one_tile(monkeypatch):
    """Tiny tiles: n = 9 (N = 10, five pairs) spans three pair blocks, three V row blocks and a 3×3 norm grid,
    so every loop, the mirror stores of off-diagonal tiles and every tail mask run."""
    monkeypatch.setattr(symeig, "_INTERPRETER_CONFIG", dict(BLOCK_P=2, BLOCK_R=4, BLOCK_N=4, num_warps=1))
    a = _separated(9)
    values, vectors = symeig.eigh(a)
    _check_decomposition(a, values, vectors)
    err = (_sign_normalised(vectors) - _sign_normalised(torch.linalg.eigh(a)[1])).abs().max().item()
    assert err < THRESH * 9 * EPS * 9
    monkeypatch.setattr(symeig, "_INTERPRETER_CONFIG", dict(BLOCK_P=4, BLOCK_R=8, BLOCK_N=8, num_warps=1))
    values2, vectors2 = symeig.eigh(a)  # other tiles: another order of the same rotations, same answer
    assert torch.equal(values2, values) and torch.equal(vectors2, vectors)


def test_repeated_and_clustered_eigenvalues():
    """Triple and double eigenvalues and a 1e-9 cluster: eigenvectors are not unique there, so the ratios
    and the projectors onto the top-r subspaces (unique where λ_r > λ_{r+1}) are judged."""
    spectrum = [5.0, 5.0, 5.0, 2.0, 2.0, 1.0 + 1e-9, 1.0, 0.5, 0.0, 0.0]
    a = _with_spectrum(spectrum)
    values, vectors = symeig.eigh(a)
    _check_decomposition(a, values, vectors)
    for r, gap in ((3, 3.0), (5, 1.0), (7, 0.5)):
        top = vectors.flip(-1)[..., :r]
        ref = reference.top_eigenvectors(a, r)
        projector, ref_projector = top @ top.transpose(1, 2), ref @ ref.transpose(1, 2)
        assert (projector - ref_projector).abs().max().item() < THRESH * 10 * EPS * 5 / gap, r


def test_indefinite_input_and_extreme_scales():
    """General symmetric input (eigenvalues below -1: the padded row of odd n stays decoupled whatever its
    diagonal), and matrices near overflow / underflow (each is scaled by its largest entry first)."""
    a = _with_spectrum([-9.0, -3.0, -1.5, 0.0, 2.0, 4.0, 8.0])
    values, vectors = symeig.eigh(a)
    _check_decomposition(a, values, vectors)
    for scale in (1e250, 1e-250):
        values_s, vectors_s = symeig.eigh(a * scale)
        assert torch.allclose(values_s / scale, values, rtol=0, atol=THRESH * 7 * EPS * 9)
        assert torch.allclose(_sign_normalised(vectors_s), _sign_normalised(vectors), rtol=0, atol=1e-12)


def test_diagonal_and_zero_matrices_take_no_sweep():
    d = torch.diag_embed(torch.tensor([[3.0, -1.0, 2.0, 0.5, 7.0], [0.0] * 5], dtype=torch.float64))
    values, vectors, sweeps = symeig.jacobi_eigh_fwd(d)
    assert sweeps.tolist() == [0, 0]
    assert torch.equal(values, torch.diagonal(d, dim1=1, dim2=2))
    assert torch.equal(vectors, torch.eye(5, dtype=torch.float64).expand(2, 5, 5))


def test_sweeps_stop_on_convergence():
    _, _, sweeps = symeig.jacobi_eigh_fwd(_separated(10, batch=2))
    assert 3 <= sweeps.min().item() and sweeps.max().item() <= 10, sweeps  # quadratic convergence
    _, _, capped = symeig.jacobi_eigh_fwd(_separated(10), max_sweeps=2)
    assert capped.tolist() == [2]


def test_nan_sample_in_a_batch_gives_nan_only_there():
    good = _separated(6, batch=3)
    bad = good.clone()
    bad[1, 4, 2] = float("nan")
    bad[2, 0, 0] = float("inf")
    values, vectors = symeig.eigh(bad)
    assert values[1:].isnan().all() and vectors[1:].isnan().all()
    alone_values, alone_vectors = symeig.eigh(good[:1])
    assert torch.equal(values[:1], alone_values) and torch.equal(vectors[:1], alone_vectors)
    top = symeig.top_eigenvectors(bad, 3)
    assert top[1:].isnan().all() and torch.equal(top[:1], symeig.top_eigenvectors(good[:1], 3))
    ref = reference.top_eigenvectors(bad, 3)
    assert torch.equal(top.isnan(), ref.isnan())


def test_strided_input_and_the_lower_triangle():
    """A non-contiguous view gives bitwise the contiguous input's answer; only the lower triangle is read
    (as torch.linalg.eigh's default)."""
    a = _separated(5, batch=2)
    big = torch.zeros(5, 2, 10, dtype=torch.float64)
    big[:, :, ::2] = a.permute(1, 0, 2)
    view = big[:, :, ::2].permute(1, 0, 2)
    assert not view.is_contiguous()
    expected = symeig.eigh(a)
    for got in (symeig.eigh(view), symeig.eigh(torch.tril(a) + torch.triu(torch.full_like(a, 123.0), 1))):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_no_host_read():
    a = _separated(6, batch=2)
    symeig.top_eigenvectors(a, 2)  # the kernel is compiled (interpreted) once outside the count
    with HostSyncCounter() as syncs:
        symeig.top_eigenvectors(a, 2)
        symeig.eigh(a)
    assert syncs.events == []
    with HostSyncCounter() as syncs:
        torch.linalg.eigh(a)  # what it replaces: the counter does see LAPACK's info check
    assert syncs.count == 1


def test_compiles_with_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    a = _separated(5, batch=2)

    def basis(m):
        return symeig.top_eigenvectors(m * 2.0, 3)

    compiled = torch.compile(basis, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(a), basis(a))
    torch._dynamo.reset()


def test_input_errors():
    a = _separated(4)
    with pytest.raises(TypeError, match=r"symeig.eigh: matrix must be float64 .*got torch.float32"):
        symeig.eigh(a.float())
    with pytest.raises(ValueError, match=r"symeig.eigh: matrix must be \[B, n, n\] .*got \[1, 4, 3\]"):
        symeig.eigh(a[..., :3])
    with pytest.raises(ValueError, match=r"matrix must be \[B, n, n\]"):
        symeig.eigh(a[0])
    too_big = torch.zeros(1, symeig.TRITON_MAX_N + 1, symeig.TRITON_MAX_N + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"the Jacobi kernel takes n <= {symeig.TRITON_MAX_N}; got n = 257"):
        symeig.eigh(too_big)
    with pytest.raises(TypeError, match="matrix must be a torch.Tensor"):
        symeig.eigh(a.numpy())


def test_factor_basis_runs_the_kernel_on_the_triton_backend_only(monkeypatch):
    """auto on CPU keeps LAPACK; an explicit triton request runs the kernel, and raises past its size limit."""
    calls = []
    real = symeig.top_eigenvectors
    monkeypatch.setattr(symeig, "top_eigenvectors", lambda *a: calls.append(1) or real(*a))
    fused = torch.randn(2, 6, 5, 4)
    e2pa_kernels.factor_basis(fused, 2)
    assert calls == []
    with e2pa_kernels.use_backend("triton"):
        e2pa_kernels.factor_basis(fused, 2)
        assert calls == [1]
        with pytest.raises(e2pa_kernels.BackendUnavailableError, match=r"takes C <= 256 channels; got C = 257"):
            e2pa_kernels.factor_basis(torch.randn(1, 257, 2), 2)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 7),
    batch=st.integers(1, 2),
    log_scale=st.floats(-3, 3),
    repeat=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_properties(n, batch, log_scale, repeat, seed):
    """Any symmetric matrix (indefinite, scaled, with a repeated eigenvalue or not): eigenvalues ascending,
    V orthonormal, A V = V Λ, each to LAPACK's test ratios."""
    torch.manual_seed(seed)  # the example's tensors follow from the example: a failure reproduces
    spectrum = torch.randn(n, dtype=torch.float64) * 10**log_scale
    if repeat and n > 2:
        spectrum[1] = spectrum[0]
    a = _with_spectrum(spectrum, batch)
    values, vectors = symeig.eigh(a)
    _check_decomposition(a, values, vectors)


@pytest.mark.gpu
def test_gpu_matches_lapack_without_a_sync():
    """The compiled kernel at ESA's default size (C = 128, batch 2) and at the limit."""
    for n in (128, 33, symeig.TRITON_MAX_N):
        f = torch.randn(2, n, 4096, dtype=torch.float64, device="cuda")
        f = f / f.norm(dim=1, keepdim=True)
        a = f @ f.transpose(1, 2) / f.shape[-1]
        symeig.eigh(a)
        with HostSyncCounter() as syncs:
            values, vectors = symeig.eigh(a)
        assert syncs.events == []
        _check_decomposition(a, values, vectors)
        assert symeig.jacobi_eigh_fwd(a)[2].max().item() <= 15
