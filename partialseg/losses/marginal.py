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

Implementation. :func:`marginal_softmax_stats` is the family's one entry point: every loss here
asks it for the statistics it needs (per-voxel CE terms, per-channel Dice region sums) and it
chooses the compiled CPU kernel (:mod:`partialseg.losses._native`) or the torch autograd
functions below, which give the same numbers.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from partialseg.losses import _native
from partialseg.losses._functional import (
    UNDERFLOW,
    check_input_target,
    compute_dtype,
    dice_from_sums,
    exact_candidate_rows,
    flat,
    nonfinite_marker,
    reduce_channelwise,
    reduce_voxelwise,
    softmax_backward,
)
from partialseg.losses.base import PartialLabelLoss, apply_class_weight, check_nonnegative, check_positive

__all__ = [
    "MarginalCELoss",
    "MarginalDiceLoss",
    "ExclusionCELoss",
    "ExclusionDiceLoss",
    "MarginalExclusionLoss",
    "marginal_softmax_stats",
    "region_dice",
]


# ----------------------------------------------------------------------------------------------
# the family's one entry point: compiled kernel or torch
# ----------------------------------------------------------------------------------------------


def marginal_softmax_stats(
    x: Tensor, target: Tensor, mce: bool = False, ece: bool = False, mdice: bool = False, edice: bool = False, eps: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shared-softmax statistics of the marginal / exclusion losses, with a hand-written backward.

    The one place where this family chooses its implementation: the compiled CPU kernel for
    float32 (and half, computed in float32) CPU tensors when it builds, else the torch autograd
    functions below (CUDA, float64, ``PARTIALSEG_NATIVE=0``). Both give the same numbers, and
    both return NaN at a voxel whose logits are NaN / +inf (and NaN region sums for its sample).

    Args:
        x: (B, C, *spatial) logits; computed in float32 (float64 stays float64).
        target: (B, C, *spatial) ``<0,p,1>`` map.
        mce, ece, mdice, edice: which outputs to compute (the others come back empty).
        eps: exclusion CE epsilon (Eq. 11 of the marginal paper, 1 there).

    Returns:
        ``(mce (B, N), ece (B, N), mdice (3, B, C), edice (3, B, C))`` with ``N`` the number of
        voxels; the Dice entries hold (intersection, prediction sum, target sum).

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 3, 2)
        >>> t = torch.tensor([[[1.0, 0.5], [0.0, 0.5], [0.0, 0.0]]])
        >>> mce, _, _, _ = marginal_softmax_stats(x, t, mce=True)
        >>> [round(v, 4) for v in mce[0].tolist()]  # -log(1/3), -log(2/3)
        [1.0986, 0.4055]
    """
    xb = flat(x)
    want = (bool(mce), bool(ece), bool(mdice), bool(edice))
    if _native.usable(xb):  # compiled CPU kernel: same numbers, one pass each way (reads a channels-last target as it is)
        return _native.marginal(xb, flat(target, xb.dtype, contiguous=False), want, eps)
    tb = flat(target, xb.dtype)
    empty = xb.new_empty(0)
    if want == (True, False, False, False):
        out = (_MarginalCEFunction.apply(xb, tb), empty, empty, empty)
    elif want == (False, True, False, False):
        out = (empty, _ExclusionCEFunction.apply(xb, tb, float(eps)), empty, empty)
    else:
        out = _MarginalExclusionFunction.apply(xb, tb, want, float(eps))
    marker = nonfinite_marker(xb)  # (B, N): 0, NaN at a voxel with a NaN / +inf logit
    per_sample = marker.sum(1)[None, :, None]
    return tuple(o if not o.numel() else (o + marker if i < 2 else o + per_sample) for i, o in enumerate(out))


# ----------------------------------------------------------------------------------------------
# torch implementation (CUDA, float64, no compiler): autograd functions with hand-written backward
# ----------------------------------------------------------------------------------------------


class _MarginalExclusionFunction(torch.autograd.Function):
    """One softmax, up to four outputs, one backward.

    With the candidate mask ``w = [t != 0]`` (the voxel may belong to the class) and the
    exclusion label ``v = 1 - w = [t == 0]`` (known absent), the outputs (each computed only if
    requested, else empty) are

    * ``mce``  (B, N): marginal CE per voxel ``-log q``, ``q = sum_c w_c p_c``;
    * ``ece``  (B, N): exclusion CE per voxel ``sum_c v_c log(p_c + eps)``;
    * ``mdice`` (3, B, C): marginal Dice sums (I, sum P, sum T) over informative voxels ``M``
      (some class known absent), where a channel's prediction P is ``q`` if it is a candidate,
      else ``p_c``, and its target T is ``w_c``;
    * ``edice`` (3, B, C): exclusion Dice sums (``sum v p``, ``sum M p``, ``sum v``); unlabelled
      voxels change nothing.

    ``q`` is set to exactly 1 where every class is a candidate (zero loss, zero gradient). Where
    it underflows (extreme logits) it is recomputed as ``exp(logsumexp_S x - logsumexp x)`` on
    those voxels only. A voxel of all zeros (no candidate) is treated as unlabelled by ``mce``.

    Backward: every term's gradient with respect to ``p`` is, up to a per-voxel constant (which
    the softmax backward removes), ``v (a_c + b_i) + v g_e / (p + eps) + gSP_e,c M_i`` with a
    per-channel ``a`` and a per-voxel ``b``; it is built in one buffer and pushed through one fused
    softmax backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, want: tuple[bool, bool, bool, bool], eps: float):  # type: ignore[override]
        want_mce, want_ece, want_mdice, want_edice = want
        ctx.want, ctx.eps = want, eps
        ctx.set_materialize_grads(False)
        n_cls, n_b = x.shape[1], x.shape[0]
        p = torch.softmax(x, 1)
        v = torch.empty_like(p)
        torch.eq(t, 0, out=v)  # known absent; the candidates are w = 1 - v
        empty = x.new_empty(0)
        mce = ece = mdice = edice = empty
        q = low_idx = r_rows = informative = scratch = None
        if want_mce or want_mdice or want_edice:
            n_abs = torch.bmm(v.new_ones(n_b, 1, n_cls), v)  # (B, 1, N), one GEMM read of v
            informative = (n_abs > 0).to(p.dtype)  # M: some class known absent
        if want_mce or want_mdice:
            scratch = torch.mul(p, v)  # v p
            s_vp = scratch.sum(2) if want_mdice else None  # per channel: sum v p
            if want_mce:  # -log q needs q to float32 relative precision: sum the candidates
                wp = torch.sub(p, scratch, out=scratch)  # w p = p - v p, exact (v in {0, 1})
                q_in = wp.sum(1, keepdim=True)
            else:  # the Dice only needs q to float32 absolute precision
                q_in = 1.0 - scratch.sum(1, keepdim=True)
            q = torch.where(informative > 0, q_in, 1.0)  # candidate probability
        if want_mce:
            low = (q < UNDERFLOW).squeeze(1)
            log_q = torch.log(q)
            if bool(low.any()):  # exact on these voxels only
                low_idx, exact, r_rows = exact_candidate_rows(x, 1.0 - v, low)
                log_q = log_q.squeeze(1).index_put(low_idx, exact).unsqueeze(1)
            mce = (-log_q).squeeze(1)
        s_v = v.sum(2) if (want_mdice or want_edice) else None  # per channel: sum v
        if want_mdice:
            mq = informative * q
            # I = sum_i w M q = sum M q - sum v M q; T sums: sum w M = sum M - sum v (v = 1 => M = 1)
            inter = mq.sum(2) - torch.bmm(v, mq.transpose(1, 2)).squeeze(2)
            mdice = torch.stack([inter, s_vp + inter, informative.sum(2) - s_v])
        if want_ece:
            lg = torch.log1p(p) if eps == 1.0 else torch.log(p + eps)
            ece = lg.mul_(v).sum(1)
        if want_edice:
            s_pm = torch.bmm(p, informative.transpose(1, 2)).squeeze(2)  # sum M p
            # sum v p per channel as B*C row dot products (no temporary)
            s_vp_e = torch.bmm(v.view(n_b * n_cls, 1, -1), p.view(n_b * n_cls, -1, 1)).view(n_b, n_cls)
            edice = torch.stack([s_vp_e, s_pm, s_v])
        ctx.scratch = scratch  # a dead temporary, reused for the gradient buffer (not a saved tensor)
        ctx.low_idx, ctx.r_rows = low_idx, r_rows
        ctx.save_for_backward(p, v, q, informative)
        return mce, ece, mdice, edice

    @staticmethod
    def backward(ctx, g_mce: Tensor, g_ece: Tensor, g_mdice: Tensor, g_edice: Tensor):  # type: ignore[override]
        want_mce, want_ece, want_mdice, want_edice = ctx.want
        p, v, q, informative = ctx.saved_tensors
        low_idx = ctx.low_idx
        use_mce = want_mce and g_mce is not None
        use_ece = want_ece and g_ece is not None
        use_mdice = want_mdice and g_mdice is not None
        use_edice = want_edice and g_edice is not None
        if not (use_mce or use_ece or use_mdice or use_edice):
            return None, None, None, None
        b_, c_ = p.shape[0], p.shape[1]
        a = p.new_zeros(b_, c_, 1)  # per-channel coefficient of v
        b = p.new_zeros(b_, 1, p.shape[2])  # per-voxel coefficient of v
        if use_mce:  # d(-log q)/dx = g (p - w p / q), added in logit space below (no cancellation)
            iq = torch.where(informative > 0, g_mce.unsqueeze(1) / q, 0.0)
            if low_idx is not None:  # handled exactly below
                iq = iq.squeeze(1).index_put(low_idx, iq.new_zeros(())).unsqueeze(1)
        if use_mdice:
            g_i, g_sp = g_mdice[0], g_mdice[1]  # (B, C)
            h = (g_i + g_sp).unsqueeze(1)  # (B, 1, C)
            # candidate channels read q: dL/dq = sum_c w_c (gI_c + gSP_c) = sum h - sum v h
            g_q = (h.sum(2, keepdim=True) - torch.bmm(h, v)) * informative
            # dL/dp_j = M [v_j gSP_j + w_j g_q]  ==  v_j (gSP_j - g_q) + M g_q
            a = a + g_sp.unsqueeze(2)
            b = b - g_q
        if use_edice:
            a = a + g_edice[0].unsqueeze(2)  # d sum v p / dp = v
        scratch, ctx.scratch = ctx.scratch, None  # a second backward (retain_graph) allocates
        if use_mdice:
            g_p = torch.add(a, b, out=scratch) if scratch is not None else a + b  # (B, C, N)
        else:  # a per-channel coefficient only
            g_p = torch.mul(v, a, out=scratch) if scratch is not None else v * a
        if use_ece:
            g_p.addcdiv_(g_ece.unsqueeze(1).expand_as(g_p), p + ctx.eps)
        if use_mdice or use_ece:
            g_p.mul_(v)
        if use_edice:
            g_p.baddbmm_(g_edice[1].unsqueeze(2), informative)  # d sum M p / dp = M
        grad = softmax_backward(g_p, p)
        if use_mce:  # g (p - w p / q) = p (g / q) (q - w), w = 1 - v: exact for a tiny q too
            grad.addcmul_(p, torch.where(v > 0, q, q - 1.0).mul_(iq))
        if use_mce and low_idx is not None:
            p_rows = p.permute(0, 2, 1)[low_idx]
            rows = (p_rows - ctx.r_rows) * g_mce[low_idx].unsqueeze(1)
            grad.permute(0, 2, 1).index_put_(low_idx, rows, accumulate=True)
        return grad, None, None, None


