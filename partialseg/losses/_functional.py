"""Shared primitives of the partial-label losses.

Everything here works on the ``<0,p,1>`` target representation (see ``docs/data_format.md``):
for a voxel ``i`` and a class ``c``, ``target[b, c, i] == 1`` means "known member",
``== 0`` means "known non-member" and any other value (``0 < v < 1``) means "unknown".

Two views of one target are used by the losses:

* the **known masks** ``K1 = (t == 1)`` and ``K0 = (t == 0)`` (DCL's ``1[y = 1]``, ``1[y = 0]``);
* the **candidate set** ``S_i = {c : t_c > 0}``: the classes voxel ``i`` may belong to. For a
  labelled voxel it is its class, for a partially labelled voxel it is the merged class of the
  marginal loss (the classes unknown there), for an unlabelled voxel it is every class. A voxel
  whose entries are all 0 is contradictory input; the marginal CE takes its candidate set as
  every class (no information) so that it stays finite, the other terms read it as written.

The module holds a probability-domain reference implementation (plain autograd, used by the
conditional DCL losses and the tests) and custom :class:`torch.autograd.Function` s with
hand-written backward passes for the hot paths (logits in, one shared softmax, masks applied
after the activation, all sums in float32 or float64).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from partialseg.losses import _native

__all__ = [
    "POSITIVE_BASES",
    "NEGATIVE_BASES",
    "compute_dtype",
    "check_input_target",
    "reduce_voxelwise",
    "reduce_channelwise",
    "dice_from_sums",
    "candidate_mask",
    "sample_unknown_classes",
    "compatible_terms_from_probs",
    "prior_terms_from_probs",
    "marginal_softmax_stats",
    "compatible_from_logits",
]

POSITIVE_BASES = ("ce", "dice", "ta_ce", "ta_dice")
NEGATIVE_BASES = ("ce", "dice", "ex_ce", "ex_dice")

# below this a candidate mass (or 1 - p) is recomputed from the logits in log space (extreme logits)
_UNDERFLOW = 1e-30
# log(1 - p) below this (1 - p < 1e-2) is recomputed from the logits (DCL negative CE): float32 p
# carries ~6e-8 absolute error, i.e. < 6e-6 relative error in 1 - p above it
_LOG_SATURATED = math.log(1e-2)


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other floating dtype computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_input_target(input: Tensor, target: Tensor, name: str) -> None:
    """Raise ValueError unless ``input`` and ``target`` are (B, C, *spatial) of one shape, C >= 2."""
    if input.ndim < 3:
        raise ValueError(f"{name}: input must be (B, C, *spatial), got shape {tuple(input.shape)}.")
    if target.shape != input.shape:
        raise ValueError(
            f"{name}: target shape {tuple(target.shape)} differs from input shape {tuple(input.shape)};"
            " the target must be the <0,p,1> map with one channel per class."
        )
    if input.shape[1] < 2:
        raise ValueError(f"{name}: softmax over classes needs at least 2 channels, got {input.shape[1]}.")
    if not input.is_floating_point():
        raise ValueError(f"{name}: input must hold floating-point logits, got dtype {input.dtype}.")


def reduce_voxelwise(per_voxel: Tensor, reduction: str, spatial_shape: Sequence[int]) -> Tensor:
    """Reduce a (B, N) per-voxel loss: "sum", "mean" (over all B * N voxels) or "none" (B, *spatial)."""
    if reduction == "sum":
        return per_voxel.sum()
    if reduction == "mean":
        return per_voxel.mean()
    return per_voxel.reshape(per_voxel.shape[0], *spatial_shape)


def reduce_channelwise(f: Tensor, reduction: str, n_spatial: int) -> Tensor:
    """Reduce a (B, C) (or (1, C) for batch Dice) loss like MONAI: "none" keeps (B, C, 1, ..., 1)."""
    if reduction == "sum":
        return f.sum()
    if reduction == "mean":
        return f.mean()
    return f.reshape(*f.shape, *([1] * n_spatial))


def dice_from_sums(intersection: Tensor, pred_sum: Tensor, target_sum: Tensor, smooth_nr: float, smooth_dr: float) -> Tensor:
    """MONAI's soft Dice loss ``1 - (2 I + smooth_nr) / (sum P + sum T + smooth_dr)``."""
    return 1.0 - (2.0 * intersection + smooth_nr) / (pred_sum + target_sum + smooth_dr)


def candidate_mask(target: Tensor) -> Tensor:
    """Candidate set ``S = (t > 0)`` with all-zero voxels opened to every class. Shape of ``target``, bool."""
    cand = target > 0
    empty = ~cand.any(1, keepdim=True)
    if bool(empty.any()):
        cand = cand | empty
    return cand


