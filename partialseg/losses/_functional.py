"""Primitives shared by the partial-label loss families (DCL in :mod:`.dcl`, marginal / exclusion
in :mod:`.marginal`).

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

The module holds the input checks, the reductions, the Dice ratio, the masks, the flattening to
``(B, C, N)``, the fused softmax backward and the exact (log-space) candidate probability. Each
family's autograd functions, and the one function per family that chooses between the compiled
kernel (:mod:`._native`) and torch, live in the family's module. The family entry points that
used to live here (``marginal_softmax_stats``, ``compatible_from_logits``, ...) are still
importable from this module.

Example:
    >>> import torch
    >>> candidate_mask(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])).tolist()  # voxel 1: all zero, opened
    [[[True, True], [False, True]]]
"""

from __future__ import annotations

import importlib
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "check_input_target",
    "check_not_empty",
    "reduce_voxelwise",
    "reduce_channelwise",
    "dice_from_sums",
    "candidate_mask",
    "sample_unknown_classes",
    "flat",
    "float_mask",
    "softmax_backward",
    "exact_candidate_rows",
    "nonfinite_marker",
    "safe_log",
]

# below this a candidate mass (or 1 - p) is recomputed from the logits in log space (extreme logits)
UNDERFLOW = 1e-30


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other floating dtype computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_not_empty(shape: Sequence[int], name: str) -> None:
    """Raise ValueError naming ``shape`` when it holds no voxel (a batch of 0 or a zero-size spatial dim).

    A loss over nothing has no meaningful value (a mean would be NaN, a Dice 0): an empty batch or
    patch is a pipeline bug, reported where it happens, alike on the compiled and torch paths.
    """
    if any(int(s) == 0 for s in shape):
        raise ValueError(
            f"{name}: input of shape {tuple(shape)} holds no voxel (a batch of 0 or a zero-size spatial"
            " dimension); the loss is undefined there."
        )


def check_input_target(input: Tensor, target: Tensor, name: str) -> None:
    """Raise ValueError unless ``input`` and ``target`` are (B, C, *spatial) of one shape, C >= 2, non-empty."""
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
    check_not_empty(input.shape, name)


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


def safe_log(x: Tensor) -> Tensor:
    """``log(x)`` with ``x`` clamped to the dtype's smallest normal number (finite at 0; NaN stays NaN)."""
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def flat(x: Tensor, dtype: torch.dtype | None = None, contiguous: bool = True) -> Tensor:
    """``x`` as a (B, C, N) tensor in ``dtype`` (default: the compute dtype of ``x``); no copy when already so.

    Contiguous unless ``contiguous=False`` (then a view where the layout allows one: the compiled
    kernels read a channels-last target as it is). Contiguity matters to torch: element-wise
    kernels on mixed layouts (a target built with ``movedim``, a channels-last network output)
    are several times slower than on matching layouts.
    """
    out = x.to(dtype or compute_dtype(x)).reshape(x.shape[0], x.shape[1], -1)
    return out.contiguous() if contiguous else out


def float_mask(t: Tensor, value: float, like: Tensor, equal: bool = True) -> Tensor:
    """Float mask ``[t == value]`` (or ``!=``) in the dtype of ``like``, one pass."""
    out = torch.empty_like(like)
    (torch.eq if equal else torch.ne)(t, value, out=out)
    return out


def softmax_backward(g_p: Tensor, p: Tensor) -> Tensor:
    """``p * (g_p - sum_c p_c g_pc)``: gradient through the softmax over dim 1 (fused kernel)."""
    return torch._softmax_backward_data(g_p, p, 1, p.dtype)


def exact_candidate_rows(x: Tensor, w: Tensor, low: Tensor) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """Exact ``log q`` and the candidate softmax on the voxels ``low`` (B, N) where ``q`` underflows.

    Args:
        x: (B, C, N) logits.
        w: (B, C, N) candidate weights (``> 0`` marks a candidate); an all-zero voxel counts as
            every class a candidate (no information).
        low: (B, N) bool, the voxels to recompute.

    Returns:
        ``(index, log_q (k,), r (k, C))``: the ``nonzero`` index of ``low``, ``logsumexp`` of the
        candidates minus ``logsumexp`` of all logits, and the softmax over the candidates.
    """
    low_idx = low.nonzero(as_tuple=True)
    xs = x.permute(0, 2, 1)[low_idx]  # (k, C)
    cand = w.permute(0, 2, 1)[low_idx] > 0
    cand |= ~cand.any(1, keepdim=True)  # all-zero voxel: no information
    masked = xs.masked_fill(~cand, float("-inf"))
    exact = torch.logsumexp(masked, 1) - torch.logsumexp(xs, 1)
    return low_idx, exact, torch.softmax(masked, 1)


def nonfinite_marker(x: Tensor) -> Tensor:
    """(B, N) detached tensor: 0 at each voxel of the (B, C, N) logits ``x``, NaN where its softmax is undefined.

    That is where a logit is NaN or +inf, or all are -inf. The torch paths add it to their
    per-voxel losses (and its per-sample sum to region sums), so that such logits give a NaN loss
    whatever the voxel's target, as the compiled kernels do; masked terms (an unlabelled voxel, a
    ``where`` on the known entries) would otherwise return a finite loss with a NaN gradient.
    """
    return x.detach().amax(1).mul_(0.0)


_MOVED = {  # the family entry points, importable from here as before the split
    "POSITIVE_BASES": "partialseg.losses.dcl",
    "NEGATIVE_BASES": "partialseg.losses.dcl",
    "compatible_terms_from_probs": "partialseg.losses.dcl",
    "prior_terms_from_probs": "partialseg.losses.dcl",
    "compatible_from_logits": "partialseg.losses.dcl",
    "marginal_softmax_stats": "partialseg.losses.marginal",
}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
