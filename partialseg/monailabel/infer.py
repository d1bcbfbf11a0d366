"""The MONAI Label infer task that serves a bundle's ``configs/inference.json``.

It does not import torchvision: MONAI Label's own ``BundleInferTask`` imports ``torchvision.utils``
at module level, which does not import beside torch 2.13 here. It builds on MONAI Label's
``BasicInferTask`` and on ``monai.bundle``; which files must exist before the bundle is listed comes
from the bundle's ``partialseg`` metadata declaration (:mod:`partialseg.monailabel.bundle`).

Example:
    >>> import partialseg
    >>> bundles = Path(partialseg.__file__).parents[1] / "bundles"
    >>> task = BundleInferTask(bundles / "dcl_cardiac")
    >>> [p.name for p in task.required_files()], task.dimension
    (['model.pt', 'support_bank.pt'], 2)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from partialseg.monailabel.bundle import NIFTI_SUFFIXES, bundle_classes, bundle_dimension, read_declaration, read_json
from partialseg.monailabel.request_checks import RequestError

__all__ = ["BundleInferTask", "convert_result"]

logger = logging.getLogger(__name__)

_EXTENSION = re.compile(r"(\.[A-Za-z0-9]{1,8}){1,2}")


class BundleInferTask(BasicInferTask):
    """Serve a bundle's ``configs/inference.json`` as a MONAI Label segmentation model.

    Every request runs the bundle's own inference workflow (``monai.bundle.ConfigWorkflow``: the
    same parser, network, preprocessing, inferer, postprocessing and writer as ``python -m
    monai.bundle run --config_file configs/inference.json``) on the one requested image, with
    ``datalist`` and ``output_dir`` overridden, so the label it returns is voxel-identical to the
    bundle's own output: on the input's grid, with its affine, one channel squeezed away.

    A bundle whose ``inference.json`` has a ``modality_key`` (the atlas bundle: CT window or MR
    z-score) gets the request's ``modality`` in the image's datalist entry; the app fills it from
    the datastore's image info when the request has none (:meth:`PartialSegApp.infer`), and the
    bundle's ``default_modality`` (a ``bundle_overrides`` key) covers an image without one.

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
        meta = read_json(self.meta_file)
        self.declaration = read_declaration(self.bundle_root)
        config = read_json(self.config_file)
        key = config.get("modality_key")
        #: the datalist key of an image's modality when the bundle reads one (the atlas bundle), else None
        self.modality_key: str | None = key if isinstance(key, str) and key else None
        #: the modality of an image without one (the ``default_modality`` override, else the config's)
        self.default_modality = self.overrides.get("default_modality", config.get("default_modality"))
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
        """Whether the bundle can serve: ``models/model.pt`` and every file its metadata declares beside it."""
        return all(p.is_file() for p in self.required_files())

    def required_files(self) -> list[Path]:
        """``models/model.pt`` and the declared ``model_files`` (DCL: ``models/support_bank.pt``)."""
        return self.declaration.served_paths(self.bundle_root)

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
        entry = {"image": image}
        modality = request.get("modality")
        if self.modality_key and modality not in (None, ""):
            if not isinstance(modality, str):
                raise RequestError(f"{self.name}: modality must be a string such as 'CT' or 'MR', got {modality!r}")
            entry[self.modality_key] = modality  # the bundle normalises the image by it
        elif self.modality_key and self.default_modality in (None, ""):
            raise RequestError(
                f"{self.name}: image {os.path.basename(image)!r} has no modality, which chooses its intensity normalisation:"
                " send params={\"modality\": \"CT\"} (or \"MR\"), set the image's info (PUT /datastore/image/info with"
                " info={\"modality\": \"CT\"}), or serve with --conf bundle_overrides"
                f" '{{\"{self.name}\": {{\"default_modality\": \"CT\"}}}}'",
                422,
            )
        begin = time.time()
        out_dir = Path(tempfile.mkdtemp(prefix=f"partialseg-{self.name}-"))
        device = request.get("device", "cpu")
        device = device[0] if isinstance(device, (list, tuple)) else device
        device = "cuda:0" if str(device).startswith("cuda") and _cuda() else "cpu"
        overrides = {
            **self.overrides,
            "bundle_root": str(self.bundle_root),
            "datalist": [entry],
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
            written = [p for p in out_dir.rglob("*") if p.name.endswith(NIFTI_SUFFIXES)]
            if len(written) != 1:
                raise RuntimeError(f"{self.name}: inference wrote {len(written)} label files to {out_dir}, expected 1")
            suffix = ".nii.gz" if written[0].name.endswith(".nii.gz") else ".nii"
            fd, result = tempfile.mkstemp(prefix=f"{self.name}-", suffix=suffix)
            os.close(fd)
            shutil.move(str(written[0]), result)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        extension = request.get("result_extension")
        if extension and (not isinstance(extension, str) or not _EXTENSION.fullmatch(extension)):
            raise RequestError(f"{self.name}: result_extension {extension!r} must be a file extension such as '.nrrd' or '.nii.gz'")
        if extension or request.get("result_dtype"):
            result = convert_result(result, request.get("result_extension"), request.get("result_dtype"), bool(request.get("result_compress")))
        latency = time.time() - begin
        logger.info(f"{self.name}: {image} -> {result} in {latency:.2f} s")
        return result, {"label_names": self.labels, "latencies": {"total": round(latency, 3)}}


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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
