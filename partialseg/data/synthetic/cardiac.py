"""``cardiac2d``: short-axis cine-MR-like slices with LV, MYO and RV (the DCL setting).

Each synthetic subject gives two training (or test) cases, its end-diastolic (ED) and
end-systolic (ES) slice. The anatomy is drawn on in-plane millimetre coordinates bent by a smooth
random deformation: the LV blood pool (with papillary muscles, labelled LV as in ACDC), the
myocardial ring (thicker at ES: myocardial area is conserved while the cavity shrinks), the RV
crescent wrapped around the septum, the RV free wall, epicardial fat, both lungs, the chest wall,
the liver dome and the descending aorta (bright blood that is not LV). Intensities are
bSSFP-like (blood bright, myocardium dark, fat bright, lung black) with per-subject variation,
partial-volume blur, a bias field and Rician noise.

Training labels follow the DCL paper's partial annotation: ``variant="single"`` annotates exactly
one structure per case (LV, MYO or RV, balanced); ``variant="wholeheart"`` adds whole-heart cases
(``"annotated": ["background"]``, the heart carrying value 1 = "one of LV/MYO/RV") as a fourth
annotation type. Test cases are fully labelled.

``levels=N`` (``N >= 1``) turns each subject into a short-axis *stack*: ``N`` slice levels from
base to apex per phase (``2N`` cases per subject). Towards the apex the LV cavity and the RV
shrink, and the heart moves along its tilted long axis; the RV ends at a subject-specific level
(about two thirds of the way down) and the LV cavity just before the apex, so apical slices hold
no RV (and the last ones no LV blood pool). Subjects also vary more in heart position
(+-15 mm), heart size (x0.8-1.2) and contrast (a gamma of 0.7-1.4 on the tissue intensities,
stronger bias and noise). A training case keeps its assigned structure even where the structure
is absent from its slice: the label is then empty (``"present": false`` in the entry), as a real
annotator's "no RV in this apical slice". ``levels=0`` (the default) writes exactly the files
of earlier versions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from partialseg.data.synthetic import _common as C

__all__ = ["CLASSES", "DEFAULT_SIZE", "SPACING", "generate", "render_case", "sample_subject"]

CLASSES = ["background", "LV", "MYO", "RV"]
DEFAULT_SIZE = (96, 96)
SPACING = (1.37, 1.37)
PHASES = ("ED", "ES")
VARIANTS = ("single", "wholeheart")
#: stack mode: the fraction of an RV (or LV cavity) size below which the structure is absent
_VANISH = 0.3

# tissue codes of the intensity map (not labels)
(_T_OTHER, _T_LUNG, _T_LIVER, _T_MUSCLE, _T_FAT, _T_AORTA,
 _T_PERIFAT, _T_RVWALL, _T_RV, _T_MYO, _T_LV, _T_PAP) = range(12)
_TISSUE_MEAN = {
    _T_OTHER: 0.42, _T_LUNG: 0.05, _T_LIVER: 0.33, _T_MUSCLE: 0.27, _T_FAT: 0.78, _T_AORTA: 0.80,
    _T_PERIFAT: 0.72, _T_RVWALL: 0.30, _T_RV: 0.86, _T_MYO: 0.26, _T_LV: 0.88, _T_PAP: 0.30,
}


def sample_subject(rng: np.random.Generator, shape: Sequence[int]) -> dict[str, Any]:
    """Draw one subject's geometry and appearance (shared by its ED and ES slices).

    Args:
        rng: the subject's random generator.
        shape: slice shape ``(H, W)``.

    Returns:
        A dict of parameters consumed by :func:`render_case`.
    """
    fov = min(shape) * SPACING[0]
    s = fov / (96 * 1.37)  # anatomy scales with the field of view
    r_endo = rng.uniform(17.0, 23.0) * s
    thick = rng.uniform(6.5, 9.5) * s
    return {
        "scale": s,
        "centre": rng.uniform(-6.0, 6.0, size=2) * s,
        "rotation": rng.uniform(-0.35, 0.35),
        "r_endo_ed": r_endo,
        "thick_ed": thick,
        "es_fraction": rng.uniform(0.58, 0.72),
        "myo_area_change": rng.uniform(0.95, 1.05),
        "rv_scale": rng.uniform(0.85, 1.15),
        "rv_es_fraction": rng.uniform(0.70, 0.82),
        "pap_angles": rng.uniform([0.6, 2.0], [1.2, 2.8]),
        "pap_radius": rng.uniform(2.0, 3.2) * s,
        "intensity": {t: m * rng.uniform(0.9, 1.1) for t, m in _TISSUE_MEAN.items()},
        "noise": rng.uniform(0.025, 0.06),
        "bias": rng.uniform(0.1, 0.3),
        "deform_seed": int(rng.integers(0, 2**31 - 1)),
        "shape_seed": int(rng.integers(0, 2**31 - 1)),
        "lung_shift": rng.uniform(-6.0, 6.0, size=4) * s,
        "liver_shift": rng.uniform(-8.0, 8.0, size=2) * s,
        "aorta_pos": np.array([rng.uniform(28.0, 40.0), rng.uniform(18.0, 32.0)]) * s,
    }


def stack_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of a subject's stack draws (its own stream: the default draws are untouched)."""
    split_id = {"training": 1, "test": 2, "validation": 3}[split]
    return np.random.default_rng([int(seed), C.FAMILY_IDS["cardiac2d"], split_id, int(index), 101])


