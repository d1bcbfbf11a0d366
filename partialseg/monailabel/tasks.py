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

__all__ = ["BundleInferTask", "PartialLabelTrainTask", "bundle_classes", "discover_bundles"]

logger = logging.getLogger(__name__)

_NIFTI = (".nii.gz", ".nii")


def discover_bundles(bundles_dir: str | os.PathLike) -> dict[str, Path]:
    """Bundle name -> folder, for every ``bundles_dir/<name>/configs/metadata.json``."""
    root = Path(bundles_dir)
    return {p.parent.parent.name: p.parent.parent for p in sorted(root.glob("*/configs/metadata.json"))}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def bundle_classes(bundle: str | os.PathLike) -> list[str] | None:
    """The bundle's class names (index 0 = background), or None when its metadata does not list them.

    Read from ``network_data_format.outputs.pred.channel_def`` when the output ``format`` is a
    per-class map (``segmentation`` / ``labels``) with one channel per class, i.e. the output
    channel i is class i. (DCL's conditional network has 2m output logits, not m classes: None.)
    """
    meta = _read_json(Path(bundle) / "configs" / "metadata.json")
    pred = meta.get("network_data_format", {}).get("outputs", {}).get("pred", {})
    channels = pred.get("channel_def") or {}
    n = pred.get("num_channels")
    if pred.get("format") not in ("segmentation", "labels") or len(channels) != n:
        return None
    names = [channels.get(str(i)) for i in range(n)]
    if any(not isinstance(name, str) or "(" in name for name in names):  # "(logit)" style descriptions
        return None
    train = Path(bundle) / "configs" / "train.json"
    if train.is_file():
        num_classes = _read_json(train).get("num_classes")
        if isinstance(num_classes, int) and num_classes != n:
            return None
    return names


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
        image = meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
        classes = bundle_classes(self.bundle_root)
        labels = {c: i for i, c in enumerate(classes) if i > 0} if classes else None
        super().__init__(
            path=str(self.bundle_root / "models" / "model.pt"),
            network=None,
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=len(image.get("spatial_shape", [0, 0, 0])),
            description=meta.get("name") or meta.get("task", self.name),
            config={"device": ["cpu"] if not _cuda() else ["cuda", "cpu"]},
        )

    def is_valid(self) -> bool:
        return Path(self.path[0]).is_file()

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
    annotation (voxels of value 0 are then "one of the other classes", not background). The
    bundle's ``train.json`` then runs as stage 2 (validation: the last fully annotated case, held
    out, when there are two cases or more; else the training cases themselves, an indicative metric) (``python -m monai.bundle run``, a subprocess),
    initialised from the served ``models/model.pt`` when there is one, and writes the new
    ``models/model.pt`` atomically; the infer task reloads it on its next request.

    Args:
        bundle_root: the bundle folder (``configs/train.json``).
        classes: class names, index 0 background (:func:`bundle_classes`).
        overrides: config overrides for every training (e.g. a coarser ``pixdim``).
        max_epochs: default number of epochs (the request's ``max_epochs`` wins).
    """

    def __init__(
        self, bundle_root: str | os.PathLike, classes: list[str], overrides: dict[str, Any] | None = None, max_epochs: int = 10
    ) -> None:
        self.bundle_root = Path(bundle_root).resolve()
        self.name = self.bundle_root.name
        self.classes = list(classes)
        self.overrides = dict(overrides or {})
        self.max_epochs = int(max_epochs)
        self._stats: dict[str, Any] = {}
        super().__init__(f"partial-label fine-tuning of {self.name} (train.json, stage 2)")

    def config(self) -> dict[str, Any]:
        return {"max_epochs": self.max_epochs, "iterations_per_epoch": 20, "val_interval": 1}

    def stats(self) -> dict[str, Any]:
        return self._stats

    def _annotated(self, label_path: str, info: dict[str, Any]) -> list[str] | str:
        given = (info or {}).get("annotated")
        if given == "all":
            return "all"
        if given:
            names = []
            for c in given if isinstance(given, (list, tuple)) else [given]:
                name = self.classes[int(c)] if isinstance(c, int) or str(c).isdigit() else str(c)
                if name not in self.classes:
                    raise ValueError(f"{label_path}: annotated class {c!r} is not one of {self.classes}")
                names.append(name)
            return names
        import nibabel as nib
        import numpy as np

        values = np.unique(np.asarray(nib.load(label_path).dataobj)).astype(int)
        return [self.classes[v] for v in values if 0 < v < len(self.classes)]

    def dataset(self, datastore: Datastore, folder: Path) -> dict[str, Any]:
        """Write the datastore's labelled cases as ``folder/dataset.json``; returns its content."""
        cases = []
        for image_id in sorted(datastore.get_labeled_images()):
            label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL)
            cases.append({"image": datastore.get_image_uri(image_id), "label": label,
                          "annotated": self._annotated(label, info), "source": "monailabel", "case": image_id})  # fmt: skip
        if not cases:
            raise ValueError("no labelled image in the datastore: save a label (tag 'final') first")
        full = [c for c in cases if c["annotated"] == "all" or set(c["annotated"]) >= set(self.classes[1:])]
        folder.mkdir(parents=True, exist_ok=True)
        if full and len(cases) > 1:  # model selection on a held-out, fully annotated case
            validation = [full[-1]]
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

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        stamp = time.strftime("%Y%m%d_%H%M%S")
        run_dir = self.bundle_root / "runs" / f"monailabel_{stamp}"
        content = self.dataset(datastore, run_dir / "dataset")
        served = self.bundle_root / "models" / "model.pt"
        configs = self.bundle_root / "configs"
        overrides: dict[str, Any] = {
            **self.overrides,
            "stage": 2,
            "dataset_dir": str(run_dir / "dataset"),
            "output_dir": str(run_dir),
            "epochs_stage2": int(request.get("max_epochs", self.max_epochs)),
            "init_from_stage1": served.is_file(),
            "stage1_ckpt": str(served),
            "progress": False,
        }
        for key in ("iterations_per_epoch", "val_interval", "learning_rate", "batch_size"):
            if key in request:
                overrides[key] = request[key]
        overrides.update(request.get("overrides") or {})
        from partialseg.engines.launch import bundle_command

        cmd = bundle_command(configs.parent, self.bundle_root, ("train.json",), **overrides)
        log = run_dir / "train.log"
        begin = time.time()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ), cwd=str(self.bundle_root))
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name}: training failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
        self._stats = {
            "model": self.name,
            "checkpoint": str(served),
            "run_dir": str(run_dir),
            "epochs": overrides["epochs_stage2"],
            "cases": len(content["training"]),
            "annotated": {c["case"]: c["annotated"] for c in content["training"]},
            "validation": [c["case"] for c in content["validation"]],
            "train_time": round(time.time() - begin, 2),
        }
        return self._stats


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
