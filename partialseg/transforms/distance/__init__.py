"""Distance-map transforms: per-class normalised signed distance maps (DTML)."""

from partialseg.transforms.distance.array import SignedDistanceMap, signed_distance_map
from partialseg.transforms.distance.dictionary import SignedDistanceMapd, SignedDistanceMapD, SignedDistanceMapDict

__all__ = [
    "SignedDistanceMap",
    "SignedDistanceMapd",
    "SignedDistanceMapD",
    "SignedDistanceMapDict",
    "signed_distance_map",
]
