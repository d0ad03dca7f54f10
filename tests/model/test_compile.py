"""torch.compile and host syncs: E2PANet's forward and a training step (forward with deep supervision and
energies, the loss, backward) compile into one graph with ``fullgraph=True`` and match eager, and make no
host read of a tensor value; value checks of masks and labels run once, at the entry points."""

from __future__ import annotations

import copy

import pytest
import torch
from _model_helpers import nested_regions, tiny_net

import e2pa_kernels
from e2pa.model.layers import EHF, ESA
from e2pa.model.losses import E2PALoss, regions_to_classes
from e2pa_kernels.testing import HostSyncCounter

SPATIAL = (8, 8, 8)
MASK = torch.tensor([[True, False, True, True], [True, True, True, True]])


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *SPATIAL, generator=generator)
    regions = nested_regions(2, SPATIAL, generator)
    return x, regions, regions_to_classes(regions)


def _objective(net, loss_fn, validate: bool = True):
    """Forward with deep supervision and energies and the full objective: what a training step compiles
    (its backward is compiled by AOTAutograd from the same graph when ``.backward()`` runs)."""

    def objective(x, mask, regions, target):
        logits, energies = net(x, modality_mask=mask, target=target, return_energies=True, validate=validate)
        return loss_fn(logits, regions, energies, validate=validate)[0]

    return objective


def _step(objective, *inputs) -> torch.Tensor:
    total = objective(*inputs)
    total.backward()
    return total.detach()


def _grads(net) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------------
# host syncs
# --------------------------------------------------------------------------------------------------
def test_the_sync_counter_sees_each_kind_of_host_read():
    t = torch.tensor([1.0, -2.0, 3.0])
    reads = [
        lambda: t.sum().item(),
        lambda: bool(t.sum() > 0),
        lambda: float(t.max()),
        lambda: t[t > 0],
        lambda: torch.nonzero(t),
        lambda: torch.unique(t),
        lambda: torch.equal(t, t),
        lambda: t.repeat_interleave(torch.tensor([1, 2, 1])),
    ]
    for read in reads:
        with HostSyncCounter() as syncs:
            read()
        assert syncs.count >= 1, read
    with HostSyncCounter() as syncs:
        torch.where(t > 0, t, 0.0).sum().mul(2)
    assert syncs.count == 0


def test_a_training_step_makes_no_host_read():
    """With validate=False (the trainer's: its masks and labels are valid by construction) the network, the
    loss and backward read no value back. On the torch backend (the CPU default) ESA's default eigh basis
    runs LAPACK's eigh, whose info check the counter lists (on CPU a read of host memory, not a device
    synchronisation): the learned basis here; the eigh basis on the triton backend below."""
    torch.manual_seed(0)
    net, loss_fn = tiny_net(esa_basis="learned"), E2PALoss(num_levels=2)
    x, regions, target = _batch()
    with HostSyncCounter() as syncs:
        _step(_objective(net, loss_fn, validate=False), x, MASK, regions, target)
    assert syncs.events == []


def test_a_default_training_step_on_the_triton_backend_makes_no_host_read():
    """The default network (ESA with the eigh basis) on the triton backend, what CUDA tensors get by default:
    every op's Triton path and the Jacobi eigensolver of factor_basis (no cuSOLVER info check) read no
    value back (the interpreter here; the same launchers and torch ops around them run on a GPU)."""
    torch.manual_seed(0)
    net, loss_fn = tiny_net(), E2PALoss(num_levels=2)
    assert [esa.basis for esa in net.esa.values()] == ["eigh"]
    x, regions, target = _batch()
    with e2pa_kernels.use_backend("triton"), HostSyncCounter() as syncs:
        _step(_objective(net, loss_fn, validate=False), x, MASK, regions, target)
    assert syncs.events == []
    with HostSyncCounter() as syncs:  # the counter sees eigh's check where the torch backend runs it
        _step(_objective(net, loss_fn, validate=False), x, MASK, regions, target)
    assert len(syncs.events) == 1 and "_linalg_eigh" in syncs.events[0], syncs.events


