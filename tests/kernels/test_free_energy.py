"""free_energy: reference gradcheck, every implementation against the reference (forward and every
gradient), layouts, properties, determinism and input errors."""

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


def _call(x, weight, bias=None, target=None, temperature=1.0, ignore_index=-100, spatial_dims=None):
    return e2pa_kernels.free_energy(x, weight, bias, temperature, target, ignore_index, spatial_dims=spatial_dims)


def _inputs(B, M, C, S, K, *, bias=True, target=True, modal=True, scale=1.0, temperature=1.0, ignore_frac=0.1):
    shape = (B, M, C, *S) if modal else (B, C, *S)
    x = torch.randn(*shape, dtype=torch.float64) * scale
    inputs = dict(x=x, weight=torch.randn(K, C, dtype=torch.float64) / C**0.5, temperature=temperature)
    if bias:
        inputs["bias"] = torch.randn(K, dtype=torch.float64)
    if target:
        t = torch.randint(0, K, (B, *S))
        t[torch.rand(t.shape) < ignore_frac] = -100
        inputs["target"] = t
    return inputs


def _grads(inputs):
    return tuple(k for k in ("x", "weight", "bias") if k in inputs)


def _outputs(inputs):
    return ("energy", "ce") if "target" in inputs else ("energy",)


CASES = {
    # 3-D, modality axis, odd sizes: 315 voxels span ten 32-voxel blocks, C=37 three channel blocks
    "3d-modal-odd": dict(B=2, M=3, C=37, S=(5, 7, 9), K=5),
    # 2-D without the modality axis, one class, no bias, no target
    "2d-plain-K1": dict(B=3, M=1, C=20, S=(13, 11), K=1, bias=False, target=False, modal=False),
    # 16 classes, 64 channels, a low temperature
    "K16-C64-T0.3": dict(B=1, M=2, C=64, S=(70,), K=16, temperature=0.3),
    # large logits (|z| ~ 1e3): logsumexp must not overflow
    "large-logits": dict(B=1, M=2, C=24, S=(6, 6), K=7, scale=300.0, temperature=2.0),
    # everything ignored: ce is 0 and gives no gradient
    "all-ignored": dict(B=1, M=2, C=8, S=(40,), K=3, ignore_frac=1.0),
}


def test_reference_gradcheck():
    inputs = _inputs(1, 2, 5, (3, 2), 4, temperature=0.7)
    x, w, b, t = (inputs[k].requires_grad_() if k != "target" else inputs[k] for k in ("x", "weight", "bias", "target"))
    assert torch.autograd.gradcheck(lambda x, w, b: reference.free_energy(x, w, b, 0.7, t), (x, w, b))
    x2 = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: reference.free_energy(x, w, None, 1.5), (x2, w))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, backend, dtype):
    inputs = _inputs(**CASES[case])
    check_op(_call, inputs, backend, dtype, _grads(inputs), _outputs(inputs))


