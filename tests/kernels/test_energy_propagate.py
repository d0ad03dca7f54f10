"""energy_propagate: reference gradcheck, every implementation against the reference (forward and the
gradients from all three outputs), missing modalities, layouts, properties, memory and input errors."""

from __future__ import annotations

import importlib

import pytest
import torch
from _oracle import check_op
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import e2pa_kernels
from e2pa_kernels import reference
from e2pa_kernels._runtime import launch_as_gpu

BACKENDS = ("torch", "triton")  # "triton" runs in the interpreter on CPU
OUTPUTS = ("xi", "weights", "energies")
INF = float("inf")
module = importlib.import_module("e2pa_kernels.energy_propagate")


def _call(x, xi0, log_prior=None, beta=1.0, steps=3):
    return e2pa_kernels.energy_propagate(x, xi0, log_prior, beta, steps)


def _prior(B, M, S, absent=0.0, all_absent=0.0):
    """Random log-priors; a fraction of (voxel, modality) entries and of whole voxels set to -inf."""
    a = torch.randn(B, M, *S, dtype=torch.float64)
    a[torch.rand(a.shape) < absent] = -INF
    a[(torch.rand(B, 1, *S) < all_absent).expand_as(a)] = -INF
    return a


def _inputs(B, M, C, S, *, steps=3, beta=1.0, prior=True, absent=0.0, all_absent=0.0, scale=1.0):
    """Features of norm ~scale per voxel, so the scores β⟨x_m, ξ⟩ are O(β·scale²)."""
    inputs = dict(
        x=torch.randn(B, M, C, *S, dtype=torch.float64) * scale / C**0.5,
        xi0=torch.randn(B, C, *S, dtype=torch.float64) * scale / C**0.5,
        beta=beta,
        steps=steps,
    )
    if prior:
        inputs["log_prior"] = _prior(B, M, S, absent, all_absent)
    return inputs


def _grads(inputs):
    return tuple(k for k in ("x", "xi0", "log_prior") if k in inputs)


# The interpreter runs blocks of 16 voxels and 2 channels: every case spans several of each (tails too).
CASES = {
    # 3-D, odd sizes, some modalities absent at some voxels
    "3d-odd": dict(B=2, M=3, C=5, S=(3, 2, 5), absent=0.2),
    # 2-D without a prior (None = 0)
    "2d-no-prior": dict(B=1, M=4, C=4, S=(5, 7), prior=False),
    # one modality: the weights are 1 (0 where absent), ξ = x after one step
    "M1": dict(B=2, M=1, C=3, S=(17,), steps=2, absent=0.2),
    # the largest modality count the kernels take
    "M8": dict(B=1, M=8, C=3, S=(18,), steps=2, absent=0.3),
    # one channel
    "C1": dict(B=1, M=3, C=1, S=(3, 7)),
    "steps1": dict(B=1, M=3, C=5, S=(19,), steps=1, absent=0.1),
    "steps8": dict(B=1, M=2, C=3, S=(17,), steps=8),
    # voxels with every modality absent: ξ = 0, weights 0, energies +inf, gradients 0
    "all-absent": dict(B=2, M=3, C=4, S=(3, 6), absent=0.3, all_absent=0.25),
    # sharp softmax: β⟨x_m, ξ⟩ ~ 30
    "large-beta": dict(B=1, M=4, C=4, S=(18,), beta=30.0),
}


def test_reference_gradcheck():
    """The reference's own gradients (plain autograd of the literal loop) in float64, including absent
    modalities and an all-absent voxel; +inf energies are masked out of the checked function."""
    inputs = _inputs(1, 3, 4, (2, 3), steps=2, beta=0.8, absent=0.3)
    inputs["log_prior"][0, :, 1, 2] = -INF
    x, xi0, a = (inputs[k].requires_grad_() for k in ("x", "xi0", "log_prior"))

    def f(x, xi0, a):
        xi, w, e = reference.energy_propagate(x, xi0, a, 0.8, 2)
        return xi, w, torch.where(torch.isfinite(e), e, 0.0)

    assert torch.autograd.gradcheck(f, (x, xi0, a), fast_mode=True)  # the literal loop is slow to differentiate


