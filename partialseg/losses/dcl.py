"""Deep Compatible Learning losses (Zhang & Zhuang, DCL), on the ``<0,p,1>`` target.

``L_comp = alpha_pos L_P + alpha_neg L_N`` (Eq. 2): ``L_P`` only sees entries that are exactly 1,
``L_N`` only entries that are exactly 0 (Eq. 3, 4); an entry ``0 < p < 1`` is a label value
meaning "unknown", never a probability the model must reach, so it adds no direct term.

Bases (section 3.4), per voxel ``i`` and class ``j``, ``p = softmax(logits)``:

======== ========================================================================
positive
"ce"      Eq. 11 ``-[t=1] log p``
"dice"    Eq. 13 ``[t=1] (1 - 2p / (1 + p))``
"ta_ce"   Eq. 15 ``-[t=1] log p`` plus ``-log q`` on merged voxels, ``q`` = summed
          probability of the voxel's unknown classes; together ``-log q`` with ``q``
          the probability of the candidate set ``{j : t_j > 0}`` (exact, logsumexp)
"ta_dice" Eq. 16 ``1 - 2q / (q + 1)`` on the same ``q``
negative
"ce"      Eq. 12 ``-[t=0] log(1 - p)``
"dice"    Eq. 14 ``[t=0] 2p / (1 + p)``
"ex_ce"   Eq. 17 ``[t=0] log(p + eps)`` plus ``log(s + eps)`` on labelled voxels, ``s`` =
          summed probability of the sample's unlabelled classes (classes unknown somewhere
          in the sample) that are known 0 at the voxel; ``eps = 1``
"ex_dice" Eq. 18 ``[t=0] 2p / (p + 1)`` plus ``2s / (s + 1)`` on labelled voxels
======== ========================================================================

The merged-class terms of Eq. 15-18 are counted once per voxel (the paper writes them inside
the sum over classes, which would count them ``m`` times).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from partialseg.losses import _native
from partialseg.losses._functional import (
    NEGATIVE_BASES,
    POSITIVE_BASES,
    check_input_target,
    compatible_from_logits,
    compatible_terms_from_probs,
    compute_dtype,
    prior_terms_from_probs,
    reduce_voxelwise,
)
from partialseg.losses.base import PartialLabelLoss, check_nonnegative, check_positive

__all__ = ["CompatibleLoss", "PriorLoss", "ConditionalCompatibleLoss", "conditional_compatible_terms", "prior_per_voxel"]


def _bases(name: str, value: str | Sequence[str] | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if item not in allowed:
            raise ValueError(f"{name} base {item!r} is not one of {list(allowed)}.")
    if len(set(items)) != len(items):
        raise ValueError(f"{name} bases repeat: {list(items)}.")
    return items


class CompatibleLoss(PartialLabelLoss):
    """DCL compatible loss ``alpha_pos L_P + alpha_neg L_N`` (Eq. 2-4, bases of section 3.4).

    Several bases may be given and are summed: ``positive=("ce", "dice"), negative=("ce", "dice")``
    is the paper's CE+Dice setting, ``positive=("ta_ce", "ta_dice"), negative=("ex_ce", "ex_dice")``
    its MMEE setting. With a one-hot target, ``CompatibleLoss(positive="ce", negative=None)`` is
    ``torch.nn.functional.cross_entropy`` and ``positive="ce", negative="ce"`` is the binary
    cross-entropy of the softmax probabilities summed over classes.

    Args:
        positive: positive base(s) from ``"ce"``, ``"dice"``, ``"ta_ce"``, ``"ta_dice"``, or None.
        negative: negative base(s) from ``"ce"``, ``"dice"``, ``"ex_ce"``, ``"ex_dice"``, or None.
        alpha_pos: weight of ``L_P`` (> 0).
        alpha_neg: weight of ``L_N`` (> 0).
        reduction: ``"mean"`` (sum over classes and voxels divided by ``B * N``), ``"sum"``, or
            ``"none"`` (per voxel, summed over classes: ``(B, *spatial)``).
        eps: epsilon of ``"ex_ce"`` (Eq. 17, 1 in the paper).

    Raises:
        ValueError: unknown or repeated base, no base at all, non-positive alpha, bad reduction.

    Shapes:
        input: (B, C, H, W[, D]) logits (softmax over C). target: (B, C, H, W[, D]) ``<0,p,1>`` map.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 3, 1)
        >>> t = torch.tensor([[[0.5], [0.5], [0.0]]])  # class 2 known absent, 0 / 1 unknown
        >>> round(CompatibleLoss("ce", "ce", reduction="sum")(x, t).item(), 4)  # only -log(1 - 1/3)
        0.4055
    """

    def __init__(
        self,
        positive: str | Sequence[str] | None = "ce",
        negative: str | Sequence[str] | None = "ce",
        alpha_pos: float = 1.0,
        alpha_neg: float = 1.0,
        reduction: str = "mean",
        eps: float = 1.0,
    ) -> None:
        super().__init__(reduction=reduction)
        self.positive = _bases("positive", positive, POSITIVE_BASES)
        self.negative = _bases("negative", negative, NEGATIVE_BASES)
        if not self.positive and not self.negative:
            raise ValueError("CompatibleLoss needs at least one positive or negative base, got none.")
        self.alpha_pos = check_positive("alpha_pos", alpha_pos)
        self.alpha_neg = check_positive("alpha_neg", alpha_neg)
        self.eps = check_positive("eps", eps)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss from logits ``input`` and the ``<0,p,1>`` ``target`` (same shape)."""
        check_input_target(input, target, type(self).__name__)
        per_voxel = compatible_from_logits(input, target, self.positive, self.negative, self.alpha_pos, self.alpha_neg, self.eps)
        return reduce_voxelwise(per_voxel, self.reduction, input.shape[2:])


