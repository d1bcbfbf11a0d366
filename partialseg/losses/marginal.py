"""Marginal and exclusion losses (Shi et al., "Marginal loss and exclusion loss for partially
supervised multi-organ segmentation", MedIA 2021), on the ``<0,p,1>`` target.

Merged class. At voxel ``i`` the merged class of the marginal loss is the set of classes whose
target entry is unknown (``0 < t < 1``); together with a known class (``t == 1``) this is the
*candidate set* ``S_i = {c : t_c > 0}`` (see :mod:`partialseg.losses._functional`). Its
probability is ``q_i = sum_{c in S_i} p_ic`` (Eq. 4), computed exactly:
``log q_i = logsumexp_{c in S_i}(x_ic) - logsumexp_c(x_ic)``. A labelled voxel has
``S_i = {k}`` (ordinary CE), an unlabelled voxel has every class in ``S_i`` (``q = 1``: zero
loss, zero gradient).

Exclusion label (Eq. 9). ``e_ic = 1`` where class ``c`` is known absent (``t_c == 0``): the voxel
is known to belong to some other class, exclusive with ``c``; for a single-organ case this is
the organ mask on every other channel and the merged background on the organ's channel.

Difference from the official code: the official implementation merges classes by summing their
*logits*; here, as in the paper (Eq. 4), their *probabilities* are summed.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from partialseg.losses._functional import (
    check_input_target,
    dice_from_sums,
    marginal_softmax_stats,
    reduce_channelwise,
    reduce_voxelwise,
)
from partialseg.losses.base import PartialLabelLoss, check_nonnegative

__all__ = ["MarginalCELoss", "MarginalDiceLoss", "ExclusionCELoss", "ExclusionDiceLoss", "MarginalExclusionLoss"]


def _out_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


class MarginalCELoss(PartialLabelLoss):
    """Marginal cross-entropy (Eq. 5): ``-log q_i`` with ``q_i`` the probability of the voxel's merged class.

    With every voxel annotated (one-hot target) it equals ``torch.nn.functional.cross_entropy``.

    Args:
        reduction: ``"mean"`` (sum over voxels divided by ``B * N``, every voxel counted, so an
            unlabelled voxel contributes 0), ``"sum"`` or ``"none"`` (shape ``(B, *spatial)``).

    Shapes:
        input: (B, C, H, W[, D]) logits. target: (B, C, H, W[, D]) ``<0,p,1>`` map.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 3, 2)
        >>> t = torch.tensor([[[1.0, 0.5], [0.0, 0.5], [0.0, 0.0]]])  # voxel 0 labelled 0, voxel 1 in {0, 1}
        >>> round(MarginalCELoss(reduction="sum")(x, t).item(), 4)  # log 3 + log(3/2)
        1.5041
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss from logits ``input`` and the ``<0,p,1>`` ``target`` (same shape)."""
        check_input_target(input, target, type(self).__name__)
        mce, _, _, _ = marginal_softmax_stats(input, target, mce=True)
        return reduce_voxelwise(mce, self.reduction, input.shape[2:])


class _DiceArgs(PartialLabelLoss):
    def __init__(
        self,
        include_background: bool,
        reduction: str,
        smooth_nr: float,
        smooth_dr: float,
        batch: bool,
        weight: Sequence[float] | float | Tensor | None,
    ) -> None:
        super().__init__(reduction=reduction, weight=weight)
        self.include_background = bool(include_background)
        self.smooth_nr = check_nonnegative("smooth_nr", smooth_nr)
        self.smooth_dr = check_nonnegative("smooth_dr", smooth_dr)
        self.batch = bool(batch)

    def _finish(self, sums: Tensor, input: Tensor, overlap: bool) -> Tensor:
        inter, pred, tgt = sums[0], sums[1], sums[2]
        if not self.include_background:
            inter, pred, tgt = inter[:, 1:], pred[:, 1:], tgt[:, 1:]
        if self.batch:
            inter, pred, tgt = inter.sum(0, keepdim=True), pred.sum(0, keepdim=True), tgt.sum(0, keepdim=True)
        if overlap:  # exclusion: the overlap itself is the loss
            f = (2.0 * inter + self.smooth_nr) / (pred + tgt + self.smooth_dr)
        else:
            f = dice_from_sums(inter, pred, tgt, self.smooth_nr, self.smooth_dr)
        f = self._apply_weight(f)
        return reduce_channelwise(f, self.reduction, input.ndim - 2)


class MarginalDiceLoss(_DiceArgs):
    """Marginal soft Dice (Eq. 6), region level, one Dice per class channel.

    For channel ``c`` at voxel ``i``: if ``c`` is a candidate (``t_ic > 0``) the prediction is the
    merged probability ``q_i`` and the target is 1; otherwise the prediction is ``p_ic`` and the
    target is 0. Voxels where every class is a candidate (unlabelled) carry no information and
    are left out of the sums. Then per channel (and sample, unless ``batch``)
    ``1 - (2 sum P T + smooth_nr) / (sum P + sum T + smooth_dr)``, as MONAI's DiceLoss. With a
    one-hot target this is ``monai.losses.DiceLoss(softmax=True)`` with the same settings; the
    ground truth always scores 0 (when ``smooth_nr == smooth_dr``), so the loss is compatible.

    Args:
        include_background: if False, channel 0 is left out of the Dice (after the softmax).
        reduction: ``"mean"``, ``"sum"`` over the (B, C) Dice terms, or ``"none"`` (B, C, 1, ...).
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.
        batch: sum over the batch before the ratio (the official code's batch Dice).
        weight: optional per-channel weights (after ``include_background``).

    Shapes:
        input: (B, C, H, W[, D]) logits. target: (B, C, H, W[, D]) ``<0,p,1>`` map.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 2, 2)
        >>> t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> round(MarginalDiceLoss(smooth_nr=0, smooth_dr=0)(x, t).item(), 4)  # 1 - 2*0.5/(1+1)
        0.5
    """

    def __init__(
        self,
        include_background: bool = True,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | Tensor | None = None,
    ) -> None:
        super().__init__(include_background, reduction, smooth_nr, smooth_dr, batch, weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss from logits ``input`` and the ``<0,p,1>`` ``target`` (same shape)."""
        check_input_target(input, target, type(self).__name__)
        _, _, sums, _ = marginal_softmax_stats(input, target, mdice=True)
        return self._finish(sums, input, overlap=False)


