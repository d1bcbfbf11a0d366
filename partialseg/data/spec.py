"""The partial-label dataset description: ``dataset.json`` -> MONAI datalists.

A dataset is an MSD-style ``dataset.json`` extended with a global ``classes`` list, per-case
``annotated`` classes, a ``source`` and ``modality`` per case, and per-source ``label_maps``
(see ``docs/data_format.md``). :func:`load_dataset` parses and resolves it (class names to
indices, relative paths to absolute ones) without touching the image files; the checks that
need the files live in :mod:`partialseg.data.validation`.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = [
    "ALL",
    "IMAGE_SUFFIXES",
    "DatasetError",
    "LabelMap",
    "PartialDataset",
    "SUPERVISIONS",
    "case_name",
    "load_dataset",
    "supervision_of",
    "union_datasets",
]

ALL = "all"
SPLITS = ("training", "validation", "test")
#: top-level keys of the format and of MSD's dataset.json (others are kept, but a near miss of
#: one of these, such as "valdation", is an error)
KNOWN_KEYS = frozenset({*SPLITS, "classes", "label_maps", "name", "modality", "labels", "description", "reference",
                        "validation_reuses_training",
                        "licence", "license", "release", "tensorImageSize", "numTraining", "numTest", "numValidation"})

#: values of a case's ``supervision`` key (hybrid supervision; absent means ``"strong"``)
SUPERVISIONS = ("strong", "weak")

#: a source value -> a global class index, or a (left, right) pair of indices for a lateral split
LabelMap = dict[int, Union[int, tuple[int, int]]]


class DatasetError(ValueError):
    """A dataset description or one of its cases is invalid.

    ``problems`` lists every problem found, each naming its case; ``str(error)`` shows them all.
    """

    def __init__(self, problems: Sequence[str] | str, header: str = "invalid dataset"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header} ({len(self.problems)} problem(s)):\n{lines}")


@dataclass
class PartialDataset:
    """A parsed partial-label dataset.

    Attributes:
        root: folder that relative paths are resolved against (None for in-memory unions).
        name: the dataset's name.
        classes: global class names; index 0 is background.
        label_maps: per source, source label value -> global class index (or a ``(left, right)``
            pair of indices for a lateral split).
        splits: split name -> list of resolved cases (see :meth:`datalist`).
        validation_reuses_training: the validation cases are training cases on purpose (key
            ``validation_reuses_training: true`` in ``dataset.json``: an indicative metric where
            nothing can be held out, as the MONAI Label train task does with few labels); the
            training/validation leak check is then off, every other duplicate is still refused.
    """

    root: Path | None
    name: str
    classes: list[str]
    label_maps: dict[str, LabelMap] = field(default_factory=dict)
    splits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    validation_reuses_training: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_index(self, name: str | int) -> int:
        """Index of a class given by name (or index, checked)."""
        if isinstance(name, bool):
            raise TypeError(f"class must be a name or an index, got {name!r}")
        if isinstance(name, int):
            if not 0 <= name < self.num_classes:
                raise ValueError(f"class index {name} is outside [0, {self.num_classes})")
            return name
        try:
            return self.classes.index(name)
        except ValueError:
            raise ValueError(f"unknown class {name!r}; classes are {self.classes}") from None

    def datalist(self, split: str = "training", sources: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The cases of a split as a MONAI datalist (a new list of new dicts).

        Each entry holds ``image`` (absolute path), ``label`` (absolute path, or absent for an
        unlabelled case), ``annotated`` (sorted global class indices; empty when unlabelled),
        ``source``, ``modality``, ``case`` (the case name: image file name without extension),
        ``label_map`` (only for sources that have one: ``{source value: class index or
        [left, right]}``) and any extra keys of the original entry.

        Args:
            split: "training", "validation" or "test".
            sources: keep only cases of these sources.
        """
        if split not in self.splits:
            return []
        out = []
        for case in self.splits[split]:
            if sources is not None and case["source"] not in sources:
                continue
            entry = dict(case)
            entry["annotated"] = list(case["annotated"])
            if case["source"] in self.label_maps:
                entry["label_map"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.label_maps[case["source"]].items()}
            out.append(entry)
        return out

    def sources(self, split: str = "training") -> list[str]:
        """Source names of a split, in order of first appearance."""
        return list(dict.fromkeys(c["source"] for c in self.splits.get(split, [])))

    def to_json(self) -> dict[str, Any]:
        """A ``dataset.json`` dict for this dataset (absolute paths, class names)."""
        inverse_maps = {
            src: {str(v): ([self.classes[i] for i in t] if isinstance(t, tuple) else self.classes[t]) for v, t in m.items()}
            for src, m in self.label_maps.items()
        }
        splits = {}
        for split, cases in self.splits.items():
            rows = []
            for c in cases:
                row = {k: v for k, v in c.items() if k not in ("annotated", "case")}
                if c.get("label") is not None:
                    row["annotated"] = [self.classes[i] for i in c["annotated"]]
                rows.append(row)
            splits[split] = rows
        return {"name": self.name, "classes": list(self.classes), **splits, "label_maps": inverse_maps}


