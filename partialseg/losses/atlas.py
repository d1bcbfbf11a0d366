"""Losses of the atlas-guided multimodal partial-label method (Liu et al., MICCAI 2024, Eq. 1-4).

The main network's objective (Eq. 4) is ``L_seg + lambda_1 L_pseudo + lambda_2 L_adv +
lambda_3 L_proto`` (weights 1, 0.01, 0.1, the paper's), the refiner's (APRN) ``L_APRN`` and the
discriminator's (AMAN) ``L_D`` (Eq. 1). :class:`AtlasLoss` holds the settings and computes each
term from tensors; :class:`~partialseg.engines.AtlasTrainer` runs the networks and the updates.

Everything reads the ``<0,p,1>`` target (``PartialLabelToVectord``): organ ``c`` is *labelled*
in sample ``b`` when its channel has no unknown entry (:func:`labelled_classes`); where it has
unknown entries (``0 < t < 1``) the organ is a pseudo-label target.

* ``L_seg`` ("Dice + CE on the labelled organs"): partialseg's marginal CE + marginal Dice
  (:class:`~partialseg.losses.MarginalExclusionLoss` with ``lambda_exclusion=0``, the default
  ``seg_loss``). On the ``<0,p,1>`` map it is CE + Dice on the labelled organs with the
  unlabelled organs merged into the background (their probability mass is not pushed to the
  background, as a plain CE on the raw label map would do), and on a fully labelled case it is
  MONAI's ``DiceCELoss(softmax=True)``; it is the tool partialseg already has for "CE + Dice on
  what the image annotates" with a softmax network.
* ``L_pseudo``: Dice between the main network's organ probability and the refined pseudo-label
  (refined probability > 0.5) on the *confident* voxels (refined probability > 0.9 or < 0.1,
  :func:`confident_mask`) where the organ is unknown, for the organs the image does not label.
* ``L_adv`` / ``L_D``: binary cross-entropy on the discriminator's logits (Eq. 1 and the
  adversarial loss after it), summed over the organs, averaged over the batch.
* ``L_proto``: the same masked Dice between the prototype attention maps (per scale, the
  pseudo-labels resized by averaging) and the pseudo-labels, for the unlabelled organs, averaged
  over the scales.
* ``L_APRN``: Dice (the paper) plus, with ``refiner_ce_weight`` > 0 (the public code: 1), binary
  cross-entropy between the refined logits and the labelled organs' masks.

Example:
    >>> import torch
    >>> t = torch.full((1, 3, 4), 0.5); t[0, 1] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # organ 1 labelled
    >>> t[0, 0] = torch.tensor([0.0, 0.0, 0.5, 0.5]); t[0, 2] = torch.tensor([0.0, 0.0, 0.5, 0.5])
    >>> labelled_classes(t).tolist()
    [[False, True, False]]
    >>> confident_mask(torch.tensor([0.05, 0.5, 0.95])).tolist()
    [True, False, True]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from partialseg._checks import check_float
from partialseg.losses.marginal import MarginalExclusionLoss

__all__ = [
    "AtlasLoss",
    "labelled_classes",
    "unknown_entries",
    "confident_mask",
    "masked_dice_loss",
    "consensus_masks",
    "discriminator_loss",
    "adversarial_loss",
]


def unknown_entries(target: Tensor) -> Tensor:
    """``(0 < t < 1)``: where the ``<0,p,1>`` map says nothing about a class (bool, same shape)."""
    return (target > 0) & (target < 1)


def labelled_classes(target: Tensor) -> Tensor:
    """``(B, C)`` bool: class ``c`` is labelled in sample ``b`` (its channel has no unknown entry).

    A channel of known-absent entries only (0 everywhere: a patch that lies inside other labelled
    organs) counts as labelled: everything about it is known.
    """
    return ~unknown_entries(target).flatten(2).any(2)


def confident_mask(prob: Tensor, low: float = 0.1, high: float = 0.9) -> Tensor:
    """``(prob > high) | (prob < low)``: the confident voxels of a refined probability (bool).

    Example:
        >>> confident_mask(torch.tensor([0.1, 0.9, 0.0, 1.0])).tolist()  # the thresholds are strict
        [False, False, True, True]
    """
    return (prob > high) | (prob < low)


def masked_dice_loss(
    prob: Tensor,
    target: Tensor,
    mask: Tensor,
    pairs: Tensor | None = None,
    batch: bool = True,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> Tensor:
    """Soft Dice loss on the masked voxels of the selected (sample, class) pairs.

    ``1 - (2 sum m p t + smooth_nr) / (sum m p + sum m t + smooth_dr)`` per pair (``batch=False``)
    or per class with the sums pooled over the batch (``batch=True``), averaged over the pairs /
    classes that have a masked voxel. ``mask`` may hold weights in [0, 1]. Nothing selected: a
    zero on ``prob``'s graph (zero gradient).

    Args:
        prob: ``(B, C, *spatial)`` probabilities.
        target: ``(B, C, *spatial)`` targets in [0, 1].
        mask: ``(B, C, *spatial)`` bool or weights.
        pairs: ``(B, C)`` bool, the pairs that count (None: all).
        batch: pool the sums over the batch per class.

    Example:
        >>> p = torch.tensor([[[0.5, 0.5, 0.9]]]); t = torch.tensor([[[1.0, 0.0, 0.0]]])
        >>> round(float(masked_dice_loss(p, t, torch.tensor([[[1.0, 1.0, 0.0]]]), smooth_nr=0, smooth_dr=0)), 6)  # 1 - 1 / 2
        0.5
    """
    m = mask.float().flatten(2)
    if pairs is not None:
        m = m * pairs.to(m.dtype)[:, :, None]
    p, t = prob.float().flatten(2), target.float().flatten(2)
    mp = m * p
    inter, psum, tsum, msum = (mp * t).sum(2), mp.sum(2), (m * t).sum(2), m.sum(2)
    if batch:
        inter, psum, tsum, msum = inter.sum(0), psum.sum(0), tsum.sum(0), msum.sum(0)
    has = msum > 0
    if not bool(has.any()):
        return prob.sum() * 0.0
    dice = 1.0 - (2.0 * inter + smooth_nr) / (psum + tsum + smooth_dr)
    return dice[has].mean()


def consensus_masks(pred: Tensor, target: Tensor, unlabelled_foreground: Tensor | None = None) -> Tensor:
    """MICPAM's consensus regions: where the ground truth and the prediction agree, per class.

    Organ ``c`` (``c >= 1``): ``target_c == 1`` (labelled there) and the prediction is ``c``. The
    background (class 0) of a partially labelled image is never known; its consensus is where the
    prediction is background, the label allows background (``target_0 > 0``: no labelled organ
    there) and, if given, ``unlabelled_foreground`` (where an unlabelled organ may be, from the
    pseudo-labels) is False. A fully labelled background (``target_0 == 1``) always counts.

    Args:
        pred: ``(B, *spatial)`` predicted class indices (argmax of the logits).
        target: ``(B, C, *spatial)`` ``<0,p,1>`` map.
        unlabelled_foreground: ``(B, *spatial)`` bool, optional.

    Returns:
        ``(B, C, *spatial)`` float masks.

    Example:
        >>> t = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]])  # class 1 at voxel 2
        >>> consensus_masks(torch.tensor([[0, 2, 1]]), t).tolist()  # voxel 1: predicted 2 (unlabelled), no consensus
        [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]
    """
    onehot = F.one_hot(pred.long(), target.shape[1]).movedim(-1, 1).bool()
    out = onehot & (target == 1)
    bg = onehot[:, 0] & (target[:, 0] > 0)
    if unlabelled_foreground is not None:
        bg = bg & ~unlabelled_foreground
    out[:, 0] |= bg
    return out.float()


def discriminator_loss(logits: Tensor, labelled: Tensor) -> Tensor:
    """Eq. 1: ``-sum_c [1(c) log f_D + (1 - 1(c)) log(1 - f_D)]``, summed over organs, mean over the batch.

    Args:
        logits: ``(B, K)`` discriminator logits (``f_D = sigmoid(logits)``) for K organs.
        labelled: ``(B, K)`` bool, ``1(c)``: organ ``c`` is labelled in the image's modality.

    Example:
        >>> round(float(discriminator_loss(torch.zeros(1, 2), torch.tensor([[True, False]]))), 4)  # 2 log 2
        1.3863
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), labelled.float(), reduction="none")
    return bce.sum(1).mean()


