"""normalized_fusion (EHF's default normalised level as one node): the torch and Triton paths against the
reference composition (forward and every gradient: x, weight, bias, xi0, gate), masks, targets, chunks,
a NaN in an absent modality, a closed and an open gate, and what is saved for backward."""

from __future__ import annotations

import importlib

import pytest
import torch
from _oracle import check_op

import e2pa_kernels
from e2pa_kernels import reference

BACKENDS = ("torch", "triton")  # "triton" runs in the interpreter on CPU
module = importlib.import_module("e2pa_kernels.energy_fusion")
EPS = 1e-5


def _call(x, weight, bias, gate, xi0=None, modality_mask=None, target=None, **params):
    out = e2pa_kernels.normalized_fusion(x, weight, bias, modality_mask, xi0, gate, eps=EPS, target=target, **params)
    return tuple(o for o in out if o is not None)


def _outputs(inputs):
    return ("fused", "weights", "trace", "energies") + (("ce",) if inputs.get("target") is not None else ())


def _grads(inputs):
    return tuple(k for k in ("x", "weight", "bias", "xi0", "gate") if inputs.get(k) is not None)


def _inputs(B, M, C, K, S, *, mask=None, xi0=False, target=False, bias=True, gate=0.3, steps=3, **params):
    gen = torch.Generator().manual_seed(hash((B, M, C, K, S, xi0, target)) % 2**31)
    inputs = dict(
        # raw features: scale and offset differ per modality (what the normalisation removes)
        x=torch.randn(B, M, C, *S, generator=gen, dtype=torch.float64) * 2.0 + 0.5,
        weight=torch.randn(K, C, generator=gen, dtype=torch.float64),
        bias=torch.randn(K, generator=gen, dtype=torch.float64) if bias else None,
        gate=torch.tensor(gate, dtype=torch.float64),
        xi0=3.0 * torch.randn(B, C, *S, generator=gen, dtype=torch.float64) if xi0 else None,
        modality_mask=None if mask is None else torch.tensor(mask),
        steps=steps,
        **params,
    )
    if target:
        t = torch.randint(0, K, (B, *S), generator=gen)
        t[torch.rand(t.shape, generator=gen) < 0.2] = -100
        inputs["target"] = t
    return inputs


CASES = {
    "level0-masked-target": dict(
        B=2, M=3, C=5, K=4, S=(3, 4, 5), mask=[[True, False, True], [True, True, True]], target=True
    ),
    "level0-no-mask-temperatures": dict(
        B=1, M=4, C=6, K=3, S=(7, 5), temperature=0.7, prior_temperature=1.6, beta=0.8, gate=0.8
    ),
    "level1-xi0-masked": dict(
        B=2, M=3, C=4, K=5, S=(2, 3, 6), xi0=True, mask=[[False, True, True], [True, True, False]], target=True
    ),
    "M1-no-bias": dict(B=2, M=1, C=3, K=2, S=(19,), bias=False, steps=2),
    "C20-K17": dict(B=1, M=2, C=20, K=17, S=(5, 7), steps=1, target=True, gate=0.05),
}


def test_reference_gradcheck():
    """The reference composition's own gradients in float64 (x, W, b, ξ0 and the gate), a masked modality
    and a target included."""
    inputs = _inputs(2, 3, 3, 3, (2, 3), mask=[[True, False, True], [True, True, True]], xi0=True, target=True)
    names = ("x", "weight", "bias", "xi0", "gate")
    tensors = tuple(inputs[k].requires_grad_() for k in names)

    def f(x, w, b, xi0, gate):
        fused, weights, trace, energies, ce = reference.normalized_fusion(
            x, w, b, inputs["modality_mask"], xi0, gate, eps=EPS, steps=2, target=inputs["target"]
        )
        return fused, weights, trace, torch.where(torch.isfinite(energies), energies, 0.0), ce

    assert torch.autograd.gradcheck(f, tensors, fast_mode=True)


@pytest.mark.parametrize("xi0", (False, True), ids=("mean", "xi0"))
def test_torch_path_gradcheck(xi0):
    """The hand-written VJP (RMS, mix and gate terms around energy_fusion's) against finite differences."""
    inputs = _inputs(2, 3, 4, 3, (2, 2), mask=[[True, True, False], [True, True, True]], xi0=xi0, target=True)
    inputs.update(steps=2, temperature=0.8, prior_temperature=1.3)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_voxel_chunks(monkeypatch, backend):
    """Both directions in chunks of a handful of voxels (the Triton path's chunks too): the same answers."""
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 400)
    monkeypatch.setattr(module, "_TRITON_CHUNK_ELEMENTS", 3 * 5 * 16)
    inputs = _inputs(2, 3, 5, 4, (9, 11), mask=[[True, False, True], [True, True, True]], xi0=True, target=True)
    x = inputs["x"].flatten(3)
    assert len(module._normalized_chunks(x, 4, 3, backend == "triton")) > 5
    check_op(_call, inputs, backend, torch.float32, _grads(inputs), _outputs(inputs))