def sample_stack(params: dict[str, Any], rng: np.random.Generator, levels: int) -> tuple[dict[str, Any], list[float]]:
    """Add stack mode's between-subject variation to ``params`` and draw the slice levels.

    Args:
        params: output of :func:`sample_subject` (not modified).
        rng: :func:`stack_rng` of the subject.
        levels: slices per phase, ``>= 1``.

    Returns:
        ``(params, positions)``: a copy of ``params`` with the heart moved and scaled, the
        contrast and noise changed and a ``"stack"`` entry (read by :func:`render_case`), and
        ``levels`` positions in ``[0, 1]`` (0 = base, 1 = apex), one per stratum, increasing.

    Example:
        >>> p = sample_subject(np.random.default_rng(0), (64, 64))
        >>> q, pos = sample_stack(p, np.random.default_rng(1), 3)
        >>> len(pos), all(a < b for a, b in zip(pos, pos[1:])), 0.0 <= pos[0] and pos[-1] <= 1.0
        (3, True, True)
    """
    s = params["scale"]
    out = dict(params)
    size = rng.uniform(0.8, 1.2)
    out["r_endo_ed"] = params["r_endo_ed"] * size
    out["thick_ed"] = params["thick_ed"] * size
    out["centre"] = np.asarray(params["centre"]) + rng.uniform(-15.0, 15.0, size=2) * s
    gamma = rng.uniform(0.7, 1.4)
    out["intensity"] = {t: float(v) ** gamma for t, v in params["intensity"].items()}
    out["noise"] = rng.uniform(0.03, 0.08)
    out["bias"] = rng.uniform(0.2, 0.45)
    tilt = rng.uniform(0, 2 * math.pi)
    out["stack"] = {
        "tilt": np.array([math.cos(tilt), math.sin(tilt)]) * rng.uniform(6.0, 12.0) * s,  # base -> apex shift, mm
        "rv_end": rng.uniform(0.6, 0.8),  # level where the RV ends
        "lv_end": rng.uniform(0.88, 1.0),  # level where the LV cavity ends
        "taper": rng.uniform(0.25, 0.4),  # epicardial radius lost from base to apex (fraction)
    }
    positions = [(k + rng.uniform(0.1, 0.9)) / levels for k in range(levels)]
    return out, positions


def _level_factor(level: float, end: float) -> float:
    """Relative size of a structure at ``level`` that ends at ``end`` (an ellipsoid's section)."""
    return math.sqrt(max(0.0, 1.0 - (level / end) ** 2))


