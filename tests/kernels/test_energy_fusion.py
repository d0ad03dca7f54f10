"""energy_fusion (one EHF level as one node): every implementation against the reference composition
(forward and every gradient: x, weight, bias, xi0), masks, targets, layouts, chunks, a NaN in an
absent modality, what is saved for backward, and input errors."""

from __future__ import annotations

import importlib

import pytest
import torch
from _oracle import check_op

import e2pa_kernels
from e2pa_kernels import reference
from e2pa_kernels._runtime import launch_as_gpu

BACKENDS = ("torch", "triton")  # "triton" runs in the interpreter on CPU
module = importlib.import_module("e2pa_kernels.energy_fusion")
INF = float("inf")


def _call(x, weight, bias=None, xi0=None, modality_mask=None, target=None, **params):
    out = e2pa_kernels.energy_fusion(x, weight, bias, modality_mask, xi0, target=target, **params)
    return tuple(o for o in out if o is not None)


def _outputs(inputs):
    return ("fused", "weights", "trace", "energies") + (("ce",) if inputs.get("target") is not None else ())


def _grads(inputs):
    return tuple(k for k in ("x", "weight", "bias", "xi0") if inputs.get(k) is not None)


def _inputs(
    B,
    M,
    C,
    K,
    S,
    *,
    mask=None,
    xi0=False,
    target=False,
    bias=True,
    ignore=0.0,
    temperature=1.0,
    prior_temperature=1.0,
    beta=1.0,
    steps=3,
):
    gen = torch.Generator().manual_seed(hash((B, M, C, K, S, xi0, target)) % 2**31)
    inputs = dict(
        x=torch.randn(B, M, C, *S, generator=gen, dtype=torch.float64) / C**0.5,
        weight=torch.randn(K, C, generator=gen, dtype=torch.float64),
        bias=torch.randn(K, generator=gen, dtype=torch.float64) if bias else None,
        xi0=torch.randn(B, C, *S, generator=gen, dtype=torch.float64) / C**0.5 if xi0 else None,
        modality_mask=None if mask is None else torch.tensor(mask),
        temperature=temperature,
        prior_temperature=prior_temperature,
        beta=beta,
        steps=steps,
    )
    if target:
        t = torch.randint(0, K, (B, *S), generator=gen)
        t[torch.rand(t.shape, generator=gen) < ignore] = -100
        inputs["target"] = t
    return inputs


# The interpreter's blocks are 16–32 voxels and 2–16 channels: each case spans several (tails too).
CASES = {
    # first level (masked mean), a modality missing in one sample, deep supervision with ignored voxels
    "level0-masked-target": dict(
        B=2, M=3, C=5, K=4, S=(3, 4, 5), mask=[[True, False, True], [True, True, True]], target=True, ignore=0.2
    ),
    # no mask at all, T ≠ 1 and τ ≠ 1
    "level0-temperatures": dict(B=1, M=4, C=6, K=3, S=(7, 5), temperature=0.7, prior_temperature=1.6, beta=0.8),
    # a deeper level: ξ0 given (ψ of the previous level), its gradient returned
    "level1-xi0": dict(
        B=2, M=3, C=4, K=5, S=(2, 3, 6), xi0=True, mask=[[False, True, True], [True, True, False]], target=True
    ),
    # one modality; no bias
    "M1-no-bias": dict(B=2, M=1, C=3, K=2, S=(19,), bias=False, steps=2),
    # more channels than one channel block, more classes than one class tile in the interpreter
    "C20-K17": dict(B=1, M=2, C=20, K=17, S=(5, 7), steps=1, target=True),
}


def test_reference_gradcheck():
    """The reference composition's own gradients in float64, a masked modality and a target included
    (+inf energies of the absent modality masked out of the checked function)."""
    inputs = _inputs(2, 3, 3, 3, (2, 3), mask=[[True, False, True], [True, True, True]], xi0=True, target=True, steps=2)
    x, w, b, xi0 = (inputs[k].requires_grad_() for k in ("x", "weight", "bias", "xi0"))

    def f(x, w, b, xi0):
        fused, weights, trace, energies, ce = reference.energy_fusion(
            x, w, b, inputs["modality_mask"], xi0, steps=2, target=inputs["target"]
        )
        return fused, weights, trace, torch.where(torch.isfinite(energies), energies, 0.0), ce

    assert torch.autograd.gradcheck(f, (x, w, b, xi0), fast_mode=True)


