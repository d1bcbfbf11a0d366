"""The atlas method's a priori probabilistic atlas: ``partialseg build-atlas`` and :func:`load_atlas`.

From a dataset's labelled training cases (Liu et al., MICCAI 2024, "Cross-modal a priori atlas
construction"): each image is reoriented (``axcodes``, RAS by default, as the bundles load
images), cropped to its body by Otsu thresholding (the box of
:class:`partialseg.transforms.AtlasCrop`, computed on the image and applied to its label),
and every crop is resized to one common shape, the mean cropped shape (in voxels, or, with
``spacing``, the mean cropped extent in mm divided by that spacing: the paper re-slices to
2 x 1 x 1 mm first). For each foreground class, the atlas is the mean of the class's resized
mask **over the cases that annotate it** (a union of partial datasets gives every organ its own
count; a case that does not annotate an organ says nothing about where it is), then Gaussian
smoothed (``sigma`` voxels, SciPy). The paper averages (``normalize="mean"``); the public code
sums and divides by the maximum (``normalize="max"``), offered as an option.

Files: ``atlas.nii.gz``, a float32 NIfTI of shape ``(*shape, C)`` (channels on the fourth axis,
as NIfTI holds them; channel ``k`` is class ``k + 1``, the background has none) whose affine is
diagonal with the atlas voxel size, and its sidecar ``atlas.json`` (same stem) holding the
dataset's ``classes``, the ``channels``, the per-organ ``counts`` and the build settings
(:data:`SIDECAR_KEYS`). :func:`load_atlas` reads both and refuses an atlas whose classes are not
the dataset's.

Only the standard library is imported at module level (the module is also the ``build-atlas``
command, and ``partialseg --help`` stays fast).

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> import nibabel as nib, numpy as np
    >>> root = Path(tempfile.mkdtemp())
    >>> img = np.zeros((12, 12, 8), np.float32); img[2:10, 2:10, 1:7] = 100.0
    >>> lab = np.zeros((12, 12, 8), np.uint8); lab[3:6, 3:6, 2:5] = 1
    >>> for name in ("a", "b"):
    ...     _ = nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / f"{name}.nii.gz"))
    ...     _ = nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / f"{name}_lab.nii.gz"))
    >>> _ = (root / "dataset.json").write_text(json.dumps({"classes": ["background", "liver"], "training": [
    ...     {"image": "a.nii.gz", "label": "a_lab.nii.gz"}, {"image": "b.nii.gz", "label": "b_lab.nii.gz"}]}))
    >>> path = build_atlas(root, sigma=0.0, progress=False)
    >>> atlas = load_atlas(path, ["background", "liver"])
    >>> atlas.data.shape, atlas.counts, float(atlas.data.max())
    ((1, 8, 8, 6), {'liver': 2}, 1.0)
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Atlas", "FORMAT", "NORMALIZE", "SIDECAR_KEYS", "atlas_sidecar", "build_atlas", "load_atlas",
           "add_arguments", "run"]

#: the sidecar's ``format`` value
FORMAT = "partialseg-atlas"
#: how a class's summed masks become a probability: the paper's mean over the cases annotating
#: the class, or the public code's division by the maximum of the sum
NORMALIZE = ("mean", "max")
#: the keys of the sidecar JSON
SIDECAR_KEYS = ("format", "version", "classes", "channels", "counts", "shape", "spacing", "sigma", "normalize",
                "axcodes", "margin", "otsu_sigma", "label_mode", "dataset", "split", "num_cases")


@dataclass
class Atlas:
    """An atlas read by :func:`load_atlas`.

    Attributes:
        data: ``(C, *shape)`` float32 numpy array, channel ``k`` = class ``k + 1`` (no background).
        classes: the dataset's class names, background first.
        channels: the class name of each channel (``classes[1:]``).
        counts: per class name, the number of training cases that annotate it (its atlas is
            their mean).
        affine: ``(4, 4)`` diagonal affine of the atlas grid (the atlas voxel size).
        meta: the whole sidecar.
        path: the NIfTI file.
    """

    data: Any
    classes: list[str]
    channels: list[str]
    counts: dict[str, int]
    affine: Any
    meta: dict = field(default_factory=dict)
    path: Path | None = None


def atlas_sidecar(path: str | os.PathLike) -> Path:
    """The sidecar JSON of an atlas NIfTI: the same name with ``.json`` for ``.nii.gz`` / ``.nii``.

    Example:
        >>> atlas_sidecar("/data/abdomen/atlas.nii.gz").name
        'atlas.json'
    """
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    raise ValueError(f"an atlas file is a NIfTI (.nii.gz or .nii), got {path}.")


def _load(loader, orient, path: str, what: str, case: str):
    try:
        data = loader(path)
    except Exception as e:  # MONAI wraps reader errors in RuntimeError / OSError
        raise ValueError(f"case {case!r}: cannot read the {what} {path}: {e}") from e
    return orient(data) if orient is not None else data


def build_atlas(
    dataset: str | os.PathLike,
    out: str | os.PathLike | None = None,
    split: str = "training",
    sigma: float = 3.0,
    spacing: Sequence[float] | None = None,
    margin: int = 0,
    otsu_sigma: float = 0.0,
    normalize: str = "mean",
    axcodes: str | None = "RAS",
    label_mode: str = "nearest-exact",
    progress: bool = True,
) -> Path:
    """Builds a dataset's atlas and writes ``atlas.nii.gz`` + ``atlas.json`` (see the module docstring).

    Args:
        dataset: dataset folder holding ``dataset.json``, or the file itself.
        out: the atlas NIfTI to write (``.nii.gz`` or ``.nii``; the sidecar goes beside it);
            default ``<dataset folder>/atlas.nii.gz``.
        split: the split whose labelled cases build it.
        sigma: Gaussian smoothing of each class's atlas, in atlas voxels (0: none; the public
            code's 3 by default).
        spacing: atlas voxel size in the images' units (mm); the common shape is then the mean
            cropped extent divided by it. None: the mean cropped shape in voxels.
        margin: voxels kept around each body box (as ``AtlasCrop``).
        otsu_sigma: Gaussian smoothing (voxels) of the image before the Otsu threshold.
        normalize: ``"mean"`` (the paper) or ``"max"`` (the public code), see :data:`NORMALIZE`.
        axcodes: orientation the images and labels are brought to first (MONAI
            ``Orientation``); None keeps the stored array order. Use the orientation of the
            pipeline that will read the atlas.
        label_mode: interpolation of the masks onto the common shape (``Resize`` mode):
            ``"nearest-exact"`` (the labels as ``AtlasCropd`` resizes them) or ``"trilinear"``.
        progress: tqdm progress bars over the cases (two passes: body boxes, then labels).

    Returns:
        The path of the atlas NIfTI.

    Raises:
        ValueError: a foreground class that no labelled case of the split annotates (naming
            it), no labelled case, an unreadable file (naming the case), image and label grids
            that differ, or a bad argument.
    """
    import numpy as np
    import torch
    from monai.transforms import LoadImage, Orientation, Resize
    from scipy import ndimage
    from tqdm import tqdm

    from partialseg._checks import check_float, check_int, check_option
    from partialseg._fileio import atomic_open, atomic_write_text
    from partialseg.data.spec import load_dataset
    from partialseg.transforms import AtlasCrop, RemapLabels

    sigma = check_float(sigma, "sigma", minimum=0.0)
    otsu_sigma = check_float(otsu_sigma, "otsu_sigma", minimum=0.0)
    margin = check_int(margin, "margin", minimum=0)
    normalize = check_option(normalize, NORMALIZE, "normalize")
    label_mode = check_option(label_mode, ("nearest-exact", "nearest", "trilinear", "area"), "label_mode")
    dataset = Path(dataset)
    root = dataset.parent if dataset.suffix == ".json" else dataset
    out = root / "atlas.nii.gz" if out is None else Path(out)
    sidecar = atlas_sidecar(out)

    ds = load_dataset(dataset)
    classes = [str(c) for c in ds.classes]
    if split not in ds.splits:
        raise ValueError(f"the dataset {dataset} has no split {split!r} (splits: {sorted(ds.splits)}).")
    cases = [e for e in ds.datalist(split) if e.get("label") and any(int(i) != 0 for i in e["annotated"])]
    if not cases:
        raise ValueError(f"split {split!r} of {dataset} has no labelled case annotating an organ; the atlas needs some.")
    counts = {name: 0 for name in classes[1:]}
    for e in cases:
        for i in e["annotated"]:
            if int(i) != 0:
                counts[classes[int(i)]] += 1
    missing = [f"{name} (class {k})" for k, name in enumerate(classes[1:], start=1) if counts[name] == 0]
    if missing:
        raise ValueError(f"no labelled case of split {split!r} of {dataset} annotates {', '.join(missing)}: "
                         "the atlas has no data for it. Add cases that annotate it, or drop it from classes.")
    if spacing is not None:
        spacing = [check_float(s, "spacing", minimum=0.0, include_minimum=False) for s in spacing]

    loader = LoadImage(image_only=True, ensure_channel_first=True)
    orient = Orientation(axcodes=axcodes, labels=None) if axcodes else None
    show = None if progress else True
    # pass 1: the body box of every image (the images are read once)
    boxes, extents = [], []
    for e in tqdm(cases, desc="atlas: body boxes", unit="case", disable=show):
        image = _load(loader, orient, e["image"], "image", e["case"])
        if spacing is not None and len(spacing) != image.ndim - 1:
            raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values but case {e['case']!r} has "
                             f"{image.ndim - 1} spatial dims.")
        start, end = AtlasCrop(spatial_size=tuple(image.shape[1:]), margin=margin, sigma=otsu_sigma).compute_bounding_box(image)
        size = np.asarray(end) - np.asarray(start)
        pixdim = np.asarray(image.pixdim, dtype=np.float64)[: image.ndim - 1]
        boxes.append((np.asarray(start), np.asarray(end), tuple(image.shape[1:]), image.affine.clone()))
        extents.append((size, size * pixdim))
    if spacing is None:
        shape = tuple(int(round(v)) for v in np.mean([s for s, _ in extents], axis=0))
        voxel = np.mean([mm / s for s, mm in extents], axis=0)
    else:
        voxel = np.asarray(spacing, dtype=np.float64)
        shape = tuple(int(round(v)) for v in np.mean([mm for _, mm in extents], axis=0) / voxel)
    shape = tuple(max(1, s) for s in shape)

    # pass 2: each label, cropped with its image's box, resized, summed per annotated class
    resize = Resize(spatial_size=shape, mode=label_mode)
    sums = np.zeros((len(classes) - 1, *shape), dtype=np.float64)
    for e, (start, end, image_shape, image_affine) in tqdm(list(zip(cases, boxes)), desc="atlas: labels", unit="case",
                                                           disable=show):
        label = _load(loader, None, e["label"], "label", e["case"])
        if e.get("label_map"):
            label = type(label)(torch.as_tensor(RemapLabels(e["label_map"])(label)), meta=label.meta)
        if orient is not None:
            label = orient(label)
        if tuple(label.shape[1:]) != image_shape or not torch.allclose(label.affine.double(), image_affine.double(),
                                                                       atol=1e-3):
            raise ValueError(f"case {e['case']!r}: the label {e['label']} is not on its image's grid (shape "
                             f"{tuple(label.shape[1:])} vs {image_shape}); run partialseg check on the dataset.")
        crop = torch.as_tensor(label.as_tensor() if hasattr(label, "as_tensor") else label)[
            (slice(None), *(slice(int(a), int(b)) for a, b in zip(start, end)))]
        crop = torch.round(crop.float())
        for i in e["annotated"]:
            i = int(i)
            if i == 0:
                continue
            mask = resize((crop == i).float())
            sums[i - 1] += np.asarray(torch.as_tensor(mask)[0], dtype=np.float64)
    atlas = np.zeros(sums.shape, dtype=np.float32)
    for k, name in enumerate(classes[1:]):
        channel = sums[k] / counts[name] if normalize == "mean" else sums[k] / max(float(sums[k].max()), 1e-12)
        if sigma > 0:
            channel = ndimage.gaussian_filter(channel, sigma=sigma, mode="constant")
        atlas[k] = channel

    import nibabel as nib

    affine = np.diag([*[float(v) for v in voxel], 1.0])
    nifti = nib.Nifti1Image(np.moveaxis(atlas, 0, -1), affine)
    nifti.header.set_intent("vector", name="atlas")
    meta = {
        "format": FORMAT, "version": 1, "classes": classes, "channels": classes[1:],
        "counts": {k: int(v) for k, v in counts.items()}, "shape": list(shape),
        "spacing": [float(v) for v in voxel], "sigma": sigma, "normalize": normalize, "axcodes": axcodes,
        "margin": margin, "otsu_sigma": otsu_sigma, "label_mode": label_mode, "dataset": str(dataset),
        "split": split, "num_cases": len(cases),
    }
    gz = out.name.endswith(".gz")
    with atomic_open(out, "wb") as f:
        data = nifti.to_bytes()
        if gz:
            import gzip

            data = gzip.compress(data, mtime=0)
        f.write(data)
    atomic_write_text(sidecar, json.dumps(meta, indent=2) + "\n")
    return out


def load_atlas(path: str | os.PathLike, classes: Sequence[str]) -> Atlas:
    """Reads an atlas written by :func:`build_atlas` and checks it against the dataset's classes.

    Args:
        path: the atlas NIfTI (its sidecar JSON beside it).
        classes: the dataset's class names, background first (``load_dataset(...).classes``).

    Returns:
        :class:`Atlas` (``data``: ``(len(classes) - 1, *shape)`` float32).

    Raises:
        ValueError: a missing or unreadable file (naming it), a sidecar that is not an atlas's,
            an atlas built for other classes (naming both class lists), or a NIfTI whose channel
            count is not the sidecar's.

    Example:
        >>> load_atlas("/nonexistent/atlas.nii.gz", ["background", "liver"])
        Traceback (most recent call last):
        ...
        ValueError: no atlas at /nonexistent/atlas.nii.gz: build it with partialseg build-atlas DATASET --out /nonexistent/atlas.nii.gz.
    """
    import nibabel as nib
    import numpy as np

    path = Path(path)
    sidecar = atlas_sidecar(path)
    if not path.is_file():
        raise ValueError(f"no atlas at {path}: build it with partialseg build-atlas DATASET --out {path}.")
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise ValueError(f"the atlas {path} has no sidecar {sidecar} (its classes and counts); rebuild it with "
                         "partialseg build-atlas.") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the atlas sidecar {sidecar}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{sidecar} is not a partialseg atlas sidecar (no \"format\": \"{FORMAT}\").")
    built = [str(c) for c in meta.get("classes", [])]
    wanted = [str(c) for c in classes]
    if built != wanted:
        raise ValueError(f"the atlas {path} was built for the classes {built}, but the dataset has the classes "
                         f"{wanted}; rebuild it with partialseg build-atlas on this dataset.")
    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise ValueError(f"cannot read the atlas {path}: {e}") from e
    channels = [str(c) for c in meta.get("channels", built[1:])]
    if array.ndim == 3 and len(channels) == 1:
        array = array[..., None]
    if array.shape[-1] != len(channels):
        raise ValueError(f"the atlas {path} holds {array.shape[-1]} channel(s) but its sidecar {sidecar} lists "
                         f"{len(channels)} ({channels}).")
    data = np.ascontiguousarray(np.moveaxis(array, -1, 0))
    counts = {str(k): int(v) for k, v in meta.get("counts", {}).items()}
    return Atlas(data=data, classes=built, channels=channels, counts=counts, affine=np.asarray(img.affine),
                 meta=meta, path=path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``partialseg build-atlas`` arguments to ``parser``."""
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder holding dataset.json (or the file)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="atlas NIfTI to write, .nii.gz or .nii (default <DATASET>/atlas.nii.gz); the sidecar "
                             "JSON (classes, per-organ counts) goes beside it")
    parser.add_argument("--split", default="training", help="split whose labelled cases build it (default training)")
    parser.add_argument("--sigma", type=float, default=3.0, help="Gaussian smoothing in atlas voxels (default 3; 0: none)")
    parser.add_argument("--spacing", type=float, nargs="+", default=None, metavar="MM",
                        help="atlas voxel size; the shape is then the mean cropped extent / spacing (default: the "
                             "mean cropped shape in voxels)")
    parser.add_argument("--margin", type=int, default=0, help="voxels kept around each body box (default 0)")
    parser.add_argument("--otsu-sigma", type=float, default=0.0, help="smoothing before the Otsu threshold (voxels)")
    parser.add_argument("--normalize", choices=NORMALIZE, default="mean",
                        help="mean over the cases annotating each organ (the paper, default) or divide the sum by its "
                             "maximum (the public code)")
    parser.add_argument("--axcodes", default="RAS", help="orientation applied first (default RAS; 'none': keep the "
                                                         "stored order)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs ``partialseg build-atlas``: 0 on success, 2 after a one-line ``error: ...`` naming the problem."""
    import sys

    axcodes = None if str(args.axcodes).lower() == "none" else args.axcodes
    try:
        path = build_atlas(args.dataset, out=args.out, split=args.split, sigma=args.sigma, spacing=args.spacing,
                           margin=args.margin, otsu_sigma=args.otsu_sigma, normalize=args.normalize, axcodes=axcodes,
                           progress=not args.no_progress)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    meta = json.loads(atlas_sidecar(path).read_text())
    print(f"atlas of {meta['num_cases']} case(s), shape {tuple(meta['shape'])}, voxel "
          f"{tuple(round(v, 3) for v in meta['spacing'])}, sigma {meta['sigma']}")
    for name, n in meta["counts"].items():
        print(f"  {name:<20} annotated by {n} case(s)")
    print(f"wrote {path} and {atlas_sidecar(path)}")
    return 0
