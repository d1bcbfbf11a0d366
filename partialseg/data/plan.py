"""``partialseg plan DATASET``: fingerprint a dataset and plan a bundle's settings from it, as nnU-Net does.

Two steps, both explained in ``docs/planning.md``:

1. :func:`fingerprint_dataset` reads every training case once (worker processes, a progress bar
   on stderr) and reduces it to a few vectorised statistics: per modality the voxel spacings,
   the image shapes before and after an Otsu body crop (:class:`partialseg.transforms.OtsuForeground`,
   the atlas method's crop), the 0.5 / 99.5 percentiles, mean and standard deviation of the
   foreground (labelled, non-background) intensities; per class its size (voxels, mm^3) and the
   sources that annotate it; which sources are fully labelled. The result is cached beside
   ``dataset.json`` (``.partialseg_fingerprint.json``) under a hash of ``dataset.json`` and of
   each file's size and modification time, so a second run reads nothing.
2. :func:`make_plan` turns the fingerprint into a bundle's settings (target spacing with
   nnU-Net's anisotropy rule, patch and batch size from a memory budget, network depth and width,
   normalisation per modality, classes, ``full_sources``, DCL's ``missing``, the validation
   split), each with the reason it was chosen. :func:`plan_dataset` runs both and writes
   ``plan.json`` beside ``dataset.json``; :func:`format_plan` prints it as a table.

Example:
    >>> import tempfile
    >>> from partialseg.data.synthetic import make_dataset
    >>> root = tempfile.mkdtemp()
    >>> _ = make_dataset("cardiac2d", root, size=32, num_train=4, num_test=1)
    >>> plan = plan_dataset(root, bundle="dcl_cardiac", progress=False)
    >>> plan["plans"]["dcl_cardiac"]["settings"]["num_classes"]
    4
    >>> plan_value(root, "num_classes", 7, bundle="dcl_cardiac")
    4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLES",
    "FINGERPRINT_NAME",
    "body_mask",
    "PLAN_NAME",
    "PlanSettings",
    "case_statistics",
    "dataset_hash",
    "estimate_memory",
    "fingerprint_dataset",
    "bundle_overrides",
    "dataset_classes",
    "format_command",
    "format_plan",
    "load_model_settings",
    "load_plan",
    "make_plan",
    "plan_dataset",
    "plan_fallback",
    "plan_on_first_run",
    "plan_value",
    "save_model_settings",
    "settings_path",
    "target_spacing",
]

PLAN_NAME = "plan.json"
FINGERPRINT_NAME = ".partialseg_fingerprint.json"
_VERSION = 1
#: foreground intensities kept per case for the percentiles (nnU-Net keeps 10^7 in all)
_SAMPLES_TOTAL = 10_000_000
_SAMPLES_MIN = 10_000
#: anisotropy: the coarsest axis is "low resolution" when its spacing exceeds this times the finest
ANISOTROPY = 3.0
#: smallest feature map edge at the network's bottleneck (nnU-Net: 4)
MIN_FEATURE = 4
#: float32 activations kept per voxel and channel of a UNet level during training (forward
#: convolution, norm and activation outputs of two blocks, encoder and decoder, and their gradients)
ACTIVATION_FACTOR = 24
#: default memory budget (GB) for a training batch: CPU sized for a 2-core machine (an iteration of
#: a few seconds), CUDA for an 8 GB card as nnU-Net's default
DEFAULT_MEMORY = {"cpu": 0.5, "cuda": 8.0}

#: what the planner needs to know of each bundle: its grid (3D patches or whole 2D slices), the
#: config key of its patch, its network's width, and extra memory (DCL: conditional inputs, two nets)
BUNDLES: dict[str, dict[str, Any]] = {
    "marginal_exclusion_abdomen": {
        "spatial_dims": 3, "mode": "patch", "patch_key": "patch_size", "base_channels": 16, "max_channels": 320,
        "channels_key": "network_def#channels", "strides_key": "network_def#strides", "memory_factor": 1.0,
        "config_keys": ("pixdim", "patch_size", "batch_size", "network_def#channels", "network_def#strides", "intensity_range",
                        "num_classes", "full_sources"),
    },
    "dcl_cardiac": {
        "spatial_dims": 2, "mode": "slice", "patch_key": "spatial_size", "base_channels": 32, "max_channels": 512,
        "channels_key": "network_def#backbone_kwargs#channels", "strides_key": "network_def#backbone_kwargs#strides",
        "memory_factor": 2.0,  # PrimNet trains while a frozen DualNet runs forward (stage 2)
        "config_keys": ("pixdim", "spatial_size", "batch_size", "network_def#backbone_kwargs#channels",
                        "network_def#backbone_kwargs#strides", "num_classes", "missing"),
    },
    "dtml_atrium": {
        "spatial_dims": 3, "mode": "patch", "patch_key": "patch_size", "base_channels": 16, "max_channels": 320,
        "channels_key": "network_def#channels", "strides_key": "network_def#strides",
        "memory_factor": 2.0,  # M_s and M_d (the same backbone) train together
        "fixed_batch": 4,  # two-stream batches of 2 labelled + 2 unlabelled cases (the paper's), not planned
        "semi_supervised": True,  # unlabelled training cases, no validation split by default
        "config_keys": ("pixdim", "patch_size", "network_def#channels", "network_def#strides", "num_classes",
                        "intensity_clip", "intensity_stats"),
    },
    "hybrid_polyp": {
        "spatial_dims": 2, "mode": "frames", "patch_key": "spatial_size", "base_channels": 16, "max_channels": 256,
        "stride": 16,  # HybridDeepLab's output stride: frames are resized to a multiple of it
        "memory_factor": 2.0,  # two networks (DCR)
        "frames_per_pair": 3,  # per network: its tutorial and the mixed frame with gradients, the other tutorial forward only
        "max_pairs": 8,  # the paper's batch of 16 frames
        "config_keys": ("spatial_size", "pairs_per_batch", "num_classes", "in_channels"),
    },
    "atlas_multimodal_abdomen": {
        "spatial_dims": 3, "mode": "patch", "patch_key": "patch_size", "base_channels": 16, "max_channels": 320,
        "channels_key": "network_def#filters", "strides_key": "network_def#strides",
        "memory_factor": 2.0,  # the refiner (half resolution, one pass per organ) and the discriminator train beside it
        "grid": "atlas",  # no resampling to a spacing: every body crop is resized to the atlas shape
        "dynunet_strides": True,  # AtlasUNet (DynUNet) takes one stride per level, the first 1
        "feature_levels": 3,  # MICPAM at three intermediate decoder scales (the paper)
        "min_patch": 32,  # the bundle's AMAN: four stride-2 layers at half resolution need 16 voxels per axis
        "validates": False,  # final weights, no validation split
        "config_keys": ("patch_size", "batch_size", "network_def#filters", "network_def#strides", "network_def#feature_levels",
                        "num_classes", "intensity_by_modality"),
    },
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# fingerprint


def _spacing(affine: Any, ndim: int) -> list[float]:
    import numpy as np

    a = np.asarray(affine, dtype=np.float64)
    return [float(v) for v in np.sqrt((a[:-1, :-1] ** 2).sum(axis=0))[:ndim]]


def body_mask(image: Any, nbins: int = 256) -> Any:
    """:class:`partialseg.transforms.OtsuForeground`'s body mask (default settings) in NumPy/SciPy,
    without torch: channels averaged, Otsu's threshold, the largest connected component (full
    connectivity, as MONAI's ``get_largest_connected_component_mask``); all True when nothing
    lies above the threshold.

    Args:
        image: ``(C, *spatial)`` array.

    Returns:
        ``(*spatial)`` bool array.

    Example:
        >>> import numpy as np
        >>> img = np.zeros((1, 8, 8)); img[0, 2:6, 3:7] = 5.0; img[0, 0, 0] = 4.0
        >>> np.argwhere(body_mask(img)).min(0).tolist()
        [2, 3]
    """
    import numpy as np
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    image = np.asarray(image)
    if image.shape[0] == 1 and image.dtype.kind in "iu" and image.dtype.itemsize <= 2 and image.size:
        # 8/16-bit integer voxels (CT, 12-bit MR), exact in float32: the same histogram from the
        # distinct values alone (np.histogram bins a value by its value only), one bincount
        flat = image.ravel(order="K")
        low, high = int(flat.min()), int(flat.max())
        if low == high:
            return np.ones(image.shape[1:], dtype=bool)
        counts = np.bincount(flat.astype(np.intp) - low)
        present = np.flatnonzero(counts)
        values = (present + low).astype(np.float32)
        hist, edges = np.histogram(values, bins=nbins, range=(np.float32(low), np.float32(high)), weights=counts[present])
        threshold = threshold_otsu(hist=(hist, (edges[:-1] + edges[1:]) / 2.0))
        mask = image[0] > threshold
    else:
        x = np.asarray(image, dtype=np.float32).mean(axis=0)
        if not x.size or x.min() == x.max():
            return np.ones(x.shape, dtype=bool)
        mask = x > threshold_otsu(x, nbins=nbins)
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return mask if mask.any() else np.ones(mask.shape, dtype=bool)


def case_statistics(
    image: str,
    label: str | None = None,
    annotated: Sequence[int] = (),
    num_classes: int = 2,
    label_map: Mapping[int, Any] | None = None,
    max_samples: int = _SAMPLES_MIN,
) -> dict[str, Any]:
    """One case's contribution to the fingerprint (vectorised NumPy; no per-voxel Python).

    Args:
        image: image file; spatial axes first, channels (if any) after them.
        label: label file, or None for an unlabelled case.
        annotated: global class indices the label annotates.
        num_classes: number of global classes.
        label_map: source value -> class index (or ``[left, right]``), as in a datalist entry.
        max_samples: foreground intensities kept for the percentiles (evenly spaced, in memory order).

    Returns:
        ``spacing`` (mm per spatial axis), ``shape`` and ``cropped_shape`` (the Otsu body box)
        in voxels, ``channels``, foreground ``count`` / ``sum`` / ``sumsq`` (float64, all
        foreground voxels), ``samples`` (float64 array), and ``class_voxels`` (per class: voxels
        of that class if annotated, else None).

    Raises:
        ValueError: a file cannot be read, or the label's grid differs from the image's.
    """
    import numpy as np

    from partialseg.data.validation import read_image, spatial_shape

    img, affine = read_image(image, verify=False)
    lab = None
    if label is not None:
        lab_raw, lab_affine = read_image(label, verify=False)
        lab_shape = spatial_shape(lab_raw.shape, label, lab_raw.ndim)
        lab = np.asarray(lab_raw).reshape(lab_shape)
    spatial = spatial_shape(img.shape, image, None if lab is None else lab.ndim)
    if lab is not None and tuple(lab.shape) != tuple(spatial):
        raise ValueError(f"label {label} has spatial shape {tuple(lab.shape)} but image {image} has {tuple(spatial)}")
    img = np.moveaxis(np.asarray(img).reshape(*spatial, -1), -1, 0)  # (C, *spatial), the stored dtype
    mask = body_mask(img)
    cropped = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        cropped.append(int(hit[-1] - hit[0] + 1))
    out: dict[str, Any] = {
        "spacing": _spacing(affine, len(spatial)),
        "shape": [int(s) for s in spatial],
        "cropped_shape": cropped,
        "channels": int(img.shape[0]),
        "count": 0, "sum": 0.0, "sumsq": 0.0, "samples": np.zeros(0),
        "class_voxels": [None] * num_classes,
    }  # fmt: skip
    if lab is None:
        return out
    if label_map:
        from partialseg.transforms import RemapLabels  # torch: only for sources with a label map

        lab = np.asarray(RemapLabels(label_map)(lab[None], lab_affine))[0]
    elif lab.dtype.kind == "f":
        lab = np.rint(lab).astype(np.int64)
    if lab.size and lab.min() < 0:
        raise ValueError(f"label {label} holds negative values (label values are 0, 1, ...)")
    flat = lab.ravel(order="K")
    counts = np.bincount(flat, minlength=num_classes) if flat.size else np.zeros(num_classes, np.int64)
    for c in annotated:
        out["class_voxels"][c] = int(counts[c]) if c < counts.size else 0
    # foreground: voxels of an annotated non-background class (a partial case's other values are
    # "some unannotated class", unknown, and stay out)
    fg_classes = [c for c in annotated if c != 0 and c < counts.size]
    if fg_classes:
        lut = np.zeros(counts.size, dtype=bool)
        lut[fg_classes] = True
        fg_mask = lut[lab]
        gray = img[0] if img.shape[0] == 1 else img.astype(np.float32).mean(axis=0)  # channels averaged, as for Otsu
        values = gray[fg_mask].astype(np.float64)
        out["count"] = int(values.size)
        out["sum"] = float(values.sum())
        out["sumsq"] = float(np.square(values).sum())
        if values.size > max_samples:
            values = values[np.linspace(0, values.size - 1, max_samples).astype(np.int64)]
        out["samples"] = values
    return out


def _stats_job(job: tuple) -> dict[str, Any]:
    return case_statistics(*job)


def dataset_hash(ds: Any, dataset_json: str | os.PathLike | None) -> str:
    """A hash of ``dataset.json`` and of each training file's path, size and modification time."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"partialseg-fingerprint-v{_VERSION}".encode())
    if dataset_json is not None and os.path.isfile(dataset_json):
        h.update(Path(dataset_json).read_bytes())
    else:
        h.update(json.dumps(ds.to_json(), sort_keys=True, default=str).encode())
    for case in ds.splits.get("training", []):
        for path in (case["image"], case.get("label")):
            if path is None:
                continue
            try:
                st = os.stat(path)
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            except OSError:
                h.update(f"{path}\0missing\0".encode())
    return h.hexdigest()