def test_entry_validation_reads_values_once_not_per_layer():
    """validate=True (the default): the mask and the target are checked once at E2PANet's entry (one read
    each), whatever the number of levels; E2PALoss checks the regions (values, nesting)."""
    torch.manual_seed(0)
    net = tiny_net(features=(4, 8, 8), esa_basis="learned", esa_levels=(0, 1, 2))
    x, regions, target = _batch()
    with HostSyncCounter() as syncs:
        net(x, modality_mask=MASK, target=target, return_energies=True)
    assert syncs.count == 2, syncs.events
    logits, energies = net(x, modality_mask=MASK, target=target, return_energies=True)
    with HostSyncCounter() as syncs:
        E2PALoss(num_levels=3)(logits, regions, energies)
    assert syncs.count == 2, syncs.events


def test_entry_points_still_reject_bad_masks_and_labels():
    torch.manual_seed(0)
    net = tiny_net()
    x, regions, target = _batch()
    empty = torch.tensor([[True, False, True, True], [False, False, False, False]])
    with pytest.raises(ValueError, match=r"modality_mask: sample\(s\) \[1\] have no available modality"):
        net(x, modality_mask=empty)
    with pytest.raises(ValueError, match=r"E2PANet: target values must lie in \[0, 3\].*found \[7\]"):
        net(x, target=torch.where(target == 2, 7, target), return_energies=True)
    level = EHF(3, 4, 4, 3)
    with pytest.raises(ValueError, match=r"modality_mask: sample\(s\) \[1\] have no available modality"):
        level(torch.randn(2, 4, 4, *SPATIAL), empty)
    with pytest.raises(ValueError, match=r"free_energy: target values must lie in \[0, 2\].*found \[3\]"):
        level(torch.randn(2, 4, 4, *SPATIAL), target=target, return_energies=True)
    logits, energies = net(x, target=target, return_energies=True)
    broken = regions.clone()
    broken[:, 2] = 1.0  # ET everywhere, outside TC
    with pytest.raises(ValueError, match=r"regions must be nested \(ET ⊆ TC ⊆ WT\); \d+ voxel\(s\) are not"):
        E2PALoss(num_levels=2)(logits, broken, energies)
    with pytest.raises(ValueError, match="regions must hold only 0 and 1"):
        E2PALoss(num_levels=2)(logits, regions * 0.5, energies)
    # validate=False trusts the caller: no check, no read
    with HostSyncCounter() as syncs:
        net(x, modality_mask=empty, validate=False)
    assert syncs.count == 0


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_forward_compiles_into_one_graph_and_matches_eager():
    torch.manual_seed(0)
    net = tiny_net().eval()
    x, _, target = _batch()
    explained = torch._dynamo.explain(net)(x, modality_mask=MASK, target=target, return_energies=True)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        logits, energies = net(x, modality_mask=MASK, target=target, return_energies=True)
        logits_c, energies_c = compiled(x, modality_mask=MASK, target=target, return_energies=True)
    torch.testing.assert_close(logits_c, logits)
    for level, level_c in zip(energies.levels, energies_c.levels, strict=True):
        for name in ("energies", "weights", "trace", "ce"):
            torch.testing.assert_close(getattr(level_c, name), getattr(level, name))
    for key in energies.esa:
        torch.testing.assert_close(energies_c.esa[key], energies.esa[key])


