"""The ``amos22`` layout of ``partialseg build-datalist``: AMOS22 (CT and MR), whole or as the atlas
paper's three-task multimodal split.

AMOS22 as distributed: ``imagesTr/`` + ``labelsTr/`` (training), ``imagesVa/`` + ``labelsVa/``
(validation), ``imagesTs/`` (test images, no labels) and a ``dataset.json`` (MSD-like, 15 organs,
``labels`` ``{"0": "background", "1": "spleen", ...}``). Files are ``amos_NNNN.nii.gz``; ids below
500 are CT, ids from 500 on are MR (MR labels hold the first 13 organs only: no bladder, no
prostate / uterus). Entries point at the original files and carry ``"modality": "CT"`` or
``"MR"`` from the id.

``tasks="all"`` (default): every labelled case is fully annotated (its 15 organs, or the
``classes`` given); ``imagesTr`` -> ``training``, ``imagesVa`` -> ``validation`` (when labelled),
``imagesTs`` -> ``test`` without labels.

``tasks="paper"``: Liu et al. (MICCAI 2024), section 3. The 13 organs both modalities label;
from ``imagesTr`` only (200 CT, 40 MR), ``test_per_modality`` = ``(38, 10)`` random CT / MR
cases become the fully labelled ``test`` split; the remaining training CT cases are split at
random into two halves, and each of the three training sets keeps only its task's organs:

==========  ==========  ======================================================================
source      modality    annotated (the other organs of its labels are mapped to background)
==========  ==========  ======================================================================
``amos_ct_a``  CT        liver, stomach, aorta, esophagus
``amos_ct_b``  CT        ivc (inferior vena cava), adrenal_right, adrenal_left, duodenum
``amos_mr``    MR        spleen, kidney_right, kidney_left, gallbladder, pancreas
==========  ==========  ======================================================================

``val`` N holds out N random training cases of each task as a fully labelled ``validation``
split (the paper keeps about 12.5% of the training data for model selection; N = 10 per task
is close to it). The same ``seed`` gives the same split.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partialseg._checks import check_int, check_option
from partialseg.data.builders._common import relative, write_json

__all__ = ["AMOS_ORGANS", "PAPER_CLASSES", "PAPER_TASKS", "TASKS", "LAYOUTS", "AmosLayout", "amos_modality",
           "build_amos"]

#: AMOS22's label values 1..15, as partialseg class names (AMOS: "right kidney", "arota", "postcava", ...)
AMOS_ORGANS = ["spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
               "ivc", "pancreas", "adrenal_right", "adrenal_left", "duodenum", "bladder", "prostate_uterus"]
#: the atlas paper's three tasks: source -> (modality, annotated organs)
PAPER_TASKS = {
    "amos_ct_a": ("CT", ["liver", "stomach", "aorta", "esophagus"]),
    "amos_ct_b": ("CT", ["ivc", "adrenal_right", "adrenal_left", "duodenum"]),
    "amos_mr": ("MR", ["spleen", "kidney_right", "kidney_left", "gallbladder", "pancreas"]),
}
#: the paper's 13 organs (the ones MR labels too), background first, in AMOS order
PAPER_CLASSES = ["background", *AMOS_ORGANS[:13]]
#: the recipes
TASKS = ("all", "paper")
#: the paper's held-out test cases: (CT, MR)
PAPER_TEST = (38, 10)


@dataclass(frozen=True)
class AmosLayout:
    """The AMOS22 folder layout: the split folders and the CT / MR id threshold."""

    splits: tuple = (("training", "imagesTr", "labelsTr"), ("validation", "imagesVa", "labelsVa"),
                     ("test", "imagesTs", "labelsTs"))
    mr_from_id: int = 500


LAYOUTS = {"amos22": AmosLayout()}


def amos_modality(path: str | os.PathLike, mr_from_id: int = 500) -> str:
    """``"CT"`` for an AMOS id below ``mr_from_id`` (500), else ``"MR"``.

    Example:
        >>> amos_modality("imagesTr/amos_0001.nii.gz"), amos_modality("imagesTr/amos_0540.nii.gz")
        ('CT', 'MR')
    """
    found = re.search(r"(\d+)", Path(path).name)
    if found is None:
        raise ValueError(f"{path}: no AMOS case id in the file name (amos_NNNN.nii.gz); cannot tell CT from MR")
    return "CT" if int(found.group(1)) < mr_from_id else "MR"


def _cases(root: Path, layout: AmosLayout) -> dict[str, list[tuple[Path, Path | None]]]:
    """Per split, the (image, label or None) pairs: from AMOS's ``dataset.json`` when present, else the folders."""
    desc_path = root / "dataset.json"
    out: dict[str, list[tuple[Path, Path | None]]] = {}
    if desc_path.is_file():
        try:
            desc = json.loads(desc_path.read_text())
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{desc_path}: not valid JSON ({e}); restore AMOS22's original dataset.json") from None
        if not isinstance(desc, dict):
            raise ValueError(f"{desc_path}: the top level must be an object with 'training' entries")
        for split in ("training", "validation", "test"):
            pairs = []
            for i, entry in enumerate(desc.get(split) or []):
                if isinstance(entry, str):
                    pairs.append((root / entry, None))
                elif isinstance(entry, dict) and "image" in entry:
                    label = entry.get("label")
                    pairs.append((root / entry["image"], root / label if label else None))
                else:
                    raise ValueError(f"{desc_path}: {split}[{i}] must be an image path or have 'image', got {entry!r:.80}")
            if pairs:
                out[split] = pairs
        return out
    for split, images, labels in layout.splits:
        found = sorted((root / images).glob("*.nii*")) if (root / images).is_dir() else []
        pairs = []
        for img in found:
            lab = root / labels / img.name
            pairs.append((img, lab if lab.is_file() else None))
        if pairs:
            out[split] = pairs
    if not out:
        raise FileNotFoundError(f"{root}: not an AMOS22 folder (no dataset.json, no imagesTr/)")
    return out


