"""DCL losses: hand-computed values per base, full-annotation agreement, gradients, decisions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from partialseg.losses import CompatibleLoss, ConditionalCompatibleLoss, PriorLoss, conditional_compatible_terms
from partialseg.losses._functional import compatible_from_logits, compatible_terms_from_probs

# 3 classes, 3 voxels, probabilities chosen directly (logits = log p)
#   voxel 0: p = (.1, .2, .7), target (1, 0, 0)       labelled class 0
#   voxel 1: p = (.5, .3, .2), target (0, .5, .5)     class 0 known absent, {1, 2} unknown
#   voxel 2: p = (.2, .2, .6), target (.5, .5, .5)    unlabelled
# the sample's unlabelled classes (unknown somewhere) are {0, 1, 2}; at voxel 0 those known 0
# are {1, 2}, so the exclusive bases' merged probability there is s = .2 + .7 = .9
PROBS = torch.tensor([[0.1, 0.5, 0.2], [0.2, 0.3, 0.2], [0.7, 0.2, 0.6]], dtype=torch.float64)[None]
TARGET = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]], dtype=torch.float64)[None]
LOGITS = PROBS.log()
L = math.log

POSITIVE = {
    "ce": -L(0.1),  # Eq. 11: only the entry equal to 1
    "dice": 1 - 0.2 / 1.1,  # Eq. 13: 1 - 2p/(1+p) at p = .1
    "ta_ce": -L(0.1) - L(0.5),  # Eq. 15: + merged voxel 1, q = .3 + .2; voxel 2: q = 1
    "ta_dice": (1 - 0.2 / 1.1) + (1 - 1.0 / 1.5),  # Eq. 16 on p = .1 and q = .5; voxel 2: 1 - 2/2 = 0
}
NEGATIVE = {
    "ce": -L(0.8) - L(0.3) - L(0.5),  # Eq. 12: -log(1-p) at the zeros (.2, .7 | .5)
    "dice": 0.4 / 1.2 + 1.4 / 1.7 + 1.0 / 1.5,  # Eq. 14: 2p/(1+p) at the zeros
    "ex_ce": L(1.2) + L(1.7) + L(1.5) + L(1.9),  # Eq. 17: log(p+1) at the zeros + log(s+1), s = .9
    "ex_dice": 0.4 / 1.2 + 1.4 / 1.7 + 1.0 / 1.5 + 1.8 / 1.9,  # Eq. 18
}
HAND_CASES = [(pos, None, v) for pos, v in POSITIVE.items()] + [(None, neg, v) for neg, v in NEGATIVE.items()]
HAND_CASES += [
    ("ce", "ce", POSITIVE["ce"] + NEGATIVE["ce"]),
    (("ce", "dice"), ("ce", "dice"), POSITIVE["ce"] + POSITIVE["dice"] + NEGATIVE["ce"] + NEGATIVE["dice"]),  # CE+Dice
    (("ta_ce", "ta_dice"), ("ex_ce", "ex_dice"), sum(POSITIVE[k] for k in ("ta_ce", "ta_dice")) + NEGATIVE["ex_ce"] + NEGATIVE["ex_dice"]),  # MMEE
]


@pytest.mark.parametrize("positive,negative,expected", HAND_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_computed(positive, negative, expected, dtype):
    loss = CompatibleLoss(positive, negative, reduction="sum")
    assert loss(LOGITS.to(dtype), TARGET.to(dtype)).item() == pytest.approx(expected, rel=1e-5)
    # the probability-domain reference agrees
    pos = loss.positive
    neg = loss.negative
    ref = compatible_terms_from_probs(PROBS, TARGET, pos, neg).sum()
    assert ref.item() == pytest.approx(expected, rel=1e-10)


def test_alphas_weight_the_two_parts():
    loss = CompatibleLoss("ce", "dice", alpha_pos=0.5, alpha_neg=3.0, reduction="sum")
    assert loss(LOGITS, TARGET).item() == pytest.approx(0.5 * POSITIVE["ce"] + 3.0 * NEGATIVE["dice"])


def test_reductions():
    per_voxel = CompatibleLoss("ce", "ce", reduction="none")(LOGITS, TARGET)
    assert per_voxel.shape == (1, 3)
    assert per_voxel[0, 2].item() == 0.0  # unlabelled voxel
    assert CompatibleLoss("ce", "ce")(LOGITS, TARGET).item() == pytest.approx(per_voxel.sum().item() / 3)


# ----------------------------------------------------------------------------------------------
# everything annotated: the ordinary losses
# ----------------------------------------------------------------------------------------------


def _full(shape=(2, 4, 5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(shape, generator=g)
    lab = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)
    return x, lab, F.one_hot(lab, shape[1]).movedim(-1, 1).float()


@pytest.mark.parametrize("positive", ["ce", "ta_ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_full_annotation_positive_ce_is_cross_entropy(positive, reduction):
    x, lab, oh = _full()
    torch.testing.assert_close(CompatibleLoss(positive, None, reduction=reduction)(x, oh), F.cross_entropy(x, lab, reduction=reduction))


def test_full_annotation_ce_ce_is_binary_cross_entropy_of_softmax():
    # L_P + L_N with CE bases = -sum_j [y log p + (1 - y) log(1 - p)] (section 3.4.1)
    x, _, oh = _full()
    p = torch.softmax(x, 1)
    ref = F.binary_cross_entropy(p, oh, reduction="sum") / (x.numel() / x.shape[1])
    torch.testing.assert_close(CompatibleLoss("ce", "ce")(x, oh), ref)


def test_full_annotation_dice_dice_is_pixel_dice():
    # [y=1] (1 - 2p/(1+p)) + [y=0] 2p/(1+p): the per-pixel Dice of section 3.4.1 with y -> 1 - y for negatives
    x, _, oh = _full()
    p = torch.softmax(x, 1)
    d = 2 * p / (1 + p)
    ref = (oh * (1 - d) + (1 - oh) * d).sum()
    torch.testing.assert_close(CompatibleLoss("dice", "dice", reduction="sum")(x, oh), ref)


# ----------------------------------------------------------------------------------------------
# unknown entries: no direct term
# ----------------------------------------------------------------------------------------------

DIRECT_BASES = [("ce", "ce"), ("dice", "dice"), (("ce", "dice"), ("ce", "dice"))]


@pytest.mark.parametrize("positive,negative", DIRECT_BASES)
def test_unknown_entries_have_no_direct_term(positive, negative):
    # d L / d p at an entry 0 < t < 1 is exactly 0 (Eq. 3-4 only sum over t == 1 and t == 0)
    probs = PROBS.clone().requires_grad_(True)
    loss = compatible_terms_from_probs(probs, TARGET, (positive,) if isinstance(positive, str) else positive, (negative,) if isinstance(negative, str) else negative).sum()
    (g,) = torch.autograd.grad(loss, probs)
    unknown = (TARGET > 0) & (TARGET < 1)
    assert torch.count_nonzero(g[unknown]) == 0
    assert torch.count_nonzero(g[~unknown]) == int((~unknown).sum())


@pytest.mark.parametrize("positive,negative", HAND_CASES and [(p, n) for p, n, _ in HAND_CASES])
def test_value_of_p_does_not_matter(positive, negative):
    # p is a label value meaning "unknown", not a probability to reach
    loss = CompatibleLoss(positive, negative, reduction="sum")
    t2 = torch.where((TARGET > 0) & (TARGET < 1), 0.123, TARGET)
    assert loss(LOGITS, TARGET).item() == pytest.approx(loss(LOGITS, t2).item(), rel=1e-12)


@pytest.mark.parametrize("positive,negative", [(p, n) for p, n, _ in HAND_CASES])
def test_nothing_annotated_is_zero_with_zero_gradient(positive, negative):
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = CompatibleLoss(positive, negative)(x, torch.full((2, 4, 3, 3), 0.5))
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, x)
    assert torch.count_nonzero(g) == 0


# ----------------------------------------------------------------------------------------------
# gradients, dtypes, extremes
# ----------------------------------------------------------------------------------------------


def _partial_double(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    b, c, n = 2, 4, 6
    x = scale * torch.randn(b, c, n, generator=g, dtype=torch.float64)
    t = torch.zeros(b, c, n, dtype=torch.float64)
    t[0] = F.one_hot(torch.randint(0, c, (n,), generator=g), c).T.double()
    lab = torch.randint(0, c, (n,), generator=g)
    t[1, 1] = (lab == 1).double()
    t[1, [0, 2, 3]] = torch.where(lab == 1, 0.0, 0.5).double().expand(3, n)
    t[1, :, 0] = 0.5
    return x, t


GRAD_BASES = [
    (pos, neg)
    for pos in [(), ("ce",), ("dice",), ("ta_ce",), ("ta_dice",)]
    for neg in [(), ("ce",), ("dice",), ("ex_ce",), ("ex_dice",)]
    if pos or neg
]


@pytest.mark.parametrize("positive,negative", GRAD_BASES)
def test_gradcheck(positive, negative):
    x, t = _partial_double()
    x.requires_grad_(True)
    assert gradcheck(lambda x: compatible_from_logits(x, t, positive, negative, 1.3, 0.7), (x,))
    # and the hand-written backward agrees with autograd through the probability reference
    (g_fast,) = torch.autograd.grad(compatible_from_logits(x, t, positive, negative, 1.3, 0.7).sum(), x)
    (g_ref,) = torch.autograd.grad(compatible_terms_from_probs(torch.softmax(x, 1), t, positive, negative, 1.3, 0.7).sum(), x)
    torch.testing.assert_close(g_fast, g_ref)


ALL_BASES = (("ce", "dice", "ta_ce", "ta_dice"), ("ce", "dice", "ex_ce", "ex_dice"))


@pytest.mark.parametrize("positive,negative", [("ce", "ce"), ALL_BASES])
def test_extreme_logits_are_finite(positive, negative):
    x = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [0.0, 0.0, 1e4]]]).requires_grad_(True)
    t = torch.tensor([[[0.0, 1.0, 0.5], [0.5, 0.0, 0.5], [0.5, 0.0, 0.5]]])
    loss = CompatibleLoss(positive, negative)(x, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_extreme_logits_negative_ce_is_exact():
    # -log(1 - p_0) with p_0 = 1 in float: exactly logsumexp(x) - logsumexp(x_1, x_2) = 1e4 - 0
    x = torch.tensor([[[1e4], [0.0], [-1e4]]], requires_grad=True)
    t = torch.tensor([[[0.0], [1.0], [0.0]]])
    loss = CompatibleLoss(None, "ce", reduction="sum")(x, t)
    assert loss.item() == pytest.approx(1e4)
    loss.backward()
    # d/dx: p_0 (1, -softmax of the others) = (1, -1, 0)
    torch.testing.assert_close(x.grad, torch.tensor([[[1.0], [-1.0], [0.0]]]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_float32(dtype):
    x, _, oh = _full()
    xh = x.to(dtype).requires_grad_(True)
    loss = CompatibleLoss(*ALL_BASES)(xh, oh.to(dtype))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, CompatibleLoss(*ALL_BASES)(xh.detach().float(), oh))
    loss.backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad.float()).all()


# ----------------------------------------------------------------------------------------------
# prior and conditional compatible losses (CompNet, 2m channels)
# ----------------------------------------------------------------------------------------------

# m = 2; voxel 0: probabilities (cap_0, cap_1, delta_0, delta_1) = (.1, .2, .3, .4), y^c = (0, 1)
#   inclusiveness: y^c_0 = 0 -> f_N(cap_0 = .1); exclusiveness: y^c_1 = 1 -> f_N(delta_1 = .4)
# voxel 1: (.25, .25, .25, .25), y^c = (.5, .5): no term
Z_PROBS = torch.tensor([[[0.1, 0.25], [0.2, 0.25], [0.3, 0.25], [0.4, 0.25]]], dtype=torch.float64)
COND = torch.tensor([[[0.0, 0.5], [1.0, 0.5]]], dtype=torch.float64)
PRIOR_CASES = [
    ("ce", -L(0.9) - L(0.6)),
    ("dice", 0.2 / 1.1 + 0.8 / 1.4),
    ("ex_ce", L(1.1) + L(1.4)),
    ("ex_dice", 0.2 / 1.1 + 0.8 / 1.4),
    (("ce", "dice"), -L(0.9) - L(0.6) + 0.2 / 1.1 + 0.8 / 1.4),
]


@pytest.mark.parametrize("negative,expected", PRIOR_CASES)
def test_prior_loss_hand_computed(negative, expected):
    assert PriorLoss(negative, reduction="sum")(Z_PROBS.log(), COND).item() == pytest.approx(expected)


def test_conditional_compatible_hand_computed():
    # target class 1 at voxel 0, inside y^c: z_cap = y^t * y^c = (0, 1), z_delta = (0, 0)
    # voxel 1: y^t = y^c = (.5, .5): z_cap = .25, z_delta = .25, sum .5 -> unknown
    z = torch.tensor([[[0.0, 0.25], [1.0, 0.25], [0.0, 0.25], [0.0, 0.25]]], dtype=torch.float64)
    # y_hat = cap + delta = (.4, .6): L_P = -log .6, L_N = -log(1 - .4); prior (ce) = -log .9 - log .6
    expected = -2 * L(0.6) + (-L(0.9) - L(0.6))
    loss = ConditionalCompatibleLoss(reduction="sum")
    assert loss(Z_PROBS.log(), z, COND).item() == pytest.approx(expected)
    assert conditional_compatible_terms(Z_PROBS, z, COND).sum().item() == pytest.approx(expected)
    # prior_weight 0: the compatible loss on y_hat alone
    no_prior = ConditionalCompatibleLoss(prior_weight=0, reduction="sum")(Z_PROBS.log(), z, COND)
    assert no_prior.item() == pytest.approx(-2 * L(0.6))


def test_conditional_compatible_maps_reading_hand_computed():
    # reading="maps": L_comp on the 4 maps against z. Voxel 0: z = (0, 1, 0, 0), probabilities
    # (.1, .2, .3, .4): L_P = -log .2, L_N = -log .9 - log .7 - log .6; voxel 1 all unknown: 0.
    # The prior (ce) as above: -log .9 - log .6
    z = torch.tensor([[[0.0, 0.25], [1.0, 0.25], [0.0, 0.25], [0.0, 0.25]]], dtype=torch.float64)
    expected = -L(0.2) - L(0.9) - L(0.7) - L(0.6) + (-L(0.9) - L(0.6))
    loss = ConditionalCompatibleLoss(reduction="sum", reading="maps")
    assert loss(Z_PROBS.log(), z, COND).item() == pytest.approx(expected)
    halved = ConditionalCompatibleLoss(reduction="sum", reading="maps", prior_weight=0.5)(Z_PROBS.log(), z, COND)
    assert halved.item() == pytest.approx(expected - 0.5 * (-L(0.9) - L(0.6)))


def test_conditional_ground_truth_minimises():
    # compatibility (Eq. 8): the true z (one-hot over 2m) scores lower than random predictions
    g = torch.Generator().manual_seed(0)
    m, n = 3, 20
    yt_lab = torch.randint(0, m, (n,), generator=g)
    yc_lab = torch.randint(0, m, (n,), generator=g)
    yt = F.one_hot(yt_lab, m).T.double()[None]
    yc = F.one_hot(yc_lab, m).T.double()[None]
    yc[:, :, : n // 2] = torch.where(yc[:, :, : n // 2] == 1, 1.0, 0.5)  # partly unknown conditional label
    z = torch.cat([yt * yc, yt - yt * yc], 1)
    gt_logits = 40 * torch.where(z == 1, 1.0, 0.0)
    for reading in ("sum", "maps"):
        loss = ConditionalCompatibleLoss(("ce", "dice"), ("ce", "dice"), reduction="sum", reading=reading)
        best = loss(gt_logits, z, yc).item()
        for _ in range(20):
            assert best <= loss(3 * torch.randn(1, 2 * m, n, generator=g, dtype=torch.float64), z, yc).item() + 1e-9


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("negative", ["ce", ("ce", "dice")])
def test_prior_is_zero_for_any_segmentation_split_along_the_conditional_label(monkeypatch, native, negative):
    # Eq. 7 constrains only how y_hat is split into z_cap / z_delta, never y_hat itself: for ANY
    # prediction y_hat, the split z_cap = y_hat * y^c, z_delta = y_hat * (1 - y^c) has a zero prior,
    # so L_cc (sum reading) equals L_comp(y_hat, y) of ablation #4. (docs/results.md: why the prior
    # cannot raise the Dice by itself.)
    monkeypatch.setenv("PARTIALSEG_NATIVE", native)
    g = torch.Generator().manual_seed(1)
    m, n = 3, 64
    y_hat = torch.softmax(2 * torch.randn(1, m, n, generator=g), 1)
    yc = (torch.rand(1, m, n, generator=g) > 0.5).float()
    yt = F.one_hot(torch.randint(0, m, (n,), generator=g), m).T.float()[None]  # fully annotated voxels...
    half = yt[:, :, n // 2 :]  # ...and, on the second half, only class 1 annotated: <0,p,1> with p = 0.5
    in_1 = half[:, 1:2] == 1
    yt[:, :, n // 2 :] = torch.where(in_1, half, 0.5)
    yt[:, 1:2, n // 2 :] = in_1.float()
    z = torch.cat([yt * yc, yt - yt * yc], 1)
    logits = torch.cat([torch.where(yc == 1, y_hat.log(), -1e4), torch.where(yc == 0, y_hat.log(), -1e4)], 1)
    cc = ConditionalCompatibleLoss("ce", negative, reduction="sum")(logits, z, yc)
    comp = CompatibleLoss("ce", negative, reduction="sum")(y_hat.log(), yt)
    assert PriorLoss(negative, reduction="sum")(logits, yc).item() == pytest.approx(0.0, abs=1e-5)
    assert cc.item() == pytest.approx(comp.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------

BAD_ARGS = [
    (CompatibleLoss, {"positive": "focal"}, "focal"),
    (CompatibleLoss, {"negative": "ta_ce"}, "ta_ce"),
    (CompatibleLoss, {"positive": None, "negative": None}, "at least one"),
    (CompatibleLoss, {"positive": ("ce", "ce")}, "repeat"),
    (CompatibleLoss, {"alpha_pos": 0}, "alpha_pos"),
    (CompatibleLoss, {"alpha_neg": -1}, "alpha_neg"),
    (CompatibleLoss, {"reduction": "batchmean"}, "batchmean"),
    (PriorLoss, {"negative": ()}, "at least one"),
    (PriorLoss, {"negative": "dsc"}, "dsc"),
    (ConditionalCompatibleLoss, {"prior_weight": -0.5}, "prior_weight"),
    (ConditionalCompatibleLoss, {"reading": "concat"}, "concat"),
]


@pytest.mark.parametrize("cls,kwargs,match", BAD_ARGS)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_conditional_shapes():
    with pytest.raises(ValueError, match="2m"):
        PriorLoss()(torch.zeros(1, 5, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="target"):
        ConditionalCompatibleLoss()(torch.zeros(1, 4, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))


@pytest.mark.parametrize("gap", [5.0, 9.0, 12.0, 20.0, 80.0])
def test_negative_ce_near_saturation_is_accurate(gap):
    # 1 - p_0 ranges from 7e-3 down to 1e-35: float32 result within 1e-5 of the float64 value,
    # through the log1p path (1 - p >= 1e-4) or the log-space path (below)
    x = torch.tensor([[[gap], [0.0], [-3.0]]])
    t = torch.tensor([[[0.0], [1.0], [0.0]]])
    loss = CompatibleLoss(None, "ce", reduction="sum")
    x64 = x.double().requires_grad_(True)
    ref = -(torch.logsumexp(x64[:, 1:], 1) - torch.logsumexp(x64, 1)) - torch.log1p(-torch.softmax(x64, 1)[:, 2])
    (g_ref,) = torch.autograd.grad(ref.sum(), x64)
    x32 = x.clone().requires_grad_(True)
    out = loss(x32, t)
    out.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(x32.grad, g_ref.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conditional_losses_half_precision(dtype):
    x = Z_PROBS.log().to(dtype).requires_grad_(True)
    z = torch.tensor([[[0.0, 0.25], [1.0, 0.25], [0.0, 0.25], [0.0, 0.25]]])
    cond = COND.float()
    for loss, args in ((PriorLoss(reduction="none"), (cond.to(dtype),)), (ConditionalCompatibleLoss(), (z.to(dtype), cond.to(dtype)))):
        out = loss(x, *args)
        assert out.dtype == torch.float32
        ref = loss(x.detach().float(), *(a.float() for a in args))
        torch.testing.assert_close(out, ref)
    assert PriorLoss(reduction="none")(x, cond).shape == (1, 2)
