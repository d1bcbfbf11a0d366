"""The polyp layouts of ``partialseg build-datalist``: hybrid supervision (few strong, many weak masks).

==================  ===============================================  =============================
layout              folder (as downloaded)                           masks
==================  ===============================================  =============================
``kvasir_seg``      Kvasir-SEG: ``images/`` and ``masks/``, one JPG   JPG, 0 / 255 with compression
                    each per frame under the same file name           noise: thresholded at 128
``cvc_clinicdb``    CVC-ClinicDB: ``Original/`` and ``Ground Truth/``  TIF (the original release) or
                    (same file names: ``1.tif`` ... ``612.tif``, or   PNG (re-packaged copies), 0 /
                    ``.png`` in re-packaged copies)                   255, thresholded at 128
==================  ===============================================  =============================

The classes are ``background, polyp``. Every mask is binarised (``> 127``) and written as a PNG of
class indices under ``<out folder>/masks/`` (a JPG mask is lossy: its grey edge pixels are no class
index). Images are referenced in place (JPG, PNG), except TIF frames, which are converted to PNG
under ``<out folder>/images/`` (MONAI's PIL reader, which the bundle uses, does not take TIF).

**The weak-mask recipe** (seeded: the same arguments give the same files). Frames in sorted file
name order are permuted by ``numpy.random.default_rng(seed)``; the first ``test`` frames of the
permutation are the ``test`` split, the next ``val`` the ``validation`` split (both with their
true masks), the rest the ``training`` split. Of the training frames the first ``strong`` of the
permutation keep their true mask (``"supervision": "strong"``; a number, or a fraction of the
training frames, at least one); every other frame gets a **weak mask** written under
``<out folder>/weak/``, its kind drawn in turn from ``weak_kinds`` (a shuffled cycle, so the kinds
are balanced), its true mask kept as ``"label_true"`` (analysis only):

- ``"ellipse"``: per connected component, the ellipse of the same image moments (the quick
  ellipse an annotator draws around a polyp), its axes scaled by ``U(0.9, 1.3)``;
- ``"dilated"`` / ``"eroded"``: the mask grown / shrunk by a disc of radius ``U(0.1, 0.3)`` times
  the polyp's equivalent radius ``sqrt(area / pi)`` (at least one pixel; an erosion that would
  empty the mask keeps its largest inscribed disc's centre pixel);
- ``"shifted"``: the mask translated by ``U(0.3, 0.6)`` times the equivalent radius in a random
  direction (the part leaving the frame is lost);
- ``"missing"``: all background (a polyp the annotator missed).

``weak_type`` records the kind. A frame without polyp keeps an empty mask whatever its kind.

Example:
    >>> import numpy as np
    >>> mask = np.zeros((32, 32), np.uint8); mask[10:20, 8:24] = 1
    >>> rng = np.random.default_rng(0)
    >>> [int(weak_mask(mask, k, rng).sum() > 0) for k in WEAK_KINDS]
    [1, 1, 1, 1, 0]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from partialseg._checks import check_int, check_option
from partialseg.data.builders._common import relative, write_json

__all__ = ["CLASSES", "LAYOUTS", "PolypLayout", "WEAK_KINDS", "build_polyp", "weak_mask"]

#: the classes of every polyp layout (and of the synthetic ``polyp2d``)
CLASSES = ("background", "polyp")
#: weak-mask kinds of the recipe
WEAK_KINDS = ("ellipse", "dilated", "eroded", "shifted", "missing")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class PolypLayout:
    """A polyp layout: the image and mask folders under the dataset folder."""

    images: str
    masks: str
    description: str


LAYOUTS: dict[str, PolypLayout] = {
    "kvasir_seg": PolypLayout("images", "masks", "Kvasir-SEG (images/ + masks/, JPG)"),
    "cvc_clinicdb": PolypLayout("Original", "Ground Truth", "CVC-ClinicDB (Original/ + Ground Truth/, TIF or PNG)"),
}


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as e:  # noqa: BLE001 - name the file whatever PIL says
        raise ValueError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None


def _binary(mask: np.ndarray, path: Path) -> np.ndarray:
    """A mask file's content as 0 / 1 (``> 127``; RGB masks: their first channel)."""
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"{path}: a mask must be a 2D image, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    return (mask > (127 if mask.max() > 1 else 0)).astype(np.uint8)


