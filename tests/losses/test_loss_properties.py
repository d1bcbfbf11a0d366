"""Property tests (hypothesis): compatibility (DCL Definition 1) and the incompatibility of CE
with unknown treated as background (DCL Proposition 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from partialseg.losses import (
    CompatibleLoss,
    ExclusionCELoss,
    ExclusionDiceLoss,
    MarginalCELoss,
    MarginalDiceLoss,
    MarginalExclusionLoss,
    PriorLoss,
)

# every loss of the package whose minimiser must contain the ground truth
COMPATIBLE_LOSSES = {
    "dcl_ce": lambda: CompatibleLoss("ce", "ce", reduction="sum"),
    "dcl_ce_dice": lambda: CompatibleLoss(("ce", "dice"), ("ce", "dice"), reduction="sum"),
    "dcl_mmee": lambda: CompatibleLoss(("ta_ce", "ta_dice"), ("ex_ce", "ex_dice"), reduction="sum"),
    "marginal_ce": lambda: MarginalCELoss(reduction="sum"),
    "marginal_dice": lambda: MarginalDiceLoss(reduction="sum"),
    "marginal_dice_batch": lambda: MarginalDiceLoss(batch=True, include_background=False),
    "exclusion_ce": lambda: ExclusionCELoss(reduction="sum"),
    "exclusion_dice": lambda: ExclusionDiceLoss(reduction="sum"),
    "marginal_exclusion": lambda: MarginalExclusionLoss(),
}
GT_SCALE = 60.0  # logits 60 * one-hot: softmax is one-hot to double precision (e^-60 ~ 1e-26)


@st.composite
def partial_problems(draw):
    """A ground truth, a partial annotation of it in the <0,p,1> format, random predictions."""
    b = draw(st.integers(1, 2))
    c = draw(st.integers(3, 5))
    n = draw(st.integers(3, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (b, n), generator=g)
    onehot = F.one_hot(labels, c).permute(0, 2, 1).double()
    p_value = draw(st.sampled_from([0.2, 0.5, 0.9]))
    target = torch.empty_like(onehot)
    for i in range(b):
        kind = draw(st.sampled_from(["full", "partial", "none"]))
        annotated = torch.ones(c, dtype=torch.bool)
        if kind == "none":
            annotated[:] = False
        elif kind == "partial":
            annotated = torch.rand(c, generator=g) < 0.5
        ann_voxel = annotated[labels[i]]  # voxels whose class is annotated
        for k in range(c):
            if annotated[k]:
                target[i, k] = onehot[i, k]  # 1 on its voxels, 0 elsewhere
            else:
                target[i, k] = torch.where(ann_voxel, 0.0, p_value)  # 0 where an annotated class sits, p elsewhere
    preds = [3 * torch.randn(b, c, n, generator=g, dtype=torch.float64) for _ in range(4)]
    # also predictions near the ground truth but not on it
    preds.append(GT_SCALE * onehot + torch.randn(b, c, n, generator=g, dtype=torch.float64))
    return labels, onehot, target, preds


@pytest.mark.parametrize("name", list(COMPATIBLE_LOSSES))
@settings(max_examples=25, deadline=None)
@given(problem=partial_problems())
def test_ground_truth_minimises_compatible_losses(name, problem):
    _, onehot, target, preds = problem
    loss = COMPATIBLE_LOSSES[name]()
    at_truth = loss(GT_SCALE * onehot, target).item()
    for pred in preds:
        assert at_truth <= loss(pred, target).item() + 1e-9


@settings(max_examples=25, deadline=None)
@given(problem=partial_problems())
def test_ground_truth_minimises_prior_loss(problem):
    # Eq. 7 with the true intersection / extra maps as predictions (softmax over 2m channels)
    labels, onehot, target, _ = problem
    b, c, n = onehot.shape
    g = torch.Generator().manual_seed(int(labels.sum()))
    cond = target[:, torch.randperm(c, generator=g)]  # another partial label of the same grid
    truth = torch.cat([onehot * (cond == 1), onehot * (cond != 1)], 1)  # z_cap, z_delta of the truth
    loss = PriorLoss(("ce", "dice"), reduction="sum")
    at_truth = loss(GT_SCALE * truth, cond).item()
    for _ in range(4):
        assert at_truth <= loss(3 * torch.randn(b, 2 * c, n, generator=g, dtype=torch.float64), cond).item() + 1e-9


def _ce_unknown_as_background(x, target):
    """Ordinary CE on the label map a partial case is stored as: unknown voxels get label 0."""
    labels = torch.where((target == 1).any(1), (target == 1).double().argmax(1), 0)
    return F.cross_entropy(x, labels, reduction="sum")


def test_proposition_1_counter_example():
    # 3 classes, class 1 annotated; voxel 0 is class 1, voxel 1 is truly class 2 (not annotated)
    # so it is stored as (0, 0, p): ordinary CE reads "background" there
    target = torch.tensor([[[0.0, 0.5], [1.0, 0.0], [0.0, 0.5]]], dtype=torch.float64)
    truth = GT_SCALE * torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    background = GT_SCALE * torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    # CE prefers the wrong "background" prediction: the truth is not a minimiser (incompatible)
    assert _ce_unknown_as_background(truth, target) > 50.0
    assert _ce_unknown_as_background(background, target) < 1e-20
    # every compatible loss scores the truth at least as well as the background guess
    for make in COMPATIBLE_LOSSES.values():
        loss = make()
        assert loss(truth, target).item() <= loss(background, target).item() + 1e-12


@settings(max_examples=30, deadline=None)
@given(problem=partial_problems())
def test_ce_with_unknown_as_background_is_incompatible(problem):
    # whenever a voxel's true class is not annotated and not background, the truth is beaten
    labels, onehot, target, _ = problem
    unknown_fg = ((target == 1).sum(1) == 0) & (labels != 0)
    if not bool(unknown_fg.any()):
        return
    stored = torch.where((target == 1).any(1), labels, 0)  # what the partial label map says
    background_guess = GT_SCALE * F.one_hot(stored, onehot.shape[1]).permute(0, 2, 1).double()
    assert _ce_unknown_as_background(GT_SCALE * onehot, target) > _ce_unknown_as_background(background_guess, target)
    # while the marginal and compatible CE keep the truth optimal
    for loss in (MarginalCELoss(reduction="sum"), CompatibleLoss("ta_ce", "ex_ce", reduction="sum")):
        assert loss(GT_SCALE * onehot, target).item() <= loss(background_guess, target).item() + 1e-9


@pytest.mark.parametrize("name", list(COMPATIBLE_LOSSES))
@settings(max_examples=15, deadline=None)
@given(problem=partial_problems())
def test_unknown_only_samples_do_not_matter(name, problem):
    # appending an unlabelled sample changes neither the loss ("sum") nor the first samples' gradients
    _, onehot, target, preds = problem
    loss = COMPATIBLE_LOSSES[name]()
    if getattr(loss, "reduction", "sum") != "sum" or getattr(loss, "batch", False):
        return
    x = preds[0].clone().requires_grad_(True)
    extra = torch.cat([preds[0], 5 * preds[1][:1]], 0).requires_grad_(True)
    t_extra = torch.cat([target, torch.full_like(target[:1], 0.5)], 0)
    a = loss(x, target)
    b_ = loss(extra, t_extra)
    (ga,) = torch.autograd.grad(a, x)
    (gb,) = torch.autograd.grad(b_, extra)
    torch.testing.assert_close(a, b_)
    torch.testing.assert_close(ga, gb[: x.shape[0]])
    assert torch.count_nonzero(gb[x.shape[0] :]) == 0
