"""Dictionary wrappers of :mod:`partialseg.transforms.mix.array`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms.transform import MapTransform
from monai.utils import ensure_tuple

from partialseg.transforms.mix.array import ForegroundPaste

__all__ = ["ForegroundPasted", "ForegroundPasteD", "ForegroundPasteDict"]


class ForegroundPasted(MapTransform):
    """Dictionary-based wrapper of :py:class:`partialseg.transforms.mix.ForegroundPaste`.

    Both samples live in the same dictionary: ``keys`` name the receiving sample's items (``x_j`` and
    its label / pseudo-label), ``source_keys`` the pasted sample's items in the same order
    (``x_i`` ...), and ``mask_key`` the region ``B`` to paste. Every pair gets the SAME mask, so the
    image, the label and any pseudo-label are mixed consistently. All shapes are checked before
    anything is written.

    In the hybrid method, ``x_i`` is a strongly labelled sample from the DII-weighted sampler,
    ``B`` the mask of a random class ``c`` of its ground truth (e.g. MONAI
    ``CopyItemsd(keys="label_i", names="mask")`` then ``LabelToMaskd(keys="mask",
    select_labels=c)``), ``x_j`` a sample of the uniform sampler, and the pasted keys are the image
    and both networks' predictions, giving ``x_m`` and its pseudo-labels (Eq. 4 and 6).

    Args:
        keys: keys of the receiving sample (overwritten unless ``output_keys`` is given).
        source_keys: keys of the pasted sample, one per key.
        mask_key: key of the mask, ``(1, *spatial)`` or ``(C, *spatial)``, binary or soft.
        mask_threshold: None to use the mask as given, or a threshold binarising it.
        output_keys: where to write the mixed items, one per key; None overwrites ``keys``.
        allow_missing_keys: skip a key (and its source) when the key is missing.

    Raises:
        ValueError: ``source_keys`` / ``output_keys`` not one per key; shapes that do not match
            (the message names the keys and their shapes).
        KeyError: a missing source or mask key.

    Example:
        >>> import torch
        >>> d = {"image_j": torch.zeros(1, 2, 2), "label_j": torch.zeros(1, 2, 2, dtype=torch.long),
        ...      "image_i": torch.ones(1, 2, 2), "label_i": torch.full((1, 2, 2), 3), "mask": torch.eye(2)[None]}
        >>> t = ForegroundPasted(
        ...     ["image_j", "label_j"], ["image_i", "label_i"], "mask", output_keys=["image_m", "label_m"]
        ... )
        >>> out = t(d)
        >>> out["image_m"].tolist(), out["label_m"].tolist()
        ([[[1.0, 0.0], [0.0, 1.0]]], [[[3, 0], [0, 3]]])
    """

    backend = ForegroundPaste.backend

    def __init__(
        self,
        keys: KeysCollection,
        source_keys: KeysCollection,
        mask_key: str,
        mask_threshold: float | None = None,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_keys = ensure_tuple(source_keys)
        self.output_keys = self.keys if output_keys is None else ensure_tuple(output_keys)
        if len(self.source_keys) != len(self.keys):
            raise ValueError(
                f"source_keys must have one entry per key: keys={self.keys}, source_keys={self.source_keys}."
            )
        if len(self.output_keys) != len(self.keys):
            raise ValueError(
                f"output_keys must have one entry per key: keys={self.keys}, output_keys={self.output_keys}."
            )
        self.mask_key = mask_key
        self.paster = ForegroundPaste(mask_threshold=mask_threshold)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        items = list(self.key_iterator(d, self.source_keys, self.output_keys))
        if not items:
            return d
        if self.mask_key not in d:
            raise KeyError(f"mask_key {self.mask_key!r} of ForegroundPasted is missing; keys present: {list(d)}.")
        mask = d[self.mask_key]
        for key, src_key, _ in items:
            if src_key not in d:
                raise KeyError(f"source key {src_key!r} (for {key!r}) of ForegroundPasted is missing.")
            ForegroundPaste.check_shapes(
                d[src_key].shape,
                d[key].shape,
                mask.shape,
                names=(f"source {src_key!r}", f"target {key!r}", f"mask {self.mask_key!r}"),
            )
        for key, src_key, out_key in items:
            d[out_key] = self.paster(d[src_key], d[key], mask)
        return d


ForegroundPasteD = ForegroundPasteDict = ForegroundPasted
