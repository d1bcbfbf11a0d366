"""partialseg: segmentation from partial, weak and missing labels, built on MONAI."""

__version__ = "0.1.0"
