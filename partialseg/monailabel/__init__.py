"""MONAI Label integration: serve every partialseg bundle (``pip install -e .[monailabel]``).

``python -m partialseg.monailabel start --studies DIR`` prepares an app folder and runs
``monailabel start_server`` on 127.0.0.1 with partialseg's ASGI app (:mod:`.server`); see
docs/serving.md. Modules: :mod:`.bundle` (metadata and the partialseg declaration), :mod:`.infer`,
:mod:`.train`, :mod:`.request_checks`, :mod:`.datastore`, :mod:`.server`, :mod:`.app`
(:mod:`.tasks` re-exports the tasks under their former module name). The names below import MONAI Label
on first use, so ``import partialseg.monailabel`` works without it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PartialSegApp",
    "BundleInferTask",
    "PartialLabelTrainTask",
    "ConditionalTrainTask",
    "SemiSupervisedTrainTask",
    "HybridTrainTask",
    "AtlasTrainTask",
    "discover_bundles",
    "bundle_classes",
    "bundle_train_task",
    "read_declaration",
    "BundleDeclaration",
    "init_app",
]


def __getattr__(name: str) -> Any:
    if name == "PartialSegApp":
        from partialseg.monailabel.app import PartialSegApp

        return PartialSegApp
    if name == "init_app":
        from partialseg.monailabel.__main__ import init_app

        return init_app
    if name in ("BundleInferTask", "PartialLabelTrainTask", "ConditionalTrainTask", "SemiSupervisedTrainTask", "HybridTrainTask", "AtlasTrainTask", "discover_bundles", "bundle_classes", "bundle_train_task"):
        from partialseg.monailabel import tasks

        return getattr(tasks, name)
    if name in ("read_declaration", "BundleDeclaration"):
        from partialseg.monailabel import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