@pytest.mark.parametrize("xi0", (False, True), ids=("mean", "xi0"))
def test_torch_path_gradcheck(xi0):
    """The hand-written single-pass VJP against finite differences, float64."""
    inputs = _inputs(
        2,
        3,
        4,
        3,
        (3, 2),
        mask=[[True, True, False], [True, True, True]],
        xi0=xi0,
        target=True,
        temperature=0.8,
        prior_temperature=1.3,
        steps=2,
    )
    names = _grads(inputs)
    tensors = tuple(inputs[k].requires_grad_() for k in names)

    def f(*args):
        kwargs = {**inputs, **dict(zip(names, args))}
        with e2pa_kernels.use_backend("torch"):
            fused, weights, trace, energies, ce = _call(**kwargs)
        return fused, weights, trace, torch.where(torch.isfinite(energies), energies, 0.0), ce

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, backend, dtype):
    inputs = _inputs(**CASES[case])
    check_op(_call, inputs, backend, dtype, _grads(inputs), _outputs(inputs))


# The launchers' GPU tiles (launch_as_gpu: the blocks, warps and persistent grid a GPU gets), run by the
# interpreter: the backward's tiles depend on the dtype -- at C <= 16 fp32 takes 16 voxels on 4 warps and
# fp16/bf16 the 32-channel tile (padded channels masked) -- and C = 64 is the widest tile class.
GPU_TILE_CASES = {
    "C16-masked-target": dict(
        B=2, M=4, C=16, K=4, S=(5, 7), mask=[[True, False, True, True], [True] * 4], target=True, ignore=0.2
    ),
    "C12-M3": dict(B=1, M=3, C=12, K=5, S=(3, 11), target=True),
    "C64-xi0": dict(B=1, M=4, C=64, K=4, S=(3, 7), xi0=True, target=True),
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
@pytest.mark.parametrize("case", list(GPU_TILE_CASES))
def test_gpu_tiles_match_reference(case, dtype):
    inputs = _inputs(**GPU_TILE_CASES[case])
    with launch_as_gpu():
        check_op(_call, inputs, "triton", dtype, _grads(inputs), _outputs(inputs))


def test_torch_path_float64_matches_reference():
    inputs = _inputs(**CASES["level1-xi0"])
    check_op(_call, inputs, "torch", torch.float64, _grads(inputs), _outputs(inputs))


@pytest.mark.parametrize("xi0", (False, True), ids=("mean", "xi0"))
def test_torch_path_in_voxel_chunks(monkeypatch, xi0):
    """Forward and backward in chunks of a handful of voxels: the same answers."""
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 400)
    inputs = _inputs(2, 3, 5, 4, (9, 11), mask=[[True, False, True], [True, True, True]], xi0=xi0, target=True)
    assert len(module._chunks(inputs["x"].flatten(3), 4, 3)) > 5
    check_op(_call, inputs, "torch", torch.float32, _grads(inputs), _outputs(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Modality- and channel-strided slices of x and a channels-last xi0 give the same answers."""
    B, M, C, K, S = 2, 3, 4, 3, (4, 3, 3)
    inputs = _inputs(B, M, C, K, S, xi0=True, mask=[[True, True, False], [True, True, True]], target=True)
    inputs["x"] = (torch.randn(B, M + 2, 2 * C, *S, dtype=torch.float64) / C**0.5)[:, 1:-1, ::2]
    inputs["xi0"] = inputs["xi0"].contiguous(memory_format=torch.channels_last_3d)
    assert not (inputs["x"].is_contiguous() or inputs["xi0"].is_contiguous())
    check_op(_call, inputs, backend, torch.float32, _grads(inputs), _outputs(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ("fused", "weights", "trace", "energies", "ce"))
def test_gradient_from_each_output_alone(backend, used):
    """Each output alone carries the gradient (the others' upstream gradients are None)."""
    inputs = _inputs(2, 3, 4, 3, (20,), mask=[[True, False, True], [True, True, True]], target=True)
    index = _outputs(inputs).index(used)
    grads = {}
    for name in ("reference", backend):
        x, w, b = (inputs[k].float().requires_grad_() for k in ("x", "weight", "bias"))
        with e2pa_kernels.use_backend(name):
            out = _call(x, w, b, modality_mask=inputs["modality_mask"], target=inputs["target"])[index]
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        grads[name] = torch.autograd.grad((torch.where(torch.isfinite(out), out, 0.0) * g).sum(), (x, w, b))
    for got, want in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_absent_modality_has_no_influence(backend):
    """NaN features of an absent modality change nothing (outputs, or any other gradient) and get an
    exactly zero gradient; its energies are +inf, its ce 0, its weights 0."""
    inputs = _inputs(2, 3, 4, 3, (5, 4), mask=[[True, False, True], [True, True, True]], target=True)
    results = []
    for poison in (0.0, float("nan")):
        x = inputs["x"].float().clone()
        x[0, 1] = poison
        x.requires_grad_()
        w, b = inputs["weight"].float().requires_grad_(), inputs["bias"].float().requires_grad_()
        with e2pa_kernels.use_backend(backend):
            fused, weights, trace, energies, ce = _call(
                x, w, b, modality_mask=inputs["modality_mask"], target=inputs["target"]
            )
        loss = (
            fused.sum()
            + weights.sum()
            + trace.sum()
            + torch.where(torch.isfinite(energies), energies, 0).sum()
            + ce.sum()
        )
        results.append((fused, weights, trace, energies, ce, *torch.autograd.grad(loss, (x, w, b))))
    clean, poisoned = results
    for a, b_ in zip(clean, poisoned):
        assert torch.equal(a, b_)
    fused, weights, trace, energies, ce, dx, _, _ = poisoned
    assert torch.isposinf(energies[0, 1]).all() and torch.equal(ce[0, 1], torch.zeros_like(ce[0, 1]))
    assert torch.equal(weights[0, 1], torch.zeros_like(weights[0, 1]))
    assert torch.equal(dx[0, 1], torch.zeros_like(dx[0, 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_without_modalities_is_defined(backend):
    """A sample whose mask is all False (the layers refuse it; the op defines it): ξ = 0, weights 0,
    energies +inf, zero gradients, and the other sample untouched."""
    inputs = _inputs(2, 2, 3, 3, (6,), mask=[[False, False], [True, True]])
    x, w, b = (inputs[k].float().requires_grad_() for k in ("x", "weight", "bias"))
    with e2pa_kernels.use_backend(backend):
        fused, weights, trace, energies = _call(x, w, b, modality_mask=inputs["modality_mask"])
    assert torch.equal(fused[0], torch.zeros_like(fused[0])) and torch.equal(weights[0], torch.zeros_like(weights[0]))
    assert torch.isposinf(energies[0]).all() and torch.isposinf(trace[0]).all()
    assert torch.isfinite(fused[1]).all() and torch.isfinite(trace[1]).all()
    (dx,) = torch.autograd.grad(fused.sum() + weights.sum() + torch.where(torch.isfinite(trace), trace, 0).sum(), (x,))
    assert torch.equal(dx[0], torch.zeros_like(dx[0])) and torch.isfinite(dx).all()


@pytest.mark.parametrize("masked", (False, True), ids=("no-mask", "mask"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_for_backward(backend, masked):
    """torch: only the inputs (nothing per voxel). Triton: the inputs plus the energies [B, M, *S] (the
    kernels read an absent modality as zeros: no masked copy of x)."""
    inputs = _inputs(1, 3, 4, 3, (20,), mask=[[True, False, True]] if masked else None, target=True)
    x, w, b = (inputs[k].float().requires_grad_() for k in ("x", "weight", "bias"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with e2pa_kernels.use_backend(backend):
            out = _call(x, w, b, modality_mask=inputs["modality_mask"], target=inputs["target"])
    inputs_ptrs = {t.data_ptr() for t in (x, w, b, inputs["modality_mask"], inputs["target"]) if t is not None}
    others = [t for t in saved if t.data_ptr() not in inputs_ptrs]
    if backend == "torch":
        assert saved and not others
    else:
        energies = out[3]
        assert {tuple(t.shape) for t in others} <= {tuple(energies.flatten(2).shape)}


def test_chunked_c_backward_accumulates_the_head_gradient_into_dx(monkeypatch):
    """Levels whose M × C tile does not fit the one-pass kernels: free_energy's backward kernel adds
    into the propagation's dx (one x-sized gradient buffer), not a second buffer."""
    fe = importlib.import_module("e2pa_kernels.free_energy")
    seen = []
    original = fe.free_energy_bwd

    def spy(*args, dx=None, **kwargs):
        seen.append(dx)
        return original(*args, dx=dx, **kwargs)

    monkeypatch.setattr(fe, "free_energy_bwd", spy)
    monkeypatch.setattr(module, "fits_one_pass", lambda M, C, K: False)
    inputs = _inputs(1, 3, 4, 3, (20,))
    x = inputs["x"].float().requires_grad_()
    with e2pa_kernels.use_backend("triton"):
        fused = _call(x, inputs["weight"].float(), inputs["bias"].float())[0]
    fused.sum().backward()
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == x.flatten(3).shape


@pytest.mark.parametrize("case", ["level0-masked-target", "level1-xi0"])
def test_chunked_c_path_matches_reference(monkeypatch, case):
    """The path for levels too wide for the one-pass kernels (large C at deep levels), forced at small C."""
    monkeypatch.setattr(module, "fits_one_pass", lambda M, C, K: False)
    inputs = _inputs(**CASES[case])
    check_op(_call, inputs, "triton", torch.float32, _grads(inputs), _outputs(inputs))


def test_one_pass_kernels_launch_once_per_direction(monkeypatch):
    """A level that fits runs one kernel forward and one backward (plus the fixed-order sums of the
    dW/db partials): no op kernel, no x-sized torch op in between."""
    from triton.runtime import interpreter

    launches = []
    original = interpreter.GridExecutor.__call__

    def count(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", count)
    inputs = _inputs(2, 3, 5, 4, (3, 4, 5), mask=[[True, False, True], [True, True, True]], target=True)
    x, w, b = (inputs[k].float().requires_grad_() for k in ("x", "weight", "bias"))
    assert module.fits_one_pass(3, 5, 4)
    with e2pa_kernels.use_backend("triton"):
        out = _call(x, w, b, modality_mask=inputs["modality_mask"], target=inputs["target"])
    assert launches == ["_energy_fusion_fwd_kernel"]
    loss = sum((torch.where(torch.isfinite(o), o, 0.0) * torch.randn(o.shape)).sum() for o in out)
    loss.backward()
    assert launches == ["_energy_fusion_fwd_kernel", "_energy_fusion_bwd_kernel"]


def test_explicit_triton_refuses_what_it_cannot_run():
    x = torch.randn(1, 9, 3, 10)
    with e2pa_kernels.use_backend("triton"), pytest.raises(e2pa_kernels.BackendUnavailableError, match="M <= 8"):
        e2pa_kernels.energy_fusion(x, torch.randn(2, 3))
    with e2pa_kernels.use_backend("triton"), pytest.raises(e2pa_kernels.BackendUnavailableError, match="K <= 64"):
        e2pa_kernels.energy_fusion(x[:, :3], torch.randn(65, 3))
    assert e2pa_kernels.energy_fusion(x, torch.randn(2, 3)).fused.shape == (1, 3, 10)  # auto: the torch path


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(modality_mask=torch.ones(2, 3)), TypeError, r"modality_mask must have dtype bool"),
        (dict(modality_mask=torch.ones(1, 3, dtype=torch.bool)), ValueError, r"modality_mask must have shape \[B, M\]"),
        (dict(xi0=torch.randn(2, 4, 5, 5)), ValueError, r"xi0 must have shape \[B, C, \*S\]"),
        (dict(xi0=torch.randn(2, 4, 5, 6, dtype=torch.float64)), TypeError, r"xi0 must have x's dtype"),
        (dict(prior_temperature=0.0), ValueError, r"prior_temperature must be a finite positive number"),
        (dict(steps=0), ValueError, r"steps must lie in \[1, 8\]"),
        (dict(weight=torch.randn(3, 5)), ValueError, r"C = 5"),
        (dict(target=torch.full((2, 5, 6), 7)), ValueError, r"target values must lie in \[0, 2\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, pattern):
    args = {"x": torch.randn(2, 3, 4, 5, 6), "weight": torch.randn(3, 4), **kwargs}
    with pytest.raises(error, match=pattern):
        e2pa_kernels.energy_fusion(args.pop("x"), args.pop("weight"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_gpu_matches_reference(dtype):
    inputs = {
        k: (v.cuda() if isinstance(v, torch.Tensor) else v)
        for k, v in _inputs(2, 4, 32, 4, (24, 20, 17), mask=[[True, False, True, True]] * 2, target=True).items()
    }
    check_op(_call, inputs, "triton", dtype, _grads(inputs), _outputs(inputs))


# The compiled configs' blocks are large: channel counts that leave a partial channel block, voxel
# counts not divisible by 16, modality masks (a missing modality per sample), ξ0 and a target, fp32/bf16.
GPU_TAILS = {
    "C37-693vox-masked": dict(
        B=2, M=4, C=37, K=4, S=(7, 9, 11), mask=[[True, False, True, True], [False, True, True, True]], target=True
    ),
    "C130-195vox-xi0": dict(B=1, M=3, C=130, K=4, S=(5, 13, 3), xi0=True, mask=[[True, True, False]], steps=2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("case", list(GPU_TAILS))
def test_gpu_channel_and_voxel_tails(case, dtype):
    inputs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _inputs(**GPU_TAILS[case]).items()}
    check_op(_call, inputs, "triton", dtype, _grads(inputs), _outputs(inputs))
