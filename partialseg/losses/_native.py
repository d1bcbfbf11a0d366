"""Autograd functions over the compiled kernels of :mod:`partialseg._native` (CPU, float32).

The kernels fuse the softmax, every loss term and the gradient into one or two passes over the
``(B, C, N)`` logits, where the torch implementations in :mod:`.dcl` and :mod:`.marginal` need one pass per
element-wise operation. Both give the same numbers (``tests/losses/test_native.py``); the losses
call :func:`usable` and fall back to torch for other devices, float64 (gradcheck) or when the
library cannot be built.

* :func:`compatible` - per-voxel DCL compatible loss (Eq. 2-4, 11-18) and, with conditional
  labels, the conditional compatible loss of CompNet's 2m maps (Eq. 6-8, prior loss included).
  The forward writes the gradient for an upstream gradient of 1; the backward scales it.
* :func:`marginal` - marginal / exclusion CE per voxel and their Dice region sums; the forward
  keeps the softmax in the buffer that the backward overwrites with the gradient.

Both take the logits as contiguous ``(B, C, N)`` and the target either so or channels-last (a
``(B, C, N)`` view of a ``(B, N, C)`` tensor, as ``one_hot(label, C).movedim(-1, 1)`` gives): the
kernels transpose it block by block in cache (see :func:`kernel_target`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from partialseg import _native

__all__ = ["usable", "compatible", "marginal", "prior_weights", "kernel_target"]

_POSITIVE = {"ce": 1, "dice": 2, "ta_ce": 4, "ta_dice": 8}
_NEGATIVE = {"ce": 16, "dice": 32, "ex_ce": 64, "ex_dice": 128}
_M_CE, _E_CE, _M_DICE, _E_DICE = 1, 2, 4, 8


def usable(x: Tensor) -> bool:
    """True when the compiled kernels can compute on ``x`` (CPU float32, library available)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _native.library() is not None


def kernel_target(t: Tensor) -> tuple[Tensor, int]:
    """A (B, C, N) target as the kernels read it: ``(t, 0)`` when contiguous, ``(t as (B, N, C), 1)``
    when channels-last (strides ``(C N, 1, C)``), else ``(t.contiguous(), 0)``.

    Copying a channels-last target to (B, C, N) is a transpose of the whole tensor plus a fresh
    allocation, which cost more than the loss itself from C = 16 on (``benchmarks/losses.py
    --sweep --target movedim``); the kernels instead transpose each block of 128 voxels in cache.
    """
    if t.is_contiguous():
        return t, 0
    cl = t.transpose(1, 2)
    if cl.is_contiguous():
        return cl, 1
    return t.contiguous(), 0


def _ptr(x: Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _check(rc: int, name: str) -> None:
    if rc != 0:
        raise MemoryError(f"{name}: the native kernel could not allocate its work buffers")


def prior_weights(negative: Sequence[str], prior_weight: float) -> tuple[float, float, float]:
    """Weights of the prior loss's ``f_N`` kinds (``-log(1-a)``, ``log(a+eps)``, ``2a/(1+a)``)."""
    w_ce = prior_weight * sum(b == "ce" for b in negative)
    w_ex = prior_weight * sum(b == "ex_ce" for b in negative)
    w_dice = prior_weight * sum(b in ("dice", "ex_dice") for b in negative)
    return float(w_ce), float(w_ex), float(w_dice)


def _scale_(grad: Tensor, g: Tensor) -> Tensor:
    """``grad * g`` per voxel, in place; ``g`` (B, N) is often an expanded scalar (mean / sum)."""
    if g.numel() and all(s == 0 for s in g.stride()):
        value = float(g.reshape(-1)[0])
        return grad if value == 1.0 else grad.mul_(value)
    return grad.mul_(g.unsqueeze(1))


class _CompatibleNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, t_cl: int, yc: Tensor | None, unknown: Tensor | None, flags: int, scalars: tuple[float, ...]):  # type: ignore[override]
        loss, grad = _run_compatible(x, t, t_cl, yc, unknown, flags, scalars)
        ctx.grad, ctx.flags, ctx.scalars, ctx.t_cl = grad, flags, scalars, t_cl  # the gradient buffer is not a saved input
        ctx.save_for_backward(x, t, yc, unknown)
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward (retain_graph): recompute
            x, t, yc, unknown = ctx.saved_tensors
            _, grad = _run_compatible(x, t, ctx.t_cl, yc, unknown, ctx.flags, ctx.scalars)
        return _scale_(grad, g), None, None, None, None, None, None


def _run_compatible(x, t, t_cl, yc, unknown, flags, scalars):
    b, k, n = x.shape
    m = t.shape[2] if t_cl else t.shape[1]  # channels-last: (B, N, M)
    loss = x.new_empty(b, n)
    grad = torch.empty_like(x)
    rc = _native.library().ps_compatible(
        _ptr(x), _ptr(t), int(t_cl), _ptr(yc), _ptr(unknown), b, k, m, n, flags, *scalars, _ptr(loss), _ptr(grad), _threads()
    )
    _check(rc, "compatible loss")
    return loss, grad


