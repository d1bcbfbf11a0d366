"""Loading with errors that name the file."""

from partialseg.transforms.io.dictionary import LoadImageNamedd, squeeze_trailing_singletons

__all__ = ["LoadImageNamedd", "squeeze_trailing_singletons"]
