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

``weak_quality="continuous"`` (the ``preset="hybrid"`` benchmark of issue 16, where the weak
masks must matter) draws weak masks of continuous quality instead: ``"ellipse"`` (the
moment-fitted ellipse scaled by ``U(0.8, 1.6)`` per axis, rotated by up to 0.5 rad and shifted by
up to half its mean radius, so its Dice against the truth spreads over about 0.3-0.95),
``"missing"`` (all background) and ``"wrong"`` (an ellipse of the polyp's size on background,
away from it: a misplaced annotation). Every training entry carries ``"supervision"``
(``"strong"`` / ``"weak"``) beside the older ``"source"``, weak entries their ``"weak_type"``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from partialseg.data.synthetic import _common as C

__all__ = [
    "CLASSES", "CONTINUOUS_WEAK_TYPES", "DEFAULT_SIZE", "PRESETS", "WEAK_QUALITIES", "WEAK_TYPES", "continuous_weak_mask",
    "generate", "render_frame", "weak_mask",
]  # fmt: skip

CLASSES = ["background", "polyp"]
DEFAULT_SIZE = (96, 96)
#: weak-mask kinds of ``weak_quality="levels"`` (three quality levels, the original benchmark)
WEAK_TYPES = ("ellipse", "distorted", "missing")
#: weak-mask kinds of ``weak_quality="continuous"``
CONTINUOUS_WEAK_TYPES = ("ellipse", "missing", "wrong")
WEAK_QUALITIES = ("levels", "continuous")
#: presets: generator defaults that explicit arguments override. ``"hybrid"`` is issue 16's benchmark:
#: few strong masks (20), many weak ones of continuous quality (400), 64 x 64, so that few-strong-only
#: training falls well short of training on every true mask (measured: docs/results.md, hybrid section).
PRESETS: dict[str, dict[str, Any]] = {
    "standard": {},
    "hybrid": {
        "size": 64, "num_train": 420, "num_test": 60, "num_strong": 20, "weak_quality": "continuous",
        "missing_fraction": 0.15, "wrong_fraction": 0.1,
    },
}  # fmt: skip


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


def render_frame(rng: np.random.Generator, shape: Sequence[int], contrast: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Draw one frame.

    Args:
        rng: the case's random generator.
        shape: ``(H, W)``.
        contrast: strength of the polyp's appearance (tint, dome lighting, pit texture, cast
            shadow) against the mucosa; 1 is the original benchmark, smaller is harder. The
            random draws do not depend on it.

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
        shadow = (r > 1.0) & (r < 1.25) & ((light[0] * off[0] + light[1] * off[1]) < 0)
        if contrast != 1.0:  # blend the polyp's appearance towards the mucosa (same draws)
            lit = 1.0 + contrast * (lit - 1.0)
            pit = 1.0 + contrast * (pit - 1.0)
        image = np.where(inside[..., None], image * lit * pit[..., None], image)
        image[shadow] *= 0.7 if contrast == 1.0 else 1.0 - 0.3 * contrast
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


