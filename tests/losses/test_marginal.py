"""Marginal and exclusion losses: hand-computed values, agreement with torch / MONAI, decisions."""

from __future__ import annotations

import doctest
import math

import monai
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import partialseg.losses._functional as functional
import partialseg.losses.dcl as compatible_module
import partialseg.losses.marginal as marginal_module
from partialseg.losses import (
    ExclusionCELoss,
    ExclusionDiceLoss,
    MarginalCELoss,
    MarginalDiceLoss,
    MarginalExclusionLoss,
)
from partialseg.losses._functional import marginal_softmax_stats

# ----------------------------------------------------------------------------------------------
# one hand-made case: 3 classes, 3 voxels, probabilities chosen directly (logits = log p)
#   voxel 0: p = (.1, .2, .7), target (1, 0, 0)      labelled class 0
#   voxel 1: p = (.5, .3, .2), target (0, .5, .5)    class 0 known absent, merged class {1, 2}
#   voxel 2: p = (.2, .2, .6), target (.5, .5, .5)   unlabelled
# ----------------------------------------------------------------------------------------------
PROBS = torch.tensor([[0.1, 0.5, 0.2], [0.2, 0.3, 0.2], [0.7, 0.2, 0.6]], dtype=torch.float64)[None]
TARGET = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]], dtype=torch.float64)[None]
LOGITS = PROBS.log()

# marginal CE (Eq. 5): -log .1 (voxel 0) - log(.3 + .2) (voxel 1) - log 1 (voxel 2)
MCE = -math.log(0.1) - math.log(0.5)
# marginal Dice (Eq. 6), voxel 2 left out (no information), smooth 0:
#   channel 0: P = (.1 [q of {0}], .5 [own p, not a candidate]); T = (1, 0): 1 - 2*.1/(.6 + 1)
#   channel 1: P = (.2, .5 [q of {1,2}]); T = (0, 1):            1 - 2*.5/(.7 + 1)
#   channel 2: P = (.7, .5);              T = (0, 1):            1 - 2*.5/(1.2 + 1)
MDICE = (1 - 0.2 / 1.6) + (1 - 1.0 / 1.7) + (1 - 1.0 / 2.2)
# exclusion CE (Eq. 11, eps 1): e = [t == 0]
#   voxel 0: e = (0, 1, 1): log(1.2) + log(1.7); voxel 1: e = (1, 0, 0): log(1.5); voxel 2: none
ECE = math.log(1.2) + math.log(1.7) + math.log(1.5)
# exclusion Dice (Eq. 10, region level, smooth 0): per channel 2 sum(e p) / (sum e + sum p),
# sums over the informative voxels 0 and 1 (voxel 2, unlabelled, is left out)
#   channel 0: e at voxel 1: 2*.5 / (1 + .1 + .5); channel 1: e at voxel 0: 2*.2 / (1 + .2 + .3);
#   channel 2: e at voxel 0: 2*.7 / (1 + .7 + .2)
EDICE = 1.0 / 1.6 + 0.4 / 1.5 + 1.4 / 1.9

HAND_CASES = [
    ("mce", lambda: MarginalCELoss(reduction="sum"), MCE),
    ("mdice", lambda: MarginalDiceLoss(reduction="sum", smooth_nr=0, smooth_dr=0), MDICE),
    ("ece", lambda: ExclusionCELoss(reduction="sum"), ECE),
    ("edice", lambda: ExclusionDiceLoss(reduction="sum", smooth_nr=0, smooth_dr=0), EDICE),
    (
        "marginal_exclusion",
        lambda: MarginalExclusionLoss(reduction="sum", smooth_nr=0, smooth_dr=0),
        (MCE + MDICE) + 2 * (ECE + EDICE),
    ),
    (
        "marginal_exclusion_weights",
        lambda: MarginalExclusionLoss(reduction="sum", smooth_nr=0, smooth_dr=0, lambda_marginal=0.5, lambda_exclusion=0),
        0.5 * (MCE + MDICE),
    ),
]


