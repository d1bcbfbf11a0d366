"""Checks of a partial-label dataset that need its files, run before any training starts."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from partialseg.data.spec import SPLITS, DatasetError, PartialDataset, load_dataset

__all__ = ["ValidationReport", "read_image", "validate_dataset"]

AFFINE_TOL = 1e-3
_NIFTI = (".nii", ".nii.gz")


def read_image(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read an image as ``(array, affine)``; spatial axes first, channels (if any) last.

    NIfTI goes through nibabel directly (fast; ``dataobj`` keeps the stored dtype); every other
    format through MONAI's ``LoadImage``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read; the message names it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        if path.lower().endswith(_NIFTI):
            import nibabel as nib

            img = nib.load(path)
            return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        from monai.transforms import LoadImage

        img = LoadImage(image_only=True)(path)
        return np.asarray(img), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear message
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _spacing(affine: np.ndarray) -> tuple[float, ...]:
    return tuple(float(round(s, 4)) for s in np.sqrt((affine[:-1, :-1] ** 2).sum(axis=0)))


@dataclass
class _SourceSummary:
    cases: int = 0
    labelled: int = 0
    annotated: Counter = field(default_factory=Counter)
    values: set = field(default_factory=set)
    spacings: set = field(default_factory=set)
    shapes: set = field(default_factory=set)
    modalities: set = field(default_factory=set)


@dataclass
class ValidationReport:
    """What :func:`validate_dataset` found.

    Attributes:
        dataset: the dataset checked.
        problems: one line per problem, each naming its case and file.
        summary: split -> source -> counts, annotated classes, label values, spacings, shapes.
    """

    dataset: PartialDataset
    problems: list[str]
    summary: dict[str, dict[str, dict[str, Any]]]

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_invalid(self) -> None:
        """Raise :class:`DatasetError` listing every problem, if there is any."""
        if self.problems:
            raise DatasetError(self.problems, header=f"dataset {self.dataset.name!r} failed validation")

    def format(self) -> str:
        """A human-readable per-split, per-source summary followed by the problems."""
        classes = self.dataset.classes
        lines = [f"dataset {self.dataset.name!r}: {len(classes)} classes {classes}"]
        for split, sources in self.summary.items():
            lines.append(f"\n[{split}]")
            lines.append(f"  {'source':<14}{'cases':>6}{'labelled':>9}  {'modality':<11}{'values':<15}{'spacing (mm)':<18}{'shape':<14}annotated classes (cases)")
            for src, s in sources.items():
                counts = s["annotated"]
                if s["labelled"] and len(counts) == len(classes) and all(n == s["labelled"] for n in counts.values()):
                    ann = f"all ({s['labelled']})"
                else:
                    ann = ", ".join(f"{classes[i]} ({n})" for i, n in sorted(counts.items())) or "-"
                vals = ",".join(str(v) for v in s["label_values"]) or "-"
                sp = "x".join(f"{v:g}" for v in s["spacings"][0]) + (" ..." if len(s["spacings"]) > 1 else "") if s["spacings"] else "-"
                sh = "x".join(str(v) for v in s["shapes"][0]) + (" ..." if len(s["shapes"]) > 1 else "") if s["shapes"] else "-"
                modality = ",".join(s["modalities"]) or "-"
                lines.append(f"  {src:<14}{s['cases']:>6}{s['labelled']:>9}  {modality:<11}{vals:<15}{sp:<18}{sh:<14}{ann}")
        if self.problems:
            lines.append(f"\n{len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append("\nno problems found")
        return "\n".join(lines)


def comparable_affines(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two affines of one grid on the same footing: a 2D image's 3 x 3 affine (NRRD, PNG) against
    a 4 x 4 one (NIfTI keeps 2D slices in 3D space) compares with the latter's in-plane block."""
    if a.shape == b.shape:
        return a, b
    small, large = (a, b) if a.shape[0] < b.shape[0] else (b, a)
    n = small.shape[0] - 1
    keep = [*range(n), large.shape[0] - 1]
    reduced = large[np.ix_(keep, keep)]
    return (small, reduced) if small is a else (reduced, small)


def spatial_shape(shape: Sequence[int], path: str, label_ndim: int | None = None) -> tuple[int, ...]:
    """The spatial shape of an image or label, trailing size-1 dimensions beyond the second dropped.

    NIfTI keeps space in its first three dimensions (channels, time and vectors come after), so a
    2D label against a 3D NIfTI volume is a mismatch, while an ``(H, W, 1)`` slice and an
    ``(H, W)`` one are the same grid. Other formats (PNG: ``(H, W, 3)``) hold channels after the
    label's dimensions (``label_ndim``; None: every dimension counts).
    """
    dims = list(shape[:3] if path.lower().endswith(_NIFTI) else shape[:label_ndim])
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    return tuple(int(d) for d in dims)


