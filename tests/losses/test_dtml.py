"""DTML losses against hand-computed values: the ramp, sdm_to_mask, L_con (value and gradient to
both networks), L_seg / L_mask with known, unknown (p) and unlabelled voxels, L_dis (fully known
classes only, empty class), the batch without a labelled voxel, and clear errors."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from monai.data import MetaTensor

import partialseg.losses.dtml as dtml_module
from partialseg.losses import DTMLLoss, consistency_ramp, masked_dice_loss, sdm_to_mask

LN3 = math.log(3.0)
K = 1500.0


def _target(fg, p=0.5):
    """<0,p,1> map (B, m, *spatial) from foreground channels: background = 1 where every fg is 0, p where any fg is p."""
    fg = torch.as_tensor(fg, dtype=torch.float32)
    bg = torch.where((fg == 1).any(1, keepdim=True), 0.0, torch.where((fg == p).any(1, keepdim=True), p, 1.0))
    return torch.cat([bg, fg], 1)


# ------------------------------------------------------------------------------ ramp, mask


@pytest.mark.parametrize(
    "t, expected",
    [
        (0, math.exp(-5.0)),  # 0.006738
        (1500, math.exp(-5.0 * 0.75**2)),  # 10 of 40 units: 0.060055
        (3000, math.exp(-5.0 * 0.5**2)),  # 0.286505
        (6000, 1.0),
        (60000, 1.0),
    ],
)
def test_ramp_at_hand_computed_points(t, expected):
    assert consistency_ramp(t) == pytest.approx(expected, rel=1e-12)
    assert consistency_ramp(t, max_weight=2.0) == pytest.approx(2 * expected, rel=1e-12)


def test_ramp_options():
    assert consistency_ramp(0.0) == pytest.approx(0.006737947, abs=1e-9)
    # the reference floors t / 150: iteration 299 is still on step 1
    assert consistency_ramp(299, stepwise=True) == pytest.approx(math.exp(-5 * (39 / 40) ** 2))
    assert consistency_ramp(299) == pytest.approx(math.exp(-5 * (1 - 299 / 150 / 40) ** 2))
    assert consistency_ramp(150, scale=10.0, length=30.0) == pytest.approx(math.exp(-5 * 0.5**2))
    assert consistency_ramp(0, max_weight=0.3, length=0.0) == 0.3  # no ramp
    values = [consistency_ramp(t) for t in range(0, 6001, 500)]
    assert all(a < b for a, b in zip(values, values[1:]))  # increasing up to the end of the ramp
    for bad in (dict(iteration=-1), dict(iteration=0, scale=0.0), dict(iteration=0, length=-1.0), dict(iteration=0, max_weight=-0.1)):
        with pytest.raises(ValueError):
            consistency_ramp(**bad)
    assert DTMLLoss(consistency_weight=0.5, ramp_scale=1.0, ramp_length=2.0).ramp(1) == pytest.approx(0.5 * math.exp(-5 * 0.25))


def test_sdm_to_mask_hand_values():
    sdm = torch.tensor([-1.0, -0.001, 0.0, 0.001, LN3 / K, 1.0])
    expected = [1.0, 1 / (1 + math.exp(-1.5)), 0.5, 1 / (1 + math.exp(1.5)), 0.25, 0.0]
    assert sdm_to_mask(sdm).tolist() == pytest.approx(expected, abs=1e-6)
    assert sdm_to_mask(torch.tensor([0.5]), k=2.0).item() == pytest.approx(1 / (1 + math.e))
    # inside (negative SDM) is foreground
    assert (sdm_to_mask(torch.tensor([-0.1])) > 0.99).all() and (sdm_to_mask(torch.tensor([0.1])) < 0.01).all()


# ------------------------------------------------------------------------------ L_con


def test_consistency_by_hand_on_an_unlabelled_case():
    # probabilities [0.5, 0.75], M_d masks [0.25, 0.5]: squared differences 0.0625 each
    seg = torch.tensor([[[0.0, LN3]]], requires_grad=True)
    sdm = torch.tensor([[[LN3 / K, 0.0]]], requires_grad=True)
    out = DTMLLoss()(seg, sdm, _target([[[0.5, 0.5]]]), iteration=6000)
    assert out["con"].item() == pytest.approx(0.0625, rel=1e-5)
    assert out["seg"].item() == out["mask"].item() == out["dis"].item() == 0.0
    assert out["con_weight"].item() == 1.0
    assert out["loss"].item() == pytest.approx(0.0625, rel=1e-5)
    out["loss"].backward()
    # d/dx mean((s(x) - m)^2) = 2 (s - m) s (1 - s) / N ; d/dz = 2 (s - m) k m (1 - m) / N
    assert seg.grad.flatten().tolist() == pytest.approx([2 * 0.25 * 0.25 / 2, 2 * 0.25 * 0.75 * 0.25 / 2], rel=1e-4)
    assert sdm.grad.flatten().tolist() == pytest.approx([2 * 0.25 * K * 0.25 * 0.75 / 2, 2 * 0.25 * K * 0.25 / 2], rel=1e-4)


def test_consistency_runs_per_class_over_labelled_and_unlabelled_voxels():
    # two foreground classes; class 2 agrees, class 1 differs by 0.25 at one voxel of four
    seg = torch.tensor([[[LN3, 0.0], [0.0, 0.0]]])
    sdm = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    labelled = _target([[[1.0, 0.0], [0.0, 0.0]]])
    unlabelled = _target([[[0.5, 0.5], [0.5, 0.5]]])
    for target in (labelled, unlabelled):
        out = DTMLLoss()(seg, sdm, target, iteration=6000)
        assert out["con"].item() == pytest.approx(0.0625 / 4, rel=1e-5)
    weighted = DTMLLoss(consistency_weight=3.0)(seg, sdm, unlabelled, iteration=3000)
    assert weighted["con_weight"].item() == pytest.approx(3 * math.exp(-1.25))
    assert weighted["loss"].item() == pytest.approx(3 * math.exp(-1.25) * 0.0625 / 4, rel=1e-5)


def test_consistency_gradient_reaches_both_networks():
    torch.manual_seed(0)
    seg_net, sdm_net = torch.nn.Conv3d(1, 2, 1), torch.nn.Conv3d(1, 2, 1)
    x = torch.randn(2, 1, 3, 3, 3)
    out = DTMLLoss(consistency_weight=1.0)(seg_net(x), torch.tanh(sdm_net(x)) * 1e-3, torch.full((2, 3, 3, 3, 3), 0.5), iteration=6000)
    out["loss"].backward()  # unlabelled batch: the loss is w * L_con only
    for net in (seg_net, sdm_net):
        assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ L_seg, L_mask


def test_seg_and_mask_by_hand_and_blind_to_unknown_entries():
    # class 1 known on voxels 0, 1 (target 1, 0), unknown on voxel 2; class 2 unknown everywhere
    fg = [[[1.0, 0.0, 0.5], [0.5, 0.5, 0.5]]]
    target = _target(fg)
    seg = torch.tensor([[[LN3, -LN3, 2.0], [1.0, -1.0, 0.0]]], requires_grad=True)  # known probs 0.75, 0.25
    sdm = torch.tensor([[[-LN3 / K, LN3 / K, 0.3], [0.1, -0.1, 0.0]]], requires_grad=True)  # known masks 0.75, 0.25
    loss = DTMLLoss()
    out = loss(seg, sdm, target, iteration=0)
    bce = -math.log(0.75)
    dice = 1 - (2 * 0.75 + 1e-5) / (0.625 + 1.0 + 1e-5)  # squared denominators: 0.75^2 + 0.25^2 and 1
    assert out["seg"].item() == pytest.approx(0.5 * (bce + dice), rel=1e-5)
    assert out["mask"].item() == pytest.approx(dice, rel=1e-5)  # Dice only, as the reference
    assert DTMLLoss(mask_ce=True)(seg, sdm, target)["mask"].item() == pytest.approx(0.5 * (bce + dice), rel=1e-4)
    # changing the predictions where the class is unknown changes L_con, never L_seg / L_mask
    seg2, sdm2 = seg.detach().clone(), sdm.detach().clone()
    seg2[0, 0, 2], seg2[0, 1] = -5.0, torch.tensor([4.0, 3.0, -2.0])
    sdm2[0, 0, 2], sdm2[0, 1] = 0.9, torch.tensor([-0.5, 0.2, 0.7])
    out2 = loss(seg2, sdm2, target)
    assert out2["seg"].item() == pytest.approx(out["seg"].item(), rel=1e-6)
    assert out2["mask"].item() == pytest.approx(out["mask"].item(), rel=1e-6)
    assert out2["con"].item() != pytest.approx(out["con"].item())
    # ... and the supervised terms send no gradient there
    (out["seg"] + out["mask"]).backward()
    assert seg.grad[0, 0, 2] == 0 and seg.grad[0, 1].abs().sum() == 0 and seg.grad[0, 0, :2].abs().sum() > 0
    assert sdm.grad[0, 0, 2] == 0 and sdm.grad[0, 1].abs().sum() == 0 and sdm.grad[0, 0, :2].abs().sum() > 0


def test_dice_is_pooled_over_the_batch_and_averaged_over_classes_with_known_voxels():
    prob = torch.tensor([[[0.5, 0.5], [0.2, 0.2]], [[1.0, 0.0], [0.9, 0.9]]])  # (B=2, C=2, N=2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    known = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]])  # class 1 never known
    # class 0 over both cases: I = 0.5 + 1 = 1.5, sum p^2 = 0.5 + 1 = 1.5, sum t^2 = 2
    assert masked_dice_loss(prob, target, known, smooth=0.0).item() == pytest.approx(1 - 3.0 / 3.5)
    known[:, 1] = 1.0  # class 1 known absent: Dice 1 - 0 / sum p^2 = 1, averaged in
    assert masked_dice_loss(prob, target, known, smooth=0.0).item() == pytest.approx(0.5 * (1 - 3.0 / 3.5) + 0.5)


def test_a_batch_without_labelled_voxels_gives_zero_supervision_with_a_finite_loss():
    seg = torch.randn(2, 2, 4, 4, requires_grad=True)
    sdm = torch.rand(2, 2, 4, 4, requires_grad=True)
    sdm_target = torch.zeros(2, 2, 4, 4)
    out = DTMLLoss(dis_weight=1.0, consistency_weight=0.0)(seg, sdm, torch.full((2, 3, 4, 4), 0.5), sdm_target, iteration=10)
    assert out["seg"].item() == out["mask"].item() == out["dis"].item() == 0.0
    assert out["loss"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()  # still on the graph (consistency_weight 0 included)
    assert seg.grad.abs().sum() == 0 and sdm.grad.abs().sum() == 0


def test_total_is_the_weighted_sum():
    torch.manual_seed(1)
    seg, sdm = torch.randn(2, 2, 5, 5), torch.tanh(torch.randn(2, 2, 5, 5)) * 0.01
    label = torch.randint(0, 3, (2, 1, 5, 5))
    target = torch.cat([label == c for c in range(3)], 1).float()
    target[1, 2] = torch.full_like(target[1, 2], 0.5)  # class 2 of case 1 not annotated
    target[1, 0] = torch.where(label[1, 0] == 2, 0.5, target[1, 0])
    out = DTMLLoss(mask_weight=0.7, dis_weight=0.3, consistency_weight=2.0)(seg, sdm, target, torch.zeros_like(seg), iteration=3000)
    w = 2.0 * math.exp(-1.25)
    assert out["loss"].item() == pytest.approx(out["seg"].item() + 0.7 * out["mask"].item() + 0.3 * out["dis"].item() + w * out["con"].item(), rel=1e-5)
    assert sorted(out) == ["con", "con_weight", "dis", "loss", "mask", "seg"] and all(v.ndim == 0 for v in out.values())


# ------------------------------------------------------------------------------ L_dis


def test_dis_uses_fully_known_classes_only_and_an_empty_class_targets_plus_one():
    # case 0: class 1 fully known (present), class 2 fully known and absent; case 1: class 1 partly unknown
    fg = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 0.5, 0.0], [0.0, 0.5, 0.0]]])
    target = _target(fg)
    sdm = torch.tensor([[[-0.5, 0.1, 0.2], [0.5, 0.5, 0.5]], [[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]]])
    sdm_target = torch.tensor([[[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], [[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    out = DTMLLoss(dis_weight=1.0)(sdm * 0, sdm, target, sdm_target)
    # case 0 class 1: (0.25 + 0.01 + 0.64) ; case 0 class 2 (target +1 where the SDM map is 0): 3 * 0.25
    assert out["dis"].item() == pytest.approx((0.25 + 0.01 + 0.64 + 3 * 0.25) / 6, rel=1e-5)
    # reported (detached) when dis_weight is 0 and sdm_target is given
    zero = DTMLLoss()(sdm * 0, sdm, target, sdm_target)
    assert zero["dis"].item() == pytest.approx(out["dis"].item()) and not zero["dis"].requires_grad
    with pytest.raises(ValueError, match="dis_weight=1.0 needs sdm_target"):
        DTMLLoss(dis_weight=1.0)(sdm, sdm, target)
    with pytest.raises(ValueError, match="NaN"):
        DTMLLoss(dis_weight=1.0)(sdm, sdm, target, sdm_target * float("nan"))


# ------------------------------------------------------------------------------ inputs


def test_bad_inputs_are_refused_with_shapes_named():
    loss = DTMLLoss()
    seg = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match=r"target shape \(2, 2, 4, 4\) does not fit seg_logits \(2, 2, 4, 4\): expected \(2, 3, 4, 4\)"):
        loss(seg, seg, torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"sdm_pred shape \(2, 1, 4, 4\) differs"):
        loss(seg, torch.zeros(2, 1, 4, 4), torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"sdm_target shape \(2, 3, 4, 4\) differs"):
        loss(seg, seg, torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    bad = torch.zeros(2, 3, 4, 4)
    bad[0, 1, 0, 0] = 0.3
    with pytest.raises(ValueError, match="target holds 0.3; a <0,p,1> map holds only 0, 1 and p=0.5"):
        loss(seg, seg, bad)
    with pytest.raises(ValueError, match="target holds 2"):
        loss(seg, seg, bad * 0 + 2)  # a label map passed as the target
    with pytest.raises(ValueError, match="holds no voxel"):
        loss(torch.zeros(0, 2, 4), torch.zeros(0, 2, 4), torch.zeros(0, 3, 4))
    with pytest.raises(TypeError):
        loss(seg, seg, [0.0])
    for bad_arg in (dict(k=0.0), dict(mask_weight=-1.0), dict(p=1.0), dict(ramp_scale=0.0), dict(consistency_weight=float("nan"))):
        with pytest.raises(ValueError):
            DTMLLoss(**bad_arg)
    with pytest.raises(TypeError):
        DTMLLoss(mask_ce=1)
    assert DTMLLoss(p=0.3)(seg, seg, torch.full((2, 3, 4, 4), 0.3))["seg"].item() == 0.0


def test_meta_tensors_and_half_precision_inputs():
    seg = MetaTensor(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16))
    target = MetaTensor(_target([[[[1.0, 0.0], [0.5, 0.5]]]]))
    out = DTMLLoss()(seg, seg, target, iteration=6000)
    assert type(out["loss"]) is torch.Tensor and out["loss"].dtype == torch.float32
    assert out["seg"].item() == pytest.approx(0.5 * (math.log(2) + 1 - (1 + 1e-5) / (1.5 + 1e-5)), rel=1e-5)


# ------------------------------------------------------------------------------ fused terms


def _reference_terms(seg_logits, sdm_pred, target, k=K, smooth=1e-5, mask_ce=False):
    """L_seg, L_mask, L_con written out with autograd (the formulas before the fused backward)."""
    t = target[:, 1:]
    t1, known = (t == 1).to(seg_logits.dtype), ((t == 1) | (t == 0)).to(seg_logits.dtype)
    dims = (0, *range(2, t.ndim))
    n_known = known.sum().clamp_min(1.0)
    prob, mask = torch.sigmoid(seg_logits), torch.sigmoid(-k * sdm_pred)

    def dice(p):
        has = known.sum(dims) > 0
        d = 1 - (2 * (p * t1).sum(dims) + smooth) / ((known * p * p).sum(dims) + t1.sum(dims) + smooth)
        return d[has].mean() if has.any() else p.sum() * 0

    def bce(x):
        return torch.nn.functional.binary_cross_entropy_with_logits(x, t1, weight=known, reduction="sum") / n_known

    seg = 0.5 * (bce(seg_logits) + dice(prob))
    mask_term = 0.5 * (bce(-k * sdm_pred) + dice(mask)) if mask_ce else dice(mask)
    return seg, mask_term, ((prob - mask) ** 2).mean()


@pytest.mark.parametrize("mask_ce", [False, True])
@pytest.mark.parametrize("classes", [1, 3])
def test_fused_terms_match_autograd_values_and_gradients(mask_ce, classes):
    torch.manual_seed(classes)
    shape = (3, classes, 4, 5, 3)
    # logits up to +-30 (saturated sigmoids), SDMs around the mask's thin band (|k s| up to ~45)
    seg = (torch.randn(shape, dtype=torch.float64) * 10).requires_grad_()
    sdm = (torch.randn(shape, dtype=torch.float64) * 0.01).requires_grad_()
    fg = torch.randint(0, 2, shape).double()
    fg[1, :, :2] = 0.5  # case 1: partly unknown
    fg[2] = 0.5  # case 2: unlabelled
    target = _target(fg)
    loss = DTMLLoss(mask_ce=mask_ce)
    out = loss(seg, sdm, target, iteration=6000)
    ref = _reference_terms(seg, sdm, target, mask_ce=mask_ce)
    for name, r in zip(("seg", "mask", "con"), ref):
        assert out[name].item() == pytest.approx(r.item(), rel=1e-10, abs=1e-12), name
    # distinct weights on each term, so that a swapped or missing gradient part shows
    grads = torch.autograd.grad(0.3 * out["seg"] + 0.7 * out["mask"] + 1.9 * out["con"], (seg, sdm))
    ref_grads = torch.autograd.grad(0.3 * ref[0] + 0.7 * ref[1] + 1.9 * ref[2], (seg, sdm))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert grads[0][2].abs().sum() > 0  # the unlabelled case: L_con's gradient


def test_fused_terms_pass_gradcheck_and_float32_matches():
    torch.manual_seed(3)
    seg = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    sdm = (torch.randn(2, 2, 3, 3, dtype=torch.float64) * 1e-3).requires_grad_()
    fg = torch.randint(0, 2, (2, 2, 3, 3)).double()
    fg[1, 1] = 0.5
    target = _target(fg)
    loss = DTMLLoss(mask_ce=True)
    assert torch.autograd.gradcheck(lambda a, b: tuple(loss(a, b, target)[n] for n in ("seg", "mask", "con")), (seg, sdm))
    out32 = loss(seg.float(), sdm.float(), target.float())
    out64 = loss(seg, sdm, target)
    assert out32["loss"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under the trainer's amp: still float32 sums
        out_amp = loss(seg.float(), sdm.float(), target.float())
    assert out_amp["loss"].dtype == torch.float32 and out_amp["loss"].item() == pytest.approx(out32["loss"].item(), rel=1e-6)
    for name in ("seg", "mask", "con"):
        assert out32[name].item() == pytest.approx(out64[name].item(), rel=1e-5)


def test_doctests():
    assert doctest.testmod(dtml_module).failed == 0