class _MarginalCEFunction(torch.autograd.Function):
    """Marginal CE alone, per voxel (B, N): few passes, few fresh allocations.

    Forward: ``p = softmax(x)``, ``w = [t != 0]``, ``q = sum_c w_c p_c`` (set to 1 where every
    class is a candidate); backward: ``p (a - w b)`` with ``a = g``, ``b = g / q`` on informative
    voxels (0 elsewhere), written into the forward's scratch buffer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor):  # type: ignore[override]
        n_cls = x.shape[1]
        p = torch.softmax(x, 1)
        w = torch.sign(t)  # [t != 0] for t in [0, 1]
        n_cand = torch.bmm(w.new_ones(x.shape[0], 1, n_cls), w)  # (B, 1, N), one GEMM read of w
        informative = n_cand < n_cls
        buf = w.mul_(p)  # w p, in place
        q = torch.where(informative, buf.sum(1, keepdim=True), 1.0)
        log_q = torch.log(q)
        low = (q < UNDERFLOW).squeeze(1)
        low_idx = r_rows = None
        if bool(low.any()):
            low_idx, exact, r_rows = exact_candidate_rows(x, t, low)
            log_q = log_q.squeeze(1).index_put(low_idx, exact).unsqueeze(1)
        ctx.low_idx, ctx.r_rows, ctx.buf = low_idx, r_rows, buf  # scratch reused for the gradient
        ctx.save_for_backward(p, t, q, informative)
        return (-log_q).squeeze(1)

    @staticmethod
    def backward(ctx, g_out: Tensor):  # type: ignore[override]
        p, t, q, informative = ctx.saved_tensors
        buf = ctx.buf  # holds w p from the forward
        if buf is None:  # a second backward (retain_graph): rebuild it
            buf = torch.sign(t).mul_(p)
        ctx.buf = None
        g = g_out.unsqueeze(1)
        a = torch.where(informative, g, 0.0)
        b = torch.where(informative, g / q, 0.0)
        if ctx.low_idx is not None:
            a = a.squeeze(1).index_put(ctx.low_idx, a.new_zeros(())).unsqueeze(1)
            b = b.squeeze(1).index_put(ctx.low_idx, b.new_zeros(())).unsqueeze(1)
        # d(-log q)/dx = p - w p / q, as a p - b (w p), in place in the scratch buffer
        grad = buf.mul_(-b).addcmul_(p, a)
        if ctx.low_idx is not None:
            p_rows = p.permute(0, 2, 1)[ctx.low_idx]
            rows = (p_rows - ctx.r_rows) * g_out[ctx.low_idx].unsqueeze(1)
            grad.permute(0, 2, 1).index_put_(ctx.low_idx, rows, accumulate=True)
        return grad, None


class _ExclusionCEFunction(torch.autograd.Function):
    """Exclusion CE alone, per voxel (B, N): ``sum_c [t_c = 0] log(p_c + eps)``."""

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, eps: float):  # type: ignore[override]
        p = torch.softmax(x, 1)
        v = torch.empty_like(p)
        torch.eq(t, 0, out=v)
        buf = torch.log1p(p) if eps == 1.0 else torch.log(p + eps)
        out = buf.mul_(v).sum(1)
        ctx.eps, ctx.buf = eps, buf  # scratch reused for the gradient
        ctx.save_for_backward(p, v)
        return out

    @staticmethod
    def backward(ctx, g_out: Tensor):  # type: ignore[override]
        p, v = ctx.saved_tensors
        buf = ctx.buf if ctx.buf is not None else torch.empty_like(p)
        ctx.buf = None  # a second backward (retain_graph) must not overwrite the first gradient
        # dL/dp = v / (p + eps) * g, then through the softmax (fused)
        torch.add(p, ctx.eps, out=buf)
        torch.div(v, buf, out=buf)
        return softmax_backward(buf.mul_(g_out.unsqueeze(1)), p), None, None



# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------


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


def check_eps(eps: float) -> float:
    """The exclusion CE's epsilon as a float; ValueError unless it is finite and > 0."""
    return check_positive("eps", eps)  # log(p + eps) is -inf at p = 0 with eps = 0


