"""Dictionary wrapper of :mod:`partialseg.transforms.intensity.array`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms.transform import MapTransform

from partialseg.transforms.intensity.array import ModalityIntensity

__all__ = ["ModalityIntensityd", "ModalityIntensityD", "ModalityIntensityDict"]


class ModalityIntensityd(MapTransform):
    """Dictionary-based wrapper of :py:class:`partialseg.transforms.intensity.ModalityIntensity`:
    the images of ``keys`` normalised by the scheme of the item's ``data[modality_key]``.

    The atlas bundle's normalisation (``bundles/atlas_multimodal_abdomen``: ``ct_window``,
    ``intensity_by_modality``, ``modality_key``, ``default_modality``). Not invertible (an
    intensity change; ``Invertd`` skips it).

    Args:
        keys: keys of the images to normalise.
        modality_key: the item key holding its modality (a string such as ``"CT"``); a missing key,
            None or ``""`` falls back to ``default_modality``.
        by_modality: scheme per modality, see :class:`ModalityIntensity`.
        window: ``(lo, hi)`` of the ``"window"`` scheme.
        default_modality: the modality of an item without one (None: such an item is refused).
        case_key: the item key whose value names the case in errors (absent: not named).
        allow_missing_keys: skip keys that are missing instead of raising.

    Raises:
        ValueError: as :class:`ModalityIntensity`; an item whose modality has no entry is refused
            naming its case, its modality and the known modalities.

    Example:
        >>> import torch
        >>> t = ModalityIntensityd("image", modality_key="modality", window=(-100.0, 100.0))
        >>> t({"image": torch.tensor([[-200.0, 50.0]]), "modality": "CT", "case": "a"})["image"].tolist()
        [[-1.0, 0.5]]
    """

    backend = ModalityIntensity.backend

    def __init__(
        self,
        keys: KeysCollection,
        modality_key: str = "modality",
        by_modality: Mapping[str, str] | None = None,
        window: Sequence[float] = (-325.0, 325.0),
        default_modality: str | None = None,
        case_key: str | None = "case",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality_key, self.case_key = modality_key, case_key
        self.normaliser = ModalityIntensity(by_modality=by_modality, window=window, default_modality=default_modality)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        modality = d.get(self.modality_key)
        case = d.get(self.case_key) if self.case_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.normaliser(d[key], modality=modality, case=case)
        return d


ModalityIntensityD = ModalityIntensityDict = ModalityIntensityd
