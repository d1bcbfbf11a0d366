"""Mixing transforms: foreground paste for the hybrid method's dynamic co-regularization."""

from partialseg.transforms.mix.array import ForegroundPaste
from partialseg.transforms.mix.dictionary import ForegroundPasted, ForegroundPasteD, ForegroundPasteDict

__all__ = ["ForegroundPaste", "ForegroundPasted", "ForegroundPasteD", "ForegroundPasteDict"]
