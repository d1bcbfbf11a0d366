"""The cardiac layouts of ``partialseg build-datalist``: ACDC and MS-CMRSeg -> 2D partial labels.

Unlike the abdominal layouts (:mod:`partialseg.data.builders.abdomen`), which point at the original
files, these layouts **write** the dataset the ``dcl_cardiac`` bundle trains on, preprocessed as
in the DCL paper (Zhang & Zhuang, section 4.1): every 3D short-axis volume is cut into 2D slices
along its third voxel axis, each slice resampled in-plane to ``spacing`` (1.37 x 1.37 mm) and
cropped or padded, centred, to ``size`` (212 x 212); each training slice keeps **one** randomly
chosen structure (``keep="one"``) and validation / test slices stay fully labelled.

==================  ====================================================  ==========================
layout              folder (as downloaded)                                label values -> classes
==================  ====================================================  ==========================
``acdc``            ACDC ``training/`` or ``testing/``:                   1 RV, 2 MYO, 3 LV
                    ``patientNNN/patientNNN_frameMM[_gt].nii.gz``, the
                    ED and ES frame numbers from ``patientNNN/Info.cfg``
                    (``ED: 1``, ``ES: 12``); ``*_4d.nii.gz`` is ignored
``mscmrseg``        MS-CMRSeg 2019 LGE: ``patient<N>_LGE.nii.gz`` and     200 MYO, 500 LV, 600 RV
                    ``patient<N>_LGE_manual.nii.gz`` anywhere below the
                    folder (the challenge's ``c0t2lge/`` and ``lgegt/``
                    sub-folders, or one flat folder)
``mscmrseg_c0``     the same for the bSSFP sequence: ``patient<N>_C0``    as ``mscmrseg``
                    and ``patient<N>_C0_manual``
``mscmrseg_t2``     the same for T2: ``patient<N>_T2[_manual]``           as ``mscmrseg``
==================  ====================================================  ==========================

Assumed of every volume: the label file has the image's grid (shape and affine), the slices
are stacked along the third voxel axis, and the label holds only the values above (anything
else is an error naming the file). MS-CMRSeg patients are sorted by number; a patient whose
image has no ``_manual`` label is an error (the original challenge release labelled only some
LGE volumes: point the command at the labelled ones).

Output, next to the ``dataset.json`` (``out``):

- ``slices/<source>/images/<name>.nii.gz`` (float32) and ``slices/<source>/labels/<name>.nii.gz``
  (uint8, global class indices: 1 LV, 2 MYO, 3 RV, as the synthetic ``cardiac2d``), ``<name>`` =
  ``patient001_ED_z03`` (ACDC: subject, phase, source slice index) or ``patient7_LGE_z05``
  (MS-CMRSeg). Each file is 2D with a diagonal affine: ``spacing`` in-plane (the source's voxel
  axes, in the source's array order), the source's slice distance third, the origin in mm from the
  centre of the source's voxel ``(0, 0, 0)``: world orientation is dropped (the bundle works on
  arrays) but every pixel can be traced back to its source voxel.
- every file is written into ``slices/.<source>.partial/``, which replaces ``slices/<source>``
  only when the whole build has succeeded (then ``dataset.json`` is written, also through a
  temporary file): an interrupted or failed run leaves the previous output as it was (a
  ``.partial`` folder left by a killed run is removed by the next one).
- ``slices/<source>/`` belongs to one JSON file: re-running the same command (same ``out``)
  replaces it, but a build whose ``out`` is another JSON file in the same folder is refused
  while a JSON file there references ``slices/<source>/`` (it would silently change that
  dataset's labels under its ``annotated`` entries): give each such dataset its own folder.

Entries: ``annotated`` (``["LV"]``, ``["MYO"]``, ``["RV"]``, ``["background"]`` or ``"all"``),
``source`` (the layout name), ``modality`` ``"MR"``, ``sequence`` (``cine`` / ``LGE`` / ``C0`` /
``T2``), ``subject``, ``phase`` (``ED`` / ``ES``, ACDC only, so evaluation can report them
apart) and ``slice`` (the source slice index).

Choices:

- **Partial labels** (``keep="one"``): the kinds kept are LV, MYO, RV and, with ``wholeheart``
  (default), the whole heart: the paper's fourth label class, background, annotated as
  ``["background"]`` with value 1 on LV + MYO + RV (the synthetic ``cardiac2d``'s whole-heart
  variant). The bundle's CompNet needs conditional slices annotating every class, background
  included: without whole-heart slices, train with ``--missing any``. Each training slice keeps
  one kind among those **present in it** (a slice without RV never keeps "RV"), drawn at random
  with the counts kept equal (paper: "the number of annotated images for each label class was
  set to be equal"; :func:`assign_kinds`). A kind that no training slice contains is an error.
- **One structure per subject** (``keep="subject"``, the paper's "single-label subjects": its
  ``60 x 1`` labels are one per subject): each training subject keeps one kind, drawn the same
  way over subjects among the kinds present in them, on every slice of both phases. A slice
  that does not contain its subject's kind is left out (as a conditional slice it would lack its
  class); their number is in ``dataset.json`` (``slices_without_kept_structure``).
- **Empty slices** (no labelled structure on the output grid: outside the annotated stack, or
  cropped away) are skipped in every split; their number is in ``dataset.json``
  (``empty_slices_skipped``). Kept, they would be uninformative conditional slices for CompNet.
- **Intensities** are resampled (linear) but not normalised: the bundle's transforms
  (``NormalizeIntensityd``, zero mean and unit variance per image) do it; padding is 0.
- **Splits**: ``val`` and ``test`` whole subjects (both phases, every slice) of each source are
  drawn at random into fully labelled ``validation`` and ``test`` splits (paper: ACDC 60 / 20 /
  20 subjects, MS-CMRSeg 25 / 5 / 15); the rest is ``training``.
- **Seed**: the split and the kept kinds come from ``seed`` only; the same arguments give
  byte-identical files (nibabel writes gzip without time stamps).
- **Resampling**: :func:`scipy.ndimage.affine_transform`, linear for images and nearest for
  labels, with the first voxel centre fixed (as MONAI's ``Spacing``) and the output covering the
  source's voxel centres. The written affine has the new spacing, so the bundle's own
  ``Spacingd`` leaves the slices as they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from partialseg._checks import check_int, check_option
from partialseg.data.builders._common import check_out, write_json

__all__ = ["CLASSES", "LAYOUTS", "SLICE_LAYOUTS", "SliceLayout", "assign_kinds", "build_slices"]

#: the classes of the ``dcl_cardiac`` bundle (and of the synthetic ``cardiac2d``)
CLASSES = ("background", "LV", "MYO", "RV")
STRUCTURES = ("LV", "MYO", "RV")
#: the annotated name of a whole-heart label (value 1 = "one of LV, MYO, RV")
WHOLEHEART = "background"
KEEP = ("one", "subject", "all")
DEFAULT_SPACING = 1.37
DEFAULT_SIZE = 212
AFFINE_TOL = 1e-3  # as partialseg check


@dataclass(frozen=True)
class Volume:
    """One labelled 3D volume of a source folder."""

    subject: str
    tag: str  # file-name tag of its slices: ED / ES (ACDC) or the MS-CMRSeg sequence
    image: Path
    label: Path
    phase: str | None = None


@dataclass(frozen=True)
class SliceLayout:
    """A slicing layout: how to find its volumes and what its label values mean."""

    find: Callable[[Path], list[Volume]]
    values: dict[int, str]  # source label value -> class name
    sequence: str


def _acdc_volumes(root: Path) -> list[Volume]:
    """ED and ES volumes of an ACDC ``training/`` or ``testing/`` folder, per ``Info.cfg``."""
    patients = sorted(p for p in root.glob("patient*") if p.is_dir())
    if not patients:
        raise FileNotFoundError(f"{root}: no ACDC patient* folders (point at ACDC's training/ or testing/ folder)")
    volumes = []
    for patient in patients:
        cfg = patient / "Info.cfg"
        if not cfg.is_file():
            raise FileNotFoundError(f"patient {patient.name}: {cfg} does not exist (it gives the ED and ES frames)")
        info = {}
        for line in cfg.read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
        for phase in ("ED", "ES"):
            if phase not in info:
                raise ValueError(f"patient {patient.name}: {cfg} has no '{phase}: <frame>' line")
            try:
                frame = int(info[phase])
            except ValueError:
                raise ValueError(f"patient {patient.name}: {cfg} gives {phase} frame {info[phase]!r}, not a number") from None
            stem = f"{patient.name}_frame{frame:02d}"
            volumes.append(Volume(patient.name, phase, patient / f"{stem}.nii.gz", patient / f"{stem}_gt.nii.gz", phase))
    return volumes


_MSCMR_NAME = re.compile(r"^patient(\d+)_(LGE|C0|T2)(_manual)?\.nii(\.gz)?$", re.IGNORECASE)


def _mscmr_volumes(root: Path, sequence: str) -> list[Volume]:
    """``patient<N>_<sequence>`` images with their ``_manual`` labels, anywhere below ``root``."""
    found: dict[bool, dict[int, Path]] = {False: {}, True: {}}  # is label -> patient number -> path
    for path in sorted(root.rglob("patient*")):
        match = _MSCMR_NAME.match(path.name)
        if match is None or match.group(2).upper() != sequence or not path.is_file():
            continue
        number, is_label = int(match.group(1)), match.group(3) is not None
        if number in found[is_label]:
            what = "labels" if is_label else "images"
            raise ValueError(f"patient{number}: two {sequence} {what}, {found[is_label][number]} and {path}")
        found[is_label][number] = path
    images, labels = found[False], found[True]
    if not images:
        raise FileNotFoundError(f"{root}: no MS-CMRSeg patient<N>_{sequence}.nii.gz images (sub-folders searched too)")
    volumes = []
    for number in sorted(images):
        if number not in labels:
            raise ValueError(
                f"patient{number}: no label patient{number}_{sequence}_manual.nii.gz below {root} (image {images[number]})"
            )
        volumes.append(Volume(f"patient{number}", sequence, images[number], labels[number]))
    return volumes


_MSCMR_VALUES = {200: "MYO", 500: "LV", 600: "RV"}

#: layout -> how to find its volumes, its label values and its MR sequence
SLICE_LAYOUTS: dict[str, SliceLayout] = {
    "acdc": SliceLayout(_acdc_volumes, {1: "RV", 2: "MYO", 3: "LV"}, "cine"),
    "mscmrseg": SliceLayout(partial(_mscmr_volumes, sequence="LGE"), _MSCMR_VALUES, "LGE"),
    "mscmrseg_c0": SliceLayout(partial(_mscmr_volumes, sequence="C0"), _MSCMR_VALUES, "C0"),
    "mscmrseg_t2": SliceLayout(partial(_mscmr_volumes, sequence="T2"), _MSCMR_VALUES, "T2"),
}
LAYOUTS = SLICE_LAYOUTS  # the name every anatomy module of the registry exposes


def assign_kinds(present: Sequence[Sequence[str]], kinds: Sequence[str], rng: np.random.Generator) -> list[str]:
    """One kind per slice among those present in it, at random, keeping the counts equal.

    The slices are visited in random order; each takes, among its present kinds, one of those
    chosen least often so far (ties broken at random). Counts stay equal up to the kinds' own
    scarcity (a kind present in few slices cannot reach the others).

    Args:
        present: per slice, the kinds it contains (at least one).
        kinds: the kinds to choose among, in a fixed order.
        rng: the random generator (the only source of randomness).

    Returns:
        the chosen kind of each slice.

    Example:
        >>> import numpy as np
        >>> chosen = assign_kinds([["LV", "RV"]] * 4 + [["LV"]] * 2, ["LV", "RV"], np.random.default_rng(0))
        >>> sorted(chosen[4:]), chosen.count("LV"), chosen.count("RV")
        (['LV', 'LV'], 3, 3)
    """
    counts = dict.fromkeys(kinds, 0)
    chosen: list[str] = [""] * len(present)
    for i in rng.permutation(len(present)):
        options = [k for k in kinds if k in present[i]]
        if not options:
            raise ValueError(f"slice {i} contains none of {list(kinds)}")
        low = min(counts[k] for k in options)
        ties = [k for k in options if counts[k] == low]
        kind = ties[int(rng.integers(len(ties)))]
        counts[kind] += 1
        chosen[i] = kind
    return chosen


def _pair(values: Sequence[float] | float | int, name: str, kind: type) -> tuple:
    vals = [values] if isinstance(values, (int, float)) else list(values)
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in vals):
        raise ValueError(f"{name} must be one or two numbers, got {values!r}")
    if kind is int and any(int(v) != v or v < 1 for v in vals):
        raise ValueError(f"{name} must be one or two integers >= 1, got {values!r}")
    if kind is float and any(not np.isfinite(v) or v <= 0 for v in vals):
        raise ValueError(f"{name} must be one or two positive numbers (mm), got {values!r}")
    return tuple(kind(v) for v in vals)


def _as_3d(array: np.ndarray) -> np.ndarray:
    """Drop trailing singleton axes beyond the third; a single 2D slice becomes ``(X, Y, 1)``."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array[..., None] if array.ndim == 2 else array