def _check_conditional(input: Tensor, cond_label: Tensor, name: str) -> int:
    if input.ndim < 3 or cond_label.ndim != input.ndim:
        raise ValueError(f"{name}: input (B, 2m, *spatial) and cond_label (B, m, *spatial) expected, got {tuple(input.shape)} and {tuple(cond_label.shape)}.")
    m = cond_label.shape[1]
    if input.shape[1] != 2 * m or input.shape[0] != cond_label.shape[0] or input.shape[2:] != cond_label.shape[2:]:
        raise ValueError(
            f"{name}: input must have 2m = {2 * m} channels (intersection then extra) and the grid of cond_label;"
            f" got input {tuple(input.shape)}, cond_label {tuple(cond_label.shape)}."
        )
    return m


class PriorLoss(PartialLabelLoss):
    """DCL prior loss (Eq. 7): inclusiveness and exclusiveness against the conditional labels.

    ``sum_ij [y^c_ij = 0] f_N(z_cap_ij, 0) + [y^c_ij = 1] f_N(z_delta_ij, 0)``: the predicted
    intersection must vanish where the conditional label is 0, the predicted extra part where it
    is 1. Unknown conditional entries add nothing.

    Args:
        negative: ``f_N`` base(s): ``"ce"`` (``-log(1 - a)``), ``"dice"`` (``2a / (1 + a)``),
            ``"ex_ce"`` (``log(a + eps)``), ``"ex_dice"`` (``2a / (a + 1)``).
        reduction: ``"mean"`` (over ``B * N`` voxels), ``"sum"`` or ``"none"`` (``(B, *spatial)``).
        eps: epsilon of ``"ex_ce"``.

    Shapes:
        input: (B, 2m, H, W[, D]) CompNet logits (intersection channels, then extra channels),
        softmax over the 2m channels. cond_label: (B, m, H, W[, D]) ``<0,p,1>`` conditional labels.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 4, 1)  # m = 2, every one of the 4 maps gets 1/4
        >>> yc = torch.tensor([[[0.0], [1.0]]])
        >>> round(PriorLoss("ce", reduction="sum")(x, yc).item(), 4)  # 2 * -log(3/4)
        0.5754
    """

    def __init__(self, negative: str | Sequence[str] = "ce", reduction: str = "mean", eps: float = 1.0) -> None:
        super().__init__(reduction=reduction)
        self.negative = _bases("negative", negative, NEGATIVE_BASES)
        if not self.negative:
            raise ValueError("PriorLoss needs at least one negative base, got none.")
        self.eps = check_positive("eps", eps)

    def forward(self, input: Tensor, cond_label: Tensor) -> Tensor:
        """Compute the loss from CompNet logits ``input`` and conditional labels ``cond_label``."""
        _check_conditional(input, cond_label, type(self).__name__)
        per_voxel = prior_per_voxel(input, cond_label, self.negative, 1.0, self.eps)
        return reduce_voxelwise(per_voxel, self.reduction, input.shape[2:])


