"""MONAI Label train tasks of partialseg bundles: partial-label fine-tuning and conditional (DCL) training.

:func:`bundle_train_task` picks the task a bundle declares in its metadata (``partialseg.train.task``,
:mod:`partialseg.monailabel.bundle`); the files a run serves besides ``models/model.pt`` come from the
same declaration. Each request is checked (:mod:`partialseg.monailabel.request_checks`) before any run
folder exists; the bundle's ``train.json`` then runs as ``python -m monai.bundle run`` in a subprocess.

Example:
    >>> import partialseg
    >>> bundles = Path(partialseg.__file__).parents[1] / "bundles"
    >>> task = bundle_train_task(bundles / "dcl_cardiac")
    >>> type(task).__name__, task.served
    ('ConditionalTrainTask', [('support_bank', 'support_bank.pt'), ('checkpoint', 'model.pt')])
    >>> task.request_values({"max_epochs": 2, "overrides": {"missing": "any"}})["overrides"]
    {'missing': 'any'}
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from partialseg._fileio import atomic_copy
from partialseg.data.plan import plan_fallback, settings_path
from partialseg.monailabel.bundle import NIFTI_SUFFIXES, bundle_classes, bundle_dimension, read_declaration, read_json
from partialseg.monailabel.request_checks import RequestError, check_override, check_setting, config_default

__all__ = ["AtlasTrainTask", "ConditionalTrainTask", "HybridTrainTask", "PartialLabelTrainTask", "SemiSupervisedTrainTask", "bundle_train_task"]

logger = logging.getLogger(__name__)


def bundle_train_task(
    bundle_root: str | os.PathLike, overrides: dict[str, Any] | None = None, max_epochs: int = 10
) -> PartialLabelTrainTask | None:
    """The train task a bundle declares (``partialseg.train.task`` in ``configs/metadata.json``),
    or None (logged) when it declares none (``"train": null``).

    ``"partial_label"`` gives a :class:`PartialLabelTrainTask`, ``"conditional"`` a
    :class:`ConditionalTrainTask`, ``"semi_supervised"`` a :class:`SemiSupervisedTrainTask`,
    ``"hybrid"`` a :class:`HybridTrainTask`, ``"atlas"`` an :class:`AtlasTrainTask`.

    Raises:
        ValueError: naming the file: a missing or malformed declaration, a declared task without
            ``configs/train.json`` or without class names (metadata ``class_names`` or one output
            channel per class), or a ``train.json`` without the keys the task sets.
    """
    root = Path(bundle_root)
    declaration = read_declaration(root)
    if declaration.train_task is None:
        logger.info(f"{root.name}: no train task (configs/metadata.json declares \"train\": null)")
        return None
    meta = root / "configs" / "metadata.json"
    train = root / "configs" / "train.json"
    if not train.is_file():
        raise ValueError(f"{meta}: declares the train task {declaration.train_task!r} but {train} does not exist")
    classes = bundle_classes(root)
    if classes is None:
        raise ValueError(
            f"{meta}: declares the train task {declaration.train_task!r} but names no classes: add class_names,"
            " or describe one output channel per class (network_data_format.outputs.pred.channel_def)"
        )
    cls = {"conditional": ConditionalTrainTask, "semi_supervised": SemiSupervisedTrainTask,
           "hybrid": HybridTrainTask, "atlas": AtlasTrainTask}.get(declaration.train_task, PartialLabelTrainTask)
    return cls(root, classes, overrides=overrides, max_epochs=max_epochs)


class PartialLabelTrainTask(TrainTask):
    """Fine-tune a bundle on the datastore's labels, keeping each case's annotated classes.

    MONAI Label's own bundle train task hands the bundle only ``{image, label}`` per case, so a
    label that marks only the liver would teach "everything else is background". Here the
    labelled cases of the datastore become a partialseg ``dataset.json`` (docs/data_format.md)
    whose cases carry ``annotated``: the label's info ``annotated`` (class names or indices, or
    ``"all"``) when the client saved one (``PUT /datastore/label`` with
    ``params={"annotated": ["liver"]}``), else the classes present in the label file, a partial
    annotation (voxels of value 0 are then "one of the other classes", not background). Only
    images of the bundle's dimensionality are used (a datastore may hold 2D slices and 3D volumes
    for different bundles). Validation: the last fully annotated case, held out, when there are
    two cases or more (and the others can train the bundle alone); else the training cases
    themselves, an indicative metric. The bundle's ``train.json`` then runs (``python -m
    monai.bundle run``, a subprocess) as stage 2, initialised from the served ``models/model.pt``
    when there is one, and writes the new ``models/model.pt`` atomically; the infer task reloads
    it on its next request.

    Subclasses change the stage and the outputs through :meth:`stage_overrides`,
    :meth:`output_overrides`, :meth:`check` and :meth:`install` (:class:`ConditionalTrainTask`).

    Args:
        bundle_root: the bundle folder (``configs/train.json``).
        classes: class names, index 0 background (:func:`bundle_classes`).
        overrides: config overrides for every training (e.g. a coarser ``pixdim``).
        max_epochs: default number of epochs (the request's ``max_epochs`` wins).
        description: the task's description in ``/info/``.
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike,
        classes: list[str],
        overrides: dict[str, Any] | None = None,
        max_epochs: int = 10,
        description: str | None = None,
    ) -> None:
        self.bundle_root = Path(bundle_root).resolve()
        self.name = self.bundle_root.name
        self.classes = list(classes)
        self.overrides = dict(overrides or {})
        self.max_epochs = int(max_epochs)
        self.dimension = bundle_dimension(self.bundle_root)
        self.train_config = read_json(self.bundle_root / "configs" / "train.json")
        self.declaration = read_declaration(self.bundle_root)
        keys = list(self.REQUIRED_KEYS) + [f.train_key for f in self.declaration.model_files]
        absent = [k for k in keys if k not in self.train_config]
        if absent:
            raise ValueError(
                f"{self.name}: configs/train.json lacks the key(s) {absent} that the {type(self).__name__} sets or reads"
                " (the declared model_files' train_key included; configs/metadata.json)."
            )
        self._stats: dict[str, Any] = {}
        super().__init__(description or f"partial-label fine-tuning of {self.name} (train.json, stage 2)")

    #: train.json keys the task sets or reads
    REQUIRED_KEYS: tuple[str, ...] = ("stage", "epochs_stage2", "init_from_stage1", "stage1_ckpt", "ckpt_dir", "ckpt_name", "val_interval")

    def config(self) -> dict[str, Any]:
        return {"max_epochs": self.max_epochs, "iterations_per_epoch": 20, "val_interval": 1}

    def stats(self) -> dict[str, Any]:
        return self._stats

    def _annotated(self, label_path: str, info: dict[str, Any]) -> list[str] | str:
        given = (info or {}).get("annotated")
        if given == "all":
            return "all"
        if given is not None and given != [] and given != "":
            names = []
            for c in given if isinstance(given, (list, tuple)) else [given]:
                if isinstance(c, bool) or not isinstance(c, (int, str)):
                    raise ValueError(f"{label_path}: annotated entry {c!r} must be a class name or index (of {self.classes})")
                if isinstance(c, int) or c.strip().lstrip("-").isdigit():
                    index = int(c)
                    if not 0 <= index < len(self.classes):
                        raise ValueError(f"{label_path}: annotated class index {c!r} is outside 0..{len(self.classes) - 1} ({self.classes})")
                    name = self.classes[index]
                else:
                    name = c
                if name not in self.classes:
                    raise ValueError(f"{label_path}: annotated class {c!r} is not one of {self.classes}")
                names.append(name)
            return names
        import numpy as np

        from partialseg.data.validation import read_image

        values = np.unique(read_image(label_path)[0]).astype(int)  # NIfTI, NRRD, ...: whatever MONAI reads
        return [self.classes[v] for v in values if 0 < v < len(self.classes)]

    def unannotated(self, cases: list[dict[str, Any]]) -> list[str]:
        """The class names that no case of ``cases`` annotates (``annotated``: names or ``"all"``)."""
        covered: set[str] = set()
        for case in cases:
            if case.get("annotated") == "all":
                return []
            covered.update(case.get("annotated") or [])
        return [c for c in self.classes if c not in covered]

    def can_train_on(self, cases: list[dict[str, Any]]) -> bool:
        """Whether ``cases`` alone can train the bundle (here: always). A fully annotated case is
        held out for validation only when the other cases can."""
        return True

    def dataset(self, datastore: Datastore, folder: Path) -> dict[str, Any]:
        """Write the datastore's labelled cases as ``folder/dataset.json``; returns its content."""
        cases, skipped = [], []
        for image_id in sorted(datastore.get_labeled_images()):
            image = datastore.get_image_uri(image_id)
            ndim = _image_ndim(image)
            if ndim is not None and ndim != self.dimension:
                skipped.append(image_id)
                continue
            label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL)
            cases.append({"image": image, "label": label,
                          "annotated": self._annotated(label, info), "source": "monailabel", "case": image_id})  # fmt: skip
        if skipped:
            logger.info(f"{self.name}: {len(skipped)} labelled image(s) are not {self.dimension}D, left out: {skipped}")
        if not cases:
            raise ValueError(f"{self.name}: no labelled {self.dimension}D image in the datastore: save a label (tag 'final') first")
        full = [c for c in cases if c["annotated"] == "all" or set(c["annotated"]) >= set(self.classes[1:])]
        folder.mkdir(parents=True, exist_ok=True)
        content: dict[str, Any] = {"name": f"monailabel-{self.name}", "classes": self.classes}
        if full and len(cases) > 1 and self.can_train_on([c for c in cases if c is not full[-1]]):
            # model selection on a held-out, fully annotated case
            content["training"] = [c for c in cases if c is not full[-1]]
            content["validation"] = [full[-1]]
        else:  # nothing to hold out: validate on the training cases, an indicative metric only,
            # declared so that the dataset's training/validation leak check lets it through
            content.update(training=cases, validation=[dict(c) for c in cases], validation_reuses_training=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dataset.json").write_text(json.dumps(content, indent=2))
        return content

    @staticmethod
    def labelled_cases(content: dict[str, Any]) -> list[dict[str, Any]]:
        """Every labelled case of :meth:`dataset`'s content, once (a held-out validation case included)."""
        return list(content["training"]) + [c for c in content["validation"] if not content.get("validation_reuses_training")]

    @staticmethod
    def rewrite_dataset(content: dict[str, Any], folder: Path, training: list, validation: list) -> dict[str, Any]:
        """``content`` with these splits (validation drawn from training, declared so), written again as
        ``folder/dataset.json``; returns it."""
        content.pop("validation_reuses_training", None)
        content.update(training=training, validation=validation, validation_reuses_training=True)
        (folder / "dataset.json").write_text(json.dumps(content, indent=2))
        return content

    def setting(self, overrides: dict[str, Any], key: str) -> Any:
        """The value of config ``key`` in a run with ``overrides``: the override, else ``train.json``'s
        (a planned key's fallback: the task's dataset folder holds no ``plan.json``)."""
        return overrides[key] if key in overrides else plan_fallback(self.train_config.get(key))

    def requested_epochs(self, request: dict[str, Any]) -> int:
        """The epochs of the run: the request's ``max_epochs``, else the task's default (``max_epochs``)."""
        return int(request.get("max_epochs", self.max_epochs))

    def stage_overrides(self, request: dict[str, Any]) -> dict[str, Any]:
        """Config keys of the stage to run and its start: stage 2, from the served ``models/model.pt`` if any."""
        served = self.bundle_root / "models" / "model.pt"
        return {
            "stage": 2,
            "epochs_stage2": self.requested_epochs(request),
            "init_from_stage1": served.is_file(),
            "stage1_ckpt": str(served),
        }

    def output_overrides(self, run_dir: Path) -> dict[str, Any]:
        """Config keys of where the run writes the files to serve: its own ``runs/<run>/models/``
        (the checkpoint, and each declared model file through its ``train_key``; :meth:`install`
        moves them into ``models/`` once the run succeeded)."""
        files = {f.train_key: str(run_dir / "models" / f.filename) for f in self.declaration.model_files}
        return {"ckpt_dir": str(run_dir / "models"), "ckpt_name": "model.pt", **files}

    def data_overrides(self, content: dict[str, Any]) -> dict[str, Any]:
        """Config keys the run's dataset ``content`` decides (none here; the app's
        ``bundle_overrides`` and the request's ``overrides`` win over them)."""
        return {}

    def check(self, content: dict[str, Any], overrides: dict[str, Any]) -> None:
        """Raise ``ValueError`` before training when the run could not give a model to serve: fewer
        epochs than ``val_interval`` (the model is saved at validation)."""
        stage = overrides["stage"]
        epochs, interval = overrides.get(f"epochs_stage{stage}"), self.setting(overrides, "val_interval")
        if isinstance(epochs, int) and isinstance(interval, int) and epochs < interval:
            raise ValueError(
                f"{self.name}: {epochs} epoch(s) but val_interval {interval}: the model is saved at validation;"
                " ask for more epochs or a smaller val_interval."
            )

    @property
    def served(self) -> list[tuple[str, str]]:
        """``(name, file name)`` of the files in ``models/`` that the infer task reads, in the order
        they are replaced: the declared ``model_files``, then the checkpoint ``model.pt``."""
        return [(f.name, f.filename) for f in self.declaration.model_files] + [("checkpoint", "model.pt")]

    def install(self, run_dir: Path, overrides: dict[str, Any]) -> dict[str, str]:
        """Put a finished run's outputs where the infer task reads them (each by an atomic
        ``os.replace``); returns ``{what: served path}``. A failed or stopped run never gets here,
        so the served files stay as they were."""
        built, served = Path(overrides["ckpt_dir"]), self.bundle_root / "models"
        absent = [name for _, name in self.served if not (built / name).is_file()]
        if absent:
            raise RuntimeError(f"{self.name}: the run wrote no {absent} in {built} (the model is saved at validation); see {run_dir / 'train.log'}")
        served.mkdir(parents=True, exist_ok=True)
        # the settings the model was trained with (inference reads them), before the model: a
        # settings file newer than its model is ignored
        if settings_path(built / "model.pt").is_file():
            atomic_copy(settings_path(built / "model.pt"), settings_path(served / "model.pt"))
        for _, name in self.served:
            atomic_copy(built / name, served / name)
        return {key: str(served / name) for key, name in self.served}

    #: request keys passed to the bundle (bounds in :data:`~partialseg.monailabel.request_checks.LIMITS`)
    REQUEST_KEYS: tuple[str, ...] = ("max_epochs", "iterations_per_epoch", "val_interval", "batch_size", "learning_rate")
    #: train.json keys the task sets itself, which a request's ``overrides`` may not (with the
    #: declared model files' ``train_key``)
    OWNED_KEYS: tuple[str, ...] = ("bundle_root", "stage", "epochs", "epochs_stage1", "epochs_stage2", "init_from_stage1", "stage1_ckpt",
                                   "ckpt_dir", "ckpt_name", "dataset_dir", "output_dir", "progress", "plan_on_first_run")  # fmt: skip

    def request_values(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request's training settings, checked before anything is written.

        :attr:`REQUEST_KEYS` (else the task's :meth:`config` defaults) as bounded positive numbers
        (:func:`~partialseg.monailabel.request_checks.check_setting`), and ``overrides`` an object
        of ``train.json`` keys (nested ids ``a#b``) whose values are plain JSON of the default's
        type (:func:`~partialseg.monailabel.request_checks.check_override`); keys the task sets
        (:attr:`OWNED_KEYS`) and component keys (``_target_`` ...) are refused.

        Raises:
            RequestError: a ``ValueError`` naming the field (a 400 answer in the server).
        """
        values: dict[str, Any] = {}
        defaults = self.config()
        for key in self.REQUEST_KEYS:
            raw = request.get(key, defaults.get(key))
            if raw is not None:
                values[key] = self._named(check_setting, key, raw)
        extra = request.get("overrides") or {}
        if not isinstance(extra, dict):
            raise RequestError(f"{self.name}: overrides must be an object of config keys and values, got {type(extra).__name__} {extra!r}.")
        owned = set(self.OWNED_KEYS) | {f.train_key for f in self.declaration.model_files}
        unknown, checked = [], {}
        for key, value in extra.items():
            parts = re.split(r"#|::", str(key))
            if parts[0] not in self.train_config:
                unknown.append(key)
                continue
            if parts[0] in owned:
                raise RequestError(f"{self.name}: overrides[{key!r}]: the train task sets {parts[0]!r} itself; use the request's keys (max_epochs, stage ...)")
            if any(p.startswith("_") for p in parts):
                raise RequestError(f"{self.name}: overrides[{key!r}]: component keys ({', '.join(p for p in parts if p.startswith('_'))}) cannot be overridden")
            found, default = config_default(self.train_config, str(key))
            if not found:
                raise RequestError(f"{self.name}: overrides[{key!r}]: configs/train.json has no such id")
            default = plan_fallback(default)  # a planned key is typed by its literal fallback
            checked[key] = self._named(check_override, str(key), value, default)
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(re.split(r"#|::", str(k))[0], list(self.train_config), n=1) for k in unknown}
            said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise RequestError(f"{self.name}: overrides name key(s) that configs/train.json does not have: {said}.")
        values["overrides"] = checked
        return values

    def _named(self, check: Any, *args: Any) -> Any:
        """``check(*args)``, its ``RequestError`` prefixed with the bundle's name."""
        try:
            return check(*args)
        except RequestError as e:
            raise RequestError(f"{self.name}: {e.detail}", e.status_code) from None

    def iterations(self, values: dict[str, Any]) -> int:
        """Training iterations of a request with checked ``values`` (:meth:`request_values`):
        epochs x iterations per epoch (the run_sync bound of the app)."""
        per_epoch = values["overrides"].get("iterations_per_epoch", values.get("iterations_per_epoch", 1))
        return int(values["max_epochs"]) * int(per_epoch)

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        values = self.request_values(request)  # bad values are refused before any folder is made
        run_dir = _new_run_dir(self.bundle_root / "runs", f"monailabel_{time.strftime('%Y%m%d_%H%M%S')}")
        try:
            content = self.dataset(datastore, run_dir / "dataset")
            overrides: dict[str, Any] = {
                **self.data_overrides(content),
                **self.overrides,
                **self.stage_overrides({**request, "max_epochs": values["max_epochs"]}),
                "dataset_dir": str(run_dir / "dataset"),
                "output_dir": str(run_dir),
                **self.output_overrides(run_dir),
                "progress": False,
                "plan_on_first_run": False,  # the served model's grid and network, not a plan of this run's folder
            }
            for key in ("iterations_per_epoch", "val_interval", "learning_rate", "batch_size"):
                if key in values:
                    overrides[key] = values[key]
            overrides.update(values["overrides"])
            self.check(content, overrides)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)  # a refused request leaves no run folder
            raise
        configs = self.bundle_root / "configs"
        from partialseg.engines.launch import bundle_command

        cmd = bundle_command(configs.parent, self.bundle_root, ("train.json",), **overrides)
        log = run_dir / "train.log"
        begin = time.time()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ), cwd=str(self.bundle_root))
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name}: training failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
        served = self.install(run_dir, overrides)
        stage = overrides.get("stage")
        self._stats = {
            "model": self.name,
            "stage": stage,
            **served,
            "run_dir": str(run_dir),
            "epochs": overrides.get(f"epochs_stage{stage}", overrides.get("epochs")),
            "cases": len(content["training"]),
            "annotated": {c["case"]: c.get("annotated", []) for c in content["training"]},
            "validation": [c["case"] for c in content["validation"]],
            "train_time": round(time.time() - begin, 2),
        }
        return self._stats