def adversarial_loss(logits: Tensor, labelled: Tensor) -> Tensor:
    """``L_adv = -sum_c (1 - 1(c)) log f_D``: the cross-modal organs should look labelled.

    Summed over the organs, averaged over the batch; an organ labelled in the modality adds nothing.

    Example:
        >>> round(float(adversarial_loss(torch.zeros(1, 2), torch.tensor([[True, False]]))), 4)  # log 2
        0.6931
    """
    return (F.softplus(-logits.float()) * (~labelled.bool()).float()).sum(1).mean()


class AtlasLoss(nn.Module):
    """The settings and terms of the atlas method's losses (see the module docstring).

    Args:
        seg_loss: ``L_seg`` on logits ``(B, m, *spatial)`` and the ``<0,p,1>`` map (default
            marginal CE + Dice: ``MarginalExclusionLoss(lambda_exclusion=0)``).
        lambda_pseudo: ``lambda_1`` (1).
        lambda_adv: ``lambda_2`` (0.01).
        lambda_proto: ``lambda_3`` (0.1).
        confident_low, confident_high: the confident-voxel thresholds (0.1, 0.9).
        refiner_ce_weight: weight of the BCE added to APRN's Dice (0: the paper; 1: the public code).
        dice_batch: pool the Dice sums of ``L_pseudo``, ``L_proto`` and ``L_APRN`` over the batch.
        smooth: Dice smoothing (numerator and denominator).

    Example:
        >>> loss = AtlasLoss()
        >>> loss.lambda_pseudo, loss.lambda_adv, loss.lambda_proto
        (1.0, 0.01, 0.1)
    """

    def __init__(
        self,
        seg_loss: nn.Module | None = None,
        lambda_pseudo: float = 1.0,
        lambda_adv: float = 0.01,
        lambda_proto: float = 0.1,
        confident_low: float = 0.1,
        confident_high: float = 0.9,
        refiner_ce_weight: float = 0.0,
        dice_batch: bool = True,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        self.seg_loss = MarginalExclusionLoss(lambda_exclusion=0.0) if seg_loss is None else seg_loss
        if not callable(self.seg_loss):
            raise TypeError(f"seg_loss must be a loss module, got {type(seg_loss).__name__}.")
        self.lambda_pseudo = check_float(lambda_pseudo, "lambda_pseudo", minimum=0.0)
        self.lambda_adv = check_float(lambda_adv, "lambda_adv", minimum=0.0)
        self.lambda_proto = check_float(lambda_proto, "lambda_proto", minimum=0.0)
        self.confident_low = check_float(confident_low, "confident_low", minimum=0.0, maximum=0.5)
        self.confident_high = check_float(confident_high, "confident_high", minimum=0.5, maximum=1.0)
        self.refiner_ce_weight = check_float(refiner_ce_weight, "refiner_ce_weight", minimum=0.0)
        self.dice_batch = bool(dice_batch)
        self.smooth = check_float(smooth, "smooth", minimum=0.0)

    # -------------------------------------------------------------------------------- the terms

    def seg(self, logits: Tensor, target: Tensor) -> Tensor:
        """``L_seg`` on logits ``(B, m, *spatial)`` and the ``<0,p,1>`` map."""
        return self.seg_loss(logits, target)

    def _dice(self, prob: Tensor, target: Tensor, mask: Tensor, pairs: Tensor | None) -> Tensor:
        return masked_dice_loss(prob, target, mask, pairs, self.dice_batch, self.smooth, self.smooth)

    def refiner(self, logits: Tensor, target: Tensor, pairs: Tensor) -> Tensor:
        """``L_APRN``: Dice (+ ``refiner_ce_weight`` BCE) of the refined organ logits on the labelled pairs.

        Args:
            logits: ``(B, K, *spatial)`` refined logits of the K organs (only ``pairs`` are read).
            target: ``(B, K, *spatial)`` the organs' channels of the ``<0,p,1>`` map (0/1 where labelled).
            pairs: ``(B, K)`` bool, the labelled (sample, organ) pairs.
        """
        known = torch.ones_like(target, dtype=torch.bool)
        gt = (target == 1).float()
        loss = self._dice(torch.sigmoid(logits.float()), gt, known, pairs)
        if self.refiner_ce_weight > 0:
            sel = pairs.bool()
            if bool(sel.any()):
                loss = loss + self.refiner_ce_weight * F.binary_cross_entropy_with_logits(logits.float()[sel], gt[sel])
        return loss

    def pseudo_targets(self, refined: Tensor, target: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
        """Pseudo-labels ``refined > 0.5`` and their mask: confident voxels where the organ is unknown, on ``pairs``.

        Args:
            refined: ``(B, K, *spatial)`` refined probabilities of the K organs.
            target: ``(B, K, *spatial)`` the organs' channels of the ``<0,p,1>`` map.
            pairs: ``(B, K)`` bool, the unlabelled (sample, organ) pairs.

        Returns:
            ``(pseudo (B, K, *spatial) float, mask (B, K, *spatial) bool)``.
        """
        mask = confident_mask(refined, self.confident_low, self.confident_high) & unknown_entries(target)
        mask &= pairs.bool().view(*pairs.shape, *([1] * (target.ndim - 2)))
        return (refined > 0.5).float(), mask

    def pseudo(self, prob: Tensor, pseudo: Tensor, mask: Tensor, pairs: Tensor) -> Tensor:
        """``L_pseudo``: Dice of the main network's organ probabilities ``(B, K, *spatial)`` on the pseudo-labels."""
        return self._dice(prob, pseudo, mask, pairs)

    def proto(self, maps: Sequence[Tensor], pseudo: Tensor, mask: Tensor, pairs: Tensor) -> Tensor:
        """``L_proto``: the masked Dice of each scale's attention maps on the pseudo-labels, mean over scales.

        Args:
            maps: per scale ``(B, m, *spatial_s)`` attention maps (channel 0 the background).
            pseudo, mask: ``(B, m - 1, *spatial)`` pseudo-labels and their mask (organs only).
            pairs: ``(B, m - 1)`` bool, the unlabelled (sample, organ) pairs.
        """
        if not maps:
            raise ValueError("AtlasLoss.proto: no attention map given.")
        terms = []
        w_full = mask.float()
        tw_full = pseudo.float() * w_full
        for a in maps:
            size = a.shape[2:]
            w = F.interpolate(w_full, size=size, mode="area") if tuple(w_full.shape[2:]) != tuple(size) else w_full
            tw = F.interpolate(tw_full, size=size, mode="area") if tuple(tw_full.shape[2:]) != tuple(size) else tw_full
            t = tw / w.clamp_min(1e-6)
            terms.append(self._dice(a[:, 1:], t, w, pairs))
        return torch.stack(terms).mean()

    def discriminator(self, logits: Tensor, labelled: Tensor) -> Tensor:
        """``L_D`` (Eq. 1), :func:`discriminator_loss`."""
        return discriminator_loss(logits, labelled)

    def adversarial(self, logits: Tensor, labelled: Tensor) -> Tensor:
        """``L_adv``, :func:`adversarial_loss`."""
        return adversarial_loss(logits, labelled)

    def forward(self, seg: Tensor, pseudo: Tensor | None = None, adv: Tensor | None = None, proto: Tensor | None = None) -> Tensor:
        """Eq. 4 from its terms: ``seg + lambda_1 pseudo + lambda_2 adv + lambda_3 proto`` (None terms left out).

        Example:
            >>> round(float(AtlasLoss()(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))), 4)
            2.11
        """
        total = seg
        for value, weight in ((pseudo, self.lambda_pseudo), (adv, self.lambda_adv), (proto, self.lambda_proto)):
            if value is not None:
                total = total + weight * value
        return total
