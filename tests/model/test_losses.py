"""Cohort loss semantics, the E²PA objective's terms and weights, and the region → class mapping."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import nested_regions, tiny_net
from monai.losses import DiceCELoss

from e2pa import CohortEnergyLoss, E2PALoss, regions_to_classes
from e2pa.model.layers import EHFEnergies
from e2pa.model.network import E2PAEnergies


# ------------------------------------------------------------------------------------------------
# regions_to_classes
# ------------------------------------------------------------------------------------------------
def test_regions_to_classes_follows_the_nesting():
    # voxels: background, ED (WT only), NCR (TC + WT), ET (all three)
    regions = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]]).float().view(1, 3, 4)
    classes = regions_to_classes(regions)
    assert classes.dtype == torch.int64 and classes.tolist() == [[0, 1, 2, 3]]
    assert regions_to_classes(regions.bool()).tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize(
    "regions, message",
    [
        (torch.zeros(1, 2, 4), r"regions must be a tensor \[B, 3, \*S\]"),
        (torch.full((1, 3, 4), 0.5), "regions must hold only 0 and 1"),
        (torch.tensor([[[0.0], [0.0], [1.0]]]), r"regions must be nested .* 1 voxel\(s\) are not"),
        (torch.tensor([[[1.0], [0.0], [0.0]]]), r"regions must be nested"),
    ],
)
def test_regions_to_classes_rejects_bad_regions(regions, message):
    with pytest.raises(ValueError, match=message):
        regions_to_classes(regions)


# ------------------------------------------------------------------------------------------------
# CohortEnergyLoss
# ------------------------------------------------------------------------------------------------
def _class_means(energy, labels, classes):
    return torch.stack(
        [torch.stack([energy[b][labels[b] == k].mean() for k in range(classes)]) for b in range(energy.shape[0])]
    )


def test_cohort_loss_initialises_then_follows_an_ema_in_train_mode_only():
    loss_fn = CohortEnergyLoss(num_levels=1, num_classes=3, momentum=0.9)
    labels = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # class 2 absent
    first = torch.tensor([[1.0, 3.0, 5.0, 7.0], [2.0, 4.0, 6.0, 8.0]], requires_grad=True)
    loss = loss_fn([first], labels)
    means = _class_means(first.detach(), labels, 2)  # [[2, 6], [2, 6]]
    batch_mean = means.mean(dim=0)
    assert loss_fn.initialized.tolist() == [[True, True, False]]
    torch.testing.assert_close(loss_fn.prototypes[0, :2], batch_mean)
    torch.testing.assert_close(loss, (((means - batch_mean) / (batch_mean.abs() + 1)) ** 2).mean())
    loss.backward()
    assert first.grad is not None

    second = first.detach() + 10
    loss = loss_fn([second], labels)
    means2 = _class_means(second, labels, 2)
    torch.testing.assert_close(
        loss,
        (((means2 - batch_mean) / (batch_mean.abs() + 1)) ** 2).mean(),
        msg="loss against the pre-update prototypes",
    )
    torch.testing.assert_close(loss_fn.prototypes[0, :2], 0.9 * batch_mean + 0.1 * means2.mean(dim=0))

    loss_fn.eval()
    state = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    eval_loss = loss_fn([second + 5], labels)
    for key, value in loss_fn.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed in eval mode"
    assert eval_loss > 0


def test_cohort_loss_state_dict_round_trip():
    loss_fn = CohortEnergyLoss(num_levels=2, num_classes=4)
    assert set(loss_fn.state_dict()) == {"prototypes", "initialized"}
    labels = torch.randint(0, 4, (2, 8, 8))
    loss_fn([torch.randn(2, 8, 8), torch.randn(2, 4, 4)], labels)
    restored = CohortEnergyLoss(num_levels=2, num_classes=4)
    restored.load_state_dict(loss_fn.state_dict())
    assert torch.equal(restored.prototypes, loss_fn.prototypes) and torch.equal(
        restored.initialized, loss_fn.initialized
    )


def test_cohort_loss_at_batch_size_one():
    loss_fn = CohortEnergyLoss(num_levels=1, num_classes=2)
    labels = torch.tensor([[0, 1, 1, 0]])
    assert loss_fn([torch.tensor([[1.0, 2.0, 4.0, 3.0]])], labels) == 0  # first sighting: prototype = itself
    later = loss_fn([torch.tensor([[2.0, 2.0, 4.0, 4.0]])], labels)
    # relative to the prototypes [2, 3]: ((3 - 2) / 3)² and 0
    torch.testing.assert_close(later, torch.tensor((((3.0 - 2.0) / 3) ** 2 + 0.0) / 2))


def test_cohort_loss_ignores_infinite_voxels_and_absent_classes():
    loss_fn = CohortEnergyLoss(num_levels=1, num_classes=3)
    loss_fn.eval()
    loss_fn.prototypes.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    loss_fn.initialized.fill_(True)
    energy = torch.tensor([[1.0, float("inf"), 4.0, 4.0]])
    labels = torch.tensor([[0, 0, 1, 1]])  # class 2 absent in this sample
    class1 = ((4.0 - 2.0) / (2.0 + 1)) ** 2  # relative to the prototype 2
    torch.testing.assert_close(loss_fn([energy], labels), torch.tensor((0.0 + class1) / 2))
    # a class whose only voxels are +inf is absent
    torch.testing.assert_close(
        loss_fn([torch.tensor([[float("inf"), float("inf"), 4.0, 4.0]])], labels), torch.tensor(class1)
    )
    loss_fn.initialized[0, 0] = False  # eval: no prototype, no term
    torch.testing.assert_close(loss_fn([energy], labels), torch.tensor(class1))


def test_cohort_loss_resizes_labels_to_each_level_by_nearest_neighbour():
    loss_fn = CohortEnergyLoss(num_levels=2, num_classes=2)
    loss_fn.eval()
    loss_fn.initialized.fill_(True)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, ::2, ::2] = 1  # nearest downsampling by 2 keeps exactly the even grid → all ones
    coarse = torch.full((1, 2, 2), 3.0)
    loss = loss_fn([torch.zeros(1, 4, 4), coarse], labels)
    torch.testing.assert_close(loss, torch.tensor(9.0))  # level 0: all zeros; level 1: class 1 only, (3 - 0)²


def test_cohort_loss_argument_errors():
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\)"):
        CohortEnergyLoss(1, 4, momentum=1.0)
    loss_fn = CohortEnergyLoss(2, 4)
    with pytest.raises(ValueError, match="fused_energies must hold num_levels = 2 tensors; got 1"):
        loss_fn([torch.zeros(1, 4)], torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        loss_fn([torch.zeros(1, 4), torch.zeros(1, 2)], torch.full((1, 4), 4))
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        loss_fn([torch.zeros(1, 4), torch.zeros(1, 2)], torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------------
# E2PALoss
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forward_pass():
    """A tiny network's outputs on a batch where sample 0 lacks modality 2."""
    torch.manual_seed(3)
    net = tiny_net()
    x, regions = torch.randn(2, 4, 8, 8, 8), nested_regions(2, (8, 8, 8))
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    logits, energies = net(x, mask, target=regions_to_classes(regions), return_energies=True)
    return logits, regions, energies