def prior_per_voxel(input: Tensor, cond_label: Tensor, negative: Sequence[str], weight: float, eps: float) -> Tensor:
    """``weight * L_prior`` per voxel, (B, N), from CompNet logits (compiled kernel on CPU float32)."""
    x = input.to(compute_dtype(input)).reshape(input.shape[0], input.shape[1], -1)
    yc = cond_label.to(x.dtype).reshape(x.shape[0], cond_label.shape[1], -1)
    if _native.usable(x):  # the kernel with no compatible base: the prior terms alone
        return _native.compatible(x, yc, (), (), 1.0, 1.0, eps, yc, _native.prior_weights(negative, weight))
    per_voxel = prior_terms_from_probs(torch.softmax(x, 1), yc, negative, eps)
    return per_voxel * weight if weight != 1.0 else per_voxel


def conditional_compatible_terms(
    probs: Tensor,
    target: Tensor,
    cond_label: Tensor,
    positive: Sequence[str] = ("ce",),
    negative: Sequence[str] = ("ce",),
    alpha_pos: float = 1.0,
    alpha_neg: float = 1.0,
    prior_weight: float = 1.0,
    eps: float = 1.0,
) -> Tensor:
    """Per-voxel conditional compatible loss (Eq. 8) from CompNet *probabilities*.

    ``L_comp(z_cap + z_delta, t_cap + t_delta) + prior_weight L_prior(z, y^c)`` (Eq. 6-8). Plain
    autograd, so any probabilities work (a softmax over the 2m maps, per-map sigmoids, ...).

    Args:
        probs: (B, 2m, *spatial) probabilities, intersection maps then extra maps.
        target: (B, 2m, *spatial) ``z = (z_cap, z_delta)`` of Eq. 5 (``<0,p,1>`` entries).
        cond_label: (B, m, *spatial) conditional labels.
        positive, negative, alpha_pos, alpha_neg, eps: as in :class:`CompatibleLoss`.
        prior_weight: weight of the prior term (>= 0).

    Returns:
        (B, *spatial) per-voxel loss.

    Example:
        >>> import torch
        >>> probs = torch.full((1, 4, 1), 0.25)
        >>> z = torch.tensor([[[1.0], [0.0], [0.0], [0.0]]])  # target class 0, inside y^c
        >>> yc = torch.tensor([[[1.0], [0.0]]])
        >>> round(conditional_compatible_terms(probs, z, yc).sum().item(), 4)  # 2*-log(.5) + 2*-log(.75)
        1.9617
    """
    m = _check_conditional(probs, cond_label, "conditional_compatible_terms")
    if target.shape != probs.shape:
        raise ValueError(f"target must match probs {tuple(probs.shape)}, got {tuple(target.shape)}.")
    y_hat = probs[:, :m] + probs[:, m:]
    y = target[:, :m] + target[:, m:]
    comp = compatible_terms_from_probs(y_hat.clamp(0, 1), y.clamp(0, 1), positive, negative, alpha_pos, alpha_neg, eps)
    if prior_weight == 0:
        return comp
    return comp + prior_weight * prior_terms_from_probs(probs, cond_label, negative or ("ce",), eps)


