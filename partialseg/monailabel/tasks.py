"""MONAI Label tasks that serve partialseg bundles: inference from ``inference.json``, partial-label training.

Neither task imports torchvision: MONAI Label's own ``BundleInferTask`` imports
``torchvision.utils`` at module level, which does not import beside torch 2.13 here. Both build on
MONAI Label's core interfaces (``BasicInferTask``, ``TrainTask``) and on ``monai.bundle``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.infer.basic_infer import BasicInferTask

from partialseg._fileio import atomic_copy

__all__ = [
    "BundleInferTask",
    "PartialLabelTrainTask",
    "ConditionalTrainTask",
    "bundle_classes",
    "bundle_train_task",
    "convert_result",
    "discover_bundles",
]

logger = logging.getLogger(__name__)

_NIFTI = (".nii.gz", ".nii")


def discover_bundles(bundles_dir: str | os.PathLike) -> dict[str, Path]:
    """Bundle name -> folder, for every ``bundles_dir/<name>/configs/metadata.json``."""
    root = Path(bundles_dir)
    return {p.parent.parent.name: p.parent.parent for p in sorted(root.glob("*/configs/metadata.json"))}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def bundle_classes(bundle: str | os.PathLike) -> list[str] | None:
    """The bundle's class names (index 0 = background), or None when its metadata does not name them.

    Read, in this order, from ``configs/metadata.json``:

    1. ``class_names`` (a partialseg key beside the MONAI ones; the bundle schema allows extra
       keys, so ``verify_metadata`` still passes): the ``m`` names, for a bundle whose network
       output is not one channel per class. DCL's CompNet has ``2m`` output logits (the part of
       each class inside and outside its conditional label) and its inference workflow returns
       the ``m`` classes these names describe. When ``train.json`` sets ``num_classes``, it must
       equal their number (``ValueError`` otherwise: the bundle contradicts itself).
    2. ``network_data_format.outputs.pred.channel_def`` when the output ``format`` is a per-class
       map (``segmentation`` / ``labels``) with one channel per class, i.e. the output channel i is
       class i (and ``train.json``'s ``num_classes``, if set, agrees). "(logit)" style channel
       descriptions are not class names: None.

    Example:
        >>> import partialseg
        >>> bundles = Path(partialseg.__file__).parents[1] / "bundles"
        >>> bundle_classes(bundles / "dcl_cardiac")
        ['background', 'LV', 'MYO', 'RV']
        >>> bundle_classes(bundles / "marginal_exclusion_abdomen")[:2]
        ['background', 'liver']
    """
    meta = _read_json(Path(bundle) / "configs" / "metadata.json")
    train = Path(bundle) / "configs" / "train.json"
    num_classes = _read_json(train).get("num_classes") if train.is_file() else None
    if "class_names" in meta:
        names = meta["class_names"]
        if (
            not isinstance(names, list)
            or len(names) < 2
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)
        ):
            raise ValueError(f"{bundle}: metadata class_names must list two or more distinct class names, got {names!r}.")
        if isinstance(num_classes, int) and num_classes != len(names):
            raise ValueError(f"{bundle}: metadata class_names {names} name {len(names)} classes, train.json num_classes is {num_classes}.")
        return list(names)
    pred = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    channels = pred.get("channel_def") or {}
    n = pred.get("num_channels")
    if pred.get("format") not in ("segmentation", "labels") or len(channels) != n:
        return None
    names = [channels.get(str(i)) for i in range(n)]
    if any(not isinstance(name, str) or "(" in name for name in names):  # "(logit)" style descriptions
        return None
    if isinstance(num_classes, int) and num_classes != n:
        return None
    return names


def bundle_dimension(bundle: str | os.PathLike) -> int:
    """Spatial dimensionality of the bundle's input (``len`` of the metadata's image ``spatial_shape``; 3 if absent)."""
    meta = _read_json(Path(bundle) / "configs" / "metadata.json")
    image = meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
    return len(image.get("spatial_shape", [0, 0, 0]))


def bundle_train_task(
    bundle_root: str | os.PathLike, overrides: dict[str, Any] | None = None, max_epochs: int = 10
) -> PartialLabelTrainTask | None:
    """The train task of a bundle, or None (logged) when it cannot have one.

    A bundle needs ``configs/train.json`` and class names (:func:`bundle_classes`). One whose
    ``train.json`` saves a support bank (key ``support_bank_path``: a conditional network, DCL)
    gets a :class:`ConditionalTrainTask`; any other a :class:`PartialLabelTrainTask`.
    """
    root = Path(bundle_root)
    train = root / "configs" / "train.json"
    classes = bundle_classes(root)
    if not train.is_file() or classes is None:
        logger.info(f"{root.name}: no train task (needs configs/train.json and class names: metadata class_names or one output channel per class)")
        return None
    cls = ConditionalTrainTask if "support_bank_path" in _read_json(train) else PartialLabelTrainTask
    return cls(root, classes, overrides=overrides, max_epochs=max_epochs)


class BundleInferTask(BasicInferTask):
    """Serve a bundle's ``configs/inference.json`` as a MONAI Label segmentation model.

    Every request runs the bundle's own inference workflow (``monai.bundle.ConfigWorkflow``: the
    same parser, network, preprocessing, inferer, postprocessing and writer as ``python -m
    monai.bundle run --config_file configs/inference.json``) on the one requested image, with
    ``datalist`` and ``output_dir`` overridden, so the label it returns is voxel-identical to the
    bundle's own output: on the input's grid, with its affine, one channel squeezed away.

    Args:
        bundle_root: the bundle folder (``configs/``; weights in ``models/model.pt``).
        overrides: config overrides applied to every request (e.g. ``{"sw_batch_size": 2}``).
        name: the task name (default: the folder name).
    """

    def __init__(self, bundle_root: str | os.PathLike, overrides: dict[str, Any] | None = None, name: str | None = None) -> None:
        self.bundle_root = Path(bundle_root).resolve()
        self.name = name or self.bundle_root.name
        self.overrides = dict(overrides or {})
        configs = self.bundle_root / "configs"
        self.config_file = configs / "inference.json"
        self.meta_file = configs / "metadata.json"
        meta = _read_json(self.meta_file)
        classes = bundle_classes(self.bundle_root)
        labels = {c: i for i, c in enumerate(classes) if i > 0} if classes else None
        super().__init__(
            path=str(self.bundle_root / "models" / "model.pt"),
            network=None,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=bundle_dimension(self.bundle_root),
            description=meta.get("name") or meta.get("task", self.name),
            config={"device": ["cpu"] if not _cuda() else ["cuda", "cpu"]},
        )

    def is_valid(self) -> bool:
        """Whether the bundle can serve: its ``models/model.pt``, and a conditional bundle's support bank."""
        return all(p.is_file() for p in self.required_files())

    def required_files(self) -> list[Path]:
        files = [Path(self.path[0])]
        if "support_bank.pt" in self.config_file.read_text():  # DCL: the conditional images live beside the model
            files.append(Path(self.path[0]).with_name("support_bank.pt"))
        return files

    def _parsed(self, key: str) -> list[Any]:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        parser.update({**self.overrides, "bundle_root": str(self.bundle_root)})
        return list(parser.get_parsed_content(key).transforms)

    def pre_transforms(self, data: Any = None) -> list[Any]:
        """The bundle's ``preprocessing`` transforms (for inspection: ``__call__`` runs the whole workflow)."""
        return self._parsed("preprocessing")

    def post_transforms(self, data: Any = None) -> list[Any]:
        """The bundle's ``postprocessing`` transforms (for inspection: ``__call__`` runs the whole workflow)."""
        return self._parsed("postprocessing")

    def __call__(self, request: dict[str, Any], callbacks: Any = None) -> tuple[str, dict[str, Any]]:
        from monai.bundle import ConfigWorkflow

        image = request.get("image")
        if not isinstance(image, str) or not os.path.isfile(image):
            raise FileNotFoundError(f"{self.name}: image {image!r} not found")
        begin = time.time()
        out_dir = Path(tempfile.mkdtemp(prefix=f"partialseg-{self.name}-"))
        device = request.get("device", "cpu")
        device = device[0] if isinstance(device, (list, tuple)) else device
        device = "cuda:0" if str(device).startswith("cuda") and _cuda() else "cpu"
        overrides = {
            **self.overrides,
            "bundle_root": str(self.bundle_root),
            "datalist": [{"image": image}],
            "output_dir": str(out_dir),
            "device": f"$torch.device('{device}')",
        }
        try:
            workflow = ConfigWorkflow(
                config_file=str(self.config_file), meta_file=str(self.meta_file), logging_file=False,
                workflow_type="infer", **overrides,
            )  # fmt: skip
            if "progress" in workflow.parser:
                workflow.parser["progress"] = False
            workflow.initialize()
            workflow.run()
            workflow.finalize()
            written = [p for p in out_dir.rglob("*") if p.name.endswith(_NIFTI)]
            if len(written) != 1:
                raise RuntimeError(f"{self.name}: inference wrote {len(written)} label files to {out_dir}, expected 1")
            suffix = ".nii.gz" if written[0].name.endswith(".nii.gz") else ".nii"
            fd, result = tempfile.mkstemp(prefix=f"{self.name}-", suffix=suffix)
            os.close(fd)
            shutil.move(str(written[0]), result)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        if request.get("result_extension") or request.get("result_dtype"):
            result = convert_result(result, request.get("result_extension"), request.get("result_dtype"), bool(request.get("result_compress")))
        latency = time.time() - begin
        logger.info(f"{self.name}: {image} -> {result} in {latency:.2f} s")
        return result, {"label_names": self.labels, "latencies": {"total": round(latency, 3)}}


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
        self.train_config = _read_json(self.bundle_root / "configs" / "train.json")
        absent = [k for k in self.REQUIRED_KEYS if k not in self.train_config]
        if absent:
            raise ValueError(f"{self.name}: configs/train.json lacks the key(s) {absent} that the {type(self).__name__} sets or reads.")
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
        if full and len(cases) > 1 and self.can_train_on([c for c in cases if c is not full[-1]]):
            validation = [full[-1]]  # model selection on a held-out, fully annotated case
            training = [c for c in cases if c is not full[-1]]
        else:  # nothing to hold out: validate on (links to) the training cases, an indicative metric only
            training, validation = cases, []
            for c in cases:
                link = folder / "validation" / Path(c["image"]).name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(c["image"])
                validation.append({**c, "image": str(link)})
        content = {"name": f"monailabel-{self.name}", "classes": self.classes, "training": training, "validation": validation}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "dataset.json").write_text(json.dumps(content, indent=2))
        return content

    def setting(self, overrides: dict[str, Any], key: str) -> Any:
        """The value of config ``key`` in a run with ``overrides``: the override, else ``train.json``'s."""
        return overrides[key] if key in overrides else self.train_config.get(key)

    def stage_overrides(self, request: dict[str, Any]) -> dict[str, Any]:
        """Config keys of the stage to run and its start: stage 2, from the served ``models/model.pt`` if any."""
        served = self.bundle_root / "models" / "model.pt"
        return {
            "stage": 2,
            "epochs_stage2": int(request.get("max_epochs", self.max_epochs)),
            "init_from_stage1": served.is_file(),
            "stage1_ckpt": str(served),
        }

    def output_overrides(self, run_dir: Path) -> dict[str, Any]:
        """Config keys of where the run writes the files to serve: its own ``runs/<run>/models/``
        (:meth:`install` moves them into ``models/`` once the run succeeded)."""
        return {"ckpt_dir": str(run_dir / "models"), "ckpt_name": "model.pt"}

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

    #: files of a run's ``models/`` that the infer task reads, in the order they are replaced
    SERVED: tuple[tuple[str, str], ...] = (("checkpoint", "model.pt"),)

    def install(self, run_dir: Path, overrides: dict[str, Any]) -> dict[str, str]:
        """Put a finished run's outputs where the infer task reads them (each by an atomic
        ``os.replace``); returns ``{what: served path}``. A failed or stopped run never gets here,
        so the served files stay as they were."""
        built, served = Path(overrides["ckpt_dir"]), self.bundle_root / "models"
        absent = [name for _, name in self.SERVED if not (built / name).is_file()]
        if absent:
            raise RuntimeError(f"{self.name}: the run wrote no {absent} in {built} (the model is saved at validation); see {run_dir / 'train.log'}")
        served.mkdir(parents=True, exist_ok=True)
        for _, name in self.SERVED:
            atomic_copy(built / name, served / name)
        return {key: str(served / name) for key, name in self.SERVED}

    #: request keys passed to the bundle, with their type (values must be positive)
    REQUEST_KEYS: dict[str, type] = {"max_epochs": int, "iterations_per_epoch": int, "val_interval": int, "batch_size": int, "learning_rate": float}

    def request_values(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request's training settings, checked: :attr:`REQUEST_KEYS` (else the task's
        :meth:`config` defaults) as positive numbers, and ``overrides`` a dict of keys that
        ``train.json`` has (``ValueError`` naming the key otherwise)."""
        values: dict[str, Any] = {}
        defaults = self.config()
        for key, kind in self.REQUEST_KEYS.items():
            raw = request.get(key, defaults.get(key))
            if raw is None:
                continue
            value = _number(raw, kind)
            if value is None:
                raise ValueError(f"{self.name}: {key} must be {'an integer' if kind is int else 'a number'}, got {raw!r}.")
            if value <= 0:
                raise ValueError(f"{self.name}: {key} must be positive, got {raw!r}.")
            values[key] = value
        extra = request.get("overrides") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"{self.name}: overrides must be an object of config keys and values, got {type(extra).__name__} {extra!r}.")
        unknown = [k for k in extra if str(k).split("#")[0] not in self.train_config]
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(str(k).split("#")[0], list(self.train_config), n=1) for k in unknown}
            said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"{self.name}: overrides name key(s) that configs/train.json does not have: {said}.")
        values["overrides"] = extra
        return values

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        values = self.request_values(request)  # bad values are refused before any folder is made
        run_dir = _new_run_dir(self.bundle_root / "runs", f"monailabel_{time.strftime('%Y%m%d_%H%M%S')}")
        try:
            content = self.dataset(datastore, run_dir / "dataset")
            overrides: dict[str, Any] = {
                **self.overrides,
                **self.stage_overrides({**request, "max_epochs": values["max_epochs"]}),
                "dataset_dir": str(run_dir / "dataset"),
                "output_dir": str(run_dir),
                **self.output_overrides(run_dir),
                "progress": False,
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
        stage = overrides["stage"]
        self._stats = {
            "model": self.name,
            "stage": stage,
            **served,
            "run_dir": str(run_dir),
            "epochs": overrides.get(f"epochs_stage{stage}"),
            "cases": len(content["training"]),
            "annotated": {c["case"]: c["annotated"] for c in content["training"]},
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
    - **served files**: the run writes its model and its support bank (rebuilt from the
      datastore's cases) into ``runs/<run>/models/``; after a successful run both replace
      ``models/model.pt`` and ``models/support_bank.pt`` (each by an atomic ``os.replace``, the
      bank first), which the infer task reads on its next request. A failed run leaves both as
      they were.

    Arguments as :class:`PartialLabelTrainTask`; ``train.json`` must define the keys in
    :attr:`REQUIRED_KEYS` (``ValueError`` naming the missing ones).
    """

    #: train.json keys the task sets or reads
    REQUIRED_KEYS = ("stage", "stage1_ckpt", "epochs_stage1", "epochs_stage2", "ckpt_dir", "ckpt_name", "support_bank_path", "missing", "val_interval")
    SERVED = (("support_bank", "support_bank.pt"), ("checkpoint", "model.pt"))

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
            raise ValueError(f"{self.name}: stage must be 1, 2 or 'auto', got {stage!r}.")
        if int(stage) == 2 and not served:
            raise ValueError(f"{self.name}: stage 2 starts from the served models/model.pt, which does not exist: train stage 1 first.")
        return int(stage)

    def stage_overrides(self, request: dict[str, Any]) -> dict[str, Any]:
        stage = self.choose_stage(request)
        overrides: dict[str, Any] = {"stage": stage, f"epochs_stage{stage}": int(request.get("max_epochs", self.max_epochs))}
        if stage == 2:
            overrides["stage1_ckpt"] = str(self.bundle_root / "models" / "model.pt")
        return overrides

    def output_overrides(self, run_dir: Path) -> dict[str, Any]:
        return {**super().output_overrides(run_dir), "support_bank_path": str(run_dir / "models" / "support_bank.pt")}

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