def test_e2pa_loss_reports_every_term_and_sums_them(forward_pass):
    logits, regions, energies = forward_pass
    loss_fn = E2PALoss(num_levels=2, lambda_ds=0.5, lambda_ehf=0.25, lambda_esa=2.0)
    total, terms = loss_fn(logits, regions, energies)
    assert set(terms) == {"task", "deep_supervision", "cohort", "esa", "total"}
    assert all(not t.requires_grad for t in terms.values())
    torch.testing.assert_close(terms["task"], DiceCELoss(sigmoid=True)(logits, regions).detach())
    expected = terms["task"] + 0.5 * terms["deep_supervision"] + 0.25 * terms["cohort"] + 2.0 * terms["esa"]
    torch.testing.assert_close(total.detach(), expected)
    torch.testing.assert_close(terms["total"], total.detach())
    torch.testing.assert_close(terms["esa"], energies.esa[1].mean().detach())


def test_zero_weights_remove_terms(forward_pass):
    logits, regions, energies = forward_pass
    loss_fn = E2PALoss(num_levels=2, lambda_ds=0.0, lambda_ehf=0.0, lambda_esa=0.0)
    total, terms = loss_fn(logits, regions, energies)
    assert set(terms) == {"task", "total"}
    torch.testing.assert_close(total, terms["task"], check_device=False)
    assert not loss_fn.cohort.initialized.any(), "a switched-off cohort loss must not update its prototypes"
    # a network without energies (e.g. a plain MONAI baseline) trains with the task term alone
    torch.testing.assert_close(loss_fn(logits, regions, None)[0], total)
    with pytest.raises(ValueError, match="energies is None but lambda_ds, lambda_ehf or lambda_esa is > 0"):
        E2PALoss(num_levels=2, lambda_ds=0.0, lambda_ehf=0.0, lambda_esa=0.1)(logits, regions, None)


def test_deep_supervision_counts_available_modalities_only(forward_pass):
    logits, regions, energies = forward_pass
    loss_fn = E2PALoss(num_levels=2, lambda_ds=1.0, lambda_ehf=0.0, lambda_esa=0.0)
    _, terms = loss_fn(logits, regions, energies)
    expected = torch.stack([level.ce.flatten(2).mean(2)[energies.modality_mask].mean() for level in energies.levels])
    torch.testing.assert_close(terms["deep_supervision"], expected.mean().detach())
    # whatever the absent modality's ce says, it does not count
    poisoned = E2PAEnergies(
        levels=tuple(
            EHFEnergies(
                level.energies,
                level.weights,
                level.trace,
                torch.where(energies.modality_mask[:, :, None, None, None], level.ce, 1e6),
            )
            for level in energies.levels
        ),
        esa=energies.esa,
        modality_mask=energies.modality_mask,
    )
    torch.testing.assert_close(loss_fn(logits, regions, poisoned)[1]["deep_supervision"], terms["deep_supervision"])


def test_deep_supervision_without_target_says_what_to_do():
    net = tiny_net()
    logits, energies = net(torch.randn(1, 4, 8, 8, 8), return_energies=True)
    with pytest.raises(ValueError, match="run the network with target=regions_to_classes"):
        E2PALoss(num_levels=2)(logits, nested_regions(1, (8, 8, 8)), energies)


def test_loss_argument_errors(forward_pass):
    logits, regions, energies = forward_pass
    with pytest.raises(ValueError, match="E2PALoss: lambda_esa must be a finite non-negative number"):
        E2PALoss(num_levels=2, lambda_esa=-0.1)
    with pytest.raises(ValueError, match="E2PALoss: regions must have the logits' shape"):
        E2PALoss(num_levels=2)(logits, regions[:, :2], energies)
