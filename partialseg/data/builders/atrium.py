"""The left-atrium layouts of ``partialseg build-datalist``: the DTML paper's setting.

Like the abdominal layouts (:mod:`partialseg.data.builders.abdomen`), the entries point at the
original files (NRRD or NIfTI, read by MONAI's ``LoadImage``): nothing is copied or converted.

==============  ==================================================  =============================
layout          folder (as downloaded)                              label values -> classes
==============  ==================================================  =============================
``lasc2018``    2018 Atrial Segmentation Challenge: one folder per  255 -> ``left_atrium``
                case (named by its id) holding ``lgemri.nrrd``
                (the LGE-MRI) and ``laendo.nrrd`` (the atrium
                cavity, 0 / 255), anywhere below the folder (its
                ``Training Set/`` or the whole download)
``msd_heart``   MSD ``Task02_Heart``: ``imagesTr/``, ``labelsTr/``,  1 -> ``left_atrium``
                ``imagesTs/`` and its ``dataset.json``
==============  ==================================================  =============================

The classes are ``background, left_atrium``. Splits, from the labelled cases in sorted order
(case id for ``lasc2018``, the MSD ``dataset.json`` order for ``msd_heart``):

- ``test``: the last ``test`` labelled cases, fully labelled (the DTML paper: 80 training and
  20 test volumes of the challenge's 100 training volumes: ``test=20``);
- ``validation``: the ``val`` labelled cases before them, fully labelled;
- ``training``: the rest. Of these, the first ``labelled`` keep their label (``annotated``:
  ``"all"``); the others become **unlabelled** entries (``image`` only, no ``label``, no
  ``annotated``: the data model's unlabelled case), so that a semi-supervised method trains on
  them as images only. ``labelled`` is a number of cases or a fraction of them (``0.2`` gives
  the paper's 16 labelled / 64 unlabelled of 80); ``None`` keeps every label. The first ones in
  sorted order, as the DTML code takes the first 16 of its list: the same arguments give the
  same split.
- Images without a label file (the MSD ``imagesTs/`` images; a challenge case folder without
  ``laendo.nrrd``) are unlabelled ``training`` entries as well: they take part in
  semi-supervised training, never in evaluation.

Every entry has ``source`` (the layout name), ``modality`` ``"MR"`` and ``case`` (the case
folder's name for ``lasc2018``, whose files are all called ``lgemri.nrrd``).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partialseg._checks import check_float, check_int
from partialseg.data.builders._common import msd_pairs, relative, write_json

__all__ = ["CLASSES", "LAYOUTS", "AtriumLayout", "build_atrium", "labelled_count"]

#: the classes of every atrium layout (and of the synthetic ``atrium3d``)
CLASSES = ("background", "left_atrium")


@dataclass(frozen=True)
class AtriumLayout:
    """An atrium layout: how to find its cases and what its label values mean.

    Attributes:
        find: folder -> ``(case name or None, image, label or None)`` triples, in the layout's order.
        values: its label map, ``{source value: class name}``.
    """

    find: Callable[[Path], list[tuple[str | None, Path, Path | None]]]
    values: dict[str, str]


def _lasc_cases(root: Path) -> list[tuple[str | None, Path, Path | None]]:
    """``<case>/lgemri.nrrd`` + ``<case>/laendo.nrrd`` below ``root``, sorted by case folder name."""
    images = sorted(root.rglob("lgemri.nrrd"), key=lambda p: (p.parent.name, str(p)))
    if not images:
        raise FileNotFoundError(
            f"{root}: no <case>/lgemri.nrrd found below it (point at the 2018 Atrial Segmentation Challenge's "
            "'Training Set' folder or the whole download)"
        )
    names: dict[str, Path] = {}
    cases = []
    for image in images:
        name = image.parent.name
        if name in names:
            raise ValueError(f"two case folders named {name!r}: {names[name]} and {image.parent}")
        names[name] = image.parent
        label = image.parent / "laendo.nrrd"
        cases.append((name, image, label if label.is_file() else None))
    return cases


def _msd_heart_cases(root: Path) -> list[tuple[str | None, Path, Path | None]]:
    """MSD Task02_Heart: its ``dataset.json`` training pairs, then its ``test`` images (no label)."""
    cases: list[tuple[str | None, Path, Path | None]] = [(None, image, label) for image, label in msd_pairs(root)]
    cases += [(None, image, None) for image in msd_pairs(root, split="test")]
    return cases


#: layout name -> :class:`AtriumLayout`
LAYOUTS: dict[str, AtriumLayout] = {
    "lasc2018": AtriumLayout(_lasc_cases, {"255": "left_atrium"}),
    "msd_heart": AtriumLayout(_msd_heart_cases, {"1": "left_atrium"}),
}


def labelled_count(labelled: int | float | None, n: int) -> int:
    """How many of ``n`` training cases keep their label.

    Args:
        labelled: a number of cases (int >= 0), a fraction in ``(0, 1]`` (float, rounded to the
            nearest case), or ``None`` for all.
        n: the number of labelled training cases available.

    Raises:
        ValueError: a number larger than ``n``, a negative number, a fraction outside ``(0, 1]``.
        TypeError: not an int, a float or ``None``.

    Example:
        >>> labelled_count(0.2, 80), labelled_count(16, 80), labelled_count(None, 80)
        (16, 16, 80)
    """
    if labelled is None:
        return n
    if isinstance(labelled, numbers.Integral) and not isinstance(labelled, bool):
        count = check_int(labelled, "--labelled", minimum=0)
        if count > n:
            raise ValueError(f"--labelled {count} asks for more labelled cases than the {n} training cases with a label")
        return count
    if isinstance(labelled, float):
        fraction = check_float(labelled, "--labelled (a fraction)", minimum=0.0, maximum=1.0)
        if fraction <= 0.0:
            raise ValueError(f"--labelled {labelled}: a fraction must be in (0, 1]; give 0 for no labelled case")
        return int(round(fraction * n))
    raise TypeError(f"--labelled must be a number of cases (int), a fraction (float) or None, got "
                    f"{type(labelled).__name__} {labelled!r}")


def build_atrium(
    sources: Sequence[tuple[str, str | os.PathLike]],
    out: Path,
    classes: Sequence[str] | None = None,
    val: int = 0,
    name: str | None = None,
    test: int = 0,
    labelled: int | float | None = None,
) -> dict[str, Any]:
    """Write one ``dataset.json`` of left-atrium MRI in :data:`LAYOUTS`; return its content.

    Args:
        sources: ``(layout, folder)`` pairs; the source name is the layout (numbered when repeated).
            With several sources, each is split on its own.
        out: output ``dataset.json`` path (paths inside are relative to its folder).
        classes: must be ``["background", "left_atrium"]`` (the default) when given.
        val: labelled cases of each source held out, fully labelled, as ``validation``.
        name: dataset name (default ``atrium``).
        test: labelled cases of each source held out, fully labelled, as ``test``.
        labelled: training cases of each source that keep their label (int), or their fraction
            (float in ``(0, 1]``); the others become unlabelled; ``None``: all keep it.

    Returns:
        the ``dataset.json`` content.

    Raises:
        ValueError: other ``classes``, an unknown layout, a missing file (named), a source
            without labelled cases, ``val + test`` leaving no labelled training case, a bad
            ``labelled``; an unreadable MSD ``dataset.json`` (named).
        TypeError: ``val``, ``test`` or ``labelled`` of the wrong type.
        FileNotFoundError: a folder that is not in its layout.

    Example:
        >>> build_atrium([("lasc2018", "/no/such/folder")], Path("/tmp/x/dataset.json"))
        Traceback (most recent call last):
        ...
        FileNotFoundError: /no/such/folder: no <case>/lgemri.nrrd found below it (point at the 2018 Atrial Segmentation Challenge's 'Training Set' folder or the whole download)
    """
    if classes is not None and list(classes) != list(CLASSES):
        raise ValueError(f"the atrium layouts label {list(CLASSES)}; --classes {' '.join(classes)} cannot be used")
    val = check_int(val, "--val", minimum=0)
    test = check_int(test, "--test", minimum=0)
    root = out.parent
    splits: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    label_maps: dict[str, dict[str, str]] = {}
    counts: dict[str, int] = {}
    for layout, folder in sources:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown atrium layout {layout!r}; choose one of {sorted(LAYOUTS)}")
        counts[layout] = counts.get(layout, 0) + 1
        source = layout if counts[layout] == 1 else f"{layout}_{counts[layout]}"
        label_maps[source] = dict(LAYOUTS[layout].values)
        cases = LAYOUTS[layout].find(Path(folder))
        entries, images_only = [], []
        for case, image, label in cases:
            for path, what in ((image, "image"), (label, "label")):
                if path is not None and not path.is_file():
                    raise ValueError(f"source {source!r}: {what} {path} does not exist")
            entry: dict[str, Any] = {"image": relative(image, root)}
            if case is not None:
                entry["case"] = case
            if label is None:
                images_only.append({**entry, "source": source, "modality": "MR"})
            else:
                entries.append({**entry, "label": relative(label, root), "annotated": "all",
                                "source": source, "modality": "MR"})
        if not entries:
            raise ValueError(f"source {source!r}: none of the {len(cases)} cases in {folder} has a label "
                             "(point the source at the labelled data)")
        if val + test >= len(entries):
            raise ValueError(f"source {source!r}: --val {val} and --test {test} leave none of its {len(entries)} "
                             "labelled cases for training")
        held_test = entries[len(entries) - test:] if test else []
        held_val = entries[len(entries) - test - val:len(entries) - test] if val else []
        train = entries[:len(entries) - test - val]
        keep = labelled_count(labelled, len(train))
        unlabelled = [{k: v for k, v in e.items() if k not in ("label", "annotated")} for e in train[keep:]]
        splits["training"] += train[:keep] + unlabelled + images_only
        splits["validation"] += held_val
        splits["test"] += held_test
    desc: dict[str, Any] = {
        "name": "atrium" if name is None else name,
        "description": "built by partialseg build-datalist from " + ", ".join(f"{l}={f}" for l, f in sources),
        "classes": list(CLASSES),
        "training": splits["training"],
        "label_maps": label_maps,
    }
    for split in ("validation", "test"):
        if splits[split]:
            desc[split] = splits[split]
    write_json(out, desc)
    return desc