@pytest.mark.parametrize("name,make,expected", HAND_CASES, ids=[c[0] for c in HAND_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_computed(name, make, expected, dtype):
    out = make()(LOGITS.to(dtype), TARGET.to(dtype))
    assert out.item() == pytest.approx(expected, rel=1e-5 if dtype == torch.float32 else 1e-10)


def test_mean_and_none_reductions():
    # CE-type: "mean" divides the voxel sum by B * N (3 voxels), "none" keeps (B, *spatial)
    assert MarginalCELoss()(LOGITS, TARGET).item() == pytest.approx(MCE / 3)
    per_voxel = MarginalCELoss(reduction="none")(LOGITS, TARGET)
    assert per_voxel.shape == (1, 3)
    assert per_voxel[0, 2].item() == 0.0
    # Dice-type: "none" keeps MONAI's broadcastable (B, C, 1) shape
    assert MarginalDiceLoss(reduction="none")(LOGITS, TARGET).shape == (1, 3, 1)
    assert MarginalDiceLoss(reduction="none", batch=True)(LOGITS, TARGET).shape == (1, 3, 1)


# ----------------------------------------------------------------------------------------------
# everything annotated: the ordinary losses
# ----------------------------------------------------------------------------------------------


def _full(shape=(2, 4, 5, 6, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(shape, generator=g)
    lab = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    return x, lab, F.one_hot(lab, shape[1]).movedim(-1, 1).float()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_full_annotation_marginal_ce_is_cross_entropy(reduction):
    x, lab, oh = _full()
    torch.testing.assert_close(MarginalCELoss(reduction=reduction)(x, oh), F.cross_entropy(x, lab, reduction=reduction))


DICE_SETTINGS = [
    {},
    {"include_background": False},
    {"batch": True},
    {"reduction": "sum", "smooth_nr": 0.0, "smooth_dr": 1e-6},
    {"reduction": "none"},
    {"weight": [0.5, 1.0, 2.0, 0.0]},
    {"include_background": False, "weight": [1.0, 2.0, 3.0], "batch": True},
]


@pytest.mark.parametrize("kwargs", DICE_SETTINGS)
def test_full_annotation_marginal_dice_is_monai_dice(kwargs):
    x, _, oh = _full()
    x.requires_grad_(True)
    ours = MarginalDiceLoss(**kwargs)(x, oh)
    ref = monai.losses.DiceLoss(softmax=True, **kwargs)(x, oh)
    torch.testing.assert_close(ours, ref.reshape(ours.shape))
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [{}, {"include_background": False, "batch": True}])
def test_full_annotation_marginal_exclusion_without_exclusion_is_dice_ce(kwargs):
    x, _, oh = _full()
    ours = MarginalExclusionLoss(lambda_exclusion=0, **kwargs)(x, oh)
    ref = monai.losses.DiceCELoss(softmax=True, **kwargs)(x, oh)
    torch.testing.assert_close(ours, ref)


def test_full_annotation_exclusion_is_complement():
    # e = 1 - y when everything is annotated: eCE = sum (1 - y) log(p + 1)
    x, _, oh = _full()
    p = torch.softmax(x, 1)
    ref = ((1 - oh) * torch.log(p + 1)).sum(1).mean()
    torch.testing.assert_close(ExclusionCELoss()(x, oh), ref)


# ----------------------------------------------------------------------------------------------
# decisions: nothing annotated, unlabelled voxels, absent classes, dtypes, extremes
# ----------------------------------------------------------------------------------------------

ALL_LOSSES = [
    MarginalCELoss,
    MarginalDiceLoss,
    ExclusionCELoss,
    ExclusionDiceLoss,
    MarginalExclusionLoss,
    lambda: MarginalDiceLoss(batch=True),
    lambda: MarginalExclusionLoss(batch=True, include_background=False),
]


@pytest.mark.parametrize("make", ALL_LOSSES)
def test_nothing_annotated_is_zero_with_zero_gradient(make):
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.full((2, 4, 3, 3), 0.5)
    loss = make()(x, t)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, x)
    assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("make", ALL_LOSSES)
def test_unlabelled_voxels_change_nothing(make):
    # sample 1 is unlabelled: its logits change neither the loss nor the gradient of sample 0
    x, _, oh = _full((2, 4, 3, 3, 2), seed=3)
    t = oh.clone()
    t[1] = 0.3
    x.requires_grad_(True)
    loss_a = make()(x, t)
    (g_a,) = torch.autograd.grad(loss_a, x)
    x2 = x.detach().clone()
    x2[1] = 10 * torch.randn_like(x2[1])
    x2.requires_grad_(True)
    loss_b = make()(x2, t)
    (g_b,) = torch.autograd.grad(loss_b, x2)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(g_a[0], g_b[0])
    assert torch.count_nonzero(g_b[1]) == 0


def test_absent_class_follows_monai():
    # class 3 absent from the target: its Dice term is 1 - smooth_nr / (sum p + smooth_dr), as MONAI
    x, lab, _ = _full()
    lab = lab.clamp(max=2)
    oh = F.one_hot(lab, 4).movedim(-1, 1).float()
    ours = MarginalDiceLoss(reduction="none")(x, oh)
    ref = monai.losses.DiceLoss(softmax=True, reduction="none")(x, oh)
    torch.testing.assert_close(ours, ref)
    assert ours[:, 3].min() > 0.99  # predicting an absent class is penalised, not hidden


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", ALL_LOSSES[:5])
def test_half_precision_inputs_compute_in_float32(make, dtype):
    x, _, oh = _full((2, 4, 4, 4))
    t = oh.clone()
    t[1, 1:] = torch.where(oh[1, 1:] == 1, 0.5, oh[1, 1:])  # partial sample
    t[1, 1:] = torch.where(oh[1, :1] == 1, 0.0, t[1, 1:])
    xh = x.to(dtype).requires_grad_(True)
    loss = make()(xh, t.to(dtype))
    assert loss.dtype == torch.float32
    ref = make()(xh.detach().float(), t)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad.float()).all()


@pytest.mark.parametrize("make", ALL_LOSSES[:5])
def test_extreme_logits_are_finite(make):
    x = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [0.0, 0.0, 1e4]]]).requires_grad_(True)
    t = torch.tensor([[[0.0, 1.0, 0.5], [0.5, 0.0, 0.5], [0.5, 0.0, 0.5]]])
    loss = make()(x, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_extreme_logits_marginal_ce_is_exact():
    # voxel 0: candidates {1, 2} with logits (-1e4, 0) against 1e4: -log q = 1e4 - logsumexp(-1e4, 0) = 1e4
    # voxel 1: candidate {0} at -1e4 against 1e4: 2e4
    x = torch.tensor([[[1e4, -1e4], [-1e4, 1e4], [0.0, 0.0]]], requires_grad=True)
    t = torch.tensor([[[0.0, 1.0], [0.5, 0.0], [0.5, 0.0]]])
    loss = MarginalCELoss(reduction="none")(x, t)
    torch.testing.assert_close(loss, torch.tensor([[1e4, 2e4]]))
    loss.sum().backward()
    # gradient p - softmax restricted to the candidates: voxel 0 (1, -0, -1), voxel 1 (-1, 1, 0)
    torch.testing.assert_close(x.grad, torch.tensor([[[1.0, -1.0], [0.0, 1.0], [-1.0, 0.0]]]))


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


def _partial_double(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    b, c, n = 2, 4, 7
    x = scale * torch.randn(b, c, n, generator=g, dtype=torch.float64)
    t = torch.full((b, c, n), 0.5, dtype=torch.float64)
    t[0] = F.one_hot(torch.randint(0, c, (n,), generator=g), c).T.double()  # fully labelled
    lab = torch.randint(0, c, (n,), generator=g)
    t[1, 1] = (lab == 1).double()  # sample 1 annotates class 1 only
    t[1, [0, 2, 3]] = torch.where(lab == 1, 0.0, 0.5).double().expand(3, n)
    t[1, :, 0] = 0.5  # one unlabelled voxel
    return x, t


@pytest.mark.parametrize("want", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize("scale", [1.0, 12.0])
def test_gradcheck(want, scale):
    # scale 12 puts some candidate sets below q < 1e-3: the exact low-q path is checked too
    x, t = _partial_double(scale=scale)
    x.requires_grad_(True)

    def f(x):
        return tuple(o for o in marginal_softmax_stats(x, t, *map(bool, want)) if o.numel())

    assert gradcheck(f, (x,))


@pytest.mark.parametrize("make", [MarginalCELoss, MarginalDiceLoss])
def test_unknown_logits_seen_only_through_merged_probability(make):
    # at a partially labelled voxel the loss depends on the candidate logits only through
    # q = sum_S p, so dL/dx_j = p_j * (same factor) for every candidate j
    x, t = _partial_double(seed=2)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(make(reduction="sum")(x, t), x)
    p = torch.softmax(x.detach(), 1)
    checked = 0
    for n in range(t.shape[2]):
        cand = (t[1, :, n] > 0) & (t[1, :, n] < 1)
        if cand.sum() >= 2 and cand.sum() < t.shape[1]:
            ratio = g[1, cand, n] / p[1, cand, n]
            torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))
            checked += 1
    assert checked > 0


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------

BAD_ARGS = [
    (MarginalCELoss, {"reduction": "avg"}, "avg"),
    (MarginalDiceLoss, {"smooth_nr": -1}, "smooth_nr"),
    (MarginalDiceLoss, {"weight": [1.0, -2.0]}, "non-negative"),
    (MarginalDiceLoss, {"weight": [[1.0]]}, "1-D"),
    (ExclusionCELoss, {"eps": 0}, "eps"),
    (ExclusionDiceLoss, {"smooth_dr": float("nan")}, "smooth_dr"),
    (MarginalExclusionLoss, {"reduction": "none"}, "none"),
    (MarginalExclusionLoss, {"lambda_marginal": 0, "lambda_exclusion": 0}, "both 0"),
    (MarginalExclusionLoss, {"lambda_exclusion": -1}, "lambda_exclusion"),
]


@pytest.mark.parametrize("cls,kwargs,match", BAD_ARGS)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "x,t,match",
    [
        (torch.zeros(1, 3, 4), torch.zeros(1, 3, 5), "differs"),
        (torch.zeros(1, 1, 4), torch.ones(1, 1, 4), "at least 2"),
        (torch.zeros(3, 4), torch.zeros(3, 4), "B, C"),
        (torch.zeros(1, 3, 4, dtype=torch.long), torch.zeros(1, 3, 4), "floating"),
    ],
)
def test_bad_inputs(x, t, match):
    with pytest.raises(ValueError, match=match):
        MarginalCELoss()(x, t)


