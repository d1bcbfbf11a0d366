"""MONAI transforms for partial, weak and missing labels (array transforms and ``d`` twins)."""

from partialseg.transforms.partial import *  # noqa: F401,F403
from partialseg.transforms.partial import __all__ as _partial_all

__all__ = list(_partial_all)