#: image file endings recognised in case names, longest first
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy")


def case_name(path: str | os.PathLike) -> str:
    """A case's name: its image file name without the extension (``a/b/case_01.nii.gz`` -> ``case_01``)."""
    base = os.path.basename(str(path))
    for ext in IMAGE_SUFFIXES:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


def _read_classes(desc: Mapping[str, Any], where: str) -> list[str]:
    if "classes" in desc:
        classes = desc["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(classes) < 2:
            raise DatasetError(f"{where}: 'classes' must be a list of at least two class names, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise DatasetError(f"{where}: 'classes' has duplicate names: {classes}")
        return list(classes)
    if "labels" in desc and isinstance(desc["labels"], Mapping):
        try:
            pairs = sorted((int(k), str(v)) for k, v in desc["labels"].items())
        except ValueError:
            raise DatasetError(f"{where}: MSD 'labels' keys must be integers, got {list(desc['labels'])}") from None
        if [k for k, _ in pairs] != list(range(len(pairs))):
            raise DatasetError(f"{where}: MSD 'labels' must number classes 0..n-1, got {[k for k, _ in pairs]}")
        return [v for _, v in pairs]
    raise DatasetError(f"{where}: needs 'classes' (or MSD 'labels') naming the global classes")


def real_path(path: str, folders: dict[str, str] | None = None) -> str:
    """``os.path.realpath(path)``, each folder resolved once when ``folders`` caches them (one
    ``lstat`` per file instead of one per path component; 100,000 cases in about a second).

    Example:
        >>> real_path("/no/such/../folder/a.nii.gz")
        '/no/folder/a.nii.gz'
    """
    folder, name = os.path.split(path)
    real_folder = folders.get(folder) if folders is not None else None
    if real_folder is None:
        real_folder = os.path.realpath(folder or ".")
        if folders is not None:
            folders[folder] = real_folder
    full = os.path.join(real_folder, name)
    return os.path.realpath(full) if os.path.islink(full) else full


def _resolve_path(root: Path | None, path: Any, what: str, case: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"case {case}: '{what}' must be a file path, got {path!r}")
    p = Path(path)
    if not p.is_absolute() and root is not None:
        p = root / p
    return str(p)


def _resolve_class(classes: list[str], name: Any) -> int:
    if isinstance(name, bool):
        raise ValueError(f"{name!r} is not a class")
    if isinstance(name, int):
        if 0 <= name < len(classes):
            return name
        raise ValueError(f"class index {name} is outside [0, {len(classes)})")
    if isinstance(name, str) and name in classes:
        return classes.index(name)
    raise ValueError(f"class {name!r} is not in classes {classes}")


def _parse_label_maps(raw: Any, classes: list[str], where: str, problems: list[str]) -> dict[str, LabelMap]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: 'label_maps' must map source names to {{value: class}} dicts, got {type(raw).__name__}")
        return {}
    maps: dict[str, LabelMap] = {}
    for source, mapping in raw.items():
        if not isinstance(mapping, Mapping):
            problems.append(f"{where}: label map of source {source!r} must be a dict, got {mapping!r}")
            continue
        resolved: LabelMap = {}
        for value, target in mapping.items():
            try:
                v = int(value)
            except (TypeError, ValueError):
                problems.append(f"{where}: label map of source {source!r}: key {value!r} is not an integer label value")
                continue
            if v < 0:
                problems.append(f"{where}: label map of source {source!r}: key {value!r} is negative; label values are 0, 1, ...")
                continue
            if v in resolved:
                problems.append(f"{where}: label map of source {source!r}: keys {value!r} and another key both mean value {v}")
                continue
            try:
                if isinstance(target, (list, tuple)):
                    if len(target) != 2:
                        raise ValueError(f"a lateral split needs exactly [left, right], got {list(target)}")
                    resolved[v] = (_resolve_class(classes, target[0]), _resolve_class(classes, target[1]))
                else:
                    resolved[v] = _resolve_class(classes, target)
            except ValueError as e:
                problems.append(f"{where}: label map of source {source!r}, value {value}: {e}")
        maps[str(source)] = resolved
    return maps


def _parse_case(
    raw: Any, index: int, split: str, root: Path | None, classes: list[str], default_modality: str | None, problems: list[str]
) -> dict[str, Any] | None:
    if isinstance(raw, (str, os.PathLike)):
        raw = {"image": raw}
    if not isinstance(raw, Mapping):
        problems.append(f"{split}[{index}]: a case must be a dict or an image path, got {raw!r}")
        return None
    name = raw.get("case")
    if name is not None and (not isinstance(name, str) or not name.strip() or os.sep in name or "/" in name):
        problems.append(f"{split}[{index}]: 'case' must be a non-empty name without '/', got {name!r}")
        return None
    if name is None:
        name = case_name(str(raw.get("image", f"{split}[{index}]")))
    where = f"case {name!r} ({split}[{index}])"
    try:
        image = _resolve_path(root, raw.get("image"), "image", where)
    except ValueError as e:
        problems.append(str(e))
        return None
    case: dict[str, Any] = {k: v for k, v in raw.items() if k not in ("image", "label", "annotated")}
    case["image"] = image
    case["case"] = name
    case["source"] = str(raw.get("source", "default"))
    modality = raw.get("modality", default_modality)
    if modality is not None:
        case["modality"] = str(modality)
    label = raw.get("label")
    annotated = raw.get("annotated", ALL if label is not None else [])
    if label is not None:
        try:
            case["label"] = _resolve_path(root, label, "label", where)
        except ValueError as e:
            problems.append(str(e))
            return None
    _parse_supervision(raw, case, split, root, where, label is not None, problems)
    if annotated == ALL or annotated == [ALL]:
        indices = list(range(len(classes)))
    elif isinstance(annotated, (list, tuple)):
        indices = []
        for a in annotated:
            try:
                indices.append(_resolve_class(classes, a))
            except ValueError as e:
                problems.append(f"{where}: 'annotated' names {e}")
        indices = sorted(set(indices))
    elif isinstance(annotated, str):
        try:
            indices = [_resolve_class(classes, annotated)]
        except ValueError as e:
            problems.append(f"{where}: 'annotated' names {e}")
            indices = []
    else:
        problems.append(f"{where}: 'annotated' must be a list of class names or \"all\", got {annotated!r}")
        indices = []
    if indices and label is None:
        problems.append(f"{where}: annotates {[classes[i] for i in indices]} but has no 'label' file")
    case["annotated"] = indices if label is not None else []
    return case


def _parse_supervision(
    raw: Mapping[str, Any], case: dict[str, Any], split: str, root: Path | None, where: str, labelled: bool, problems: list[str]
) -> None:
    """The hybrid keys of a case: ``supervision`` (strong / weak), ``weak_type``, ``label_true`` (resolved)."""
    value = raw.get("supervision")
    if value is not None:
        if value not in SUPERVISIONS:
            close = difflib.get_close_matches(str(value), SUPERVISIONS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}: 'supervision' must be one of {list(SUPERVISIONS)}, got {value!r}{hint}")
        elif not labelled:
            problems.append(f"{where}: 'supervision' {value!r} needs a 'label' file (the strong or weak mask)")
        elif value == "weak" and split != "training":
            problems.append(f"{where}: a weak mask in the {split!r} split; weak masks train, {split} cases need their true mask")
    weak_type = raw.get("weak_type")
    if weak_type is not None:
        if not isinstance(weak_type, str) or not weak_type.strip():
            problems.append(f"{where}: 'weak_type' must be a non-empty text such as \"ellipse\", got {weak_type!r}")
        elif value != "weak":
            problems.append(f"{where}: has 'weak_type' {weak_type!r} but 'supervision' is {value!r}; give \"supervision\": \"weak\"")
    if raw.get("label_true") is not None:
        try:
            case["label_true"] = _resolve_path(root, raw["label_true"], "label_true", where)
        except ValueError as e:
            problems.append(str(e))


def supervision_of(case: Mapping[str, Any]) -> str:
    """A case's supervision: its ``supervision`` entry, ``"strong"`` when absent (a plain labelled case).

    Example:
        >>> supervision_of({"image": "a.png", "label": "a_mask.png"}), supervision_of({"supervision": "weak"})
        ('strong', 'weak')
    """
    return str(case.get("supervision") or "strong")


def _parse(desc: Mapping[str, Any], root: Path | None, where: str) -> PartialDataset:
    if not isinstance(desc, Mapping):
        raise DatasetError(f"{where}: must hold a JSON object, got {type(desc).__name__}")
    classes = _read_classes(desc, where)
    problems: list[str] = []
    label_maps = _parse_label_maps(desc.get("label_maps"), classes, where, problems)
    modality = desc.get("modality")
    if isinstance(modality, Mapping):
        modality = next(iter(modality.values()), None) if len(modality) == 1 else "+".join(str(v) for v in modality.values())
    if "training" not in desc:
        problems.append(f"{where}: has no 'training' list")
    for key in sorted(set(desc) - KNOWN_KEYS, key=str):
        close = difflib.get_close_matches(str(key), [*SPLITS, "classes", "label_maps"], n=1, cutoff=0.75)
        if close and close[0] != key:
            problems.append(f"{where}: {key!r} is not a key of the format: did you mean {close[0]!r}?")
    splits: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        raw = desc.get(split)
        if raw is None:
            continue
        if not isinstance(raw, list):
            problems.append(f"{where}: '{split}' must be a list of cases, got {type(raw).__name__}")
            continue
        cases = [_parse_case(c, i, split, root, classes, modality, problems) for i, c in enumerate(raw)]
        splits[split] = [c for c in cases if c is not None]
    reuse = desc.get("validation_reuses_training", False)
    if not isinstance(reuse, bool):
        problems.append(f"{where}: 'validation_reuses_training' must be true or false, got {reuse!r}")
        reuse = False
    seen: dict[str, tuple[str, str]] = {}  # by resolved real path: `a/../a/x` and a symlink to x are x
    folders: dict[str, str] = {}
    for split, cases in splits.items():
        for c in cases:
            key = real_path(c["image"], folders)
            if key in seen and not (reuse and {seen[key][0], split} == {"training", "validation"}):
                first_split, first = seen[key]
                also = f": {first} and {c['image']} are the same file, {key}" if first != c["image"] else ""
                problems.append(f"case {c['case']!r}: image {c['image']} is listed twice ({first_split} and {split}{also})")
            seen[key] = (split, c["image"])
    for split in ("validation", "test"):  # predictions and metrics of these splits are keyed by case name
        names: dict[str, str] = {}
        for c in splits.get(split, []):
            if c["case"] in names:
                problems.append(
                    f"case {c['case']!r}: two {split} cases have this name ({names[c['case']]} and {c['image']}); predictions"
                    " and metrics are keyed by the case name (the image file name without its extension): give one a"
                    " 'case' entry with another name"
                )
            names.setdefault(c["case"], c["image"])
    if problems:
        raise DatasetError(problems, header=f"invalid dataset description {where}")
    return PartialDataset(root=root, name=str(desc.get("name", root.name if root else "dataset")), classes=classes,
                          label_maps=label_maps, splits=splits, validation_reuses_training=reuse)


def load_dataset(path: str | os.PathLike | Mapping[str, Any], root: str | os.PathLike | None = None) -> PartialDataset:
    """Parse a partial-label ``dataset.json``.

    Class names are resolved to indices, paths made absolute, ``annotated: "all"`` expanded;
    files are not opened (see :func:`partialseg.data.validate_dataset` for that).

    Args:
        path: a dataset folder holding ``dataset.json``, the JSON file itself, or an already
            loaded dict (then ``root`` resolves relative paths).
        root: folder for relative paths; default: the folder of the JSON file.

    Raises:
        FileNotFoundError: no ``dataset.json`` where ``path`` points.
        DatasetError: the description is malformed; every problem is listed with its case.

    Example:
        >>> ds = load_dataset({"classes": ["background", "liver", "spleen"],
        ...                    "training": [{"image": "a.nii.gz", "label": "la.nii.gz", "annotated": ["spleen"]},
        ...                                 {"image": "b.nii.gz"}]}, root="/data")
        >>> [(c["case"], c["annotated"]) for c in ds.datalist("training")]
        [('a', [2]), ('b', [])]
    """
    if isinstance(path, Mapping):
        return _parse(path, Path(root) if root is not None else None, "<dict>")
    p = Path(path)
    if p.is_dir():
        p = p / "dataset.json"
    if not p.is_file():
        raise FileNotFoundError(f"no dataset description at {p} (expected a folder with dataset.json, or the JSON file)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"{p}: is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}; JSON files are UTF-8: re-save it as UTF-8)"
        ) from None
    try:
        desc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: is not valid JSON: {e}") from None
    return _parse(desc, Path(root) if root is not None else p.parent.resolve(), str(p))


