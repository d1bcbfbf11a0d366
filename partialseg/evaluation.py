"""Evaluation of segmentation predictions against a dataset's reference labels.

``partialseg evaluate --pred DIR --dataset DIR`` pairs every labelled case of a dataset split
with a prediction file, computes per case and class Dice, HD95 and ASSD with MONAI's metrics
(HD95 and ASSD in mm, from the reference's voxel spacing), and writes ``metrics.csv``,
``summary.json`` and ``boxplot.png``. When the split's entries carry a ``phase`` (ACDC's
``"ED"`` / ``"ES"``), the statistics are also given per phase (``summary["per_phase"]``).
See ``docs/evaluation.md``.

Conventions when a class is empty (no NaN or inf ever reaches the outputs):

============  ====  ======================  ======================  ==============
prediction    ref   Dice                    HD95                    ASSD
============  ====  ======================  ======================  ==============
empty         empty 1.0                     0.0                     0.0  (``both_empty``)
empty         some  0.0                     image diagonal (mm)     diagonal (``pred_empty``)
some          empty 0.0                     image diagonal (mm)     diagonal (``ref_empty``)
============  ====  ======================  ======================  ==============

The image diagonal is the distance between the centres of two opposite corner voxels,
``sqrt(sum(((n_i - 1) * s_i) ** 2))``, the largest distance possible on the grid.

Only ``argparse`` and the standard library are imported at module level, so that
``partialseg --help`` stays fast; numpy, torch and MONAI are imported inside functions.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import secrets
import stat
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from partialseg.data.spec import IMAGE_SUFFIXES, case_name

__all__ = [
    "METRICS",
    "STATUSES",
    "image_diagonal",
    "evaluate_case",
    "find_prediction",
    "evaluate_folder",
    "summarize",
    "phase_of",
    "format_table",
    "add_arguments",
    "run",
]

#: metric names, in the order of the CSV columns and the box plot's panels
METRICS = ("dice", "hd95", "assd")
#: per class status: both masks non-empty, both empty, only the prediction empty, only the reference empty
STATUSES = ("ok", "both_empty", "pred_empty", "ref_empty")
#: ``SaveImage`` postfixes accepted in prediction names: bundles' "seg", and MONAI's default "trans"
SAVE_POSTFIXES = ("seg", "trans")
#: largest allowed difference between a prediction's and its reference's affine entries
AFFINE_ATOL = 1e-3

#: ``summary["per_phase"]`` key of the cases without a ``phase`` when other cases have one
NO_PHASE = "(none)"

_UNITS = {"dice": "", "hd95": "mm", "assd": "mm"}


# --------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Distance between the centres of two opposite corner voxels of a grid.

    This is the largest distance possible between two voxels of the grid, the value given to
    HD95 and ASSD when exactly one of the prediction and the reference is empty.

    Args:
        shape: spatial shape ``(H, W[, D])``.
        spacing: voxel size along each axis (mm); ``None`` means 1 along every axis.

    Returns:
        ``sqrt(sum(((n_i - 1) * s_i) ** 2))``.

    Raises:
        ValueError: when ``spacing`` does not have one entry per axis.

    Example:
        >>> image_diagonal((4, 5))
        5.0
        >>> image_diagonal((4, 5), spacing=(2.0, 1.0))
        7.211102550927978
    """
    spacing = [1.0] * len(shape) if spacing is None else [float(s) for s in spacing]
    if len(spacing) != len(shape):
        raise ValueError(f"spacing {tuple(spacing)} must have one entry per axis of shape {tuple(shape)}.")
    return math.sqrt(sum(((int(n) - 1) * s) ** 2 for n, s in zip(shape, spacing)))


def _where(case: str | None) -> str:
    return f"case {case!r}: " if case else ""


def _as_label_array(arr: Any, name: str, case: str | None, num_classes: int):
    """Converts a label map (numpy array or tensor) to an int64 numpy array and validates it."""
    import numpy as np

    if hasattr(arr, "detach"):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{_where(case)}{name} must be a 2D or 3D label map of class indices, got shape {arr.shape}."
        )
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{_where(case)}{name} holds NaN or infinite values.")
        if not np.array_equal(arr, np.round(arr)):
            bad = arr[arr != np.round(arr)].flat[0]
            raise ValueError(f"{_where(case)}{name} holds the non-integer value {bad}; expected class indices.")
        arr = np.round(arr).astype(np.int64)
    else:
        arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise ValueError(
            f"{_where(case)}{name} holds the value {bad}, outside the class indices 0..{num_classes - 1}."
        )
    return arr


