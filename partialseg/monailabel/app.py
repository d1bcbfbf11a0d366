"""The partialseg MONAI Label app: every bundle under ``bundles/`` as an infer (and train) task.

Train tasks come from :func:`~partialseg.monailabel.tasks.bundle_train_task`: a
``PartialLabelTrainTask`` (stage-2 fine-tuning) for a bundle with one output channel per class,
a ``ConditionalTrainTask`` (stage 1 on the first request, then stage 2 from the served model;
model and support bank replaced together) for a conditional bundle such as DCL.

``monailabel start_server --app APP_DIR`` loads ``APP_DIR/main.py``, which only imports
:class:`PartialSegApp` (``python -m partialseg.monailabel init APP_DIR`` writes it). Each bundle is
copied into ``APP_DIR/model/<bundle>/`` on first start (configs, docs, and weights if the source
has them), so serving and fine-tuning never write into the source tree.

Server ``--conf`` keys:

- ``bundles``: the folder to discover bundles in (default: the repository's ``bundles/``);
- ``bundle_overrides``: JSON ``{bundle: {config key: value}}`` applied to every inference and
  training of that bundle (e.g. ``{"marginal_exclusion_abdomen": {"sw_batch_size": 2}}``);
- ``max_epochs``: default epochs of a train request (10).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from partialseg.monailabel.tasks import BundleInferTask, bundle_train_task, discover_bundles

__all__ = ["PartialSegApp", "DEFAULT_BUNDLES"]

logger = logging.getLogger(__name__)

#: the repository's bundles (an editable install); pass ``--conf bundles DIR`` otherwise
DEFAULT_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def _install(src: Path, dst: Path) -> None:
    """Copy a bundle's configs/docs (and weights, if ``dst`` has none) into the app's model folder.

    Only what the app folder lacks is copied: a copy edited there (its configs) is kept, on every
    start and in MONAI Label's training processes, which build the app again.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "docs"):
        if (src / name).is_dir() and not (dst / name).is_dir():
            shutil.copytree(src / name, dst / name)
    for name in ("LICENSE",):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if (src / "models").is_dir() and not (dst / "models").is_dir():
        shutil.copytree(src / "models", dst / "models")


class PartialSegApp(MONAILabelApp):
    """MONAI Label app serving partialseg bundles (see the module docstring for ``--conf`` keys)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        from partialseg import __version__

        source = Path(conf.get("bundles") or DEFAULT_BUNDLES).resolve()
        if not source.is_dir():
            raise FileNotFoundError(f"bundles folder {source} not found: pass --conf bundles DIR")
        self.model_dir = Path(app_dir) / "model"
        self.bundle_overrides: dict[str, dict[str, Any]] = json.loads(conf.get("bundle_overrides") or "{}")
        self.max_epochs = int(conf.get("max_epochs", 10))
        if not isinstance(self.bundle_overrides, dict) or not all(isinstance(v, dict) for v in self.bundle_overrides.values()):
            raise ValueError(f"--conf bundle_overrides must be a JSON object {{bundle: {{key: value}}}}, got {self.bundle_overrides!r}")
        found = discover_bundles(source)
        unknown = sorted(set(self.bundle_overrides) - set(found))
        if unknown:
            raise ValueError(f"--conf bundle_overrides names bundle(s) {unknown} that {source} does not have (it has {sorted(found)})")
        self.bundles: dict[str, Path] = {}
        for name, src in found.items():
            dst = self.model_dir / name
            _install(src, dst)
            self.bundles[name] = dst
        logger.info(f"partialseg bundles from {source}: {sorted(self.bundles)}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="partialseg",
            description="Segmentation from partial labels: partialseg bundles",
            version=__version__,
        )

    def init_infers(self) -> dict[str, Any]:
        return {
            name: BundleInferTask(root, overrides=self.bundle_overrides.get(name))
            for name, root in self.bundles.items()
            if (root / "configs" / "inference.json").is_file()
        }

    def init_trainers(self) -> dict[str, Any]:
        trainers = {}
        for name, root in self.bundles.items():
            task = bundle_train_task(root, overrides=self.bundle_overrides.get(name), max_epochs=self.max_epochs)
            if task is not None:
                trainers[name] = task
        return trainers

    def init_strategies(self) -> dict[str, Any]:
        return {"random": Random(), "first": First()}
