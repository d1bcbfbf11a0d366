"""``atrium3d``: MR volumes with a left atrium, few labelled and many unlabelled (DTML setting).

The left atrium (LA) is a lumpy ellipsoid with four pulmonary veins leaving it posterolaterally
and a finger-like appendage anteriorly on the left. As in the 2018 Atrial Segmentation Challenge,
the label holds the LA body, the appendage and the proximal part of each vein; the distal veins
are just as bright but unlabelled. Around it, in RAS+ world millimetres: the left ventricle
(bright blood pool inside a dark myocardium), the right atrium, the ascending and descending
aorta, the pulmonary artery, both lungs and mediastinal fat, all with blood of similar intensity
and separated from the LA only by a thin dark wall. A smooth random deformation, partial-volume
blur, a bias field and Rician noise finish the volume.

The default ``"hard"`` difficulty (:data:`DIFFICULTY`) scales and rotates the atrium case to case,
varies and bends its veins, and thins its wall (0-1 voxel, fainter): blood pools of the same
intensity, its own unlabelled distal veins included, then meet the LA without a visible border.
``difficulty="standard"`` gives the original volumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from partialseg.data.synthetic import _common as C

__all__ = ["CLASSES", "DEFAULT_SIZE", "DIFFICULTY", "SPACING", "difficulty_options", "generate", "render_case"]

CLASSES = ["background", "left_atrium"]
DEFAULT_SIZE = (64, 64, 48)
#: field of view in mm along x, y, z; the spacing is FOV / size (1.5 mm at the default size)
FOV_MM = (96.0, 96.0, 72.0)
SPACING = tuple(f / n for f, n in zip(FOV_MM, DEFAULT_SIZE))

_TISSUES = ["tissue", "lung", "fat", "wall", "myocardium", "lv_blood", "ra_blood", "aorta", "pa", "pv_distal", "la"]
T = {n: i for i, n in enumerate(_TISSUES)}
_MEANS = {"tissue": 0.30, "lung": 0.06, "fat": 0.55, "wall": 0.22, "myocardium": 0.25, "lv_blood": 0.72,
          "ra_blood": 0.70, "aorta": 0.76, "pa": 0.70, "pv_distal": 0.72, "la": 0.74}


#: generator presets. ``"standard"`` is the original benchmark (same random draws, same volumes);
#: ``"hard"`` (the default) varies the anatomy more between cases so that a few labelled volumes do
#: not cover it: on ``"standard"``, M_s trained on 8 labelled volumes came within 2 Dice points of
#: M_s trained on all 40 (same budget), too small a gap to show what unlabelled data add (see the
#: DTML section of docs/results.md).
#: Keys: ``scale`` (the atrium scaled by a factor in ``[1 / (1 + scale), 1 + scale]``, log-uniform);
#: ``rotation_deg`` (rotated about its centre by up to this many degrees about z, half about x and y);
#: ``vein_jitter`` (std of the pulmonary veins' direction noise); ``vein_variation`` (vein radius
#: factor in ``[1 / (1 + v), 1 + v]``, ostium offset ``4 v`` mm, a bent distal segment); ``lumps``
#: (amplitude of the outline's lumps); ``wall_gap`` (fraction of the one-voxel dark wall removed, in
#: smooth patches: wall thickness 0 there, the LA blood touching the neighbouring blood pools and
#: its own unlabelled distal veins); ``wall_contrast`` (the wall's contrast to the LA blood, 1 =
#: the tissue table's).
DIFFICULTY: dict[str, dict[str, float]] = {
    "standard": {"scale": 0.0, "rotation_deg": 0.0, "vein_jitter": 0.12, "vein_variation": 0.0, "lumps": 0.1,
                 "wall_gap": 0.0, "wall_contrast": 1.0},
    "hard": {"scale": 0.25, "rotation_deg": 25.0, "vein_jitter": 0.3, "vein_variation": 0.5, "lumps": 0.2,
             "wall_gap": 0.5, "wall_contrast": 0.6},
}


def difficulty_options(difficulty: str | Mapping[str, float]) -> dict[str, float]:
    """The generator options of a :data:`DIFFICULTY` preset name, or ``"standard"`` updated by a mapping.

    Example:
        >>> difficulty_options({"wall_gap": 0.3})["wall_gap"], difficulty_options("hard")["rotation_deg"]
        (0.3, 25.0)
    """
    if isinstance(difficulty, str):
        if difficulty not in DIFFICULTY:
            raise ValueError(f"difficulty must be one of {sorted(DIFFICULTY)} or a mapping, got {difficulty!r}")
        return dict(DIFFICULTY[difficulty])
    unknown = sorted(set(difficulty) - set(DIFFICULTY["standard"]))
    if unknown:
        raise ValueError(f"unknown difficulty option(s) {unknown}; known: {sorted(DIFFICULTY['standard'])}")
    out = dict(DIFFICULTY["standard"])
    out.update({k: float(v) for k, v in difficulty.items()})
    if not 0.0 <= out["wall_gap"] <= 1.0 or out["scale"] < 0 or out["rotation_deg"] < 0 or out["vein_variation"] < 0:
        raise ValueError(f"difficulty options out of range: {out}")
    return out


def _rotation(angles: np.ndarray) -> np.ndarray:
    """The rotation matrix ``Rz @ Ry @ Rx`` of three angles (radians) about x, y and z."""
    ax, ay, az = (float(a) for a in angles)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _segment(coords, p0, p1, radius):
    """Distance ratio to a segment (``<= 1`` inside the tube) and the position ``t`` along it."""
    seg = np.asarray(p1, dtype=np.float64) - np.asarray(p0, dtype=np.float64)
    t = sum((c - p) * s for c, p, s in zip(coords, p0, seg)) / float(seg @ seg)
    tc = np.clip(t, 0.0, 1.0)
    d2 = sum((c - (p + tc * s)) ** 2 for c, p, s in zip(coords, p0, seg))
    return np.sqrt(d2) / radius, t


def render_case(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                difficulty: str | Mapping[str, float] = "hard",
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Draw one volume.

    Args:
        rng: the case's random generator.
        shape: ``(X, Y, Z)``.
        spacing: voxel size in mm.
        difficulty: a preset of :data:`DIFFICULTY` (``"hard"``, the default; ``"standard"``: the
            original benchmark, byte-identical) or a mapping overriding some of its keys (the others
            from ``"standard"``); see :data:`DIFFICULTY` for what each key does.

    Returns:
        ``(image, ground_truth, masks, affine)``: float32 image; uint8 ground truth (1 = left
        atrium); boolean masks ``{"left_atrium", "other_blood"}`` (disjoint by construction: every
        other blood pool is kept one wall away from the LA, except where ``wall_gap`` removes the
        wall); ``(4, 4)`` affine (RAS+).
    """
    opt = difficulty_options(difficulty)
    shape = tuple(shape)
    affine = C.affine_from_spacing(spacing, shape)
    x, y, z = C.deformed_world_grid(rng, affine, shape, spacing, scale=10.0, magnitude=1.5)
    xyz = (x, y, z)
    lumps = C.smooth_noise(rng, shape, scale=6.0)

    c = rng.uniform(-5.0, 5.0, size=3) + np.array([0.0, -6.0, 0.0])
    f = rng.uniform(0.8, 1.15, size=3)
    if opt["scale"] > 0 or opt["rotation_deg"] > 0:
        # the atrium (body, veins, appendage) drawn in coordinates scaled and rotated about its centre
        # (the heart's neighbours with it; the lungs and the descending aorta stay put)
        factor = float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(opt["scale"])))
        rot = _rotation(rng.uniform(-1.0, 1.0, size=3) * np.deg2rad(opt["rotation_deg"]) * np.array([0.5, 0.5, 1.0]))
        d = [x - c[0], y - c[1], z - c[2]]
        xyz = tuple(sum(rot[j, i] * d[j] for j in range(3)) / factor + c[i] for i in range(3))  # R^T (p - c) / s + c
    la_body = C.ellipsoid(xyz, c, (24.0 * f[0], 16.0 * f[1], 19.0 * f[2])) <= 1.0 + opt["lumps"] * lumps

    # pulmonary veins: proximal part labelled, distal part not
    la = la_body.copy()
    pv_distal = np.zeros(shape, dtype=bool)
    for sx in (-1.0, 1.0):
        for sz in (-1.0, 1.0):
            start = c + np.array([sx * 14.0 * f[0], -6.0 * f[1], sz * 8.0 * f[2]])
            direction = np.array([sx * 0.7, -0.6, sz * 0.35]) + rng.normal(0.0, opt["vein_jitter"], size=3)
            direction /= np.linalg.norm(direction)
            end = start + direction * rng.uniform(34.0, 46.0)
            radius = rng.uniform(4.5, 6.5)
            if opt["vein_variation"] > 0:
                radius *= float(np.exp(rng.uniform(-1.0, 1.0) * np.log1p(opt["vein_variation"])))
                start = start + rng.normal(0.0, 4.0 * opt["vein_variation"], size=3)
            ratio, t = _segment(xyz, start, end, radius)
            tube = ratio <= 1.0
            if opt["vein_variation"] > 0:  # a bent vein: a distal second segment in a new direction
                bend = direction + rng.normal(0.0, 0.8 * opt["vein_variation"], size=3)
                far = end + bend / np.linalg.norm(bend) * rng.uniform(10.0, 20.0)
                bent = (_segment(xyz, end, far, radius * 0.9)[0] <= 1.0) & ~tube
                tube |= bent
                t = np.where(bent, 1.0, t)
            cut = rng.uniform(0.35, 0.5)
            la |= tube & (t <= cut)
            pv_distal |= tube & (t > cut)
    # left atrial appendage
    base = c + np.array([-16.0 * f[0], 9.0 * f[1], 8.0 * f[2]])
    tip = base + np.array([-12.0, 14.0, 6.0]) + rng.normal(0.0, 3.0, size=3)
    ratio, _ = _segment(xyz, base, tip, rng.uniform(4.0, 5.5))
    la |= ratio <= 1.0 + opt["lumps"] * lumps
    la_wall = ndimage.binary_dilation(la, iterations=1) & ~la
    if opt["wall_gap"] > 0:  # wall thickness 0 in smooth patches: blood beyond meets the LA directly
        gaps = C.smooth_noise(rng, shape, scale=4.0)
        la_wall &= gaps <= np.quantile(gaps[la_wall], 1.0 - opt["wall_gap"]) if la_wall.any() else la_wall
    keep_out = la | la_wall
    pv_distal &= ~keep_out

    # neighbours: LV (with myocardium), RA, aorta, pulmonary artery
    lv_c = c + np.array([-14.0, 30.0, -26.0]) + rng.normal(0.0, 3.0, size=3)
    lv_r = np.array([26.0, 22.0, 30.0]) * rng.uniform(0.9, 1.1)
    lv_outer = C.ellipsoid(xyz, lv_c, lv_r) <= 1.0
    lv_blood = C.ellipsoid(xyz, lv_c, lv_r - 8.0) <= 1.0
    ra = C.ellipsoid(xyz, c + np.array([34.0, 10.0, -6.0]) + rng.normal(0.0, 3.0, size=3),
                     np.array([18.0, 18.0, 22.0]) * rng.uniform(0.9, 1.1, size=3)) <= 1.0 + 0.1 * lumps
    asc0 = c + np.array([6.0, 24.0, -12.0])
    asc = _segment(xyz, asc0, asc0 + np.array([0.0, -4.0, 60.0]), rng.uniform(10.0, 12.5))[0] <= 1.0
    desc_x, desc_y = c[0] - 14.0 + rng.normal(0.0, 2.0), c[1] - 30.0 + rng.normal(0.0, 2.0)
    desc = ((x - desc_x) ** 2 + (y - desc_y) ** 2) <= rng.uniform(9.0, 11.0) ** 2
    pa0 = c + np.array([-6.0, 34.0, -4.0])
    pa = _segment(xyz, pa0, pa0 + np.array([-18.0, -16.0, 36.0]), rng.uniform(10.0, 13.0))[0] <= 1.0

    lung = (C.ellipsoid((x, y), (62.0, -10.0), (30.0, 45.0)) <= 1.0) | (
        C.ellipsoid((x, y), (-64.0, -10.0), (30.0, 45.0)) <= 1.0)
    fat = C.smooth_noise(rng, shape, scale=8.0) > 1.0

    tissue = np.full(shape, T["tissue"], dtype=np.uint8)
    others = np.zeros(shape, dtype=bool)
    for mask, name in ((lung, "lung"), (fat, "fat"), (lv_outer, "myocardium"), (lv_blood, "lv_blood"), (ra, "ra_blood"),
                       (asc | desc, "aorta"), (pa, "pa"), (pv_distal, "pv_distal")):
        mask = mask & ~keep_out
        tissue[mask] = T[name]
        if name not in ("lung", "fat", "myocardium"):
            others |= mask
    tissue[la_wall] = T["wall"]
    tissue[la] = T["la"]

    gt = la.astype(np.uint8)
    lut = np.array([_MEANS[n] * rng.uniform(0.92, 1.08) for n in _TISSUES], dtype=np.float32)
    if opt["wall_contrast"] != 1.0:  # a fainter wall: its intensity moved towards the LA blood
        lut[T["wall"]] = lut[T["la"]] + opt["wall_contrast"] * (lut[T["wall"]] - lut[T["la"]])
    image = lut[tissue] * (1.0 + 0.05 * C.smooth_noise(rng, shape, scale=2.5))
    image = C.partial_volume(image, 0.8)
    image = image * C.bias_field(rng, shape, rng.uniform(0.15, 0.3))
    image = C.rician_noise(rng, image, rng.uniform(0.03, 0.06))
    return image.astype(np.float32), gt, {"left_atrium": la, "other_blood": others & ~la}, affine