def evaluate_case(
    pred: Any,
    ref: Any,
    classes: Sequence[str] | int,
    spacing: Sequence[float] | None = None,
    include_background: bool = False,
    class_indices: Sequence[int] | None = None,
    case: str | None = None,
) -> list[dict]:
    """Dice, HD95 and ASSD of one predicted label map against its reference, per class.

    Distances use MONAI's ``compute_hausdorff_distance(percentile=95)`` and
    ``compute_average_surface_distance(symmetric=True)`` on the masks' edges (the voxels that a
    binary erosion removes), Euclidean, scaled by ``spacing``; Dice uses ``compute_dice``.
    Empty classes get the values of the module's table (``both_empty``: 1, 0, 0; ``pred_empty``
    and ``ref_empty``: 0 and the image diagonal), never NaN or inf.

    Args:
        pred: predicted label map of class indices, shape ``(H, W)`` or ``(H, W, D)`` (numpy
            array or tensor, integer or integer-valued float).
        ref: reference label map, same shape as ``pred``.
        classes: class names (index 0 = background) or the number of classes; with a number the
            names are the indices as strings.
        spacing: voxel size per axis (mm); ``None`` means 1.
        include_background: evaluate class 0 too.
        class_indices: evaluate only these class indices (default: all, class 0 only with
            ``include_background``).
        case: case name used in error messages.

    Returns:
        One dict per evaluated class, in index order, with keys ``class`` (name), ``class_index``,
        ``dice``, ``hd95``, ``assd`` (floats), ``pred_voxels``, ``ref_voxels`` (ints) and
        ``status`` (one of ``STATUSES``).

    Raises:
        ValueError: for shapes that differ or are not 2D/3D, values that are not class indices,
            a wrong ``spacing`` length, or unknown ``class_indices``.

    Example:
        >>> import numpy as np
        >>> ref = np.zeros((8, 8), dtype=int); ref[2:6, 2:6] = 1
        >>> pred = np.zeros((8, 8), dtype=int); pred[2:6, 3:7] = 1
        >>> row = evaluate_case(pred, ref, ["background", "square"])[0]
        >>> row["class"], row["dice"], row["hd95"], row["assd"], row["status"]
        ('square', 0.75, 1.0, 0.5, 'ok')
    """
    import numpy as np
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    if isinstance(classes, int):
        if classes < 1:
            raise ValueError(f"{_where(case)}the number of classes must be at least 1, got {classes}.")
        names = [str(i) for i in range(classes)]
    else:
        names = [str(c) for c in classes]
        if not names:
            raise ValueError(f"{_where(case)}classes must name at least one class, got an empty list.")
    num_classes = len(names)
    pred = _as_label_array(pred, "the prediction", case, num_classes)
    ref = _as_label_array(ref, "the reference", case, num_classes)
    if pred.shape != ref.shape:
        raise ValueError(f"{_where(case)}prediction shape {pred.shape} differs from reference shape {ref.shape}.")
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != pred.ndim:
            raise ValueError(
                f"{_where(case)}spacing {spacing} must have one entry per spatial axis of shape {pred.shape}."
            )
        if not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"{_where(case)}spacing {spacing} must be positive and finite.")

    if class_indices is None:
        indices = list(range(0 if include_background else 1, num_classes))
    else:
        indices = sorted({int(i) for i in class_indices})
        bad = [i for i in indices if not 0 <= i < num_classes]
        if bad:
            raise ValueError(f"{_where(case)}class_indices {bad} are not in 0..{num_classes - 1}.")
        if not include_background:
            indices = [i for i in indices if i != 0]

    diagonal = image_diagonal(pred.shape, spacing)
    rows: list[dict] = []
    both: list[int] = []  # classes non-empty in prediction and reference: the MONAI metrics' job
    for i in indices:
        p_n, r_n = int(np.count_nonzero(pred == i)), int(np.count_nonzero(ref == i))
        row = {"class": names[i], "class_index": i, "pred_voxels": p_n, "ref_voxels": r_n}
        if p_n == 0 and r_n == 0:
            row.update(dice=1.0, hd95=0.0, assd=0.0, status="both_empty")
        elif p_n == 0 or r_n == 0:
            row.update(dice=0.0, hd95=diagonal, assd=diagonal, status="pred_empty" if p_n == 0 else "ref_empty")
        else:
            row["status"] = "ok"
            both.append(len(rows))
        rows.append(row)

    if both:
        sel = [rows[k]["class_index"] for k in both]
        # one-hot (1, K, *spatial) over the classes that both masks contain
        p1h = torch.from_numpy(np.stack([pred == i for i in sel])[None]).float()
        r1h = torch.from_numpy(np.stack([ref == i for i in sel])[None]).float()
        with warnings.catch_warnings():
            # MONAI 1.6 calls its own deprecated get_mask_edges(always_return_as_numpy=...) internally
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            dice = compute_dice(p1h, r1h, include_background=True, ignore_empty=False)[0]
            hd95 = compute_hausdorff_distance(p1h, r1h, include_background=True, percentile=95, spacing=spacing)[0]
            assd = compute_average_surface_distance(
                p1h, r1h, include_background=True, symmetric=True, spacing=spacing
            )[0]
        for j, k in enumerate(both):
            values = {"dice": float(dice[j]), "hd95": float(hd95[j]), "assd": float(assd[j])}
            for key, v in values.items():
                if not math.isfinite(v):
                    raise ValueError(
                        f"{_where(case)}MONAI returned {key}={v} for class {rows[k]['class']!r}, whose "
                        "prediction and reference are both non-empty."
                    )
            rows[k].update(values)
    order = ("class", "class_index", *METRICS, "pred_voxels", "ref_voxels", "status")
    return [{key: row[key] for key in order} for row in rows]