def _disc(radius: int) -> np.ndarray:
    r = max(int(radius), 1)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def weak_mask(mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A weak version of a binary ``(H, W)`` mask (the module's recipe); returns uint8 0 / 1.

    Raises:
        ValueError: an unknown ``kind`` (with the closest one).
    """
    from scipy import ndimage

    kind = check_option(kind, WEAK_KINDS, "weak kind")
    mask = np.asarray(mask) > 0
    if kind == "missing" or not mask.any():
        return np.zeros(mask.shape, np.uint8)
    radius = math.sqrt(mask.sum() / math.pi)
    if kind == "ellipse":
        out = np.zeros(mask.shape, bool)
        labels, n = ndimage.label(mask)
        yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]].astype(np.float64)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)
            cy, cx = ys.mean(), xs.mean()
            cov = np.cov(np.stack([ys - cy, xs - cx])) if len(ys) > 1 else np.eye(2) * 0.25
            vals, vecs = np.linalg.eigh(cov + np.eye(2) * 1e-6)
            axes = 2.0 * np.sqrt(vals) * rng.uniform(0.9, 1.3, size=2)  # a uniform ellipse has variance a^2 / 4
            d = np.stack([yy - cy, xx - cx], -1) @ vecs
            out |= (d[..., 0] / axes[0]) ** 2 + (d[..., 1] / axes[1]) ** 2 <= 1.0
        return out.astype(np.uint8)
    if kind in ("dilated", "eroded"):
        r = max(1, int(round(rng.uniform(0.1, 0.3) * radius)))
        if kind == "dilated":
            return ndimage.binary_dilation(mask, _disc(r)).astype(np.uint8)
        out = ndimage.binary_erosion(mask, _disc(r))
        if not out.any():  # too thin to erode that far: keep the deepest pixel
            dist = ndimage.distance_transform_edt(mask)
            out = np.zeros_like(mask)
            out[np.unravel_index(int(np.argmax(dist)), mask.shape)] = True
        return out.astype(np.uint8)
    # shifted
    dist, angle = rng.uniform(0.3, 0.6) * radius, rng.uniform(0, 2 * math.pi)
    dy, dx = int(round(dist * math.sin(angle))), int(round(dist * math.cos(angle)))
    if dy == 0 and dx == 0:
        dx = 1
    out = np.zeros_like(mask)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
    return out.astype(np.uint8)


def _pairs(layout: str, folder: Path) -> list[tuple[str, Path, Path]]:
    spec = LAYOUTS[layout]
    images, masks = folder / spec.images, folder / spec.masks
    for sub in (images, masks):
        if not sub.is_dir():
            raise FileNotFoundError(f"{folder}: no {sub.name}/ folder; a {layout} folder holds {spec.images}/ and {spec.masks}/ ({spec.description})")
    by_stem = {}
    for p in sorted(masks.iterdir()):
        if p.suffix.lower() in _IMAGE_SUFFIXES:
            by_stem[p.stem] = p
    out = []
    for p in sorted(images.iterdir()):
        if p.suffix.lower() not in _IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        mask = by_stem.get(p.stem)
        if mask is None:
            raise ValueError(f"image {p} has no mask in {masks} (looked for {p.stem}.<jpg|png|tif>)")
        out.append((p.stem, p, mask))
    if not out:
        raise FileNotFoundError(f"{images}: no image (JPG, PNG or TIF) found")
    return out


def build_polyp(
    sources: Sequence[tuple[str, str | os.PathLike]],
    out: Path,
    classes: Sequence[str] | None = None,
    val: int = 0,
    name: str | None = None,
    test: int = 0,
    strong: int | float | None = None,
    weak_kinds: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write one ``dataset.json`` of polyp frames in :data:`LAYOUTS` with strong and weak masks; return its content.

    Args:
        sources: ``(layout, folder)`` pairs; the source name is the layout (numbered when
            repeated); each source is split on its own, with the module's recipe.
        out: output ``dataset.json`` path; masks go to ``masks/`` and ``weak/`` beside it.
        classes: must be ``["background", "polyp"]`` (the default) when given.
        val: frames of each source held out (true masks) as ``validation``.
        name: dataset name (default ``polyp``).
        test: frames of each source held out (true masks) as ``test``.
        strong: training frames of each source that keep their true mask: a number (55) or a
            fraction (0.1); ``None``: all (a fully supervised dataset, no weak masks).
        weak_kinds: kinds drawn for the weak masks (default: all of :data:`WEAK_KINDS`).
        seed: seed of the split and of the weak masks.

    Returns:
        the ``dataset.json`` content.

    Raises:
        ValueError: other ``classes``, an unknown weak kind, an image without a mask or of another
            size than its mask (both named), ``val + test`` leaving no training frame, a bad
            ``strong``.
        FileNotFoundError: a folder that is not in its layout.

    Example:
        >>> build_polyp([("kvasir_seg", "/no/such/folder")], Path("/tmp/x/dataset.json"))
        Traceback (most recent call last):
        ...
        FileNotFoundError: /no/such/folder: no images/ folder; a kvasir_seg folder holds images/ and masks/ (Kvasir-SEG (images/ + masks/, JPG))
    """
    from PIL import Image

    if classes is not None and list(classes) != list(CLASSES):
        raise ValueError(f"the polyp layouts label {list(CLASSES)}; --classes {' '.join(classes)} cannot be used")
    val, test, seed = check_int(val, "--val", minimum=0), check_int(test, "--test", minimum=0), check_int(seed, "--seed", minimum=0)
    kinds = [check_option(k, WEAK_KINDS, "--weak-kinds") for k in (weak_kinds or WEAK_KINDS)]
    if not kinds:
        raise ValueError(f"--weak-kinds: give at least one of {list(WEAK_KINDS)}")
    root = out.parent
    desc: dict[str, Any] = {
        "name": name or "polyp", "classes": list(CLASSES), "modality": {"0": "endoscopy"}, "tensorImageSize": "2D",
        "description": f"polyp frames with strong and weak masks (partialseg build-datalist, seed {seed}, weak kinds {kinds})",
        "training": [],
    }  # fmt: skip
    seen: dict[str, int] = {}
    jobs = []
    meta: dict[str, dict[str, Any]] = {}  # per source: the kinds' cycle, the number of strong frames
    for layout, folder in sources:
        seen[layout] = seen.get(layout, 0) + 1
        source = layout if seen[layout] == 1 else f"{layout}_{seen[layout]}"
        pairs = _pairs(layout, Path(folder))
        n = len(pairs)
        if val + test >= n:
            raise ValueError(f"{folder}: --val {val} + --test {test} leave none of its {n} frames for training")
        n_train = n - val - test
        if strong is None:
            n_strong = n_train
        elif isinstance(strong, bool) or not isinstance(strong, (int, float)):
            raise TypeError(f"--strong must be a number of frames or a fraction, got {strong!r}")
        elif isinstance(strong, float):
            if not 0.0 < strong <= 1.0:
                raise ValueError(f"--strong {strong}: a fraction must be in (0, 1]")
            n_strong = max(1, int(round(strong * n_train)))
        else:
            n_strong = check_int(strong, "--strong", minimum=1)
            if n_strong > n_train:
                raise ValueError(f"--strong {n_strong}: {folder} has only {n_train} training frames")
        rng = np.random.default_rng([seed, seen[layout] - 1])
        order = rng.permutation(n)
        cycle = [kinds[i] for i in rng.permutation(len(kinds))]
        for rank, idx in enumerate(order):
            split = "test" if rank < test else "validation" if rank < test + val else "training"
            jobs.append((source, split, rank - test - val, pairs[idx]))
        meta[source] = {"cycle": cycle, "n_strong": n_strong}
    names: dict[str, str] = {}
    for source, split, k, pair in jobs:
        stem, image, mask_path = pair
        case = stem if stem not in names else f"{source}_{stem}"
        if case in names:
            raise ValueError(f"frame {stem!r} appears twice ({names[case]} and {image}); give the sources distinct file names")
        names[case] = str(image)
        img = _read(image)
        mask = _binary(_read(mask_path), mask_path)
        if img.shape[:2] != mask.shape:
            raise ValueError(f"case {case!r}: image {image} is {img.shape[1]} x {img.shape[0]} but its mask {mask_path} is {mask.shape[1]} x {mask.shape[0]}")
        if image.suffix.lower() in (".tif", ".tiff"):
            converted = root / "images" / f"{case}.png"
            converted.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(converted)
            image = converted
        true_path = root / "masks" / f"{case}.png"
        true_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(true_path)
        entry: dict[str, Any] = {"image": relative(image, root), "label": relative(true_path, root), "annotated": "all",
                                 "source": source, "modality": "endoscopy", "case": case}  # fmt: skip
        if split == "training":
            info = meta[source]
            if k < info["n_strong"]:
                entry["supervision"] = "strong"
            else:
                kind = info["cycle"][(k - info["n_strong"]) % len(info["cycle"])]
                rng = np.random.default_rng([seed, 1, len(names)])
                weak_path = root / "weak" / f"{case}.png"
                weak_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(weak_mask(mask, kind, rng)).save(weak_path)
                entry.update(label=relative(weak_path, root), label_true=relative(true_path, root), supervision="weak", weak_type=kind)
        desc.setdefault(split, []).append(entry)
    write_json(out, desc)
    return desc