def generate(out_dir: str | Path, seed: int = 0, size: int | Sequence[int] | None = None,
             num_train: int | None = None, num_test: int | None = None, labelled_fraction: float = 0.2,
             difficulty: str | Mapping[str, float] = "hard", progress: bool = False) -> Path:
    """Write the ``atrium3d`` benchmark.

    Args:
        out_dir: dataset folder.
        seed: dataset seed.
        size: volume shape, one int or ``(X, Y, Z)``; default 64 x 64 x 48 (1.5 mm voxels).
        num_train: training volumes (labelled + unlabelled); default 40.
        num_test: labelled test volumes; default 10.
        labelled_fraction: fraction of training volumes that keep their label (at least one).
        difficulty: anatomical variation, a :data:`DIFFICULTY` preset (default ``"hard"``) or a
            mapping of its keys (see :func:`render_case`).
        progress: show a tqdm progress bar.

    Returns:
        Path of the written ``dataset.json``.
    """
    shape = C.parse_size(size, DEFAULT_SIZE, minimum=24)
    n_train, n_test = C.case_counts(num_train, num_test, 40, 10)
    if not 0.0 < labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction}")
    n_lab = min(n_train, max(1, int(round(labelled_fraction * n_train))))
    options = difficulty_options(difficulty)
    spacing = tuple(f / n for f, n in zip(FOV_MM, shape))
    writer = C.DatasetWriter(Path(out_dir), ".nii.gz")
    panels: list[tuple[np.ndarray, np.ndarray | None, str]] = []
    jobs = [("training", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
    for split, i in C.progress(jobs, progress, "atrium3d"):
        rng = C.case_rng(seed, "atrium3d", split, i)
        image, gt, _, affine = render_case(rng, shape, spacing, options)
        labelled = split == "test" or i < n_lab
        name = f"la_{i:03d}" if split == "training" else f"test_{i:03d}"
        folder = ("imagesTr", "labelsTr") if split == "training" else ("imagesTs", "labelsTs")
        img_abs, img_rel = writer.path(folder[0], name)
        C.write_nifti(img_abs, C.to_int16(image, 1000.0), affine)  # MR magnitude, int16
        entry: dict[str, Any] = {"image": img_rel}
        if labelled:
            lab_abs, lab_rel = writer.path(folder[1], name)
            C.write_nifti(lab_abs, gt, affine)
            entry.update(label=lab_rel, annotated="all", source="labelled")
        else:
            entry["source"] = "unlabelled"
        entry["modality"] = "MR"
        writer.add(split, entry)
        if (split == "training" and (i < 2 or n_lab <= i < n_lab + 2)) or (split == "test" and i < 2):
            k = C.slice_with_most(gt, axis=2)
            # radiological view: patient's right on the left, anterior at the top
            panels.append((image[::-1, ::-1, k].T, gt[::-1, ::-1, k].T if labelled else None,
                           f"{name} {entry['source']}"))

    header = {
        "name": "atrium3d",
        "description": (
            f"Synthetic left-atrium MR, seed {seed}: {n_lab} labelled and {n_train - n_lab} unlabelled "
            "training volumes; test labelled."
        ),
        "reference": "partialseg synthetic benchmark (DTML setting)",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "MR"},
        "classes": CLASSES,
        "family": "atrium3d",
        "seed": int(seed),
    }
    if options != DIFFICULTY["standard"]:  # recorded only when not the original benchmark (same bytes as before)
        header["difficulty"] = difficulty if isinstance(difficulty, str) else options
    path = writer.finish(header)
    C.write_preview(writer.root / "preview.png", panels, len(CLASSES), f"atrium3d, seed {seed}")
    return path