def _check_case(case: dict[str, Any], ds: PartialDataset, split: str, summary: _SourceSummary, problems: list[str]) -> None:
    where = f"case {case['case']!r} ({split}, source {case['source']!r})"
    summary.cases += 1
    if case.get("modality"):
        summary.modalities.add(case["modality"])
    try:
        image, img_affine = read_image(case["image"])
    except (FileNotFoundError, ValueError) as e:
        problems.append(f"{where}: image {e}")
        image = None
    if image is not None:
        summary.spacings.add(_spacing(img_affine))
        if not np.issubdtype(image.dtype, np.number):
            problems.append(f"{where}: image {case['image']} has non-numeric dtype {image.dtype}")
        elif not np.isfinite(image).all():
            n = int((~np.isfinite(image)).sum())
            problems.append(f"{where}: image {case['image']} has {n} NaN or infinite value(s)")
    if case.get("label") is None:
        return
    summary.labelled += 1
    summary.annotated.update(case["annotated"])
    try:
        label, lab_affine = read_image(case["label"])
    except (FileNotFoundError, ValueError) as e:
        problems.append(f"{where}: label {e}")
        return
    summary.shapes.add(tuple(int(v) for v in label.shape))
    if image is not None:
        spatial, lab_spatial = spatial_shape(image.shape, case["image"], label.ndim), spatial_shape(label.shape, case["label"], label.ndim)
        if spatial != lab_spatial:
            problems.append(f"{where}: label {case['label']} has shape {tuple(label.shape)} but image {case['image']} has spatial shape {spatial}")
        else:
            a, b = comparable_affines(img_affine, lab_affine)
            if not np.allclose(a, b, atol=AFFINE_TOL):
                problems.append(
                    f"{where}: label {case['label']} and image {case['image']} have different affines "
                    f"(max difference {np.abs(a - b).max():.4g})"
                )
    values = np.unique(np.asarray(label))
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        bad = values[~np.isfinite(values) | (values != np.round(values))][:5]
        problems.append(f"{where}: label {case['label']} holds non-integer values {bad.tolist()}")
        return
    values = values.astype(np.int64)
    label_map = ds.label_maps.get(case["source"])
    if label_map is not None:
        unexplained = [int(v) for v in values if v != 0 and int(v) not in label_map]
        if unexplained:
            problems.append(
                f"{where}: label {case['label']} holds value(s) {unexplained} that the label map of source "
                f"{case['source']!r} does not list ({sorted(label_map)})"
            )
        mapped = set()
        for v in values:
            t = label_map.get(int(v), 0 if v == 0 else None)
            if isinstance(t, tuple):
                mapped.update(t)
            elif t is not None:
                mapped.add(t)
        summary.values.update(mapped)
    else:
        unexplained = [int(v) for v in values if not 0 <= v < ds.num_classes]
        if unexplained:
            problems.append(
                f"{where}: label {case['label']} holds value(s) {unexplained} that no class explains "
                f"(classes are 0..{ds.num_classes - 1}: {ds.classes})"
            )
        summary.values.update(int(v) for v in values)


def validate_dataset(
    dataset: PartialDataset | str | os.PathLike, splits: Sequence[str] = SPLITS, progress: bool = False
) -> ValidationReport:
    """Check every case of a dataset against its files.

    Finds: missing or unreadable images and labels, non-finite images, label and image grids
    that differ (spatial shape, or affine beyond 1e-3), and label values that no class or
    label map explains. Description-level problems (an ``annotated`` class that is not in
    ``classes``) are already caught by :func:`partialseg.data.load_dataset`.

    Args:
        dataset: a loaded dataset, or a folder / ``dataset.json`` path.
        splits: which splits to check.
        progress: show a progress bar.

    Returns:
        a :class:`ValidationReport`; call ``raise_if_invalid()`` to turn problems into an error.
    """
    ds = dataset if isinstance(dataset, PartialDataset) else load_dataset(dataset)
    problems: list[str] = []
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for split in splits:
        cases = ds.splits.get(split, [])
        if not cases:
            continue
        per_source: dict[str, _SourceSummary] = defaultdict(_SourceSummary)
        iterator = cases
        if progress:
            from tqdm import tqdm

            iterator = tqdm(cases, desc=f"checking {split}", unit="case")
        for case in iterator:
            _check_case(case, ds, split, per_source[case["source"]], problems)
        summary[split] = {
            src: {
                "cases": s.cases,
                "labelled": s.labelled,
                "annotated": dict(s.annotated),
                "label_values": sorted(s.values),
                "spacings": sorted(s.spacings),
                "shapes": sorted(s.shapes),
                "modalities": sorted(s.modalities),
            }
            for src, s in per_source.items()
        }
    return ValidationReport(dataset=ds, problems=problems, summary=summary)
