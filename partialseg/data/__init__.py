"""Partial-label datasets: the ``dataset.json`` description, unions, validation, benchmarks."""

from partialseg.data.datalists import bundle_datalist, ensure_dataset
from partialseg.data.sampling import SourceBalancedSampler
from partialseg.data.spec import ALL, DatasetError, LabelMap, PartialDataset, load_dataset, union_datasets
from partialseg.data.validation import ValidationReport, read_image, validate_dataset

__all__ = [
    "ALL",
    "DatasetError",
    "LabelMap",
    "PartialDataset",
    "SourceBalancedSampler",
    "ValidationReport",
    "bundle_datalist",
    "ensure_dataset",
    "load_dataset",
    "read_image",
    "union_datasets",
    "validate_dataset",
]
