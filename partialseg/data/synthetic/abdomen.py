"""``abdomen3d``: abdominal CT (HU) or MR volumes with six organs, in partially labelled sources.

The anatomy is placed in RAS+ world millimetres (+x = patient's right, +y = anterior,
+z = superior) computed from each volume's affine, so the liver lies on the patient's right
(larger x), the spleen and stomach on the left, the kidneys posterior on both sides and the
pancreas across the midline in front of the aorta. The arrays are stored LPS-like, as CT converted
from DICOM usually is (affine ``diag(-sx, -sy, sz)``: array index ``i`` grows towards the
patient's left), so code that reads sides from array order instead of the affine gets them wrong.

Around the organs: body outline with subcutaneous fat, an abdominal muscle wall, visceral fat,
vertebrae with discs and spinal canal, paraspinal muscles, aorta, IVC, gallbladder and bowel
loops (soft-tissue distractors), optional hypodense liver and pancreas lesions. Every structure is
deformed by one smooth random field plus per-organ offsets, scales and lumpy outlines, and the
organs are composed in a fixed priority order with a one-voxel gap, so they never overlap.

Sources follow the marginal-loss paper's union of datasets: a small fully labelled ``full``
source (BTCV-like) and liver-, spleen-, pancreas- and kidney-only sources (MSD liver with tumour
value 2, MSD spleen, MSD pancreas with tumour value 2, KiTS with both kidneys in value 1). Each
source has its own intensity profile (contrast phase, noise, blur) and a slightly different field
of view (voxel spacing).

``modality="CT+MR"`` is the atlas paper's three-task multimodal setting with disjoint organ sets:
two CT sources (``ct_a``: liver and stomach, portal phase; ``ct_b``: both kidneys,
nephrographic phase) and one MR source (``mr``: spleen and pancreas) whose appearance is its own
(a T2-like look, profile ``"T2"``: fluid and spleen bright, liver dark, so the organs' contrast
order differs from CT's; a coarse multiplicative organ texture, a strong bias field and Rician
noise; fat and muscle bright enough that an Otsu threshold finds the whole body, as on CT, so
``AtlasCrop`` boxes agree across modalities), so that a network trained on the union loses Dice on the organs that
the test image's modality never labels (see ``docs/results.md``, atlas section).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from partialseg.data.synthetic import _common as C

__all__ = ["CLASSES", "DEFAULT_SIZE", "FOV_MM", "LABEL_MAPS", "SOURCES", "generate", "render_case"]

CLASSES = ["background", "liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach"]
DEFAULT_SIZE = (64, 64, 48)
#: field of view (mm) along x, y, z; the spacing is FOV / size (times a per-source factor)
FOV_MM = (288.0, 288.0, 192.0)
MODALITIES = ("CT", "MR", "CT+MR")

#: source -> (annotated classes, label map or None, contrast profile, noise, blur sigma (voxels), FOV factor)
SOURCES: dict[str, dict[str, Any]] = {
    "full": {"annotated": "all", "profile": "portal", "noise": 12.0, "blur": 0.6, "fov": 1.00},
    "liver": {"annotated": ["liver"], "profile": "portal_late", "noise": 20.0, "blur": 0.8, "fov": 1.04},
    "spleen": {"annotated": ["spleen"], "profile": "arterial", "noise": 15.0, "blur": 0.6, "fov": 0.97},
    "pancreas": {"annotated": ["pancreas"], "profile": "pancreatic", "noise": 10.0, "blur": 0.5, "fov": 0.95},
    "kidney": {"annotated": ["kidney_left", "kidney_right"], "profile": "nephrographic", "noise": 18.0,
               "blur": 0.7, "fov": 1.02},
    # the atlas paper's three-task multimodal setting (modality "CT+MR"): disjoint organ sets,
    # two CT sources and one MR source with its own (T2-like) appearance
    "ct_a": {"annotated": ["liver", "stomach"], "profile": "portal", "noise": 14.0, "blur": 0.6, "fov": 1.0},
    "ct_b": {"annotated": ["kidney_left", "kidney_right"], "profile": "nephrographic", "noise": 16.0, "blur": 0.6,
             "fov": 1.02},
    "mr": {"annotated": ["spleen", "pancreas"], "profile": "T2", "noise": 14.0, "blur": 0.7, "fov": 0.98},
}
#: the marginal-loss paper's union: one fully labelled source and four single-organ sources
MARGINAL_SOURCES = ("full", "liver", "spleen", "pancreas", "kidney")
#: the atlas paper's three-task multimodal union (values are global class indices, no label maps)
MULTIMODAL_SOURCES = ("ct_a", "ct_b", "mr")
#: the modality of each multimodal source
MULTIMODAL_MODALITY = {"ct_a": "CT", "ct_b": "CT", "mr": "MR"}
LABEL_MAPS = {
    "liver": {"1": "liver", "2": "liver"},
    "spleen": {"1": "spleen"},
    "pancreas": {"1": "pancreas", "2": "pancreas"},
    "kidney": {"1": ["kidney_left", "kidney_right"]},
}

# tissue codes of the intensity map
_TISSUES = ["air", "subcut_fat", "muscle", "visceral_fat", "bone", "marrow", "disc", "csf", "aorta", "ivc",
            "bowel", "bowel_gas", "gallbladder", "kidney_cortex", "kidney_medulla", "spleen", "liver",
            "liver_lesion", "stomach_wall", "stomach_fluid", "stomach_gas", "pancreas", "pancreas_lesion"]
T = {name: i for i, name in enumerate(_TISSUES)}

_CT_BASE = {
    "air": -1000, "subcut_fat": -100, "muscle": 50, "visceral_fat": -90, "bone": 700, "marrow": 250,
    "disc": 90, "csf": 10, "bowel": 35, "bowel_gas": -900, "gallbladder": 8, "stomach_wall": 60,
    "stomach_fluid": 12, "stomach_gas": -950,
}
#: contrast-enhanced tissues per profile (HU)
_CT_PHASES = {
    "portal": {"aorta": 160, "ivc": 140, "kidney_cortex": 170, "kidney_medulla": 155, "spleen": 120,
               "liver": 110, "liver_lesion": 60, "pancreas": 100, "pancreas_lesion": 55},
    "portal_late": {"aorta": 130, "ivc": 125, "kidney_cortex": 150, "kidney_medulla": 160, "spleen": 105,
                    "liver": 100, "liver_lesion": 55, "pancreas": 85, "pancreas_lesion": 50},
    "arterial": {"aorta": 280, "ivc": 85, "kidney_cortex": 220, "kidney_medulla": 110, "spleen": 130,
                 "liver": 75, "liver_lesion": 45, "pancreas": 115, "pancreas_lesion": 60},
    "pancreatic": {"aorta": 220, "ivc": 110, "kidney_cortex": 200, "kidney_medulla": 130, "spleen": 125,
                   "liver": 90, "liver_lesion": 50, "pancreas": 125, "pancreas_lesion": 55},
    "nephrographic": {"aorta": 170, "ivc": 150, "kidney_cortex": 185, "kidney_medulla": 185, "spleen": 115,
                      "liver": 105, "liver_lesion": 60, "pancreas": 95, "pancreas_lesion": 55},
}
#: T1-weighted-like MR signal (arbitrary units), shared by all sources up to a gain per source
_MR_BASE = {
    "air": 0, "subcut_fat": 850, "muscle": 260, "visceral_fat": 800, "bone": 40, "marrow": 520, "disc": 200,
    "csf": 90, "aorta": 120, "ivc": 150, "bowel": 320, "bowel_gas": 10, "gallbladder": 80,
    "kidney_cortex": 420, "kidney_medulla": 260, "spleen": 300, "liver": 460, "liver_lesion": 250,
    "stomach_wall": 330, "stomach_fluid": 90, "stomach_gas": 5, "pancreas": 540, "pancreas_lesion": 300,
}
_MR_GAIN = {"full": 1.0, "liver": 0.85, "spleen": 1.15, "pancreas": 0.95, "kidney": 1.08, "ct_a": 1.0,
            "ct_b": 1.0, "mr": 1.0}
#: the multimodal MR source's T2-like signal (profile "T2"): organ contrast order
#: spleen > kidney > stomach wall > pancreas > liver (CT: kidney > spleen > liver > pancreas),
#: fluid (gallbladder, stomach contents, CSF) bright, vessels dark (flow voids); fat and muscle
#: well above air, so that Otsu's threshold separates the body from the air (with darker fat it
#: separated the bright organs from everything else and the body crop lost the body); the
#: pancreas well below the visceral fat around it (at 400 against 440 it was nearly invisible)
_MR_T2 = {
    "air": 0, "subcut_fat": 480, "muscle": 170, "visceral_fat": 440, "bone": 30, "marrow": 160, "disc": 420,
    "csf": 900, "aorta": 35, "ivc": 50, "bowel": 380, "bowel_gas": 5, "gallbladder": 950,
    "kidney_cortex": 560, "kidney_medulla": 720, "spleen": 660, "liver": 210, "liver_lesion": 640,
    "stomach_wall": 290, "stomach_fluid": 860, "stomach_gas": 5, "pancreas": 270, "pancreas_lesion": 700,
}
#: relative amplitude of the T2 profile's coarse multiplicative texture, per tissue (others 0.05)
_MR_T2_TEXTURE = {"liver": 0.25, "spleen": 0.2, "kidney_cortex": 0.2, "kidney_medulla": 0.2, "pancreas": 0.3,
                  "stomach_wall": 0.25, "bowel": 0.3}


def _inside(coords, centre, radii, rotation=0.0, lumps=None, amp=0.0) -> np.ndarray:
    r = C.ellipsoid(coords, centre, radii, rotation)
    return r <= (1.0 + amp * lumps) if lumps is not None else r <= 1.0


def _tube(coords, points: np.ndarray, radii: np.ndarray, lumps=None, amp=0.0) -> np.ndarray:
    """Voxels within a polyline tube whose radius varies linearly along each segment."""
    best = None
    for p0, p1, r0, r1 in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        seg = p1 - p0
        length2 = float(seg @ seg)
        t = sum((c - p) * s for c, p, s in zip(coords, p0, seg)) / length2
        t = np.clip(t, 0.0, 1.0)
        d2 = sum((c - (p + t * s)) ** 2 for c, p, s in zip(coords, p0, seg))
        ratio = np.sqrt(d2) / (r0 + t * (r1 - r0))
        best = ratio if best is None else np.minimum(best, ratio)
    return best <= (1.0 + amp * lumps) if lumps is not None else best <= 1.0


def render_case(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], source: str,
                modality: str = "CT") -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Draw one abdomen.

    Args:
        rng: the case's random generator.
        shape: volume shape ``(X, Y, Z)``.
        spacing: voxel size in mm.
        source: a key of :data:`SOURCES` (selects the intensity profile).
        modality: ``"CT"`` (HU) or ``"MR"`` (T1-like arbitrary units, or T2-like for a source of
            profile ``"T2"``); both int16.

    Returns:
        ``(image, ground_truth, organ_masks, lesion_mask, affine)``: the image; the uint8 ground
        truth with values = indices of :data:`CLASSES`; one boolean mask per organ (pairwise
        disjoint by construction); the boolean mask of liver and pancreas lesions (inside those
        organs); the ``(4, 4)`` affine.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {sorted(SOURCES)}, got {source!r}")
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    shape = tuple(shape)
    affine = C.affine_from_spacing(spacing, shape, flip_xy=True)
    # world coordinates of every voxel after a smooth random deformation (mm)
    x, y, z = C.deformed_world_grid(rng, affine, shape, spacing, scale=10.0, magnitude=1.2)
    xyz = (x, y, z)
    lumps_a = C.smooth_noise(rng, shape, scale=6.0)
    lumps_b = C.smooth_noise(rng, shape, scale=9.0)

    def jitter(scale_mm):
        return rng.uniform(-scale_mm, scale_mm, size=3)

    def size_factor():
        return rng.uniform(0.85, 1.15)

    # body outline
    bx, by = 135.0 * rng.uniform(0.88, 1.04), 100.0 * rng.uniform(0.88, 1.04)
    body_r = np.sqrt((x / bx) ** 2 + ((y + 5.0) / by) ** 2)
    body = body_r <= 1.0 + 0.02 * lumps_b
    fat_depth = rng.uniform(12.0, 28.0)
    inner = body_r <= 1.0 - fat_depth / by
    cavity = body_r <= 1.0 - (fat_depth + 9.0) / by

    spine_y = -5.0 - 0.58 * by
    vertebra = _inside((x, y), (0.0, spine_y), (21.0, 18.0))
    cortex = vertebra & ~_inside((x, y), (0.0, spine_y), (17.0, 14.0))
    disc = vertebra & (np.mod(z + rng.uniform(0, 32), 32.0) < 6.0)
    canal = _inside((x, y), (0.0, spine_y - 27.0), (9.0, 8.0))
    posterior_arch = _inside((x, y), (0.0, spine_y - 30.0), (16.0, 14.0)) & ~canal
    paraspinal = (_inside((x, y), (38.0, spine_y - 22.0), (26.0, 20.0))
                  | _inside((x, y), (-38.0, spine_y - 22.0), (26.0, 20.0)))
    aorta = _inside((x, y), (-14.0, spine_y + 32.0), (11.0, 11.0))
    ivc = _inside((x, y), (24.0, spine_y + 30.0), (13.0, 10.0))
    reserved = vertebra | canal | posterior_arch | paraspinal | aorta | ivc

    # organs, in priority order; each is cut by the ones before it plus a one-voxel gap
    occupied = reserved.copy()
    organs: dict[str, np.ndarray] = {}

    def place(name: str, mask: np.ndarray) -> None:
        nonlocal occupied
        mask = C.largest_component(mask & cavity & ~ndimage.binary_dilation(occupied, iterations=1))
        organs[name] = mask
        occupied = occupied | mask

    k_rot = rng.uniform(-0.25, 0.25)
    for name, side in (("kidney_right", 1.0), ("kidney_left", -1.0)):
        c = np.array([side * 62.0 * bx / 135.0, spine_y + 12.0, -20.0 if side > 0 else -8.0]) + jitter(7.0)
        f = size_factor()
        place(name, _inside(xyz, c, (24.0 * f, 24.0 * f, 52.0 * f), side * (0.35 + k_rot), lumps_a, 0.08))
    kidney_medulla = {}
    for name in ("kidney_right", "kidney_left"):
        m = organs[name]
        dist = np.zeros(shape, dtype=np.float64)
        box = ndimage.find_objects(m.astype(np.uint8))
        if box:  # distance to the kidney surface, computed on the kidney's bounding box only
            box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box[0])
            dist[box] = ndimage.distance_transform_edt(m[box], sampling=spacing)
        kidney_medulla[name] = m & (dist > 6.0) & (lumps_b > -0.6)

    pts = np.array([[28.0, -8.0, -18.0], [5.0, 8.0, -6.0], [-35.0, 2.0, 4.0], [-72.0, -22.0, 14.0]])
    pts = pts + rng.uniform(-6.0, 6.0, size=pts.shape)
    prad = np.array([17.0, 12.0, 11.0, 8.5]) * size_factor()
    place("pancreas", _tube(xyz, pts, prad, lumps_a, 0.12))

    c = np.array([-0.6 * bx, spine_y + 28.0, 40.0]) + jitter(6.0)
    f = size_factor()
    place("spleen", _inside(xyz, c, (26.0 * f, 42.0 * f, 48.0 * f), -0.5, lumps_b, 0.1))

    c_st = np.array([-45.0, 25.0, 40.0]) + jitter(8.0)
    f = size_factor()
    place("stomach", _inside(xyz, c_st, (40.0 * f, 34.0 * f, 48.0 * f), 0.4, lumps_a, 0.12))

    gallbladder = _inside(xyz, np.array([48.0, 35.0, 0.0]) + jitter(6.0), (14.0, 14.0, 26.0), 0.3)
    occupied = occupied | gallbladder
    c = np.array([55.0, 5.0, 50.0]) + jitter(8.0)
    f = size_factor()
    right_lobe = _inside(xyz, c, (72.0 * f, 72.0 * f, 62.0 * f), 0.0, lumps_b, 0.08)
    left_lobe = _inside(xyz, c + np.array([-70.0, 28.0, 8.0]), (50.0 * f, 28.0 * f, 36.0 * f), 0.2, lumps_b, 0.1)
    place("liver", right_lobe | left_lobe)

    # lesions: hypodense blobs inside the liver (60% of cases) and pancreas (40%)
    lesions = np.zeros(shape, dtype=bool)
    for organ, prob, n_max, rad in (("liver", 0.6, 3, (7.0, 20.0)), ("pancreas", 0.4, 1, (6.0, 11.0))):
        idx = np.argwhere(organs[organ])
        if rng.random() < prob and len(idx):
            for _ in range(int(rng.integers(1, n_max + 1))):
                v = idx[int(rng.integers(len(idx)))]
                centre = (x[tuple(v)], y[tuple(v)], z[tuple(v)])
                r = rng.uniform(*rad)
                lesions |= _inside(xyz, centre, (r, r, r), 0.0, lumps_a, 0.15) & organs[organ]

    # bowel loops in the remaining free cavity, lower and anterior
    bowel = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(5, 9))):
        c = np.array([rng.uniform(-90, 90), rng.uniform(-10, 70), rng.uniform(-95, 10)])
        r = rng.uniform(14.0, 24.0, size=3)
        bowel |= _inside(xyz, c, r, rng.uniform(0, math.pi), lumps_b, 0.2)
    bowel &= cavity & ~ndimage.binary_dilation(occupied, iterations=1)
    bowel_gas = bowel & (lumps_a > 1.3)

    # stomach contents: wall, fluid, and an anterior gas cap
    stomach = organs["stomach"]
    st_core = ndimage.binary_erosion(stomach, iterations=1)
    st_gas = st_core & (y > c_st[1] + rng.uniform(5.0, 20.0))

    tissue = np.full(shape, T["air"], dtype=np.uint8)
    paint = [
        (body, "subcut_fat"), (inner, "muscle"), (cavity, "visceral_fat"), (paraspinal, "muscle"),
        (vertebra, "marrow"), (cortex, "bone"), (posterior_arch, "bone"), (disc, "disc"), (canal, "csf"),
        (aorta, "aorta"), (ivc, "ivc"), (bowel, "bowel"), (bowel_gas, "bowel_gas"),
        (gallbladder & cavity, "gallbladder"),
        (organs["kidney_right"] | organs["kidney_left"], "kidney_cortex"),
        (kidney_medulla["kidney_right"] | kidney_medulla["kidney_left"], "kidney_medulla"),
        (organs["spleen"], "spleen"), (organs["liver"], "liver"), (stomach, "stomach_wall"),
        (st_core, "stomach_fluid"), (st_gas, "stomach_gas"), (organs["pancreas"], "pancreas"),
        (lesions & organs["liver"], "liver_lesion"), (lesions & organs["pancreas"], "pancreas_lesion"),
    ]
    for mask, name in paint:
        tissue[mask] = T[name]

    gt = np.zeros(shape, dtype=np.uint8)
    for k, name in enumerate(CLASSES[1:], start=1):
        gt[organs[name]] = k

    prof = SOURCES[source]
    if modality == "CT":
        values = dict(_CT_BASE)
        values.update(_CT_PHASES.get(prof["profile"], _CT_PHASES["portal"]))  # an MR source drawn as CT: portal
        lut = np.array([values[t] + (rng.normal(0, 6) if values[t] > -500 else 0.0) for t in _TISSUES],
                       dtype=np.float32)
        image = lut[tissue] + 8.0 * C.smooth_noise(rng, shape, scale=2.5)
        image = C.partial_volume(image, prof["blur"])
        image = C.gaussian_noise(rng, image, prof["noise"])
        image = np.clip(np.round(image), -1024, 3071).astype(np.int16)
    elif prof["profile"] == "T2":  # the multimodal MR source's own look (modality "CT+MR")
        gain = _MR_GAIN[source] * rng.uniform(0.9, 1.1)
        lut = np.array([_MR_T2[t] * gain * rng.uniform(0.92, 1.08) for t in _TISSUES], dtype=np.float32)
        amp = np.array([_MR_T2_TEXTURE.get(t, 0.05) for t in _TISSUES], dtype=np.float32)
        image = lut[tissue] * (1.0 + amp[tissue] * C.smooth_noise(rng, shape, scale=1.5))
        image = C.partial_volume(image, prof["blur"])
        image = image * C.bias_field(rng, shape, 0.4)
        image = C.to_int16(C.rician_noise(rng, image, prof["noise"] * 2.0))
    else:
        gain = _MR_GAIN[source] * rng.uniform(0.9, 1.1)
        lut = np.array([_MR_BASE[t] * gain * rng.uniform(0.92, 1.08) for t in _TISSUES], dtype=np.float32)
        image = lut[tissue] * (1.0 + 0.05 * C.smooth_noise(rng, shape, scale=2.5))
        image = C.partial_volume(image, prof["blur"])
        image = image * C.bias_field(rng, shape, 0.25)
        image = C.to_int16(C.rician_noise(rng, image, prof["noise"] * 1.5))
    return image, gt, organs, lesions, affine


def _source_label(source: str, gt: np.ndarray, lesions: np.ndarray) -> np.ndarray:
    """The label a source's annotators would have drawn, in the source's own values."""
    if source == "full":
        return gt.copy()
    out = np.zeros_like(gt)
    if source == "liver":
        out[gt == 1] = 1
        out[(gt == 1) & lesions] = 2
    elif source == "spleen":
        out[gt == 2] = 1
    elif source == "pancreas":
        out[gt == 5] = 1
        out[(gt == 5) & lesions] = 2
    elif source == "kidney":
        out[(gt == 3) | (gt == 4)] = 1
    elif source in MULTIMODAL_SOURCES:
        for name in SOURCES[source]["annotated"]:
            k = CLASSES.index(name)
            out[gt == k] = k
    else:
        raise ValueError(f"unknown source {source!r}")
    return out


def generate(out_dir: str | Path, seed: int = 0, size: int | Sequence[int] | None = None,
             num_train: int | None = None, num_test: int | None = None, num_full: int | None = None,
             modality: str = "CT", progress: bool = False, num_val: int = 0) -> Path:
    """Write the ``abdomen3d`` benchmark.

    Args:
        out_dir: dataset folder.
        seed: dataset seed.
        size: volume shape, one int or ``(X, Y, Z)``; default 64 x 64 x 48 (about 4.5 x 4.5 x 4 mm).
        num_train: training cases per partially labelled source (liver, spleen, pancreas, kidney; with
            ``"CT+MR"``: ct_a, ct_b, mr); default 8.
        num_test: fully labelled test cases; default 8 (16 with ``"CT+MR"``: alternately CT and MR,
            the CT ones alternately with ``ct_a``'s and ``ct_b``'s appearance, the MR ones with
            ``mr``'s).
        num_full: training cases of the fully labelled ``full`` source; default 4 (0 with ``"CT+MR"``,
            where they are CT).
        modality: ``"CT"`` (HU, int16), ``"MR"`` (T1-like, int16), or ``"CT+MR"``: the atlas
            paper's three-task multimodal setting, CT source ``ct_a`` annotating liver and
            stomach, CT source ``ct_b`` both kidneys, MR source ``mr`` (T2-like look) spleen and
            pancreas (label values = global indices).
        progress: show a tqdm progress bar.
        num_val: fully labelled validation cases (source ``full``, the ``"validation"`` split,
            files ``imagesTr/val_NNN``); default 0 (no validation split). The other cases do not
            depend on it.

    Returns:
        Path of the written ``dataset.json``.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    shape = C.parse_size(size, DEFAULT_SIZE, minimum=24)
    n_part = 8 if num_train is None else int(num_train)
    n_full = (0 if modality == "CT+MR" else 4) if num_full is None else int(num_full)
    n_test = (16 if modality == "CT+MR" else 8) if num_test is None else int(num_test)
    n_val = int(num_val)
    if n_part < 0 or n_full < 0 or n_test < 0 or n_val < 0 or n_part + n_full < 1:
        raise ValueError(f"case counts must be >= 0 with at least one training case, got "
                         f"num_train={n_part}, num_full={n_full}, num_test={n_test}, num_val={n_val}")
    writer = C.DatasetWriter(Path(out_dir), ".nii.gz")
    jobs = [("training", "full")] * n_full
    for source in MULTIMODAL_SOURCES if modality == "CT+MR" else MARGINAL_SOURCES[1:]:
        jobs += [("training", source)] * n_part
    jobs += [("test", "full")] * n_test
    jobs += [("validation", "full")] * n_val
    panels: list[tuple[np.ndarray, np.ndarray | None, str]] = []
    counters = {"training": 0, "validation": 0, "test": 0}
    shown: set[str] = set()
    for split, source in C.progress(jobs, progress, "abdomen3d"):
        i = counters[split]
        counters[split] += 1
        rng = C.case_rng(seed, "abdomen3d", split, i)
        spacing = tuple(f * SOURCES[source]["fov"] / n for f, n in zip(FOV_MM, shape))
        case_modality, look = modality, source  # look: the source whose appearance the case has
        if modality == "CT+MR":
            if split == "training":
                case_modality = MULTIMODAL_MODALITY[source]
            else:  # test / validation: alternately CT (ct_a's, ct_b's look) and MR (mr's look)
                look = "mr" if i % 2 == 1 else ("ct_a" if (i // 2) % 2 == 0 else "ct_b")
                case_modality = MULTIMODAL_MODALITY[look]
        image, gt, _, lesions, affine = render_case(rng, shape, spacing, look, case_modality)
        label = _source_label(source, gt, lesions) if split == "training" else gt
        name = {"training": f"{source}_{i:03d}", "validation": f"val_{i:03d}", "test": f"test_{i:03d}"}[split]
        folder = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
        img_abs, img_rel = writer.path(folder[0], name)
        lab_abs, lab_rel = writer.path(folder[1], name)
        C.write_nifti(img_abs, image, affine)
        C.write_nifti(lab_abs, label, affine)
        annotated = SOURCES[source]["annotated"] if split == "training" else "all"
        annotated = list(annotated) if isinstance(annotated, list) else annotated
        writer.add(split, {"image": img_rel, "label": lab_rel, "annotated": annotated, "source": source,
                           "modality": case_modality,
                           "contrast": SOURCES[look]["profile"] if case_modality == "CT" or look == "mr" else "T1"})
        key = f"{split}:{source}:{case_modality}"
        if key not in shown:
            shown.add(key)
            k = C.slice_with_most(label if label.any() else gt, axis=2)
            # axial slice in radiological view: array i runs towards the patient's left (columns),
            # j towards posterior (rows, anterior at the top)
            view = image[:, :, k].T.astype(np.float32)
            if case_modality == "CT":  # soft-tissue window
                view = np.clip((view + 160.0) / 400.0, 0.0, 1.0)
            panels.append((view, label[:, :, k].T, f"{name} ann={annotated}"))

    if modality == "CT+MR":
        what = ("CT source ct_a annotating liver and stomach, CT source ct_b annotating both kidneys, MR source "
                "mr annotating spleen and pancreas (atlas paper's three-task multimodal setting); test fully "
                "labelled, alternately CT and MR.")
    else:
        what = ("a small fully labelled source plus liver-, spleen-, pancreas- and kidney-only sources "
                "(kidneys share value 1, split left/right by world side); test fully labelled.")
    header = {
        "name": "abdomen3d",
        "description": (f"Synthetic abdominal {modality} (liver, spleen, kidneys, pancreas, stomach), "
                        f"seed {seed}: {what}"),
        "reference": "partialseg synthetic benchmark (marginal-loss and atlas settings)",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "classes": CLASSES,
        "family": "abdomen3d",
        "seed": int(seed),
    }
    used = {case["source"] for case in writer.training}
    path = writer.finish(header, {k: v for k, v in LABEL_MAPS.items() if k in used})
    C.write_preview(writer.root / "preview.png", panels, len(CLASSES), f"abdomen3d ({modality}), seed {seed}",
                    ncols=3)
    return path
