"""Dual-Task Mutual Learning losses (Zhang & Zhang, DTML, section 2.2), multi-class and partial-label.

DTML trains two networks of one backbone: ``M_s`` (segmentation, one sigmoid channel per
foreground class) and ``M_d`` (one signed distance map per foreground class, through ``tanh``).
:class:`DTMLLoss` computes every term of Eq. 5-6 in one call:

* ``L_seg = 0.5 (BCE + Dice)`` of ``sigmoid(M_s)`` on the known voxels;
* ``L_mask = Dice`` of ``M_d``'s mask ``sigmoid(-k * s_hat)`` (Eq. 2, :func:`sdm_to_mask`) on the
  known voxels (Dice only, as the reference code; ``mask_ce=True`` adds the BCE);
* ``L_dis = mean (s_hat - SDM)^2`` against the normalised SDM of
  :class:`~partialseg.transforms.SignedDistanceMap` (Table 1; off by default);
* ``L_con = mean (sigmoid(M_s) - sigmoid(-k * s_hat))^2`` over every voxel and foreground class,
  labelled or not (Eq. 4), not detached: its gradient reaches both networks;

``loss = L_seg + mask_weight L_mask + dis_weight L_dis + w(t) L_con`` with the ramp
``w(t) = consistency_weight * exp(-5 (1 - min(t / 150, 40) / 40)^2)`` (:func:`consistency_ramp`).
As ``L_seg`` depends on ``M_s`` only and ``L_mask`` / ``L_dis`` on ``M_d`` only, the gradient of this
one sum with respect to each network is exactly that of Eq. 5 and Eq. 6.

The Dice is the reference code's: squared denominators, pooled over the batch (one ratio per
class), ``smooth = 1e-5`` in numerator and denominator, averaged over the classes that have a
known voxel in the batch.

Partial labels: the target is the ``<0,p,1>`` map of
:class:`~partialseg.transforms.PartialLabelToVectord` with the background channel first (it is
dropped). A class whose entry is ``p`` at a voxel is unknown there and gets ``L_con`` only; a
fully unlabelled case (all ``p``) gets ``L_con`` only. ``L_dis`` compares distances, which depend
on the whole mask: it applies to a (case, class) only where that class is known at every voxel
of the case. A batch without a known voxel gives ``seg = mask = dis = 0`` with zero gradient
(``loss`` stays finite and still carries ``L_con``). See ``docs/dtml.md``.

Example:
    >>> import torch
    >>> consistency_ramp(0), consistency_ramp(6000)
    (0.006737946999085467, 1.0)
    >>> [round(v, 4) for v in sdm_to_mask(torch.tensor([-0.001, 0.0, 0.001])).tolist()]  # sigmoid(-+1.5)
    [0.8176, 0.5, 0.1824]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.loss import _Loss

from partialseg._checks import check_float
from partialseg.losses.base import plain_tensor

__all__ = ["DTMLLoss", "consistency_ramp", "masked_dice_loss", "sdm_to_mask"]

#: the transform factor of Eq. 2 in the paper and its code
DEFAULT_K = 1500.0


def sdm_to_mask(sdm: Tensor, k: float = DEFAULT_K) -> Tensor:
    """The soft mask of a signed distance map, ``sigmoid(-k * sdm)`` (Eq. 2; DTML uses k = 1500).

    The SDM is negative inside the object, so the mask is close to 1 inside, 0 outside and 0.5 on
    the boundary. The paper writes ``1 / (1 + exp(-k z))`` with the sign absorbed; its code (and this
    function) negates the map.

    Args:
        sdm: ``(B, C, *spatial)`` (any shape) signed distance map, e.g. ``M_d``'s ``tanh`` output.
        k: the transform factor (> 0).

    Returns:
        A tensor of the shape and dtype of ``sdm``, in [0, 1].

    Example:
        >>> import torch
        >>> sdm_to_mask(torch.tensor([-1.0, 0.0, 1.0])).tolist()
        [1.0, 0.5, 0.0]
    """
    return torch.sigmoid(sdm * -float(k))


def consistency_ramp(
    iteration: float,
    max_weight: float = 1.0,
    scale: float = 150.0,
    length: float = 40.0,
    stepwise: bool = False,
) -> float:
    """The sigmoid ramp-up of the consistency weight: ``max_weight * exp(-5 (1 - min(t / scale, length) / length)^2)``.

    ``t = iteration``, the number of iterations done before this one (0 at the first). The paper's
    code ramps over ``length = 40`` units of ``scale = 150`` iterations (full weight from iteration
    6000) and floors ``t / scale`` (a staircase of 150-iteration steps): ``stepwise=True`` does the
    same; the default is the smooth curve. ``length = 0`` means no ramp (``max_weight`` at once).

    Args:
        iteration: iterations done (>= 0).
        max_weight: the weight reached at the end of the ramp (>= 0).
        scale: iterations per ramp unit (> 0).
        length: ramp length in units (>= 0).
        stepwise: floor ``t / scale`` as the reference code does.

    Returns:
        The weight, a Python float.

    Raises:
        ValueError: an argument outside its range.

    Example:
        >>> round(consistency_ramp(3000), 6), round(consistency_ramp(299, stepwise=True), 6)
        (0.286505, 0.008625)
    """
    t = check_float(iteration, "iteration", minimum=0.0)
    max_weight = check_float(max_weight, "max_weight", minimum=0.0)
    scale = check_float(scale, "scale", minimum=0.0, include_minimum=False)
    length = check_float(length, "length", minimum=0.0)
    if length == 0.0:
        return max_weight
    units = math.floor(t / scale) if stepwise else t / scale
    phase = 1.0 - min(units, length) / length
    return max_weight * math.exp(-5.0 * phase * phase)


def masked_dice_loss(prob: Tensor, target: Tensor, known: Tensor, smooth: float = 1e-5) -> Tensor:
    """The reference code's Dice loss per class, pooled over the batch, on known voxels only.

    For each class ``c``: ``1 - (2 sum(m p t) + smooth) / (sum(m p^2) + sum(m t^2) + smooth)`` with
    the sums over the batch and the voxels and ``m`` the known mask; the mean over the classes that
    have at least one known voxel. No known voxel at all: ``0 * sum(prob)`` (zero, zero gradient,
    still on ``prob``'s graph).

    Args:
        prob: ``(B, C, *spatial)`` probabilities.
        target: ``(B, C, *spatial)`` binary target (its values where ``known`` is 0 are ignored).
        known: ``(B, C, *spatial)`` 1 where the target is known, 0 elsewhere.
        smooth: added to numerator and denominator.

    Returns:
        A 0-dim tensor.

    Example:
        >>> import torch
        >>> p = torch.tensor([[[0.5, 0.5, 0.9]]]); t = torch.tensor([[[1.0, 0.0, 0.0]]])
        >>> round(float(masked_dice_loss(p, t, torch.tensor([[[1.0, 1.0, 0.0]]]), smooth=0.0)), 6)  # 1 - 1 / 1.5
        0.333333
    """
    dims = (0, *range(2, prob.ndim))
    t1 = target * known
    return _dice(prob, t1, known, t1.sum(dims), known.sum(dims), smooth)


def _dice(prob: Tensor, t1: Tensor, known: Tensor, y_sum: Tensor, counts: Tensor, smooth: float) -> Tensor:
    """:func:`masked_dice_loss` with the target already zero where unknown and its per-class sums given."""
    dims = (0, *range(2, prob.ndim))
    has = counts > 0
    if not bool(has.any()):
        return prob.sum() * 0.0
    intersect = (prob * t1).sum(dims)
    z_sum = (prob * known * prob).sum(dims)
    dice = 1.0 - (2.0 * intersect + smooth) / (z_sum + y_sum + smooth)
    return dice[has].mean()


def _bce_sum(logits: Tensor, t1: Tensor, known: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``sum(known * BCE(logits, t1))`` for a binary ``t1``: the BCE with logits is ``softplus((1 - 2 t1) logits)``
    (``log(1 + exp(-x))`` where ``t1 = 1``, ``log(1 + exp(x))`` where 0), exact for large ``|x|``."""
    signed = t1 * -2.0
    return _class_sums(known, F.softplus(signed.add_(1.0).mul_(logits)), dims).sum()


def _class_sums(a: Tensor, b: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``(a * b).sum(dims)``, one value per class; with one class a BLAS dot (no temporary)."""
    if a.shape[1] == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(1)
    return (a * b).sum(dims)


def _dice_coefficients(inter: Tensor, z_sum: Tensor, y_sum: Tensor, has: Tensor, smooth: float) -> tuple[Tensor, Tensor, Tensor]:
    """The batch-pooled Dice loss of :func:`_dice` from its sums, and the per-class factors of its
    gradient: ``d dice / d prob = alpha_c t1 + beta_c known prob`` (zero for classes without a known voxel)."""
    n_has = has.sum()
    if not bool(n_has > 0):
        zero = torch.zeros_like(inter)
        return inter.sum() * 0.0, zero, zero
    den = z_sum + y_sum + smooth
    num = 2.0 * inter + smooth
    loss = (1.0 - num / den)[has].mean()
    scale = has.to(den.dtype) / n_has
    return loss, -2.0 * scale / den, 2.0 * scale * num / (den * den)


class _DTMLTerms(torch.autograd.Function):
    """``(L_seg, L_mask, L_con)`` of :class:`DTMLLoss` with a fused backward.

    Forward: ``prob = sigmoid(x)``, ``mask = sigmoid(-k s)``; ``L_seg = 0.5 (BCE + Dice)`` with the BCE
    with logits summed over the known entries (:func:`_bce_sum`) divided by their count; ``L_mask`` the Dice of ``mask`` (plus its
    BCE on the logits ``-k s`` with ``mask_ce``); ``L_con = mean((prob - mask)^2)``.

    Backward, with ``g`` the incoming gradients, ``N`` the number of entries, ``n`` the known count:

    * ``dx = prob (1 - prob) (g_seg / 2 (alpha t1 + beta known prob) + 2 g_con (prob - mask) / N)
      + g_seg / (2 n) (known prob - t1)``
    * ``ds = -k mask (1 - mask) (g_mask' (alpha' t1 + beta' known mask) - 2 g_con (prob - mask) / N)
      [- k g_mask / (2 n) (known mask - t1)]``, ``g_mask' = g_mask`` (``g_mask / 2`` with ``mask_ce``).
    """

    @staticmethod
    def forward(ctx, x, s, t1, known, y_sum, counts, n_known, k, smooth, mask_ce):  # noqa: D102
        dims = (0, *range(2, x.ndim))
        has = counts > 0
        nk = n_known.clamp_min(1.0)
        prob = torch.sigmoid(x)
        z = s * -k
        mask = torch.sigmoid(z)
        kp, km = known * prob, known * mask
        bce = _bce_sum(x, t1, known, dims) / nk
        dice_s, a_s, b_s = _dice_coefficients(_class_sums(prob, t1, dims), _class_sums(kp, prob, dims), y_sum, has, smooth)
        dice_m, a_m, b_m = _dice_coefficients(_class_sums(mask, t1, dims), _class_sums(km, mask, dims), y_sum, has, smooth)
        seg = 0.5 * (bce + dice_s)
        if mask_ce:
            bce_m = _bce_sum(z, t1, known, dims) / nk
            mask_term = 0.5 * (bce_m + dice_m)
        else:
            mask_term = dice_m
        d = prob - mask
        con = (d * d).mean()
        ctx.save_for_backward(prob, mask, kp, km, t1, d, a_s, b_s, a_m, b_m, nk)
        ctx.k, ctx.mask_ce = k, mask_ce
        return seg, mask_term, con

    @staticmethod
    def backward(ctx, g_seg, g_mask, g_con):  # noqa: D102
        prob, mask, kp, km, t1, d, a_s, b_s, a_m, b_m, nk = ctx.saved_tensors
        view = (1, -1, *([1] * (prob.ndim - 2)))
        c = d * (2.0 * g_con / d.numel())  # dL_con / dprob, = -dL_con / dmask
        gx = gs = None
        if ctx.needs_input_grad[0]:
            half = 0.5 * g_seg
            gx = t1 * (a_s * half).view(view)
            gx.addcmul_(kp, (b_s * half).view(view)).add_(c).mul_(prob).mul_(1.0 - prob)
            gx.add_((kp - t1).mul_(half / nk))
        if ctx.needs_input_grad[1]:
            gm = 0.5 * g_mask if ctx.mask_ce else g_mask
            gs = t1 * (a_m * gm).view(view)
            gs.addcmul_(km, (b_m * gm).view(view)).sub_(c).mul_(mask).mul_(1.0 - mask)
            if ctx.mask_ce:
                gs.add_((km - t1).mul_(gm / nk))
            gs.mul_(-ctx.k)
        return gx, gs, None, None, None, None, None, None, None, None


class DTMLLoss(_Loss):
    """Every DTML term for one batch: ``L_seg``, ``L_mask``, ``L_dis``, ``L_con`` and the total.

    Args:
        k: the SDM-to-mask factor of Eq. 2 (1500 in the paper).
        mask_weight: weight of ``L_mask`` (the paper's choice: 1; 0 turns it off).
        dis_weight: weight of ``L_dis`` (0 by default: Table 1's best is ``L_mask`` alone).
        consistency_weight: the consistency weight at the end of the ramp (1 in the reference code;
            its two backward passes count ``L_con`` twice, so 2 reproduces its gradients exactly,
            see ``docs/dtml.md``).
        ramp_scale: iterations per ramp unit (150).
        ramp_length: ramp length in units (40); 0 = no ramp.
        p: the value of unknown entries in the target (``PartialLabelToVectord``'s ``p``).
        smooth: the Dice smoothing term (1e-5, as the reference code).
        mask_ce: add the BCE of the mask (logits ``-k * s_hat``) to ``L_mask``, making it the same
            ``0.5 (BCE + Dice)`` as ``L_seg`` (the reference code uses the Dice alone).
        ramp_stepwise: floor ``t / ramp_scale`` as the reference code (:func:`consistency_ramp`).

    Shapes (``m`` = number of classes, background included):
        seg_logits ``(B, m-1, *spatial)``: ``M_s``'s raw output, one sigmoid channel per foreground
        class; sdm_pred ``(B, m-1, *spatial)``: ``M_d``'s output after ``tanh``; target
        ``(B, m, *spatial)``: the ``<0,p,1>`` map, background channel first (dropped);
        sdm_target ``(B, m-1, *spatial)``: normalised SDMs of the foreground classes (needed when
        ``dis_weight > 0``, used for the reported ``dis`` whenever given).

    Returns:
        ``forward`` returns a dict of 0-dim float tensors: ``loss`` (the total, on the graph),
        ``seg``, ``mask``, ``dis``, ``con`` (the unweighted terms, on the graph) and
        ``con_weight`` (``w(t)``).

    Raises:
        ValueError: shapes that do not fit, a target value other than 0, 1 and ``p``, a non-finite
            ``sdm_target``, ``dis_weight > 0`` without ``sdm_target``, bad arguments.

    Example:
        >>> import torch
        >>> seg = torch.zeros(1, 1, 2, 2); sdm = torch.zeros(1, 1, 2, 2)
        >>> target = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]], [[1.0, 0.0], [0.5, 0.5]]]])  # 2 known voxels
        >>> out = DTMLLoss()(seg, sdm, target, iteration=6000)
        >>> round(float(out["seg"]), 4), float(out["con"]), float(out["con_weight"])  # 0.5 (ln 2 + 1 - 1 / 1.5)
        (0.5132, 0.0, 1.0)
    """

    def __init__(
        self,
        k: float = DEFAULT_K,
        mask_weight: float = 1.0,
        dis_weight: float = 0.0,
        consistency_weight: float = 1.0,
        ramp_scale: float = 150.0,
        ramp_length: float = 40.0,
        p: float = 0.5,
        smooth: float = 1e-5,
        mask_ce: bool = False,
        ramp_stepwise: bool = False,
    ) -> None:
        super().__init__(reduction="mean")
        self.k = check_float(k, "k", minimum=0.0, include_minimum=False)
        self.mask_weight = check_float(mask_weight, "mask_weight", minimum=0.0)
        self.dis_weight = check_float(dis_weight, "dis_weight", minimum=0.0)
        self.consistency_weight = check_float(consistency_weight, "consistency_weight", minimum=0.0)
        self.ramp_scale = check_float(ramp_scale, "ramp_scale", minimum=0.0, include_minimum=False)
        self.ramp_length = check_float(ramp_length, "ramp_length", minimum=0.0)
        self.p = check_float(p, "p", minimum=0.0, maximum=1.0, include_minimum=False, include_maximum=False)
        self.smooth = check_float(smooth, "smooth", minimum=0.0)
        if not isinstance(mask_ce, bool) or not isinstance(ramp_stepwise, bool):
            raise TypeError(f"mask_ce and ramp_stepwise must be bools, got {mask_ce!r} and {ramp_stepwise!r}.")
        self.mask_ce = mask_ce
        self.ramp_stepwise = ramp_stepwise

    def __call__(self, *args, **kwargs):
        # MONAI pipelines hand MetaTensors to losses; compute on plain tensors (same graph)
        return super().__call__(*(plain_tensor(a) for a in args), **{k: plain_tensor(v) for k, v in kwargs.items()})

    def ramp(self, iteration: float) -> float:
        """``w(t)``: the consistency weight after ``iteration`` iterations (:func:`consistency_ramp`)."""
        return consistency_ramp(iteration, self.consistency_weight, self.ramp_scale, self.ramp_length, self.ramp_stepwise)

    def _check(self, seg_logits: Tensor, sdm_pred: Tensor, target: Tensor, sdm_target: Tensor | None) -> None:
        for name, x in (("seg_logits", seg_logits), ("sdm_pred", sdm_pred), ("target", target)):
            if not isinstance(x, Tensor):
                raise TypeError(f"DTMLLoss: {name} must be a tensor, got {type(x).__name__}.")
        if seg_logits.ndim < 3 or seg_logits.shape[1] < 1:
            raise ValueError(f"DTMLLoss: seg_logits must be (B, m-1, *spatial), got shape {tuple(seg_logits.shape)}.")
        if not seg_logits.is_floating_point() or not sdm_pred.is_floating_point():
            raise ValueError(f"DTMLLoss: seg_logits and sdm_pred must be floating point, got {seg_logits.dtype} and {sdm_pred.dtype}.")
        if any(int(s) == 0 for s in seg_logits.shape):
            raise ValueError(f"DTMLLoss: seg_logits of shape {tuple(seg_logits.shape)} holds no voxel.")
        if sdm_pred.shape != seg_logits.shape:
            raise ValueError(
                f"DTMLLoss: sdm_pred shape {tuple(sdm_pred.shape)} differs from seg_logits shape {tuple(seg_logits.shape)};"
                " M_s and M_d give one channel per foreground class each."
            )
        expected = (seg_logits.shape[0], seg_logits.shape[1] + 1, *seg_logits.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(
                f"DTMLLoss: target shape {tuple(target.shape)} does not fit seg_logits {tuple(seg_logits.shape)}: expected"
                f" {expected}, the <0,p,1> map with the background channel first (PartialLabelToVectord) and one"
                " network channel per foreground class."
            )
        if sdm_target is not None:
            if not isinstance(sdm_target, Tensor):
                raise TypeError(f"DTMLLoss: sdm_target must be a tensor or None, got {type(sdm_target).__name__}.")
            if sdm_target.shape != seg_logits.shape:
                raise ValueError(
                    f"DTMLLoss: sdm_target shape {tuple(sdm_target.shape)} differs from seg_logits shape"
                    f" {tuple(seg_logits.shape)}; compute it for the foreground classes (SignedDistanceMapd,"
                    " include_background=False)."
                )

    def forward(
        self,
        seg_logits: Tensor,
        sdm_pred: Tensor,
        target: Tensor,
        sdm_target: Tensor | None = None,
        iteration: float = 0,
    ) -> dict[str, Tensor]:
        """The DTML terms of one batch (shapes in the class docstring); ``iteration`` = iterations done."""
        self._check(seg_logits, sdm_pred, target, sdm_target)
        if self.dis_weight > 0 and sdm_target is None:
            raise ValueError(
                f"DTMLLoss: dis_weight={self.dis_weight} needs sdm_target, the normalised SDMs of the foreground classes"
                " (batch key 'sdm' from SignedDistanceMapd)."
            )
        dtype = torch.float64 if seg_logits.dtype == torch.float64 else torch.float32
        logits = seg_logits.to(dtype)
        sdm = sdm_pred.to(dtype)
        t = target[:, 1:].to(dtype)
        is1 = t == 1
        known_b = is1 | (t == 0)
        known = known_b.to(dtype)
        dims = (0, *range(2, t.ndim))
        counts = known.sum(dims)  # known entries per class
        n_known = counts.sum()
        if int(n_known) + int((t == self.p).sum()) != t.numel():  # a value other than 0, 1, p
            bad = ~known_b & (t != self.p)
            raise ValueError(
                f"DTMLLoss: target holds {float(t[bad][0]):g}; a <0,p,1> map holds only 0, 1 and p={self.p:g} (unknown)."
                " Build it with PartialLabelToVectord after the spatial transforms (and pass its p here)."
            )
        t1 = is1.to(dtype)
        y_sum = t1.sum(dims)

        # L_seg, L_mask and L_con in one autograd node (_DTMLTerms): the sigmoids once, each sum a
        # fused product-sum, and a hand-written backward of a few passes instead of autograd's
        # ~30 elementwise nodes (the values and gradients of the formulas above; tested against them)
        with torch.autocast(logits.device.type, enabled=False):  # the sums stay in float32 under AMP
            seg, mask, con = _DTMLTerms.apply(logits, sdm, t1, known, y_sum, counts, n_known, self.k, self.smooth, self.mask_ce)
        if sdm_target is not None:
            if self.dis_weight > 0:
                dis = self._dis(sdm, sdm_target, known_b, is1)
            else:
                with torch.no_grad():
                    dis = self._dis(sdm, sdm_target, known_b, is1)
        else:
            dis = sdm.sum() * 0.0
        w = self.ramp(iteration)
        loss = seg + self.mask_weight * mask + self.dis_weight * dis + w * con
        return {"loss": loss, "seg": seg, "mask": mask, "dis": dis, "con": con, "con_weight": torch.tensor(w, dtype=dtype, device=loss.device)}

    def _dis(self, sdm: Tensor, sdm_target: Tensor, known: Tensor, is1: Tensor) -> Tensor:
        """``L_dis``: mean squared SDM error over the (case, class) pairs known at every voxel."""
        target = sdm_target.to(sdm.dtype)
        if not bool(torch.isfinite(target).all()):
            raise ValueError("DTMLLoss: sdm_target holds NaN or infinite values.")
        full = known.flatten(2).all(2)  # (B, m-1)
        if not bool(full.any()):
            return sdm.sum() * 0.0
        # a known-absent class has an all-zero normalised SDM ("boundary everywhere", mask 0.5):
        # its target is +1 (outside everywhere) instead
        empty = full & ~is1.flatten(2).any(2)
        view = (*full.shape, *([1] * (sdm.ndim - 2)))
        target = torch.where(empty.view(view), torch.ones_like(target), target)
        sq = (sdm - target) ** 2
        return sq[full].mean()
