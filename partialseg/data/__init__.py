"""Partial-label datasets: the ``dataset.json`` description, unions, validation, benchmarks."""

from partialseg.data.datalists import bundle_datalist, ensure_dataset
from partialseg.data.spec import ALL, DatasetError, LabelMap, PartialDataset, load_dataset, union_datasets
from partialseg.data.validation import ValidationReport, read_image, validate_dataset

__all__ = [
    "ALL",
    "DatasetError",
    "LabelMap",
    "PartialDataset",
    "ConditionalDataset",
    "SourceBalancedSampler",
    "SupportBank",
    "TwoStreamBatchSampler",
    "ValidationReport",
    "bundle_datalist",
    "ensure_dataset",
    "load_dataset",
    "read_image",
    "training_sampler",
    "union_datasets",
    "validate_dataset",
]


_SUBMODULES = ("builders", "check", "datalists", "dcl", "plan", "sampling", "spec", "synthetic", "validation")


def __getattr__(name: str):
    # the samplers subclass torch's samplers: imported on first use, so that
    # ``import partialseg.data`` (and the CLI's help) stays free of torch
    if name in ("SourceBalancedSampler", "TwoStreamBatchSampler", "training_sampler"):
        from partialseg.data import sampling

        return getattr(sampling, name)
    if name in ("ConditionalDataset", "SupportBank"):
        from partialseg.data import dcl

        return getattr(dcl, name)
    if name in _SUBMODULES:  # `partialseg.data.dcl` after a bare `import partialseg` (bundle configs)
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