def region_dice(
    sums: Tensor,
    overlap: bool,
    include_background: bool,
    batch: bool,
    smooth_nr: float,
    smooth_dr: float,
    class_weight: Tensor | None,
    reduction: str,
    n_spatial: int,
) -> Tensor:
    """Reduced Dice loss from region sums ``(intersection, prediction sum, target sum)`` of shape (3, B, C).

    ``overlap=False``: ``1 - (2 I + smooth_nr) / (P + T + smooth_dr)`` (marginal Dice, MONAI's
    DiceLoss); ``overlap=True``: ``(2 I + smooth_nr) / (P + T + smooth_dr)`` (exclusion Dice, the
    overlap itself is the loss). Channel 0 is dropped unless ``include_background``, the batch is
    summed first with ``batch``, then ``class_weight`` multiplies the (B, C) terms and
    ``reduction`` applies (``"none"``: (B, C, 1, ...) with ``n_spatial`` ones).
    """
    inter, pred, tgt = sums[0], sums[1], sums[2]
    if not include_background:
        inter, pred, tgt = inter[:, 1:], pred[:, 1:], tgt[:, 1:]
    if batch:
        inter, pred, tgt = inter.sum(0, keepdim=True), pred.sum(0, keepdim=True), tgt.sum(0, keepdim=True)
    if overlap:
        f = (2.0 * inter + smooth_nr) / (pred + tgt + smooth_dr)
    else:
        f = dice_from_sums(inter, pred, tgt, smooth_nr, smooth_dr)
    return reduce_channelwise(apply_class_weight(f, class_weight), reduction, n_spatial)