class ConditionalTrainTask(PartialLabelTrainTask):
    """Train a bundle whose network reads conditional images (DCL's CompNet) on the datastore's labels.

    As :class:`PartialLabelTrainTask` (cases keep their ``annotated`` classes; same validation
    rule), with what a conditional bundle needs:

    - **stage**: stage 1 (PrimNet from scratch, the bundle's stage-1 settings) while the bundle
      serves no ``models/model.pt``; afterwards stage 2 (the bundle's stage-2 settings: DualNet,
      its learning rate) starting from the served model (``stage1_ckpt``). A request's ``stage``
      (``1``, ``2`` or ``"auto"``) forces the choice; ``max_epochs`` sets that stage's epochs.
    - **conditional cases**: every class, background included, needs a case that annotates it
      (the network's conditional image of that class, in training and in the support bank), unless
      the bundle's ``missing`` option is ``"any"``; otherwise ``ValueError`` naming the classes
      before training. A fully annotated case is held out for validation only when the other
      cases still annotate every class.
    - **served files**: the run writes its model and the files its metadata declares beside it
      (DCL: the support bank, rebuilt from the datastore's cases) into ``runs/<run>/models/``;
      after a successful run they replace the served ones (each by an atomic ``os.replace``,
      ``model.pt`` last), which the infer task reads on its next request. A failed run leaves them
      as they were.

    Arguments as :class:`PartialLabelTrainTask`; ``train.json`` must define the keys in
    :attr:`REQUIRED_KEYS` (``ValueError`` naming the missing ones).
    """

    #: train.json keys the task sets or reads
    REQUIRED_KEYS = ("stage", "stage1_ckpt", "epochs_stage1", "epochs_stage2", "ckpt_dir", "ckpt_name", "missing", "val_interval")

    def __init__(
        self, bundle_root: str | os.PathLike, classes: list[str], overrides: dict[str, Any] | None = None, max_epochs: int = 10
    ) -> None:
        name = Path(bundle_root).name
        super().__init__(bundle_root, classes, overrides, max_epochs,
                         description=f"partial-label training of {name} (train.json: stage 1 until a model is served, then stage 2 from it)")  # fmt: skip

    def config(self) -> dict[str, Any]:
        return {**super().config(), "stage": "auto"}

    def choose_stage(self, request: dict[str, Any]) -> int:
        """1 while no ``models/model.pt`` is served, else 2; the request's ``stage`` (1, 2, "auto") wins."""
        served = (self.bundle_root / "models" / "model.pt").is_file()
        stage = request.get("stage", "auto")
        if stage in (None, "", "auto"):
            return 2 if served else 1
        if str(stage) not in ("1", "2"):
            raise RequestError(f"{self.name}: stage must be 1, 2 or 'auto', got {stage!r}.")
        if int(stage) == 2 and not served:
            raise RequestError(f"{self.name}: stage 2 starts from the served models/model.pt, which does not exist: train stage 1 first.")
        return int(stage)

    def request_values(self, request: dict[str, Any]) -> dict[str, Any]:
        values = super().request_values(request)
        self.choose_stage(request)  # a bad stage is refused with the other settings
        return values

    def stage_overrides(self, request: dict[str, Any]) -> dict[str, Any]:
        stage = self.choose_stage(request)
        overrides: dict[str, Any] = {"stage": stage, f"epochs_stage{stage}": self.requested_epochs(request)}
        if stage == 2:
            overrides["stage1_ckpt"] = str(self.bundle_root / "models" / "model.pt")
        return overrides

    def can_train_on(self, cases: list[dict[str, Any]]) -> bool:
        return not self.unannotated(cases)

    def check(self, content: dict[str, Any], overrides: dict[str, Any]) -> None:
        absent = self.unannotated(content["training"])
        missing = self.setting(overrides, "missing")
        if absent and missing != "any":
            hint = f" (the {self.classes[0]}: a whole-foreground label saved with params {{\"annotated\": [\"{self.classes[0]}\"]}})"
            raise ValueError(
                f"{self.name}: class(es) {absent} are annotated in no labelled case of the datastore, but the network needs"
                f" a conditional image of every class: save a label that annotates {' and '.join(absent)}"
                f"{hint if self.classes[0] in absent else ''}, or set the bundle's missing option to 'any' (bundle_overrides,"
                f" or the request's overrides; now {missing!r})."
            )
        super().check(content, overrides)


