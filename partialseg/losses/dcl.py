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

Implementation. :func:`dcl_per_voxel` is the family's one entry point (compatible loss, prior
loss, and both readings of the conditional loss): it chooses the compiled CPU kernel
(:mod:`partialseg.losses._native`) or the torch path below, which give the same numbers. The
torch path is a probability-domain reference with plain autograd (CompNet's summed maps, the
prior loss) and a logit-domain autograd function with a hand-written backward (the compatible
loss).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from partialseg._checks import check_option
from partialseg.losses import _native
from partialseg.losses._functional import (
    UNDERFLOW,
    candidate_mask,
    check_input_target,
    check_not_empty,
    exact_candidate_rows,
    flat,
    float_mask,
    nonfinite_marker,
    reduce_voxelwise,
    safe_log,
    sample_unknown_classes,
    softmax_backward,
)
from partialseg.losses.base import PartialLabelLoss, check_nonnegative, check_positive

__all__ = [
    "CompatibleLoss",
    "PriorLoss",
    "ConditionalCompatibleLoss",
    "conditional_compatible_terms",
    "dcl_per_voxel",
    "compatible_from_logits",
    "compatible_terms_from_probs",
    "prior_terms_from_probs",
    "prior_per_voxel",
    "POSITIVE_BASES",
    "NEGATIVE_BASES",
]

POSITIVE_BASES = ("ce", "dice", "ta_ce", "ta_dice")
NEGATIVE_BASES = ("ce", "dice", "ex_ce", "ex_dice")

# log(1 - p) below this (1 - p < 1e-2) is recomputed from the logits (DCL negative CE): float32 p
# carries ~6e-8 absolute error, i.e. < 6e-6 relative error in 1 - p above it
_LOG_SATURATED = math.log(1e-2)