def sample_unknown_classes(target: Tensor) -> Tensor:
    """DCL's image-level unlabelled set: (B, C, 1, ..) bool, True where a class is unknown anywhere in the sample."""
    unknown = (target > 0) & (target < 1)
    return unknown.flatten(2).any(2).reshape(*target.shape[:2], *([1] * (target.ndim - 2)))


# ----------------------------------------------------------------------------------------------
# probability-domain reference (plain autograd); used by PriorLoss / ConditionalCompatibleLoss
# ----------------------------------------------------------------------------------------------


def _safe_log(x: Tensor) -> Tensor:
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


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
            out = out + alpha_pos * torch.where(k1, -_safe_log(probs), zero).sum(1)
        elif base == "dice":  # Eq. 13
            out = out + alpha_pos * torch.where(k1, 1 - 2 * probs / (1 + probs), zero).sum(1)
        elif base == "ta_ce":  # Eq. 15: -log of the candidate (merged) probability
            out = out + alpha_pos * -_safe_log(q)
        elif base == "ta_dice":  # Eq. 16
            out = out + alpha_pos * (1 - 2 * q / (q + 1))
    if negative:
        excl = sample_unknown_classes(target) & k0
        s_ex = (probs * excl).sum(1)
    for base in negative:
        if base == "ce":  # Eq. 12
            out = out + alpha_neg * torch.where(k0, -_safe_log(1 - probs), zero).sum(1)
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
            f_cap, f_delta = -_safe_log(1 - z_cap), -_safe_log(1 - z_delta)
        elif base == "ex_ce":
            f_cap, f_delta = torch.log(z_cap + eps), torch.log(z_delta + eps)
        else:  # "dice" and "ex_dice" share f_N(a, 0) = 2a / (a + 1)
            f_cap, f_delta = 2 * z_cap / (1 + z_cap), 2 * z_delta / (1 + z_delta)
        out = out + torch.where(incl, f_cap, zero).sum(1) + torch.where(excl, f_delta, zero).sum(1)
    return out


# ----------------------------------------------------------------------------------------------
# logits -> losses with hand-written backward
# ----------------------------------------------------------------------------------------------


def _flat(x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, N) contiguous logits and target in the compute dtype (no copy when already so).

    Contiguity matters: element-wise kernels on mixed layouts (a target built with ``movedim``,
    a channels-last network output) are several times slower than on matching layouts.
    """
    dt = compute_dtype(x)
    xb = x.to(dt).reshape(x.shape[0], x.shape[1], -1).contiguous()
    tb = target.to(dt).reshape(target.shape[0], target.shape[1], -1).contiguous()
    return xb, tb


def _softmax_backward(g_p: Tensor, p: Tensor) -> Tensor:
    """``p * (g_p - sum_c p_c g_pc)``: gradient through the softmax over dim 1 (fused kernel)."""
    return torch._softmax_backward_data(g_p, p, 1, p.dtype)


def _acc(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total.add_(term)


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
            low = (q < _UNDERFLOW).squeeze(1)
            log_q = torch.log(q)
            if bool(low.any()):  # exact on these voxels only
                low_idx, exact, r_rows = _exact_candidate_rows(x, 1.0 - v, low)
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
        grad = _softmax_backward(g_p, p)
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
        low = (q < _UNDERFLOW).squeeze(1)
        low_idx = r_rows = None
        if bool(low.any()):
            low_idx, exact, r_rows = _exact_candidate_rows(x, t, low)
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
        return _softmax_backward(buf.mul_(g_out.unsqueeze(1)), p), None, None


def _exact_candidate_rows(x: Tensor, w: Tensor, low: Tensor):
    """Exact ``log q`` and the candidate softmax on the voxels ``low`` (B, N) where ``q`` underflows."""
    low_idx = low.nonzero(as_tuple=True)
    xs = x.permute(0, 2, 1)[low_idx]  # (k, C)
    cand = w.permute(0, 2, 1)[low_idx] > 0
    cand |= ~cand.any(1, keepdim=True)  # all-zero voxel: no information
    masked = xs.masked_fill(~cand, float("-inf"))
    exact = torch.logsumexp(masked, 1) - torch.logsumexp(xs, 1)
    return low_idx, exact, torch.softmax(masked, 1)


def marginal_softmax_stats(
    x: Tensor, target: Tensor, mce: bool = False, ece: bool = False, mdice: bool = False, edice: bool = False, eps: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shared-softmax statistics of the marginal / exclusion losses, with a hand-written backward.

    Args:
        x: (B, C, *spatial) logits; computed in float32 (float64 stays float64).
        target: (B, C, *spatial) ``<0,p,1>`` map.
        mce, ece, mdice, edice: which outputs to compute (the others come back empty).
        eps: exclusion CE epsilon (Eq. 11 of the marginal paper, 1 there).

    Returns:
        ``(mce (B, N), ece (B, N), mdice (3, B, C), edice (3, B, C))`` with ``N`` the number of
        voxels; the Dice entries hold (intersection, prediction sum, target sum).
    """
    xb, tb = _flat(x, target)
    if _native.usable(xb):  # compiled CPU kernel: same numbers, one pass each way
        return _native.marginal(xb, tb, (mce, ece, mdice, edice), eps)
    empty = xb.new_empty(0)
    if (mce, ece, mdice, edice) == (True, False, False, False):
        return _MarginalCEFunction.apply(xb, tb), empty, empty, empty
    if (mce, ece, mdice, edice) == (False, True, False, False):
        return empty, _ExclusionCEFunction.apply(xb, tb, float(eps)), empty, empty
    return _MarginalExclusionFunction.apply(xb, tb, (mce, ece, mdice, edice), float(eps))