class ExclusionCELoss(PartialLabelLoss):
    """Exclusion cross-entropy (Eq. 11): ``sum_c e_ic log(p_ic + eps)`` with ``e = [t == 0]``.

    Zero when no probability falls on a class known to be absent; ``eps = 1`` (the paper) keeps
    it non-negative and finite.

    Args:
        reduction: ``"mean"`` (over ``B * N`` voxels), ``"sum"`` or ``"none"`` (``(B, *spatial)``).
        eps: the epsilon of Eq. 11 (must be > 0).

    Shapes:
        input: (B, C, H, W[, D]) logits. target: (B, C, H, W[, D]) ``<0,p,1>`` map.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 2, 1)
        >>> t = torch.tensor([[[1.0], [0.0]]])
        >>> round(ExclusionCELoss(reduction="sum")(x, t).item(), 4)  # log(0.5 + 1)
        0.4055
    """

    def __init__(self, reduction: str = "mean", eps: float = 1.0) -> None:
        super().__init__(reduction=reduction)
        self.eps = check_nonnegative("eps", eps)
        if self.eps == 0:
            raise ValueError("eps must be > 0 (log(p + eps) is -inf at p = 0 otherwise), got 0.")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss from logits ``input`` and the ``<0,p,1>`` ``target`` (same shape)."""
        check_input_target(input, target, type(self).__name__)
        _, ece, _, _ = marginal_softmax_stats(input, target, ece=True, eps=self.eps)
        return reduce_voxelwise(ece, self.reduction, input.shape[2:])


class ExclusionDiceLoss(_DiceArgs):
    """Exclusion Dice (Eq. 10), region level: ``(2 sum e p + smooth_nr) / (sum e + sum p + smooth_dr)`` per channel.

    ``e = [t == 0]``. The overlap between the prediction and the region known to be another
    class is the loss (0 for a perfect prediction). ``smooth_nr`` defaults to 0: a positive
    value would reward predicting more mass elsewhere and break compatibility.

    Args:
        include_background: if False, channel 0 is left out (after the softmax).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (B, C, 1, ...).
        smooth_nr: added to the numerator (default 0).
        smooth_dr: added to the denominator.
        batch: sum over the batch before the ratio.
        weight: optional per-channel weights (after ``include_background``).

    Shapes:
        input: (B, C, H, W[, D]) logits. target: (B, C, H, W[, D]) ``<0,p,1>`` map.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 2, 1)
        >>> t = torch.tensor([[[1.0], [0.0]]])
        >>> round(ExclusionDiceLoss(reduction="sum", smooth_dr=0)(x, t).item(), 4)  # 0 + 2*0.5/(1+0.5)
        0.6667
    """

    def __init__(
        self,
        include_background: bool = True,
        reduction: str = "mean",
        smooth_nr: float = 0.0,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | Tensor | None = None,
    ) -> None:
        super().__init__(include_background, reduction, smooth_nr, smooth_dr, batch, weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss from logits ``input`` and the ``<0,p,1>`` ``target`` (same shape)."""
        check_input_target(input, target, type(self).__name__)
        _, _, _, sums = marginal_softmax_stats(input, target, edice=True)
        return self._finish(sums, input, overlap=True)