class ConditionalCompatibleLoss(PartialLabelLoss):
    """DCL conditional compatible loss (Eq. 8) on CompNet's 2m-channel output.

    ``L_cc = L_comp(z_cap + z_delta, t_cap + t_delta) + prior_weight * L_prior(z, y^c)`` with the
    softmax over the 2m maps. The prior term uses the negative bases (``"ce"`` if none).

    Two readings of Eq. 6 (``reading``):

    * ``"sum"`` (default, the paper's equation as written): ``L_comp(z_cap + z_delta, t_cap +
      t_delta)``, the compatible loss of the m-class segmentation. Which of its two maps carries
      a class is then decided by the prior loss alone; on the synthetic cardiac benchmark the
      intersection maps can collapse to 0 (``docs/results.md``, DCL ablation).
    * ``"maps"``: the compatible loss of the 2m maps against ``z`` (``L_comp(z_hat, z)`` with the
      2m maps as classes, Eq. 6's left-hand side read per map), which gives each intersection
      map its own positive term. On the same benchmark it removes the collapse (#5: 0.892 +-
      0.007 mean Dice over 3 seeds against 0.821 +- 0.068).

    Args:
        positive, negative, alpha_pos, alpha_neg, eps: as in :class:`CompatibleLoss`.
        prior_weight: weight of the prior loss (>= 0; the paper uses 1).
        reduction: ``"mean"`` (over ``B * N`` voxels), ``"sum"`` or ``"none"`` (``(B, *spatial)``).
        reading: ``"sum"`` or ``"maps"`` (see above).

    Shapes:
        input: (B, 2m, H, W[, D]) logits. target: (B, 2m, H, W[, D]) ``z`` of Eq. 5.
        cond_label: (B, m, H, W[, D]).

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 4, 1)
        >>> z = torch.tensor([[[1.0], [0.0], [0.0], [0.0]]])
        >>> yc = torch.tensor([[[1.0], [0.0]]])
        >>> round(ConditionalCompatibleLoss(reduction="sum")(x, z, yc).item(), 4)
        1.9617
    """

    def __init__(
        self,
        positive: str | Sequence[str] | None = "ce",
        negative: str | Sequence[str] | None = "ce",
        alpha_pos: float = 1.0,
        alpha_neg: float = 1.0,
        prior_weight: float = 1.0,
        reduction: str = "mean",
        eps: float = 1.0,
        reading: str = "sum",
    ) -> None:
        super().__init__(reduction=reduction)
        self.compatible = CompatibleLoss(positive, negative, alpha_pos, alpha_neg, reduction, eps)
        self.prior_weight = check_nonnegative("prior_weight", prior_weight)
        if reading not in ("sum", "maps"):
            raise ValueError(f"reading must be 'sum' (Eq. 6 as written) or 'maps' (per map), got {reading!r}.")
        self.reading = reading

    def forward(self, input: Tensor, target: Tensor, cond_label: Tensor) -> Tensor:
        """Compute the loss from CompNet logits, the target ``z`` and the conditional labels."""
        _check_conditional(input, cond_label, type(self).__name__)
        if target.shape != input.shape:
            raise ValueError(f"{type(self).__name__}: target must match input {tuple(input.shape)}, got {tuple(target.shape)}.")
        c = self.compatible
        if self.reading == "maps":  # L_comp on the 2m maps against z, plus the prior loss
            per_voxel = compatible_from_logits(input, target, c.positive, c.negative, c.alpha_pos, c.alpha_neg, c.eps)
            if self.prior_weight > 0:
                per_voxel = per_voxel + prior_per_voxel(input, cond_label, c.negative or ("ce",), self.prior_weight, c.eps)
            return reduce_voxelwise(per_voxel, self.reduction, input.shape[2:])
        x = input.to(compute_dtype(input)).reshape(input.shape[0], input.shape[1], -1)
        if _native.usable(x):  # compiled CPU kernel: softmax, both terms and the gradient in one pass
            m = cond_label.shape[1]
            y = (target[:, :m] + target[:, m:]).clamp(0, 1).to(x.dtype).reshape(x.shape[0], m, -1)
            yc = cond_label.to(x.dtype).reshape(y.shape) if self.prior_weight > 0 else None
            prior = _native.prior_weights(c.negative or ("ce",), self.prior_weight)
            per_voxel = _native.compatible(x, y, c.positive, c.negative, c.alpha_pos, c.alpha_neg, c.eps, yc, prior)
            return reduce_voxelwise(per_voxel, self.reduction, input.shape[2:])
        probs = torch.softmax(input.to(compute_dtype(input)), 1)
        per_voxel = conditional_compatible_terms(
            probs, target, cond_label, c.positive, c.negative, c.alpha_pos, c.alpha_neg, self.prior_weight, c.eps
        )
        return reduce_voxelwise(per_voxel.flatten(1), self.reduction, input.shape[2:])
