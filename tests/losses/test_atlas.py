"""Atlas method losses: the confident-voxel mask and the pseudo-label targets, the masked Dice, Eq. 1
and the adversarial loss by hand, L_seg on a labelled organ vs an unlabelled one (no leak of the
unlabelled organ's hidden mask), L_pseudo reading only the unlabelled organs, consensus masks,
the prototype loss across scales and Eq. 4's weights."""

from __future__ import annotations

import math

import pytest
import torch

from partialseg.losses import AtlasLoss, MarginalExclusionLoss, adversarial_loss, confident_mask, consensus_masks, discriminator_loss, labelled_classes
from partialseg.losses.atlas import masked_dice_loss


def _partial_map():
    """(1, 3, 8): organ 1 labelled at voxels 0-1; organ 2 unlabelled (truly at voxels 2-3, hidden)."""
    t = torch.zeros(1, 3, 8)
    t[0, 1, :2] = 1.0
    t[0, 0, 2:] = 0.5
    t[0, 2, 2:] = 0.5
    return t


def test_confident_mask_is_strict_and_pseudo_targets_only_cover_unknown_entries_of_unlabelled_pairs():
    refined = torch.tensor([0.0, 0.05, 0.1, 0.5, 0.9, 0.95, 1.0])
    assert confident_mask(refined).tolist() == [True, True, False, False, False, True, True]
    assert confident_mask(refined, 0.2, 0.8).tolist() == [True, True, True, False, True, True, True]
    loss = AtlasLoss()
    t = _partial_map()[:, 1:]  # the organs' channels
    unlabelled = labelled_classes(_partial_map())[:, 1:].logical_not()
    assert unlabelled.tolist() == [[False, True]]
    refined = torch.tensor([[[0.95] * 8, [0.99, 0.99, 0.95, 0.5, 0.02, 0.2, 0.01, 0.97]]])
    pseudo, mask = loss.pseudo_targets(refined, t, unlabelled)
    assert mask[0, 0].tolist() == [False] * 8  # the labelled organ: never a pseudo-label target
    # organ 2: voxels 0-1 are known absent (organ 1 is there): not targets either, whatever the refiner says
    assert mask[0, 1].tolist() == [False, False, True, False, True, False, True, True]
    assert pseudo[0, 1].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_masked_dice_by_hand():
    p = torch.tensor([[[0.5, 0.5, 0.9]]])
    t = torch.tensor([[[1.0, 0.0, 0.0]]])
    assert masked_dice_loss(p, t, torch.tensor([[[1.0, 1.0, 0.0]]]), smooth_nr=0, smooth_dr=0).item() == pytest.approx(0.5)
    # two samples: (perfect) and (empty target, 1 predicted): per pair 0 and 1; pooled 1 - 2/3
    p2 = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    t2 = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    ones = torch.ones_like(p2)
    assert masked_dice_loss(p2, t2, ones, batch=False, smooth_nr=0, smooth_dr=0).item() == pytest.approx(0.5)
    assert masked_dice_loss(p2, t2, ones, batch=True, smooth_nr=0, smooth_dr=0).item() == pytest.approx(1 / 3)
    # pairs select; nothing selected: zero with a graph
    assert masked_dice_loss(p2, t2, ones, pairs=torch.tensor([[True], [False]]), batch=False, smooth_nr=0, smooth_dr=0).item() == 0.0
    x = torch.rand(1, 1, 3, requires_grad=True)
    z = masked_dice_loss(x, t, torch.zeros(1, 1, 3))
    z.backward()
    assert z.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_discriminator_and_adversarial_losses_by_hand():
    logits = torch.tensor([[1.0, -2.0]])
    labelled = torch.tensor([[True, False]])
    # Eq. 1: -log sigmoid(1) - log(1 - sigmoid(-2)) = softplus(-1) + softplus(-2)
    expected = math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))
    assert discriminator_loss(logits, labelled).item() == pytest.approx(expected, rel=1e-6)
    # L_adv: only the organ not labelled in the modality, -log sigmoid(-2) = softplus(2)
    assert adversarial_loss(logits, labelled).item() == pytest.approx(math.log1p(math.exp(2)), rel=1e-6)
    assert adversarial_loss(logits, torch.tensor([[True, True]])).item() == 0.0
    # mean over the batch, sum over organs
    two = discriminator_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert two.item() == pytest.approx(3 * math.log(2), rel=1e-6)


def test_seg_loss_learns_the_labelled_organ_and_nothing_about_where_the_unlabelled_one_is():
    loss = AtlasLoss()
    t = _partial_map()
    logits = torch.tensor([0.2, -0.1, 0.3]).view(1, 3, 1).repeat(1, 1, 8).requires_grad_(True)
    loss.seg(logits, t).backward()
    g = logits.grad[0]
    # voxels 2-3 (hidden organ 2) and 5-6 (hidden background) get the same gradient: no leak
    assert torch.allclose(g[:, 2], g[:, 5]) and torch.allclose(g[:, 3], g[:, 6])
    # the merged class {background, organ 2} is trained as one: both get the same relative push at unknown
    # voxels, so their split is not learnt (a CE that took organ 2 as background would push them apart)
    p = torch.softmax(logits.detach()[0, :, 2], 0)
    assert g[0, 2] / p[0] == pytest.approx(float(g[2, 2] / p[2]), rel=1e-5)
    # the labelled organ's voxels are trained towards organ 1
    assert bool(g[1, 0] < 0) and not torch.allclose(g[:, 0], g[:, 5])
    # the default L_seg is marginal CE + Dice
    assert isinstance(loss.seg_loss, MarginalExclusionLoss) and loss.seg_loss.lambda_exclusion == 0.0