def _moment_ellipses(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(centre (2,), semi-axes (2,), eigenvectors (2, 2))`` of each connected component (>= 3 pixels)."""
    comps, n = ndimage.label(mask)
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    ii, jj = np.indices(mask.shape, dtype=np.float64)
    count = ndimage.sum(np.ones_like(ii), comps, idx)
    ci, cj = ndimage.mean(ii, comps, idx), ndimage.mean(jj, comps, idx)
    sii = ndimage.mean(ii * ii, comps, idx) - ci**2
    sjj = ndimage.mean(jj * jj, comps, idx) - cj**2
    sij = ndimage.mean(ii * jj, comps, idx) - ci * cj
    out = []
    for k in range(n):
        if count[k] < 3:
            continue
        cov = np.array([[sii[k], sij[k]], [sij[k], sjj[k]]]) * count[k] / max(count[k] - 1, 1)
        evals, evecs = np.linalg.eigh(cov)
        out.append((np.array([ci[k], cj[k]]), 2.0 * np.sqrt(np.maximum(evals, 0.25)), evecs))
    return out


def _fill_ellipses(shape: Sequence[int], centres: np.ndarray, axes: np.ndarray, rots: np.ndarray) -> np.ndarray:
    """Union of ellipses ``(K, 2)`` centres, ``(K, 2)`` semi-axes, ``(K, 2, 2)`` axis frames, in one broadcast."""
    grid = np.stack(np.indices(tuple(shape), dtype=np.float64), -1)  # (H, W, 2)
    d = grid[None] - centres[:, None, None, :]  # (K, H, W, 2)
    p = np.einsum("kab,khwa->khwb", rots, d)  # coordinates along each ellipse's axes
    inside = ((p / axes[:, None, None, :]) ** 2).sum(-1) <= 1.0
    return inside.any(0).astype(np.uint8)


def continuous_weak_mask(rng: np.random.Generator, mask: np.ndarray, kind: str) -> np.ndarray:
    """A weak annotation of continuous quality (``weak_quality="continuous"``).

    Args:
        rng: random generator.
        mask: the true ``(H, W)`` 0/1 mask.
        kind: ``"ellipse"``: per polyp, the moment-fitted ellipse with each semi-axis scaled by
            ``U(0.8, 1.6)``, rotated by ``U(-0.5, 0.5)`` rad and its centre shifted by up to half
            its mean semi-axis (uniform in the disc); ``"missing"``: all background; ``"wrong"``:
            one ellipse of the largest polyp's size and scale, centred on background at least
            1.5 of its radii away from every polyp pixel (the farthest background point if
            none is that far).

    Returns:
        uint8 ``(H, W)`` weak mask (0/1).

    Raises:
        ValueError: an unknown ``kind``.

    Example:
        >>> import numpy as np
        >>> m = np.zeros((32, 32), np.uint8); m[10:20, 8:16] = 1
        >>> w = continuous_weak_mask(np.random.default_rng(0), m, "ellipse")
        >>> bool(w.any()), bool(continuous_weak_mask(np.random.default_rng(0), m, "missing").any())
        (True, False)
        >>> bool((continuous_weak_mask(np.random.default_rng(0), m, "wrong") & m).any())
        False
    """
    if kind not in CONTINUOUS_WEAK_TYPES:
        raise ValueError(f"continuous weak mask kind must be one of {CONTINUOUS_WEAK_TYPES}, got {kind!r}")
    fits = _moment_ellipses(mask) if mask.any() else []
    if kind == "missing" or not fits:
        return np.zeros_like(mask, dtype=np.uint8)
    k = len(fits)
    scale = rng.uniform(0.8, 1.6, size=(k, 2))
    ang = rng.uniform(-0.5, 0.5, size=k)
    radius = rng.uniform(0.0, 0.5, size=k) ** 0.5 * np.sqrt(0.5)  # uniform in a disc of radius 1/2 (x mean axis)
    theta = rng.uniform(0.0, 2 * math.pi, size=k)
    centres = np.stack([f[0] for f in fits])
    axes = np.stack([f[1] for f in fits]) * scale
    turn = np.stack([np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) for a in ang])
    rots = turn @ np.stack([f[2] for f in fits])
    if kind == "ellipse":
        shift = (radius * axes.mean(1))[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)
        return _fill_ellipses(mask.shape, centres + shift, axes, rots)
    big = int(np.argmax([f[1].prod() for f in fits]))
    dist = ndimage.distance_transform_edt(mask == 0)
    far = dist >= 1.5 * axes[big].max()
    cand = np.argwhere(far) if far.any() else np.argwhere(dist == dist.max())
    centre = cand[int(rng.integers(len(cand)))].astype(np.float64)
    out = _fill_ellipses(mask.shape, centre[None], axes[big : big + 1], rots[big : big + 1])
    return (out & (mask == 0)).astype(np.uint8)


def generate(out_dir: str | Path, seed: int = 0, size: int | Sequence[int] | None = None,
             num_train: int | None = None, num_test: int | None = None, strong_fraction: float | None = None,
             missing_fraction: float | None = None, progress: bool = False, *, preset: str | None = None,
             num_strong: int | None = None, weak_quality: str | None = None, wrong_fraction: float | None = None,
             contrast: float | None = None) -> Path:
    """Write the ``polyp2d`` benchmark.

    Arguments left at None take the ``preset``'s value, else the standard default below.

    Args:
        out_dir: dataset folder.
        seed: dataset seed.
        size: frame size, one int or ``(H, W)``; default 96 x 96 (``"hybrid"``: 64).
        num_train: training frames; default 100 (``"hybrid"``: 420).
        num_test: test frames (true masks); default 30 (``"hybrid"``: 60).
        strong_fraction: fraction of training frames with their true mask (at least one);
            default 0.1. Ignored when ``num_strong`` is given.
        missing_fraction: fraction of the weak masks that miss the polyp (all background);
            default 0.4 (``"hybrid"``: 0.15). With ``weak_quality="levels"`` the rest alternate
            between ellipse and distorted masks.
        progress: show a tqdm progress bar.
        preset: ``"standard"`` (default) or ``"hybrid"`` (issue 16's benchmark: 20 strong and 400
            weak masks of continuous quality, 64 x 64, 60 test frames); see :data:`PRESETS`.
        num_strong: exact number of strong training frames (``"hybrid"``: 20).
        weak_quality: ``"levels"`` (ellipse / distorted / missing, the original) or
            ``"continuous"`` (:func:`continuous_weak_mask`: ellipse / missing / wrong).
        wrong_fraction: ``"continuous"`` only: fraction of the weak masks placed on background
            (``"wrong"``; default 0, ``"hybrid"``: 0.1).
        contrast: the polyps' contrast against the mucosa (:func:`render_frame`; default 1; lower
            is harder: at 0.7 the ablation's small network reaches 37% Dice with every true mask).

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: an unknown preset or weak quality, fractions outside their range, more
            strong frames than training frames, ``wrong_fraction`` with ``"levels"``.
    """
    from partialseg._checks import check_option

    chosen = PRESETS[check_option(preset or "standard", tuple(PRESETS), "preset")]
    given = {"size": size, "num_train": num_train, "num_test": num_test, "strong_fraction": strong_fraction,
             "missing_fraction": missing_fraction, "num_strong": num_strong, "weak_quality": weak_quality,
             "wrong_fraction": wrong_fraction, "contrast": contrast}  # fmt: skip
    standard = {"strong_fraction": 0.1, "missing_fraction": 0.4, "weak_quality": "levels", "wrong_fraction": 0.0,
                "contrast": 1.0}  # fmt: skip
    opt = {k: v if v is not None else chosen.get(k, standard.get(k)) for k, v in given.items()}
    shape = C.parse_size(opt["size"], DEFAULT_SIZE, minimum=32)
    n_train, n_test = C.case_counts(opt["num_train"], opt["num_test"], 100, 30)
    quality = check_option(opt["weak_quality"], WEAK_QUALITIES, "weak_quality")
    strong_fraction, missing_fraction = float(opt["strong_fraction"]), float(opt["missing_fraction"])
    wrong_fraction, contrast = float(opt["wrong_fraction"]), float(opt["contrast"])
    if not 0.0 < strong_fraction <= 1.0:
        raise ValueError(f"strong_fraction must be in (0, 1], got {strong_fraction}")
    if not 0.0 <= missing_fraction <= 1.0:
        raise ValueError(f"missing_fraction must be in [0, 1], got {missing_fraction}")
    if not 0.0 <= wrong_fraction <= 1.0 - missing_fraction:
        raise ValueError(f"wrong_fraction must be in [0, 1 - missing_fraction = {1.0 - missing_fraction:g}], got {wrong_fraction}")
    if wrong_fraction and quality == "levels":
        raise ValueError("wrong_fraction needs weak_quality='continuous' (the 'levels' masks have no 'wrong' kind)")
    if not 0.0 < contrast <= 1.0:
        raise ValueError(f"contrast must be in (0, 1], got {contrast}")
    if opt["num_strong"] is not None:
        n_strong = int(opt["num_strong"])
        if not 1 <= n_strong <= n_train:
            raise ValueError(f"num_strong must be in [1, num_train = {n_train}], got {opt['num_strong']}")
    else:
        n_strong = min(n_train, max(1, int(round(strong_fraction * n_train))))
    n_weak = n_train - n_strong
    n_missing = int(round(missing_fraction * n_weak))
    kinds = ["strong"] * n_strong + ["missing"] * n_missing
    if quality == "levels":
        kinds += [("ellipse", "distorted")[j % 2] for j in range(n_weak - n_missing)]
    else:
        n_wrong = int(round(wrong_fraction * n_weak))
        kinds += ["wrong"] * n_wrong + ["ellipse"] * (n_weak - n_missing - n_wrong)
    plan = C.case_rng(seed, "polyp2d", "plan", 0)
    kinds = [kinds[j] for j in plan.permutation(n_train)]

    writer = C.DatasetWriter(Path(out_dir), ".png")
    panels: list[tuple[np.ndarray, np.ndarray | None, str]] = []
    shown: dict[str, int] = {}
    jobs = [("training", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
    for split, i in C.progress(jobs, progress, "polyp2d", "frame"):
        rng = C.case_rng(seed, "polyp2d", split, i)
        image, mask = render_frame(rng, shape, contrast)
        name = f"frame_{i:04d}" if split == "training" else f"test_{i:04d}"
        img_abs, img_rel = writer.path("imagesTr" if split == "training" else "imagesTs", name)
        lab_abs, lab_rel = writer.path("labelsTr" if split == "training" else "labelsTs", name)
        C.write_png(img_abs, C.to_uint8(image))
        entry: dict[str, Any] = {"image": img_rel, "label": lab_rel, "annotated": "all"}
        kind = kinds[i] if split == "training" else "strong"
        if kind == "strong":
            label = mask
            entry.update(source="strong", supervision="strong")
        else:
            label = weak_mask(rng, mask, kind) if quality == "levels" else continuous_weak_mask(rng, mask, kind)
            true_abs, true_rel = writer.path("labelsTrTrue", name)
            C.write_png(true_abs, mask)
            entry.update(source="weak", supervision="weak", weak_type=kind, label_true=true_rel)
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
            + (f"(ellipse / distorted / missing; {n_missing} missing)" if quality == "levels" else
               f"of continuous quality (ellipse scaled 0.8-1.6 and shifted / missing / wrong; {n_missing} missing, "
               f"{kinds.count('wrong')} wrong; polyp contrast {contrast:g})")
            + "; true masks of weak cases under 'label_true'; test with true masks."
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
    if quality != "levels" or preset not in (None, "standard"):
        header["preset"] = preset or "standard"
        header["weak_quality"] = quality
    path = writer.finish(header)
    C.write_preview(writer.root / "preview.png", panels, len(CLASSES), f"polyp2d, seed {seed}")
    return path
