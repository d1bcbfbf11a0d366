"""Array transforms computing distance-based targets (signed distance maps for DTML)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy import ndimage as ndi

from monai.config.type_definitions import DtypeLike, NdarrayOrTensor
from monai.data.meta_tensor import MetaTensor
from monai.transforms.transform import Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type

from partialseg._checks import check_int

__all__ = ["SignedDistanceMap", "signed_distance_map"]


def _normalize_spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray | None:
    """Spacing as a float64 array of length ``ndim`` (or None for unit spacing); raises on bad values."""
    if spacing is None:
        return None
    arr = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, ndim)
    if arr.size != ndim:
        raise ValueError(f"spacing must have one value or {ndim} values (one per spatial dim), got {spacing!r}.")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"spacing values must be finite and positive, got {spacing!r}.")
    return arr


def _edt_float32(mask: np.ndarray, sampling: np.ndarray | None) -> np.ndarray:
    """Exact Euclidean distance of every voxel of ``mask`` to its nearest zero voxel, as float32.

    SciPy's exact feature transform (``distance_transform_edt(..., return_indices=True)``) gives the
    nearest zero voxel; the distances are then summed axis by axis in float32 with broadcast
    coordinate ranges, which avoids SciPy's float64 ``(ndim, *spatial)`` temporaries.
    Squared integer offsets are exact in float32 (< 2**24), so the result differs from SciPy's only
    by the final float32 rounding.
    """
    ft = ndi.distance_transform_edt(mask, sampling=sampling, return_distances=False, return_indices=True)
    out = np.zeros(mask.shape, dtype=np.float32)
    tmp = np.empty(mask.shape, dtype=np.float32)
    for ax in range(mask.ndim):
        shape = [1] * mask.ndim
        shape[ax] = mask.shape[ax]
        coords = np.arange(mask.shape[ax], dtype=np.int32).reshape(shape)
        np.subtract(ft[ax], coords, out=tmp, casting="unsafe")
        if sampling is not None:
            tmp *= np.float32(sampling[ax])
        np.multiply(tmp, tmp, out=tmp)
        out += tmp
    np.sqrt(out, out=out)
    return out


def signed_distance_map(mask: np.ndarray, spacing: float | Sequence[float] | None = None) -> np.ndarray:
    """Normalised signed distance map of one binary mask, as in the DTML reference code.

    ``sdm = outside / max(outside) - inside / max(inside)``, where ``outside`` is the Euclidean
    distance of a background voxel to the nearest object voxel and ``inside`` the distance of an
    object voxel to the nearest background voxel; object voxels with a face neighbour in the
    background (the inner boundary, skimage's ``find_boundaries(mode="inner")``) are set to 0.
    Values lie in [-1, 1]: negative inside, positive outside.

    Edge cases: an empty mask gives all zeros (as the reference); a mask covering the whole image has
    no outside and no boundary, and gives -1 everywhere (the reference divides 0 by 0 there), so
    that DTML's ``sigmoid(-k * sdm)`` recovers the all-ones mask.

    Args:
        mask: binary array of shape ``(*spatial)`` (2D or 3D or any dimension); nonzero = object.
        spacing: voxel size per spatial dimension (or one value for all); None means 1.

    Returns:
        float32 array of shape ``(*spatial)``.

    Example:
        >>> import numpy as np
        >>> m = np.zeros((1, 7), dtype=bool); m[0, 2:5] = True
        >>> signed_distance_map(m).round(2).tolist()
        [[1.0, 0.5, 0.0, -1.0, 0.0, 0.5, 1.0]]
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    sampling = _normalize_spacing(spacing, mask.ndim)
    out = np.zeros(mask.shape, dtype=np.float32)
    if not mask.any():
        return out
    if mask.all():
        out.fill(-1.0)
        return out
    # outside distance: needs the whole volume (one exact EDT); inside voxels get 0.
    outside = _edt_float32(~mask, sampling)
    np.divide(outside, outside.max(), out=out)
    # inside distance: nonzero only inside the object; the object's bounding box plus a one-voxel
    # margin (clipped to the image) holds every object voxel and, for each, a nearest background voxel.
    nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax))) for ax in range(mask.ndim)]
    box = tuple(slice(max(int(i[0]) - 1, 0), min(int(i[-1]) + 2, s)) for i, s in zip(nz, mask.shape))
    sub = mask[box]
    inside = ndi.distance_transform_edt(sub, sampling=sampling)
    inside /= inside.max()
    region = out[box]
    region -= inside.astype(np.float32)
    # inner boundary: object voxels whose face neighbourhood leaves the object; the image border is
    # not a boundary (border_value=1), as in skimage's find_boundaries.
    structure = ndi.generate_binary_structure(mask.ndim, 1)
    boundary = sub & ~ndi.binary_erosion(sub, structure=structure, border_value=1)
    region[boundary] = 0.0
    return out