def test_pseudo_loss_reads_only_the_unlabelled_organs():
    loss = AtlasLoss()
    t = _partial_map()[:, 1:]
    unlabelled = torch.tensor([[False, True]])
    refined = torch.tensor([[[0.99] * 8, [0.0, 0.0, 0.99, 0.99, 0.01, 0.01, 0.01, 0.01]]])
    pseudo, mask = loss.pseudo_targets(refined, t, unlabelled)
    prob = torch.rand(1, 2, 8, requires_grad=True)
    value = loss.pseudo(prob, pseudo, mask, unlabelled)
    value.backward()
    assert torch.equal(prob.grad[0, 0], torch.zeros(8))  # the labelled organ's probability: untouched
    assert bool(prob.grad[0, 1, 2:].abs().sum() > 0) and torch.equal(prob.grad[0, 1, :2], torch.zeros(2))
    # the hand value: Dice on voxels 2-7 of organ 2
    p = prob.detach()[0, 1, 2:]
    tt = torch.tensor([1.0, 1.0, 0, 0, 0, 0])
    expected = 1 - (2 * (p * tt).sum() + 1e-5) / (p.sum() + tt.sum() + 1e-5)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_consensus_masks_agree_with_label_and_prediction():
    t = _partial_map()
    pred = torch.tensor([[1, 0, 2, 0, 0, 1, 0, 0]])
    c = consensus_masks(pred, t)
    assert c[0, 1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # organ 1 labelled and predicted: voxel 0 only
    assert c[0, 2].tolist() == [0] * 8  # organ 2 unlabelled: never a consensus voxel
    assert c[0, 0].tolist() == [0, 0, 0, 1, 1, 0, 1, 1]  # predicted background where no labelled organ is
    maybe = torch.tensor([[False, False, False, True, False, False, False, False]])
    assert consensus_masks(pred, t, maybe)[0, 0].tolist() == [0, 0, 0, 0, 1, 0, 1, 1]
    full = torch.zeros(1, 3, 2)
    full[0, 0] = 1.0
    assert consensus_masks(torch.tensor([[0, 2]]), full)[0, 0].tolist() == [1, 0]


def test_proto_loss_resizes_pseudo_labels_to_every_scale_and_uses_only_organ_channels():
    loss = AtlasLoss()
    pseudo = torch.zeros(1, 2, 4, 4, 4)
    pseudo[0, 1, :2] = 1.0
    mask = torch.ones(1, 2, 4, 4, 4, dtype=torch.bool)
    pairs = torch.tensor([[False, True]])
    perfect = [torch.cat([1 - pseudo[:, 1:], torch.zeros(1, 1, 4, 4, 4), pseudo[:, 1:]], 1)]
    half = torch.zeros(1, 3, 2, 2, 2)
    half[0, 2, 0] = 1.0
    half[0, 0, 1] = 1.0
    assert loss.proto(perfect, pseudo, mask, pairs).item() == pytest.approx(0.0, abs=1e-5)
    assert loss.proto([perfect[0], half], pseudo, mask, pairs).item() == pytest.approx(0.0, abs=1e-5)
    wrong = half.flip(2)
    assert loss.proto([wrong], pseudo, mask, pairs).item() == pytest.approx(1.0, abs=1e-5)


def test_eq4_weights_and_bad_settings():
    loss = AtlasLoss(lambda_pseudo=2.0, lambda_adv=0.5, lambda_proto=0.25)
    one = torch.tensor(1.0)
    assert loss(one, one, one, one).item() == pytest.approx(1 + 2 + 0.5 + 0.25)
    assert loss(one, None, one, None).item() == pytest.approx(1.5)
    for kwargs in ({"lambda_adv": -1.0}, {"confident_high": 0.4}, {"confident_low": 0.6}):
        with pytest.raises(ValueError):
            AtlasLoss(**kwargs)
    # L_APRN: Dice (the paper), + BCE with refiner_ce_weight (the public code)
    logits = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.5] * 4]])
    pairs = torch.tensor([[True, False]])
    dice_only = AtlasLoss().refiner(logits, target, pairs).item()
    assert dice_only == pytest.approx(1 - (2 * 1.0 + 1e-5) / (2.0 + 2.0 + 1e-5), rel=1e-5)
    assert AtlasLoss(refiner_ce_weight=1.0).refiner(logits, target, pairs).item() == pytest.approx(dice_only + math.log(2), rel=1e-5)