# --------------------------------------------------------------------------------------------
# dataset and prediction files
# --------------------------------------------------------------------------------------------


def _load_cases(dataset_dir: Path, split: str) -> tuple[list[str], list[dict]]:
    """Class names and datalist of a split, read with :func:`partialseg.data.load_dataset`.

    Raises:
        ValueError: the dataset has no such split (``DatasetError``, a ``ValueError``, for a
            malformed description).
    """
    from partialseg.data import load_dataset

    ds = load_dataset(dataset_dir)
    if split not in ds.splits:
        raise ValueError(f"the dataset {dataset_dir} has no split {split!r} (splits: {sorted(ds.splits)}).")
    return [str(c) for c in ds.classes], ds.datalist(split)


def find_prediction(pred_dir: str | os.PathLike, image: str | os.PathLike, case: str | None = None) -> Path | None:
    """Finds the prediction file of a case.

    With ``NAME`` the image file name without its extension (``imagesTs/case_001.nii.gz`` ->
    ``case_001``) and also the case name when it differs, the accepted names are, in
    ``pred_dir``: the image's file name itself, ``NAME`` + any extension of ``IMAGE_SUFFIXES``,
    ``NAME_seg`` + extension and ``NAME/NAME_seg`` + extension (MONAI ``SaveImage`` with the
    bundles' ``output_postfix="seg"``, without and with its default per-case folder), and the
    same with ``_trans`` (``SaveImage``'s default postfix). The extension may also be written in
    upper case (``case_001.NII.GZ``); mixed case (``.Nii.Gz``) is not looked for, as nibabel
    cannot open such a name.

    Args:
        pred_dir: folder of predictions.
        image: the case's image path.
        case: the case's name, when it is not the image's file name.

    Returns:
        The one matching file, or ``None`` when nothing matches.

    Raises:
        ValueError: when more than one file matches (the message names the case and the files).
    """
    pred_dir = Path(pred_dir)
    image_name = Path(image).name
    stems = [case_name(image_name)]
    if case and case not in stems:
        stems.append(str(case))
    candidates = [pred_dir / image_name]
    for stem in stems:
        for suffix in [e for ext in IMAGE_SUFFIXES for e in (ext, ext.upper())]:
            candidates.append(pred_dir / f"{stem}{suffix}")
            for postfix in SAVE_POSTFIXES:
                candidates += [pred_dir / f"{stem}_{postfix}{suffix}", pred_dir / stem / f"{stem}_{postfix}{suffix}"]
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()  # one file reached by two names (a case-insensitive file system)
    for c in candidates:
        try:
            st = c.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            found.append(c)
    if len(found) > 1:
        raise ValueError(
            f"case {case or stems[0]!r}: several prediction files match in {pred_dir}: "
            f"{[str(p.relative_to(pred_dir)) for p in found]}; keep one."
        )
    return found[0] if found else None


