"""Array mixing transforms: foreground paste (hybrid method's dynamic co-regularization)."""

from __future__ import annotations

import numpy as np
import torch

from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms.transform import Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = ["ForegroundPaste"]


class ForegroundPaste(Transform):
    """Paste the foreground of one sample onto another: ``mask * src + (1 - mask) * dst``.

    This is the mixture tutorial of the hybrid method (Pan et al., AAAI 2022, Eq. 4 and 6): the
    region ``B`` of one class of a strongly labelled image ``x_i`` (its ground-truth mask) is pasted
    onto an image ``x_j`` of the other sampler, ``x_m = B * x_i + (1 - B) * x_j``, and the same
    ``B`` mixes the two networks' predictions into the pseudo-label of ``x_m``. Use the same mask for
    the image, the label and every pseudo-label (:class:`ForegroundPasted` does).

    Binary masks (bool, or values all in {0, 1}) select voxels (``where``), so the result keeps
    ``dst``'s dtype (integer label maps stay integer). Soft masks (values in [0, 1]) blend linearly
    in floating point. ``mask_threshold`` turns a soft mask (e.g. a probability) into a binary one
    (``mask > mask_threshold``) first.

    Args:
        mask_threshold: None to use the mask as given, or a threshold that binarises it.

    Shapes:
        ``src`` and ``dst``: the same shape, ``(C, *spatial)`` (or batched ``(B, C, *spatial)``);
        ``mask``: same number of dims, each dim equal to the images' or 1 (e.g. ``(1, *spatial)``),
        broadcast over channels. Output: ``dst``'s shape and container type (numpy / torch /
        MetaTensor with ``dst``'s metadata).

    Raises:
        ValueError: shapes that differ or do not broadcast (named in the message); mask values
            outside [0, 1]; a non-finite ``mask_threshold``.

    Example:
        >>> import numpy as np
        >>> a = np.full((1, 2, 3), 7.0); b = np.zeros((1, 2, 3))
        >>> m = np.array([[[1, 0, 0], [1, 1, 0]]])
        >>> ForegroundPaste()(a, b, m).tolist()
        [[[7.0, 0.0, 0.0], [7.0, 7.0, 0.0]]]
        >>> ForegroundPaste()(a, b, m * 0.5)[0, 0].tolist()
        [3.5, 0.0, 0.0]
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, mask_threshold: float | None = None) -> None:
        if mask_threshold is not None and not np.isfinite(mask_threshold):
            raise ValueError(f"mask_threshold must be a finite number or None, got {mask_threshold!r}.")
        self.mask_threshold = mask_threshold

    @staticmethod
    def check_shapes(src_shape, dst_shape, mask_shape, names=("src", "dst", "mask")) -> None:
        """Raise ValueError unless src and dst shapes match and mask broadcasts to them per dim."""
        src_shape, dst_shape, mask_shape = tuple(src_shape), tuple(dst_shape), tuple(mask_shape)
        if src_shape != dst_shape:
            raise ValueError(f"{names[0]} {src_shape} and {names[1]} {dst_shape} must have the same shape.")
        if len(mask_shape) != len(dst_shape) or any(m not in (1, s) for m, s in zip(mask_shape, dst_shape)):
            raise ValueError(
                f"{names[2]} {mask_shape} must have the same number of dims as {names[1]} {dst_shape}, "
                "each dim equal or 1."
            )

    def __call__(self, src: NdarrayOrTensor, dst: NdarrayOrTensor, mask: NdarrayOrTensor) -> NdarrayOrTensor:
        """
        Args:
            src: sample whose foreground is pasted (``x_i``).
            dst: sample that receives it (``x_j``).
            mask: region to paste (``B``), binary or soft.

        Returns:
            the mixed sample, same container type as ``dst``.
        """
        self.check_shapes(src.shape, dst.shape, mask.shape)
        dst_t = convert_to_tensor(dst, track_meta=False)
        src_t = convert_to_tensor(src, track_meta=False, device=dst_t.device)
        m = convert_to_tensor(mask, track_meta=False, device=dst_t.device)
        if self.mask_threshold is not None:
            m = m > self.mask_threshold
        if m.dtype != torch.bool:
            lo, hi = (m.min().item(), m.max().item()) if m.numel() else (0, 0)
            if lo < 0 or hi > 1:
                raise ValueError(f"mask values must lie in [0, 1], got range [{lo}, {hi}].")
            if m.is_floating_point() and not torch.all((m == 0) | (m == 1)):
                w = m.to(torch.promote_types(torch.promote_types(src_t.dtype, dst_t.dtype), torch.float32))
                out = w * src_t + (1 - w) * dst_t
                return convert_to_dst_type(out, dst, dtype=out.dtype)[0]
            m = m != 0
        out = torch.where(m, src_t.to(dst_t.dtype), dst_t)
        return convert_to_dst_type(out, dst)[0]