def _mask(t: Tensor, value: float, like: Tensor, equal: bool = True) -> Tensor:
    """Float mask ``[t == value]`` (or ``!=``) in the dtype of ``like``, one pass."""
    out = torch.empty_like(like)
    (torch.eq if equal else torch.ne)(t, value, out=out)
    return out


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
        k1 = _mask(t, 1.0, p) if ("ce" in positive or "dice" in positive or "ex_ce" in negative or "ex_dice" in negative) else None
        k0 = _mask(t, 0.0, p) if negative else None
        w = q = informative = low_idx = r_rows = excl = s_ex = has1 = None
        if "ta_ce" in positive or "ta_dice" in positive:
            w = _mask(t, 0.0, p, equal=False)
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
                low = (q < _UNDERFLOW).squeeze(1)
                if bool(low.any()):
                    low_idx = low.nonzero(as_tuple=True)
                    xs = x.permute(0, 2, 1)[low_idx]
                    cand = w.permute(0, 2, 1)[low_idx] > 0
                    cand |= ~cand.any(1, keepdim=True)
                    masked = xs.masked_fill(~cand, float("-inf"))
                    exact = torch.logsumexp(masked, 1) - torch.logsumexp(xs, 1)
                    log_q = log_q.squeeze(1).index_put(low_idx, exact).unsqueeze(1)
                    r_rows = torch.softmax(masked, 1)
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
                g_x = _acc(g_x, torch.addcmul(-k1, p, n1).mul_(a_pos * g))
            elif base == "dice":
                g_p = _acc(g_p, k1 * (-2 * a_pos) / (1 + p) ** 2 * g)
            elif base == "ta_ce":  # dL/dp_j = -w_j / q on informative voxels, exact rows below
                iq = torch.where(informative, (a_pos * g) / q, 0.0)
                if ctx.low_idx is not None:
                    iq = iq.squeeze(1).index_put(ctx.low_idx, iq.new_zeros(())).unsqueeze(1)
                g_p = _acc(g_p, w * (-iq))
            elif base == "ta_dice":
                gq = torch.where(informative, -2 * a_pos / (1 + q) ** 2 * g, 0.0)
                g_p = _acc(g_p, w * gq)
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
                g_x = _acc(g_x, term.mul_(a_neg * g))
            elif base == "dice":
                g_p = _acc(g_p, k0 * (2 * a_neg) / (1 + p) ** 2 * g)
            elif base == "ex_ce":
                term = k0 / (p + eps) + excl * (has1 / (s_ex + eps))
                g_p = _acc(g_p, term.mul_(a_neg * g))
            elif base == "ex_dice":
                term = k0 * 2 / (p + 1) ** 2 + excl * (has1 * 2 / (s_ex + 1) ** 2)
                g_p = _acc(g_p, term.mul_(a_neg * g))
        grad = g_x
        if g_p is not None:
            grad = _acc(grad, _softmax_backward(g_p, p))
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


def compatible_from_logits(
    x: Tensor, target: Tensor, positive: Sequence[str], negative: Sequence[str], alpha_pos: float, alpha_neg: float, eps: float = 1.0
) -> Tensor:
    """Per-voxel DCL compatible loss (B, N) from logits with a hand-written backward.

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
    xb, tb = _flat(x, target)
    positive, negative = tuple(positive), tuple(negative)
    if _native.usable(xb):  # compiled CPU kernel: the loss and its gradient in one pass
        return _native.compatible(xb, tb, positive, negative, alpha_pos, alpha_neg, eps)
    out = None
    if "ce" in positive:
        # Eq. 11 is torch's cross-entropy on the voxels holding a 1 (at most one per voxel in a
        # <0,p,1> map): use its fused kernel, ignoring voxels without a 1
        count, index = _count_and_index(_mask(tb, 1.0, xb))
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
