"""``partialseg build-datalist``: one partialseg ``dataset.json`` from public datasets as downloaded.

Each ``--source LAYOUT=DIR`` names a folder in one of the layouts below; the command finds its
image/label pairs, writes the source's label map (its own label values -> global class names)
and annotated classes, and joins every source into one dataset over ``--classes``. Nothing is
copied or converted: the entries point at the original files. Run ``partialseg check`` on the
result before training.

The cardiac layouts (``acdc``, ``mscmrseg``, ``mscmrseg_c0``, ``mscmrseg_t2``; the DCL paper's
setting, :mod:`partialseg.data.cardiac_builders`) are different: they **write** a 2D dataset of
resampled, cropped short-axis slices next to the ``dataset.json``, keep one random structure per
training slice, and take the options ``--spacing``, ``--size``, ``--keep``, ``--seed``,
``--test`` and ``--no-wholeheart``; they cannot be mixed with the abdominal layouts.

Abdominal layouts (the marginal-loss paper's union; more can be added to :data:`LAYOUTS`):

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

KiTS19 as downloaded has no ``segmentation.nii.gz`` in its test cases (``case_00210`` to
``case_00299``): those images become unlabelled entries of a ``test`` split (no ``label``, no
``annotated``), counted in the command's output; a KiTS folder without any labelled case is an
error. In every other layout a missing file is an error naming it.

A class that a layout labels but ``--classes`` lacks is mapped to background only where the
source is fully labelled (BTCV's other organs); in a single-organ source, it makes the source
useless and is an error.

Cardiac layouts (2D slices written under ``<out folder>/slices/<source>/``; a build whose
``--out`` is another JSON file referencing those slices in the same folder is refused):

==================  ====================================================  =====================================
layout              folder                                                label values -> classes
==================  ====================================================  =====================================
``acdc``            ACDC ``training/`` (or ``testing/``):                 1 RV, 2 MYO, 3 LV; ED / ES frames from
                    ``patientNNN/patientNNN_frameMM[_gt].nii.gz``         ``Info.cfg``, kept as ``"phase"``
``mscmrseg``        ``patient<N>_LGE[_manual].nii.gz`` below the folder   200 MYO, 500 LV, 600 RV
``mscmrseg_c0``     ``patient<N>_C0[_manual].nii.gz`` (bSSFP)             as ``mscmrseg``
``mscmrseg_t2``     ``patient<N>_T2[_manual].nii.gz``                     as ``mscmrseg``
==================  ====================================================  =====================================

Examples:
    partialseg build-datalist --out data/union/dataset.json \\
        --source btcv=/data/BTCV --source msd_liver=/data/Task03_Liver \\
        --source msd_spleen=/data/Task09_Spleen --source msd_pancreas=/data/Task07_Pancreas \\
        --source kits19=/data/kits19/data --val 4

    partialseg build-datalist --out /data/acdc2d/dataset.json --source acdc=/data/ACDC/training \\
        --val 20 --test 20 --seed 0
"""

from __future__ import annotations

import argparse
import json
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from partialseg.data import cardiac_builders
from partialseg.data.cardiac_builders import SLICE_LAYOUTS, build_slices, check_out, write_json

__all__ = ["LAYOUTS", "SLICE_LAYOUTS", "build_datalist", "add_arguments", "run"]

DEFAULT_CLASSES = ["background", "liver", "spleen", "kidney_left", "kidney_right", "pancreas"]
_KIDNEYS = ["kidney_left", "kidney_right"]