def _bases(name: str, value: str | Sequence[str] | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        check_option(item, allowed, f"{name} base")
    if len(set(items)) != len(items):
        raise ValueError(f"{name} bases repeat: {list(items)}.")
    return items


def _compatible_args(positive, negative, alpha_pos, alpha_neg, eps) -> tuple[tuple[str, ...], tuple[str, ...], float, float, float]:
    """The compatible loss's checked arguments, shared by :class:`CompatibleLoss` and :class:`ConditionalCompatibleLoss`."""
    positive, negative = _bases("positive", positive, POSITIVE_BASES), _bases("negative", negative, NEGATIVE_BASES)
    if not positive and not negative:
        raise ValueError("CompatibleLoss needs at least one positive or negative base, got none.")
    return positive, negative, check_positive("alpha_pos", alpha_pos), check_positive("alpha_neg", alpha_neg), check_positive("eps", eps)


# ----------------------------------------------------------------------------------------------
# the family's one entry point: compiled kernel or torch
# ----------------------------------------------------------------------------------------------


def dcl_per_voxel(
    input: Tensor,
    target: Tensor | None,
    positive: Sequence[str] = (),
    negative: Sequence[str] = (),
    alpha_pos: float = 1.0,
    alpha_neg: float = 1.0,
    eps: float = 1.0,
    cond_label: Tensor | None = None,
    prior_negative: Sequence[str] = ("ce",),
    prior_weight: float = 0.0,
) -> Tensor:
    """Per-voxel (B, N) DCL loss from logits: ``L_comp`` (Eq. 2) plus ``prior_weight * L_prior`` (Eq. 7).

    The one place where this family chooses its implementation: the compiled CPU kernel for
    float32 (and half, computed in float32) CPU tensors when it builds, else torch (CUDA,
    float64, ``PARTIALSEG_NATIVE=0``). Both give the same numbers, and both return NaN at a voxel
    whose logits are NaN / +inf.

    Args:
        input: (B, K, *spatial) logits, softmax over K.
        target: the ``<0,p,1>`` map of the compatible loss: (B, K, *spatial) (K classes, or
            CompNet's 2m maps read as classes), or (B, K / 2, *spatial) for CompNet's 2m maps
            summed per class (``z_cap + z_delta``, Eq. 6 as written), or None (prior loss alone).
        positive, negative, alpha_pos, alpha_neg, eps: as in :class:`CompatibleLoss`.
        cond_label: (B, K / 2, *spatial) conditional labels of the prior loss (K = 2m maps).
        prior_negative: the prior loss's ``f_N`` bases.
        prior_weight: weight of the prior loss (0: none).

    Returns:
        (B, N) per-voxel loss, N the number of voxels.

    Example:
        >>> import torch
        >>> x = torch.zeros(1, 3, 1)
        >>> t = torch.tensor([[[0.5], [0.5], [0.0]]])  # class 2 known absent
        >>> round(dcl_per_voxel(x, t, (), ("ce",)).item(), 4)  # -log(1 - 1/3)
        0.4055
    """
    x = flat(input)
    t = flat(target, x.dtype, contiguous=False) if target is not None else None  # the kernel reads channels-last
    summed = t is not None and t.shape[1] != x.shape[1]
    yc = flat(cond_label, x.dtype) if (cond_label is not None and prior_weight > 0) else None
    if t is None and yc is None:
        raise ValueError("dcl_per_voxel: nothing to compute (no target, and no cond_label with prior_weight > 0).")
    positive, negative = tuple(positive), tuple(negative)
    if _native.usable(x):  # compiled CPU kernel: the loss and its gradient in one pass
        prior = _native.prior_weights(prior_negative, prior_weight)
        if t is None:  # the kernel with no compatible base: the prior terms alone
            return _native.compatible(x, yc, (), (), 1.0, 1.0, eps, yc, prior)
        if summed:  # softmax over the 2m maps, compatible terms on their per-class sums, prior terms
            return _native.compatible(x, t, positive, negative, alpha_pos, alpha_neg, eps, yc, prior)
        out = _native.compatible(x, t, positive, negative, alpha_pos, alpha_neg, eps)
        return out if yc is None else out + _native.compatible(x, yc, (), (), 1.0, 1.0, eps, yc, prior)
    marker = nonfinite_marker(x)  # (B, N): 0, NaN at a voxel with a NaN / +inf logit
    t = t.contiguous() if t is not None else None
    if summed:  # probability-domain reference, plain autograd
        probs = torch.softmax(x, 1)
        m = t.shape[1]
        out = compatible_terms_from_probs((probs[:, :m] + probs[:, m:]).clamp(0, 1), t, positive, negative, alpha_pos, alpha_neg, eps)
        if yc is not None:
            out = out + prior_weight * prior_terms_from_probs(probs, yc, prior_negative, eps)
        return out + marker
    out = _compatible_torch(x, t, positive, negative, alpha_pos, alpha_neg, eps) if t is not None else None
    if yc is not None:
        prior = prior_terms_from_probs(torch.softmax(x, 1), yc, prior_negative, eps)
        prior = prior * prior_weight if prior_weight != 1.0 else prior
        out = prior if out is None else out + prior
    return out + marker


def compatible_from_logits(
    x: Tensor, target: Tensor, positive: Sequence[str], negative: Sequence[str], alpha_pos: float, alpha_neg: float, eps: float = 1.0
) -> Tensor:
    """Per-voxel DCL compatible loss (B, N) from logits with a hand-written backward (see :func:`dcl_per_voxel`).

    Args:
        x: (B, C, *spatial) logits; computed in float32 (float64 stays float64).
        target: (B, C, *spatial) ``<0,p,1>`` map.
        positive: positive bases (see :data:`POSITIVE_BASES`).
        negative: negative bases (see :data:`NEGATIVE_BASES`).
        alpha_pos: weight of L_P.
        alpha_neg: weight of L_N.
        eps: epsilon of ``ex_ce``.

    Returns:
        (B, N) per-voxel loss.
    """
    return dcl_per_voxel(x, target, positive, negative, alpha_pos, alpha_neg, eps)


# ----------------------------------------------------------------------------------------------
# torch implementation: probability-domain reference (plain autograd; PriorLoss, CompNet's summed
# maps, the tests) and the compatible loss from logits with a hand-written backward
# ----------------------------------------------------------------------------------------------


def compatible_terms_from_probs(
    probs: Tensor,
    target: Tensor,
    positive: Sequence[str],
    negative: Sequence[str],
    alpha_pos: float = 1.0,
    alpha_neg: float = 1.0,
    eps: float = 1.0,
) -> Tensor:
    """Per-voxel DCL compatible loss ``alpha_pos L_P + alpha_neg L_N`` (Eq. 2) from probabilities.

    Args:
        probs: (B, C, *spatial) class probabilities (not logits); they need not sum to 1
            (CompNet's ``z_cap + z_delta``), but each must lie in [0, 1].
        target: (B, C, *spatial) ``<0,p,1>`` map.
        positive: positive bases, a subset of ``("ce", "dice", "ta_ce", "ta_dice")`` (Eq. 11, 13, 15, 16).
        negative: negative bases, a subset of ``("ce", "dice", "ex_ce", "ex_dice")`` (Eq. 12, 14, 17, 18).
        alpha_pos: weight of ``L_P``.
        alpha_neg: weight of ``L_N``.
        eps: the exclusive bases' epsilon (Eq. 17), 1 in the paper.

    Returns:
        (B, *spatial) per-voxel loss (summed over classes), in the dtype of ``probs``.
    """
    k1 = target == 1
    k0 = target == 0
    zero = probs.new_zeros(())
    out = probs.new_zeros(probs.shape[:1] + probs.shape[2:])
    cand = candidate_mask(target)
    q = (probs * cand).sum(1)
    has1 = k1.any(1)
    for base in positive:
        if base == "ce":  # Eq. 11
            out = out + alpha_pos * torch.where(k1, -safe_log(probs), zero).sum(1)
        elif base == "dice":  # Eq. 13
            out = out + alpha_pos * torch.where(k1, 1 - 2 * probs / (1 + probs), zero).sum(1)
        elif base == "ta_ce":  # Eq. 15: -log of the candidate (merged) probability
            out = out + alpha_pos * -safe_log(q)
        elif base == "ta_dice":  # Eq. 16
            out = out + alpha_pos * (1 - 2 * q / (q + 1))
    if negative:
        excl = sample_unknown_classes(target) & k0
        s_ex = (probs * excl).sum(1)
    for base in negative:
        if base == "ce":  # Eq. 12
            out = out + alpha_neg * torch.where(k0, -safe_log(1 - probs), zero).sum(1)
        elif base == "dice":  # Eq. 14
            out = out + alpha_neg * torch.where(k0, 2 * probs / (1 + probs), zero).sum(1)
        elif base == "ex_ce":  # Eq. 17
            term = torch.where(k0, torch.log(probs + eps), zero).sum(1)
            out = out + alpha_neg * (term + torch.where(has1, torch.log(s_ex + eps), zero))
        elif base == "ex_dice":  # Eq. 18
            term = torch.where(k0, 2 * probs / (probs + 1), zero).sum(1)
            out = out + alpha_neg * (term + torch.where(has1, 2 * s_ex / (s_ex + 1), zero))
    return out


def prior_terms_from_probs(probs: Tensor, cond_label: Tensor, negative: Sequence[str], eps: float = 1.0) -> Tensor:
    """Per-voxel DCL prior loss (Eq. 7) from the 2m CompNet probabilities.

    Args:
        probs: (B, 2m, *spatial) probabilities, intersection channels first, extra channels last.
        cond_label: (B, m, *spatial) conditional labels ``y^c`` (``<0,p,1>``).
        negative: the ``f_N`` bases (``"ce"``: ``-log(1-a)``, ``"dice"``: ``2a/(1+a)``,
            ``"ex_ce"``: ``log(a+eps)``, ``"ex_dice"``: ``2a/(a+1)``), summed.
        eps: epsilon of ``"ex_ce"``.

    Returns:
        (B, *spatial) per-voxel loss.
    """
    m = cond_label.shape[1]
    z_cap, z_delta = probs[:, :m], probs[:, m:]
    zero = probs.new_zeros(())
    incl = cond_label == 0  # inclusiveness: the intersection is 0 where y^c is 0
    excl = cond_label == 1  # exclusiveness: the extra part is 0 where y^c is 1
    out = probs.new_zeros(probs.shape[:1] + probs.shape[2:])
    for base in negative:
        if base == "ce":
            f_cap, f_delta = -safe_log(1 - z_cap), -safe_log(1 - z_delta)
        elif base == "ex_ce":
            f_cap, f_delta = torch.log(z_cap + eps), torch.log(z_delta + eps)
        else:  # "dice" and "ex_dice" share f_N(a, 0) = 2a / (a + 1)
            f_cap, f_delta = 2 * z_cap / (1 + z_cap), 2 * z_delta / (1 + z_delta)
        out = out + torch.where(incl, f_cap, zero).sum(1) + torch.where(excl, f_delta, zero).sum(1)
    return out




def _accumulate(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total.add_(term)


class _CompatibleFunction(torch.autograd.Function):
    """DCL compatible loss per voxel from logits: forward (B, N), backward by hand.

    Gradients are gathered with respect to the probabilities (``g_p``, then one fused softmax
    backward) except for the log terms, which are written in logit space (``g_x``) so that they
    stay exact when probabilities underflow.
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, positive: tuple[str, ...], negative: tuple[str, ...], a_pos: float, a_neg: float, eps: float):  # type: ignore[override]
        n_cls = x.shape[1]
        p = torch.softmax(x, 1)
        out = p.new_zeros((x.shape[0], x.shape[2]))
        log_p = torch.log_softmax(x, 1) if "ce" in positive else None
        ce_low = None
        k1 = float_mask(t, 1.0, p) if ("ce" in positive or "dice" in positive or "ex_ce" in negative or "ex_dice" in negative) else None
        k0 = float_mask(t, 0.0, p) if negative else None
        w = q = informative = low_idx = r_rows = excl = s_ex = has1 = None
        if "ta_ce" in positive or "ta_dice" in positive:
            w = float_mask(t, 0.0, p, equal=False)
            n_cand = w.sum(1, keepdim=True)
            informative = (n_cand < n_cls) & (n_cand > 0)  # an all-zero voxel carries no information
            q = torch.where(informative, (p * w).sum(1, keepdim=True), 1.0)
        if "ex_ce" in negative or "ex_dice" in negative:
            has1 = (k1.sum(1, keepdim=True) > 0).to(p.dtype)
            excl = sample_unknown_classes(t).to(p.dtype) * k0
            s_ex = (p * excl).sum(1, keepdim=True)
        for base in positive:
            if base == "ce":  # Eq. 11 (exact log-softmax)
                out -= a_pos * (k1 * log_p).sum(1)
            elif base == "dice":  # Eq. 13
                out += a_pos * (k1 * ((1 - p) / (1 + p))).sum(1)
            elif base == "ta_ce":  # Eq. 15: -log q, exact where q underflows
                log_q = torch.log(q)
                low = (q < UNDERFLOW).squeeze(1)
                if bool(low.any()):
                    low_idx, exact, r_rows = exact_candidate_rows(x, w, low)
                    log_q = log_q.squeeze(1).index_put(low_idx, exact).unsqueeze(1)
                out -= a_pos * log_q.squeeze(1)
            elif base == "ta_dice":  # Eq. 16
                out += a_pos * ((1 - q) / (1 + q)).squeeze(1)
        for base in negative:
            if base == "ce":  # Eq. 12: -log(1 - p) at the zeros
                lg = torch.clamp(p, max=1.0 - 2.0**-24).neg_().log1p_().mul_(k0)  # finite: p = 1 reads as saturated
                # 1 - p < 1e-2 (a confident mistake on a known-absent class): float32 p leaves too
                # few digits in 1 - p, so those voxels are recomputed from the logits in log space
                sat = (lg.amin(1) < _LOG_SATURATED)
                ce_low = sat.nonzero(as_tuple=True) if bool(sat.any()) else None
                term = lg.sum(1)
                if ce_low is not None:
                    rows = _neg_ce_rows(x.permute(0, 2, 1)[ce_low], k0.permute(0, 2, 1)[ce_low])
                    term = term.index_put(ce_low, -rows)
                out -= a_neg * term
            elif base == "dice":  # Eq. 14
                out += a_neg * (k0 * (2 * p / (1 + p))).sum(1)
            elif base == "ex_ce":  # Eq. 17
                out += a_neg * ((k0 * torch.log(p + eps)).sum(1) + (has1 * torch.log(s_ex + eps)).squeeze(1))
            elif base == "ex_dice":  # Eq. 18
                out += a_neg * ((k0 * (2 * p / (p + 1))).sum(1) + (has1 * (2 * s_ex / (s_ex + 1))).squeeze(1))
        ctx.positive, ctx.negative, ctx.a_pos, ctx.a_neg, ctx.eps = positive, negative, a_pos, a_neg, eps
        ctx.low_idx, ctx.r_rows, ctx.ce_low = low_idx, r_rows, ce_low
        saved = (p, log_p, k1, k0, w, q, informative, excl, s_ex, has1, x if ce_low is not None else None)
        ctx.has = tuple(v is not None for v in saved)
        ctx.save_for_backward(*(v for v in saved if v is not None))
        return out

    @staticmethod
    def backward(ctx, g_out: Tensor):  # type: ignore[override]
        it = iter(ctx.saved_tensors)
        p, log_p, k1, k0, w, q, informative, excl, s_ex, has1, x = (next(it) if h else None for h in ctx.has)
        a_pos, a_neg, eps = ctx.a_pos, ctx.a_neg, ctx.eps
        g = g_out.unsqueeze(1)
        g_p = None  # dL/dp (probability space)
        g_x = None  # terms written directly in logit space
        for base in ctx.positive:
            if base == "ce":  # d(-sum_k log p_k)/dx = n1 p - k1
                n1 = k1.sum(1, keepdim=True)
                g_x = _accumulate(g_x, torch.addcmul(-k1, p, n1).mul_(a_pos * g))
            elif base == "dice":
                g_p = _accumulate(g_p, k1 * (-2 * a_pos) / (1 + p) ** 2 * g)
            elif base == "ta_ce":  # dL/dp_j = -w_j / q on informative voxels, exact rows below
                iq = torch.where(informative, (a_pos * g) / q, 0.0)
                if ctx.low_idx is not None:
                    iq = iq.squeeze(1).index_put(ctx.low_idx, iq.new_zeros(())).unsqueeze(1)
                g_p = _accumulate(g_p, w * (-iq))
            elif base == "ta_dice":
                gq = torch.where(informative, -2 * a_pos / (1 + q) ** 2 * g, 0.0)
                g_p = _accumulate(g_p, w * gq)
        for base in ctx.negative:
            if base == "ce":
                # term c: w_c (delta_cj - p_j), w_c = p_c / (1 - p_c)
                wgt = torch.clamp(p, max=1.0 - 2.0**-24).neg_().add_(1.0)  # 1 - p, > 0 (saturated rows: below)
                wgt = torch.div(p, wgt, out=wgt).mul_(k0)
                term = wgt.addcmul_(p, wgt.sum(1, keepdim=True), value=-1)
                if ctx.ce_low is not None:  # exact rows where 1 - p underflows
                    with torch.enable_grad():
                        xr = x.permute(0, 2, 1)[ctx.ce_low].detach().requires_grad_(True)
                        rows = _neg_ce_rows(xr, k0.permute(0, 2, 1)[ctx.ce_low])
                        (g_rows,) = torch.autograd.grad(rows.sum(), xr)
                    term.permute(0, 2, 1).index_put_(ctx.ce_low, g_rows)
                g_x = _accumulate(g_x, term.mul_(a_neg * g))
            elif base == "dice":
                g_p = _accumulate(g_p, k0 * (2 * a_neg) / (1 + p) ** 2 * g)
            elif base == "ex_ce":
                term = k0 / (p + eps) + excl * (has1 / (s_ex + eps))
                g_p = _accumulate(g_p, term.mul_(a_neg * g))
            elif base == "ex_dice":
                term = k0 * 2 / (p + 1) ** 2 + excl * (has1 * 2 / (s_ex + 1) ** 2)
                g_p = _accumulate(g_p, term.mul_(a_neg * g))
        grad = g_x
        if g_p is not None:
            grad = _accumulate(grad, softmax_backward(g_p, p))
        if ctx.low_idx is not None:
            p_rows = p.permute(0, 2, 1)[ctx.low_idx]
            rows = (p_rows - ctx.r_rows) * (a_pos * g_out[ctx.low_idx]).unsqueeze(1)
            grad.permute(0, 2, 1).index_put_(ctx.low_idx, rows, accumulate=True)
        return grad, None, None, None, None, None, None


def _count_and_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per voxel, the number of set entries of a (B, C, N) 0/1 mask and the sum of their class
    indices (the index itself when there is one), in one GEMM: two (B, N) float tensors."""
    n_cls = mask.shape[1]
    rows = torch.stack([torch.ones(n_cls, dtype=mask.dtype, device=mask.device), torch.arange(n_cls, dtype=mask.dtype, device=mask.device)])
    out = torch.matmul(rows, mask)  # (B, 2, N)
    return out[:, 0], out[:, 1]


def _neg_ce_rows(xs: Tensor, k0s: Tensor) -> Tensor:
    """``-sum_c k0_c log(1 - p_c)`` for a few rows (k, C) of logits, in log space (exact)."""
    n_cls = xs.shape[1]
    eye = torch.eye(n_cls, dtype=torch.bool, device=xs.device)
    others = xs.unsqueeze(1).expand(-1, n_cls, n_cls).masked_fill(eye, float("-inf")).logsumexp(2)
    return -(k0s * (others - xs.logsumexp(1, keepdim=True))).sum(1)




def _compatible_torch(
    xb: Tensor, tb: Tensor, positive: tuple[str, ...], negative: tuple[str, ...], alpha_pos: float, alpha_neg: float, eps: float
) -> Tensor:
    """The torch path of the compatible loss on (B, C, N) logits and target: (B, N) per voxel."""
    out = None
    if "ce" in positive:
        # Eq. 11 is torch's cross-entropy on the voxels holding a 1 (at most one per voxel in a
        # <0,p,1> map): use its fused kernel, ignoring voxels without a 1
        count, index = _count_and_index(float_mask(tb, 1.0, xb))
        if float(count.max()) <= 1.0:  # at most one 1 per voxel (always so in a <0,p,1> map)
            idx = torch.where(count > 0, index.long(), -100)
            out = F.cross_entropy(xb, idx, ignore_index=-100, reduction="none")
            if alpha_pos != 1.0:
                out = out * alpha_pos
            positive = tuple(b for b in positive if b != "ce")
    if positive or negative:
        rest = _CompatibleFunction.apply(xb, tb, positive, negative, float(alpha_pos), float(alpha_neg), float(eps))
        out = rest if out is None else out + rest
    return out


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------


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
        self.positive, self.negative, self.alpha_pos, self.alpha_neg, self.eps = _compatible_args(positive, negative, alpha_pos, alpha_neg, eps)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Compute the loss from logits ``input`` and the ``<0,p,1>`` ``target`` (same shape)."""
        check_input_target(input, target, type(self).__name__)
        per_voxel = dcl_per_voxel(input, target, self.positive, self.negative, self.alpha_pos, self.alpha_neg, self.eps)
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
    check_not_empty(input.shape, name)
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
        per_voxel = dcl_per_voxel(input, None, eps=self.eps, cond_label=cond_label, prior_negative=self.negative, prior_weight=1.0)
        return reduce_voxelwise(per_voxel, self.reduction, input.shape[2:])


def prior_per_voxel(input: Tensor, cond_label: Tensor, negative: Sequence[str], weight: float, eps: float) -> Tensor:
    """``weight * L_prior`` per voxel, (B, N), from CompNet logits (see :func:`dcl_per_voxel`)."""
    return dcl_per_voxel(input, None, eps=eps, cond_label=cond_label, prior_negative=negative, prior_weight=weight)


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
        self.positive, self.negative, self.alpha_pos, self.alpha_neg, self.eps = _compatible_args(positive, negative, alpha_pos, alpha_neg, eps)
        self.prior_weight = check_nonnegative("prior_weight", prior_weight)
        self.reading = check_option(reading, ("sum", "maps"), "reading")

    def forward(self, input: Tensor, target: Tensor, cond_label: Tensor) -> Tensor:
        """Compute the loss from CompNet logits, the target ``z`` and the conditional labels."""
        _check_conditional(input, cond_label, type(self).__name__)
        if target.shape != input.shape:
            raise ValueError(f"{type(self).__name__}: target must match input {tuple(input.shape)}, got {tuple(target.shape)}.")
        if self.reading == "sum":  # Eq. 6 as written: the compatible loss of the summed maps, per class
            m = cond_label.shape[1]
            target = (target[:, :m] + target[:, m:]).clamp(0, 1)
        per_voxel = dcl_per_voxel(
            input,
            target,
            self.positive,
            self.negative,
            self.alpha_pos,
            self.alpha_neg,
            self.eps,
            cond_label,
            self.negative or ("ce",),
            self.prior_weight,
        )
        return reduce_voxelwise(per_voxel, self.reduction, input.shape[2:])
