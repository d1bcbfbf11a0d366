"""MixedSupervisionLoss: per-sample routing of full and partial samples (marginal paper, section 4.3)."""

from __future__ import annotations

import monai
import pytest
import torch
from monai.data import MetaTensor

from partialseg.losses import MarginalExclusionLoss, MixedSupervisionLoss
from partialseg.transforms import PartialLabelToVector

C = 4


def _targets():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, C, (3, 1, 6, 5, 4), generator=g)
    to_vec = PartialLabelToVector(C)
    full = to_vec(label[0], "all")
    spleen_only = to_vec(label[1] * (label[1] == 2), [2])  # one organ annotated
    full2 = to_vec(label[2], "all")
    return torch.stack([full, spleen_only, full2]).float()


def test_routes_each_sample_to_its_loss():
    target = _targets()
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    full, part = MarginalExclusionLoss(lambda_exclusion=0), MarginalExclusionLoss()
    mixed = MixedSupervisionLoss(full, part)
    expected = (full(logits[[0]], target[[0]]) + part(logits[[1]], target[[1]]) + full(logits[[2]], target[[2]])) / 3
    assert torch.allclose(mixed(logits, target), expected, rtol=1e-5)
    # the exclusion terms reach the partial sample only: with a one-hot batch it is plain Dice + CE
    onehot = target[[0, 2]]
    dice_ce = monai.losses.DiceCELoss(softmax=True)(logits[[0, 2]], onehot)
    assert torch.allclose(mixed(logits[[0, 2]], onehot), dice_ce, rtol=1e-4)
    assert torch.allclose(mixed(logits[[1]], target[[1]]), part(logits[[1]], target[[1]]))


def test_gradients_match_the_separate_losses():
    target = _targets()
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
    mixed = MixedSupervisionLoss(MarginalExclusionLoss(lambda_exclusion=0), MarginalExclusionLoss())
    (g,) = torch.autograd.grad(mixed(logits, target), logits)
    x = logits.detach().clone().requires_grad_(True)
    ref = (MarginalExclusionLoss(lambda_exclusion=0)(x[[0, 2]], target[[0, 2]]) * 2 + MarginalExclusionLoss()(x[[1]], target[[1]])) / 3
    (g_ref,) = torch.autograd.grad(ref, x)
    assert torch.allclose(g, g_ref, atol=1e-7)


def test_metatensor_inputs_are_accepted():
    target = _targets()
    logits = torch.randn(target.shape, requires_grad=True)
    mixed = MixedSupervisionLoss(MarginalExclusionLoss(lambda_exclusion=0), MarginalExclusionLoss())
    value = mixed(MetaTensor(logits), MetaTensor(target))
    value.backward()
    assert type(value) is torch.Tensor and torch.isfinite(value) and logits.grad is not None
    # and each partialseg loss on its own (MONAI pipelines hand MetaTensors to losses)
    assert torch.allclose(MarginalExclusionLoss()(MetaTensor(logits), MetaTensor(target)), MarginalExclusionLoss()(logits, target))


def test_bad_arguments():
    with pytest.raises(TypeError, match="full_loss"):
        MixedSupervisionLoss(3, MarginalExclusionLoss())
    with pytest.raises(ValueError, match="same shape"):
        MixedSupervisionLoss(MarginalExclusionLoss(), MarginalExclusionLoss())(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, 2))