def render_case(params: dict[str, Any], phase: str, rng: np.random.Generator,
                shape: Sequence[int], level: float | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Render one phase of a subject.

    Args:
        params: output of :func:`sample_subject`.
        phase: ``"ED"`` or ``"ES"``.
        rng: random generator of this case (phase-specific deformation, noise).
        shape: slice shape ``(H, W)``.
        level: stack mode (``params`` from :func:`sample_stack`): the slice position in
            ``[0, 1]``, 0 = base, 1 = apex. None (the default) renders the mid-ventricular slice
            exactly as earlier versions.

    Returns:
        ``(image, ground_truth, masks)``: float32 image ``(H, W)``; uint8 ground truth ``(H, W)``
        with values 0-3 (indices of :data:`CLASSES`); boolean masks ``{"LV", "MYO", "RV"}``, pairwise
        disjoint by construction.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    shape = tuple(shape)
    s = params["scale"]
    # subject-level deformation (shared by both phases) plus a small phase-specific one, in mm
    subj = C.deformation_field(np.random.default_rng(params["deform_seed"]), shape, scale=14.0, magnitude=1.6)
    own = C.deformation_field(rng, shape, scale=10.0, magnitude=0.5)
    disp = (subj + own) * SPACING[0]
    u0, v0 = C.world_grid(C.affine_from_spacing(SPACING, shape), shape)
    u = u0 + disp[0]
    v = v0 + disp[1]

    # heart frame: a along the long in-plane axis, b towards the RV (negative b)
    cu, cv = params["centre"]
    stack = params.get("stack") if level is not None else None
    if level is not None and stack is None:
        raise ValueError("level needs the parameters of sample_stack (params['stack'] is missing)")
    if stack is not None:
        if not 0.0 <= float(level) <= 1.0:
            raise ValueError(f"level must lie in [0, 1] (0 = base, 1 = apex), got {level!r}")
        cu, cv = cu + level * stack["tilt"][0], cv + level * stack["tilt"][1]
    rot = params["rotation"]
    a = math.cos(rot) * (u - cu) + math.sin(rot) * (v - cv)
    b = -math.sin(rot) * (u - cu) + math.cos(rot) * (v - cv)
    rad = np.sqrt(a * a + b * b)
    ang = np.arctan2(a, b)
    shape_rng = np.random.default_rng(params["shape_seed"])
    m_endo = C.radial_modulation(shape_rng, ang, 0.06, orders=3)
    m_thick = C.radial_modulation(shape_rng, ang, 0.25, orders=2)

    r_endo = params["r_endo_ed"]
    r_epi = r_endo + params["thick_ed"]
    rv_scale = params["rv_scale"]
    if phase == "ES":
        myo_area = (r_epi**2 - r_endo**2) * params["myo_area_change"]
        r_endo = r_endo * params["es_fraction"]
        r_epi = math.sqrt(r_endo**2 + myo_area)
        rv_scale = rv_scale * params["rv_es_fraction"]
    thick = r_epi - r_endo
    lv_present = True
    if stack is not None:  # towards the apex: the cavity closes, the wall tapers, the RV ends
        f_lv = _level_factor(level, stack["lv_end"])
        lv_present = f_lv >= _VANISH
        r_epi = r_epi * (1.0 - stack["taper"] * level)
        r_endo = r_endo * f_lv if lv_present else 0.0
        thick = r_epi - r_endo
        rv_scale = rv_scale * _level_factor(level, stack["rv_end"])
    endo_r = r_endo * m_endo
    epi_r = endo_r + thick * m_thick
    lv = rad <= endo_r if lv_present else np.zeros(shape, dtype=bool)
    epi = rad <= epi_r
    myo = epi & ~lv
    # RV crescent: an ellipse centred on the septal side, minus the LV epicardium
    re = r_endo + thick
    if stack is None or rv_scale >= _VANISH * params["rv_scale"]:
        rv_ell = C.ellipsoid((a, b), (0.0, -0.42 * re - 0.35 * re * rv_scale),
                             (1.2 * re * (0.6 + 0.4 * rv_scale), 0.95 * re * rv_scale))
        rv = C.largest_component((rv_ell <= 1.0) & ~epi)
        rv_wall = (rv_ell <= 1.0 + 2.6 * s / (0.95 * re * rv_scale)) & ~(rv_ell <= 1.0) & ~epi
    else:  # below the RV's end: no RV, no RV wall
        rv = np.zeros(shape, dtype=bool)
        rv_wall = np.zeros(shape, dtype=bool)
    # papillary muscles: dark dots inside the LV cavity, labelled LV (ACDC convention)
    pap = np.zeros(shape, dtype=bool)
    pr = params["pap_radius"] * (1.2 if phase == "ES" else 1.0)
    for theta in params["pap_angles"]:
        pa, pb = 0.68 * r_endo * math.sin(theta), 0.68 * r_endo * math.cos(theta)
        pap |= ((a - pa) ** 2 + (b - pb) ** 2) <= pr * pr
    pap &= lv
    # epicardial fat: patches of a thin shell around the heart
    shell = C.ellipsoid((a, b), (0.0, -0.2 * re), (re * 1.55, re * 1.45)) <= 1.0
    fat_patch = C.smooth_noise(rng, shape, scale=8.0) > 0.3
    peri_fat = shell & fat_patch & ~epi & ~rv & ~rv_wall

    # surroundings, in image coordinates (rows = u, cols = v)
    ls = params["lung_shift"]
    lung = (C.ellipsoid((u, v), (-8 * s + ls[0], 58 * s + ls[1]), (52 * s, 26 * s)) <= 1.0) | (
        C.ellipsoid((u, v), (-18 * s + ls[2], -62 * s + ls[3]), (44 * s, 22 * s)) <= 1.0
    )
    lsh = params["liver_shift"]
    liver = C.ellipsoid((u, v), (66 * s + lsh[0], -38 * s + lsh[1]), (34 * s, 52 * s)) <= 1.0
    wall_edge = -52 * s + 3.0 * C.smooth_noise(rng, shape, scale=20.0)
    chest_muscle = u < wall_edge
    chest_fat = u < wall_edge - 7 * s
    ap = params["aorta_pos"]
    aorta = ((u - ap[0]) ** 2 + (v - ap[1]) ** 2) <= (8.5 * s) ** 2

    tissue = np.full(shape, _T_OTHER, dtype=np.uint8)
    for mask, code in ((lung, _T_LUNG), (liver, _T_LIVER), (chest_muscle, _T_MUSCLE), (chest_fat, _T_FAT),
                       (aorta, _T_AORTA), (peri_fat, _T_PERIFAT), (rv_wall, _T_RVWALL), (rv, _T_RV),
                       (myo, _T_MYO), (lv, _T_LV), (pap, _T_PAP)):
        tissue[mask] = code

    gt = np.zeros(shape, dtype=np.uint8)
    gt[lv] = 1
    gt[myo] = 2
    gt[rv] = 3

    lut = np.array([params["intensity"][t] for t in range(len(_TISSUE_MEAN))], dtype=np.float32)
    image = lut[tissue]
    image = image * (1.0 + 0.06 * C.smooth_noise(rng, shape, scale=3.0))  # tissue texture
    image = C.partial_volume(image, 0.7)
    image = image * C.bias_field(rng, shape, params["bias"])
    image = C.rician_noise(rng, image, params["noise"])
    return image.astype(np.float32), gt, {"LV": lv, "MYO": myo, "RV": rv}


def generate(out_dir: str | Path, seed: int = 0, size: int | Sequence[int] | None = None,
             num_train: int | None = None, num_test: int | None = None, variant: str = "single",
             progress: bool = False, num_val: int = 0, levels: int = 0) -> Path:
    """Write the ``cardiac2d`` benchmark.

    Args:
        out_dir: dataset folder.
        seed: dataset seed.
        size: slice size, one int (square) or ``(H, W)``; default 96 x 96.
        num_train: training subjects (each gives an ED and an ES case); default 24.
        num_test: test subjects (ED and ES, fully labelled); default 8.
        variant: ``"single"`` (one of LV/MYO/RV per case) or ``"wholeheart"`` (LV, MYO, RV or
            whole heart per case).
        progress: show a tqdm progress bar.
        num_val: validation subjects (ED and ES, fully labelled, source ``full``, the
            ``"validation"`` split, files ``imagesTr/valNNN_ED``); default 0 (no validation
            split). The other cases do not depend on it: ``num_val=0`` writes exactly what
            earlier versions wrote.
        levels: 0 (default): one mid-ventricular slice per phase, as earlier versions.
            ``N >= 1``: stack mode (see the module docstring), ``N`` slice levels from base to
            apex per phase, so ``2N`` cases per subject, named ``subNNN_L<k>_<phase>``; each
            entry has ``"level"`` (slice position, 0 = base, 1 = apex), ``"slice"`` (``k``) and,
            for training cases, ``"present"`` (whether the annotated structure is in the slice).

    Returns:
        Path of the written ``dataset.json``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    shape = C.parse_size(size, DEFAULT_SIZE, minimum=32)
    n_train, n_test = C.case_counts(num_train, num_test, 24, 8)
    if isinstance(num_val, bool) or int(num_val) != num_val or num_val < 0:
        raise ValueError(f"num_val must be an integer >= 0, got {num_val!r}")
    n_val = int(num_val)
    if isinstance(levels, bool) or int(levels) != levels or levels < 0:
        raise ValueError(f"levels must be an integer >= 0, got {levels!r}")
    levels = int(levels)
    per_subject = 2 * max(levels, 1)
    affine = C.affine_from_spacing(SPACING, shape)
    writer = C.DatasetWriter(Path(out_dir), ".nii.gz")
    kinds = ["LV", "MYO", "RV"] + (["wholeheart"] if variant == "wholeheart" else [])
    plan = C.case_rng(seed, "cardiac2d", "plan", 0)
    assignment = plan.permutation(np.arange(per_subject * n_train) % len(kinds))

    panels: list[tuple[np.ndarray, np.ndarray | None, str]] = []
    jobs = [("training", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
    jobs += [("validation", i) for i in range(n_val)]
    for split, i in C.progress(jobs, progress, "cardiac2d", "subject"):
        rng = C.case_rng(seed, "cardiac2d", split, i)
        params = sample_subject(rng, shape)
        subject = {"training": f"sub{i:03d}", "validation": f"val{i:03d}", "test": f"test{i:03d}"}[split]
        if levels:
            params, positions = sample_stack(params, stack_rng(seed, split, i), levels)
            slices: list[tuple[int, float | None]] = list(enumerate(positions))
        else:
            slices = [(0, None)]
        for k, level in slices:
            for p, phase in enumerate(PHASES):
                image, gt, _ = render_case(params, phase, rng, shape, level=level)
                name = f"{subject}_{phase}" if level is None else f"{subject}_L{k}_{phase}"
                img_abs, img_rel = writer.path("imagesTs" if split == "test" else "imagesTr", name)
                lab_abs, lab_rel = writer.path("labelsTs" if split == "test" else "labelsTr", name)
                C.write_nifti(img_abs, C.to_int16(image, 1000.0), affine)  # MR magnitude, int16
                entry: dict[str, Any] = {"image": img_rel, "label": lab_rel}
                if split == "training":
                    kind = kinds[int(assignment[per_subject * i + 2 * k + p])]
                    if kind == "wholeheart":
                        label = (gt > 0).astype(np.uint8)
                        entry.update(annotated=["background"], source="wholeheart")
                    else:
                        c = CLASSES.index(kind)
                        label = np.where(gt == c, c, 0).astype(np.uint8)
                        entry.update(annotated=[kind], source=f"{kind}_only")
                    if level is not None:
                        entry["present"] = bool(label.any())
                else:
                    label = gt
                    entry.update(annotated="all", source="full")
                entry.update(modality="MR", subject=subject, phase=phase)
                if level is not None:
                    entry.update(level=round(float(level), 4), slice=k)
                C.write_nifti(lab_abs, label, affine)
                writer.add(split, entry)
                if len(panels) < 6 and split == "training" or (split == "test" and len(panels) < 8):
                    caption = f"{name} {entry['source']} ann={entry['annotated']}"
                    panels.append((image, label, caption))

    header = {
        "name": "cardiac2d",
        "description": (
            f"Synthetic short-axis cine MR (LV, MYO, RV), variant '{variant}', seed {seed}: "
            "ED and ES slice of each subject; training cases annotate one structure each "
            "(whole-heart cases: 'annotated': ['background'], heart = 1); test fully labelled."
        ),
        "reference": "partialseg synthetic benchmark (DCL setting)",
        "licence": "CC0",
        "tensorImageSize": "2D",
        "modality": {"0": "MR"},
        "classes": CLASSES,
        "family": "cardiac2d",
        "seed": int(seed),
        "variant": variant,
    }
    if levels:
        header["levels"] = levels
        header["description"] += f" Stack mode: {levels} slice levels base to apex per phase ('level': 0 base, 1 apex)."
    path = writer.finish(header)
    C.write_preview(writer.root / "preview.png", panels, len(CLASSES), f"cardiac2d ({variant}{f', {levels} levels' if levels else ''}), seed {seed}")
    return path

