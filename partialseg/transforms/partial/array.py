"""Array transforms of the partial-label data model.

``PartialLabelToVector`` turns a label map and its annotated classes into the ``<0,p,1>`` map
that every partialseg loss reads; ``RemapLabels`` translates a source dataset's label values
into global class indices; ``LateralSplit`` splits a paired organ stored in one label value
(KiTS kidneys) into left / right classes by the side of the patient it lies on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from partialseg._checks import check_int, check_option

__all__ = ["PartialLabelToVector", "RemapLabels", "LateralSplit", "annotated_mask"]

Annotated = Union[Sequence[int], str, NdarrayOrTensor, None]


def annotated_mask(annotated: Annotated, num_classes: int) -> torch.Tensor:
    """The annotated classes as a boolean mask of shape ``(num_classes,)``.

    Args:
        annotated: class indices, ``"all"``, ``None`` / empty (nothing annotated), or a boolean
            (or 0/1 float) mask of length ``num_classes``.
        num_classes: number of global classes.

    Raises:
        ValueError: an index is outside ``[0, num_classes)`` or a mask has the wrong length.

    Example:
        >>> annotated_mask([0, 2], 4).tolist()
        [True, False, True, False]
    """
    if annotated is None:
        return torch.zeros(num_classes, dtype=torch.bool)
    if isinstance(annotated, str):
        if annotated != "all":
            raise ValueError(f"annotated must be class indices, a mask or 'all', got {annotated!r}")
        return torch.ones(num_classes, dtype=torch.bool)
    mask = annotated.detach().cpu() if isinstance(annotated, torch.Tensor) else None
    if isinstance(annotated, np.ndarray):
        mask = torch.as_tensor(annotated)
    if mask is not None and (mask.dtype == torch.bool or mask.is_floating_point()):
        # a mask: boolean, or the float mask PartialLabelToVectord writes
        if mask.shape != (num_classes,):
            raise ValueError(f"an annotated mask must have shape ({num_classes},), got {tuple(mask.shape)}")
        return mask > 0.5 if mask.dtype != torch.bool else mask.clone()
    idx = torch.as_tensor(np.asarray(annotated, dtype=np.int64).reshape(-1))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
        raise ValueError(f"annotated class indices {idx.tolist()} are outside [0, {num_classes})")
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[idx] = True
    return mask


class PartialLabelToVector(Transform):
    """Label map + annotated classes -> the ``<0,p,1>`` class map.

    For a voxel whose value is an annotated class k: 1 for k and 0 for every other class. For a
    voxel with any other value ("one of the classes this case does not annotate"): 0 for the
    annotated classes and ``p`` for the others. A fully labelled case becomes one-hot, an
    unlabelled case (nothing annotated, or no label at all) all-``p``.

    Args:
        num_classes: number of global classes ``m`` (background included).
        p: the value of unknown entries, in (0, 1).
        dtype: output dtype.

    Example:
        >>> import numpy as np
        >>> label = np.array([[[0, 2, 1]]])             # (1, 1, 3); only class 2 annotated
        >>> PartialLabelToVector(3)(label, annotated=[2])[:, 0, :]
        array([[0.5, 0. , 0.5],
               [0.5, 0. , 0.5],
               [0. , 1. , 0. ]], dtype=float32)
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, num_classes: int, p: float = 0.5, dtype: torch.dtype = torch.float32) -> None:
        check_int(num_classes, "num_classes", minimum=2)
        if not 0.0 < float(p) < 1.0:
            raise ValueError(f"p must lie strictly between 0 and 1, got {p!r}")
        self.num_classes = num_classes
        self.p = float(p)
        self.dtype = dtype

    def __call__(self, label: NdarrayOrTensor | None, annotated: Annotated, spatial_shape: Sequence[int] | None = None) -> NdarrayOrTensor:
        """
        Args:
            label: label map ``(1, H, W[, D])`` of global class indices; ``None`` for an
                unlabelled case (then ``spatial_shape`` gives the output's size).
            annotated: see :func:`annotated_mask`.
            spatial_shape: spatial size for an unlabelled case without a label.

        Returns:
            ``(num_classes, H, W[, D])`` map of the type of ``label`` (torch when it is None).
        """
        m = self.num_classes
        ann = annotated_mask(annotated, m)
        if label is None:
            if ann.any():
                raise ValueError(f"classes {ann.nonzero().flatten().tolist()} are annotated but no label was given")
            if spatial_shape is None:
                raise ValueError("an unlabelled case needs spatial_shape (or a label) to size its <0,p,1> map")
            return torch.full((m, *spatial_shape), self.p, dtype=self.dtype)
        lab = convert_to_tensor(label, track_meta=False)
        if lab.ndim < 2 or lab.shape[0] != 1:
            raise ValueError(f"label must be channel-first with one channel, (1, H, W[, D]); got shape {tuple(lab.shape)}")
        lab = lab[0]
        if lab.is_floating_point():
            rounded = lab.round()
            off = (lab - rounded).abs() > 1e-3  # NaN compares False: caught as out of range below
            if bool(off.any()):
                raise ValueError(
                    f"label holds the non-integer value {float(lab[off][0]):g}: class indices are integers"
                    " (resample labels with nearest-neighbour interpolation)"
                )
            lab = rounded
        bad = ~((lab >= 0) & (lab < m))  # NaN is outside too
        if bool(bad.any()):
            values = sorted({float(v) for v in lab[bad].unique()[:5].tolist()})
            raise ValueError(
                f"label holds value(s) {[int(v) if v == v else v for v in values]} outside the class indices [0, {m}):"
                " map source values to classes first (label_maps, RemapLabels)"
            )
        lab = lab.long()
        ann = ann.to(lab.device)
        known = ann[lab]  # voxels that carry an annotated class
        view = (m,) + (1,) * lab.ndim
        unknown_value = (~ann).to(self.dtype).mul(self.p).view(view)
        onehot = lab.unsqueeze(0) == torch.arange(m, device=lab.device).view(view)
        out = torch.where(known.unsqueeze(0), onehot.to(self.dtype), unknown_value)
        return convert_to_dst_type(out, label, dtype=self.dtype)[0]


