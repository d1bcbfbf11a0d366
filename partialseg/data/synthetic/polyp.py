"""``polyp2d``: RGB colonoscopy-like frames with polyps, strong and weak masks (hybrid setting).

Each frame shows pinkish mucosa with low- and high-frequency texture, submucosal vessels,
haustral folds around a dark lumen, vignetting (and, in half the frames, the black corners of the
endoscope's circular field), one polyp (two in 15% of frames) shaded as a lit dome with a cast
shadow on one side, and specular highlights. A partial-volume blur and sensor noise finish the
frame.

Training masks follow the hybrid-supervision paper (Pan et al., AAAI 2022): a small strongly
annotated subset (10% by default, the true masks) and a weakly annotated rest whose masks are
``"ellipse"`` (an ellipse fitted to the polyp by its image moments, with jittered size, centre and
angle, like the CVC-VideoClinicDB ellipse annotations), ``"distorted"`` (the true outline bent
by a strong random deformation, eroded or dilated and shifted), or ``"missing"`` (the polyp
replaced by background, an unrecognised target: 40% of the weak masks by default). The true mask
of every weak case is stored under ``"label_true"`` for analysis only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from partialseg.data.synthetic import _common as C

__all__ = ["CLASSES", "DEFAULT_SIZE", "WEAK_TYPES", "generate", "render_frame", "weak_mask"]

CLASSES = ["background", "polyp"]
DEFAULT_SIZE = (96, 96)
WEAK_TYPES = ("ellipse", "distorted", "missing")


def _polyp_shape(rng: np.random.Generator, u, v, shape, centre, radius) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius map of one polyp (``<= 1`` inside) and its in-plane offsets."""
    aspect = rng.uniform(0.7, 1.0)
    rot = rng.uniform(0, math.pi)
    du, dv = u - centre[0], v - centre[1]
    a = math.cos(rot) * du + math.sin(rot) * dv
    b = -math.sin(rot) * du + math.cos(rot) * dv
    r = np.sqrt((a / radius) ** 2 + (b / (radius * aspect)) ** 2)
    r = r / C.radial_modulation(rng, np.arctan2(b, a), 0.12, orders=3)
    return r, np.stack([du, dv])