def build_amos(
    sources: Sequence[tuple[str, str | os.PathLike]],
    out: Path,
    classes: Sequence[str] | None = None,
    val: int = 0,
    name: str | None = None,
    tasks: str = "all",
    test_per_modality: Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Writes the ``dataset.json`` of an AMOS22 folder (see the module docstring); returns its content.

    Args:
        sources: one ``("amos22", folder)`` pair.
        out: the output ``dataset.json`` (paths inside relative to its folder).
        classes: global classes, background first (default: the 15 organs for ``"all"``, the 13
            of :data:`PAPER_CLASSES` for ``"paper"``, the only choice there); an AMOS organ not
            in them becomes background.
        val: ``"paper"``: random training cases of each task held out, fully labelled, as
            ``validation``; ``"all"``: must be 0 (AMOS's own ``imagesVa`` is the validation split).
        name: dataset name (default ``amos22`` / ``amos22_paper``).
        tasks: ``"all"`` or ``"paper"`` (:data:`TASKS`).
        test_per_modality: ``"paper"``: ``(CT, MR)`` training cases held out as the fully
            labelled test split (default :data:`PAPER_TEST`, 38 and 10).
        seed: the random split's seed.

    Raises:
        ValueError: several sources, a bad option, a missing image or label (named), too few
            cases of a modality for the split, classes the recipe cannot take.
        FileNotFoundError: a folder that is not AMOS22's.
    """
    import numpy as np

    tasks = check_option(tasks, TASKS, "--tasks")
    seed = check_int(seed, "--seed", minimum=0)
    val = check_int(val, "--val", minimum=0)
    if len(sources) != 1:
        raise ValueError(f"the amos22 layout takes one folder, got {len(sources)} sources")
    folder = Path(sources[0][1])
    root = out.parent
    pairs = _cases(folder, LAYOUTS["amos22"])
    for split, items in pairs.items():
        for image, label in items:
            for path, what in ((image, "image"), (label, "label")):
                if path is not None and not path.is_file():
                    raise ValueError(f"amos22 {split}: {what} {path} does not exist")

    def entry(image: Path, label: Path | None, source: str, annotated: Any) -> dict[str, Any]:
        e: dict[str, Any] = {"image": relative(image, root)}
        if label is not None:
            e["label"] = relative(label, root)
            e["annotated"] = annotated
        e.update(source=source, modality=amos_modality(image))
        return e

    if tasks == "all":
        classes = list(["background", *AMOS_ORGANS] if classes is None else classes)
        if not classes or classes[0] != "background" or len(set(classes)) != len(classes):
            raise ValueError(f"classes must start with 'background' and name each class once, got {classes}")
        if val:
            raise ValueError("--val applies to --tasks paper; with --tasks all, AMOS's imagesVa is the validation split")
        if test_per_modality is not None:
            raise ValueError("--test-per-modality applies to --tasks paper")
        label_map = {str(v): (o if o in classes else "background") for v, o in enumerate(AMOS_ORGANS, start=1)}
        desc: dict[str, Any] = {"name": name or "amos22", "description": f"AMOS22 ({folder}), every organ annotated",
                                "classes": classes}
        for split, items in pairs.items():
            desc[split] = [entry(img, lab, "amos22", "all") for img, lab in items]
        if not any(e.get("label") for e in desc.get("training", [])):
            raise ValueError(f"amos22: no labelled training case in {folder}")
        desc["label_maps"] = {"amos22": label_map}
        write_json(out, desc)
        return desc

    if classes is not None and list(classes) != PAPER_CLASSES:
        raise ValueError(f"--tasks paper uses the paper's 13 organs {PAPER_CLASSES}; leave --classes out")
    classes = PAPER_CLASSES
    n_test = PAPER_TEST if test_per_modality is None else tuple(test_per_modality)
    if len(n_test) != 2:
        raise ValueError(f"--test-per-modality takes two counts (CT MR), got {list(n_test)}")
    n_test = tuple(check_int(n, "--test-per-modality", minimum=0) for n in n_test)
    labelled = [(img, lab) for img, lab in pairs.get("training", []) if lab is not None]
    by_mod = {m: [p for p in labelled if amos_modality(p[0]) == m] for m in ("CT", "MR")}
    rng = np.random.default_rng(seed)
    test: list[tuple[Path, Path]] = []
    tasks_cases: dict[str, list[tuple[Path, Path]]] = {}
    for m, k in zip(("CT", "MR"), n_test):
        items = by_mod[m]
        order = [items[i] for i in rng.permutation(len(items))]
        if len(order) - k < (2 if m == "CT" else 1) * (val + 1):
            raise ValueError(f"amos22: {len(items)} labelled {m} case(s) in {folder}, too few for {k} test and "
                             f"{val} validation case(s) per task")
        test += sorted(order[:k])
        rest = order[k:]
        if m == "CT":
            half = len(rest) // 2 + len(rest) % 2
            tasks_cases["amos_ct_a"], tasks_cases["amos_ct_b"] = sorted(rest[:half]), sorted(rest[half:])
        else:
            tasks_cases["amos_mr"] = sorted(rest)
    full_map = {str(v): (o if o in classes else "background") for v, o in enumerate(AMOS_ORGANS, start=1)}
    label_maps = {"amos22": full_map}
    training, validation = [], []
    for source, (_, organs) in PAPER_TASKS.items():
        label_maps[source] = {v: (o if o in organs else "background") for v, o in full_map.items()}
        cases = tasks_cases[source]
        picks = set(rng.choice(len(cases), size=val, replace=False).tolist()) if val else set()
        for i, (img, lab) in enumerate(cases):
            if i in picks:
                validation.append(entry(img, lab, "amos22", "all"))
            else:
                training.append(entry(img, lab, source, list(organs)))
    desc = {
        "name": name or "amos22_paper",
        "description": (f"AMOS22 ({folder}) as the atlas paper's three tasks (Liu et al., MICCAI 2024): CT "
                        f"liver/stomach/aorta/esophagus, CT ivc/adrenals/duodenum, MR spleen/kidneys/gallbladder/"
                        f"pancreas; test {n_test[0]} CT + {n_test[1]} MR, seed {seed}"),
        "classes": classes,
        "training": training,
    }
    if validation:
        desc["validation"] = validation
    if test:
        desc["test"] = [entry(img, lab, "amos22", "all") for img, lab in test]
    desc["label_maps"] = label_maps
    write_json(out, desc)
    return desc