def _affine_of(label: NdarrayOrTensor, affine: NdarrayOrTensor | None) -> np.ndarray:
    if affine is None and isinstance(label, MetaTensor):
        affine = label.affine
    if affine is None:
        raise ValueError(
            "a lateral split needs the image's affine (world coordinates decide left and right, not array order): "
            "pass a MetaTensor or affine="
        )
    return np.asarray(convert_to_tensor(affine, track_meta=False).cpu(), dtype=np.float64)


class LateralSplit(Transform):
    """Split a paired organ stored in one label value into a left and a right class.

    Each connected component of ``label == value`` goes to ``left`` or ``right`` by the side of
    the patient its centroid lies on, in world coordinates read from the affine (so a flipped
    array order changes nothing). With ``space="RAS"`` (MONAI's and nibabel's convention) the
    patient's right is at larger x; with ``"LPS"`` (ITK, DICOM) the patient's left is.

    Args:
        value: the label value holding both organs (e.g. KiTS kidney = 1).
        left: class index for components on the patient's left.
        right: class index for components on the patient's right.
        midline: world x (mm) of the sagittal midline; ``"center"`` (default) uses the
            centre of the image grid, ``"mask"`` the centroid of all voxels of ``value``.
        space: ``"RAS"`` or ``"LPS"``, the convention of the affine.
        connectivity: neighbourhood for connected components (1 = faces, ndim = full).

    Example:
        >>> import numpy as np, torch
        >>> lab = np.zeros((1, 8, 2), dtype=np.int64); lab[0, 1, 0] = lab[0, 6, 0] = 1
        >>> out = LateralSplit(value=1, left=3, right=4)(lab, affine=np.eye(3))
        >>> out[0, :, 0].tolist()          # RAS: small x is the patient's left
        [0, 3, 0, 0, 0, 0, 4, 0]
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, value: int, left: int, right: int, midline: float | str = "center", space: str = "RAS", connectivity: int | None = None) -> None:
        check_option(space, ("RAS", "LPS"), "space")
        if isinstance(midline, str) and midline not in ("center", "mask"):
            raise ValueError(f"midline must be a world x in mm, 'center' or 'mask', got {midline!r}")
        self.value, self.left, self.right = int(value), int(left), int(right)
        self.midline, self.space, self.connectivity = midline, space, connectivity

    def sides(self, label: NdarrayOrTensor, affine: NdarrayOrTensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks ``(on_left, on_right)`` of the voxels of ``value``, shaped like ``label``."""
        from scipy import ndimage

        aff = _affine_of(label, affine)
        lab = np.asarray(convert_to_tensor(label, track_meta=False).cpu())
        if lab.ndim < 2 or lab.shape[0] != 1:
            raise ValueError(f"label must be channel-first with one channel, (1, H, W[, D]); got shape {lab.shape}")
        mask = lab == self.value
        spatial, nd = mask[0], mask.ndim - 1
        if nd == 2 and aff.shape == (4, 4):
            # a 2D NIfTI image lies in 3D world space: MONAI keeps its 4 x 4 affine; the slice's
            # third voxel index is 0, so its world x depends on the first two columns only
            aff = aff[np.ix_([0, 1, 3], [0, 1, 3])]
        if aff.shape != (nd + 1, nd + 1):
            raise ValueError(f"affine must be {(nd + 1, nd + 1)} for a {nd}D label, got shape {aff.shape}")
        structure = ndimage.generate_binary_structure(nd, self.connectivity or nd)
        components, n = ndimage.label(spatial, structure=structure)
        left = np.zeros_like(spatial)
        right = np.zeros_like(spatial)
        if n:
            centroids = np.asarray(ndimage.center_of_mass(spatial, components, range(1, n + 1))).reshape(n, nd)
            world_x = centroids @ aff[0, :nd] + aff[0, nd]
            if self.midline == "center":
                centre = (np.asarray(spatial.shape, dtype=np.float64) - 1) / 2
                mid = float(centre @ aff[0, :nd] + aff[0, nd])
            elif self.midline == "mask":
                mid = float((np.asarray(ndimage.center_of_mass(spatial)) @ aff[0, :nd]) + aff[0, nd])
            else:
                mid = float(self.midline)
            is_left = world_x < mid if self.space == "RAS" else world_x > mid
            lut = np.concatenate([[False], is_left])
            left = lut[components] & spatial
            right = ~lut[components] & spatial
        return left.reshape(mask.shape), right.reshape(mask.shape)

    def __call__(self, label: NdarrayOrTensor, affine: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        """
        Args:
            label: label map ``(1, H, W[, D])`` (a MetaTensor carries its affine).
            affine: voxel-to-world matrix ``(nd+1, nd+1)`` when ``label`` is not a MetaTensor.
        """
        on_left, on_right = self.sides(label, affine)
        out = np.array(convert_to_tensor(label, track_meta=False).cpu())
        out[on_left] = self.left
        out[on_right] = self.right
        return convert_to_dst_type(out, label)[0]


class RemapLabels(Transform):
    """Translate a source dataset's label values into global class indices.

    Args:
        label_map: source value -> global class index, or ``(left, right)`` indices for a
            lateral split (see :class:`LateralSplit`). Value 0 maps to 0 unless listed.
        midline, space: passed to :class:`LateralSplit` for lateral entries.

    Raises (when called):
        ValueError: the label holds a non-zero value that ``label_map`` does not list.

    Example:
        >>> import numpy as np
        >>> RemapLabels({1: 2, 2: 2})(np.array([[0, 1, 2]]))   # MSD liver + tumour -> liver (2)
        array([[0, 2, 2]])
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, label_map: Mapping[int | str, int | Sequence[int]], midline: float | str = "center", space: str = "RAS") -> None:
        self.plain: dict[int, int] = {}
        self.lateral: dict[int, LateralSplit] = {}
        for k, v in label_map.items():
            key = int(k)
            if key < 0:
                raise ValueError(f"label_map[{k!r}]: source values are non-negative integers (label files hold class values 0, 1, ...)")
            if isinstance(v, (list, tuple)):
                if len(v) != 2:
                    raise ValueError(f"label_map[{k!r}]: a lateral split needs [left, right], got {v!r}")
                self.lateral[key] = LateralSplit(key, int(v[0]), int(v[1]), midline=midline, space=space)
            else:
                self.plain[key] = int(v)
        self.plain.setdefault(0, 0)

    def __call__(self, label: NdarrayOrTensor, affine: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        """
        Args:
            label: label map of source values, ``(1, H, W[, D])``.
            affine: voxel-to-world matrix, needed for lateral entries when ``label`` is not a MetaTensor.
        """
        lab = np.asarray(convert_to_tensor(label, track_meta=False).cpu())
        if lab.dtype.kind == "f":
            lab = np.rint(lab)
        lab = lab.astype(np.int64)
        values = np.unique(lab)
        listed = set(self.plain) | set(self.lateral)
        unlisted = [int(v) for v in values if int(v) not in listed]
        if unlisted:
            raise ValueError(f"label holds value(s) {unlisted} that the label map {sorted(listed)} does not list")
        lut = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.int64)
        for k, v in self.plain.items():
            if k < lut.size:
                lut[k] = v
        out = lut[lab]
        for k, split in self.lateral.items():
            if k < lut.size and (lab == k).any():
                on_left, on_right = split.sides(label if affine is None else lab, affine)
                out[on_left] = split.left
                out[on_right] = split.right
        return convert_to_dst_type(out, label, dtype=out.dtype)[0]