def _median(values: Sequence[Sequence[float]]) -> list[float]:
    import numpy as np

    return [float(v) for v in np.median(np.asarray(values, dtype=np.float64), axis=0)]


def _aggregate(ds: Any, cases: list[dict[str, Any]], stats: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    dims = {len(s["shape"]) for s in stats}
    if len(dims) > 1:
        by_dim = {d: next(c["case"] for c, s in zip(cases, stats) if len(s["shape"]) == d) for d in sorted(dims)}
        raise ValueError(f"training cases mix spatial dimensions {sorted(dims)} (e.g. {by_dim}); one dataset holds 2D slices or 3D volumes")
    ndim = dims.pop()
    modalities: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(str(c.get("modality") or "unknown") for c in cases):
        idx = [i for i, c in enumerate(cases) if str(c.get("modality") or "unknown") == name]
        spacing = np.asarray([stats[i]["spacing"] for i in idx])
        cropped_mm = np.asarray([np.asarray(stats[i]["cropped_shape"]) * np.asarray(stats[i]["spacing"]) for i in idx])
        count = sum(stats[i]["count"] for i in idx)
        fg: dict[str, Any] = {"voxels": int(count)}
        if count:
            total, total_sq = sum(stats[i]["sum"] for i in idx), sum(stats[i]["sumsq"] for i in idx)
            mean = total / count
            samples = np.concatenate([stats[i]["samples"] for i in idx])
            p_lo, p_hi = np.percentile(samples, [0.5, 99.5])
            fg.update(mean=float(mean), std=float(math.sqrt(max(total_sq / count - mean * mean, 0.0))),
                      percentile_00_5=float(p_lo), percentile_99_5=float(p_hi))  # fmt: skip
        modalities[name] = {
            "cases": len(idx),
            "channels": sorted({stats[i]["channels"] for i in idx}),
            "spacing_median": _median(spacing),
            "spacing_min": [float(v) for v in spacing.min(0)],
            "spacing_max": [float(v) for v in spacing.max(0)],
            "shape_median": _median([stats[i]["shape"] for i in idx]),
            "cropped_shape_median": _median([stats[i]["cropped_shape"] for i in idx]),
            "cropped_mm_median": _median(cropped_mm),
            "foreground": fg,
        }
    classes: dict[str, dict[str, Any]] = {}
    for c, cname in enumerate(ds.classes):
        annotating = [i for i, case in enumerate(cases) if c in case["annotated"]]
        present = [i for i in annotating if (stats[i]["class_voxels"][c] or 0) > 0]
        voxels = np.asarray([stats[i]["class_voxels"][c] for i in present], dtype=np.float64)
        mm3 = np.asarray([stats[i]["class_voxels"][c] * float(np.prod(stats[i]["spacing"])) for i in present])
        classes[cname] = {
            "index": c,
            "cases_annotated": len(annotating),
            "cases_present": len(present),
            "sources": sorted({cases[i]["source"] for i in annotating}),
            "voxels_median": float(np.median(voxels)) if present else 0.0,
            "voxels_min": float(voxels.min()) if present else 0.0,
            "mm3_median": float(np.median(mm3)) if present else 0.0,
        }
    sources: dict[str, dict[str, Any]] = {}
    everything = set(range(len(ds.classes)))
    for name in dict.fromkeys(c["source"] for c in cases):
        own = [c for c in cases if c["source"] == name]
        labelled = [c for c in own if c.get("label") is not None]
        sources[name] = {
            "cases": len(own),
            "labelled": len(labelled),
            "fully_labelled": bool(labelled) and all(set(c["annotated"]) == everything for c in labelled),
            "annotates": [ds.classes[i] for i in sorted(set().union(*[set(c["annotated"]) for c in labelled]))] if labelled else [],
        }
    return {
        "version": _VERSION,
        "dataset": ds.name,
        "classes": list(ds.classes),
        "spatial_dims": ndim,
        "cases": len(cases),
        "labelled_cases": sum(1 for c in cases if c.get("label") is not None),
        "validation_cases": [c["case"] for c in ds.splits.get("validation", [])],
        "training_cases": [c["case"] for c in cases],
        "fully_labelled_cases": [c["case"] for c in cases if c.get("label") is not None and set(c["annotated"]) == everything],
        "voxels_total": float(sum(float(np.prod(s["shape"])) for s in stats)),
        "modalities": modalities,
        "class_stats": classes,
        "sources": sources,
        "full_sources": [n for n, s in sources.items() if s["fully_labelled"]],
        "spacings": [s["spacing"] for s in stats],
        "cropped_shapes": [s["cropped_shape"] for s in stats],
    }


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def fingerprint_dataset(
    dataset: str | os.PathLike | Any, workers: int | None = None, progress: bool = False, cache: bool = True
) -> dict[str, Any]:
    """The fingerprint of a dataset's training split (see the module docstring).

    Args:
        dataset: a dataset folder (or its ``dataset.json``), or a :class:`PartialDataset`.
        workers: processes reading cases (default: every CPU; 1 reads in this process).
        progress: a tqdm progress bar over cases on stderr.
        cache: reuse / write ``.partialseg_fingerprint.json`` beside ``dataset.json`` (skipped
            when that folder is read-only or the dataset is in memory).

    Returns:
        a JSON-able dict: ``modalities`` (per modality: ``spacing_median``, ``cropped_shape_median``,
        ``foreground`` mean / std / percentiles, ...), ``class_stats`` (per class: ``sources``,
        sizes), ``sources`` (``fully_labelled``), ``full_sources``, ``spacings`` (per case),
        ``hash``.

    Raises:
        ValueError: a case cannot be read (the message names the case; ``partialseg check``
            lists every problem), or the training split is empty.
    """
    from partialseg._checks import check_int
    from partialseg.data.spec import PartialDataset, load_dataset

    if isinstance(dataset, PartialDataset):
        ds = dataset
        json_path = None if dataset.root is None else dataset.root / "dataset.json"
    else:
        p = Path(dataset)
        json_path = p / "dataset.json" if p.is_dir() else p
        ds = load_dataset(json_path)
    workers = _default_workers() if workers is None else check_int(workers, "workers", minimum=1)
    cases = ds.datalist("training")
    if not cases:
        raise ValueError(f"dataset {ds.name!r} has no training case to fingerprint")
    digest = dataset_hash(ds, json_path)
    cache_file = Path(json_path).parent / FINGERPRINT_NAME if (cache and json_path is not None) else None
    if cache_file is not None and cache_file.is_file():
        try:
            stored = json.loads(cache_file.read_text())
            if stored.get("hash") == digest and stored.get("version") == _VERSION:
                return stored["fingerprint"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # an unreadable cache is rebuilt
    per_case = max(_SAMPLES_MIN, _SAMPLES_TOTAL // len(cases))
    jobs = [(c["image"], c.get("label"), c["annotated"], ds.num_classes, c.get("label_map"), per_case) for c in cases]
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="fingerprint", unit="case", disable=not progress)
    stats: list[dict[str, Any]] = []
    try:
        if workers == 1 or len(jobs) < 2 * workers:
            for job, case in zip(jobs, cases):
                stats.append(_read_case(job, case))
                bar.update(1)
        else:
            from concurrent.futures import ProcessPoolExecutor

            if any(c.get("label_map") for c in cases):
                import partialseg.transforms  # noqa: F401 - imported once here, not in every forked worker

            with ProcessPoolExecutor(max_workers=workers) as pool:
                for k, result in enumerate(pool.map(_safe_job, jobs, chunksize=max(1, len(jobs) // (workers * 8)))):
                    if isinstance(result, str):
                        raise ValueError(f"case {cases[k]['case']!r}: {result} (run `partialseg check` for every problem)")
                    stats.append(result)
                    bar.update(1)
    finally:
        bar.close()
    fp = _aggregate(ds, cases, stats)
    fp["hash"] = digest
    if cache_file is not None:
        try:
            tmp = cache_file.with_name(cache_file.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": _VERSION, "hash": digest, "fingerprint": fp}))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only dataset folder: only the cache is lost
    return fp


def _read_case(job: tuple, case: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return _stats_job(job)
    except (OSError, ValueError) as e:
        raise ValueError(f"case {case['case']!r}: {e} (run `partialseg check` for every problem)") from None


def _safe_job(job: tuple) -> dict[str, Any] | str:
    try:
        return _stats_job(job)
    except (OSError, ValueError) as e:
        return str(e)


# ----------------------------------------------------------------------------------------------
# planning rules


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[float]] | None = None,
                   anisotropy: float = ANISOTROPY) -> tuple[list[float], str]:
    """nnU-Net's target spacing: the median per axis; when the coarsest median axis is more than
    ``anisotropy`` times the others (and, given ``shapes``, also has ``anisotropy`` times fewer
    voxels than the others, nnU-Net's second condition), that axis takes its 10th percentile
    instead (not finer than the other axes), so thin-slice cases are not thrown away by
    resampling to the typical thick slice.

    Args:
        spacings: one spacing per case, ``(N, D)``.
        shapes: one shape (voxels; nnU-Net: after the body crop) per case, ``(N, D)``, or None.

    Returns:
        the spacing and the reason.

    Example:
        >>> target_spacing([[1, 1, 5], [1, 1, 3], [1, 1, 2.5], [1, 1, 5]])[0]
        [1.0, 1.0, 2.65]
        >>> target_spacing([[1, 1, 5], [1, 1, 3], [1, 1, 2.5], [1, 1, 5]], shapes=[[200, 200, 100]] * 4)[0]  # 100 * 3 > 200
        [1.0, 1.0, 4.0]
        >>> target_spacing([[0.8, 0.8], [0.8, 0.8]])[0]
        [0.8, 0.8]
    """
    import numpy as np

    s = np.asarray(spacings, dtype=np.float64)
    median = np.median(s, axis=0)
    out = [float(round(v, 4)) for v in median]
    if s.shape[1] < 2:
        return out, f"median spacing over {len(s)} cases"
    coarse = int(np.argmax(median))
    others = np.delete(median, coarse)
    ratio = float(median[coarse] / others.max())
    aniso_voxels = True
    if shapes is not None:
        size = np.median(np.asarray(shapes, dtype=np.float64), axis=0)
        aniso_voxels = bool(size[coarse] * anisotropy < np.delete(size, coarse).min())
    if ratio > anisotropy and aniso_voxels:
        value = max(float(np.percentile(s[:, coarse], 10)), float(others.max()))
        out[coarse] = float(round(value, 4))
        return out, (f"median spacing per axis; axis {coarse} is {ratio:.1f}x coarser than the others (> {anisotropy:g})"
                     + (" with that many times fewer voxels" if shapes is not None else "")
                     + f": it takes its 10th percentile {value:.3g} mm (nnU-Net's anisotropy rule)")  # fmt: skip
    if ratio > anisotropy:
        return out, (f"median spacing per axis over {len(s)} cases (axis {coarse} is {ratio:.1f}x coarser but not {anisotropy:g}x"
                     " shorter in voxels: nnU-Net keeps its median)")  # fmt: skip
    return out, f"median spacing per axis over {len(s)} cases (coarsest / others {ratio:.2f} <= {anisotropy:g})"


def _topology(patch: Sequence[int], spacing: Sequence[float], max_levels: int = 5) -> list[list[int]]:
    """Per-level strides (nnU-Net's rule): an axis is halved while its feature map stays at least
    ``2 * MIN_FEATURE`` voxels and its spacing is at most twice the finest current spacing."""
    size, sp, strides = list(patch), list(spacing), []
    for _ in range(max_levels):
        finest = min(sp)
        step = [2 if size[a] >= 2 * MIN_FEATURE and sp[a] <= 2 * finest else 1 for a in range(len(size))]
        if not any(s == 2 for s in step):
            break
        strides.append(step)
        size = [z // s for z, s in zip(size, step)]
        sp = [v * s for v, s in zip(sp, step)]
    return strides


def _divisor(strides: Sequence[Sequence[int]], ndim: int) -> list[int]:
    return [int(math.prod(s[a] for s in strides)) for a in range(ndim)]


def estimate_memory(patch: Sequence[int], batch: int, channels: Sequence[int], strides: Sequence[Sequence[int]],
                    in_channels: int = 1, out_channels: int = 2, factor: float = 1.0) -> float:
    """Training memory of a UNet batch, in bytes (a coarse model, as nnU-Net's VRAM estimate).

    ``4 * batch * ACTIVATION_FACTOR * sum_l channels[l] * voxels_l`` plus the input and output
    maps, ``voxels_l`` being the patch's voxels at level ``l`` (after the strides so far).

    Example:
        >>> round(estimate_memory([64, 64], 1, [32, 64], [[2, 2]]) / 2**20, 2)
        18.09
    """
    voxels = float(math.prod(patch))
    total, scale = 0.0, 1.0
    for level, ch in enumerate(channels):
        total += ch * voxels / scale
        if level < len(strides):
            scale *= math.prod(strides[level])
    return 4.0 * batch * factor * (ACTIVATION_FACTOR * total + 2 * (in_channels + out_channels) * voxels)


def _fit_patch(start: Sequence[float], spacing: Sequence[float], budget: float, profile: Mapping[str, Any],
               num_classes: int) -> tuple[list[int], list[list[int]], list[int], int, float]:
    """The largest patch, shrunk from ``start`` (voxels) along its relatively largest axis, whose
    batch of 2 fits ``budget`` bytes; its strides, channels and the batch that fills the budget."""
    ndim = len(start)
    target = [max(1.0, float(v)) for v in start]
    in_ch, out_ch = (1 + 2 * num_classes, 2 * num_classes) if profile["mode"] == "slice" else (1, num_classes)

    def shape_for(patch):
        strides = _topology(patch, spacing)
        div = _divisor(strides, ndim)
        patch = [max(d, int(math.ceil(p / d)) * d) for p, d in zip(patch, div)]
        strides = _topology(patch, spacing)
        channels = [min(profile["base_channels"] * 2**level, profile["max_channels"]) for level in range(len(strides) + 1)]
        return patch, strides, channels

    patch = [max(1, int(round(v))) for v in target]
    least = int(profile.get("fixed_batch", 2))
    while True:
        patch, strides, channels = shape_for(patch)
        need = estimate_memory(patch, least, channels, strides, in_ch, out_ch, profile["memory_factor"])
        if need <= budget or all(p <= 2 * MIN_FEATURE for p in patch):
            break
        # nnU-Net: shrink the axis that is largest relative to the median shape, by its divisor
        axis = max(range(ndim), key=lambda a: (patch[a] / target[a], patch[a]))
        div = _divisor(strides, ndim)[axis]
        patch[axis] = max(2 * MIN_FEATURE, patch[axis] - max(div, 1))
        patch[axis] = max(1, patch[axis])
    one = estimate_memory(patch, 1, channels, strides, in_ch, out_ch, profile["memory_factor"])
    return patch, strides, channels, max(1, int(budget // one)), one


def make_plan(fingerprint: Mapping[str, Any], bundle: str | None = None, device: str = "cpu",
              memory: float | None = None) -> dict[str, Any]:
    """A bundle's settings from a fingerprint, each with the reason it was chosen.

    Args:
        fingerprint: from :func:`fingerprint_dataset`.
        bundle: a name of :data:`BUNDLES` (default: ``dcl_cardiac`` for 2D data,
            ``marginal_exclusion_abdomen`` for 3D).
        device: ``"cpu"`` or ``"cuda"``: the default memory budget.
        memory: memory budget in GB for a training batch (default :data:`DEFAULT_MEMORY`).

    Returns:
        ``{"bundle", "device", "memory_gb", "settings": {config key: value}, "reasons": {key:
        text}, "warnings": [...]}``; ``settings`` also holds ``classes``, ``normalization`` (per
        modality) and ``validation`` (not bundle keys, read by the docs and tables).

    Raises:
        ValueError: an unknown bundle or device, a bad memory budget, or a bundle whose grid
            (2D / 3D) does not fit the dataset's.
    """
    import numpy as np

    from partialseg._checks import check_float, check_option

    ndim = int(fingerprint["spatial_dims"])
    if bundle is None:
        bundle = "dcl_cardiac" if ndim == 2 else "marginal_exclusion_abdomen"
    bundle = check_option(bundle, BUNDLES, "bundle")
    device = check_option(device, tuple(DEFAULT_MEMORY), "device")
    memory = DEFAULT_MEMORY[device] if memory is None else check_float(memory, "memory", minimum=0.0, include_minimum=False)
    profile = BUNDLES[bundle]
    if profile["spatial_dims"] != ndim:
        raise ValueError(f"bundle {bundle!r} trains on {profile['spatial_dims']}D data but dataset {fingerprint['dataset']!r} "
                         f"holds {ndim}D cases: plan it for another bundle (--bundle)")  # fmt: skip
    if profile["mode"] == "frames":
        return _plan_frames(fingerprint, bundle, device, memory)
    settings: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    warnings: list[str] = []
    classes = list(fingerprint["classes"])

    spacing, why = target_spacing(fingerprint["spacings"], fingerprint.get("cropped_shapes"))
    settings["pixdim"], reasons["pixdim"] = spacing, why

    # the median extent in mm (body crop for patches; the whole field of view for slices, which the
    # DCL bundle centre-crops) divided by the target spacing
    mods = fingerprint["modalities"]
    weights = {m: v["cases"] for m, v in mods.items()}
    if profile.get("grid") == "atlas":
        # build-atlas resizes every case's body crop to the mean cropped shape: patches come from that grid
        shape = np.mean(np.asarray(fingerprint["cropped_shapes"], dtype=np.float64), axis=0)
        mm = shape * np.asarray(spacing)
        what = "mean body-cropped (Otsu) shape (the atlas grid that build-atlas resizes every case to),"
    elif profile["mode"] == "patch":
        mm = np.average([v["cropped_mm_median"] for v in mods.values()], axis=0, weights=list(weights.values()))
        what = "median body-cropped (Otsu) extent"
    else:
        mm = np.average([np.asarray(v["shape_median"]) * np.asarray(v["spacing_median"]) for v in mods.values()], axis=0,
                        weights=list(weights.values()))  # fmt: skip
        what = "median field of view"
    start = [float(round(m / s, 2)) for m, s in zip(mm, spacing)]
    least = profile.get("min_patch", 0)
    if least and min(start) < least:
        what += f" raised to at least {least} voxels per axis (the discriminator's stride-2 layers),"
        start = [max(v, float(least)) for v in start]
    budget = memory * 2**30
    patch, strides, channels, batch, per_patch = _fit_patch(start, spacing, budget, profile, len(classes))
    median_voxels = [int(round(v)) for v in start]
    shrunk = any(p < round(v) for p, v in zip(patch, start))
    key = profile["patch_key"]
    settings[key] = patch
    reasons[key] = (f"{what} {[round(float(v)) for v in mm]} mm = {median_voxels} voxels at the target spacing, rounded up to a"
                    f" multiple of the network's total stride {_divisor(strides, ndim)}"
                    + (f", shrunk along its relatively largest axis to fit {memory:g} GB ({device})" if shrunk else ""))  # fmt: skip
    # nnU-Net: a batch covers at most 5% of the dataset's voxels; at least 2
    cap = max(2, int(0.05 * fingerprint["voxels_total"] / math.prod(patch)))
    if profile.get("fixed_batch"):
        settings["batch_size"] = int(profile["fixed_batch"])
        reasons["batch_size"] = (f"fixed by the method (two-stream batches, half labelled), not planned: the patch is sized so"
                                 f" that {profile['fixed_batch']} fit {memory:g} GB ({device})")  # fmt: skip
    else:
        settings["batch_size"] = int(min(max(batch, 2), cap))
        reasons["batch_size"] = (f"{batch} patch(es) of {patch} fit {memory:g} GB ({device}; estimate {per_patch / 2**20:.0f} MiB"
                             f" per patch); at least 2, at most {cap} (5% of the dataset's voxels, nnU-Net)")  # fmt: skip
    settings[profile["channels_key"]] = channels
    settings[profile["strides_key"]] = [s[0] if len(set(s)) == 1 else s for s in strides]
    if profile.get("dynunet_strides"):
        settings[profile["strides_key"]] = [1, *settings[profile["strides_key"]]]
    if profile.get("feature_levels"):
        # MICPAM reads the decoder's intermediate scales: the paper's three need five levels
        levels = len(channels)
        settings["network_def#feature_levels"] = max(1, min(profile["feature_levels"], levels - 2))
        reasons["network_def#feature_levels"] = (
            f"the decoder scales the prototype modules read: the paper's {profile['feature_levels']}" if levels - 2 >= profile["feature_levels"]
            else f"{levels - 2} (the paper's {profile['feature_levels']} need {profile['feature_levels'] + 2} levels; the patch allows {levels})")  # fmt: skip
    reasons[profile["channels_key"]] = (f"{len(strides)} downsamplings: each axis halved while its map stays >= {2 * MIN_FEATURE} voxels and"
                                        f" its spacing <= 2x the finest; width {profile['base_channels']} doubling, at most {profile['max_channels']}")  # fmt: skip
    reasons[profile["strides_key"]] = "per-level strides of that rule (an axis with stride 1 keeps its resolution)"

    normalization: dict[str, Any] = {}
    for name, m in mods.items():
        fg = m["foreground"]
        if name.upper().startswith("CT") and fg.get("voxels"):
            normalization[name] = {"scheme": "ct", "clip": [fg["percentile_00_5"], fg["percentile_99_5"]], "mean": fg["mean"], "std": fg["std"]}
        else:
            normalization[name] = {"scheme": "zscore"}
    settings["normalization"] = normalization
    reasons["normalization"] = ("CT: clip to the foreground's 0.5 / 99.5 percentiles, then z-score with the foreground's mean and std"
                                " (HU are comparable across scans); other modalities: z-score per case (arbitrary units)")  # fmt: skip
    first = next(iter(mods.values()))["foreground"]
    if "intensity_by_modality" in profile["config_keys"]:
        # a bundle that windows CT to [-1, 1] and z-scores every other modality per case (the atlas paper's)
        settings["intensity_by_modality"] = {name: "window" if s["scheme"] == "ct" else "zscore" for name, s in normalization.items()}
        reasons["intensity_by_modality"] = ("each modality of the dataset: CT windowed to [-1, 1] (ct_window, the paper's [-325, 325]"
                                            " HU: a soft-tissue window that also covers the organs no CT case labels, which the labelled"
                                            " foreground's percentiles would clip), the others z-scored per case (the paper)")  # fmt: skip
    elif "intensity_clip" in profile["config_keys"]:
        # a bundle that z-scores (NormalizeIntensityd): CT clipped to the foreground percentiles and z-scored
        # with the foreground's mean / std; other modalities per case (both None)
        scheme = normalization[next(iter(mods))]
        ct = scheme["scheme"] == "ct"
        settings["intensity_clip"] = [round(scheme["clip"][0], 4), round(scheme["clip"][1], 4)] if ct else None
        settings["intensity_stats"] = [round(scheme["mean"], 4), round(scheme["std"], 4)] if ct else None
        reasons["intensity_clip"] = (f"{next(iter(mods))}: " + ("the foreground's 0.5 / 99.5 percentiles (CT)" if ct else "none (not CT)"))
        reasons["intensity_stats"] = (f"{next(iter(mods))}: " + ("z-score with the foreground's mean and std (CT)" if ct
                                                                  else "none: z-score per case (not CT)"))  # fmt: skip
        if len(mods) > 1:
            warnings.append(f"modalities {list(mods)}: the bundle normalises every case as {next(iter(mods))}")
    elif first.get("voxels"):
        settings["intensity_range"] = [round(first["percentile_00_5"], 4), round(first["percentile_99_5"], 4)]
        reasons["intensity_range"] = f"foreground 0.5 / 99.5 percentiles of {next(iter(mods))} (the bundles' ScaleIntensityRanged window)"
    else:
        warnings.append("no labelled foreground voxel: intensity_range keeps the bundle's default")

    settings["classes"] = classes
    settings["num_classes"] = len(classes)
    reasons["num_classes"] = f"dataset.json lists {len(classes)} classes: {', '.join(classes)}"
    settings["full_sources"] = list(fingerprint["full_sources"])
    if profile.get("grid") == "atlas":  # neither resampled, staged nor z-scored by a dataset statistic
        del settings["full_sources"], settings["pixdim"], settings["normalization"]
        reasons.pop("pixdim"), reasons.pop("normalization")
    elif profile.get("semi_supervised"):
        del settings["full_sources"]
    elif fingerprint["full_sources"]:
        reasons["full_sources"] = "sources whose every labelled case annotates all classes (stage 1 trains on them)"
    else:
        reasons["full_sources"] = "no source labels every class"
        if bundle == "marginal_exclusion_abdomen":
            warnings.append("no fully labelled source: stage 1 has no data; train stage 2 directly (--stage 2 --init_from_stage1 false)")
    if bundle == "dcl_cardiac":
        never = [c for c, s in fingerprint["class_stats"].items() if s["cases_annotated"] == 0]
        settings["missing"] = "any" if never else "error"
        if len(never) == 1:
            # measured (bundles/dcl_cardiac/docs/README.md): the one unannotated class is learned as the
            # complement of the others; no loss on cardiac2d when it is the background
            reasons["missing"] = (f"no case annotates {never[0]}: its conditional image is drawn from any slice; as the only"
                                  " unannotated class it is learned as what the annotated classes are not")  # fmt: skip
        elif never:
            reasons["missing"] = f"no case annotates {', '.join(never)}: their conditional images are drawn from any slice"
            warnings.append(f"no case annotates {', '.join(never)}: with missing='any' nothing tells these {len(never)} classes apart,"
                            " so the model splits their union between them (measured on cardiac2d without RV annotations: RV Dice"
                            " 0.11, a third of the background predicted as RV); annotate all of them but one in some cases"
                            " (a fully labelled slice annotates every class)")  # fmt: skip
        else:
            reasons["missing"] = "every class, background included, is annotated by some case"
    val = fingerprint["validation_cases"]
    if profile.get("validates", True) is False and not val:
        settings["validation"] = {"split": None}
        reasons["validation"] = "none: the bundle trains on every labelled case and keeps its final weights"
    elif profile.get("semi_supervised") and not val:
        settings["validation"] = {"split": None}
        reasons["validation"] = "none: the bundle trains on every case (--val_split validation validates on a 'validation' list)"
    elif val:
        settings["validation"] = {"split": "validation", "cases": len(val)}
        reasons["validation"] = f"the dataset's own validation list ({len(val)} cases)"
    else:
        pool = fingerprint["fully_labelled_cases"] or fingerprint["training_cases"]
        proposed = sorted(pool)[::5] or sorted(pool)[:1]
        settings["validation"] = {"split": None, "proposed": proposed}
        reasons["validation"] = (f"dataset.json has no 'validation' list, which the bundles need: move these {len(proposed)} case(s)"
                                 " (every 5th fully labelled case by name) there")  # fmt: skip
        warnings.append(f"no 'validation' split: the bundles validate on it; proposed: {proposed}")
    for name, m in mods.items():
        if len(m["channels"]) > 1 or m["channels"][0] != 1:
            warnings.append(f"modality {name}: images have {m['channels']} channel(s); the bundles' networks take in_channels=1")
    return {"bundle": bundle, "device": device, "memory_gb": memory, "settings": settings, "reasons": reasons, "warnings": warnings}


def _plan_frames(fingerprint: Mapping[str, Any], bundle: str, device: str, memory: float) -> dict[str, Any]:
    """:func:`make_plan` for a bundle that resizes whole 2D frames (photographs, endoscopy: no
    physical spacing): the frame size, the pairs per batch, the classes and the input channels."""
    import numpy as np

    profile = BUNDLES[bundle]
    mods = fingerprint["modalities"]
    settings: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    warnings: list[str] = []
    classes = list(fingerprint["classes"])
    stride = int(profile["stride"])
    median = np.average([v["shape_median"] for v in mods.values()], axis=0, weights=[v["cases"] for v in mods.values()])
    target = [max(float(stride), float(v)) for v in median]
    size = [int(math.ceil(v / stride)) * stride for v in target]
    channels = [min(profile["base_channels"] * 2**level, profile["max_channels"]) for level in range(5)]
    strides = [[2, 2]] * 4
    in_ch = int(max(c for v in mods.values() for c in v["channels"]))
    out_ch = len(classes)
    per_pair = lambda shape: profile["frames_per_pair"] * estimate_memory(shape, 1, channels, strides, in_ch, out_ch, profile["memory_factor"])  # noqa: E731
    budget = memory * 2**30
    while per_pair(size) * 2 > budget and max(size) > stride:
        axis = max(range(2), key=lambda a: (size[a] / target[a], size[a]))  # the relatively largest side, by one stride
        size[axis] = max(stride, size[axis] - stride)
    shrunk = any(s < t for s, t in zip(size, target))
    settings["spatial_size"] = size
    reasons["spatial_size"] = (f"median frame {[round(float(v)) for v in median]} pixels, rounded up to a multiple of the network's output"
                               f" stride {stride}" + (f", shrunk along its relatively largest side to fit 2 pairs in {memory:g} GB ({device})"
                                                       if shrunk else ""))  # fmt: skip
    pairs = int(min(max(budget // per_pair(size), 2), profile["max_pairs"]))
    settings["pairs_per_batch"] = pairs
    reasons["pairs_per_batch"] = (f"{int(budget // per_pair(size))} pair(s) of {size} frames fit {memory:g} GB ({device}; estimate"
                                  f" {per_pair(size) / 2**20:.0f} MiB per pair: per network its tutorial and the mixed frame"
                                  f" trained, the other tutorial forward only, two networks); at least 2, at most"
                                  f" {profile['max_pairs']} (the paper's batch of {2 * profile['max_pairs']} frames)")  # fmt: skip
    settings["classes"] = classes
    settings["num_classes"] = len(classes)
    reasons["num_classes"] = f"dataset.json lists {len(classes)} classes: {', '.join(classes)}"
    settings["in_channels"] = in_ch
    counts = sorted({c for v in mods.values() for c in v["channels"]})
    reasons["in_channels"] = f"the frames' channels ({'RGB' if in_ch == 3 else in_ch})"
    if len(counts) > 1:
        warnings.append(f"frames have {counts} channels: the network takes {in_ch}; frames with fewer are refused when loaded")
    val = fingerprint["validation_cases"]
    if val:
        settings["validation"] = {"split": "validation", "cases": len(val)}
        reasons["validation"] = f"the dataset's own validation list ({len(val)} cases): train with --val_split validation"
    else:
        settings["validation"] = {"split": None}
        reasons["validation"] = "none: the bundle keeps its final weights (--val_split validation validates on a 'validation' list)"
    return {"bundle": bundle, "device": device, "memory_gb": memory, "settings": settings, "reasons": reasons, "warnings": warnings}


# ----------------------------------------------------------------------------------------------
# plan.json


def plan_dataset(dataset_dir: str | os.PathLike, bundle: str | None = None, device: str = "cpu", memory: float | None = None,
                 workers: int | None = None, progress: bool = False, cache: bool = True, write: bool = True) -> dict[str, Any]:
    """Fingerprint ``dataset_dir``, plan ``bundle`` and write ``plan.json`` beside ``dataset.json``.

    ``plan.json`` holds ``fingerprint`` and ``plans`` (bundle name -> :func:`make_plan`'s
    result); planning another bundle adds its entry and keeps the others.

    Returns:
        the whole ``plan.json`` dict.
    """
    p = Path(dataset_dir)
    root = p if p.is_dir() else p.parent
    fp = fingerprint_dataset(p, workers=workers, progress=progress, cache=cache)
    plan = make_plan(fp, bundle=bundle, device=device, memory=memory)
    out: dict[str, Any] = {"version": _VERSION, "dataset_hash": fp["hash"], "plans": {}}
    path = root / PLAN_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("dataset_hash") == fp["hash"]:
                out["plans"].update(old.get("plans", {}))
        except (OSError, ValueError, AttributeError):
            pass
    out["plans"][plan["bundle"]] = plan
    out["fingerprint"] = {k: v for k, v in fp.items() if k not in ("spacings", "cropped_shapes", "training_cases", "fully_labelled_cases")}
    if write:
        tmp = path.with_name(f".{PLAN_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out, indent=2))
        os.replace(tmp, path)
    return out


#: planned settings that are not bundle config keys (read by people and the docs)
NOT_CONFIG_KEYS = ("classes", "normalization", "validation")


def bundle_overrides(settings: Mapping[str, Any], bundle: str | None = None) -> dict[str, Any]:
    """The planned settings that are config keys of ``bundle`` (``pixdim``, ``network_def#channels``,
    ...; None: of any bundle), as ``monai.bundle run`` overrides.

    Example:
        >>> bundle_overrides({"pixdim": [1.5, 1.5], "classes": ["background", "a"], "num_classes": 2, "missing": "any"},
        ...                  "marginal_exclusion_abdomen")
        {'pixdim': [1.5, 1.5], 'num_classes': 2}
    """
    keys = BUNDLES[bundle]["config_keys"] if bundle is not None else None
    return {k: v for k, v in settings.items() if k not in NOT_CONFIG_KEYS and (keys is None or k in keys)}


def format_command(dataset_dir: str | os.PathLike, bundle: str, settings: Mapping[str, Any]) -> str:
    """A ``python -m monai.bundle run`` command line (run in the bundle's folder) that trains
    ``bundle`` on ``dataset_dir`` with the planned settings as overrides.

    Example:
        >>> print(format_command("/data/mine", "dcl_cardiac", {"pixdim": [0.8, 0.8], "missing": "any"}))
        python -m monai.bundle run --config_file configs/train.json --meta_file configs/metadata.json --bundle_root . \\
            --dataset_dir /data/mine --pixdim '[0.8, 0.8]' --missing any
    """
    import shlex

    parts = [f"--dataset_dir {shlex.quote(str(dataset_dir))}"]
    for key, value in bundle_overrides(settings, bundle).items():
        parts.append(f"--{key} {shlex.quote(repr(value))}" if not isinstance(value, str) else f"--{key} {shlex.quote(value)}")
    return ("python -m monai.bundle run --config_file configs/train.json --meta_file configs/metadata.json --bundle_root . \\\n    "
            + " ".join(parts))


def _dataset_root(dataset_dir: str | os.PathLike) -> Path:
    """The dataset folder of ``dataset_dir`` (a folder, or its ``dataset.json``)."""
    p = Path(dataset_dir)
    return p.parent if p.suffix == ".json" else p


class PlanSettings(dict):
    """Planned settings by config key; a nested key may be looked up with MONAI's ``::`` separator
    too (MONAI's config parser rewrites ``#`` to ``::`` inside config strings, so
    ``"$@dataset_plan.get('network_def#channels', ...)"`` asks for ``network_def::channels``).

    Example:
        >>> PlanSettings({"network_def#strides": [2, 2]}).get("network_def::strides")
        [2, 2]
    """

    @staticmethod
    def _key(key: Any) -> Any:
        return key.replace("::", "#") if isinstance(key, str) else key

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(self._key(key), default)

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self._key(key))

    def __contains__(self, key: Any) -> bool:
        return super().__contains__(self._key(key))


#: dataset folders already told that they hold no plan (one notice per process)
_NOTICED: set[str] = set()


def _user_dataset(root: Path) -> bool:
    """Whether ``root`` holds a ``dataset.json`` that no synthetic generator wrote (no ``family`` key)."""
    try:
        return "family" not in json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError, TypeError):
        return False  # none, or unreadable: reported by whoever reads it


def _plans_bundle(path: Path, bundle: str) -> bool:
    try:
        return bool(json.loads(path.read_text())["plans"].get(bundle))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True  # an unreadable plan.json is reported below, never overwritten


def plan_on_first_run(root: Path, bundle: str, device: Any = "cpu") -> None:
    """Plan ``bundle`` for the user dataset at ``root`` (training's first run): fingerprint with a
    progress bar, write ``plan.json``, print the table. Under ``torchrun`` every rank computes the
    same plan (atomic writes); only rank 0 shows the bar and the table."""
    import sys

    kind = getattr(device, "type", None) or str(device).split(":")[0]
    kind = kind if kind in DEFAULT_MEMORY else "cpu"
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0
    if rank0:
        print(f"partialseg: {root} holds no plan for {bundle}: planning it now, for {kind} (first training run; `partialseg plan"
              f" {root} --bundle {bundle}` does the same, --plan_on_first_run false keeps the built-in settings)",
              file=sys.stderr, flush=True)  # fmt: skip
    plan = plan_dataset(root, bundle=bundle, device=kind, progress=rank0)
    if rank0:
        print(format_plan(plan, bundle=bundle) + f"\n\nwritten: {root / PLAN_NAME}", flush=True)


def load_plan(dataset_dir: str | os.PathLike | None, bundle: str, notice: bool = True, plan_missing: bool = False,
              device: Any = "cpu") -> PlanSettings:
    """The settings planned for ``bundle`` in ``dataset_dir/plan.json``; ``{}`` when there is none.

    What bundle configs call (``"dataset_plan": "$partialseg.data.plan.load_plan(@dataset_dir,
    '<bundle>')"``, then ``"pixdim": "$@dataset_plan.get('pixdim', [default])"``), so that a
    dataset with a plan needs no override and a command-line override of a key still wins. A plan
    made before the dataset last changed (files added, replaced or touched) is used with a warning
    on stderr. A dataset of the user's (a ``dataset.json`` that no synthetic generator wrote: no
    ``family`` key) without a plan gets a notice on stderr naming the command that plans it; the
    bundle's defaults then apply. Nothing is read or generated when the folder does not exist.

    With ``plan_missing`` (the bundles' ``train.json``: ``plan_on_first_run``), such a user dataset
    is planned first (:func:`plan_on_first_run`) when ``plan.json`` is absent or plans other
    bundles only; a synthetic benchmark (``family`` key) never is, so its runs keep the defaults.
    Inference and serving never plan (docs/planning.md says why).

    Args:
        dataset_dir: the dataset folder or its ``dataset.json`` (None: no plan).
        bundle: a name of :data:`BUNDLES`.
        notice: print the notice about a user dataset without a plan.
        plan_missing: plan a user dataset that holds no plan for ``bundle``.
        device: the device training runs on (``"cpu"``, ``"cuda"``, a ``torch.device``): the
            memory budget of a plan made here.

    Raises:
        ValueError: ``plan.json`` is not a plan written by ``partialseg plan``.

    Example:
        >>> load_plan("/nonexistent/dataset", "dcl_cardiac")
        {}
    """
    import sys

    if dataset_dir is None or str(dataset_dir) == "":
        return PlanSettings()
    root = _dataset_root(dataset_dir)
    path = root / PLAN_NAME
    if plan_missing and bundle in BUNDLES and _user_dataset(root) and not (path.is_file() and _plans_bundle(path, bundle)):
        plan_on_first_run(root, bundle, device)
    if not path.is_file():
        if notice and (root / "dataset.json").is_file() and str(root) not in _NOTICED:
            _NOTICED.add(str(root))
            if _user_dataset(root):
                print(f"partialseg: {root} holds no {PLAN_NAME}: {bundle}'s built-in settings (those of its synthetic benchmark)"
                      f" apply; `partialseg plan {root} --bundle {bundle}` plans them from the data", file=sys.stderr)  # fmt: skip
        return PlanSettings()
    try:
        plan = json.loads(path.read_text())
        settings = plan["plans"].get(bundle, {}).get("settings", {})
        if not isinstance(settings, dict):
            raise TypeError(f"plans.{bundle}.settings is a {type(settings).__name__}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: is not a plan written by `partialseg plan` ({e}); delete it or plan again") from None
    if settings:
        try:
            from partialseg.data.spec import load_dataset

            current = dataset_hash(load_dataset(root), root / "dataset.json")
        except (OSError, ValueError):
            current = None
        if current != plan.get("dataset_hash"):
            print(f"partialseg: warning: {path} was planned for an earlier state of the dataset (files added, replaced or"
                  f" touched since); run `partialseg plan {root} --bundle {bundle}` again", file=sys.stderr)  # fmt: skip
    elif plan.get("plans") and str(root) not in _NOTICED:
        _NOTICED.add(str(root))
        print(f"partialseg: {path} plans {sorted(plan['plans'])}, not {bundle}: its built-in settings apply;"
              f" `partialseg plan {root} --bundle {bundle}` adds it", file=sys.stderr)  # fmt: skip
    return PlanSettings(settings)


def plan_fallback(value: Any) -> Any:
    """The literal fallback of a bundle config's planned key, ``value`` itself for any other value.

    A planned key reads ``"$@dataset_plan.get('<key>', LITERAL)"``; what a dataset without a plan
    gets is ``LITERAL`` (parsed with ``ast.literal_eval``). The MONAI Label app types a request's
    override of the key by it, and compares class names with the fallback ``num_classes``.

    Example:
        >>> plan_fallback("$@dataset_plan.get('pixdim', [4.5, 4.5, 4.0])")
        [4.5, 4.5, 4.0]
        >>> plan_fallback("$@dataset_plan.get('network_def#channels', [16, 32])")
        [16, 32]
        >>> plan_fallback(7), plan_fallback("$@stage == 1")
        (7, '$@stage == 1')
    """
    import ast

    if not isinstance(value, str) or not value.startswith("$@dataset_plan.get("):
        return value
    try:
        node = ast.parse(value[1:].replace("@dataset_plan", "dataset_plan", 1).strip(), mode="eval").body
    except SyntaxError:
        return value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "dataset_plan"
        and len(node.args) == 2
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        try:
            return ast.literal_eval(node.args[1])
        except ValueError:
            return value
    return value


def settings_path(checkpoint: str | os.PathLike) -> Path:
    """The file beside ``checkpoint`` that holds the settings it was trained with.

    Example:
        >>> settings_path("models/model_stage1.pt").as_posix()
        'models/model_stage1.settings.json'
    """
    p = Path(checkpoint)
    return p.with_name(p.stem + ".settings.json")


def dataset_classes(dataset_dir: str | os.PathLike | None) -> list[str] | None:
    """The class names ``dataset_dir``'s ``dataset.json`` lists (a folder or the JSON file), or
    None when there is none (no folder, no ``dataset.json``, unreadable): what bundle configs
    compare a checkpoint's class names with (:func:`partialseg.engines.require_classes`) and
    save with a trained model. Reads nothing else and generates nothing.

    Example:
        >>> dataset_classes("/nonexistent/dataset") is None
        True
    """
    if dataset_dir is None or str(dataset_dir) == "":
        return None
    try:
        classes = json.loads((_dataset_root(dataset_dir) / "dataset.json").read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        return None
    return list(classes) if isinstance(classes, list) else None


def save_model_settings(checkpoint: str | os.PathLike, bundle: str, settings: Mapping[str, Any],
                        dataset_dir: str | os.PathLike | None = None) -> Path | None:
    """Write the settings a training run uses (after overrides) beside its ``checkpoint``
    (:func:`settings_path`, atomically), for inference to use the same grid and network.

    The file holds ``bundle``, ``settings`` (config key -> value), the dataset's ``classes`` and
    folder, and where each setting came from (``"plan.json"``; ``"override"``: a planned key given
    another value; ``"config"``: a key the dataset's plan lacks, the config's fallback or an
    override), which is also printed when there is a plan. Written by rank 0 only (``RANK`` unset
    or 0). The bundles call it once the trainer is built (a run refused by the dataset checks
    writes none), before training saves the checkpoint it describes (:func:`load_model_settings`
    ignores a file newer than its checkpoint).

    Returns:
        the path written, or None on a rank other than 0.
    """
    from partialseg._fileio import atomic_write_text

    if int(os.environ.get("RANK", "0") or 0) != 0:
        return None
    plan = load_plan(dataset_dir, bundle)
    settings = {PlanSettings._key(k): (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
    source = {k: ("plan.json" if k in plan and plan[k] == v else "override" if k in plan else "config") for k, v in settings.items()}
    out = {"bundle": bundle, "checkpoint": Path(checkpoint).name, "settings": settings, "source": source,
           "classes": dataset_classes(dataset_dir), "dataset": None if dataset_dir is None else str(_dataset_root(dataset_dir).resolve())}  # fmt: skip
    path = settings_path(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2, default=str))
    if plan:
        planned = [k for k, s in source.items() if s == "plan.json"]
        others = [k for k, s in source.items() if s == "override"]
        print(f"partialseg: {bundle} settings from {_dataset_root(dataset_dir) / PLAN_NAME}: {', '.join(planned) or 'none'}"
              + (f"; overridden: {', '.join(others)}" if others else "") + f"; recorded in {path}", flush=True)  # fmt: skip
    return path


def load_model_settings(checkpoint: str | os.PathLike, dataset_dir: str | os.PathLike | None, bundle: str) -> PlanSettings:
    """The settings inference uses: those the ``checkpoint`` was trained with (its
    :func:`settings_path` file), then the dataset's plan (:func:`load_plan`) for a key the file
    lacks, else ``{}`` (the config's fallbacks apply).

    The settings file is ignored, with a warning, when it is newer than the checkpoint (the run
    that wrote it has not saved a model yet) or belongs to another bundle. A model saved without
    class names (before checkpoints stored them) and trained on other classes than
    ``dataset_dir``'s ``dataset.json`` lists gets a warning naming both; one that stores them is
    refused by the config (:func:`partialseg.engines.require_classes`).

    Example:
        >>> load_model_settings("/nonexistent/model.pt", None, "dcl_cardiac")
        {}
    """
    import sys

    path, ckpt = settings_path(checkpoint), Path(checkpoint)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            settings = saved["settings"]
            if not isinstance(settings, dict):
                raise TypeError(f"settings is a {type(settings).__name__}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a settings file written by a bundle's training ({e}); delete it") from None
        if saved.get("bundle") != bundle:
            print(f"partialseg: warning: {path} records a {saved.get('bundle')!r} run, not {bundle!r}: ignored", file=sys.stderr)
        elif ckpt.is_file() and path.stat().st_mtime_ns > ckpt.stat().st_mtime_ns:
            print(f"partialseg: warning: {path} is newer than {ckpt} (its training run saved no model yet): ignored;"
                  " the dataset's plan or the bundle's defaults apply", file=sys.stderr)  # fmt: skip
        else:
            trained, here = saved.get("classes"), dataset_classes(dataset_dir)
            if trained and here and list(trained) != list(here) and not _names_in(ckpt):
                # (a checkpoint that stores its class names is refused by the config's require_classes)
                print(f"partialseg: warning: {ckpt} was trained on classes {trained} (dataset {saved.get('dataset')}) but"
                      f" {_dataset_root(dataset_dir)} lists {here}: its predictions are indices of the model's classes;"
                      " pass --checkpoint of a model trained on these classes, or --dataset_dir of the model's dataset",
                      file=sys.stderr)  # fmt: skip
            return PlanSettings({**load_plan(dataset_dir, bundle, notice=False), **settings})
    return load_plan(dataset_dir, bundle)


#: the state-dict metadata entry of the class names (``partialseg.engines.checkpoint.CLASSES_KEY``;
#: spelled here because data sits below engines)
_CLASSES_KEY = "partialseg_classes"


def _names_in(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` stores the class names it was trained on (False when unreadable)."""
    if not checkpoint.is_file():
        return False
    try:
        import torch

        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: the config's require_checkpoint names it
        return False
    states = [state, *(state.values() if isinstance(state, dict) else ())]
    return any(_CLASSES_KEY in ((getattr(s, "_metadata", None) or {}).get("", {})) for s in states)


def plan_value(dataset_dir: str | os.PathLike, key: str, default: Any, bundle: str | None = None) -> Any:
    """A setting planned for ``dataset_dir`` (its ``plan.json``), or ``default`` when there is none.

    Args:
        dataset_dir: the dataset folder.
        key: a bundle config key (``pixdim``, ``patch_size``, ``num_classes``, ...).
        default: returned when the folder holds no ``plan.json`` or the plan lacks the key.
        bundle: the bundle whose plan to read (default: the only one planned; ``default`` when
            several are).
    """
    if bundle is None:
        path = Path(dataset_dir) / PLAN_NAME
        if not path.is_file():
            return default
        try:
            plans = json.loads(path.read_text())["plans"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: is not a plan written by `partialseg plan` ({e}); delete it or plan again") from None
        if len(plans) != 1:
            return default
        bundle = next(iter(plans))
    return load_plan(dataset_dir, bundle).get(key, default)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *[line(r) for r in cells]]


def format_plan(plan: Mapping[str, Any], bundle: str | None = None) -> str:
    """``plan.json`` (from :func:`plan_dataset`) as readable tables: fingerprint, then each setting
    with its reason, then warnings."""
    fp = plan["fingerprint"]
    lines = [f"dataset {fp['dataset']!r}: {fp['cases']} training cases ({fp['labelled_cases']} labelled), {fp['spatial_dims']}D", ""]
    rows = []
    for name, m in fp["modalities"].items():
        fg = m["foreground"]
        rows.append([name, m["cases"], m["spacing_median"], m["shape_median"], m["cropped_shape_median"],
                     [fg.get("percentile_00_5", "-"), fg.get("percentile_99_5", "-")], fg.get("mean", "-"), fg.get("std", "-")])  # fmt: skip
    lines += _table(["modality", "cases", "spacing (median)", "shape (median)", "body crop (median)", "fg p0.5/p99.5", "fg mean", "fg std"], rows)
    lines.append("")
    rows = [[c, s["cases_annotated"], s["cases_present"], s["voxels_median"], s["mm3_median"], ", ".join(s["sources"]) or "NONE"]
            for c, s in fp["class_stats"].items()]  # fmt: skip
    lines += _table(["class", "annotated in", "present in", "voxels (median)", "mm^3 (median)", "sources annotating"], rows)
    lines.append("")
    rows = [[n, s["cases"], s["labelled"], "yes" if s["fully_labelled"] else "no", ", ".join(s["annotates"])] for n, s in fp["sources"].items()]
    lines += _table(["source", "cases", "labelled", "fully labelled", "annotates"], rows)
    for name, p in plan["plans"].items():
        if bundle is not None and name != bundle:
            continue
        lines += ["", f"plan for {name} ({p['device']}, {p['memory_gb']:g} GB):"]
        rows = [[k, v, p["reasons"].get(k, "")] for k, v in p["settings"].items() if k != "classes"]
        lines += _table(["setting", "value", "reason"], rows)
        for w in p["warnings"]:
            lines.append(f"warning: {w}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset folder holding dataset.json (or the JSON file)")
    parser.add_argument("--bundle", default=None, choices=sorted(BUNDLES),
                        help="bundle to plan for (default: dcl_cardiac for 2D data, marginal_exclusion_abdomen for 3D)")  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=sorted(DEFAULT_MEMORY), help="device the bundle will train on (default cpu)")
    parser.add_argument("--memory", type=float, default=None,
                        help=f"memory budget in GB for a training batch (default: {DEFAULT_MEMORY['cpu']:g} on cpu, {DEFAULT_MEMORY['cuda']:g} on cuda)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=None, help="processes reading the files (default: the number of CPUs)")
    parser.add_argument("--no-cache", action="store_true", help="read every file again instead of reusing the cached fingerprint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import sys

    from partialseg.data.spec import DatasetError

    try:
        plan = plan_dataset(args.dataset, bundle=args.bundle, device=args.device, memory=args.memory, workers=args.workers,
                            progress=not args.quiet, cache=not args.no_cache)  # fmt: skip
    except (FileNotFoundError, DatasetError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write the plan: {e}", file=sys.stderr)
        return 2
    planned = args.bundle or ("dcl_cardiac" if plan["fingerprint"]["spatial_dims"] == 2 else "marginal_exclusion_abdomen")
    print(format_plan(plan, bundle=planned))
    root = Path(args.dataset) if Path(args.dataset).is_dir() else Path(args.dataset).parent
    print(f"\nwritten: {root / PLAN_NAME}")
    import shlex

    print(f"\ntrain (in bundles/{planned}/; the bundle reads {PLAN_NAME} from --dataset_dir; an override such as --batch_size 4 wins):")
    print("python -m monai.bundle run --config_file configs/train.json --meta_file configs/metadata.json --bundle_root . \\\n"
          f"    --dataset_dir {shlex.quote(str(root.resolve()))}" + ("" if BUNDLES[planned].get("semi_supervised") else " --stage 1"))
    return 0