# The launchers' GPU tiles (launch_as_gpu: the blocks, warps, register cap and persistent grid a GPU gets),
# run by the interpreter: the one-pass backward at C <= 64 (fp32 K 16 × C 64 with maxnreg) and the two-pass
# one above it, voxel tails included.
GPU_TILE_CASES = {
    "C64-K5": dict(B=2, M=2, C=64, S=(5, 9), K=5),
    "C37-K16": dict(B=1, M=3, C=37, S=(7, 7), K=16),
    "C80-two-pass": dict(B=1, M=1, C=80, S=(70,), K=3),
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("case", list(GPU_TILE_CASES))
def test_gpu_tiles_match_reference(case, dtype):
    inputs = _inputs(**GPU_TILE_CASES[case])
    with launch_as_gpu():
        check_op(_call, inputs, "triton", dtype, _grads(inputs), _outputs(inputs))


@pytest.mark.parametrize("temperature", (1.0, 0.6))
def test_torch_path_in_voxel_chunks(monkeypatch, temperature):
    """The memory-lean path runs in voxel chunks (forward and backward, dW/db summed over chunks)."""
    module = importlib.import_module("e2pa_kernels.free_energy")  # the attribute is the function
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 400)  # chunks of a handful of voxels
    inputs = _inputs(2, 3, 9, (8, 13), 5, temperature=temperature)
    assert len(module._chunks(inputs["x"].view(2, 3, 9, -1), 5)) > 5
    check_op(_call, inputs, "torch", torch.float32, _grads(inputs), _outputs(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Channel-strided, channels-last and transposed-weight inputs give the same answers."""
    inputs = _inputs(2, 2, 30, (6, 5, 3), 4)
    wide = torch.randn(2, 2, 60, 6, 5, 3, dtype=torch.float64)
    inputs["x"] = wide[:, :, ::2]  # stride 2 along channels, voxels still unit-stride
    assert not inputs["x"].is_contiguous()
    inputs["weight"] = torch.randn(30, 4, dtype=torch.float64).t()
    check_op(_call, inputs, backend, torch.float32, _grads(inputs), _outputs(inputs))
    plain = _inputs(2, 1, 12, (5, 4, 3), 3, modal=False, target=False)
    plain["x"] = plain["x"].contiguous(memory_format=torch.channels_last_3d)
    check_op(_call, plain, backend, torch.float32, _grads(plain), _outputs(plain))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_indexing_matches_int32(backend, monkeypatch):
    """The 64-bit offset variant (picked when an offset exceeds 2^31) computes the same thing."""
    import importlib

    module = importlib.import_module("e2pa_kernels.free_energy")
    inputs = _inputs(2, 2, 19, (33,), 6)
    monkeypatch.setattr(module, "needs_int64", lambda *t: True)
    check_op(_call, inputs, backend, torch.float32, _grads(inputs), _outputs(inputs))


def test_triton_backward_is_deterministic():
    x = torch.randn(2, 3, 40, 97, requires_grad=True)
    w = torch.randn(6, 40, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    g = torch.randn(2, 3, 97)
    with e2pa_kernels.use_backend("triton"):
        first = torch.autograd.grad((e2pa_kernels.free_energy(x, w, b) * g).sum(), (x, w, b))
        second = torch.autograd.grad((e2pa_kernels.free_energy(x, w, b) * g).sum(), (x, w, b))
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_shift_equivariance(backend):
    """Adding a constant to every logit shifts the energy by exactly minus that constant."""
    x, w, b = torch.randn(1, 2, 9, 50), torch.randn(4, 9), torch.randn(4)
    with e2pa_kernels.use_backend(backend):
        e0 = e2pa_kernels.free_energy(x, w, b, 0.5)
        e1 = e2pa_kernels.free_energy(x, w, b + 3.25, 0.5)
    torch.testing.assert_close(e1, e0 - 3.25, rtol=0, atol=1e-5)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    M=st.integers(1, 3),
    C=st.integers(1, 40),
    K=st.integers(1, 20),
    S=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    log_scale=st.floats(-2, 2.5),
    temperature=st.floats(0.1, 10.0),
    with_bias=st.booleans(),
    with_target=st.booleans(),
)
def test_hypothesis_triton_matches_reference(B, M, C, K, S, log_scale, temperature, with_bias, with_target):
    inputs = _inputs(
        B, M, C, tuple(S), K, bias=with_bias, target=with_target, scale=10**log_scale, temperature=temperature
    )
    inputs["spatial_dims"] = len(S)
    out = _call(
        **{k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}
    )
    for o in out if isinstance(out, tuple) else (out,):
        assert torch.isfinite(o).all()  # no overflow, whatever the logit scale
    check_op(_call, inputs, "triton", torch.float32, _grads(inputs), _outputs(inputs))


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-50, 50), temperature=st.floats(0.05, 20.0))
def test_hypothesis_energy_shift_equivariant_in_bias(shift, temperature):
    x, w, b = (
        torch.randn(1, 2, 6, 11, dtype=torch.float64),
        torch.randn(3, 6, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
    )
    with e2pa_kernels.use_backend("torch"):
        e0 = e2pa_kernels.free_energy(x, w, b, temperature)
        e1 = e2pa_kernels.free_energy(x, w, b + shift, temperature)
    torch.testing.assert_close(e1, e0 - shift, rtol=1e-9, atol=1e-9)


# -------------------------------------------------------------------------------------------------
# input errors: each names the argument and what was expected
# -------------------------------------------------------------------------------------------------
def _ok():
    return torch.randn(2, 3, 8, 5, 5), torch.randn(4, 8), torch.randn(4)


@pytest.mark.parametrize(
    "mutate, error, pattern",
    [
        (lambda x, w, b: (x, w[:, :7], b), ValueError, r"x must be .*C = 7|weight"),
        (lambda x, w, b: (x, w, b[:3]), ValueError, r"bias must have shape \[K\] = \[4\]; got \[3\]"),
        (lambda x, w, b: (x.int(), w, b), TypeError, r"x must have dtype"),
        (
            lambda x, w, b: (x, w[None], b),
            ValueError,
            r"weight must have 2 to 2 dimensions|weight must have 2 dimensions",
        ),
        (lambda x, w, b: (x, w, b.to("meta")), ValueError, r"one device.*bias is on meta"),
        (lambda x, w, b: (x.numpy(), w, b), TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, pattern):
    x, w, b = mutate(*_ok())
    with pytest.raises(error, match=pattern):
        e2pa_kernels.free_energy(x, w, b)


def test_bad_target_and_scalars():
    x, w, b = _ok()
    with pytest.raises(ValueError, match=r"target must have shape \[B, \*S\]"):
        e2pa_kernels.free_energy(x, w, b, target=torch.zeros(2, 5, 4, dtype=torch.long), spatial_dims=2)
    bad = torch.zeros(2, 5, 5, dtype=torch.long)
    bad[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 3\].*\[9\]"):
        e2pa_kernels.free_energy(x, w, b, target=bad)
    with pytest.raises(TypeError, match="target must have dtype"):
        e2pa_kernels.free_energy(x, w, b, target=bad.float())
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite positive number"):
            e2pa_kernels.free_energy(x, w, b, temperature=t)
    with pytest.raises(TypeError, match="temperature must be a Python float"):
        e2pa_kernels.free_energy(x, w, b, temperature=torch.tensor(1.0))


def test_ambiguous_layout_asks_for_spatial_dims():
    x, w = torch.randn(2, 8, 8, 5, 5), torch.randn(3, 8)
    with pytest.raises(ValueError, match="pass spatial_dims="):
        e2pa_kernels.free_energy(x, w)
    as_modalities = e2pa_kernels.free_energy(x, w, spatial_dims=2)  # [B, M=8, C=8, 5, 5]
    as_volume = e2pa_kernels.free_energy(x, w, spatial_dims=3)  # [B, C=8, 8, 5, 5]
    torch.testing.assert_close(as_modalities, -torch.logsumexp(torch.einsum("kc,bmcyx->bmkyx", w, x), dim=2))
    torch.testing.assert_close(as_volume, -torch.logsumexp(torch.einsum("kc,bczyx->bkzyx", w, x), dim=1))
    assert not torch.allclose(as_modalities, as_volume)


def test_explicit_triton_refuses_what_it_cannot_run():
    x, w = torch.randn(1, 2, 8, 10, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    with e2pa_kernels.use_backend("triton"), pytest.raises(e2pa_kernels.BackendUnavailableError, match="float64"):
        e2pa_kernels.free_energy(x, w)
    with e2pa_kernels.use_backend("triton"), pytest.raises(e2pa_kernels.BackendUnavailableError, match="K <= 64"):
        e2pa_kernels.free_energy(x.float(), torch.randn(65, 8))
    with e2pa_kernels.use_backend("triton"), pytest.raises(e2pa_kernels.BackendUnavailableError, match="bfloat16"):
        e2pa_kernels.free_energy(x.bfloat16(), w.bfloat16())
    # auto falls back to the torch path instead
    assert e2pa_kernels.free_energy(x.float(), torch.randn(65, 8)).shape == (1, 2, 10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_gpu_matches_reference(dtype):
    inputs = {
        k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _inputs(2, 4, 96, (24, 20, 17), 4).items()
    }
    check_op(_call, inputs, "triton", dtype, _grads(inputs), _outputs(inputs))


# The compiled configs' blocks are large (BLOCK_C 32-128, BLOCK_N 64-256): channel counts that leave a
# partial channel block and voxel counts not divisible by 16 (rows not 16-byte aligned), fp32 and bf16.
GPU_TAILS = {
    "C37-693vox": dict(B=2, M=4, C=37, S=(7, 9, 11), K=4),
    "C130-K16-195vox": dict(B=1, M=3, C=130, S=(5, 13, 3), K=16, temperature=0.6),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("case", list(GPU_TAILS))
def test_gpu_channel_and_voxel_tails(case, dtype):
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _inputs(**GPU_TAILS[case]).items()}
    check_op(_call, inputs, "triton", dtype, _grads(inputs), _outputs(inputs))
