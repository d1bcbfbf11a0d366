"""Array intensity transform: normalise an image by the scheme of its modality (atlas method)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms.transform import Transform
from monai.utils import TransformBackends, convert_to_dst_type

from partialseg._checks import check_option

__all__ = ["INTENSITY_SCHEMES", "ModalityIntensity"]

#: the schemes a modality may map to
INTENSITY_SCHEMES = ("window", "zscore")


class ModalityIntensity(Transform):
    """Normalise an image by the scheme its modality maps to: a CT window scaled to [-1, 1], or a
    z-score over the image.

    The atlas method's normalisation (Liu et al., MICCAI 2024): CT is clipped to a soft-tissue
    window (the paper's [-325, 325] HU) and scaled to [-1, 1]; MR, whose intensities have no
    absolute unit, is z-scored per image. With ``window = (lo, hi)``:

    - ``"window"``: ``(clamp(x, lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)``;
    - ``"zscore"``: ``(x - mean(x)) / max(std(x), 1e-6)`` (``torch.std``, unbiased), over every
      voxel and channel of the image.

    A modality that is None or ``""`` falls back to ``default_modality``. A modality without an
    entry in ``by_modality`` (or none at all, without a default) is refused, naming the case.

    Args:
        by_modality: scheme (``"window"`` or ``"zscore"``) per modality name, matched exactly;
            None: ``{"CT": "window", "MR": "zscore"}``.
        window: ``(lo, hi)``, the intensity window of the ``"window"`` scheme, ``lo < hi``.
        default_modality: the modality of an image given without one (None: such an image is refused).

    Shapes:
        input ``(C, *spatial)`` image (numpy or torch, a ``MetaTensor`` keeps its metadata); output
        the same shape and type, floating point (an integer image is cast to float32 first).

    Raises:
        ValueError: in ``__init__``, a scheme that is not ``"window"`` / ``"zscore"`` or a window that
            is not two finite numbers ``lo < hi``; in ``__call__``, a modality without an entry.

    Example:
        >>> import torch
        >>> t = ModalityIntensity(window=(-325.0, 325.0))
        >>> t(torch.tensor([[-1000.0, 0.0, 162.5, 2000.0]]), modality="CT").tolist()
        [[-1.0, 0.0, 0.5, 1.0]]
        >>> t(torch.tensor([[1.0, 3.0]]), modality="MR").tolist()
        [[-0.7071067690849304, 0.7071067690849304]]
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        by_modality: Mapping[str, str] | None = None,
        window: Sequence[float] = (-325.0, 325.0),
        default_modality: str | None = None,
    ) -> None:
        given = {"CT": "window", "MR": "zscore"} if by_modality is None else by_modality
        if not isinstance(given, Mapping):
            raise ValueError(f"by_modality must map modality names to one of {INTENSITY_SCHEMES}, got {given!r}.")
        self.by_modality = {str(k): check_option(v, INTENSITY_SCHEMES, f"by_modality[{k!r}]") for k, v in given.items()}
        bounds = list(window) if isinstance(window, Sequence) and not isinstance(window, str) else None
        if (
            bounds is None
            or len(bounds) != 2
            or any(isinstance(b, bool) or not isinstance(b, numbers.Real) or not math.isfinite(b) for b in bounds)
            or not bounds[0] < bounds[1]
        ):
            raise ValueError(f"window must be two finite numbers (lo, hi) with lo < hi, got {window!r}.")
        self.window = (float(bounds[0]), float(bounds[1]))
        self.default_modality = default_modality

    def scheme(self, modality: Any = None, case: Any = None) -> str:
        """The scheme of ``modality`` (None or ``""``: ``default_modality``'s); ``case`` names the image in errors.

        Raises:
            ValueError: no modality and no ``default_modality``, or a modality without an entry
                (naming the case, the modality and the known modalities).
        """
        name = modality or self.default_modality
        of_case = "" if case is None else f" of case {case!r}"
        known = ", ".join(map(repr, self.by_modality)) or "none"
        if name is None or name == "":
            raise ValueError(f"the image{of_case} has no modality and no default_modality is set; known modalities: {known}.")
        scheme = self.by_modality.get(str(name))
        if scheme is None:
            raise ValueError(
                f"modality {name!r}{of_case} has no intensity scheme (by_modality, a bundle's intensity_by_modality);"
                f" known modalities: {known}."
            )
        return scheme

    def __call__(self, img: NdarrayOrTensor, modality: Any = None, case: Any = None) -> NdarrayOrTensor:
        """``img`` normalised by the scheme of ``modality`` (see :meth:`scheme`)."""
        scheme = self.scheme(modality, case)
        x = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        if not x.is_floating_point():
            x = x.float()
        if scheme == "window":
            lo, hi = self.window
            out = (x.clamp(lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)
        else:
            out = (x - x.mean()) / x.std().clamp_min(1e-6)
        return out if isinstance(img, torch.Tensor) else convert_to_dst_type(out, img, dtype=out.dtype)[0]
