"""Per case and class Dice, Jaccard and surface distances of a predicted label map against its reference.

The metrics (:data:`METRICS`), all from MONAI:

- ``dice``, ``jaccard``: region overlap (``compute_dice``, ``compute_iou`` = MONAI's ``MeanIoU``);
- ``hd95``, ``assd``: 95th-percentile Hausdorff distance and average *symmetric* surface
  distance, in mm (the reference's spacing);
- ``hd95_vox``, ``asd_vox``: the DTML paper's "95HD [voxel]" and "ASD [voxel]": the same HD95
  on the voxel grid (spacing 1), and the *one-directional* average surface distance from the
  prediction's surface to the reference's (the mean over prediction edge voxels of the distance
  to the nearest reference edge voxel, in voxels; MONAI ``symmetric=False``, medpy's ``asd``).

Conventions when a class is empty (no NaN or inf ever reaches the outputs):

============  ====  ================  ===================================  ==============
prediction    ref   Dice, Jaccard     HD95, ASSD / HD95, ASD in voxels     status
============  ====  ================  ===================================  ==============
empty         empty 1.0               0.0                                  ``both_empty``
empty         some  0.0               image diagonal (mm / voxels)         ``pred_empty``
some          empty 0.0               image diagonal (mm / voxels)         ``ref_empty``
============  ====  ================  ===================================  ==============

The image diagonal is the distance between the centres of two opposite corner voxels,
``sqrt(sum(((n_i - 1) * s_i) ** 2))``, the largest distance possible on the grid (with
``s_i = 1`` for the voxel figures).

numpy, torch and MONAI are imported inside the functions (``partialseg --help`` stays fast).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

from partialseg._checks import check_int

__all__ = ["METRICS", "STATUSES", "UNITS", "VOXEL_METRICS", "image_diagonal", "as_label_array", "evaluate_case"]

#: metric names, in the order of the rows' keys, the summary, the table and the box plot's panels
METRICS = ("dice", "jaccard", "hd95", "assd", "hd95_vox", "asd_vox")
#: per class status: both masks non-empty, both empty, only the prediction empty, only the reference empty
STATUSES = ("ok", "both_empty", "pred_empty", "ref_empty")
#: unit of each metric (distances in the reference's units: mm for NIfTI; ``voxel``: on the voxel grid)
UNITS = {"dice": "", "jaccard": "", "hd95": "mm", "assd": "mm", "hd95_vox": "voxel", "asd_vox": "voxel"}
#: the distance metrics measured on the voxel grid (spacing 1), whatever the reference's spacing
VOXEL_METRICS = ("hd95_vox", "asd_vox")


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


def as_label_array(arr: Any, name: str, case: str | None, num_classes: int):
    """A label map (numpy array or tensor) as an int64 numpy array of class indices, checked.

    Args:
        arr: label map, shape ``(H, W)`` or ``(H, W, D)``; bool, integer or integer-valued float.
        name: what it is, for error messages (``"the prediction preds/c1.nii.gz"``).
        case: case name for error messages, or ``None``.
        num_classes: values must lie in ``0..num_classes - 1``.

    Raises:
        ValueError: naming the case and ``name``, for another dimensionality, NaN or infinite
            values, non-integer values or values outside the class indices.

    Example:
        >>> as_label_array([[0, 1.0], [2, 0]], "the prediction", "c1", 3).dtype
        dtype('int64')
        >>> as_label_array([[0, 3]], "the prediction", "c1", 3)
        Traceback (most recent call last):
        ...
        ValueError: case 'c1': the prediction holds the value 3, outside the class indices 0..2.
    """
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


def _surface_distances(pred, ref, spacing):
    """Both directed edge distance sets of two non-empty masks ``(*spatial)``, MONAI's way.

    ``(prediction edges -> nearest reference edge, reference edges -> nearest prediction edge)``
    from ``monai.metrics.utils.get_edge_surface_distance``, the function behind MONAI's
    ``compute_hausdorff_distance`` and ``compute_average_surface_distance``: computed once per
    grid, then reduced to HD95, ASSD and the one-directional ASD (the tests check that the
    values equal those of the two MONAI metrics).
    """
    from monai.metrics.utils import get_edge_surface_distance

    _, distances, _ = get_edge_surface_distance(pred, ref, distance_metric="euclidean", spacing=spacing, symmetric=True)
    return distances


def _hd95(pred_to_ref, ref_to_pred):
    """MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger directed 95th percentile."""
    import torch

    return torch.maximum(torch.quantile(pred_to_ref, 0.95), torch.quantile(ref_to_pred, 0.95))


def evaluate_case(
    pred: Any,
    ref: Any,
    classes: Sequence[str] | int,
    spacing: Sequence[float] | None = None,
    include_background: bool = False,
    class_indices: Sequence[int] | None = None,
    case: str | None = None,
) -> list[dict]:
    """Dice, Jaccard, HD95, ASSD (mm) and HD95, ASD (voxels) of one predicted label map, per class.

    Region metrics use MONAI's ``compute_dice`` and ``compute_iou`` (the functional form of
    ``MeanIoU``). Distances are MONAI's ``compute_hausdorff_distance(percentile=95)`` and
    ``compute_average_surface_distance`` on the masks' edges (the voxels that a binary erosion
    removes), Euclidean: ``hd95`` and ``assd`` (``symmetric=True``) scaled by ``spacing``;
    ``hd95_vox`` (the same HD95) and ``asd_vox`` (``symmetric=False``: from the prediction's
    edges to the reference's only) with spacing 1, the voxel figures of the DTML paper. Both
    MONAI metrics reduce the directed edge distances of MONAI's ``get_edge_surface_distance``;
    these are computed once per grid (mm, voxels) and reduced here the same way.
    Empty classes get the values of the module's table (``both_empty``: 1, 1, 0, 0, 0, 0;
    ``pred_empty`` and ``ref_empty``: 0, 0 and the image diagonal in mm or voxels), never NaN
    or inf.

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
        the :data:`METRICS` ``dice``, ``jaccard``, ``hd95``, ``assd``, ``hd95_vox``, ``asd_vox``
        (floats), ``pred_voxels``, ``ref_voxels``, ``overlap_voxels`` (ints: the class's voxels in
        the prediction, in the reference, in both) and ``status`` (one of ``STATUSES``).

    Raises:
        ValueError: for shapes that differ or are not 2D/3D, values that are not class indices,
            a wrong ``spacing`` length, or unknown ``class_indices``.

    Example:
        >>> import numpy as np
        >>> ref = np.zeros((8, 8), dtype=int); ref[2:6, 2:6] = 1
        >>> pred = np.zeros((8, 8), dtype=int); pred[2:6, 3:7] = 1
        >>> row = evaluate_case(pred, ref, ["background", "square"], spacing=(1.0, 2.0))[0]
        >>> row["class"], row["dice"], round(row["jaccard"], 6), row["status"]  # MONAI computes in float32
        ('square', 0.75, 0.6, 'ok')
        >>> row["hd95"], row["hd95_vox"], row["asd_vox"]
        (2.0, 1.0, 0.5)
    """
    import numpy as np
    import torch
    from monai.metrics import compute_dice, compute_iou

    if isinstance(classes, numbers.Integral):  # a bool too: check_int refuses it
        names = [str(i) for i in range(check_int(classes, f"{_where(case)}the number of classes", minimum=1))]
    else:
        names = [str(c) for c in classes]
        if not names:
            raise ValueError(f"{_where(case)}classes must name at least one class, got an empty list.")
    num_classes = len(names)
    pred = as_label_array(pred, "the prediction", case, num_classes)
    ref = as_label_array(ref, "the reference", case, num_classes)
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
    diagonal_vox = image_diagonal(pred.shape)
    rows: list[dict] = []
    both: list[int] = []  # classes non-empty in prediction and reference: the MONAI metrics' job
    for i in indices:
        p_i, r_i = pred == i, ref == i
        p_n, r_n = int(np.count_nonzero(p_i)), int(np.count_nonzero(r_i))
        row = {"class": names[i], "class_index": i, "pred_voxels": p_n, "ref_voxels": r_n,
               "overlap_voxels": int(np.count_nonzero(p_i & r_i))}
        if p_n == 0 and r_n == 0:
            row.update(dice=1.0, jaccard=1.0, hd95=0.0, assd=0.0, hd95_vox=0.0, asd_vox=0.0, status="both_empty")
        elif p_n == 0 or r_n == 0:
            row.update(dice=0.0, jaccard=0.0, hd95=diagonal, assd=diagonal, hd95_vox=diagonal_vox,
                       asd_vox=diagonal_vox, status="pred_empty" if p_n == 0 else "ref_empty")
        else:
            row["status"] = "ok"
            both.append(len(rows))
        rows.append(row)

    if both:
        sel = [rows[k]["class_index"] for k in both]
        # one-hot (1, K, *spatial) over the classes that both masks contain
        p1h = torch.from_numpy(np.stack([pred == i for i in sel])[None]).float()
        r1h = torch.from_numpy(np.stack([ref == i for i in sel])[None]).float()
        voxel_grid = spacing is None or all(s == 1.0 for s in spacing)
        with warnings.catch_warnings():
            # MONAI 1.6 calls its own deprecated get_mask_edges(always_return_as_numpy=...) internally
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            values = {
                "dice": compute_dice(p1h, r1h, include_background=True, ignore_empty=False)[0],
                "jaccard": compute_iou(p1h, r1h, include_background=True, ignore_empty=False)[0],
            }
            mm = [_surface_distances(p1h[0, j], r1h[0, j], spacing) for j in range(len(sel))]
            vox = mm if voxel_grid else [_surface_distances(p1h[0, j], r1h[0, j], None) for j in range(len(sel))]
        values["hd95"] = [_hd95(*d) for d in mm]
        values["assd"] = [torch.cat(d).mean() for d in mm]
        values["hd95_vox"] = [_hd95(*d) for d in vox]
        values["asd_vox"] = [d[0].mean() for d in vox]  # one direction: prediction edges -> reference edges
        for j, k in enumerate(both):
            for key in METRICS:
                v = float(values[key][j])
                if not math.isfinite(v):
                    raise ValueError(
                        f"{_where(case)}MONAI returned {key}={v} for class {rows[k]['class']!r}, whose "
                        "prediction and reference are both non-empty."
                    )
                rows[k][key] = v
    order = ("class", "class_index", *METRICS, "pred_voxels", "ref_voxels", "overlap_voxels", "status")
    return [{key: row[key] for key in order} for row in rows]