def _load_volume(volume: Volume, values: dict[int, str], source: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A volume's float32 image and uint8 label in global class indices, and its voxel size.

    Raises:
        ValueError: a missing file, an image / label grid mismatch or a label value the layout
            does not know; the message names the subject and the file.
    """
    import nibabel as nib

    where = f"source {source!r}, {volume.subject}"
    for path, what in ((volume.image, "image"), (volume.label, "label")):
        if not path.is_file():
            raise ValueError(f"{where}: {what} {path} does not exist")
    img, lab = nib.load(str(volume.image)), nib.load(str(volume.label))
    image = np.asarray(img.get_fdata(dtype=np.float32))
    label = np.asanyarray(lab.dataobj)
    image, label = _as_3d(image), _as_3d(label)
    if image.ndim != 3:
        raise ValueError(f"{where}: image {volume.image} has shape {image.shape}; expected a 3D volume")
    if label.shape != image.shape:
        raise ValueError(f"{where}: label {volume.label} has shape {label.shape} but image {volume.image} has shape {image.shape}")
    if not np.allclose(img.affine, lab.affine, atol=AFFINE_TOL):
        raise ValueError(
            f"{where}: label {volume.label} and image {volume.image} have different affines "
            f"(max difference {np.abs(img.affine - lab.affine).max():.4g})"
        )
    found = np.unique(label)
    unexpected = [v.item() for v in found if v != 0 and v not in values]
    if unexpected:
        raise ValueError(
            f"{where}: label {volume.label} holds value(s) {unexpected[:8]} that the layout does not know "
            f"(expected 0 and {', '.join(f'{v} {c}' for v, c in values.items())})"
        )
    glob = np.zeros(label.shape, np.uint8)
    for value, name in values.items():
        glob[label == value] = CLASSES.index(name)
    spacing = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    return image, glob, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def _resample(plane: np.ndarray, src: Sequence[float], dst: Sequence[float], order: int) -> np.ndarray:
    """Resample a 2D array from voxel size ``src`` to ``dst`` (mm), voxel ``(0, 0)`` fixed."""
    from scipy import ndimage

    step = [d / s for s, d in zip(src, dst)]  # source voxels per output pixel
    shape = [int(np.floor((n - 1) / f + 1e-6)) + 1 for n, f in zip(plane.shape, step)]
    return ndimage.affine_transform(plane, step, output_shape=shape, order=order, mode="nearest")


def _crop_or_pad(plane: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """Centre crop or zero pad to ``size``; also returns, per axis, the input index of output 0."""
    out = np.zeros(size, plane.dtype)
    shifts, src, dst = [], [], []
    for n, t in zip(plane.shape, size):
        shift = (n - t) // 2 if n >= t else -((t - n) // 2)
        shifts.append(shift)
        src.append(slice(max(shift, 0), max(shift, 0) + min(n, t)))
        dst.append(slice(max(-shift, 0), max(-shift, 0) + min(n, t)))
    out[tuple(dst)] = plane[tuple(src)]
    return out, shifts


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _references(path: Path, prefixes: Sequence[str]) -> str | None:
    """The first prefix that an image or label of the dataset JSON ``path`` starts with, if any
    (anything that is not a readable dataset JSON references nothing)."""
    try:
        desc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(desc, dict):
        return None
    for split in ("training", "validation", "test"):
        rows = desc.get(split)
        for row in rows if isinstance(rows, list) else []:
            for value in (row.get("image"), row.get("label")) if isinstance(row, dict) else (row,):
                if isinstance(value, str):
                    rel = value.replace("\\", "/")
                    while rel.startswith("./"):
                        rel = rel[2:]
                    for prefix in prefixes:
                        if rel.startswith(prefix):
                            return prefix
    return None


def _check_slice_owners(out: Path, sources: Sequence[str]) -> None:
    """Refuse to replace ``slices/<source>/`` folders that another JSON file beside ``out`` references.

    Raises:
        ValueError: naming the folder, the JSON file that uses it, and what to do.
    """
    root = out.parent
    prefixes = [f"slices/{source}/" for source in sources if (root / "slices" / source).exists()]
    if not prefixes:
        return
    for other in sorted(root.glob("*.json")):
        if other.name == out.name or not other.is_file():
            continue
        prefix = _references(other, prefixes)
        if prefix is not None:
            raise ValueError(
                f"{root / prefix.rstrip('/')} holds the slices that {other} references; building {out.name} "
                f"there would replace them and silently change that dataset. Write {out.name} to another folder "
                f"(its slices go beside it), or delete {other} first if it is no longer used"
            )


def _split_subjects(subjects: Sequence[str], val: int, test: int, rng: np.random.Generator, source: str) -> dict[str, str]:
    if val + test >= len(subjects):
        raise ValueError(
            f"source {source!r}: --val {val} and --test {test} leave no training subject of its {len(subjects)}"
        )
    order = rng.permutation(len(subjects))
    split = {}
    for rank, i in enumerate(order):
        split[subjects[i]] = "validation" if rank < val else "test" if rank < val + test else "training"
    return split


@dataclass
class _Held:
    """A training slice whose label is written once its kept kind is chosen."""

    entry: dict[str, Any]
    label: np.ndarray  # global class indices, the whole slice
    affine: np.ndarray
    present: list[str] = field(default_factory=list)  # the kinds it contains
    kind: str = ""  # the kind it keeps


def _build_source(layout: str, folder: Path, source: str, tmp: Path, index: int, *, val: int, test: int,
                  spacing: tuple[float, float], size: tuple[int, int], keep: str, kinds: Sequence[str],
                  seed: int, progress: bool) -> tuple[dict[str, list[dict[str, Any]]], int, int]:
    """Write one source's slices into ``tmp``; return its entries per split, the empty slices skipped
    and (``keep="subject"``) the training slices left out for lacking their subject's kind."""
    from tqdm import tqdm

    spec = SLICE_LAYOUTS[layout]
    if not folder.is_dir():
        raise FileNotFoundError(f"source {source!r}: {folder} is not a folder")
    volumes = spec.find(folder)
    subjects = list(dict.fromkeys(v.subject for v in volumes))
    split_of = _split_subjects(subjects, val, test, np.random.default_rng([seed, index, 0]), source)
    entries: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    held: list[_Held] = []  # training slices whose label waits for its kind
    skipped = 0
    for d in ("images", "labels"):
        (tmp / d).mkdir(parents=True)
    for subject in tqdm(subjects, desc=f"slicing {source}", unit="subject", disable=not progress):
        for volume in (v for v in volumes if v.subject == subject):
            image, label, (sx, sy, sz) = _load_volume(volume, spec.values, source)
            for z in range(image.shape[2]):
                lab2d, shifts = _crop_or_pad(_resample(label[..., z], (sx, sy), spacing, 0), size)
                if not lab2d.any():
                    skipped += 1
                    continue
                img2d, _ = _crop_or_pad(_resample(image[..., z], (sx, sy), spacing, 1), size)
                affine = np.diag([spacing[0], spacing[1], sz, 1.0])
                affine[:3, 3] = [spacing[0] * shifts[0], spacing[1] * shifts[1], sz * z]
                name = f"{subject}_{volume.tag}_z{z:02d}"
                entry: dict[str, Any] = {
                    "image": f"slices/{source}/images/{name}.nii.gz",
                    "label": f"slices/{source}/labels/{name}.nii.gz",
                    "annotated": "all",
                    "source": source,
                    "modality": "MR",
                    "sequence": spec.sequence,
                    "subject": subject,
                }
                if volume.phase is not None:
                    entry["phase"] = volume.phase
                entry["slice"] = z
                _save(tmp / "images" / f"{name}.nii.gz", img2d.astype(np.float32), affine)
                split = split_of[subject]
                if split == "training" and keep in ("one", "subject"):
                    held.append(_Held(entry, lab2d, affine))
                else:
                    _save(tmp / "labels" / f"{name}.nii.gz", lab2d, affine)
                entries[split].append(entry)
    without_kind = 0
    if held:
        for h in held:
            h.present = [k for k in kinds if k == WHOLEHEART or (h.label == CLASSES.index(k)).any()]
        if keep == "subject":  # one kind per subject, among those present in some of its slices
            subjects_held = list(dict.fromkeys(h.entry["subject"] for h in held))
            union = [[k for k in kinds if any(k in h.present for h in held if h.entry["subject"] == s)] for s in subjects_held]
            kind_of = dict(zip(subjects_held, assign_kinds(union, kinds, np.random.default_rng([seed, index, 1]))))
            for h in held:
                h.kind = kind_of[h.entry["subject"]]
            lacking = [h for h in held if h.kind not in h.present]
            for h in lacking:  # these slices do not contain their subject's kind: left out
                entries["training"].remove(h.entry)
                (tmp / "images" / Path(h.entry["image"]).name).unlink()
            held = [h for h in held if h.kind in h.present]
            without_kind = len(lacking)
        else:
            for h, kind in zip(held, assign_kinds([h.present for h in held], kinds, np.random.default_rng([seed, index, 1]))):
                h.kind = kind
        chosen = {h.kind for h in held}
        missing = [k for k in kinds if k not in chosen]
        if missing:
            found = "; ".join(f"{k} in {sum(k in h.present for h in held)} of {len(held)}" for k in missing)
            hint = (f" ({len(set(h.entry['subject'] for h in held))} training subjects for {len(kinds)} kinds: use --keep one,"
                    " fewer --val / --test subjects, or --no-wholeheart)") if keep == "subject" else ""
            raise ValueError(
                f"source {source!r}: no training slice keeps {missing} ({found} training slices){hint}; "
                "the DCL sampler needs training slices annotating every class"
            )
        for h in held:
            if h.kind == WHOLEHEART:
                kept = (h.label > 0).astype(np.uint8)
            else:
                k = CLASSES.index(h.kind)
                kept = np.where(h.label == k, k, 0).astype(np.uint8)
            h.entry["annotated"] = [h.kind]
            _save(tmp / "labels" / Path(h.entry["label"]).name, kept, h.affine)
    return entries, skipped, without_kind


def build_slices(
    sources: Sequence[tuple[str, str | os.PathLike]],
    out: str | os.PathLike,
    classes: Sequence[str] | None = None,
    val: int = 0,
    test: int = 0,
    spacing: float | Sequence[float] = DEFAULT_SPACING,
    size: int | Sequence[int] = DEFAULT_SIZE,
    keep: str = "one",
    wholeheart: bool = True,
    seed: int = 0,
    name: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write 2D slices of ACDC / MS-CMRSeg volumes and their ``dataset.json``; return its content.

    See the module docstring for the layouts, the output and the choices made.

    Args:
        sources: ``(layout, folder)`` pairs, layouts of :data:`SLICE_LAYOUTS`; the source name is
            the layout (numbered when repeated: ``acdc_2``).
        out: output ``dataset.json`` (a ``.json`` file); the slices go to ``slices/<source>/``
            beside it, which no other JSON file in that folder may reference.
        classes: must be None or ``["background", "LV", "MYO", "RV"]``.
        val: subjects of each source held out, fully labelled, as the ``validation`` split.
        test: subjects of each source held out, fully labelled, as the ``test`` split.
        spacing: in-plane pixel size in mm (one value, or one per array axis).
        size: output slice size (one value, or one per array axis).
        keep: ``"one"`` structure per training slice, ``"subject"`` (one per training subject, on
            all its slices), or ``"all"`` (fully labelled).
        wholeheart: with ``keep="one"`` / ``"subject"``, also keep whole-heart labels (``["background"]``).
        seed: seed of the split and of the kept structures.
        name: dataset name (default: the source names joined by ``+``, then ``2d``).
        progress: show a progress bar per source.

    Raises:
        ValueError: a bad argument (``out`` not a ``.json`` file, or a folder), an unknown layout,
            ``slices/<source>/`` referenced by another JSON file beside ``out``, or a problem
            with a source volume (named).
        FileNotFoundError: a folder that is not in its layout, or a missing ``Info.cfg``.

    Example:
        >>> build_slices([("acdc", "/nonexistent")], "/tmp/x/dataset.json", keep="some")
        Traceback (most recent call last):
        ...
        ValueError: keep must be one of 'one', 'subject', 'all'; got 'some'.
    """
    out = check_out(out)
    keep = check_option(keep, KEEP, "keep")
    if classes is not None and list(classes) != list(CLASSES):
        raise ValueError(f"the cardiac layouts write classes {list(CLASSES)}; got --classes {list(classes)}")
    val, test, seed = (check_int(n, what, minimum=0) for what, n in (("val", val), ("test", test), ("seed", seed)))
    spacing_mm = _pair(spacing, "spacing", float)
    shape = _pair(size, "size", int)
    kinds = [*STRUCTURES, WHOLEHEART] if wholeheart else list(STRUCTURES)
    if not sources:
        raise ValueError("no sources given")
    root = out.parent
    slices = root / "slices"
    names, counts = [], {}
    for layout, _ in sources:
        if layout not in SLICE_LAYOUTS:
            raise ValueError(f"unknown slicing layout {layout!r}; choose one of {sorted(SLICE_LAYOUTS)}")
        counts[layout] = counts.get(layout, 0) + 1
        names.append(layout if counts[layout] == 1 else f"{layout}_{counts[layout]}")
    _check_slice_owners(out, names)
    splits: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    skipped: dict[str, int] = {}
    without_kind: dict[str, int] = {}
    partials = [slices / f".{source}.partial" for source in names]
    try:
        for index, ((layout, folder), source, tmp) in enumerate(zip(sources, names, partials)):
            if tmp.exists():
                shutil.rmtree(tmp)  # left by an interrupted run
            entries, skipped[source], without_kind[source] = _build_source(
                layout, Path(folder), source, tmp, index, val=val, test=test, spacing=spacing_mm, size=shape,
                keep=keep, kinds=kinds, seed=int(seed), progress=progress,
            )
            for split, rows in entries.items():
                splits[split].extend(rows)
    except BaseException:
        for tmp in partials:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    for source, tmp in zip(names, partials):
        final = slices / source
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    desc: dict[str, Any] = {
        "name": name or "+".join(names) + "2d",
        "description": (
            "built by partialseg build-datalist from " + ", ".join(f"{l}={f}" for l, f in sources)
            + f": 2D slices at {spacing_mm[0]:g} x {spacing_mm[1]:g} mm, {shape[0]} x {shape[1]} pixels; "
            + {"one": "one structure kept per training slice", "subject": "one structure kept per training subject",
               "all": "fully labelled"}[keep]
            + f"; validation and test fully labelled; seed {seed}"
        ),
        "tensorImageSize": "2D",
        "modality": {"0": "MR"},
        "classes": list(CLASSES),
        "labels": {str(i): c for i, c in enumerate(CLASSES)},
        "spacing": list(spacing_mm),
        "size": list(shape),
        "keep": keep,
        "seed": int(seed),
        "empty_slices_skipped": skipped,
        **({"slices_without_kept_structure": without_kind} if keep == "subject" else {}),
        "numTraining": len(splits["training"]),
        "numTest": len(splits["test"]),
    }
    desc.update({split: rows for split, rows in splits.items() if rows or split == "training"})
    write_json(out, desc)
    return desc