class SemiSupervisedTrainTask(PartialLabelTrainTask):
    """Train a semi-supervised bundle (DTML's two networks) on the datastore's labelled *and*
    unlabelled images.

    As :class:`PartialLabelTrainTask` (labelled cases keep their ``annotated`` classes), with what a
    semi-supervised bundle needs:

    - **unlabelled images train too**: every datastore image of the bundle's dimensionality without
      a label joins the training split without ``label`` (the bundle gives it an all-unknown
      ``<0,p,1>`` map: only the consistency term reaches it). With none, the run samples the
      labelled cases alone (``sampling: "case"``; the bundle's default, ``"two_stream"``, needs
      both kinds); a request's ``overrides`` may still choose.
    - **one run, from scratch**: ``epochs`` is the request's ``max_epochs``; the bundle saves its
      networks at the end of training (``model.pt`` = ``M_s``, and the files its metadata
      declares, DTML: ``models/model_sdm.pt`` = ``M_d``), so no validation is needed to get a
      model. No case is held out: the labelled cases (few, in this setting) all train, and the
      run validates on them every ``val_interval`` epochs (``val_split: "validation"``, an
      indicative Dice in ``metrics.json``).

    ``train.json`` must define the keys in :attr:`REQUIRED_KEYS` (``ValueError`` naming the missing ones).

    Example:
        >>> import partialseg
        >>> task = bundle_train_task(Path(partialseg.__file__).parents[1] / "bundles" / "dtml_atrium")
        >>> type(task).__name__, task.served
        ('SemiSupervisedTrainTask', [('sdm_network', 'model_sdm.pt'), ('checkpoint', 'model.pt')])
        >>> task.stage_overrides({"max_epochs": 3})
        {'epochs': 3, 'val_split': 'validation'}
    """

    #: train.json keys the task sets or reads
    REQUIRED_KEYS = ("epochs", "ckpt_dir", "ckpt_name", "sampling", "val_split", "val_interval")
    OWNED_KEYS = (*PartialLabelTrainTask.OWNED_KEYS, "val_split")
    #: the ``source`` of the unlabelled cases in the run's dataset
    UNLABELLED_SOURCE = "monailabel_unlabelled"

    def __init__(
        self, bundle_root: str | os.PathLike, classes: list[str], overrides: dict[str, Any] | None = None, max_epochs: int = 10
    ) -> None:
        name = Path(bundle_root).name
        super().__init__(bundle_root, classes, overrides, max_epochs,
                         description=f"semi-supervised training of {name} (train.json) on the labelled and unlabelled images")  # fmt: skip

    def stage_overrides(self, request: dict[str, Any]) -> dict[str, Any]:
        """One run of ``max_epochs`` epochs from scratch, validated on the labelled cases."""
        return {"epochs": self.requested_epochs(request), "val_split": "validation"}

    def dataset(self, datastore: Datastore, folder: Path) -> dict[str, Any]:
        """The labelled cases (all training, validated on too) and the unlabelled images of the
        bundle's dimensionality, as ``folder/dataset.json``; returns its content."""
        content = super().dataset(datastore, folder)
        labelled = self.labelled_cases(content)
        known = set(datastore.get_labeled_images())
        unlabelled, skipped = [], []
        for image_id in sorted(set(datastore.list_images()) - known):
            image = datastore.get_image_uri(image_id)
            ndim = _image_ndim(image)
            if ndim is not None and ndim != self.dimension:
                skipped.append(image_id)
                continue
            unlabelled.append({"image": image, "source": self.UNLABELLED_SOURCE, "case": image_id})
        if skipped:
            logger.info(f"{self.name}: {len(skipped)} unlabelled image(s) are not {self.dimension}D, left out: {skipped}")
        return self.rewrite_dataset(content, folder, training=labelled + unlabelled, validation=[dict(c) for c in labelled])

    def data_overrides(self, content: dict[str, Any]) -> dict[str, Any]:
        """``sampling: "case"`` when the datastore holds no unlabelled image (two streams need both kinds)."""
        if any(c.get("source") == self.UNLABELLED_SOURCE for c in content["training"]):
            return {}
        logger.info(f"{self.name}: no unlabelled image in the datastore: training on the labelled cases alone (sampling 'case')")
        return {"sampling": "case"}

    def check(self, content: dict[str, Any], overrides: dict[str, Any]) -> None:
        """Nothing to refuse beyond the request checks: the model is saved at the end of training."""