def _load_label(loader: Any, path: str | os.PathLike, what: str, case: str, label_map: Mapping | None = None):
    """Loads a label map as (array (spatial), affine numpy (4, 4), spacing tuple).

    Trailing size-1 dimensions beyond the second are dropped, so a slice saved as ``(H, W, 1)``
    and one saved as ``(H, W)`` are the same grid.

    ``label_map`` (a datalist entry's source value -> class index map) is applied with
    :class:`partialseg.transforms.RemapLabels`, as training does.
    """
    import numpy as np

    try:
        img = loader(str(path))
    except Exception as e:  # noqa: BLE001 - reader errors vary by backend; re-raised with the case
        raise ValueError(f"case {case!r}: cannot read the {what} {path}: {e}") from e
    if img.shape[0] != 1:
        raise ValueError(
            f"case {case!r}: the {what} {path} has {img.shape[0]} channels; expected one label map "
            "of class indices (argmax one-hot predictions before saving)."
        )
    # a 2D slice saved as (H, W, 1) is compared as (H, W): a 2D bundle writes its prediction so
    from partialseg.transforms.io import squeeze_trailing_singletons

    img = squeeze_trailing_singletons(img, 2)
    arr = img
    if label_map:
        from partialseg.transforms import RemapLabels

        try:
            arr = RemapLabels(label_map)(img)
        except ValueError as e:
            raise ValueError(f"case {case!r}: the {what} {path}: {e}") from e
    arr = arr[0]
    nd = arr.ndim
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:-1, :nd], axis=0))
    arr = arr.detach().cpu().numpy() if hasattr(arr, "detach") else np.asarray(arr)
    return arr, affine, spacing


def _check_same_grid(case: str, pred_path, pred_shape, pred_affine, ref_path, ref_shape, ref_affine) -> None:
    import numpy as np

    if tuple(pred_shape) != tuple(ref_shape):
        raise ValueError(
            f"case {case!r}: the prediction {pred_path} has shape {tuple(pred_shape)}, the reference "
            f"{ref_path} has shape {tuple(ref_shape)}; predictions must be on the reference grid."
        )
    from partialseg.data.validation import comparable_affines

    if pred_affine.shape != ref_affine.shape and pred_affine.shape[0] > 2 and ref_affine.shape[0] > 2:
        pred_affine, ref_affine = comparable_affines(np.asarray(pred_affine), np.asarray(ref_affine))  # 2D NRRD/PNG vs NIfTI
    if pred_affine.shape != ref_affine.shape or not np.allclose(pred_affine, ref_affine, atol=AFFINE_ATOL, rtol=0):
        raise ValueError(
            f"case {case!r}: the prediction {pred_path} and the reference {ref_path} have different affines "
            f"(beyond {AFFINE_ATOL}):\n{np.round(pred_affine, 4)}\nvs\n{np.round(ref_affine, 4)}"
        )


# --------------------------------------------------------------------------------------------
# aggregation and outputs
# --------------------------------------------------------------------------------------------


def phase_of(row: Mapping) -> str | None:
    """The phase of a row or dataset entry: its ``phase`` value as a string, ``None`` without one.

    A missing key, ``None`` and ``""`` all mean "no phase".

    Example:
        >>> phase_of({"phase": "ED"}), phase_of({"phase": ""}), phase_of({})
        ('ED', None, None)
    """
    phase = row.get("phase")
    return None if phase is None or phase == "" else str(phase)


def summarize(rows: Sequence[Mapping], class_names: Sequence[str]) -> dict:
    """Aggregates per case and class rows into per class statistics and an overall mean.

    Args:
        rows: dicts as returned by :func:`evaluate_case`, each with a ``case`` key added, and
            optionally a ``phase`` key (see :func:`phase_of`).
        class_names: the evaluated classes, in the order of the summary.

    Returns:
        ``{"per_class": {name: {"n", "status": {status: count}, metric: {"mean", "std",
        "median"}}}, "overall": {metric: mean over classes of the class means},
        "status_counts": {status: count}}``. ``std`` is the population standard deviation
        (``ddof=0``). A class with no rows has ``n = 0`` and no statistics, and is left out of
        ``overall``. When at least one row has a phase, also ``"per_phase": {phase: the same
        three keys over that phase's rows}``, phases in sorted order, the rows without a phase
        last under ``NO_PHASE`` (``"(none)"``); without any phase there is no ``per_phase`` key.

    Example:
        >>> rows = [{"class": "a", "dice": 1.0, "hd95": 0.0, "assd": 0.0, "status": "ok"},
        ...         {"class": "a", "dice": 0.5, "hd95": 2.0, "assd": 1.0, "status": "ok"}]
        >>> s = summarize(rows, ["a"])
        >>> s["per_class"]["a"]["dice"], s["overall"]["hd95"], "per_phase" in s
        ({'mean': 0.75, 'std': 0.25, 'median': 0.75}, 1.0, False)
        >>> rows[0]["phase"], rows[1]["phase"] = "ES", "ED"
        >>> s = summarize(rows, ["a"])
        >>> {p: e["per_class"]["a"]["dice"]["mean"] for p, e in s["per_phase"].items()}
        {'ED': 0.5, 'ES': 1.0}
    """
    summary = _summarize(rows, class_names)
    phases = {phase_of(r) for r in rows}
    if phases - {None}:
        groups = sorted(phases - {None}) + ([None] if None in phases else [])
        summary["per_phase"] = {
            NO_PHASE if p is None else p: _summarize([r for r in rows if phase_of(r) == p], class_names)
            for p in groups
        }
    return summary


