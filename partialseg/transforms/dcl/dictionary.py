"""Dictionary wrappers of :mod:`partialseg.transforms.dcl.array`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from partialseg.transforms.dcl.array import ConditionalSupervision

__all__ = ["ConditionalSupervisiond", "ConditionalSupervisionD", "ConditionalSupervisionDict"]


class ConditionalSupervisiond(MapTransform):
    """Dictionary version of :class:`ConditionalSupervision`: ``z = g(y_t, y_c)`` (DCL Eq. 5).

    For each key (a target ``<0,p,1>`` map ``(m, *spatial)``) writes ``(2m, *spatial)`` to the
    matching ``output_keys`` entry (default ``"<key>_z"``), reading the conditional labels from
    ``cond_label_key``. The input keys are left in place.

    Args:
        keys: target keys.
        cond_label_key: key of the ``(m, *spatial)`` conditional labels.
        output_keys: output key per key (None: ``key + "_z"``).
        dtype: output dtype (None keeps the target's floating dtype).
        allow_missing_keys: don't raise when a key is missing.

    Example:
        >>> import torch
        >>> d = {"label": torch.tensor([[[1.0]], [[0.0]]]), "cond_label": torch.tensor([[[0.0]], [[1.0]]])}
        >>> ConditionalSupervisiond("label")(d)["label_z"].flatten().tolist()
        [0.0, 0.0, 1.0, 0.0]
    """

    backend = ConditionalSupervision.backend

    def __init__(
        self,
        keys: KeysCollection,
        cond_label_key: str = "cond_label",
        output_keys: KeysCollection | None = None,
        dtype: torch.dtype | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if output_keys is None:
            self.output_keys = tuple(f"{k}_z" for k in self.keys)
        else:
            self.output_keys = (output_keys,) if isinstance(output_keys, str) else tuple(output_keys)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"output_keys {list(self.output_keys)} must name one output per key {list(self.keys)}.")
        self.cond_label_key = cond_label_key
        self.g = ConditionalSupervision(dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        if self.cond_label_key not in d:
            raise KeyError(f"cond_label_key {self.cond_label_key!r} is missing from the data (keys {sorted(map(str, d))}).")
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.g(d[key], d[self.cond_label_key])
        return d


ConditionalSupervisionD = ConditionalSupervisionDict = ConditionalSupervisiond