class HybridTrainTask(PartialLabelTrainTask):
    """Train a hybrid-supervision bundle (``hybrid_polyp``) on the datastore's strong and weak labels.

    A datastore label is **strong** unless its label info says otherwise: save a quick mask with
    ``PUT /datastore/label?image=ID&tag=final`` and ``params={"supervision": "weak",
    "weak_type": "ellipse"}`` (``weak_type`` optional, free text, reported in the run's gamma CSV
    and histogram). The info keys are those of ``dataset.json`` (``docs/data_format.md``), so the
    run's dataset carries them unchanged; any other ``supervision`` value is refused naming the
    label file. Every mask annotates the whole image (a weak mask without foreground is a missing
    polyp, not a partial label). All labelled cases train; the strong ones are also the validation
    split (an indicative Dice every ``val_interval`` epochs). One run of ``max_epochs`` epochs from
    scratch; network 1 (``models/model.pt``) and network 2 (the declared ``model_files``) are saved
    at the end, so no validation is needed to get a model.

    Refused before training (``ValueError`` naming the datastore): no strong label (the indicators
    follow the strong set's gradient), or no weak one (nothing for the indicators to weigh: train a
    fully supervised bundle instead).

    Example:
        >>> import partialseg
        >>> task = bundle_train_task(Path(partialseg.__file__).parents[1] / "bundles" / "hybrid_polyp")
        >>> type(task).__name__, task.served
        ('HybridTrainTask', [('network2', 'model_net2.pt'), ('checkpoint', 'model.pt')])
        >>> task.stage_overrides({"max_epochs": 3})
        {'epochs': 3, 'val_split': 'validation'}
    """

    REQUIRED_KEYS = ("epochs", "ckpt_dir", "ckpt_name", "val_split", "val_interval")
    OWNED_KEYS = (*PartialLabelTrainTask.OWNED_KEYS, "val_split")
    #: no ``batch_size``: the bundle's batch is ``2 x pairs_per_batch`` (an ``overrides`` key)
    REQUEST_KEYS = ("max_epochs", "iterations_per_epoch", "val_interval", "learning_rate")

    def __init__(
        self, bundle_root: str | os.PathLike, classes: list[str], overrides: dict[str, Any] | None = None, max_epochs: int = 10
    ) -> None:
        name = Path(bundle_root).name
        super().__init__(bundle_root, classes, overrides, max_epochs,
                         description=f"hybrid-supervised training of {name} (train.json) on the strong and weak labels")  # fmt: skip

    def stage_overrides(self, request: dict[str, Any]) -> dict[str, Any]:
        """One run of ``max_epochs`` epochs from scratch, validated on the strong labels."""
        return {"epochs": self.requested_epochs(request), "val_split": "validation"}

    @staticmethod
    def supervision(label_path: str, info: dict[str, Any] | None) -> dict[str, str]:
        """``{"supervision": ..., ["weak_type": ...]}`` of a datastore label from its info (default strong).

        Example:
            >>> HybridTrainTask.supervision("x.png", {"supervision": "weak", "weak_type": "ellipse"})
            {'supervision': 'weak', 'weak_type': 'ellipse'}
            >>> HybridTrainTask.supervision("x.png", None)
            {'supervision': 'strong'}
        """
        from partialseg.data.spec import SUPERVISIONS

        info = info or {}
        value = info.get("supervision", "strong") or "strong"
        if value not in SUPERVISIONS:
            raise ValueError(f"{label_path}: label info 'supervision' must be one of {list(SUPERVISIONS)}, got {value!r}")
        out = {"supervision": str(value)}
        if value == "weak" and info.get("weak_type"):
            out["weak_type"] = str(info["weak_type"])
        return out

    def dataset(self, datastore: Datastore, folder: Path) -> dict[str, Any]:
        """Every labelled case (strong or weak, whole-image masks) trains; the strong ones validate."""
        content = super().dataset(datastore, folder)
        cases = self.labelled_cases(content)
        for case in cases:
            case.update(self.supervision(case["label"], datastore.get_label_info(case["case"], DefaultLabelTag.FINAL)))
            case["annotated"] = "all"
        strong = [dict(c) for c in cases if c["supervision"] == "strong"]
        return self.rewrite_dataset(content, folder, training=cases, validation=strong)

    def check(self, content: dict[str, Any], overrides: dict[str, Any]) -> None:
        """Refuse a datastore without a strong or without a weak label (named)."""
        counts = {"strong": 0, "weak": 0}
        for c in content["training"]:
            counts[c["supervision"]] += 1
        if not counts["strong"]:
            raise ValueError(
                f"{self.name}: the datastore's {counts['weak']} labels are all weak; hybrid supervision needs at least one strong"
                " label (save a carefully drawn mask without params, or with params={\"supervision\": \"strong\"})"
            )
        if not counts["weak"]:
            raise ValueError(
                f"{self.name}: the datastore's {counts['strong']} labels are all strong; save quick masks with "
                "params={\"supervision\": \"weak\"} for the indicators to weigh (or train a fully supervised bundle)"
            )


