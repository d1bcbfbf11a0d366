"""``atrium3d``: MR volumes with a left atrium, few labelled and many unlabelled (DTML setting).

The left atrium (LA) is a lumpy ellipsoid with four pulmonary veins leaving it posterolaterally
and a finger-like appendage anteriorly on the left. As in the 2018 Atrial Segmentation Challenge,
the label holds the LA body, the appendage and the proximal part of each vein; the distal veins
are just as bright but unlabelled. Around it, in RAS+ world millimetres: the left ventricle
(bright blood pool inside a dark myocardium), the right atrium, the ascending and descending
aorta, the pulmonary artery, both lungs and mediastinal fat, all with blood of similar intensity
and separated from the LA only by a thin dark wall. A smooth random deformation, partial-volume
blur, a bias field and Rician noise finish the volume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from partialseg.data.synthetic import _common as C

__all__ = ["CLASSES", "DEFAULT_SIZE", "SPACING", "generate", "render_case"]

CLASSES = ["background", "left_atrium"]
DEFAULT_SIZE = (64, 64, 48)
#: field of view in mm along x, y, z; the spacing is FOV / size (1.5 mm at the default size)
FOV_MM = (96.0, 96.0, 72.0)
SPACING = tuple(f / n for f, n in zip(FOV_MM, DEFAULT_SIZE))

_TISSUES = ["tissue", "lung", "fat", "wall", "myocardium", "lv_blood", "ra_blood", "aorta", "pa", "pv_distal", "la"]
T = {n: i for i, n in enumerate(_TISSUES)}
_MEANS = {"tissue": 0.30, "lung": 0.06, "fat": 0.55, "wall": 0.22, "myocardium": 0.25, "lv_blood": 0.72,
          "ra_blood": 0.70, "aorta": 0.76, "pa": 0.70, "pv_distal": 0.72, "la": 0.74}


def _segment(coords, p0, p1, radius):
    """Distance ratio to a segment (``<= 1`` inside the tube) and the position ``t`` along it."""
    seg = np.asarray(p1, dtype=np.float64) - np.asarray(p0, dtype=np.float64)
    t = sum((c - p) * s for c, p, s in zip(coords, p0, seg)) / float(seg @ seg)
    tc = np.clip(t, 0.0, 1.0)
    d2 = sum((c - (p + tc * s)) ** 2 for c, p, s in zip(coords, p0, seg))
    return np.sqrt(d2) / radius, t


def render_case(rng: np.random.Generator, shape: Sequence[int],
                spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Draw one volume.

    Args:
        rng: the case's random generator.
        shape: ``(X, Y, Z)``.
        spacing: voxel size in mm.

    Returns:
        ``(image, ground_truth, masks, affine)``: float32 image; uint8 ground truth (1 = left
        atrium); boolean masks ``{"left_atrium", "other_blood"}`` (disjoint by construction: every
        other blood pool is kept one wall away from the LA); ``(4, 4)`` affine (RAS+).
    """
    shape = tuple(shape)
    affine = C.affine_from_spacing(spacing, shape)
    x, y, z = C.deformed_world_grid(rng, affine, shape, spacing, scale=10.0, magnitude=1.5)
    xyz = (x, y, z)
    lumps = C.smooth_noise(rng, shape, scale=6.0)

    c = rng.uniform(-5.0, 5.0, size=3) + np.array([0.0, -6.0, 0.0])
    f = rng.uniform(0.8, 1.15, size=3)
    la_body = C.ellipsoid(xyz, c, (24.0 * f[0], 16.0 * f[1], 19.0 * f[2])) <= 1.0 + 0.1 * lumps

    # pulmonary veins: proximal part labelled, distal part not
    la = la_body.copy()
    pv_distal = np.zeros(shape, dtype=bool)
    for sx in (-1.0, 1.0):
        for sz in (-1.0, 1.0):
            start = c + np.array([sx * 14.0 * f[0], -6.0 * f[1], sz * 8.0 * f[2]])
            direction = np.array([sx * 0.7, -0.6, sz * 0.35]) + rng.normal(0.0, 0.12, size=3)
            direction /= np.linalg.norm(direction)
            end = start + direction * rng.uniform(34.0, 46.0)
            ratio, t = _segment(xyz, start, end, rng.uniform(4.5, 6.5))
            tube = ratio <= 1.0
            cut = rng.uniform(0.35, 0.5)
            la |= tube & (t <= cut)
            pv_distal |= tube & (t > cut)
    # left atrial appendage
    base = c + np.array([-16.0 * f[0], 9.0 * f[1], 8.0 * f[2]])
    tip = base + np.array([-12.0, 14.0, 6.0]) + rng.normal(0.0, 3.0, size=3)
    ratio, _ = _segment(xyz, base, tip, rng.uniform(4.0, 5.5))
    la |= ratio <= 1.0 + 0.1 * lumps
    la_wall = ndimage.binary_dilation(la, iterations=1) & ~la
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
    image = lut[tissue] * (1.0 + 0.05 * C.smooth_noise(rng, shape, scale=2.5))
    image = C.partial_volume(image, 0.8)
    image = image * C.bias_field(rng, shape, rng.uniform(0.15, 0.3))
    image = C.rician_noise(rng, image, rng.uniform(0.03, 0.06))
    return image.astype(np.float32), gt, {"left_atrium": la, "other_blood": others & ~la}, affine


def generate(out_dir: str | Path, seed: int = 0, size: int | Sequence[int] | None = None,
             num_train: int | None = None, num_test: int | None = None, labelled_fraction: float = 0.2,
             progress: bool = False) -> Path:
    """Write the ``atrium3d`` benchmark.

    Args:
        out_dir: dataset folder.
        seed: dataset seed.
        size: volume shape, one int or ``(X, Y, Z)``; default 64 x 64 x 48 (1.5 mm voxels).
        num_train: training volumes (labelled + unlabelled); default 40.
        num_test: labelled test volumes; default 10.
        labelled_fraction: fraction of training volumes that keep their label (at least one).
        progress: show a tqdm progress bar.

    Returns:
        Path of the written ``dataset.json``.
    """
    shape = C.parse_size(size, DEFAULT_SIZE, minimum=24)
    n_train, n_test = C.case_counts(num_train, num_test, 40, 10)
    if not 0.0 < labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction}")
    n_lab = min(n_train, max(1, int(round(labelled_fraction * n_train))))
    spacing = tuple(f / n for f, n in zip(FOV_MM, shape))
    writer = C.DatasetWriter(Path(out_dir), ".nii.gz")
    panels: list[tuple[np.ndarray, np.ndarray | None, str]] = []
    jobs = [("training", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
    for split, i in C.progress(jobs, progress, "atrium3d"):
        rng = C.case_rng(seed, "atrium3d", split, i)
        image, gt, _, affine = render_case(rng, shape, spacing)
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
    path = writer.finish(header)
    C.write_preview(writer.root / "preview.png", panels, len(CLASSES), f"atrium3d, seed {seed}")
    return path