def _msd_pairs(root: Path) -> list[tuple[Path, Path]]:
    """Image/label pairs of an MSD task folder, from its ``dataset.json`` (``training`` entries)."""
    desc_path = root / "dataset.json"
    if not desc_path.is_file():
        raise FileNotFoundError(f"{root}: not an MSD task folder (no dataset.json)")
    try:
        desc = json.loads(desc_path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{desc_path}: not valid JSON ({e}); restore the task's original dataset.json") from None
    if not isinstance(desc, Mapping):
        raise ValueError(
            f"{desc_path}: the top level is a JSON {type(desc).__name__}; an MSD dataset.json is an object "
            "with a 'training' list of {\"image\": ..., \"label\": ...} entries"
        )
    training = desc.get("training", [])
    if not isinstance(training, list):
        raise ValueError(f"{desc_path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} entries, "
                         f"got a {type(training).__name__}")
    pairs = []
    for i, entry in enumerate(training):
        if not isinstance(entry, Mapping) or "image" not in entry or "label" not in entry:
            raise ValueError(f"{desc_path}: training[{i}] must have 'image' and 'label', got {entry!r}")
        pairs.append((root / entry["image"], root / entry["label"]))
    return pairs


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


#: layout -> (pair finder, annotated classes or "all", {source value: class name or [left, right]});
#: a finder gives label None for an image whose layout allows it to be unlabelled (a test image)
LAYOUTS: dict[str, tuple[Callable[[Path], list[tuple[Path, Path | None]]], Any, dict[str, Any]]] = {
    "btcv": (_btcv_pairs, "all", {"1": "spleen", "2": "kidney_right", "3": "kidney_left", "4": "background",
                                  "5": "background", "6": "liver", "7": "stomach", "8": "background",
                                  "9": "background", "10": "background", "11": "pancreas", "12": "background",
                                  "13": "background"}),
    "msd_liver": (_msd_pairs, ["liver"], {"1": "liver", "2": "liver"}),
    "msd_spleen": (_msd_pairs, ["spleen"], {"1": "spleen"}),
    "msd_pancreas": (_msd_pairs, ["pancreas"], {"1": "pancreas", "2": "pancreas"}),
    "kits19": (_kits_pairs, _KIDNEYS, {"1": _KIDNEYS, "2": _KIDNEYS}),
}
#: layouts whose image file names repeat (``case_*/imaging.nii.gz``): entries are named by their folder
_CASE_FROM_FOLDER = {"kits19"}


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return str(path)


def build_datalist(
    sources: Sequence[tuple[str, str | os.PathLike]],
    out: str | os.PathLike,
    classes: Sequence[str] | None = None,
    val: int = 0,
    name: str | None = None,
    **slice_options: Any,
) -> dict[str, Any]:
    """Write one ``dataset.json`` joining datasets in known layouts; return its content.

    Args:
        sources: ``(layout, folder)`` pairs; the source name is the layout (numbered when repeated).
        out: output ``dataset.json`` path, a ``.json`` file (paths inside are relative to its folder).
        classes: global classes, ``background`` first (default :data:`DEFAULT_CLASSES`; for the
            cardiac layouts ``background, LV, MYO, RV``, the only choice).
        val: fully labelled cases moved from training to a ``validation`` split (the last ones of
            the first fully labelled source), for the bundles' model selection; for the cardiac
            layouts, random subjects of each source.
        name: dataset name (default ``union``; cardiac: ``acdc2d``, ...).
        **slice_options: only with the cardiac layouts, passed to
            :func:`~partialseg.data.cardiac_builders.build_slices` (``test``, ``spacing``,
            ``size``, ``keep``, ``wholeheart``, ``seed``, ``progress``).

    Returns:
        the ``dataset.json`` content. KiTS cases without ``segmentation.nii.gz`` are entries of
        its ``test`` split without ``label`` (unlabelled test images).

    Raises:
        ValueError: ``out`` not a ``.json`` file (or a folder), unknown layout, ``val`` not an
            integer >= 0, ``classes`` not starting with background or repeating a name, a class
            a single-organ source needs that ``classes`` lacks, a missing file (named), a source
            without labelled cases, more validation cases than fully labelled ones, an unreadable
            MSD ``dataset.json`` (named), cardiac and abdominal layouts mixed, or cardiac options
            given with abdominal layouts.
        FileNotFoundError: a folder that is not in its layout.
    """
    out = check_out(out)
    slicing = [layout for layout, _ in sources if layout in SLICE_LAYOUTS]
    if slicing:
        others = sorted({layout for layout, _ in sources if layout not in SLICE_LAYOUTS})
        if others:
            raise ValueError(f"the cardiac layouts {sorted(set(slicing))} write 2D slices and cannot be mixed with {others}")
        return build_slices(sources, out, classes=classes, val=val, name=name, **slice_options)
    if slice_options:
        raise ValueError(f"{', '.join(sorted(slice_options))}: only for the cardiac layouts {sorted(SLICE_LAYOUTS)}")
    classes = list(DEFAULT_CLASSES if classes is None else classes)
    name = "union" if name is None else name
    if not classes or classes[0] != "background":
        raise ValueError(f"classes must start with 'background', got {classes}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise ValueError(f"--classes {' '.join(classes)} names {', '.join(map(repr, repeated))} more than once; "
                         "give each class once")
    if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 0:
        raise ValueError(f"--val must be an integer >= 0 (fully labelled cases held out), got {val!r}")
    root = out.parent
    training: list[dict[str, Any]] = []
    unlabelled: list[dict[str, Any]] = []
    label_maps: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for layout, folder in sources:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {sorted([*LAYOUTS, *SLICE_LAYOUTS])}")
        finder, annotated, mapping = LAYOUTS[layout]
        counts[layout] = counts.get(layout, 0) + 1
        source = layout if counts[layout] == 1 else f"{layout}_{counts[layout]}"
        if annotated != "all":
            missing = [c for c in annotated if c not in classes]
            if missing:
                raise ValueError(f"source {source!r} ({folder}) annotates {missing}, which --classes {classes} lacks")
        resolved = {}
        for value, target in mapping.items():
            if isinstance(target, list):
                resolved[value] = target
            else:
                resolved[value] = target if target in classes else "background"
        label_maps[source] = resolved
        pairs = finder(Path(folder))
        if not pairs:
            raise ValueError(f"source {source!r}: no cases found in {folder}")
        if all(label is None for _, label in pairs):
            raise ValueError(f"source {source!r}: none of the {len(pairs)} cases in {folder} has a label "
                             "(point the source at the labelled data)")
        for image, label in pairs:
            for path, what in ((image, "image"), (label, "label")):
                if path is not None and not path.is_file():
                    raise ValueError(f"source {source!r}: {what} {path} does not exist")
            case = {"case": image.parent.name} if layout in _CASE_FROM_FOLDER else {}
            if label is None:  # an unlabelled test image (KiTS19's cases 210-299)
                unlabelled.append({"image": _relative(image, root), **case, "source": source, "modality": "CT"})
                continue
            training.append({"image": _relative(image, root), "label": _relative(label, root), **case,
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "").rstrip(".") + ". " + (
        f"Layouts: {', '.join(sorted(LAYOUTS))} (entries point at the original files); cardiac: "
        f"{', '.join(SLICE_LAYOUTS)} (2D slices written under <out folder>/slices/). See docs/data_format.md."
    )
    parser.add_argument("--source", action="append", required=True, metavar="LAYOUT=DIR",
                        help="a dataset folder in a known layout; repeat for each source")
    parser.add_argument("--out", required=True, help="output dataset.json (a .json file; its folder is created)")
    parser.add_argument("--classes", nargs="+", help=f"global classes (default: {' '.join(DEFAULT_CLASSES)}; "
                        f"cardiac: {' '.join(cardiac_builders.CLASSES)})")
    parser.add_argument("--val", type=int, default=0, help="fully labelled cases held out as the validation split "
                        "(cardiac: random subjects of each source)")
    parser.add_argument("--name", help="dataset name (default: union; cardiac: acdc2d, mscmrseg2d, ...)")
    cardiac = parser.add_argument_group("cardiac layouts only (acdc, mscmrseg*)")
    cardiac.add_argument("--test", type=int, help="random subjects of each source held out, fully labelled, as the test split (default 0)")
    cardiac.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                         help=f"in-plane pixel size after resampling, one value or one per axis (default {cardiac_builders.DEFAULT_SPACING})")
    cardiac.add_argument("--size", type=int, nargs="+", metavar="N",
                         help=f"slice size after centred crop or pad, one value or one per axis (default {cardiac_builders.DEFAULT_SIZE})")
    cardiac.add_argument("--keep", choices=cardiac_builders.KEEP,
                         help="training slices keep 'one' random structure each, balanced (default); 'subject': one "
                         "structure per training subject on all its slices (the paper's single-label subjects); or "
                         "'all'; validation and test are always fully labelled")
    cardiac.add_argument("--no-wholeheart", dest="wholeheart", action="store_false", default=None,
                         help="with --keep one / subject, draw among LV, MYO, RV only (no whole-heart labels; train the "
                         "dcl_cardiac bundle with --missing any)")
    cardiac.add_argument("--seed", type=int, help="seed of the split and of the kept structures; same seed = identical files (default 0)")
    cardiac.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import sys

    sources = []
    for item in args.source:
        layout, sep, folder = item.partition("=")
        if not sep or not folder:
            print(f"error: --source must be LAYOUT=DIR, got {item!r}", file=sys.stderr)
            return 2
        sources.append((layout, folder))
    options = {k: getattr(args, k) for k in ("test", "spacing", "size", "keep", "wholeheart", "seed") if getattr(args, k) is not None}
    if any(layout in SLICE_LAYOUTS for layout, _ in sources):
        options["progress"] = not args.quiet
    try:
        desc = build_datalist(sources, args.out, classes=args.classes, val=args.val, name=args.name, **options)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "empty_slices_skipped" in desc:
        _print_slices(desc)
    else:
        per_source: dict[str, int] = {}
        for c in desc["training"]:
            per_source[c["source"]] = per_source.get(c["source"], 0) + 1
        unlabelled: dict[str, int] = {}
        for c in desc.get("test", []):
            unlabelled[c["source"]] = unlabelled.get(c["source"], 0) + 1
        for source, n in per_source.items():
            extra = (f"; {unlabelled[source]} images without a label file kept as unlabelled test cases"
                     if source in unlabelled else "")
            print(f"  {source:<16}{n:>5} training cases{extra}")
        if "validation" in desc:
            print(f"  {'(validation)':<16}{len(desc['validation']):>5} cases")
    out = Path(args.out)
    print(f"wrote {out}; next: partialseg check {out.parent if out.name == 'dataset.json' else out}")
    return 0


def _print_slices(desc: dict[str, Any]) -> None:
    """Per source: slices per split, kept structures of the training slices, empty slices skipped."""
    for source, skipped in desc["empty_slices_skipped"].items():
        kept: dict[str, int] = {}
        for c in desc["training"]:
            if c["source"] == source:
                key = "all" if c["annotated"] == "all" else c["annotated"][0].replace("background", "whole heart")
                kept[key] = kept.get(key, 0) + 1
        counts = {split: sum(c["source"] == source for c in desc.get(split, [])) for split in ("training", "validation", "test")}
        order = ["LV", "MYO", "RV", "whole heart", "all"]
        detail = ", ".join(f"{k} {kept[k]}" for k in order if k in kept)
        print(f"  {source:<16}{counts['training']:>6} training slices ({detail}), {counts['validation']} validation, "
              f"{counts['test']} test; {skipped} empty slices skipped")