class _RegionDiceLoss(PartialLabelLoss):
    """MONAI-style Dice arguments, shared by the marginal and exclusion Dice losses."""

    overlap = False

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

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss from logits ``input`` and the ``<0,p,1>`` ``target`` (same shape)."""
        check_input_target(input, target, type(self).__name__)
        _, _, mdice, edice = marginal_softmax_stats(input, target, mdice=not self.overlap, edice=self.overlap)
        return region_dice(
            edice if self.overlap else mdice,
            self.overlap,
            self.include_background,
            self.batch,
            self.smooth_nr,
            self.smooth_dr,
            self.class_weight,
            self.reduction,
            input.ndim - 2,
        )


class MarginalDiceLoss(_RegionDiceLoss):
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
        self.eps = check_eps(eps)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss from logits ``input`` and the ``<0,p,1>`` ``target`` (same shape)."""
        check_input_target(input, target, type(self).__name__)
        _, ece, _, _ = marginal_softmax_stats(input, target, ece=True, eps=self.eps)
        return reduce_voxelwise(ece, self.reduction, input.shape[2:])


class ExclusionDiceLoss(_RegionDiceLoss):
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

    overlap = True

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
        super().__init__(reduction=reduction, weight=weight)
        self.include_background = bool(include_background)
        self.smooth_nr = check_nonnegative("smooth_nr", smooth_nr)
        self.smooth_dr = check_nonnegative("smooth_dr", smooth_dr)
        self.batch = bool(batch)
        self.lambda_marginal = check_nonnegative("lambda_marginal", lambda_marginal)
        self.lambda_exclusion = check_nonnegative("lambda_exclusion", lambda_exclusion)
        if self.lambda_marginal == 0 and self.lambda_exclusion == 0:
            raise ValueError("lambda_marginal and lambda_exclusion are both 0: the loss would be identically 0.")
        self.eps = check_eps(eps)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss from logits ``input`` and the ``<0,p,1>`` ``target`` (same shape)."""
        check_input_target(input, target, type(self).__name__)
        m, e = self.lambda_marginal > 0, self.lambda_exclusion > 0
        mce, ece, msum, esum = marginal_softmax_stats(input, target, mce=m, ece=e, mdice=m, edice=e, eps=self.eps)
        n_spatial = input.ndim - 2
        common = (self.include_background, self.batch)
        total = input.new_zeros((), dtype=compute_dtype(input))
        if m:
            ce = reduce_voxelwise(mce, self.reduction, input.shape[2:])
            dice = region_dice(msum, False, *common, self.smooth_nr, self.smooth_dr, self.class_weight, self.reduction, n_spatial)
            total = total + self.lambda_marginal * (ce + dice)
        if e:  # the exclusion Dice takes no numerator smoothing (it would reward mass elsewhere)
            ce = reduce_voxelwise(ece, self.reduction, input.shape[2:])
            dice = region_dice(esum, True, *common, 0.0, self.smooth_dr, self.class_weight, self.reduction, n_spatial)
            total = total + self.lambda_exclusion * (ce + dice)
        return total
