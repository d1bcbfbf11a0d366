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
    "ValidationReport",
    "bundle_datalist",
    "ensure_dataset",
    "load_dataset",
    "read_image",
    "union_datasets",
    "validate_dataset",
]


def __getattr__(name: str):
    # the sampler subclasses torch's DistributedSampler: imported on first use, so that
    # ``import partialseg.data`` (and the CLI's help) stays free of torch
    if name == "SourceBalancedSampler":
        from partialseg.data.sampling import SourceBalancedSampler

        return SourceBalancedSampler
    if name in ("ConditionalDataset", "SupportBank"):
        from partialseg.data import dcl

        return getattr(dcl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