def _summarize(rows: Sequence[Mapping], class_names: Sequence[str]) -> dict:
    import numpy as np

    per_class: dict[str, dict] = {}
    for name in class_names:
        sel = [r for r in rows if r["class"] == name]
        entry: dict[str, Any] = {"n": len(sel), "status": {s: sum(r["status"] == s for r in sel) for s in STATUSES}}
        if sel:
            for m in METRICS:
                v = np.asarray([r[m] for r in sel], dtype=np.float64)
                entry[m] = {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}
        per_class[name] = entry
    measured = [e for e in per_class.values() if e["n"]]
    overall = {m: float(np.mean([e[m]["mean"] for e in measured])) for m in METRICS} if measured else {}
    status_counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    return {"per_class": per_class, "overall": overall, "status_counts": status_counts}


def _write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    # "phase" last, so that readers by column position keep working; empty without a phase
    fields = ["case", "class", "class_index", *METRICS, "pred_voxels", "ref_voxels", "status", "phase"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            r = {**r, "phase": phase_of(r) or ""}
            # MONAI computes in float32: 7 significant digits carry all of it
            writer.writerow({k: (format(r[k], ".7g") if isinstance(r[k], float) else r[k]) for k in fields})


def _write_boxplot(path: Path, rows: Sequence[Mapping], class_names: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one box per class; with phases, one per phase and class ("ED LV", ..., "ES LV", ...)
    present = {phase_of(r) for r in rows}
    by_phase = bool(present - {None})
    phases = sorted(present - {None}) + ([None] if None in present else []) if by_phase else [None]
    groups = []  # (tick label, rows)
    for p in phases:
        for n in class_names:
            sel = [r for r in rows if r["class"] == n and phase_of(r) == p]
            if sel:
                groups.append((f"{NO_PHASE if p is None else p} {n}" if by_phase else n, sel))
    names = [g[0] for g in groups]
    width = max(4.5, 0.45 * len(names) + 1.5) if by_phase else 4.5
    fig, axes = plt.subplots(1, len(METRICS), figsize=(width * len(METRICS), 4.0), squeeze=False)
    for ax, m in zip(axes[0], METRICS):
        data = [[r[m] for r in sel] for _, sel in groups]
        if data:
            ax.boxplot(data)
            ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
        ax.set_title(m.upper() if m != "dice" else "Dice")
        ax.set_ylabel(f"{m} ({_UNITS[m]})" if _UNITS[m] else m)
        ax.grid(axis="y", alpha=0.3)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _check_outputs(out_dir: Path, paths: Any) -> None:
    """Fails, naming the path, when the outputs cannot be written in ``out_dir``.

    ``out_dir`` must be a folder or not exist yet (below an existing folder, not a file), and
    no output name in it may be taken by anything but a file, which is replaced.

    Raises:
        ValueError: the message names the path and says what to do.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the output folder {out_dir} is a file; give --out a folder (new or existing).")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot create the output folder {out_dir}: {existing} is a file; choose another --out.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {existing} (no write permission); choose another --out.")
    for path in paths:
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise ValueError(f"{path} exists and is not a file; remove it or choose another --out.")


def _write_outputs(outputs: Mapping[str, Path], rows: Sequence[Mapping], class_names: Sequence[str],
                   summary: Mapping) -> None:
    """Writes ``metrics.csv``, ``boxplot.png`` and ``summary.json``, all or (nearly) nothing.

    Each file is written under a temporary name in the output folder (``.NAME-<pid>-<random>.partial.EXT``);
    only when all three are complete are they renamed over the final names (``os.replace``,
    atomic per file). A failure before that leaves the folder as it was.

    Raises:
        OSError: naming the output path that could not be written.
    """
    out_dir = outputs["csv"].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temps = {k: p.with_name(f".{p.stem}-{token}.partial{p.suffix}") for k, p in outputs.items()}
    writers = {
        "csv": lambda path: _write_csv(path, rows),
        "boxplot": lambda path: _write_boxplot(path, rows, class_names),
        "summary": lambda path: _write_json(path, summary),
    }
    try:
        for key, write in writers.items():
            try:
                write(temps[key])
            except OSError as e:
                raise _os_error_at(e, outputs[key]) from e
        for key in writers:
            try:
                os.replace(temps[key], outputs[key])
            except OSError as e:
                raise _os_error_at(e, outputs[key]) from e
    finally:
        for path in temps.values():
            try:
                path.unlink()
            except OSError:
                pass


def _write_json(path: Path, obj: Mapping) -> None:
    with open(path, "x") as f:  # "x": a fresh file, created with the umask's mode
        json.dump(obj, f, indent=2, allow_nan=False)


def _os_error_at(e: OSError, path: Path) -> OSError:
    """The same error, naming the final output ``path`` instead of a temporary file."""
    if e.errno is None:
        return OSError(f"cannot write {path}: {e}")
    return OSError(e.errno, e.strerror or str(e), str(path))


def format_table(summary: Mapping) -> str:
    """Text table of a summary: class, n, Dice mean±std, HD95 and ASSD mean±std (mm).

    With ``summary["per_phase"]`` (see :func:`summarize`), the overall table is followed by one
    block per phase, its rows named ``"<phase> <class>"`` (``ED LV``) and ending with
    ``"<phase> mean over classes"``. Without it the output is the overall table alone.

    Example:
        >>> rows = [{"class": "a", "dice": 1.0, "hd95": 0.0, "assd": 0.0, "status": "ok", "phase": "ES"},
        ...         {"class": "a", "dice": 0.5, "hd95": 2.0, "assd": 1.0, "status": "ok", "phase": "ED"}]
        >>> print(format_table(summarize(rows, ["a"])))
        class                   n             Dice          HD95 (mm)          ASSD (mm)
        --------------------------------------------------------------------------------
        a                       2  0.7500 ± 0.2500        1.00 ± 1.00        0.50 ± 0.50
        --------------------------------------------------------------------------------
        mean over classes                   0.7500               1.00               0.50
        ================================================================================
        ED a                    1  0.5000 ± 0.0000        2.00 ± 0.00        1.00 ± 0.00
        ED mean over classes                0.5000               2.00               1.00
        --------------------------------------------------------------------------------
        ES a                    1  1.0000 ± 0.0000        0.00 ± 0.00        0.00 ± 0.00
        ES mean over classes                1.0000               0.00               0.00
    """
    per_phase = summary.get("per_phase") or {}
    width = 20  # the name column; wider only when a per phase name needs it
    if per_phase:
        names = [*summary["per_class"], "mean over classes"]
        width = max([width] + [len(f"{p} {n}") for p in per_phase for n in names])
    header = f"{'class':<{width}} {'n':>4}  {'Dice':>15}  {'HD95 (mm)':>17}  {'ASSD (mm)':>17}"
    rule = "-" * len(header)
    lines = [header, rule]

    def cell(e, m, digits):
        return f"{e[m]['mean']:.{digits}f} ± {e[m]['std']:.{digits}f}" if e["n"] else "-"

    def block(part, prefix=""):
        out = []
        for name, e in part["per_class"].items():
            out.append(f"{prefix + name:<{width}} {e['n']:>4}  {cell(e, 'dice', 4):>15}  "
                       f"{cell(e, 'hd95', 2):>17}  {cell(e, 'assd', 2):>17}")
        return out

    def mean_row(part, prefix=""):
        o = part["overall"]
        return (f"{prefix + 'mean over classes':<{width}} {'':>4}  {o['dice']:>15.4f}  {o['hd95']:>17.2f}  "
                f"{o['assd']:>17.2f}")

    lines += block(summary)
    if summary["overall"]:
        lines += [rule, mean_row(summary)]
    for k, (phase, part) in enumerate(per_phase.items()):
        lines.append("=" * len(header) if k == 0 else rule)
        lines += block(part, f"{phase} ")
        if part["overall"]:
            lines.append(mean_row(part, f"{phase} "))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# a folder of predictions
# --------------------------------------------------------------------------------------------


def evaluate_folder(
    pred_dir: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    classes: Sequence[str | int] | None = None,
    include_background: bool = False,
    allow_missing: bool = False,
    progress: bool = True,
    arguments: Mapping[str, Any] | None = None,
) -> dict:
    """Evaluates a folder of predictions against the references of a dataset split.

    Every case of ``split`` that has a ``label`` is paired with its prediction (see
    :func:`find_prediction` for the accepted names); cases without a label are skipped and
    listed in the summary. The prediction must lie on the reference's grid (same spatial shape,
    affine within ``AFFINE_ATOL``). HD95 and ASSD use the reference's voxel spacing (mm). The
    dataset is read with :func:`partialseg.data.load_dataset`; a reference whose source has a
    ``label_maps`` entry is remapped to global class indices first (``RemapLabels``), and a
    case that annotates only some classes is evaluated on those classes only.

    Args:
        pred_dir: folder of predicted label maps (class indices, one channel).
        dataset_dir: dataset folder holding ``dataset.json`` (``docs/data_format.md``).
        split: dataset split whose references are used.
        out_dir: where ``metrics.csv``, ``summary.json`` and ``boxplot.png`` go; default
            ``<pred_dir>/evaluation``.
        classes: evaluate only these classes (names or indices); default all classes but the
            background (which ``include_background`` adds).
        include_background: evaluate class 0 too.
        allow_missing: count a missing prediction as an empty one instead of raising.
        progress: show a tqdm progress bar over cases (on a terminal).
        arguments: recorded as ``summary["arguments"]`` (the CLI passes its arguments).

    Returns:
        The summary written to ``summary.json``: ``per_class``, ``overall``, ``status_counts``
        and, when a scored case's dataset entry has a ``phase``, ``per_phase`` (see
        :func:`summarize`), plus ``num_cases``, ``cases``, ``missing_predictions``,
        ``skipped_unlabelled``, ``classes``, ``units``, ``outputs`` and ``arguments``. The
        phase also fills the CSV's ``phase`` column and splits the box plot.

    Raises:
        ValueError: naming the case, for a missing prediction (unless ``allow_missing``),
            several matching predictions, a prediction not on the reference grid, or values that
            are not class indices; also for a dataset without the split, labelled cases, or an
            unknown class in ``classes``.
    """
    import numpy as np
    from monai.transforms import LoadImage
    from tqdm import tqdm

    pred_dir, dataset_dir = Path(pred_dir), Path(dataset_dir)
    if not pred_dir.is_dir():
        raise ValueError(f"the prediction folder {pred_dir} does not exist.")
    out_dir = pred_dir / "evaluation" if out_dir is None else Path(out_dir)
    outputs = {"csv": out_dir / "metrics.csv", "summary": out_dir / "summary.json", "boxplot": out_dir / "boxplot.png"}
    _check_outputs(out_dir, outputs.values())  # before any work: a bad --out fails at once
    names, cases = _load_cases(dataset_dir, split)

    if classes is None:
        selected = list(range(0 if include_background else 1, len(names)))
    else:
        selected = []
        for c in classes:
            if isinstance(c, int) or (isinstance(c, str) and c.isdigit() and c not in names):
                i = int(c)
                if not 0 <= i < len(names):
                    raise ValueError(f"class index {i} is not in 0..{len(names) - 1} (classes: {names}).")
            elif c in names:
                i = names.index(c)
            else:
                raise ValueError(f"unknown class {c!r}; the dataset's classes are {names}.")
            if i == 0 and not include_background:
                raise ValueError(f"class {names[0]!r} is the background; add include_background to evaluate it.")
            if i not in selected:
                selected.append(i)
        selected.sort()
    if not selected:
        raise ValueError(f"no class to evaluate (classes: {names}, include_background={include_background}).")

    labelled = [c for c in cases if c.get("label")]
    skipped = [str(c["case"]) for c in cases if not c.get("label")]
    if not labelled:
        raise ValueError(f"split {split!r} of {dataset_dir} has no case with a reference label.")

    # pair every case with its prediction first, so a missing file fails before any work
    pairs = []
    missing: list[str] = []
    for entry in labelled:
        case = str(entry["case"])
        pred_path = find_prediction(pred_dir, entry["image"], case)
        if pred_path is None:
            if not allow_missing:
                raise ValueError(
                    f"case {case!r}: no prediction in {pred_dir} (looked for {Path(entry['image']).name}, "
                    f"{case_name(Path(entry['image']).name)}[_seg|_trans].<ext> and <name>/<name>_seg.<ext>); "
                    "use --allow-missing to count it as empty."
                )
            missing.append(case)
        pairs.append((entry, case, pred_path))

    loader = LoadImage(image_only=True, ensure_channel_first=True)
    rows: list[dict] = []
    for entry, case, pred_path in tqdm(pairs, desc="evaluate", unit="case", disable=None if progress else True):
        ref, ref_affine, spacing = _load_label(loader, entry["label"], "reference", case, entry.get("label_map"))
        if pred_path is None:
            pred = np.zeros(ref.shape, dtype=np.int64)
        else:
            pred, pred_affine, _ = _load_label(loader, pred_path, "prediction", case)
            _check_same_grid(case, pred_path, pred.shape, pred_affine, entry["label"], ref.shape, ref_affine)
        # load_dataset gives the annotated classes as sorted indices ("all" expanded)
        annotated = entry.get("annotated")
        phase = phase_of(entry)  # ACDC's "ED" / "ES"; None for datasets without phases
        case_classes = selected if annotated is None else [i for i in selected if i in set(annotated)]
        if not case_classes:
            continue
        # checked here too, not only in evaluate_case, so that a value that is no class index names its file
        if pred_path is not None:
            pred = _as_label_array(pred, f"the prediction {pred_path}", case, len(names))
        ref = _as_label_array(ref, f"the reference {entry['label']}", case, len(names))
        for row in evaluate_case(pred, ref, names, spacing=spacing, include_background=include_background,
                                 class_indices=case_classes, case=case):
            rows.append({"case": case, **row})
            if phase is not None:
                rows[-1]["phase"] = phase

    class_names = [names[i] for i in selected]
    summary = summarize(rows, class_names)
    summary.update(
        num_cases=len(pairs),
        cases=[case for _, case, _ in pairs],
        missing_predictions=missing,
        skipped_unlabelled=skipped,
        classes=class_names,
        units=dict(_UNITS),
        outputs={k: str(v) for k, v in outputs.items()},
        arguments=dict(arguments) if arguments is not None else {
            "pred": str(pred_dir), "dataset": str(dataset_dir), "split": split, "out": str(out_dir),
            "classes": list(classes) if classes is not None else None,
            "include_background": include_background, "allow_missing": allow_missing,
        },
    )
    _write_outputs(outputs, rows, class_names, summary)
    return summary


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``partialseg evaluate`` arguments to ``parser``."""
    parser.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label maps")
    parser.add_argument("--dataset", required=True, metavar="DIR", help="dataset folder with dataset.json")
    parser.add_argument("--split", default="test", help="dataset split holding the references (default: test)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <pred>/evaluation)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                        help="evaluate only these classes (names or indices; default: all but background)")
    parser.add_argument("--include-background", action="store_true", help="evaluate class 0 too")
    parser.add_argument("--allow-missing", action="store_true",
                        help="count a missing prediction as empty instead of stopping with an error")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs ``partialseg evaluate``: writes the outputs and prints the per class table.

    Returns:
        0 on success; 2 when the evaluation cannot be done (a missing or mismatched prediction,
        a bad dataset, an output folder that cannot be written, ...), after printing a one-line
        ``error: ...`` to stderr, which names the case or the path.
    """
    import sys

    arguments = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    try:
        summary = evaluate_folder(
            pred_dir=args.pred,
            dataset_dir=args.dataset,
            split=args.split,
            out_dir=args.out,
            classes=args.classes,
            include_background=args.include_background,
            allow_missing=args.allow_missing,
            progress=not getattr(args, "no_progress", False),
            arguments=arguments,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an output that cannot be written: one line naming the path
        reason = e.strerror or str(e)
        print(f"error: {e.filename}: {reason}" if e.filename else f"error: {reason}", file=sys.stderr)
        return 2
    print(format_table(summary))
    counts = summary["status_counts"]
    print(f"{summary['num_cases']} cases; empty: {counts['both_empty']} both, {counts['pred_empty']} prediction only, "
          f"{counts['ref_empty']} reference only; missing predictions: {len(summary['missing_predictions'])}")
    print(f"wrote {', '.join(summary['outputs'].values())}")
    return 0
