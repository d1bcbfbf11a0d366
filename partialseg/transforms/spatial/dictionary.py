"""Dictionary wrappers of :mod:`partialseg.transforms.spatial.array`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms.croppad.dictionary import CropForegroundd
from monai.transforms.inverse import InvertibleTransform
from monai.transforms.spatial.dictionary import Resized
from monai.transforms.transform import MapTransform
from monai.transforms.utils import allow_missing_keys_mode
from monai.utils import ensure_tuple, ensure_tuple_rep

from partialseg.transforms.spatial.array import AtlasCrop, OtsuForeground, _check_nonneg_ints

__all__ = ["AtlasCropd", "AtlasCropD", "AtlasCropDict"]


class AtlasCropd(MapTransform, InvertibleTransform):
    """Dictionary-based wrapper of :py:class:`partialseg.transforms.spatial.AtlasCrop`.

    The body box is computed once, on ``source_key`` (Otsu threshold, largest component, margin),
    and the SAME crop and resize are applied to every key (image, label, atlas, ...). It is MONAI's
    ``CropForegroundd`` followed by ``Resized``, so ``inverse`` and MONAI's ``Invertd`` map
    predictions on the reference shape back to each key's original grid and affine. Invert a
    prediction with ``Invertd(..., orig_keys="label", nearest_interp=False)``: it then reuses the
    label's recorded ``"nearest-exact"`` mode (``nearest_interp=True`` would switch to torch's
    legacy ``"nearest"``, which shifts by up to one voxel).

    Args:
        keys: keys to crop and resize.
        source_key: key of the image whose body defines the box.
        spatial_size: reference shape, one int per spatial dim (or one int for all).
        mode: ``Resize`` interpolation, one for all keys or one per key. None (default) uses
            ``"area"`` for ``source_key`` and ``"nearest-exact"`` for every other key (labels).
            Prefer ``"nearest-exact"`` to torch's legacy ``"nearest"`` for labels: the legacy mode
            is off by up to one voxel, which a crop -> resize -> inverse round trip doubles.
        margin: voxels added around the body box on each side (clipped to the image).
        sigma: Gaussian smoothing (voxels) before Otsu thresholding; 0 disables.
        largest_component: keep only the largest connected body component.
        align_corners: as MONAI ``Resized``, one or one per key.
        start_coord_key / end_coord_key: keys where the box (before resizing) is recorded; None to
            skip, as MONAI ``CropForegroundd``.
        allow_missing_keys: skip missing keys instead of raising.

    Example:
        >>> import torch
        >>> img = torch.zeros(1, 20, 24, 16); img[0, 4:16, 2:20, 3:13] = 1.0
        >>> lab = torch.zeros(1, 20, 24, 16); lab[0, 6:10, 5:12, 5:9] = 1.0
        >>> t = AtlasCropd(["image", "label"], spatial_size=(12, 18, 10))
        >>> out = t({"image": img, "label": lab})
        >>> out["image"].shape, out["label"].shape, out["foreground_start_coord"].tolist()
        (torch.Size([1, 12, 18, 10]), torch.Size([1, 12, 18, 10]), [4, 2, 3])
        >>> back = t.inverse(out)
        >>> back["label"].shape, bool((back["label"] == lab).all())
        (torch.Size([1, 20, 24, 16]), True)
    """

    backend = AtlasCrop.backend

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int] | int,
        source_key: str = "image",
        mode: Sequence[str] | str | None = None,
        margin: Sequence[int] | int = 0,
        sigma: float = 0.0,
        largest_component: bool = True,
        align_corners: Sequence[bool | None] | bool | None = None,
        start_coord_key: str | None = "foreground_start_coord",
        end_coord_key: str | None = "foreground_end_coord",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        _check_nonneg_ints(spatial_size, "spatial_size", positive=True)
        _check_nonneg_ints(margin, "margin")
        if mode is None:
            mode = tuple("area" if k == source_key else "nearest-exact" for k in self.keys)
        modes = ensure_tuple(mode)
        if len(modes) not in (1, len(self.keys)):
            raise ValueError(f"mode must be one value or one per key: keys={self.keys}, mode={mode!r}.")
        self.source_key = source_key
        self.spatial_size = spatial_size
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.select_fn = OtsuForeground(sigma=sigma, largest_component=largest_component)
        self.cropper = CropForegroundd(
            keys=self.keys,
            source_key=source_key,
            select_fn=self.select_fn,
            margin=margin,
            allow_smaller=True,
            start_coord_key=start_coord_key,
            end_coord_key=end_coord_key,
            allow_missing_keys=allow_missing_keys,
        )
        self.resizer = Resized(
            keys=self.keys,
            spatial_size=spatial_size,
            mode=self.mode,
            align_corners=align_corners,
            allow_missing_keys=allow_missing_keys,
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.source_key not in d:
            raise KeyError(f"source_key {self.source_key!r} of AtlasCropd is missing; keys present: {list(d)}.")
        sizes = ensure_tuple(self.spatial_size)
        for key in self.key_iterator(d):
            if len(sizes) > 1 and len(sizes) != d[key].ndim - 1:
                raise ValueError(
                    f"spatial_size {tuple(sizes)} has {len(sizes)} dims but {key!r} has shape {tuple(d[key].shape)}."
                )
        return self.resizer(self.cropper(d))

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Undo resize then crop for every key (each must be the MetaTensor this transform produced).

        MONAI's ``Invertd`` calls this with only the key being inverted and ``allow_missing_keys``
        switched on; the switch is passed on to the inner ``Resized`` / ``CropForegroundd``.
        """
        d = dict(data)
        if self.allow_missing_keys:
            with allow_missing_keys_mode([self.resizer, self.cropper]):
                return self.cropper.inverse(self.resizer.inverse(d))
        return self.cropper.inverse(self.resizer.inverse(d))


AtlasCropD = AtlasCropDict = AtlasCropd