def test_torch_path_gradcheck():
    """The hand-written VJP (the same formulas as the kernels) against finite differences, float64."""
    inputs = _inputs(1, 3, 5, (4, 2), steps=3, beta=1.3, absent=0.25)
    inputs["log_prior"][0, :, 2, 1] = -INF
    x, xi0, a = (inputs[k].requires_grad_() for k in ("x", "xi0", "log_prior"))

    def f(x, xi0, a):
        with e2pa_kernels.use_backend("torch"):
            xi, w, e = e2pa_kernels.energy_propagate(x, xi0, a, 1.3, 3)
        return xi, w, torch.where(torch.isfinite(e), e, 0.0)

    assert torch.autograd.gradcheck(f, (x, xi0, a))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, backend, dtype):
    inputs = _inputs(**CASES[case])
    check_op(_call, inputs, backend, dtype, _grads(inputs), OUTPUTS)


# The launchers' GPU tiles (launch_as_gpu: the blocks, warps and register cap a GPU gets), run by the
# interpreter: the one-pass kernels at the smallest and the widest tile class, and the two-pass ones.
GPU_TILE_CASES = {
    "M4-C16-one-pass": dict(B=2, M=4, C=16, S=(5, 9), absent=0.2),
    "M3-C40-one-pass": dict(B=1, M=3, C=40, S=(3, 7)),
    "M2-C130-two-pass": dict(B=1, M=2, C=130, S=(150,), prior=False),
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("case", list(GPU_TILE_CASES))
def test_gpu_tiles_match_reference(case, dtype):
    inputs = _inputs(**GPU_TILE_CASES[case])
    with launch_as_gpu():
        check_op(_call, inputs, "triton", dtype, _grads(inputs), OUTPUTS)


def test_torch_path_in_voxel_chunks(monkeypatch):
    """The memory-lean path runs in voxel chunks (forward and backward): the same answers."""
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 300)  # chunks of a handful of voxels
    inputs = _inputs(2, 3, 7, (9, 11), steps=3, absent=0.2, all_absent=0.1)
    check_op(_call, inputs, "torch", torch.float32, _grads(inputs), OUTPUTS)


def test_torch_path_float64_matches_reference():
    inputs = _inputs(2, 4, 6, (5, 3), steps=4, absent=0.2, all_absent=0.1)
    check_op(_call, inputs, "torch", torch.float64, _grads(inputs), OUTPUTS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ("xi", "weights", "energies"))
