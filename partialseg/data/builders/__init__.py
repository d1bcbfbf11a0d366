"""``partialseg build-datalist``: one partialseg ``dataset.json`` from public datasets as downloaded.

Each ``--source LAYOUT=DIR`` names a folder in one of the layouts below; the command finds its
image/label pairs, writes the source's label map (its own label values -> global class names)
and annotated classes, and joins every source into one dataset over ``--classes``. Nothing is
copied or converted: the entries point at the original files. Run ``partialseg check`` on the
result before training.

The builders live one module per anatomy (:mod:`~partialseg.data.builders.abdomen`,
:mod:`~partialseg.data.builders.cardiac`, :mod:`~partialseg.data.builders.atrium`; shared
machinery in ``_common``) and are found
through one registry, :data:`LAYOUTS` (layout name -> :class:`Layout`: its anatomy, its
builder and its description).

The cardiac layouts (``acdc``, ``mscmrseg``, ``mscmrseg_c0``, ``mscmrseg_t2``; the DCL paper's
setting, :mod:`partialseg.data.builders.cardiac`) are different: they **write** a 2D dataset of
resampled, cropped short-axis slices next to the ``dataset.json``, keep one random structure per
training slice, and take the options ``--spacing``, ``--size``, ``--keep``, ``--seed``,
``--test`` and ``--no-wholeheart``; they cannot be mixed with the abdominal layouts.

Left-atrium layouts (the DTML paper's setting, :mod:`partialseg.data.builders.atrium`):
``lasc2018`` (the 2018 Atrial Segmentation Challenge, ``<case>/lgemri.nrrd`` + ``laendo.nrrd``,
255 = atrium) and ``msd_heart`` (MSD ``Task02_Heart``, 1 = atrium); entries point at the
original files; ``--test`` holds labelled cases out and ``--labelled N|FRACTION`` keeps the label
of that many training cases, the others becoming unlabelled entries (``--labelled 0.2``: the
paper's 16 labelled / 64 unlabelled).

Polyp layouts (hybrid supervision, :mod:`partialseg.data.builders.polyp`): ``kvasir_seg``
(Kvasir-SEG, ``images/`` + ``masks/``, JPG) and ``cvc_clinicdb`` (CVC-ClinicDB, ``Original/`` +
``Ground Truth/``, TIF or PNG); masks are binarised to PNG beside ``--out``; ``--strong
N|FRACTION`` keeps that many true masks and turns the other training masks into seeded weak ones
(``--weak-kinds``: ellipse, dilated, eroded, shifted, missing), the true one kept as ``label_true``.

AMOS22 (``amos22``, :mod:`partialseg.data.builders.amos`): CT and MR as distributed, modality
from the case id; ``--tasks paper`` writes the atlas paper's three-task multimodal split.

Abdominal layouts (the marginal-loss paper's union: ``btcv``, ``msd_liver``, ``msd_spleen``,
``msd_pancreas``, ``kits19``; folders and label values in the table of
:mod:`partialseg.data.builders.abdomen`).

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

    partialseg build-datalist --out /data/la/dataset.json \\
        --source "lasc2018=/data/AtriaSeg2018/Training Set" --test 20 --labelled 0.2
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partialseg.data.builders import abdomen, amos, atrium, cardiac, polyp
from partialseg.data.builders._common import check_out, write_json
from partialseg.data.builders.abdomen import DEFAULT_CLASSES
from partialseg.data.builders.cardiac import SLICE_LAYOUTS, build_slices

__all__ = ["LAYOUTS", "Layout", "SLICE_LAYOUTS", "build_datalist", "add_arguments", "run"]


@dataclass(frozen=True)
class Layout:
    """One entry of the registry.

    Attributes:
        anatomy: the module that builds it (``"abdomen"``, ``"cardiac"``); sources of one build
            share it.
        build: ``build(sources, out, classes=, val=, name=, **options)`` -> the ``dataset.json``
            content, for every source of the build.
        spec: the anatomy's description of the layout (an ``abdomen.FileLayout`` or a
            ``cardiac.SliceLayout``).
        options: the extra keyword options its builder takes (none for the abdominal layouts).
    """

    anatomy: str
    build: Callable[..., dict[str, Any]]
    spec: Any
    options: frozenset = frozenset()


_CARDIAC_OPTIONS = frozenset({"test", "spacing", "size", "keep", "wholeheart", "seed", "progress"})
_ATRIUM_OPTIONS = frozenset({"test", "labelled"})
_AMOS_OPTIONS = frozenset({"tasks", "test_per_modality", "seed"})
_POLYP_OPTIONS = frozenset({"test", "strong", "weak_kinds", "seed"})

#: layout name -> :class:`Layout`; an anatomy module adds its ``LAYOUTS`` here
LAYOUTS: dict[str, Layout] = {
    **{name: Layout("abdomen", abdomen.build_union, spec) for name, spec in abdomen.LAYOUTS.items()},
    **{name: Layout("cardiac", cardiac.build_slices, spec, _CARDIAC_OPTIONS) for name, spec in cardiac.LAYOUTS.items()},
    **{name: Layout("atrium", atrium.build_atrium, spec, _ATRIUM_OPTIONS) for name, spec in atrium.LAYOUTS.items()},
    **{name: Layout("amos", amos.build_amos, spec, _AMOS_OPTIONS) for name, spec in amos.LAYOUTS.items()},
    **{name: Layout("polyp", polyp.build_polyp, spec, _POLYP_OPTIONS) for name, spec in polyp.LAYOUTS.items()},
}


def build_datalist(
    sources: Sequence[tuple[str, str | os.PathLike]],
    out: str | os.PathLike,
    classes: Sequence[str] | None = None,
    val: int = 0,
    name: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Write one ``dataset.json`` from datasets in known layouts; return its content.

    The layouts' registry entries choose the builder: the abdominal layouts join their sources
    into one union pointing at the original files (:func:`~partialseg.data.builders.abdomen.build_union`),
    the cardiac ones write 2D slices beside ``out`` (:func:`~partialseg.data.builders.cardiac.build_slices`).

    Args:
        sources: ``(layout, folder)`` pairs, layouts of :data:`LAYOUTS`, all of one anatomy; the
            source name is the layout (numbered when repeated).
        out: output ``dataset.json`` path, a ``.json`` file (paths inside are relative to its folder).
        classes: global classes, ``background`` first (default: the anatomy's; for the cardiac
            layouts ``background, LV, MYO, RV``, the only choice).
        val: cases held out as a fully labelled ``validation`` split (abdomen: the last fully
            labelled cases of the first fully labelled source; cardiac: random subjects of each source).
        name: dataset name (default ``union``; cardiac: ``acdc2d``, ...).
        **options: the builder's own options (cardiac: ``test``, ``spacing``, ``size``, ``keep``,
            ``wholeheart``, ``seed``, ``progress``).

    Returns:
        the ``dataset.json`` content.

    Raises:
        ValueError: ``out`` not a ``.json`` file (or a folder), no source, an unknown layout,
            layouts of two anatomies mixed, an option the builder does not take, or what the
            builder refuses (a missing file, a bad ``val`` ... each named).
        TypeError: ``val`` (or an integer option) not an int.
        FileNotFoundError: a folder that is not in its layout.

    Example:
        >>> build_datalist([("btcv", "/data/BTCV"), ("acdc", "/data/ACDC")], "/tmp/x/dataset.json")
        Traceback (most recent call last):
        ...
        ValueError: the cardiac layouts ['acdc'] write 2D slices and cannot be mixed with ['btcv']
    """
    out = check_out(out)
    if not sources:
        raise ValueError("no sources given")
    unknown = [layout for layout, _ in sources if layout not in LAYOUTS]
    if unknown:
        raise ValueError(f"unknown layout {unknown[0]!r}; choose one of {sorted(LAYOUTS)}")
    kinds = {LAYOUTS[layout].anatomy for layout, _ in sources}
    if len(kinds) > 1:
        slicing = sorted({layout for layout, _ in sources if LAYOUTS[layout].anatomy == "cardiac"})
        if slicing:
            others = sorted({layout for layout, _ in sources if LAYOUTS[layout].anatomy != "cardiac"})
            raise ValueError(f"the cardiac layouts {slicing} write 2D slices and cannot be mixed with {others}")
        by_anatomy = {k: sorted({l for l, _ in sources if LAYOUTS[l].anatomy == k}) for k in sorted(kinds)}
        raise ValueError("layouts of different anatomies (different classes) cannot be joined: "
                         + ", ".join(f"{k} {v}" for k, v in by_anatomy.items()))
    layout = LAYOUTS[sources[0][0]]
    extra = sorted(set(options) - layout.options)
    if extra:
        takers = sorted(name for name, entry in LAYOUTS.items() if set(extra) <= entry.options)
        anatomies = {LAYOUTS[t].anatomy for t in takers}
        kind = f"{anatomies.pop()} " if len(anatomies) == 1 else ""
        raise ValueError(f"{', '.join(extra)}: only for the {kind}layouts {takers}")
    return layout.build(sources, out, classes=classes, val=val, name=name, **options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "").rstrip(".") + ". " + (
        f"Layouts: {', '.join(sorted(abdomen.LAYOUTS))} (entries point at the original files); cardiac: "
        f"{', '.join(cardiac.LAYOUTS)} (2D slices written under <out folder>/slices/); left atrium: "
        f"{', '.join(atrium.LAYOUTS)}. See docs/data_format.md."
    )
    parser.add_argument("--source", action="append", required=True, metavar="LAYOUT=DIR",
                        help="a dataset folder in a known layout; repeat for each source")
    parser.add_argument("--out", required=True, help="output dataset.json (a .json file; its folder is created)")
    parser.add_argument("--classes", nargs="+", help=f"global classes (default: {' '.join(DEFAULT_CLASSES)}; "
                        f"cardiac: {' '.join(cardiac.CLASSES)})")
    parser.add_argument("--val", type=int, default=0, help="fully labelled cases held out as the validation split "
                        "(cardiac: random subjects of each source)")
    parser.add_argument("--name", help="dataset name (default: union; cardiac: acdc2d, mscmrseg2d, ...)")
    group = parser.add_argument_group("cardiac layouts only (acdc, mscmrseg*); --test also for the atrium layouts")
    group.add_argument("--test", type=int, help="random subjects of each source held out, fully labelled, as the test "
                       "split (default 0); atrium layouts: the last labelled cases of each source")
    group.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                         help=f"in-plane pixel size after resampling, one value or one per axis (default {cardiac.DEFAULT_SPACING})")
    group.add_argument("--size", type=int, nargs="+", metavar="N",
                         help=f"slice size after centred crop or pad, one value or one per axis (default {cardiac.DEFAULT_SIZE})")
    group.add_argument("--keep", choices=cardiac.KEEP,
                         help="training slices keep 'one' random structure each, balanced (default); 'subject': one "
                         "structure per training subject on all its slices (the paper's single-label subjects); or "
                         "'all'; validation and test are always fully labelled")
    group.add_argument("--no-wholeheart", dest="wholeheart", action="store_false", default=None,
                         help="with --keep one / subject, draw among LV, MYO, RV only (no whole-heart labels; train the "
                         "dcl_cardiac bundle with --missing any)")
    group.add_argument("--seed", type=int, help="seed of the split and of the kept structures; same seed = identical files (default 0)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group = parser.add_argument_group(f"left-atrium layouts only ({', '.join(atrium.LAYOUTS)})")
    group.add_argument("--labelled", type=_count_or_fraction, metavar="N|FRACTION",
                       help="training cases of each source that keep their label: a number (16) or a fraction (0.2); "
                       "the others become unlabelled entries (default: all keep it)")
    group = parser.add_argument_group("AMOS22 layout only (amos22; --seed and --val too)")
    group.add_argument("--tasks", choices=amos.TASKS, default=None,
                       help="all: every organ of every case (default); paper: the atlas paper's three tasks (two CT "
                       "halves, one MR set, disjoint organs; docs/data_format.md)")
    group.add_argument("--test-per-modality", type=int, nargs=2, metavar=("CT", "MR"), default=None,
                       help="--tasks paper: training cases held out as the fully labelled test split (default 38 10)")
    group = parser.add_argument_group(f"polyp layouts only ({', '.join(polyp.LAYOUTS)}; --test, --val and --seed too)")
    group.add_argument("--strong", type=_count_or_fraction, metavar="N|FRACTION",
                       help="training frames of each source that keep their true (strong) mask: a number (55) or a fraction "
                       "(0.1); the others get a seeded weak mask written under <out folder>/weak/ (default: all strong)")
    group.add_argument("--weak-kinds", nargs="+", choices=polyp.WEAK_KINDS, default=None, metavar="KIND",
                       help=f"weak-mask kinds drawn in turn (default: all of {' '.join(polyp.WEAK_KINDS)})")


def _count_or_fraction(text: str) -> int | float:
    """``--labelled``'s value: an int (a number of cases) or, with a point, a float (a fraction)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of cases (16) or a fraction (0.2), got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import sys

    sources = []
    for item in args.source:
        layout, sep, folder = item.partition("=")
        if not sep or not folder:
            print(f"error: --source must be LAYOUT=DIR, got {item!r}", file=sys.stderr)
            return 2
        sources.append((layout, folder))
    options = {k: getattr(args, k) for k in ("test", "spacing", "size", "keep", "wholeheart", "seed", "labelled",
                                             "tasks", "test_per_modality", "strong", "weak_kinds")
               if getattr(args, k, None) is not None}
    if any(layout in cardiac.LAYOUTS for layout, _ in sources):
        options["progress"] = not args.quiet
    try:
        desc = build_datalist(sources, args.out, classes=args.classes, val=args.val, name=args.name, **options)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "empty_slices_skipped" in desc:
        _print_slices(desc)
    elif any(LAYOUTS[layout].anatomy == "atrium" for layout, _ in sources):
        _print_atrium(desc)
    elif any(LAYOUTS[layout].anatomy == "polyp" for layout, _ in sources):
        _print_polyp(desc)
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


def _print_polyp(desc: dict[str, Any]) -> None:
    """Per source: strong and weak training frames (per kind), validation and test frames."""
    for source in dict.fromkeys(c["source"] for split in ("training", "validation", "test") for c in desc.get(split, [])):
        train = [c for c in desc["training"] if c["source"] == source]
        kinds: dict[str, int] = {}
        for c in train:
            if c.get("supervision") == "weak":
                kinds[c["weak_type"]] = kinds.get(c["weak_type"], 0) + 1
        strong = sum(c.get("supervision") != "weak" for c in train)
        held = {split: sum(c["source"] == source for c in desc.get(split, [])) for split in ("validation", "test")}
        detail = ", ".join(f"{k} {n}" for k, n in kinds.items())
        print(f"  {source:<16}{len(train):>5} training frames ({strong} strong, {len(train) - strong} weak"
              f"{': ' + detail if detail else ''}), {held['validation']} validation, {held['test']} test")


def _print_atrium(desc: dict[str, Any]) -> None:
    """Per source: labelled and unlabelled training cases, validation and test cases."""
    for source in desc["label_maps"]:
        train = [c for c in desc["training"] if c["source"] == source]
        labelled = sum("label" in c for c in train)
        held = {split: sum(c["source"] == source for c in desc.get(split, [])) for split in ("validation", "test")}
        print(f"  {source:<16}{len(train):>5} training cases ({labelled} labelled, {len(train) - labelled} unlabelled), "
              f"{held['validation']} validation, {held['test']} test")


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