class SignedDistanceMap(Transform):
    """Per-class normalised signed distance maps, as in the DTML reference code.

    For each class ``c`` the mask ``label == c`` (label-map input) or channel ``c`` (mask input) is
    turned into ``outside / max(outside) - inside / max(inside)`` with 0 on the inner boundary
    (see :func:`signed_distance_map`): values in [-1, 1], negative inside the object, positive
    outside, all zeros for a class that is absent. The reference normalises per sample and per
    class; so does this transform (each call is one sample).

    Distances are exact Euclidean distances (SciPy's exact EDT): one full-volume transform per class
    for the outside distance, the inside distance and the boundary only on the object's bounding box
    plus a one-voxel margin, arithmetic in float32.

    Args:
        num_classes: if given, the input is a label map ``(1, *spatial)`` with integer values in
            ``[0, num_classes)`` and class ``c`` is ``label == c``. If None, the input is a stack of
            masks ``(C, *spatial)`` (one-hot or independent binary masks), nonzero = object.
        include_background: keep class / channel 0. False (the default, as the reference code,
            which computes foreground classes only) drops it; for a single binary mask
            ``(1, *spatial)`` pass ``include_background=True`` or use ``num_classes=2``.
        spacing: voxel size used by the distance transform: None (unit), one float, one float per
            spatial dim, or ``"meta"`` to read it from the input MetaTensor's ``pixdim``. As every
            class is normalised by its maximum distance, spacing changes the map only through
            anisotropy.
        num_workers: threads over classes (SciPy's feature transform releases the GIL); 1 = serial.
        dtype: output dtype (float32 by default).

    Shapes:
        input ``(1, *spatial)`` label map or ``(C, *spatial)`` masks, 2D or 3D, numpy or torch;
        output ``(C', *spatial)`` of the same type (MetaTensor metadata kept), with
        ``C' = num_classes (or C) - (0 if include_background else 1)``.

    Raises:
        ValueError: bad ``num_classes``, ``spacing`` or ``num_workers``; a label map with more than
            one channel or values outside ``[0, num_classes)``; nothing left after dropping the
            background; ``spacing="meta"`` on an input without metadata.

    Example:
        >>> import numpy as np
        >>> label = np.zeros((1, 5, 5), dtype=np.int64); label[0, 1:4, 1:4] = 1
        >>> sdm = SignedDistanceMap(num_classes=2)(label)
        >>> sdm.shape, float(sdm[0, 2, 2]), float(sdm[0, 1, 1]), float(sdm[0, 0, 0])
        ((1, 5, 5), -1.0, 0.0, 1.0)
    """

    backend = [TransformBackends.NUMPY, TransformBackends.TORCH]

    def __init__(
        self,
        num_classes: int | None = None,
        include_background: bool = False,
        spacing: float | Sequence[float] | str | None = None,
        num_workers: int = 1,
        dtype: DtypeLike | torch.dtype = np.float32,
    ) -> None:
        if num_classes is not None:
            check_int(num_classes, "num_classes", minimum=1)
            if num_classes < 2 and not include_background:
                raise ValueError(
                    f"num_classes={num_classes} with include_background=False leaves no class to compute."
                )
        if isinstance(spacing, str):
            if spacing != "meta":
                raise ValueError(f"spacing must be None, a number, a sequence or 'meta', got {spacing!r}.")
        elif spacing is not None:
            _normalize_spacing(spacing, np.asarray(spacing).size)
        check_int(num_workers, "num_workers", minimum=1)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.include_background = bool(include_background)
        self.spacing = spacing
        self.num_workers = int(num_workers)
        self.dtype = dtype

    def _resolve_spacing(self, img: NdarrayOrTensor, spacing, ndim: int) -> np.ndarray | None:
        spacing = self.spacing if spacing is None else spacing
        if isinstance(spacing, str):
            if spacing != "meta":
                raise ValueError(f"spacing must be None, a number, a sequence or 'meta', got {spacing!r}.")
            if not isinstance(img, MetaTensor):
                raise ValueError(f"spacing='meta' needs a MetaTensor input, got {type(img).__name__}.")
            spacing = img.pixdim.detach().cpu().numpy()[:ndim]
        return _normalize_spacing(spacing, ndim)

    def __call__(self, img: NdarrayOrTensor, spacing: float | Sequence[float] | str | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: ``(1, *spatial)`` label map (``num_classes`` set) or ``(C, *spatial)`` masks.
            spacing: overrides the constructor's ``spacing`` for this call (same options).

        Returns:
            ``(C', *spatial)`` signed distance maps, same container type as ``img``.
        """
        arr = convert_data_type(img, np.ndarray)[0]
        if arr.ndim < 2:
            raise ValueError(f"img must be channel-first (C, *spatial), got shape {tuple(arr.shape)}.")
        ndim = arr.ndim - 1
        sampling = self._resolve_spacing(img, spacing, ndim)
        if self.num_classes is not None:
            if arr.shape[0] != 1:
                raise ValueError(
                    f"with num_classes set the input must be a label map (1, *spatial), got shape {tuple(arr.shape)}."
                )
            lab = arr[0]
            if lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
                raise ValueError(
                    f"label values must lie in [0, {self.num_classes}), got range [{lab.min()}, {lab.max()}]."
                )
            if not np.issubdtype(lab.dtype, np.integer) and not np.array_equal(lab, np.round(lab)):
                raise ValueError("label map values must be integers (class indices).")
            start = 0 if self.include_background else 1
            masks = [(lab == c) for c in range(start, self.num_classes)]
        else:
            start = 0 if self.include_background else 1
            if arr.shape[0] - start < 1:
                raise ValueError(
                    f"input has {arr.shape[0]} channel(s) and include_background=False leaves none; pass "
                    "include_background=True for a single binary mask, or num_classes for a label map."
                )
            masks = [arr[c] != 0 for c in range(start, arr.shape[0])]

        def one(m: np.ndarray) -> np.ndarray:
            return signed_distance_map(m, sampling)

        if self.num_workers > 1 and len(masks) > 1:
            with ThreadPoolExecutor(max_workers=min(self.num_workers, len(masks))) as pool:
                maps = list(pool.map(one, masks))
        else:
            maps = [one(m) for m in masks]
        out = np.stack(maps, axis=0) if maps else np.zeros((0, *arr.shape[1:]), dtype=np.float32)
        return convert_to_dst_type(out, img, dtype=self.dtype)[0]
