"""The partialseg MONAI Label app: every bundle under ``bundles/`` as an infer (and train) task.

Train tasks come from :func:`~partialseg.monailabel.train.bundle_train_task`, as each bundle's
metadata declares (``partialseg.train.task``, :mod:`partialseg.monailabel.bundle`): a
``PartialLabelTrainTask`` (stage-2 fine-tuning) for a bundle with one output channel per class,
a ``ConditionalTrainTask`` (stage 1 on the first request, then stage 2 from the served model;
model and declared files such as the support bank replaced together) for a conditional bundle
such as DCL.

``monailabel start_server --app APP_DIR`` loads ``APP_DIR/main.py``, which only imports
:class:`PartialSegApp` (``python -m partialseg.monailabel init APP_DIR`` writes it). Each bundle is
copied into ``APP_DIR/model/<bundle>/`` on first start (configs, docs, and weights if the source
has them), so serving and fine-tuning never write into the source tree.

Server ``--conf`` keys:

- ``bundles``: the folder to discover bundles in (default: the repository's ``bundles/``);
- ``bundle_overrides``: JSON ``{bundle: {config key: value}}`` applied to every inference and
  training of that bundle (e.g. ``{"marginal_exclusion_abdomen": {"sw_batch_size": 2}}``);
- ``max_epochs``: default epochs of a train request (10);
- ``max_sync_train_iterations``: the most iterations (epochs x iterations per epoch) of a
  ``run_sync`` train request (default 50): MONAI Label runs such a request inside the server's
  event loop, which answers nothing else until it ends; longer trainings run in the background
  (the default) while ``/info/`` and inference keep answering;
- ``allow_model_upload``: ``true`` lets ``PUT`` / ``DELETE /model/<bundle>`` replace the served
  weights (default ``false``);
- ``cors_origins``: comma-separated origins, besides the server's own, that browsers may call it
  from (:mod:`partialseg.monailabel.server`).

The app serves only under :mod:`partialseg.monailabel.server`'s ASGI app (``--uvicorn_app
partialseg.monailabel.server:app``, passed by ``python -m partialseg.monailabel start``): without
it MONAI Label's defaults (CORS ``*`` with credentials, model upload on) apply, so it refuses to
start. Its datastore is :class:`~partialseg.monailabel.datastore.SafeDatastore` (safe names, paths
inside the studies folder, ``annotated`` checked on save); train requests are checked
(:meth:`PartialSegApp.check_train_request`) and their errors answered as JSON with a 4xx status.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import sys

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from partialseg._checks import check_int
from partialseg.monailabel.bundle import discover_bundles
from partialseg.monailabel.datastore import SafeDatastore
from partialseg.monailabel.infer import BundleInferTask
from partialseg.monailabel.request_checks import RequestError
from partialseg.monailabel.train import bundle_train_task

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
        self.max_epochs = check_int(_integer(conf.get("max_epochs", 10), "max_epochs"), "--conf max_epochs", minimum=1)
        self.max_sync_iterations = check_int(
            _integer(conf.get("max_sync_train_iterations", 50), "max_sync_train_iterations"), "--conf max_sync_train_iterations", minimum=0
        )
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

    def init_datastore(self) -> Datastore:
        """A :class:`~partialseg.monailabel.datastore.SafeDatastore` on a studies folder (MONAI
        Label's remote datastores, DICOMweb etc., are returned as MONAI Label makes them)."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return SafeDatastore(
            self.studies,
            check_label_info=self._check_label_info,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _check_label_info(self, image_id: str, info: dict[str, Any]) -> None:
        """A saved label's ``annotated``: ``"all"``, or class names / indices of a served bundle."""
        given = info.get("annotated")
        if given in (None, "", [], "all"):
            return
        known = {c for task in getattr(self, "_trainers", {}).values() for c in getattr(task, "classes", [])}
        most = max((len(getattr(task, "classes", [])) for task in getattr(self, "_trainers", {}).values()), default=0)
        for c in given if isinstance(given, list) else [given]:
            if isinstance(c, bool) or not isinstance(c, (int, str)):
                raise RequestError(f"label of {image_id}: annotated entry {c!r} must be a class name or index, or annotated 'all'")
            if isinstance(c, int) or c.strip().isdigit():
                if not 0 <= int(c) < most:
                    raise RequestError(f"label of {image_id}: annotated class index {c!r} is outside 0..{most - 1}")
            elif c not in known:
                raise RequestError(f"label of {image_id}: annotated class {c!r} is not a class of any served bundle ({sorted(known)})")

    def server_mode(self, mode: bool) -> None:
        """Called by MONAI Label in the server process; refuses to serve without the partialseg
        ASGI app (``--uvicorn_app partialseg.monailabel.server:app``)."""
        if mode:
            served = sys.modules.get("monailabel.app")
            guard = getattr(getattr(getattr(served, "app", None), "state", None), "partialseg_guard", None)
            if guard is None:
                raise RuntimeError(
                    "partialseg's MONAI Label app serves only with its safe server defaults: start it with"
                    " `python -m partialseg.monailabel start ...`, or add `--uvicorn_app partialseg.monailabel.server:app`"
                    " to `monailabel start_server` (docs/serving.md, Security)"
                )
        super().server_mode(mode)

    def check_train_request(self, model: str, request: dict[str, Any], run_sync: bool = False) -> dict[str, Any]:
        """The checked settings of a train request for ``model`` (the task's ``request_values``).

        Raises:
            RequestError: 404 for an unknown model; 400 naming a bad field; 422 for a ``run_sync``
                request of more than ``max_sync_train_iterations`` iterations.
        """
        task = self._trainers.get(model)
        if task is None:
            raise RequestError(f"no train task {model!r}: the server trains {sorted(self._trainers)}", 404)
        values = task.request_values(request)
        if run_sync:
            n = task.iterations(values)
            if n > self.max_sync_iterations:
                raise RequestError(
                    f"{model}: a run_sync training may run at most {self.max_sync_iterations} iterations (--conf"
                    f" max_sync_train_iterations), this one {n} (max_epochs x iterations_per_epoch): the server answers"
                    " nothing else while it runs; send it without run_sync and follow it with GET /train/",
                    422,
                )  # fmt: skip
        return values

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's ``train``, with the request checked first and errors as HTTP answers in the
        server: a ``ValueError`` (bad request or data, e.g. an unknown ``annotated`` class) 4xx, any
        other failure 500, each with its reason."""
        model = request.get("model")
        try:
            if self._server_mode and model in self._trainers:  # run_sync: inside the server's event loop
                self.check_train_request(model, request, run_sync=True)
            return super().train(request)
        except RequestError:
            raise
        except ValueError as e:
            raise RequestError(str(e), 422) from e
        except Exception as e:
            if self._server_mode:
                raise HTTPException(status_code=500, detail=f"{type(e).__name__}: {e}") from e
            raise

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's ``infer``; for a bundle that reads each image's modality (the atlas bundle)
        a request without ``modality`` takes the datastore image info's (``PUT
        /datastore/image/info`` with ``info={"modality": "MR"}``)."""
        task = self._infers.get(request.get("model"))
        image = request.get("image")
        if getattr(task, "modality_key", None) and not request.get("modality") and isinstance(image, str) and not os.path.exists(image):
            from partialseg.monailabel.request_checks import safe_name

            try:
                info = (datastore or self.datastore()).get_image_info(safe_name(image, "image"))
            except (RequestError, ValueError):
                info = {}  # MONAI Label answers an unknown image itself
            if isinstance(info, dict) and info.get("modality"):
                request = {**request, "modality": info["modality"]}
        return super().infer(request, datastore)

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


def _integer(value: Any, key: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--conf {key} must be an integer, got {value!r}") from None