@pytest.mark.parametrize("case", ["level1-xi0-masked", "level0-no-mask-temperatures"])
def test_chunked_c_triton_path_matches_reference(monkeypatch, case):
    """Levels whose M × C tile does not fit run the ops' kernels and save the head energies [B, M, N] (without
    a mask: the energies output itself), in several voxel chunks."""
    monkeypatch.setattr(module, "fits_one_pass", lambda M, C, K: False)
    monkeypatch.setattr(module, "_TRITON_CHUNK_ELEMENTS", 2 * 4 * 6 * 16)
    inputs = _inputs(**CASES[case])
    check_op(_call, inputs, "triton", torch.float32, _grads(inputs), _outputs(inputs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ("fused", "weights", "trace", "energies", "ce"))
def test_gradient_from_each_output_alone(backend, used):
    """Each output alone carries the gradient (the others' upstream gradients are None)."""
    inputs = _inputs(2, 3, 4, 3, (20,), mask=[[True, False, True], [True, True, True]], target=True)
    index = _outputs(inputs).index(used)
    grads = {}
    for name in ("reference", backend):
        x, w, b, g = (inputs[k].float().requires_grad_() for k in ("x", "weight", "bias", "gate"))
        with e2pa_kernels.use_backend(name):
            out = _call(x, w, b, g, modality_mask=inputs["modality_mask"], target=inputs["target"])[index]
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        loss = (torch.where(torch.isfinite(out), out, 0.0) * up).sum()
        grads[name] = torch.autograd.grad(loss, (x, w, b, g), allow_unused=True)
    for got, want in zip(grads[backend], grads["reference"]):
        if want is None or not want.any():
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ("reference",) + BACKENDS)
def test_absent_modality_has_no_influence(backend):
    """NaN features of an absent modality change nothing and get an exactly zero gradient; its share is 0."""
    inputs = _inputs(2, 3, 4, 3, (5, 4), mask=[[True, False, True], [True, True, True]], xi0=True, target=True)
    results = []
    for poison in (0.0, float("nan")):
        x = inputs["x"].float().clone()
        x[0, 1] = poison
        x.requires_grad_()
        w, b, g, xi0 = (inputs[k].float().requires_grad_() for k in ("weight", "bias", "gate", "xi0"))
        with e2pa_kernels.use_backend(backend):
            fused, weights, trace, energies, ce = _call(
                x, w, b, g, xi0=xi0, modality_mask=inputs["modality_mask"], target=inputs["target"]
            )
        loss = fused.sum() + weights.sum() + trace.sum() + torch.where(torch.isfinite(energies), energies, 0).sum()
        results.append((fused, weights, trace, energies, ce, *torch.autograd.grad(loss + ce.sum(), (x, w, b, g, xi0))))
    clean, poisoned = results
    for a, b_ in zip(clean, poisoned):
        assert torch.equal(a, b_)
    weights, dx = poisoned[1], poisoned[5]
    assert torch.equal(weights[0, 1], torch.zeros_like(weights[0, 1]))
    assert torch.equal(dx[0, 1], torch.zeros_like(dx[0, 1])) and torch.isfinite(dx).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_gate_is_the_masked_mean_and_open_gate_the_energy_weights(backend):
    """g = 0: fused is the masked mean of the raw features and the shares uniform; g = 1: the shares are
    energy_fusion's weights on the normalised features."""
    inputs = _inputs(2, 3, 4, 3, (6, 5), mask=[[True, False, True], [True, True, True]])
    x, w, b = (inputs[k].float() for k in ("x", "weight", "bias"))
    mask = inputs["modality_mask"]
    present = mask[:, :, None, None, None]
    raw = torch.where(present, x, 0.0)
    with e2pa_kernels.use_backend(backend):
        fused, weights, *_ = _call(x, w, b, torch.tensor(0.0), modality_mask=mask)
        _, open_weights, *_ = _call(x, w, b, torch.tensor(1.0), modality_mask=mask)
        _, p, *_ = e2pa_kernels.energy_fusion(reference.rms_normalize(raw, EPS, 2), w, b, mask)
    torch.testing.assert_close(fused, raw.sum(1) / mask.sum(1).view(-1, 1, 1, 1))
    torch.testing.assert_close(weights, (mask / mask.sum(1, keepdim=True))[:, :, None, None].expand_as(weights))
    torch.testing.assert_close(open_weights, p)


@pytest.mark.parametrize("masked", (False, True), ids=("no-mask", "mask"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_nothing_x_sized_beyond_the_inputs(backend, masked):
    """Saved for backward: the inputs, p [B, M, N] and (chunked-C Triton only) the head energies: nothing
    of x's size (the reference composition saves x̂ and its temporaries)."""
    inputs = _inputs(1, 3, 4, 3, (20,), mask=[[True, False, True]] if masked else None, xi0=True, target=True)
    x, w, b, g, xi0 = (inputs[k].float().requires_grad_() for k in ("x", "weight", "bias", "gate", "xi0"))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with e2pa_kernels.use_backend(backend):
            out = _call(x, w, b, g, xi0=xi0, modality_mask=inputs["modality_mask"], target=inputs["target"])
    ptrs = {t.data_ptr() for t in (x, w, b, g, xi0, inputs["modality_mask"], inputs["target"]) if t is not None}
    others = [t for t in saved if t.data_ptr() not in ptrs]
    assert saved and {tuple(t.shape) for t in others} <= {tuple(out[1].flatten(2).shape)}, [t.shape for t in others]


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(eps=0.0), ValueError, "eps"),
        (dict(gate=torch.zeros(1)), ValueError, "gate"),
        (dict(gate=torch.tensor(1)), TypeError, "gate"),
        (dict(gate=0.5), TypeError, "gate"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, pattern):
    inputs = _inputs(1, 2, 3, 2, (4,))
    args = dict(eps=EPS, gate=torch.tensor(0.5))
    args.update(kwargs)
    x, w, b = (inputs[k].float() for k in ("x", "weight", "bias"))
    with pytest.raises(error, match=pattern):
        e2pa_kernels.normalized_fusion(x, w, b, None, None, args["gate"], eps=args["eps"])
