"""Argument handling shared by the partial-label loss classes.

Example:
    >>> check_positive("alpha_pos", 2)
    2.0
    >>> PartialLabelLoss(reduction="avg")
    Traceback (most recent call last):
    ...
    ValueError: reduction must be one of 'mean', 'sum', 'none'; got 'avg'.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.nn.modules.loss import _Loss

from partialseg._checks import check_float, check_option

__all__ = ["PartialLabelLoss", "plain_tensor", "apply_class_weight", "check_nonnegative", "check_positive"]

_REDUCTIONS = ("mean", "sum", "none")


def plain_tensor(x):
    """``x`` as a plain ``torch.Tensor`` when it is a subclass (MONAI ``MetaTensor``), else ``x``.

    The autograd graph is kept (``as_subclass`` is a view). Losses unwrap their inputs so that the
    hand-written autograd functions see plain tensors and skip MetaTensor's per-op overhead.
    """
    if isinstance(x, torch.Tensor) and type(x) is not torch.Tensor and not isinstance(x, torch.nn.Parameter):
        return x.as_subclass(torch.Tensor)
    return x


def _float32(x: Any) -> Any:
    """``x`` in float32 when it is a float16 / bfloat16 tensor, else ``x``."""
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


class PartialLabelLoss(_Loss):
    """Base class: validates MONAI-style arguments and holds the optional class weight buffer.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        weight: optional non-negative per-class weights (a number or a sequence), stored as
            the buffer ``class_weight``.

    Raises:
        ValueError: on an unknown reduction or a negative weight.
    """

    class_weight: torch.Tensor | None

    def __call__(self, *args, **kwargs):
        # MONAI pipelines hand MetaTensors to losses; compute on plain tensors (same graph)
        args = tuple(plain_tensor(a) for a in args)
        kwargs = {k: plain_tensor(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if device is None or not torch.is_autocast_enabled(device):
            return super().__call__(*args, **kwargs)
        # Under autocast (a trainer with amp=True) the voxel sums would run in float16 / bfloat16:
        # float16 overflows past 65504 (the loss turned NaN within 3 iterations of a 64x192x192
        # patch on CUDA) and bfloat16 keeps 3 digits. Losses are computed in float32, as MONAI's
        # SupervisedTrainer intends for its own (autocast covers the network, not the reduction).
        with torch.autocast(device, enabled=False):
            return super().__call__(*(_float32(a) for a in args), **{k: _float32(v) for k, v in kwargs.items()})

    def __init__(self, reduction: str = "mean", weight: Sequence[float] | float | torch.Tensor | None = None) -> None:
        super().__init__(reduction=check_option(reduction, _REDUCTIONS, "reduction"))
        if weight is not None:
            w = torch.as_tensor(weight, dtype=torch.float32)
            if w.ndim > 1:
                raise ValueError(f"weight must be a number or a 1-D sequence of per-class weights, got shape {tuple(w.shape)}.")
            if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
                raise ValueError(f"weight must be finite and non-negative, got {w.tolist()}.")
            self.register_buffer("class_weight", w)
        else:
            self.class_weight = None


def apply_class_weight(f: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
    """``f * class_weight`` for a (B, C) per-channel loss (MONAI DiceLoss semantics); ``f`` when None.

    Raises:
        ValueError: a 1-D weight whose length is not the number of channels.
    """
    if class_weight is None:
        return f
    w = class_weight.to(f)
    if w.ndim == 1 and w.shape[0] != f.shape[1]:
        raise ValueError(
            f"weight has {w.shape[0]} entries but the loss has {f.shape[1]} channels"
            " (with include_background=False the weight must leave out class 0)."
        )
    return f * w


def check_nonnegative(name: str, value: float) -> float:
    """Return ``float(value)`` or raise naming it when it is negative or not finite (:func:`~partialseg._checks.check_float`)."""
    return check_float(value, name, minimum=0.0)


def check_positive(name: str, value: float) -> float:
    """Return ``float(value)`` or raise naming it unless it is finite and > 0 (:func:`~partialseg._checks.check_float`)."""
    return check_float(value, name, minimum=0.0, include_minimum=False)
