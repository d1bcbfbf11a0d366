"""Loading with errors that name the file."""

from partialseg.transforms.io.dictionary import LoadImageNamedd

__all__ = ["LoadImageNamedd"]
