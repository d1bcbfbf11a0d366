"""The MONAI Label tasks, under their former module name (kept so that earlier imports work).

The code lives in :mod:`partialseg.monailabel.bundle` (metadata and the partialseg declaration),
:mod:`partialseg.monailabel.infer` (``BundleInferTask``), :mod:`partialseg.monailabel.train` (the
train tasks) and :mod:`partialseg.monailabel.request_checks` (what a request may send).

Example:
    >>> from partialseg.monailabel import train
    >>> PartialLabelTrainTask is train.PartialLabelTrainTask
    True
"""

from __future__ import annotations

from partialseg.monailabel.bundle import bundle_classes, bundle_dimension, discover_bundles
from partialseg.monailabel.infer import BundleInferTask, convert_result
from partialseg.monailabel.train import AtlasTrainTask, ConditionalTrainTask, HybridTrainTask, PartialLabelTrainTask, SemiSupervisedTrainTask, bundle_train_task

__all__ = [
    "BundleInferTask",
    "PartialLabelTrainTask",
    "ConditionalTrainTask",
    "SemiSupervisedTrainTask",
    "HybridTrainTask",
    "AtlasTrainTask",
    "bundle_classes",
    "bundle_dimension",
    "bundle_train_task",
    "convert_result",
    "discover_bundles",
]
