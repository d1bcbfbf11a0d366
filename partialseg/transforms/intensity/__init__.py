"""Intensity transforms: each image normalised by its modality's scheme (CT window or z-score; atlas method)."""

from partialseg.transforms.intensity.array import INTENSITY_SCHEMES, ModalityIntensity
from partialseg.transforms.intensity.dictionary import ModalityIntensityd, ModalityIntensityD, ModalityIntensityDict

__all__ = ["INTENSITY_SCHEMES", "ModalityIntensity", "ModalityIntensityd", "ModalityIntensityD", "ModalityIntensityDict"]