def union_datasets(datasets: Sequence[PartialDataset], classes: Sequence[str] | None = None, name: str = "union") -> PartialDataset:
    """Join several partial-label datasets into one, matching classes by name.

    Each case's ``annotated`` indices and each label map are re-indexed into the union's class
    list. A source's label files keep their own values, so every dataset must either use the
    union's class order already or give its cases a ``label_map``: datasets whose class order
    differs from the union's get an identity-by-name map for their sources automatically.

    A dataset that lacks some of the union's classes labels "none of my classes" as background;
    in the union that region is unknown, so its cases lose ``background`` from ``annotated``
    (a liver-only dataset annotated ``"all"`` becomes ``annotated: [liver]``).

    Args:
        datasets: the datasets to join.
        classes: the union's class list; default: background first, then every dataset's
            classes in order of first appearance.
        name: the union's name.

    Raises:
        DatasetError: a class of one dataset is missing from ``classes``, two datasets share a
            source name with different label maps, or an image is listed twice.
    """
    if not datasets:
        raise ValueError("union_datasets needs at least one dataset")
    if classes is None:
        merged = ["background"]
        for ds in datasets:
            merged += [c for c in ds.classes if c not in merged]
        classes = merged
    classes = list(classes)
    problems = []
    label_maps: dict[str, LabelMap] = {}
    splits: dict[str, list[dict[str, Any]]] = {}
    for k, ds in enumerate(datasets):
        missing = [c for c in ds.classes if c not in classes]
        if missing:
            problems.append(f"dataset {ds.name!r}: classes {missing} are not in the union's classes {classes}")
            continue
        to_union = [classes.index(c) for c in ds.classes]
        same_order = to_union == list(range(len(ds.classes)))
        # a dataset that lacks some of the union's classes uses its background for "none of my
        # classes": in the union that is unknown, no longer a known background
        covers_union = set(ds.classes) == set(classes)
        maps = {src: {v: (tuple(to_union[i] for i in t) if isinstance(t, tuple) else to_union[t]) for v, t in m.items()} for src, m in ds.label_maps.items()}
        for split, cases in ds.splits.items():
            for c in cases:
                src = c["source"]
                if src not in maps and not same_order and c.get("label") is not None:
                    maps[src] = {v: to_union[v] for v in range(1, len(ds.classes))}
                entry = dict(c)
                entry["annotated"] = sorted(to_union[i] for i in c["annotated"] if covers_union or to_union[i] != 0)
                splits.setdefault(split, []).append(entry)
        for src, m in maps.items():
            if src in label_maps and label_maps[src] != m:
                problems.append(f"dataset {ds.name!r}: source {src!r} also appears in an earlier dataset with a different label map")
            label_maps[src] = m
    seen: set[str] = set()
    folders: dict[str, str] = {}
    for cases in splits.values():
        for c in cases:
            key = real_path(c["image"], folders)  # a symlink or `..` does not hide a shared file
            if key in seen:
                problems.append(f"case {c['case']!r}: image {c['image']} appears in more than one dataset")
            seen.add(key)
    if problems:
        raise DatasetError(problems, header="cannot join datasets")
    return PartialDataset(root=None, name=name, classes=classes, label_maps=label_maps, splits=splits)