class MarginalExclusionLoss(PartialLabelLoss):
    """``lambda_marginal (mCE + mDice) + lambda_exclusion (eCE + eDice)``, one shared softmax.

    The paper's best setting weights marginal : exclusion as 1 : 2 (the defaults). With a
    one-hot target and ``lambda_exclusion=0`` this is ``monai.losses.DiceCELoss(softmax=True)``.

    Args:
        include_background: for the Dice terms (as MONAI's DiceCELoss; CE uses every class).
        reduction: ``"mean"`` or ``"sum"`` (applied to each term, then weighted).
        smooth_nr: numerator smoothing of the marginal Dice (the exclusion Dice uses 0).
        smooth_dr: denominator smoothing of both Dice terms.
        batch: batch Dice for both Dice terms.
        weight: per-channel weights of the Dice terms.
        lambda_marginal: weight of marginal CE + Dice (>= 0).
        lambda_exclusion: weight of exclusion CE + Dice (>= 0).
        eps: exclusion CE epsilon.

    Shapes:
        input: (B, C, H, W[, D]) logits. target: (B, C, H, W[, D]) ``<0,p,1>`` map.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 4, 4)
        >>> t = torch.full((2, 3, 4, 4), 0.5)
        >>> MarginalExclusionLoss()(x, t).item()  # nothing annotated: nothing to learn
        0.0
    """

    def __init__(
        self,
        include_background: bool = True,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | Tensor | None = None,
        lambda_marginal: float = 1.0,
        lambda_exclusion: float = 2.0,
        eps: float = 1.0,
    ) -> None:
        if reduction == "none":
            raise ValueError("MarginalExclusionLoss sums voxel-wise and channel-wise terms: reduction must be 'mean' or 'sum', got 'none'.")
        super().__init__(reduction=reduction)
        self.lambda_marginal = check_nonnegative("lambda_marginal", lambda_marginal)
        self.lambda_exclusion = check_nonnegative("lambda_exclusion", lambda_exclusion)
        if self.lambda_marginal == 0 and self.lambda_exclusion == 0:
            raise ValueError("lambda_marginal and lambda_exclusion are both 0: the loss would be identically 0.")
        self.marginal_dice = MarginalDiceLoss(include_background, reduction, smooth_nr, smooth_dr, batch, weight)
        self.exclusion_dice = ExclusionDiceLoss(include_background, reduction, 0.0, smooth_dr, batch, weight)
        self.eps = ExclusionCELoss(eps=eps).eps

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss from logits ``input`` and the ``<0,p,1>`` ``target`` (same shape)."""
        check_input_target(input, target, type(self).__name__)
        m, e = self.lambda_marginal > 0, self.lambda_exclusion > 0
        mce, ece, msum, esum = marginal_softmax_stats(input, target, mce=m, ece=e, mdice=m, edice=e, eps=self.eps)
        total = input.new_zeros((), dtype=_out_dtype(input))
        if m:
            ce = reduce_voxelwise(mce, self.reduction, input.shape[2:])
            total = total + self.lambda_marginal * (ce + self.marginal_dice._finish(msum, input, overlap=False))
        if e:
            ce = reduce_voxelwise(ece, self.reduction, input.shape[2:])
            total = total + self.lambda_exclusion * (ce + self.exclusion_dice._finish(esum, input, overlap=True))
        return total
