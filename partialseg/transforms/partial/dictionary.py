"""Dictionary wrappers of :mod:`partialseg.transforms.partial.array`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from partialseg.transforms.partial.array import LateralSplit, PartialLabelToVector, RemapLabels, annotated_mask

__all__ = [
    "PartialLabelToVectord",
    "PartialLabelToVectorD",
    "PartialLabelToVectorDict",
    "RemapLabelsd",
    "RemapLabelsD",
    "RemapLabelsDict",
    "LateralSplitd",
    "LateralSplitD",
    "LateralSplitDict",
]


class PartialLabelToVectord(MapTransform):
    """Dictionary version of :class:`PartialLabelToVector`.

    Replaces each label key by its ``<0,p,1>`` map ``(num_classes, *spatial)``, reading the
    case's annotated classes from ``annotated_key``. An unlabelled case (the label key missing
    or None, nothing annotated) gets an all-``p`` map sized like ``image_key``. Afterwards
    ``annotated_key`` holds a float mask of shape ``(num_classes,)`` (1 = annotated), so cases
    with different annotated sets collate into one batch.

    Args:
        keys: label keys to convert.
        num_classes: number of global classes.
        annotated_key: key of the case's annotated class indices (or "all", or a mask).
        p: value of unknown entries.
        image_key: key whose spatial shape sizes an unlabelled case's map.
        allow_missing_keys: don't raise when a key is missing (an unlabelled case still gets
            its all-``p`` map when ``image_key`` is present).

    Example:
        >>> import numpy as np
        >>> d = {"image": np.zeros((1, 2, 2)), "label": np.array([[[0, 1], [1, 0]]]), "annotated": [1]}
        >>> out = PartialLabelToVectord("label", num_classes=3)(d)
        >>> out["label"][:, 0, :].tolist(), out["annotated"].tolist()
        ([[0.5, 0.0], [0.0, 1.0], [0.5, 0.0]], [0.0, 1.0, 0.0])
    """

    backend = PartialLabelToVector.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        annotated_key: str = "annotated",
        p: float = 0.5,
        image_key: str = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = PartialLabelToVector(num_classes, p=p)
        self.annotated_key = annotated_key
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        annotated = d.get(self.annotated_key)
        for key in self.keys:
            label = d.get(key)
            if label is None:
                if key not in d and not self.allow_missing_keys and self.image_key not in d:
                    raise KeyError(f"key {key!r} is missing and no {self.image_key!r} sizes an unlabelled map")
                if self.image_key not in d:
                    continue
                image = d[self.image_key]
                from monai.utils import convert_to_dst_type

                out = self.converter(None, annotated, spatial_shape=tuple(image.shape[1:]))
                d[key] = convert_to_dst_type(out, image, dtype=out.dtype)[0]
            else:
                try:
                    d[key] = self.converter(label, annotated)
                except ValueError as e:
                    raise ValueError(f"{_where(d)}key {key!r}: {e}") from None
        d[self.annotated_key] = annotated_mask(annotated, self.converter.num_classes).to(torch.float32)
        return d


class RemapLabelsd(MapTransform):
    """Dictionary version of :class:`RemapLabels`, with a label map per case.

    The map comes from ``label_map_key`` of each case (as ``PartialDataset.datalist`` writes
    it for sources that have one); a case without one is left unchanged. The map key is
    consumed (removed from the output) so cases of different sources collate.

    Args:
        keys: label keys.
        label_map_key: key of the case's ``{source value: class index or [left, right]}`` map.
        midline, space: for lateral splits (see :class:`LateralSplit`); the label must be a
            MetaTensor (as ``LoadImaged`` gives) so the split can read its affine.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = RemapLabels.backend

    def __init__(self, keys: KeysCollection, label_map_key: str = "label_map", midline: float | str = "center", space: str = "RAS", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_map_key = label_map_key
        self.midline, self.space = midline, space

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        label_map = d.pop(self.label_map_key, None)
        if label_map is None:
            return d
        try:
            remap = RemapLabels(label_map, midline=self.midline, space=self.space)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{_where(d)}{self.label_map_key!r} {label_map!r}: {e}") from None
        for key in self.key_iterator(d):
            if d[key] is None:
                continue
            try:
                d[key] = remap(d[key])
            except ValueError as e:
                raise ValueError(f"{_where(d)}key {key!r}: {e}") from None
        return d


def _where(d: Mapping[Hashable, object]) -> str:
    """``"case 'x' (file): "`` for error messages, from a case's ``case`` and label file name."""
    case = d.get("case")
    meta = getattr(d.get("label"), "meta", None) or {}
    path = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    parts = ([f"case {case!r}"] if case is not None else []) + ([f"({path})"] if path else [])
    return " ".join(parts) + ", " if parts else "case '?', "


class LateralSplitd(MapTransform):
    """Dictionary version of :class:`LateralSplit` (labels must be MetaTensors or ``affine_key`` given).

    Args:
        keys: label keys.
        value, left, right, midline, space, connectivity: see :class:`LateralSplit`.
        affine_key: optional key holding the affine, for plain arrays.
        allow_missing_keys: don't raise when a key is missing.
    """

    backend = LateralSplit.backend

    def __init__(
        self,
        keys: KeysCollection,
        value: int,
        left: int,
        right: int,
        midline: float | str = "center",
        space: str = "RAS",
        connectivity: int | None = None,
        affine_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.splitter = LateralSplit(value, left, right, midline=midline, space=space, connectivity=connectivity)
        self.affine_key = affine_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        affine = d[self.affine_key] if self.affine_key else None
        for key in self.key_iterator(d):
            d[key] = self.splitter(d[key], affine)
        return d


PartialLabelToVectorD = PartialLabelToVectorDict = PartialLabelToVectord
RemapLabelsD = RemapLabelsDict = RemapLabelsd
LateralSplitD = LateralSplitDict = LateralSplitd
