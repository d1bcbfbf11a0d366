"""The abdominal layouts of ``partialseg build-datalist``: the marginal-loss paper's union.

Each layout is a :class:`FileLayout`: how to find a folder's image/label pairs, which classes
its labels annotate, and its label map (its own values -> global class names). The entries of
the ``dataset.json`` point at the original files: nothing is copied or converted.

==============  ==============================================  =====================================
layout          folder                                          label values -> classes
==============  ==============================================  =====================================
``btcv``        ``[RawData/]Training/img/img*.nii.gz`` +        1 spleen, 2 kidney_right, 3 kidney_left,
                ``label/label*.nii.gz`` (fully labelled)        6 liver, 7 stomach, 11 pancreas; the
                                                                other 7 organs -> background
``msd_liver``   MSD ``Task03_Liver`` (its ``dataset.json``)     1 liver, 2 tumour -> liver
``msd_spleen``  MSD ``Task09_Spleen``                           1 spleen
``msd_pancreas`` MSD ``Task07_Pancreas``                        1 pancreas, 2 tumour -> pancreas
``kits19``      ``case_*/imaging.nii.gz`` +                     1 kidney, 2 tumour -> left / right
                ``segmentation.nii.gz``                         kidney by side (world coordinates)
==============  ==============================================  =====================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partialseg._checks import check_int
from partialseg.data.builders._common import msd_pairs as _msd_pairs
from partialseg.data.builders._common import relative, write_json

__all__ = ["DEFAULT_CLASSES", "LAYOUTS", "FileLayout", "build_union"]

DEFAULT_CLASSES = ["background", "liver", "spleen", "kidney_left", "kidney_right", "pancreas"]
_KIDNEYS = ["kidney_left", "kidney_right"]


@dataclass(frozen=True)
class FileLayout:
    """A layout whose entries point at the original files.

    Attributes:
        find: folder -> ``(image, label)`` pairs; label None for an image the layout allows to be
            unlabelled (a test image).
        annotated: the classes its labels annotate, or ``"all"``.
        values: its label map, ``{source value: class name or [left, right]}``.
        case_from_folder: entries are named by their folder (image file names repeat, as KiTS's
            ``case_*/imaging.nii.gz``).
    """

    find: Callable[[Path], list[tuple[Path, Path | None]]]
    annotated: Any
    values: dict[str, Any]
    case_from_folder: bool = False


def _btcv_pairs(root: Path) -> list[tuple[Path, Path]]:
    for base in (root, root / "RawData" / "Training", root / "Training"):
        if (base / "img").is_dir() and (base / "label").is_dir():
            images = sorted((base / "img").glob("img*.nii*"))
            return [(img, base / "label" / img.name.replace("img", "label", 1)) for img in images]
    raise FileNotFoundError(f"{root}: no BTCV img/ and label/ folders (looked in ., RawData/Training, Training)")


def _kits_pairs(root: Path) -> list[tuple[Path, Path | None]]:
    """Image/label pairs of the KiTS19 ``data/`` folder; label None where a case has no
    ``segmentation.nii.gz`` (the challenge's test cases 210-299 as downloaded)."""
    cases = sorted(p for p in root.glob("case_*") if p.is_dir())
    if not cases:
        raise FileNotFoundError(f"{root}: no KiTS case_* folders")
    pairs: list[tuple[Path, Path | None]] = []
    for c in cases:
        label = c / "segmentation.nii.gz"
        pairs.append((c / "imaging.nii.gz", label if label.exists() else None))
    return pairs


#: layout name -> :class:`FileLayout`
LAYOUTS: dict[str, FileLayout] = {
    "btcv": FileLayout(_btcv_pairs, "all", {"1": "spleen", "2": "kidney_right", "3": "kidney_left", "4": "background",
                                            "5": "background", "6": "liver", "7": "stomach", "8": "background",
                                            "9": "background", "10": "background", "11": "pancreas", "12": "background",
                                            "13": "background"}),
    "msd_liver": FileLayout(_msd_pairs, ["liver"], {"1": "liver", "2": "liver"}),
    "msd_spleen": FileLayout(_msd_pairs, ["spleen"], {"1": "spleen"}),
    "msd_pancreas": FileLayout(_msd_pairs, ["pancreas"], {"1": "pancreas", "2": "pancreas"}),
    "kits19": FileLayout(_kits_pairs, _KIDNEYS, {"1": _KIDNEYS, "2": _KIDNEYS}, case_from_folder=True),
}


def build_union(
    sources: Sequence[tuple[str, str | os.PathLike]],
    out: Path,
    classes: Sequence[str] | None = None,
    val: int = 0,
    name: str | None = None,
) -> dict[str, Any]:
    """Write one ``dataset.json`` joining abdominal datasets in :data:`LAYOUTS`; return its content.

    Args:
        sources: ``(layout, folder)`` pairs; the source name is the layout (numbered when repeated).
        out: output ``dataset.json`` path, checked by :func:`~partialseg.data.builders.check_out`
            (paths inside are relative to its folder).
        classes: global classes, ``background`` first (default :data:`DEFAULT_CLASSES`).
        val: fully labelled cases moved from training to a ``validation`` split (the last ones of
            the first fully labelled source), for the bundles' model selection.
        name: dataset name (default ``union``).

    Returns:
        the ``dataset.json`` content. KiTS cases without ``segmentation.nii.gz`` are entries of
        its ``test`` split without ``label`` (unlabelled test images).

    Raises:
        ValueError: an unknown layout, ``val`` < 0, ``classes`` not starting with background or
            repeating a name, a class a single-organ source needs that ``classes`` lacks, a missing
            file (named), a source without labelled cases, more validation cases than fully
            labelled ones, an unreadable MSD ``dataset.json`` (named).
        TypeError: ``val`` not an int.
        FileNotFoundError: a folder that is not in its layout.
    """
    classes = list(DEFAULT_CLASSES if classes is None else classes)
    name = "union" if name is None else name
    if not classes or classes[0] != "background":
        raise ValueError(f"classes must start with 'background', got {classes}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise ValueError(f"--classes {' '.join(classes)} names {', '.join(map(repr, repeated))} more than once; "
                         "give each class once")
    val = check_int(val, "--val", minimum=0)
    root = out.parent
    training: list[dict[str, Any]] = []
    unlabelled: list[dict[str, Any]] = []
    label_maps: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for layout, folder in sources:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown abdominal layout {layout!r}; choose one of {sorted(LAYOUTS)}")
        spec = LAYOUTS[layout]
        annotated = spec.annotated
        counts[layout] = counts.get(layout, 0) + 1
        source = layout if counts[layout] == 1 else f"{layout}_{counts[layout]}"
        if annotated != "all":
            missing = [c for c in annotated if c not in classes]
            if missing:
                raise ValueError(f"source {source!r} ({folder}) annotates {missing}, which --classes {classes} lacks")
        resolved = {}
        for value, target in spec.values.items():
            if isinstance(target, list):
                resolved[value] = target
            else:
                resolved[value] = target if target in classes else "background"
        label_maps[source] = resolved
        pairs = spec.find(Path(folder))
        if not pairs:
            raise ValueError(f"source {source!r}: no cases found in {folder}")
        if all(label is None for _, label in pairs):
            raise ValueError(f"source {source!r}: none of the {len(pairs)} cases in {folder} has a label "
                             "(point the source at the labelled data)")
        for image, label in pairs:
            for path, what in ((image, "image"), (label, "label")):
                if path is not None and not path.is_file():
                    raise ValueError(f"source {source!r}: {what} {path} does not exist")
            case = {"case": image.parent.name} if spec.case_from_folder else {}
            if label is None:  # an unlabelled test image (KiTS19's cases 210-299)
                unlabelled.append({"image": relative(image, root), **case, "source": source, "modality": "CT"})
                continue
            training.append({"image": relative(image, root), "label": relative(label, root), **case,
                             "annotated": annotated, "source": source, "modality": "CT"})
    full = [i for i, c in enumerate(training) if c["annotated"] == "all"]
    if val > len(full):
        raise ValueError(f"--val {val} asks for more validation cases than the {len(full)} fully labelled ones")
    val_idx = set(full[len(full) - val:]) if val else set()
    desc = {
        "name": name,
        "description": "built by partialseg build-datalist from " + ", ".join(f"{l}={f}" for l, f in sources),
        "classes": classes,
        "training": [c for i, c in enumerate(training) if i not in val_idx],
        "label_maps": label_maps,
    }
    if val_idx:
        desc["validation"] = [c for i, c in enumerate(training) if i in val_idx]
    if unlabelled:
        desc["test"] = unlabelled
    write_json(out, desc)
    return desc