def test_gradient_from_each_output_alone(backend, used):
    """Each output alone carries the gradient (the others' upstream gradients are None)."""
    inputs = _inputs(1, 3, 3, (20,), steps=2, absent=0.2, all_absent=0.1)
    index = OUTPUTS.index(used)
    grads = {}
    for name in ("reference", backend):
        x, xi0, a = (inputs[k].float().requires_grad_() for k in ("x", "xi0", "log_prior"))
        with e2pa_kernels.use_backend(name):
            out = _call(x, xi0, a, inputs["beta"], inputs["steps"])[index]
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        loss = (torch.where(torch.isfinite(out), out, 0.0) * g).sum()
        grads[name] = torch.autograd.grad(loss, (x, xi0, a))
    for got, want in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Modality- and channel-strided slices of x and log_prior, and a channels-last xi0, give the
    same answers (no copies needed for the slices; the channels-last tensor is copied once)."""
    B, M, C, S = 2, 3, 5, (4, 3, 3)
    inputs = _inputs(B, M, C, S, absent=0.2)
    inputs["x"] = (torch.randn(B, M + 2, 2 * C, *S, dtype=torch.float64) / C**0.5)[:, 1:-1, ::2]
    inputs["log_prior"] = _prior(B, M + 1, S, absent=0.2)[:, 1:]
    inputs["xi0"] = inputs["xi0"].contiguous(memory_format=torch.channels_last_3d)
    assert not (inputs["x"].is_contiguous() or inputs["log_prior"].is_contiguous() or inputs["xi0"].is_contiguous())
    check_op(_call, inputs, backend, torch.float32, _grads(inputs), OUTPUTS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_indexing_matches_int32(backend, monkeypatch):
    """The 64-bit offset variant (picked when an offset exceeds 2^31) computes the same thing."""
    inputs = _inputs(2, 3, 3, (19,), absent=0.2, all_absent=0.1)
    monkeypatch.setattr(module, "needs_int64", lambda *t: True)
    check_op(_call, inputs, backend, torch.float32, _grads(inputs), OUTPUTS)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_all_absent_voxels_never_nan(backend):
    """ξ = 0, weights 0, energies +inf; the plain `.sum()` of every output (upstream 1 even at the +inf
    energies) gives finite gradients, exactly 0 at the absent voxels."""
    x, xi0 = torch.randn(1, 3, 4, 20), torch.randn(1, 4, 20)
    a = torch.randn(1, 3, 20)
    a[..., :7] = -INF
    a[0, 1, 7:12] = -INF
    x.requires_grad_(), xi0.requires_grad_(), a.requires_grad_()
    with e2pa_kernels.use_backend(backend):
        xi, w, e = _call(x, xi0, a, 2.0, 3)
    assert torch.equal(xi[..., :7], torch.zeros_like(xi[..., :7]))
    assert torch.equal(w[..., :7], torch.zeros_like(w[..., :7]))
    assert torch.isposinf(e[..., :7]).all() and torch.isfinite(e[..., 7:]).all()
    assert torch.equal(w[0, 1, 7:12], torch.zeros(5))
    grads = torch.autograd.grad(xi.sum() + w.sum() + e.sum(), (x, xi0, a))
    for g in grads:
        assert torch.isfinite(g).all()
        assert torch.equal(g[..., :7], torch.zeros_like(g[..., :7]))
    assert torch.equal(grads[0][0, 1, :, 7:12], torch.zeros(4, 5))  # absent modality: no gradient to x_m
    assert torch.equal(grads[2][0, 1, 7:12], torch.zeros(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_the_inputs(backend):
    """Nothing of size N·steps is kept for the backward: the saved tensors are the inputs themselves."""
    x, xi0, a = torch.randn(1, 3, 4, 20, requires_grad=True), torch.randn(1, 4, 20), torch.randn(1, 3, 20)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with e2pa_kernels.use_backend(backend):
            _call(x, xi0, a, 1.0, 8)
    assert saved and {t.data_ptr() for t in saved} <= {x.data_ptr(), xi0.data_ptr(), a.data_ptr()}


def test_triton_backward_is_deterministic():
    inputs = _inputs(1, 4, 3, (40,), absent=0.2)
    x, xi0, a = (inputs[k].float().requires_grad_() for k in ("x", "xi0", "log_prior"))
    runs = []
    with e2pa_kernels.use_backend("triton"):
        for _ in range(2):
            xi, w, e = _call(x, xi0, a)
            runs.append(
                torch.autograd.grad(xi.sum() + w.sum() + torch.where(torch.isfinite(e), e, 0).sum(), (x, xi0, a))
            )
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# -------------------------------------------------------------------------------------------------
# properties
# -------------------------------------------------------------------------------------------------
def _random_case(data, max_voxels=40):
    B = data.draw(st.integers(1, 2), label="B")
    M = data.draw(st.integers(1, 5), label="M")
    C = data.draw(st.integers(1, 9), label="C")
    N = data.draw(st.integers(1, max_voxels), label="N")
    steps = data.draw(st.integers(1, 8), label="steps")
    beta = data.draw(st.floats(0.05, 20.0), label="beta")
    scale = data.draw(st.floats(0.1, 3.0), label="scale")
    absent = data.draw(st.sampled_from((0.0, 0.3, 0.6)), label="absent")
    inputs = _inputs(B, M, C, (N,), steps=steps, beta=beta, scale=scale, absent=absent, all_absent=0.1)
    return {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def _check_trace_and_weights(inputs, xi, w, e):
    a, x = inputs["log_prior"], inputs["x"]
    available = torch.isfinite(a)
    present = available.any(dim=1)
    # the trace never increases (exact arithmetic; here within fp32 rounding of the energies)
    finite = torch.isfinite(e)
    assert torch.equal(finite, present[:, None].expand_as(e))
    ef = torch.where(finite, e, 0.0).double()
    tol = 1e-5 * (1 + ef.abs().amax(dim=1, keepdim=True))
    rise = ef[:, 1:] - ef[:, :-1]
    assert (rise <= tol).all(), f"energy rose by {rise.max().item():.3g}"
    # weights: ≥ 0, 0 on absent modalities, sum to 1 over available modalities (0 where none)
    assert (w >= 0).all() and torch.equal(w[~available], torch.zeros_like(w[~available]))
    torch.testing.assert_close(w.sum(dim=1), present.to(w.dtype), rtol=0, atol=1e-5)
    absent_entries = xi[~present.unsqueeze(1).expand_as(xi)]
    assert torch.equal(absent_entries, torch.zeros_like(absent_entries))
    # ξ is the weighted mix of the features
    torch.testing.assert_close(xi, torch.einsum("bmn,bmcn->bcn", w, x), rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_hypothesis_torch_trace_never_increases_and_weights_are_shares(data):
    inputs = _random_case(data)
    with e2pa_kernels.use_backend("torch"):
        xi, w, e = _call(**inputs)
    _check_trace_and_weights(inputs, xi, w, e)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hypothesis_triton_trace_never_increases_and_weights_are_shares(data):
    inputs = _random_case(data, max_voxels=24)
    with e2pa_kernels.use_backend("triton"):
        xi, w, e = _call(**inputs)
    _check_trace_and_weights(inputs, xi, w, e)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    M=st.integers(1, 8),
    C=st.integers(1, 7),
    S=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    steps=st.integers(1, 8),
    beta=st.floats(0.1, 4.0),
    scale=st.floats(0.3, 1.3),
    absent=st.sampled_from((0.0, 0.3)),
    with_prior=st.booleans(),
)
def test_hypothesis_triton_matches_reference(B, M, C, S, steps, beta, scale, absent, with_prior):
    """Random shapes (padded modality counts M = 3, 5, 6, 7 included), step counts and priors.

    Sharpness β·scale² stays ≤ ~7: beyond it, several sharp softmax steps amplify rounding so much that
    "within 2x PyTorch's own float32 error" becomes a lottery between equally accurate computations
    (the fixed "large-beta" case covers the sharp regime)."""
    inputs = _inputs(
        B, M, C, tuple(S), steps=steps, beta=beta, scale=scale, prior=with_prior, absent=absent, all_absent=0.1
    )
    check_op(_call, inputs, "triton", torch.float32, _grads(inputs), OUTPUTS)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 6), C=st.integers(1, 5), beta=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
def test_hypothesis_one_available_modality_is_copied(backend, M, C, beta, seed):
    """With one available modality per voxel, one step makes ξ exactly that modality (weight exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    N = 18
    x, xi0 = torch.randn(1, M, C, N, generator=g), torch.randn(1, C, N, generator=g)
    keep = torch.randint(0, M, (1, N), generator=g)
    a = torch.full((1, M, N), -INF)
    a.scatter_(1, keep[:, None], torch.randn(1, 1, N, generator=g))
    with e2pa_kernels.use_backend(backend):
        xi, w, _ = _call(x, xi0, a, beta, 1)
    assert torch.equal(w, torch.zeros_like(w).scatter_(1, keep[:, None], 1.0))
    assert torch.equal(xi, x.gather(1, keep[:, None, None].expand(1, 1, C, N))[:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 6), C=st.integers(1, 5), beta=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
def test_hypothesis_one_step_from_zero_is_prior_weighted_mean(backend, M, C, beta, seed):
    """From ξ0 = 0 every score is the prior alone: one step gives the softmax(a)-weighted mean."""
    g = torch.Generator().manual_seed(seed)
    N = 18
    x, a = torch.randn(1, M, C, N, generator=g), torch.randn(1, M, N, generator=g) * 2
    a[torch.rand(a.shape, generator=g) < 0.3] = -INF
    a[..., 0] = 0.0  # at least one fully available voxel
    with e2pa_kernels.use_backend(backend):
        xi, w, e = _call(x, torch.zeros(1, C, N), a, beta, 1)
    present = torch.isfinite(a).any(dim=1, keepdim=True)
    share = torch.where(present, torch.softmax(torch.where(present, a, 0.0), dim=1), 0.0)
    torch.testing.assert_close(w, share, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xi, torch.einsum("bmn,bmcn->bcn", share, x), rtol=1e-5, atol=1e-6)
    # E(ξ_0 = 0) = -(1/β)·logsumexp(a)
    e0 = torch.where(present[:, 0], -torch.logsumexp(torch.where(present, a, 0.0), dim=1) / beta, INF)
    torch.testing.assert_close(e[:, 0], e0, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------
# dispatch and input errors: each names the argument and what was expected
# -------------------------------------------------------------------------------------------------
def _ok():
    return torch.randn(2, 3, 8, 5, 4), torch.randn(2, 8, 5, 4), torch.randn(2, 3, 5, 4)


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda x, xi0, a: (x.numpy(), xi0, a), TypeError, r"x must be a torch.Tensor"),
        (lambda x, xi0, a: (x.int(), xi0, a), TypeError, r"x must have dtype"),
        (lambda x, xi0, a: (x[:, :, :, 0, 0], xi0, a), ValueError, r"x must have at least 4 dimensions"),
        (lambda x, xi0, a: (x[:, :0], xi0, a[:, :0]), ValueError, r"x must be \[B, M, C, \*S\] with M, C >= 1"),
        (
            lambda x, xi0, a: (x, xi0[:, :7], a),
            ValueError,
            r"xi0 must have shape \[B, C, \*S\].* = \[2, 8, 5, 4\]; "
            r"got \[2, 7, 5, 4\]",
        ),
        (
            lambda x, xi0, a: (x, xi0, a[:, :2]),
            ValueError,
            r"log_prior must have shape \[B, M, \*S\].* = \[2, 3, 5, 4\]",
        ),
        (lambda x, xi0, a: (x, xi0.double(), a), TypeError, r"xi0 must have x's dtype float32; got float64"),
        (lambda x, xi0, a: (x, xi0, a.half()), TypeError, r"log_prior must have x's dtype float32; got float16"),
        (lambda x, xi0, a: (x, xi0, a.long()), TypeError, r"log_prior must have dtype"),
        (lambda x, xi0, a: (x, xi0.to("meta"), a), ValueError, r"one device.*xi0 is on meta"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, pattern):
    x, xi0, a = mutate(*_ok())
    with pytest.raises(error, match=pattern):
        e2pa_kernels.energy_propagate(x, xi0, a)


def test_bad_scalars_and_priors():
    x, xi0, a = _ok()
    for beta in (0.0, -1.0, float("nan"), INF):
        with pytest.raises(ValueError, match="beta must be a finite positive number"):
            e2pa_kernels.energy_propagate(x, xi0, a, beta=beta)
    with pytest.raises(TypeError, match="beta must be a Python float"):
        e2pa_kernels.energy_propagate(x, xi0, a, beta=torch.tensor(1.0))
    for steps in (0, 9, -1):
        with pytest.raises(ValueError, match=r"steps must lie in \[1, 8\]; got"):
            e2pa_kernels.energy_propagate(x, xi0, a, steps=steps)
    for steps in (2.0, True, "3"):
        with pytest.raises(TypeError, match="steps must be an int"):
            e2pa_kernels.energy_propagate(x, xi0, a, steps=steps)


def test_explicit_triton_refuses_what_it_cannot_run():
    x, xi0, a = (t.double() for t in _ok())
    with e2pa_kernels.use_backend("triton"), pytest.raises(e2pa_kernels.BackendUnavailableError, match="float64"):
        e2pa_kernels.energy_propagate(x, xi0, a)
    with e2pa_kernels.use_backend("triton"), pytest.raises(e2pa_kernels.BackendUnavailableError, match="bfloat16"):
        e2pa_kernels.energy_propagate(x.bfloat16(), xi0.bfloat16(), a.bfloat16())
    x9, a9 = torch.randn(1, 9, 4, 6), torch.randn(1, 9, 6)
    with e2pa_kernels.use_backend("triton"), pytest.raises(e2pa_kernels.BackendUnavailableError, match="M <= 8"):
        e2pa_kernels.energy_propagate(x9, torch.randn(1, 4, 6), a9)
    # auto falls back to the torch path instead
    xi, w, e = e2pa_kernels.energy_propagate(x9, torch.randn(1, 4, 6), a9, steps=2)
    assert xi.shape == (1, 4, 6) and w.shape == (1, 9, 6) and e.shape == (1, 3, 6)


def test_empty_spatial_extent():
    x, xi0, a = torch.randn(2, 3, 4, 0, 5), torch.randn(2, 4, 0, 5), torch.randn(2, 3, 0, 5)
    for backend in BACKENDS:
        with e2pa_kernels.use_backend(backend):
            xi, w, e = e2pa_kernels.energy_propagate(x, xi0, a, steps=2)
        assert xi.shape == (2, 4, 0, 5) and w.shape == (2, 3, 0, 5) and e.shape == (2, 3, 0, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("M", (4, 8))
def test_gpu_matches_reference(dtype, M):
    inputs = {
        k: (v.cuda() if isinstance(v, torch.Tensor) else v)
        for k, v in _inputs(2, M, 48, (24, 20, 17), steps=3, absent=0.2, all_absent=0.05).items()
    }
    check_op(_call, inputs, "triton", dtype, _grads(inputs), OUTPUTS)


# The compiled configs' blocks are large: channel counts that leave a partial channel block, voxel
# counts not divisible by 16, absent modalities (-inf priors: the mask) and whole absent voxels, fp32/bf16.
GPU_TAILS = {
    "C37-693vox-absent": dict(B=2, M=4, C=37, S=(7, 9, 11), absent=0.2, all_absent=0.05),
    "C130-M3-195vox": dict(B=1, M=3, C=130, S=(5, 13, 3), steps=2, absent=0.1),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("case", list(GPU_TAILS))
def test_gpu_channel_and_voxel_tails(case, dtype):
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _inputs(**GPU_TAILS[case]).items()}
    check_op(_call, inputs, "triton", dtype, _grads(inputs), OUTPUTS)
