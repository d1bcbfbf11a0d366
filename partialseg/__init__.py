"""partialseg: segmentation from partial, weak and missing labels, built on MONAI.

Subpackages are imported on first use (``partialseg.transforms``, ``partialseg.losses``,
``partialseg.data``, ...), so ``import partialseg`` and the ``partialseg`` command stay fast.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("data", "transforms", "losses", "networks", "engines", "inferers", "evaluation")
__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"partialseg.{name}")
    raise AttributeError(f"module 'partialseg' has no attribute {name!r}")