def compatible(
    x: Tensor,
    t: Tensor,
    positive: Sequence[str],
    negative: Sequence[str],
    alpha_pos: float,
    alpha_neg: float,
    eps: float,
    cond_label: Tensor | None = None,
    prior: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Tensor:
    """Per-voxel (B, N) compatible loss from contiguous float32 (B, K, N) logits.

    Args:
        x: (B, K, N) logits, K = C classes, or K = 2C CompNet maps (intersection, then extra).
        t: (B, C, N) ``<0,p,1>`` target of the classes (for CompNet ``z_cap + z_delta``),
            contiguous or channels-last (see :func:`kernel_target`).
        positive, negative, alpha_pos, alpha_neg, eps: as in :class:`~partialseg.losses.CompatibleLoss`.
        cond_label: (B, C, N) conditional labels for the prior loss (K = 2C), or None.
        prior: weights of the prior loss's ``f_N`` kinds (see :func:`prior_weights`).
    """
    flags = sum(_POSITIVE[b] for b in positive) + sum(_NEGATIVE[b] for b in negative)
    t, t_cl = kernel_target(t)
    unknown = None
    if {"ex_ce", "ex_dice"} & set(negative):  # the sample's unlabelled classes (Eq. 17, 18)
        b, n, m = (t.shape[0], t.shape[1], t.shape[2]) if t_cl else (t.shape[0], t.shape[2], t.shape[1])
        unknown = torch.empty(b, m, dtype=torch.uint8)
        scan = _native.library().ps_unknown_classes_cl if t_cl else _native.library().ps_unknown_classes
        scan(_ptr(t), b, m, n, _ptr(unknown))
    if cond_label is not None:
        cond_label = cond_label.contiguous()
    scalars = (float(alpha_pos), float(alpha_neg), float(eps), *map(float, prior))
    return _CompatibleNative.apply(x.contiguous(), t, t_cl, cond_label, unknown, flags, scalars)


class _MarginalNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, t_cl: int, want: tuple[bool, bool, bool, bool], eps: float):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        probs, mce, ece, sums = _run_marginal(x, t, t_cl, want, eps)
        ctx.probs, ctx.want, ctx.eps, ctx.t_cl = probs, want, eps, t_cl  # the softmax buffer becomes the gradient
        ctx.save_for_backward(x, t)
        empty = x.new_empty(0)
        mdice = sums[:, 0:3].permute(1, 0, 2).float() if want[2] else empty
        edice = sums[:, 3:6].permute(1, 0, 2).float() if want[3] else empty
        return (mce if mce is not None else empty), (ece if ece is not None else empty), mdice, edice

    @staticmethod
    def backward(ctx, g_mce, g_ece, g_mdice, g_edice):  # type: ignore[override]
        x, t = ctx.saved_tensors
        want = ctx.want
        g_mce = g_mce.contiguous() if (want[0] and g_mce is not None) else None
        g_ece = g_ece.contiguous() if (want[1] and g_ece is not None) else None
        use_md = want[2] and g_mdice is not None
        use_ed = want[3] and g_edice is not None
        if g_mce is None and g_ece is None and not use_md and not use_ed:
            return None, None, None, None, None
        g_sums = None
        if use_md or use_ed:
            g_sums = x.new_zeros(x.shape[0], 6, x.shape[1])
            if use_md:
                g_sums[:, 0:3] = g_mdice.permute(1, 0, 2)
            if use_ed:
                g_sums[:, 3:6] = g_edice.permute(1, 0, 2)
        probs, ctx.probs = ctx.probs, None
        if probs is None:  # a second backward (retain_graph): recompute the softmax
            probs = _run_marginal(x, t, ctx.t_cl, (False, False, False, False), ctx.eps)[0]
        b, c, n = x.shape
        rc = _native.library().ps_marginal_backward(
            _ptr(x), _ptr(t), int(ctx.t_cl), b, c, n, float(ctx.eps), _ptr(probs), _ptr(g_mce), _ptr(g_ece), _ptr(g_sums), _threads()
        )
        _check(rc, "marginal / exclusion loss")
        return probs, None, None, None, None


def _run_marginal(x, t, t_cl, want, eps):
    b, c, n = x.shape
    probs = torch.empty_like(x)
    mce = x.new_empty(b, n) if want[0] else None
    ece = x.new_empty(b, n) if want[1] else None
    sums = torch.zeros(b, 6, c, dtype=torch.float64)
    flags = _M_CE * want[0] + _E_CE * want[1] + _M_DICE * want[2] + _E_DICE * want[3]
    rc = _native.library().ps_marginal_forward(
        _ptr(x), _ptr(t), int(t_cl), b, c, n, int(flags), float(eps), _ptr(probs), _ptr(mce), _ptr(ece), _ptr(sums), _threads()
    )
    _check(rc, "marginal / exclusion loss")
    return probs, mce, ece, sums


def marginal(x: Tensor, t: Tensor, want: tuple[bool, bool, bool, bool], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mce (B, N), ece (B, N), mdice (3, B, C), edice (3, B, C))`` as
    :func:`~partialseg.losses.marginal.marginal_softmax_stats`, from float32 (B, C, N) logits and
    a (B, C, N) target, contiguous or channels-last (see :func:`kernel_target`)."""
    t, t_cl = kernel_target(t)
    return _MarginalNative.apply(x.contiguous(), t, t_cl, tuple(bool(w) for w in want), float(eps))