class AtlasTrainTask(PartialLabelTrainTask):
    """Train the atlas bundle (``atlas_multimodal_abdomen``) on the datastore's partial labels of CT
    and MR images.

    As :class:`PartialLabelTrainTask` (each label keeps its ``annotated`` organs: the label info's,
    else the values present in the label file), with what the atlas method needs:

    - **a modality per image**: the label info's ``modality`` (``PUT /datastore/label`` with
      ``params={"annotated": ["liver"], "modality": "CT"}``), else the image info's (``PUT
      /datastore/image/info?image=ID`` with ``info={"modality": "CT"}``, or ``params`` when the image
      is uploaded). It chooses the intensity normalisation (``intensity_by_modality``: CT window, MR
      z-score) and AMAN's indicator (the organs some case of the image's modality labels).
    - **the atlas from the datastore**: before each run the task builds the a priori atlas
      (:func:`partialseg.data.atlas.build_atlas`, the bundle's ``atlas_sigma`` and
      ``atlas_normalize``) from the labelled images into the run's dataset folder, where the bundle
      reads it; each organ's channel is the mean over the labels that annotate it.
    - **one run, from scratch**: ``epochs`` is the request's ``max_epochs``; the bundle saves the
      main network (``models/model.pt``, what inference reads, with its settings) at the end of
      training, so no validation is needed; ``models/model_all.pt`` (every network, optimiser and
      the prototypes) stays in the run's ``models/`` folder.

    Refused before training (``ValueError`` naming the images or organs; a 422 answer in the
    server): a labelled image without a ``modality``, a modality that ``intensity_by_modality``
    does not list, an organ that no label annotates (the atlas, APRN and AMAN need every organ
    labelled somewhere), or any other reason the atlas cannot be built (an unreadable file, a label
    off its image's grid).

    Example:
        >>> import partialseg
        >>> task = bundle_train_task(Path(partialseg.__file__).parents[1] / "bundles" / "atlas_multimodal_abdomen")
        >>> type(task).__name__, task.served
        ('AtlasTrainTask', [('checkpoint', 'model.pt')])
        >>> task.stage_overrides({"max_epochs": 3})
        {'epochs': 3}
    """

    REQUIRED_KEYS = ("epochs", "ckpt_dir", "ckpt_name", "dataset_dir", "atlas_file", "atlas_sigma", "atlas_normalize",
                     "intensity_by_modality", "modality_key")  # fmt: skip
    #: the atlas is the one built from the datastore (a request may not point the run at another file)
    OWNED_KEYS = (*PartialLabelTrainTask.OWNED_KEYS, "atlas_file", "build_atlas_on_first_run", "modality_key", "full_ckpt_name")
    #: no ``val_interval``: the bundle does not validate
    REQUEST_KEYS = ("max_epochs", "iterations_per_epoch", "batch_size", "learning_rate")

    def __init__(
        self, bundle_root: str | os.PathLike, classes: list[str], overrides: dict[str, Any] | None = None, max_epochs: int = 10
    ) -> None:
        name = Path(bundle_root).name
        super().__init__(bundle_root, classes, overrides, max_epochs,
                         description=f"atlas-guided training of {name} (train.json) on the CT and MR partial labels")  # fmt: skip

    def config(self) -> dict[str, Any]:
        return {"max_epochs": self.max_epochs, "iterations_per_epoch": 20}

    def stage_overrides(self, request: dict[str, Any]) -> dict[str, Any]:
        """One run of ``max_epochs`` epochs from scratch."""
        return {"epochs": self.requested_epochs(request)}

    @staticmethod
    def modality(datastore: Datastore, image_id: str, label_info: dict[str, Any] | None) -> str | None:
        """The image's modality: its label info's ``modality``, else its image info's; None when neither has one."""
        for info in (label_info or {}, _image_info(datastore, image_id)):
            value = info.get("modality")
            if value not in (None, ""):
                if not isinstance(value, str):
                    raise ValueError(f"image {image_id!r}: modality must be a string such as 'CT' or 'MR', got {value!r}")
                return value
        return None

    def dataset(self, datastore: Datastore, folder: Path) -> dict[str, Any]:
        """Every labelled 3D image trains, with its ``annotated`` organs and its ``modality`` (None
        when the datastore has none: :meth:`check` names it)."""
        content = super().dataset(datastore, folder)
        cases = self.labelled_cases(content)
        for case in cases:
            case["modality"] = self.modality(datastore, case["case"], datastore.get_label_info(case["case"], DefaultLabelTag.FINAL))
        return self.rewrite_dataset(content, folder, training=cases, validation=[dict(c) for c in cases])

    def check(self, content: dict[str, Any], overrides: dict[str, Any]) -> None:
        """Refuse images without a known modality and organs no label annotates (named), then build
        the atlas into the run's dataset folder (its own refusals pass through)."""
        cases = content["training"]
        known = self.setting(overrides, "intensity_by_modality")
        known = sorted(known) if isinstance(known, dict) else []
        absent = [c["case"] for c in cases if not c.get("modality")]
        if absent:
            raise ValueError(
                f"{self.name}: labelled image(s) {absent} have no modality: the atlas method normalises each image by its"
                f" modality and AMAN compares modalities. Set it on the image (PUT /datastore/image/info?image=ID with"
                f" info={{\"modality\": \"CT\"}}) or on its label (params={{\"modality\": \"MR\", ...}}); known: {known}."
            )
        unknown = {c["case"]: c["modality"] for c in cases if c["modality"] not in known}
        if unknown:
            raise ValueError(
                f"{self.name}: modality of {unknown} is not one of {known} (intensity_by_modality): set one of those, or add"
                " an entry for it to the bundle's intensity_by_modality (bundle_overrides)."
            )
        organs = [c for c in self.unannotated(cases) if c != self.classes[0]]
        if organs:
            raise ValueError(
                f"{self.name}: organ(s) {organs} are annotated by no labelled image of the datastore: the atlas, the refiner"
                f" and the discriminator need every organ labelled somewhere. Save a label that annotates"
                f" {' and '.join(organs)} (params={{\"annotated\": [...], \"modality\": ...}})."
            )
        self._modalities = {c["case"]: c["modality"] for c in cases}
        from partialseg.data.atlas import build_atlas

        folder = Path(overrides["dataset_dir"])
        self._atlas = build_atlas(folder, out=folder / "atlas.nii.gz", sigma=self.setting(overrides, "atlas_sigma"),
                                  normalize=self.setting(overrides, "atlas_normalize"), progress=False)  # fmt: skip

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        stats = super().__call__(request, datastore)
        stats.update(modality=self._modalities, atlas=str(self._atlas))
        return stats

    def output_overrides(self, run_dir: Path) -> dict[str, Any]:
        """As the base task, with the run's atlas read (never rebuilt) from its dataset folder."""
        return {**super().output_overrides(run_dir), "atlas_file": str(run_dir / "dataset" / "atlas.nii.gz"),
                "build_atlas_on_first_run": False}  # fmt: skip


