"""What the MONAI Label app reads from a bundle's ``configs/metadata.json``: classes, dimensionality
and the partialseg declaration of its train task and served files.

A partialseg bundle declares, beside MONAI's metadata keys (the bundle schema allows extra keys, so
``python -m monai.bundle verify_metadata`` still passes)::

    "partialseg": {
        "train": {"task": "conditional"},
        "model_files": {
            "support_bank": {"path": "models/support_bank.pt", "train_key": "support_bank_path"}
        }
    }

- ``train.task``: the MONAI Label train task: ``"partial_label"`` (stage-2 fine-tuning of a network
  with one output channel per class, :class:`~partialseg.monailabel.train.PartialLabelTrainTask`),
  ``"conditional"`` (a network that reads conditional images, DCL:
  :class:`~partialseg.monailabel.train.ConditionalTrainTask`), ``"semi_supervised"`` (two networks
  trained on the datastore's labelled *and* unlabelled images, DTML:
  :class:`~partialseg.monailabel.train.SemiSupervisedTrainTask`), ``"hybrid"`` (strong and weak
  labels, :class:`~partialseg.monailabel.train.HybridTrainTask`), ``"atlas"`` (CT and MR partial
  labels, each image's ``modality`` and an atlas built from the datastore:
  :class:`~partialseg.monailabel.train.AtlasTrainTask`), or ``"train": null`` for a bundle that the
  app serves but does not train.
- ``model_files``: the files the bundle saves *beside* ``models/model.pt`` and reads at inference
  (DCL's support bank): a name -> ``{"path": "models/<file>", "train_key": "<key>"}``,
  where ``train_key`` is the ``train.json`` key that holds the file's path. The infer task is listed
  only when ``models/model.pt`` and every declared file exist; a train run writes each into its own
  folder (the key pointed there) and, after success, they replace the served ones before
  ``model.pt``. ``{}`` for a bundle that serves its model alone.

The app chooses tasks and files from this declaration only (never from the configs' text); a bundle
without it, or with a malformed one, is refused with a ``ValueError`` naming its ``metadata.json``.

Example:
    >>> import partialseg
    >>> bundles = Path(partialseg.__file__).parents[1] / "bundles"
    >>> d = read_declaration(bundles / "dcl_cardiac")
    >>> d.train_task, [(f.name, f.path, f.train_key) for f in d.model_files]
    ('conditional', [('support_bank', 'models/support_bank.pt', 'support_bank_path')])
    >>> read_declaration(bundles / "marginal_exclusion_abdomen").model_files
    ()
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from partialseg._checks import check_option

__all__ = [
    "DECLARATION_KEY",
    "TRAIN_TASKS",
    "BundleDeclaration",
    "ModelFile",
    "bundle_classes",
    "bundle_dimension",
    "discover_bundles",
    "read_declaration",
    "read_json",
]

#: the metadata key of the partialseg declaration
DECLARATION_KEY = "partialseg"
#: values of the declaration's ``train.task``
TRAIN_TASKS = ("partial_label", "conditional", "semi_supervised", "hybrid", "atlas")
#: file names MONAI Label's NIfTI readers and writers use
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: the model file every bundle serves (MONAI bundle layout); never declared in ``model_files``
MODEL_PATH = "models/model.pt"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ModelFile:
    """A file served beside ``models/model.pt``: ``name``, its ``path`` relative to the bundle
    root (``models/<file>``) and the ``train.json`` key (``train_key``) that holds its path."""

    name: str
    path: str
    train_key: str

    @property
    def filename(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class BundleDeclaration:
    """A bundle's ``partialseg`` metadata: its MONAI Label train task (None: not trained through
    the app) and the files it serves beside ``models/model.pt``, in the order they are replaced."""

    train_task: str | None
    model_files: tuple[ModelFile, ...]

    def served_paths(self, bundle_root: str | os.PathLike) -> list[Path]:
        """``models/model.pt`` and every declared file, under ``bundle_root``."""
        root = Path(bundle_root)
        return [root / MODEL_PATH] + [root / f.path for f in self.model_files]


def discover_bundles(bundles_dir: str | os.PathLike) -> dict[str, Path]:
    """Bundle name -> folder, for every ``bundles_dir/<name>/configs/metadata.json``."""
    root = Path(bundles_dir)
    return {p.parent.parent.name: p.parent.parent for p in sorted(root.glob("*/configs/metadata.json"))}


def read_json(path: str | os.PathLike) -> Any:
    """The JSON content of ``path``; ``ValueError`` naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _metadata(bundle: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    path = Path(bundle) / "configs" / "metadata.json"
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    return path, meta


def read_declaration(bundle: str | os.PathLike) -> BundleDeclaration:
    """The bundle's ``partialseg`` declaration (module docstring), checked.

    Raises:
        ValueError: naming ``configs/metadata.json`` when the declaration is missing or malformed
            (unknown keys, an unknown train task, a file path outside ``models/``, a repeated
            file or key, a name that is not an identifier).
    """
    path, meta = _metadata(bundle)
    example = '{"train": {"task": "partial_label"}, "model_files": {}}'
    if DECLARATION_KEY not in meta:
        raise ValueError(
            f"{path}: no {DECLARATION_KEY!r} declaration: the MONAI Label app needs the bundle's train task and the files it"
            f" serves beside models/model.pt, e.g. \"{DECLARATION_KEY}\": {example} (docs/serving.md)"
        )
    decl = meta[DECLARATION_KEY]
    where = f"{path}: {DECLARATION_KEY}"
    if not isinstance(decl, dict):
        raise ValueError(f"{where} must be an object such as {example}, got {decl!r}")
    unknown = sorted(set(decl) - {"train", "model_files"})
    absent = sorted({"train", "model_files"} - set(decl))
    if unknown or absent:
        raise ValueError(f"{where} must have exactly the keys 'train' and 'model_files' (unknown: {unknown}, missing: {absent})")
    train = decl["train"]
    if train is None:
        task = None
    elif isinstance(train, dict) and set(train) == {"task"}:
        try:
            task = check_option(train["task"], TRAIN_TASKS, f"{where}.train.task")
        except ValueError as e:
            raise ValueError(str(e)) from None
    else:
        raise ValueError(f"{where}.train must be null or {{\"task\": one of {list(TRAIN_TASKS)}}}, got {train!r}")
    files = decl["model_files"]
    if not isinstance(files, dict):
        raise ValueError(f"{where}.model_files must be an object {{name: {{\"path\": \"models/<file>\", \"train_key\": \"<train.json key>\"}}}}, got {files!r}")
    out: list[ModelFile] = []
    for name, entry in files.items():
        at = f"{where}.model_files.{name}"
        if not _NAME.fullmatch(name):
            raise ValueError(f"{at}: the name must be an identifier (letters, digits, '_')")
        if not isinstance(entry, dict) or set(entry) != {"path", "train_key"}:
            raise ValueError(f"{at} must be {{\"path\": \"models/<file>\", \"train_key\": \"<train.json key>\"}}, got {entry!r}")
        file, key = entry["path"], entry["train_key"]
        parts = PurePosixPath(file).parts if isinstance(file, str) else ()
        if len(parts) != 2 or parts[0] != "models" or parts[1] in (".", "..") or "\\" in file or file == MODEL_PATH:
            raise ValueError(f"{at}.path must be a file directly in models/ other than model.pt (e.g. 'models/support_bank.pt'), got {file!r}")
        if not isinstance(key, str) or not _NAME.fullmatch(key):
            raise ValueError(f"{at}.train_key must name a top-level train.json key, got {key!r}")
        out.append(ModelFile(name, file, key))
    for attr in ("path", "train_key"):
        values = [getattr(f, attr) for f in out]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{where}.model_files: {attr} {repeated} declared more than once")
    return BundleDeclaration(task, tuple(out))


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
    _, meta = _metadata(bundle)
    train = Path(bundle) / "configs" / "train.json"
    from partialseg.data.plan import plan_fallback

    # a planned num_classes ("$@dataset_plan.get('num_classes', 7)"): the bundle's own, its fallback
    num_classes = plan_fallback(read_json(train).get("num_classes")) if train.is_file() else None
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
    """Spatial dimensionality of the bundle's input (``len`` of the metadata's image ``spatial_shape``; 3 if absent).

    Example:
        >>> import partialseg
        >>> bundle_dimension(Path(partialseg.__file__).parents[1] / "bundles" / "dcl_cardiac")
        2
    """
    _, meta = _metadata(bundle)
    image = meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
    return len(image.get("spatial_shape", [0, 0, 0]))
