"""Array spatial transforms: the atlas method's Otsu foreground crop + resize to a reference shape."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from skimage.filters import threshold_otsu

from monai.config.type_definitions import NdarrayOrTensor
from monai.data.meta_tensor import MetaTensor
from monai.transforms.croppad.array import CropForeground
from monai.transforms.intensity.array import GaussianSmooth
from monai.transforms.inverse import InvertibleTransform
from monai.transforms.spatial.array import Resize
from monai.transforms.utils import get_largest_connected_component_mask
from monai.utils import TransformBackends, convert_to_tensor, ensure_tuple

__all__ = ["OtsuForeground", "AtlasCrop"]


def _check_nonneg_ints(value, name: str, positive: bool = False) -> None:
    values = ensure_tuple(value)
    low = 1 if positive else 0
    if not values or any(
        isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low for v in values
    ):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a {kind} int or a sequence of them, got {value!r}.")


class OtsuForeground:
    """Body mask by Otsu thresholding: the ``select_fn`` that :class:`AtlasCrop` gives to MONAI's
    ``CropForeground``.

    The channels are averaged, optionally Gaussian smoothed (MONAI ``GaussianSmooth``), thresholded at
    Otsu's threshold (``skimage.filters.threshold_otsu``), and reduced to the largest connected
    component (MONAI ``get_largest_connected_component_mask``), which drops the scanner table and
    noise. If nothing lies above the threshold (a constant image), every voxel is foreground, so the
    crop keeps the whole image.

    Args:
        sigma: Gaussian smoothing sigma in voxels before thresholding; 0 disables it.
        largest_component: keep only the largest connected component of the thresholded mask.
        nbins: histogram bins for Otsu's method.

    Shapes:
        input ``(C, *spatial)`` image (numpy or torch); output ``(1, *spatial)`` bool torch tensor.

    Example:
        >>> import torch
        >>> img = torch.zeros(1, 8, 8); img[0, 2:6, 3:7] = 5.0; img[0, 0, 0] = 4.0
        >>> OtsuForeground()(img)[0].nonzero().min(0).values.tolist()
        [2, 3]
    """

    def __init__(self, sigma: float = 0.0, largest_component: bool = True, nbins: int = 256) -> None:
        if not np.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a finite non-negative number, got {sigma!r}.")
        _check_nonneg_ints(nbins, "nbins", positive=True)
        self.sigma = float(sigma)
        self.largest_component = bool(largest_component)
        self.nbins = int(nbins)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        t = convert_to_tensor(img, track_meta=False)
        x = t.float().mean(0, keepdim=True)
        if self.sigma > 0:
            x = GaussianSmooth(sigma=self.sigma)(x)
        xn = x.detach().cpu().numpy()
        mask = xn > threshold_otsu(xn, nbins=self.nbins) if xn.min() < xn.max() else np.zeros(xn.shape, bool)
        if self.largest_component and mask.any():
            mask = get_largest_connected_component_mask(mask)
        if not mask.any():
            mask = np.ones(xn.shape, dtype=bool)
        return torch.as_tensor(np.asarray(mask, dtype=bool), device=t.device)


class AtlasCrop(InvertibleTransform):
    """Crop an image to its Otsu body bounding box and resize it to a reference shape (atlas method).

    The atlas paper aligns volumes by cropping the foreground found by Otsu thresholding (the torso)
    and resizing the crop to the mean training shape; atlases are built, and images matched to them,
    in that frame. This composes MONAI's ``CropForeground`` (with :class:`OtsuForeground` as
    ``select_fn``) and ``Resize``; both record themselves in the MetaTensor's
    ``applied_operations``, so :meth:`inverse` (and MONAI's ``Invertd``) maps a result on the
    reference shape back to the original grid, shape and affine.

    Args:
        spatial_size: the reference shape, one int per spatial dim (or one int for all).
        margin: voxels added around the body bounding box on each side (clipped to the image).
        sigma: Gaussian smoothing (voxels) before Otsu thresholding; 0 disables.
        largest_component: keep only the largest connected body component.
        mode: interpolation of ``Resize`` (``"area"``, ``"nearest"``, ``"bilinear"``, ``"trilinear"``,
            ...); use ``"nearest-exact"`` for label maps (torch's legacy ``"nearest"`` is off by
            up to one voxel).
        align_corners: as MONAI ``Resize``.

    Shapes:
        input ``(C, *spatial)``, 2D or 3D, numpy or torch; output a ``(C, *spatial_size)``
        MetaTensor (as MONAI's spatial transforms; the trace needed by the inverse lives on it).

    Raises:
        ValueError: bad ``spatial_size``, ``margin`` or ``sigma``; an input whose spatial rank
            differs from ``len(spatial_size)``.

    Example:
        >>> import torch
        >>> img = torch.zeros(1, 20, 30); img[0, 5:15, 4:28] = 1.0
        >>> t = AtlasCrop(spatial_size=(8, 16))
        >>> out = t(img); out.shape
        torch.Size([1, 8, 16])
        >>> t.inverse(out).shape
        torch.Size([1, 20, 30])
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        spatial_size: Sequence[int] | int,
        margin: Sequence[int] | int = 0,
        sigma: float = 0.0,
        largest_component: bool = True,
        mode: str = "area",
        align_corners: bool | None = None,
    ) -> None:
        _check_nonneg_ints(spatial_size, "spatial_size", positive=True)
        _check_nonneg_ints(margin, "margin")
        self.spatial_size = spatial_size
        self.select_fn = OtsuForeground(sigma=sigma, largest_component=largest_component)
        self.cropper = CropForeground(select_fn=self.select_fn, margin=margin, allow_smaller=True)
        self.resizer = Resize(spatial_size=spatial_size, mode=mode, align_corners=align_corners)

    def _check_rank(self, img: NdarrayOrTensor) -> None:
        sizes = ensure_tuple(self.spatial_size)
        if len(sizes) > 1 and len(sizes) != img.ndim - 1:
            raise ValueError(
                f"spatial_size {tuple(sizes)} has {len(sizes)} dims but the input has shape {tuple(img.shape)} "
                f"({img.ndim - 1} spatial dims)."
            )

    def compute_bounding_box(self, img: NdarrayOrTensor) -> tuple[np.ndarray, np.ndarray]:
        """Start and end (exclusive) of the body bounding box of ``img`` ``(C, *spatial)``, margin included."""
        return self.cropper.compute_bounding_box(convert_to_tensor(img, track_meta=False))

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        """
        Args:
            img: ``(C, *spatial)`` image whose body defines the crop.

        Returns:
            ``(C, *spatial_size)`` MetaTensor.
        """
        self._check_rank(img)
        img_t = convert_to_tensor(img, track_meta=True)
        box_start, box_end = self.cropper.compute_bounding_box(img_t)
        return self.resizer(self.cropper.crop_pad(img_t, box_start, box_end))

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """Map a ``(C, *spatial_size)`` MetaTensor produced by this transform back to the input grid.

        Voxels outside the body box are filled with 0.
        """
        if not isinstance(data, MetaTensor):
            raise TypeError(f"inverse needs the MetaTensor returned by AtlasCrop, got {type(data).__name__}.")
        return self.cropper.inverse(self.resizer.inverse(data))

