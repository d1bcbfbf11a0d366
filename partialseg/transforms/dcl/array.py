"""Array transforms of DCL's conditional supervision (Zhang & Zhuang, section 3.2-3.3).

``ConditionalSupervision`` computes ``z = g(y_t, y_c)`` of Eq. 5 from the target's ``<0,p,1>``
map and the conditional labels; ``SingleLabelView`` keeps only some annotated classes of a
``<0,p,1>`` map (the paper's full-annotation mode: a fully labelled image counts as ``m``
single-label images; also the dual target of section 3.3.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.config import NdarrayOrTensor
from monai.transforms import Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = ["ConditionalSupervision", "SingleLabelView", "conditional_supervision", "label_view"]


def conditional_supervision(target: torch.Tensor, cond_label: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """``z = g(y_t, y_c) = (y_t * y_c, y_t - y_t * y_c)`` (DCL Eq. 5), on tensors.

    Args:
        target: ``<0,p,1>`` map of the target, ``m`` channels along ``channel_dim``.
        cond_label: conditional labels, same shape; channel ``j`` is the label of class ``j``
            on the conditional image of class ``j`` (1 inside, 0 outside; ``p`` unknown).
        channel_dim: the channel dimension (0 for a sample, 1 for a batch).

    Returns:
        ``2m`` channels along ``channel_dim``: intersection ``z_cap`` then extra ``z_delta``;
        ``z_cap + z_delta == y_t`` exactly.

    Raises:
        ValueError: the shapes differ.

    Example:
        >>> import torch
        >>> yt = torch.tensor([[1.0, 0.5, 0.0]])   # m = 1, three voxels
        >>> yc = torch.tensor([[1.0, 1.0, 1.0]])
        >>> conditional_supervision(yt, yc).tolist()
        [[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]
    """
    if target.shape != cond_label.shape:
        raise ValueError(f"target {tuple(target.shape)} and cond_label {tuple(cond_label.shape)} must have the same shape.")
    cap = target * cond_label.to(target.dtype)
    return torch.cat([cap, target - cap], dim=channel_dim)


def label_view(target: torch.Tensor, classes: Sequence[int] | torch.Tensor, p: float = 0.5, channel_dim: int = 0) -> torch.Tensor:
    """The ``<0,p,1>`` map a case would have if only ``classes`` were annotated.

    Channels in ``classes`` are kept. Other channels become 0 at voxels known to belong to one
    of ``classes`` (an entry 1 there) and ``p`` elsewhere. Exact when the kept channels are
    binary (the classes were annotated); an unknown kept entry stays unknown.

    Args:
        target: ``(m, *spatial)`` (or ``(B, m, *spatial)`` with ``channel_dim=1``) ``<0,p,1>`` map.
        classes: indices of the classes to keep.
        p: value of unknown entries.
        channel_dim: the channel dimension.

    Example:
        >>> import torch
        >>> y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # one-hot, 3 voxels
        >>> label_view(y, [1]).tolist()
        [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]
    """
    m = target.shape[channel_dim]
    keep = torch.zeros(m, dtype=torch.bool, device=target.device)
    idx = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= m):
        raise ValueError(f"classes {idx.tolist()} are outside [0, {m}).")
    keep[idx.to(target.device)] = True
    shape = [1] * target.ndim
    shape[channel_dim] = m
    keep_b = keep.view(shape)
    inside = ((target == 1) & keep_b).any(dim=channel_dim, keepdim=True)
    other = torch.where(inside, torch.zeros((), dtype=target.dtype, device=target.device), torch.full((), float(p), dtype=target.dtype, device=target.device))
    return torch.where(keep_b, target, other)


class ConditionalSupervision(Transform):
    """Conditional supervision ``z = g(y_t, y_c)`` of DCL (Eq. 5).

    ``z_cap = y_t * y_c`` (the target's class ``j`` inside the conditional label of class
    ``j``) and ``z_delta = y_t - z_cap`` (outside it), element-wise on the ``<0,p,1>`` target of
    :class:`~partialseg.transforms.PartialLabelToVector`. Known entries stay known where the
    conditional label is known; an unknown target entry ``p`` gives ``p`` (or 0 where the
    conditional label rules the part out), and ``z_cap + z_delta = y_t``, so the compatible loss
    on the summed maps (Eq. 6) is the loss on ``y_t``.

    Args:
        dtype: output dtype (None keeps the target's floating dtype, float32 otherwise).

    Example:
        >>> import numpy as np
        >>> yt = np.array([[[1.0, 0.0]], [[0.0, 0.5]]], dtype=np.float32)  # m = 2, grid (1, 2)
        >>> yc = np.array([[[0.0, 0.0]], [[1.0, 1.0]]], dtype=np.float32)
        >>> ConditionalSupervision()(yt, yc)[:, 0].tolist()
        [[0.0, 0.0], [0.0, 0.5], [1.0, 0.0], [0.0, 0.0]]
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}.")
        self.dtype = dtype

    def __call__(self, target: NdarrayOrTensor, cond_label: NdarrayOrTensor) -> NdarrayOrTensor:
        """
        Args:
            target: ``(m, H, W[, D])`` ``<0,p,1>`` map of the target image.
            cond_label: ``(m, H, W[, D])`` conditional labels (channel ``j`` from the
                conditional image of class ``j``).

        Returns:
            ``(2m, H, W[, D])``: ``z_cap`` channels then ``z_delta`` channels, of the type of ``target``.
        """
        t = convert_to_tensor(target, track_meta=False)
        c = convert_to_tensor(cond_label, track_meta=False, device=t.device)
        if t.ndim < 2:
            raise ValueError(f"target must be (m, *spatial), got shape {tuple(t.shape)}.")
        dtype = self.dtype or (t.dtype if t.is_floating_point() else torch.float32)
        out = conditional_supervision(t.to(dtype), c.to(dtype))
        return convert_to_dst_type(out, target, dtype=dtype)[0]


class SingleLabelView(Transform):
    """Keep only some annotated classes of a ``<0,p,1>`` map (see :func:`label_view`).

    DCL's full-annotation mode treats a fully labelled image as ``m`` single-label images:
    ``SingleLabelView(p)(y, classes=[j])`` is the view annotating class ``j`` only.

    Args:
        p: value of unknown entries (as in ``PartialLabelToVector``).

    Example:
        >>> import numpy as np
        >>> y = np.eye(3, dtype=np.float32)[:, None, :]     # (3, 1, 3): voxel k is class k
        >>> SingleLabelView()(y, classes=[2])[:, 0].tolist()
        [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 < float(p) < 1.0:
            raise ValueError(f"p must lie strictly between 0 and 1, got {p!r}")
        self.p = float(p)

    def __call__(self, target: NdarrayOrTensor, classes: Sequence[int]) -> NdarrayOrTensor:
        t = convert_to_tensor(target, track_meta=False)
        if t.ndim < 2:
            raise ValueError(f"target must be (m, *spatial), got shape {tuple(t.shape)}.")
        return convert_to_dst_type(label_view(t, classes, self.p), target)[0]
