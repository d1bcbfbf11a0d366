"""One loss for batches that mix fully labelled and partially labelled samples."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.loss import _Loss

from partialseg.losses._functional import check_not_empty
from partialseg.losses.base import plain_tensor

__all__ = ["MixedSupervisionLoss"]


class MixedSupervisionLoss(_Loss):
    """Route each sample to the loss of its kind of label: full or partial.

    The marginal-loss paper trains its second stage on batches drawn from the union of a fully
    labelled dataset and single-organ datasets, using "the regular loss, if from F, or the
    marginal loss and the exclusion loss, if from P_i" (section 4.3). This wrapper does that per
    sample, reading the kind off the ``<0,p,1>`` target: a sample with no unknown entry
    (``0 < t < 1`` nowhere) is fully labelled and goes to ``full_loss``; any other sample
    (partially labelled or unlabelled) goes to ``partial_loss``. The result is the
    sample-weighted mean ``(n_full * full_loss + n_partial * partial_loss) / B``, which equals
    the per-sample mean when both losses are means over samples (``reduction="mean"``, Dice
    with ``batch=False``: the defaults of partialseg's and MONAI's losses).

    Args:
        full_loss: loss for fully labelled samples (logits, one-hot target), e.g.
            ``MarginalExclusionLoss(lambda_exclusion=0)`` (= MONAI ``DiceCELoss(softmax=True)``).
        partial_loss: loss for the other samples, e.g. ``MarginalExclusionLoss()``.

    Example:
        >>> import torch
        >>> from partialseg.losses import MarginalExclusionLoss, MixedSupervisionLoss
        >>> loss = MixedSupervisionLoss(MarginalExclusionLoss(lambda_exclusion=0), MarginalExclusionLoss())
        >>> target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])[None, :, :, None]  # (1, 3, 2, 1) one-hot
        >>> partial = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.0, 1.0]])[None, :, :, None]
        >>> value = loss(torch.zeros(2, 3, 2, 1), torch.cat([target, partial]))
        >>> bool(torch.isfinite(value))
        True
    """

    def __init__(self, full_loss: torch.nn.Module, partial_loss: torch.nn.Module) -> None:
        super().__init__()
        for name, value in (("full_loss", full_loss), ("partial_loss", partial_loss)):
            if not callable(value):
                raise TypeError(f"{name} must be a loss module, got {type(value).__name__}")
        self.full_loss = full_loss
        self.partial_loss = partial_loss

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Args: input logits ``(B, C, *spatial)``; target the ``<0,p,1>`` map of the same shape."""
        input, target = plain_tensor(input), plain_tensor(target)
        if input.shape != target.shape:
            raise ValueError(f"input and target must have the same shape, got {tuple(input.shape)} and {tuple(target.shape)}")
        check_not_empty(input.shape, type(self).__name__)  # whatever the wrapped losses would do with it
        partial = ((target > 0) & (target < 1)).flatten(1).any(1)
        n_partial = int(partial.sum())
        batch = input.shape[0]
        if n_partial == 0:
            return self.full_loss(input, target)
        if n_partial == batch:
            return self.partial_loss(input, target)
        idx_p = partial.nonzero().flatten()
        idx_f = (~partial).nonzero().flatten()
        full_value = self.full_loss(input.index_select(0, idx_f), target.index_select(0, idx_f))
        partial_value = self.partial_loss(input.index_select(0, idx_p), target.index_select(0, idx_p))
        return ((batch - n_partial) * full_value + n_partial * partial_value) / batch
