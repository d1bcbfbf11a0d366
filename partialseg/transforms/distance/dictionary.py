"""Dictionary wrappers of :mod:`partialseg.transforms.distance.array`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from monai.config import KeysCollection
from monai.config.type_definitions import DtypeLike, NdarrayOrTensor
from monai.transforms.transform import MapTransform
from monai.utils import ensure_tuple

from partialseg.transforms.distance.array import SignedDistanceMap

__all__ = ["SignedDistanceMapd", "SignedDistanceMapD", "SignedDistanceMapDict"]


class SignedDistanceMapd(MapTransform):
    """Dictionary-based wrapper of :py:class:`partialseg.transforms.distance.SignedDistanceMap`.

    Args:
        keys: keys of the label maps / masks to convert.
        num_classes: see :class:`SignedDistanceMap` (label-map input when set, masks otherwise).
        include_background: keep class / channel 0.
        spacing: None, a number, one number per spatial dim, or ``"meta"`` to read each item's
            spacing from its MetaTensor ``pixdim`` (as loaded by ``LoadImaged``).
        num_workers: threads over classes.
        dtype: output dtype.
        output_keys: where to write the maps, one per key; None overwrites ``keys`` (DTML usually keeps
            the label and writes e.g. ``output_keys="sdm"``).
        allow_missing_keys: skip keys that are missing instead of raising.

    Example:
        >>> import numpy as np
        >>> label = np.zeros((1, 6, 6, 6), dtype=np.int64); label[0, 1:4, 1:5, 2:5] = 1
        >>> out = SignedDistanceMapd("label", num_classes=2, output_keys="sdm")({"label": label})
        >>> out["sdm"].shape, out["label"] is label, float(out["sdm"].min()), float(out["sdm"].max())
        ((1, 6, 6, 6), True, -1.0, 1.0)
    """

    backend = SignedDistanceMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int | None = None,
        include_background: bool = False,
        spacing: float | Sequence[float] | str | None = None,
        num_workers: int = 1,
        dtype: DtypeLike | torch.dtype = np.float32,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = self.keys if output_keys is None else ensure_tuple(output_keys)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(
                f"output_keys must have one entry per key: keys={self.keys}, output_keys={self.output_keys}."
            )
        self.converter = SignedDistanceMap(
            num_classes=num_classes,
            include_background=include_background,
            spacing=spacing,
            num_workers=num_workers,
            dtype=dtype,
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.converter(d[key])
        return d


SignedDistanceMapD = SignedDistanceMapDict = SignedDistanceMapd
