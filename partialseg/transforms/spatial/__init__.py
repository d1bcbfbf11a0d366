"""Spatial transforms: Otsu body crop + resize to a reference shape (atlas method), invertible."""

from partialseg.transforms.spatial.array import AtlasCrop, OtsuForeground
from partialseg.transforms.spatial.dictionary import AtlasCropd, AtlasCropD, AtlasCropDict

__all__ = ["AtlasCrop", "AtlasCropd", "AtlasCropD", "AtlasCropDict", "OtsuForeground"]