def test_weight_length_checked_in_forward():
    x, _, oh = _full()
    with pytest.raises(ValueError, match="weight"):
        MarginalDiceLoss(weight=[1.0, 2.0])(x, oh)


def test_weight_is_a_buffer():
    loss = MarginalDiceLoss(weight=[1.0, 2.0, 3.0, 4.0])
    assert "class_weight" in dict(loss.named_buffers())


@pytest.mark.parametrize("module", [marginal_module, compatible_module, functional])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.parametrize("name", ["MarginalExclusionLoss", "MarginalCELoss", "ExclusionDiceLoss"])
def test_losses_run_in_float32_under_autocast(monkeypatch, name):
    # A trainer with amp=True calls the loss inside autocast. The torch path (CUDA; here forced on
    # CPU) would then sum voxels in bfloat16 / float16 (float16 overflowed to NaN on a 64x192x192
    # CUDA patch): the loss must equal its float32 value and return float32.
    import partialseg.losses as L
    from partialseg.losses import marginal

    monkeypatch.setattr(marginal._native, "usable", lambda x: False)
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(2, 4, 16, 16, 16, generator=g)
    t = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 16, 16, 16), generator=g), 4).permute(0, 4, 1, 2, 3).float()
    t[:, 1:3][t[:, 1:3] == 0] = 0.5
    loss = getattr(L, name)()
    ref = loss(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = loss(x, t)
        assert torch.is_autocast_enabled("cpu")  # restored after the loss
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, ref, rtol=1e-6, atol=1e-6)