def convert_result(path: str, extension: str | None = None, dtype: str | None = None, compress: bool = False) -> str:
    """The label file ``path`` rewritten as MONAI Label's writer does for a request's
    ``result_extension`` / ``result_dtype`` / ``result_compress`` (OHIF asks for ``.nrrd``);
    returns the new file (``path`` removed) or ``path`` when nothing changes."""
    if (not extension or path.endswith(extension)) and not dtype:
        return path
    import numpy as np
    from monai.transforms import LoadImage
    from monailabel.transform.writer import Writer

    label = LoadImage(image_only=True)(path)
    data = {"pred": np.asarray(label), "pred_meta_dict": {"affine": np.asarray(label.affine)}, "image_path": path,
            "result_extension": extension or None, "result_dtype": dtype, "result_compress": compress}  # fmt: skip
    out, _ = Writer(label="pred")(data)
    os.remove(path)
    return str(out)


def _number(raw: Any, kind: type) -> int | float | None:
    """``raw`` (a number, or a string of one, as form fields give) as ``kind``; None when it is not
    one (a bool, text, or a fractional value for an int)."""
    if isinstance(raw, bool):
        return None
    try:
        value = float(raw.strip()) if isinstance(raw, str) else float(raw)
    except (TypeError, ValueError):
        return None
    if kind is int:
        return int(value) if value.is_integer() else None
    return value if value == value else None  # not NaN


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


def _image_ndim(path: str) -> int | None:
    """Spatial dimensionality of an image: its number of dimensions, trailing size-1 ones beyond
    the second not counted (a slice saved as ``(H, W, 1)`` is 2D, for every bundle). NIfTI is read
    from its header; other formats through MONAI's reader. None for an unreadable file (training
    then names it)."""
    from partialseg.data.validation import read_image, spatial_shape

    try:
        if str(path).lower().endswith(_NIFTI):
            import nibabel as nib

            shape = nib.load(str(path)).shape  # the header only
        else:
            shape = read_image(str(path))[0].shape
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the run that reads it
        return None
    return len(spatial_shape(shape, str(path)))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
