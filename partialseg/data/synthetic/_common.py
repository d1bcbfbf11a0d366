"""Machinery shared by the synthetic benchmark generators.

Everything here is deterministic for a given :class:`numpy.random.Generator`: no global random
state is read, and the files written (NIfTI, PNG, JSON) carry no timestamps, so the same seed
gives byte-identical datasets.

Coordinates are handled as world coordinates in millimetres wherever anatomy is placed, so that
left/right follow the image affine (RAS+: +x towards the patient's right, +y anterior, +z
superior), never the array order.
"""

from __future__ import annotations

import gzip
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "FAMILY_IDS",
    "bias_field",
    "case_rng",
    "deformation_field",
    "ellipsoid",
    "gaussian_noise",
    "partial_volume",
    "radial_modulation",
    "rician_noise",
    "smooth_noise",
    "largest_component",
    "to_int16",
    "warp",
    "world_grid",
    "affine_from_spacing",
    "write_nifti",
    "write_png",
    "write_json",
    "write_preview",
    "DatasetWriter",
]

#: a fixed number per family, mixed into every seed so that families never share random streams
FAMILY_IDS = {"cardiac2d": 11, "abdomen3d": 23, "polyp2d": 37, "atrium3d": 41}


def case_rng(seed: int, family: str, split: str, index: int) -> np.random.Generator:
    """A generator for one case, derived from (seed, family, split, case index) only.

    Args:
        seed: the dataset seed (non-negative).
        family: family name, a key of :data:`FAMILY_IDS`.
        split: ``"training"``, ``"test"`` or ``"plan"`` (dataset-level draws).
        index: case (or subject) index within the split.

    Returns:
        A fresh ``numpy.random.Generator`` seeded by a ``SeedSequence`` of those four integers.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    split_id = {"plan": 0, "training": 1, "test": 2, "validation": 3}[split]
    return np.random.default_rng([int(seed), FAMILY_IDS[family], split_id, int(index)])


# --------------------------------------------------------------------------------------------
# random fields
# --------------------------------------------------------------------------------------------


def _smoothing_matrix(n: int, step: float, sigma: float) -> tuple[np.ndarray, int]:
    """Row-normalised Gaussian weights from coarse nodes (every ``step`` voxels) to ``n`` voxels."""
    nodes = np.arange(-3.0 * sigma, n + 3.0 * sigma + step, step)
    pos = np.arange(n, dtype=np.float64)[:, None]
    w = np.exp(-0.5 * ((pos - nodes[None, :]) / sigma) ** 2)
    return w / w.sum(axis=1, keepdims=True), len(nodes)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], scale: float) -> np.ndarray:
    """Zero-mean, unit-variance, spatially smooth random field.

    White noise is drawn on a coarse grid (one node every ``scale / 2`` voxels) and spread to every
    voxel with separable Gaussian weights of width ``scale / 2`` (a Gaussian-smoothed noise field,
    computed as a few small tensor products instead of a full-size convolution).

    Args:
        rng: random generator.
        shape: output spatial shape, e.g. ``(H, W)`` or ``(H, W, D)``.
        scale: correlation length in voxels (larger = smoother).

    Returns:
        float32 array of ``shape``.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    sigma = max(scale / 2.0, 0.5)
    step = max(sigma, 1.0)
    mats = [_smoothing_matrix(int(n), step, sigma) for n in shape]
    field = rng.standard_normal([m for _, m in mats])
    for axis, (w, _) in enumerate(mats):
        field = np.moveaxis(np.tensordot(w, np.moveaxis(field, axis, 0), axes=(1, 0)), 0, axis)
    std = float(field.std())
    return ((field - field.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def deformation_field(
    rng: np.random.Generator, shape: Sequence[int], scale: float, magnitude: float
) -> np.ndarray:
    """Smooth random displacement field (Gaussian-smoothed noise per axis).

    Args:
        rng: random generator.
        shape: spatial shape ``(H, W[, D])``.
        scale: correlation length of the field, in voxels.
        magnitude: standard deviation of each displacement component, in voxels.

    Returns:
        float32 array ``(ndim, H, W[, D])`` of displacements in voxels.
    """
    return np.stack([smooth_noise(rng, shape, scale) * magnitude for _ in shape])


def warp(array: np.ndarray, displacement: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """Resample ``array`` at ``index + displacement`` with ``scipy.ndimage.map_coordinates``.

    Args:
        array: spatial array ``(H, W[, D])``.
        displacement: ``(ndim, H, W[, D])`` displacement in voxels (see :func:`deformation_field`).
        order: spline order; 0 (nearest) for label maps.
        cval: value outside the array.

    Returns:
        The warped array, same shape and dtype as ``array``.
    """
    if displacement.shape != (array.ndim, *array.shape):
        raise ValueError(f"displacement shape {displacement.shape} does not fit array shape {array.shape}")
    grid = np.indices(array.shape, dtype=np.float32) + displacement
    out = ndimage.map_coordinates(array.astype(np.float32), grid, order=order, mode="constant", cval=cval)
    return out.astype(array.dtype)


def bias_field(rng: np.random.Generator, shape: Sequence[int], strength: float) -> np.ndarray:
    """Smooth multiplicative intensity inhomogeneity ``exp(strength * n)`` (n: very smooth noise).

    Args:
        rng: random generator.
        shape: spatial shape.
        strength: log-amplitude; 0.1-0.3 is MR-like.

    Returns:
        float32 array of ``shape`` with values around 1.
    """
    return np.exp(strength * smooth_noise(rng, shape, scale=max(shape) * 0.8)).astype(np.float32)


def gaussian_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """``image`` plus white Gaussian noise of standard deviation ``sigma`` (CT-like)."""
    return (image + rng.normal(0.0, sigma, image.shape)).astype(np.float32)


def rician_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of ``image`` plus complex Gaussian noise (MR-like Rician noise)."""
    real = image + rng.normal(0.0, sigma, image.shape)
    imag = rng.normal(0.0, sigma, image.shape)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def partial_volume(image: np.ndarray, sigma: float | Sequence[float]) -> np.ndarray:
    """Gaussian blur standing for the scanner's point spread (partial-volume effect at edges)."""
    return ndimage.gaussian_filter(image.astype(np.float32), sigma=sigma, mode="nearest")


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def case_counts(num_train: int | None, num_test: int | None, default_train: int, default_test: int) -> tuple[int, int]:
    """Training and test case counts, defaults filled in and checked (``num_train >= 1``, ``num_test >= 0``)."""
    n_train = default_train if num_train is None else int(num_train)
    n_test = default_test if num_test is None else int(num_test)
    if n_train < 1 or n_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {n_train} and {n_test}")
    return n_train, n_test


def deformed_world_grid(rng: np.random.Generator, affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float],
                        scale: float, magnitude: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World coordinates (mm) of every voxel after a smooth random deformation (see :func:`deformation_field`)."""
    x0, y0, z0 = world_grid(affine, shape)
    disp = deformation_field(rng, shape, scale=scale, magnitude=magnitude)
    return x0 + disp[0] * spacing[0], y0 + disp[1] * spacing[1], z0 + disp[2] * spacing[2]


def affine_from_spacing(spacing: Sequence[float], shape: Sequence[int], flip_xy: bool = False) -> np.ndarray:
    """A 4x4 voxel-to-world (RAS+, mm) affine whose grid centre sits at the world origin.

    Args:
        spacing: voxel size per array axis in mm (2 or 3 values).
        shape: spatial shape (same length as ``spacing``).
        flip_xy: store the grid LPS-like (``i`` towards the patient's left, ``j`` posterior), as
            CT converted from DICOM usually is; the world coordinates stay RAS+.

    Returns:
        float64 ``(4, 4)`` affine.
    """
    if len(spacing) != len(shape) or len(shape) not in (2, 3):
        raise ValueError(f"spacing {tuple(spacing)} and shape {tuple(shape)} must both have 2 or 3 values")
    diag = [float(s) for s in spacing] + [1.0] * (3 - len(spacing))
    signs = [-1.0, -1.0, 1.0] if flip_xy else [1.0, 1.0, 1.0]
    affine = np.eye(4)
    for a in range(3):
        affine[a, a] = signs[a] * diag[a]
    centre = [(s - 1) / 2.0 for s in shape] + [0.0] * (3 - len(shape))
    affine[:3, 3] = -affine[:3, :3] @ np.asarray(centre)
    return affine


def world_grid(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    """World coordinates (mm) of every voxel centre for an axis-aligned affine.

    Returns broadcastable open grids (as ``numpy.ogrid``), one per spatial axis of ``shape``,
    ordered like the world axes (x, y[, z]); the affine must be diagonal (no rotation).
    """
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
        raise ValueError("world_grid needs an axis-aligned (diagonal) affine")
    out = []
    for a, n in enumerate(shape):
        coords = affine[a, a] * np.arange(n, dtype=np.float32) + affine[a, 3]
        view = [1] * len(shape)
        view[a] = n
        out.append(coords.reshape(view).astype(np.float32))
    return tuple(out)


def ellipsoid(coords: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float],
              rotation: float = 0.0) -> np.ndarray:
    """Normalised radius ``r`` of an ellipsoid (``r <= 1`` inside), optionally rotated in-plane.

    Args:
        coords: coordinate arrays (broadcastable), one per axis.
        centre: centre per axis.
        radii: semi-axes per axis.
        rotation: rotation in radians about the last axis of a 3D shape (or in the plane of a 2D
            shape), applied to the first two axes.

    Returns:
        float32 array of the broadcast shape.
    """
    d = [np.asarray(c, dtype=np.float32) - float(m) for c, m in zip(coords, centre)]
    if rotation:
        c, s = math.cos(rotation), math.sin(rotation)
        d[0], d[1] = c * d[0] + s * d[1], -s * d[0] + c * d[1]
    total = sum((di / float(r)) ** 2 for di, r in zip(d, radii))
    return np.sqrt(total).astype(np.float32)


def radial_modulation(rng: np.random.Generator, angle: np.ndarray, amplitude: float, orders: int = 4) -> np.ndarray:
    """A random smooth closed-curve modulation ``1 + sum_k a_k cos(k * angle + phi_k)``.

    Dividing a normalised radius by this factor gives lumpy, non-elliptic outlines.
    """
    out = np.ones_like(angle, dtype=np.float32)
    for k in range(2, orders + 2):
        a = amplitude * rng.uniform(0.3, 1.0) / (k - 1)
        out = out + a * np.cos(k * angle + rng.uniform(0, 2 * math.pi))
    return out


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI-1 file byte-identically for identical input.

    The header is built from the array and affine only (qform and sform code 1 = scanner, units
    mm); a ``.nii.gz`` is gzip-compressed with ``mtime=0`` and no embedded file name, so the
    compressed bytes carry no timestamp.

    Args:
        path: output path ending in ``.nii`` or ``.nii.gz``.
        array: 2D or 3D array (its dtype is kept).
        affine: ``(4, 4)`` voxel-to-world affine.
    """
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    data = img.to_bytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".nii.gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    elif not path.name.endswith(".nii"):
        raise ValueError(f"NIfTI path must end in .nii or .nii.gz, got {path}")
    path.write_bytes(data)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write a ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 array as PNG (no metadata chunks)."""
    from PIL import Image

    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"PNG arrays must be uint8, got {arr.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    path.write_bytes(buf.getvalue())


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    """Write JSON with a stable layout (indent 2, keys in insertion order, trailing newline)."""
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def write_preview(path: Path, panels: Sequence[tuple[np.ndarray, np.ndarray | None, str]],
                  num_classes: int, title: str, ncols: int = 4) -> None:
    """Save a grid of image panels with their label maps overlaid (matplotlib, Agg backend).

    Args:
        path: output PNG path.
        panels: ``(image, label, caption)`` triples; ``image`` is ``(H, W)`` (grey) or
            ``(H, W, 3)`` (RGB, floats in [0, 1]); ``label`` is an integer ``(H, W)`` map or None.
            Arrays are shown with the first axis vertical.
        num_classes: number of classes, for a stable colour per label value.
        title: figure title.
        ncols: panels per row.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    cmap = ListedColormap(colours[: max(num_classes - 1, 1)])
    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = int(math.ceil(n / ncols))
    fig = Figure(figsize=(2.6 * ncols, 2.8 * nrows), dpi=80)
    for i, (image, label, caption) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        if image.ndim == 2:
            lo, hi = np.percentile(image, [1, 99])
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        else:
            ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
        if label is not None and np.any(label > 0):
            masked = np.ma.masked_equal(label.astype(np.int32), 0)
            ax.imshow(masked, cmap=cmap, vmin=1, vmax=max(num_classes - 1, 1), alpha=0.45, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), format="png", metadata={"Software": None})


class DatasetWriter:
    """Collects cases and writes the MSD-style folder and the extended ``dataset.json``.

    Args:
        out_dir: dataset folder (created if needed).
        suffix: image/label file suffix, e.g. ``".nii.gz"`` or ``".png"``.
    """

    def __init__(self, out_dir: Path, suffix: str):
        self.root = Path(out_dir)
        self.suffix = suffix
        self.training: list[dict[str, Any]] = []
        self.validation: list[dict[str, Any]] = []
        self.test: list[dict[str, Any]] = []

    def path(self, folder: str, name: str) -> tuple[Path, str]:
        """Absolute path and dataset-relative path of ``folder/name + suffix``."""
        rel = f"{folder}/{name}{self.suffix}"
        return self.root / rel, rel

    def add(self, split: str, entry: dict[str, Any]) -> None:
        """Append a case entry to ``"training"``, ``"validation"`` or ``"test"``."""
        {"training": self.training, "validation": self.validation, "test": self.test}[split].append(entry)

    def finish(self, header: Mapping[str, Any], label_maps: Mapping[str, Any] | None = None) -> Path:
        """Write ``dataset.json`` (header keys, MSD ``labels``, splits, label maps); return its path."""
        classes = list(header["classes"])
        desc: dict[str, Any] = dict(header)
        desc["labels"] = {str(i): c for i, c in enumerate(classes)}
        desc["numTraining"] = len(self.training)
        desc["numTest"] = len(self.test)
        desc["training"] = self.training
        if self.validation:  # written only when asked for, so older outputs stay byte-identical
            desc["validation"] = self.validation
        desc["test"] = self.test
        if label_maps:
            desc["label_maps"] = dict(label_maps)
        path = self.root / "dataset.json"
        write_json(path, desc)
        return path


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest fully connected component of a boolean ``mask`` (``mask`` itself if <= 1)."""
    comps, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if n <= 1:
        return mask
    counts = np.bincount(comps.ravel())
    counts[0] = 0
    return comps == int(np.argmax(counts))


def slice_with_most(label: np.ndarray, axis: int = 2) -> int:
    """Index along ``axis`` of the slice holding the most non-zero voxels (the centre if none)."""
    counts = (label > 0).sum(axis=tuple(a for a in range(label.ndim) if a != axis))
    return int(np.argmax(counts)) if counts.max() > 0 else label.shape[axis] // 2


def parse_size(size: int | Sequence[int] | None, default: Sequence[int], minimum: int) -> tuple[int, ...]:
    """Normalise a ``size`` option: None -> ``default``; one int -> isotropic; else one per axis.

    Raises:
        ValueError: wrong number of values, or a value below ``minimum``.
    """
    if size is None:
        return tuple(int(s) for s in default)
    values = [int(size)] if np.isscalar(size) else [int(s) for s in size]
    if len(values) == 1:
        values = values * len(default)
    if len(values) != len(default):
        raise ValueError(f"size must have 1 or {len(default)} values, got {list(values)}")
    if min(values) < minimum:
        raise ValueError(f"size values must be >= {minimum}, got {list(values)}")
    return tuple(values)


def to_int16(image: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Round ``image * scale`` to int16 (clipped to its range), as scanners store MR magnitudes."""
    return np.clip(np.round(image * scale), -32768, 32767).astype(np.int16)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Clip a float image in [0, 1] and quantise it to uint8."""
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def progress(items: list, enabled: bool, desc: str, unit: str = "case"):
    """Wrap ``items`` in a tqdm progress bar when ``enabled`` (else return them unchanged)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)