def _new_run_dir(parent: Path, name: str) -> Path:
    """Create and return ``parent/name``, or ``name_2``, ``name_3``... when taken (a run never
    shares a folder, where the bundle would resume another run's ``checkpoint.pt``)."""
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10000):
        path = parent / (name if i == 1 else f"{name}_{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder {parent / name}_N")


def _image_info(datastore: Datastore, image_id: str) -> dict[str, Any]:
    """The datastore's info of an image (``{}`` for a datastore without image info)."""
    get = getattr(datastore, "get_image_info", None)
    info = get(image_id) if callable(get) else None
    return info if isinstance(info, dict) else {}


def _image_ndim(path: str) -> int | None:
    """Spatial dimensionality of an image: its number of dimensions, trailing size-1 ones beyond
    the second not counted (a slice saved as ``(H, W, 1)`` is 2D, for every bundle). NIfTI is read
    from its header; other formats through MONAI's reader. None for an unreadable file (training
    then names it)."""
    from partialseg.data.validation import read_image, spatial_shape

    try:
        if str(path).lower().endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            shape = nib.load(str(path)).shape  # the header only
        else:
            shape = read_image(str(path))[0].shape
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the run that reads it
        return None
    if str(path).lower().endswith(_RGB_SUFFIXES) and len(shape) == 3 and shape[-1] in (3, 4):
        return 2  # an RGB(A) frame: its last axis holds colours, not a third dimension
    return len(spatial_shape(shape, str(path)))


#: 2D image formats whose trailing axis of 3 or 4 is colour channels (the hybrid bundle's frames)
_RGB_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
