"""Which file is a case's prediction, reading labels, and checking that predictions belong together.

- :func:`find_prediction`: the accepted names of a case's prediction in a folder.
- :func:`load_cases`, :func:`load_label`, :func:`check_same_grid`: a split's references, a label
  file as an array with its affine and spacing, the prediction-on-reference-grid check.
- :func:`check_one_run`: the run records (:mod:`partialseg.transforms.io.record`) of the
  predictions to score come from one inference run, or the folder is refused.

numpy, MONAI and the transforms are imported inside the functions (``partialseg --help`` stays fast).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from partialseg.data.spec import IMAGE_SUFFIXES, case_name

__all__ = [
    "SAVE_POSTFIXES", "AFFINE_ATOL", "find_prediction", "load_cases", "load_label", "check_same_grid", "check_one_run",
]

#: ``SaveImage`` postfixes accepted in prediction names: bundles' "seg", and MONAI's default "trans"
SAVE_POSTFIXES = ("seg", "trans")
#: largest allowed difference between a prediction's and its reference's affine entries
AFFINE_ATOL = 1e-3


def load_cases(dataset_dir: Path, split: str) -> tuple[list[str], list[dict]]:
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


def load_label(loader: Any, path: str | os.PathLike, what: str, case: str, label_map: Mapping | None = None):
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


def check_same_grid(case: str, pred_path, pred_shape, pred_affine, ref_path, ref_shape, ref_affine) -> None:
    """Checks that a prediction lies on its reference's grid: same shape, affines within ``AFFINE_ATOL``.

    Raises:
        ValueError: naming the case and both files.
    """
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



def _describe(path: Path, record: Mapping | None) -> str:
    if record is None:
        return f"{path} (no partialseg run record: written by another tool or an older partialseg)"
    sha = record.get("model_sha256")
    model = f", model {record.get('model') or 'checkpoint'} sha256:{sha[:12]}" if sha else ""
    return f"{path} (run {record['partialseg_run']}{model})"


def check_one_run(
    pred_dir: str | os.PathLike, paths: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]
) -> dict | None:
    """The run record shared by every prediction in ``paths``; refuses predictions of several runs.

    A run record (run id, SHA-256 of the model file) is what :class:`partialseg.transforms.SavePredictiond`
    writes into each prediction's NIfTI header (:mod:`partialseg.transforms.io.record`). When some
    predictions were written by one inference run and others by another (a rerun with another
    model stopped part way, leaving the older run's files beside the new ones), their scores would
    be a mixture of two models: the folder is refused. Files without a record (other tools) count
    as one more source: a folder of such files alone is accepted, mixed with recorded ones it is not.

    Args:
        pred_dir: the prediction folder (for the message).
        paths: the prediction files that will be scored, or case name -> file (errors then
            name the case).

    Returns:
        The common record (``partialseg_run``, ``model_sha256``, ``model``), or ``None`` when no
        file has one.

    Raises:
        ValueError: naming the folder, two files from different runs, and the fix (a fresh
            output folder per inference run); also naming a file whose NIfTI header cannot be read.

    Example:
        >>> import tempfile
        >>> check_one_run(tempfile.mkdtemp(), []) is None
        True
    """
    from partialseg.transforms.io.record import read_run_record

    items = paths.items() if isinstance(paths, Mapping) else [(None, p) for p in paths]
    groups: dict[str | None, tuple[Path, dict | None]] = {}  # run id -> (first file, record)
    for case, path in items:
        try:
            record = read_run_record(path)
        except ValueError as e:
            raise ValueError(f"case {case!r}: the prediction {e}" if case is not None else str(e)) from e
        run = None if record is None else record["partialseg_run"]
        groups.setdefault(run, (Path(path), record))
    if len(groups) <= 1:
        return next(iter(groups.values()))[1] if groups else None
    (a, rec_a), (b, rec_b) = list(groups.values())[:2]
    more = f" (and {len(groups) - 2} more)" if len(groups) > 2 else ""
    raise ValueError(
        f"the prediction folder {pred_dir} mixes the outputs of {len(groups)} inference runs{more}: "
        f"{_describe(a, rec_a)} and {_describe(b, rec_b)}; scores over them would mix two models or a "
        "stopped run with an older one. Run inference into a fresh (empty) output folder and evaluate that "
        "folder (bundles: --output_dir NEW_FOLDER, or delete eval/pred first)."
    )