def render_frame(rng: np.random.Generator, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw one frame.

    Args:
        rng: the case's random generator.
        shape: ``(H, W)``.

    Returns:
        ``(image, mask)``: float32 RGB image ``(H, W, 3)`` in [0, 1] and the true uint8 polyp mask
        ``(H, W)`` (1 = polyp).
    """
    shape = tuple(shape)
    h, w = shape
    disp = C.deformation_field(rng, shape, scale=16.0, magnitude=2.5)
    uu, vv = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32),
                         indexing="ij")
    u = uu + disp[0] * 2.0 / h
    v = vv + disp[1] * 2.0 / w

    # mucosa: colour, shading, texture, vessels
    base = np.array([0.86, 0.52, 0.46]) * rng.uniform(0.88, 1.08, size=3)
    shade = 1.0 + 0.15 * C.smooth_noise(rng, shape, scale=24.0)
    texture = 1.0 + 0.05 * C.smooth_noise(rng, shape, scale=3.0)
    image = base[None, None, :] * (shade * texture)[..., None]
    vessels = np.abs(C.smooth_noise(rng, shape, scale=7.0)) < rng.uniform(0.02, 0.07)
    image[vessels] *= np.array([0.8, 0.6, 0.62])

    # lumen and haustral folds around it
    lc = rng.uniform(-0.7, 0.7, size=2)
    lr = rng.uniform(0.15, 0.35)
    dist = np.sqrt((u - lc[0]) ** 2 + (v - lc[1]) ** 2) + 0.05 * C.smooth_noise(rng, shape, scale=20.0)
    period = rng.uniform(0.25, 0.45)
    phase = rng.uniform(0, 2 * math.pi)
    fold = np.sin(2 * math.pi * dist / period + phase)
    image *= (1.0 - 0.25 * np.clip(fold, 0, 1) ** 6 + 0.08 * np.clip(-fold, 0, 1) ** 8)[..., None]
    image *= (1.0 - 0.85 * np.exp(-((dist / lr) ** 2)))[..., None]

    # polyps (one, or two in 15% of frames), never overlapping each other
    mask = np.zeros(shape, dtype=bool)
    light = rng.normal(size=2)
    light /= np.linalg.norm(light)
    n_polyps = 2 if rng.random() < 0.15 else 1
    for p in range(n_polyps):
        radius = rng.uniform(0.18, 0.42) * (0.6 if p else 1.0)
        centre = rng.uniform(-0.55, 0.55, size=2)
        r, off = _polyp_shape(rng, u, v, shape, centre, radius)
        inside = (r <= 1.0) & ~ndimage.binary_dilation(mask, iterations=2)
        if p and inside.sum() < 12:
            continue
        dome = np.sqrt(np.clip(1.0 - r**2, 0.0, 1.0))
        tint = np.array([1.0, 0.92, 0.9]) * rng.uniform(0.92, 1.12, size=3)
        directional = 1.0 + 0.35 * (light[0] * off[0] + light[1] * off[1]) / radius
        lit = (0.7 + 0.45 * dome * directional)[..., None] * tint[None, None, :]
        pit = 1.0 + 0.07 * C.smooth_noise(rng, shape, scale=2.0)
        image = np.where(inside[..., None], image * lit * pit[..., None], image)
        shadow = (r > 1.0) & (r < 1.25) & ((light[0] * off[0] + light[1] * off[1]) < 0)
        image[shadow] *= 0.7
        mask |= inside

    # vignetting and the endoscope's circular field
    rr = np.sqrt(uu**2 + vv**2) / math.sqrt(2.0)
    image *= (1.0 - rng.uniform(0.35, 0.6) * rr**2.5)[..., None]
    if rng.random() < 0.5:
        image[np.sqrt(uu**2 + vv**2) > rng.uniform(1.08, 1.25)] = 0.02

    # specular highlights, more on the polyp dome
    spec_noise = C.smooth_noise(rng, shape, scale=2.0)
    specular = (spec_noise > 2.9) | (mask & (spec_noise > 2.0))
    image[specular] = 0.97

    image = np.stack([C.partial_volume(image[..., c], 0.6) for c in range(3)], axis=-1)
    image = image + rng.normal(0.0, 0.015, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask.astype(np.uint8)


def weak_mask(rng: np.random.Generator, mask: np.ndarray, kind: str) -> np.ndarray:
    """A weak annotation of a true ``mask`` (``(H, W)``, 0/1).

    Args:
        rng: random generator.
        mask: the true mask.
        kind: ``"ellipse"`` (jittered moment-fitted ellipse per polyp), ``"distorted"`` (deformed,
            eroded or dilated, shifted outline) or ``"missing"`` (all background).

    Returns:
        uint8 ``(H, W)`` weak mask (0/1).
    """
    if kind not in WEAK_TYPES:
        raise ValueError(f"weak mask kind must be one of {WEAK_TYPES}, got {kind!r}")
    out = np.zeros_like(mask, dtype=np.uint8)
    if kind == "missing" or not mask.any():
        return out
    if kind == "ellipse":
        comps, n = ndimage.label(mask)
        ii, jj = np.indices(mask.shape, dtype=np.float64)
        for k in range(1, n + 1):
            m = comps == k
            if m.sum() < 3:
                continue
            ci, cj = ii[m].mean(), jj[m].mean()
            cov = np.cov(np.stack([ii[m] - ci, jj[m] - cj]))
            evals, evecs = np.linalg.eigh(cov)
            axes = 2.0 * np.sqrt(np.maximum(evals, 0.25)) * rng.uniform(0.9, 1.3, size=2)
            ang = rng.uniform(-0.25, 0.25)
            rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]]) @ evecs
            shift = rng.normal(0.0, 0.1 * axes.mean(), size=2)
            d = np.stack([ii - ci - shift[0], jj - cj - shift[1]])
            p = np.tensordot(rot.T, d, axes=(1, 0))
            out[((p[0] / axes[0]) ** 2 + (p[1] / axes[1]) ** 2) <= 1.0] = 1
        return out
    size = math.sqrt(float(mask.sum()))
    disp = C.deformation_field(rng, mask.shape, scale=max(size * 0.6, 4.0), magnitude=rng.uniform(0.12, 0.25) * size)
    disp += rng.normal(0.0, 0.12 * size, size=2)[:, None, None]
    warped = C.warp(mask.astype(np.uint8), disp, order=0)
    steps = int(rng.integers(-2, 3))
    if steps > 0:
        warped = ndimage.binary_dilation(warped, iterations=steps).astype(np.uint8)
    elif steps < 0:
        eroded = ndimage.binary_erosion(warped, iterations=-steps)
        warped = eroded.astype(np.uint8) if eroded.any() else warped
    return warped


def generate(out_dir: str | Path, seed: int = 0, size: int | Sequence[int] | None = None,
             num_train: int | None = None, num_test: int | None = None, strong_fraction: float = 0.1,
             missing_fraction: float = 0.4, progress: bool = False) -> Path:
    """Write the ``polyp2d`` benchmark.

    Args:
        out_dir: dataset folder.
        seed: dataset seed.
        size: frame size, one int or ``(H, W)``; default 96 x 96.
        num_train: training frames; default 100.
        num_test: test frames (true masks); default 30.
        strong_fraction: fraction of training frames with their true mask (at least one).
        missing_fraction: fraction of the weak masks that miss the polyp (all background); the
            rest alternate between ellipse and distorted masks.
        progress: show a tqdm progress bar.

    Returns:
        Path of the written ``dataset.json``.
    """
    shape = C.parse_size(size, DEFAULT_SIZE, minimum=32)
    n_train, n_test = C.case_counts(num_train, num_test, 100, 30)
    if not 0.0 < strong_fraction <= 1.0:
        raise ValueError(f"strong_fraction must be in (0, 1], got {strong_fraction}")
    if not 0.0 <= missing_fraction <= 1.0:
        raise ValueError(f"missing_fraction must be in [0, 1], got {missing_fraction}")
    n_strong = min(n_train, max(1, int(round(strong_fraction * n_train))))
    n_weak = n_train - n_strong
    n_missing = int(round(missing_fraction * n_weak))
    kinds = ["strong"] * n_strong + ["missing"] * n_missing
    kinds += [("ellipse", "distorted")[j % 2] for j in range(n_weak - n_missing)]
    plan = C.case_rng(seed, "polyp2d", "plan", 0)
    kinds = [kinds[j] for j in plan.permutation(n_train)]

    writer = C.DatasetWriter(Path(out_dir), ".png")
    panels: list[tuple[np.ndarray, np.ndarray | None, str]] = []
    shown: dict[str, int] = {}
    jobs = [("training", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
    for split, i in C.progress(jobs, progress, "polyp2d", "frame"):
        rng = C.case_rng(seed, "polyp2d", split, i)
        image, mask = render_frame(rng, shape)
        name = f"frame_{i:04d}" if split == "training" else f"test_{i:04d}"
        img_abs, img_rel = writer.path("imagesTr" if split == "training" else "imagesTs", name)
        lab_abs, lab_rel = writer.path("labelsTr" if split == "training" else "labelsTs", name)
        C.write_png(img_abs, C.to_uint8(image))
        entry: dict[str, Any] = {"image": img_rel, "label": lab_rel, "annotated": "all"}
        kind = kinds[i] if split == "training" else "strong"
        if kind == "strong":
            label = mask
            entry["source"] = "strong"
        else:
            label = weak_mask(rng, mask, kind)
            true_abs, true_rel = writer.path("labelsTrTrue", name)
            C.write_png(true_abs, mask)
            entry.update(source="weak", weak_type=kind, label_true=true_rel)
        entry["modality"] = "endoscopy"
        C.write_png(lab_abs, label)
        writer.add(split, entry)
        tag = kind if split == "training" else "test"
        if shown.get(tag, 0) < 2:
            shown[tag] = shown.get(tag, 0) + 1
            panels.append((image, label, f"{name} {tag}"))

    header = {
        "name": "polyp2d",
        "description": (
            f"Synthetic colonoscopy polyps (RGB PNG), seed {seed}: {n_strong} strong masks, {n_weak} weak masks "
            f"(ellipse / distorted / missing; {n_missing} missing); true masks of weak cases under 'label_true'; "
            "test with true masks."
        ),
        "reference": "partialseg synthetic benchmark (hybrid-supervision setting)",
        "licence": "CC0",
        "tensorImageSize": "2D",
        "modality": {"0": "endoscopy"},
        "channels": ["R", "G", "B"],
        "classes": CLASSES,
        "family": "polyp2d",
        "seed": int(seed),
    }
    path = writer.finish(header)
    C.write_preview(writer.root / "preview.png", panels, len(CLASSES), f"polyp2d, seed {seed}")
    return path