@pytest.mark.parametrize("validate", (True, False), ids=("validated", "trusted"))
def test_a_training_step_compiles_with_fullgraph_and_matches_eager(validate):
    """Forward, loss and backward in one graph (validate=True: the entry checks become asynchronous
    asserts inside it). Loss and every gradient equal eager's within float32 rounding."""
    torch.manual_seed(0)
    net, loss_fn = tiny_net(), E2PALoss(num_levels=2)
    net_c, loss_c = copy.deepcopy(net), copy.deepcopy(loss_fn)
    x, regions, target = _batch()
    explained = torch._dynamo.explain(_objective(copy.deepcopy(net), copy.deepcopy(loss_fn), validate))(
        x, MASK, regions, target
    )
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(_objective(net_c, loss_c, validate), fullgraph=True, backend="aot_eager")
    for seed in (0, 1):  # a second step: the cohort prototypes are initialised by then
        x, regions, target = _batch(seed)
        net.zero_grad(), net_c.zero_grad()
        total = _step(_objective(net, loss_fn, validate), x, MASK, regions, target)
        total_c = _step(compiled, x, MASK, regions, target)
        torch.testing.assert_close(total_c, total)
        grads, grads_c = _grads(net), _grads(net_c)
        assert grads.keys() == grads_c.keys() and len(grads) == len(list(net.parameters()))
        for name in grads:
            torch.testing.assert_close(grads_c[name], grads[name], msg=name)
    torch.testing.assert_close(loss_c.cohort.prototypes, loss_fn.cohort.prototypes)


def test_compiled_asserts_still_reject_an_empty_mask():
    torch.manual_seed(0)
    net = tiny_net()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x, _, _ = _batch()
    compiled(x, modality_mask=MASK)
    with pytest.raises(RuntimeError, match="modality_mask: a sample has no available modality"):
        compiled(x, modality_mask=torch.tensor([[True, False, True, True], [False] * 4]))


def test_inductor_compiles_the_forward_and_matches_eager():
    """The default backend (inductor, generating C++ on CPU) on the inference forward with energy maps: the
    custom ops stay opaque calls between inductor's fused kernels. (A whole training step compiles the same
    way; at ~100 s on this 2-core CI it is left to the aot_eager tests above.)"""
    torch.manual_seed(0)
    net = tiny_net().eval()
    x, _, _ = _batch()
    with torch.no_grad():
        eager = net.predict_with_energy_maps(x, MASK)
        compiled = torch.compile(net.predict_with_energy_maps, fullgraph=True)(x, MASK)
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], msg=key)


def test_compiled_ops_on_the_triton_backend_match_eager():
    """The custom ops' Triton path (CPU interpreter) under torch.compile: one EHF level with mask and
    target, forward and gradients."""
    torch.manual_seed(0)
    level = EHF(3, 4, 4, 3)
    x = torch.randn(2, 4, 4, 4, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4, 4))

    def objective(inputs):
        fused, energies = level(inputs, MASK, target=target, return_energies=True, validate=False)
        return (
            fused.square().sum()
            + torch.where(torch.isfinite(energies.energies), energies.energies, 0).sum()
            + energies.ce.sum()
            + energies.trace.sum()
        )

    with e2pa_kernels.use_backend("triton"):
        eager = torch.autograd.grad(objective(x), (x, *level.parameters()))
        compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
        compiled = torch.autograd.grad(compiled(x), (x, *level.parameters()))
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)


def test_compiled_esa_with_the_eigh_basis_on_the_triton_backend_matches_eager():
    """factor_basis's Jacobi kernel is an opaque custom op: ESA (eigh basis) compiles into one graph on the
    triton backend, energy and gradients equal to eager's."""
    torch.manual_seed(0)
    esa = ESA(6, 2)
    x = torch.randn(2, 3, 6, 4, 4, 4, requires_grad=True)
    fused = torch.randn(2, 6, 4, 4, 4, requires_grad=True)

    def objective(x, fused):
        return esa(x, fused, MASK[:, :3], validate=False).sum()

    with e2pa_kernels.use_backend("triton"):
        explained = torch._dynamo.explain(objective)(x, fused)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        eager = torch.autograd.grad(objective(x, fused), (x, fused))
        compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
        compiled = torch.autograd.grad(compiled(x, fused), (x, fused))
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)
