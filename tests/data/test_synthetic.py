"""Tests of the synthetic benchmark generators (partialseg.data.synthetic) and ``make-data``.

Every family is generated once per seed at a small size (module-scoped fixtures), so the whole
file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from partialseg.data.synthetic import FAMILIES, make_dataset
from partialseg.data.synthetic import _common as C
from partialseg.data.synthetic import abdomen, atrium, cardiac, polyp

# family -> small generation options used throughout
SMALL = {
    "cardiac2d": {"size": 48, "num_train": 3, "num_test": 1, "variant": "wholeheart"},
    "abdomen3d": {"size": (40, 40, 32), "num_train": 1, "num_full": 1, "num_test": 1},
    "polyp2d": {"size": 48, "num_train": 20, "num_test": 2},
    "atrium3d": {"size": (32, 32, 24), "num_train": 5, "num_test": 1},
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """family -> {"a": dir (seed 0), "b": dir (seed 0 again), "c": dir (seed 1)}."""
    out = {}
    for family, opts in SMALL.items():
        dirs = {}
        for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
            d = tmp_path_factory.mktemp(f"{family}_{tag}")
            make_dataset(family, d, seed=seed, **opts)
            dirs[tag] = d
        out[family] = dirs
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _desc(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine of a NIfTI or PNG file (PNG: identity affine)."""
    if path.suffix == ".png":
        return np.asarray(Image.open(path)), np.eye(4)
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _explained_classes(desc: dict, case: dict, value: int) -> list[str]:
    """Global class names a label value stands for, after the case's source label map."""
    maps = desc.get("label_maps", {})
    source = case.get("source", "default")
    if source in maps:
        target = maps[source][str(value)]
        return list(target) if isinstance(target, list) else [target]
    return [desc["classes"][value]]


FAMILY_NAMES = sorted(SMALL)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_same_seed_gives_identical_files(generated, family):
    a, b = _files(generated[family]["a"]), _files(generated[family]["b"])
    assert sorted(a) == sorted(b)
    differing = [name for name in a if a[name] != b[name]]
    assert differing == []
    assert "preview.png" in a and "dataset.json" in a


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_different_seed_gives_different_images(generated, family):
    a, c = generated[family]["a"], generated[family]["c"]
    first = _desc(a)["training"][0]["image"]
    assert (a / first).read_bytes() != (c / first).read_bytes()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dataset_json_layout_and_paths(generated, family):
    root = generated[family]["a"]
    desc = _desc(root)
    assert desc["classes"][0] == "background"
    assert desc["labels"] == {str(i): c for i, c in enumerate(desc["classes"])}
    assert desc["numTraining"] == len(desc["training"]) and desc["numTest"] == len(desc["test"])
    for split in ("training", "test"):
        for case in desc[split]:
            for key in ("image", "label", "label_true"):
                if key in case:
                    assert (root / case[key]).is_file(), case[key]
            if "label" in case:
                img, img_aff = _read(root / case["image"])
                lab, lab_aff = _read(root / case["label"])
                assert lab.shape == img.shape[: lab.ndim]
                np.testing.assert_allclose(lab_aff, img_aff, atol=1e-6)
                assert np.isfinite(img).all()
    assert (root / "preview.png").stat().st_size > 1000


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_training_labels_hold_exactly_their_annotated_classes(generated, family):
    root = generated[family]["a"]
    desc = _desc(root)
    classes = desc["classes"]
    for case in desc["training"]:
        if "label" not in case:
            continue
        label, _ = _read(root / case["label"])
        values = [int(v) for v in np.unique(label) if v != 0]
        annotated = classes[1:] if case["annotated"] == "all" else case["annotated"]
        if case["annotated"] == ["background"]:  # whole heart: one non-annotated value
            assert values == [1], case
            continue
        if case.get("weak_type") == "missing":  # the hybrid paper's unrecognised polyp
            assert values == [], case
            continue
        explained = sorted({c for v in values for c in _explained_classes(desc, case, v)})
        assert explained == sorted(annotated), (case, values)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_test_labels_are_complete(generated, family):
    root = generated[family]["a"]
    desc = _desc(root)
    for case in desc["test"]:
        assert case["annotated"] == "all"
        label, _ = _read(root / case["label"])
        assert sorted(int(v) for v in np.unique(label)) == list(range(len(desc["classes"]))), case


def _disjoint(masks: dict[str, np.ndarray]) -> bool:
    return int(np.sum([m.astype(np.int32) for m in masks.values()], axis=0).max()) <= 1


def test_cardiac_structures_disjoint_and_nested():
    shape = (64, 64)
    for i in range(3):
        rng = C.case_rng(5, "cardiac2d", "training", i)
        params = cardiac.sample_subject(rng, shape)
        areas = {}
        for phase in cardiac.PHASES:
            image, gt, masks = cardiac.render_case(params, phase, rng, shape)
            assert image.shape == shape and image.dtype == np.float32
            assert _disjoint(masks)
            for k, name in enumerate(cardiac.CLASSES[1:], start=1):
                np.testing.assert_array_equal(gt == k, masks[name])
                assert masks[name].sum() > 10
            # the myocardium encloses the LV cavity: the LV never touches background or RV
            ring = ndimage.binary_dilation(masks["LV"]) & ~masks["LV"]
            assert masks["MYO"][ring].all()
            areas[phase] = (masks["LV"].sum(), masks["MYO"].sum())
        assert areas["ES"][0] < 0.7 * areas["ED"][0]  # the cavity shrinks at end-systole
        assert 0.7 < areas["ES"][1] / areas["ED"][1] < 1.4  # the myocardium is conserved (thicker)


def test_cardiac_wholeheart_semantics(generated):
    root = generated["cardiac2d"]["a"]
    desc = _desc(root)
    assert desc["variant"] == "wholeheart"
    cases = desc["training"]
    assert {c["phase"] for c in cases} == {"ED", "ES"}
    assert all(c["subject"] == cases[2 * (j // 2)]["subject"] for j, c in enumerate(cases))
    whole = [j for j, c in enumerate(cases) if c["annotated"] == ["background"]]
    assert whole, "the wholeheart variant has whole-heart cases"
    shape = (48, 48)
    for j in whole:
        i = j // 2
        rng = C.case_rng(0, "cardiac2d", "training", i)
        params = cardiac.sample_subject(rng, shape)
        for p, phase in enumerate(cardiac.PHASES):
            _, gt, _ = cardiac.render_case(params, phase, rng, shape)
            if 2 * i + p == j:
                label, _ = _read(root / cases[j]["label"])
                np.testing.assert_array_equal(label, (gt > 0).astype(np.uint8))


def test_cardiac_single_variant_is_balanced(tmp_path):
    make_dataset("cardiac2d", tmp_path, seed=2, size=32, num_train=6, num_test=0)
    desc = _desc(tmp_path)
    counts = {}
    for c in desc["training"]:
        counts[c["annotated"][0]] = counts.get(c["annotated"][0], 0) + 1
    assert counts == {"LV": 4, "MYO": 4, "RV": 4}
    assert _read(tmp_path / desc["training"][0]["image"])[1][0, 0] == pytest.approx(1.37)


def test_abdomen_organs_disjoint_and_sided():
    shape, spacing = (40, 40, 32), (7.2, 7.2, 6.0)
    for i, source in enumerate(list(abdomen.SOURCES) * 2):
        rng = C.case_rng(9, "abdomen3d", "training", i)
        image, gt, organs, lesions, affine = abdomen.render_case(rng, shape, spacing, source)
        assert image.dtype == np.int16 and image.min() >= -1024
        assert _disjoint(organs)
        for k, name in enumerate(abdomen.CLASSES[1:], start=1):
            np.testing.assert_array_equal(gt == k, organs[name])
            assert organs[name].sum() > 5, name
        assert not (lesions & ~(organs["liver"] | organs["pancreas"])).any()
        # RAS+ world x: patient's right is +x; the grid is stored LPS-like (i towards the left)
        assert affine[0, 0] < 0

        def world_x(mask):
            return (affine @ np.r_[np.argwhere(mask).mean(axis=0), 1.0])[0]

        assert world_x(organs["kidney_left"]) < 0 < world_x(organs["kidney_right"])
        for name, mask in organs.items():  # every organ is one piece
            assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] == 1, name
        assert world_x(organs["spleen"]) < 0 < world_x(organs["liver"])


def test_abdomen_kidney_source_lateral_split(generated):
    root = generated["abdomen3d"]["a"]
    desc = _desc(root)
    assert desc["label_maps"]["kidney"] == {"1": ["kidney_left", "kidney_right"]}
    assert desc["label_maps"]["liver"] == {"1": "liver", "2": "liver"}
    kidney_cases = [c for c in desc["training"] if c["source"] == "kidney"]
    assert kidney_cases
    for case in kidney_cases:
        assert case["annotated"] == ["kidney_left", "kidney_right"]
        label, affine = _read(root / case["label"])
        assert set(np.unique(label)) == {0, 1}
        comps, n = ndimage.label(label == 1, structure=np.ones((3, 3, 3)))
        assert n == 2
        xs = sorted((affine @ np.r_[np.argwhere(comps == k).mean(axis=0), 1.0])[0] for k in (1, 2))
        assert xs[0] < 0 < xs[1]  # one kidney on each side of the midline (world x = 0)
    # each source has its own grid spacing and intensity profile
    spacings = {c["source"]: tuple(np.round(nib.load(str(root / c["image"])).header.get_zooms(), 3))
                for c in desc["training"]}
    assert len(set(spacings.values())) == len(abdomen.MARGINAL_SOURCES)
    profiles = {abdomen.SOURCES[s]["profile"] for s in abdomen.MARGINAL_SOURCES}
    assert {c["contrast"] for c in desc["training"]} == profiles


def test_abdomen_mr_modality(tmp_path):
    make_dataset("abdomen3d", tmp_path, seed=0, size=(32, 32, 24), num_train=0, num_full=1, num_test=0,
                 modality="MR")
    desc = _desc(tmp_path)
    assert desc["modality"] == {"0": "MR"} and desc["training"][0]["modality"] == "MR"
    image, _ = _read(tmp_path / desc["training"][0]["image"])
    assert image.dtype == np.int16 and image.min() >= 0


def test_abdomen_multimodal_atlas_setting(tmp_path):
    # the atlas paper's three tasks: two CT sources and one MR source with disjoint organ sets
    make_dataset("abdomen3d", tmp_path, seed=0, size=(32, 32, 24), num_train=1, num_test=4, modality="CT+MR")
    desc = _desc(tmp_path)
    assert "label_maps" not in desc
    by_source = {c["source"]: c for c in desc["training"]}
    assert sorted(by_source) == ["ct_a", "ct_b", "mr"]
    assert [by_source[s]["modality"] for s in ("ct_a", "ct_b", "mr")] == ["CT", "CT", "MR"]
    assert by_source["ct_a"]["annotated"] == ["liver", "stomach"]
    assert by_source["ct_b"]["annotated"] == ["kidney_left", "kidney_right"]
    assert by_source["mr"]["annotated"] == ["spleen", "pancreas"]
    assert by_source["mr"]["contrast"] == "T2"
    annotated = [set(c["annotated"]) for c in by_source.values()]
    assert sum(len(a) for a in annotated) == len(set().union(*annotated)) == 6  # disjoint, every organ once
    for case in desc["training"]:
        label, _ = _read(tmp_path / case["label"])
        names = {desc["classes"][int(v)] for v in np.unique(label) if v}
        assert names == set(case["annotated"])
    assert [c["modality"] for c in desc["test"]] == ["CT", "MR", "CT", "MR"]
    assert [c["contrast"] for c in desc["test"]] == ["portal", "T2", "nephrographic", "T2"]


def test_abdomen_multimodal_default_counts_and_mr_contrast_order(tmp_path):
    from partialseg.data.synthetic import abdomen

    # >= 8 test cases per modality by default
    make_dataset("abdomen3d", tmp_path, seed=1, size=(24, 24, 24), num_train=1, modality="CT+MR")
    modalities = [c["modality"] for c in _desc(tmp_path)["test"]]
    assert modalities.count("CT") == modalities.count("MR") == 8
    # the MR look's organ contrast order differs from CT's: liver darkest of the organs in MR,
    # pancreas above liver (CT: liver above pancreas), spleen above kidney cortex (CT: below)
    t2, ct = abdomen._MR_T2, {**abdomen._CT_BASE, **abdomen._CT_PHASES["portal"]}
    assert ct["liver"] > ct["pancreas"] and t2["liver"] < t2["pancreas"]
    assert ct["spleen"] < ct["kidney_cortex"] and t2["spleen"] > t2["kidney_cortex"]
    assert t2["liver"] == min(t2[o] for o in ("liver", "spleen", "kidney_cortex", "pancreas", "stomach_wall"))
    rng = np.random.default_rng(0)
    image, gt, organs, _, _ = abdomen.render_case(rng, (40, 40, 32), (7.2, 7.2, 6.0), "mr", "MR")
    means = {name: float(image[organs[name]].mean()) for name in ("liver", "spleen")}
    assert means["liver"] < means["spleen"]
    assert t2["pancreas"] < 0.7 * t2["visceral_fat"]  # the pancreas stands out of the fat around it


def test_polyp_weak_masks(generated):
    root = generated["polyp2d"]["a"]
    desc = _desc(root)
    cases = desc["training"]
    strong = [c for c in cases if c["source"] == "strong"]
    weak = [c for c in cases if c["source"] == "weak"]
    assert len(strong) == 2 and len(weak) == 18
    kinds = [c["weak_type"] for c in weak]
    assert set(kinds) == set(polyp.WEAK_TYPES)
    assert kinds.count("missing") == round(0.4 * len(weak))
    for c in weak:
        label, _ = _read(root / c["label"])
        true, _ = _read(root / c["label_true"])
        assert true.any()
        if c["weak_type"] == "missing":
            assert not label.any()
        else:
            assert label.any() and not np.array_equal(label, true)
    image, _ = _read(root / cases[0]["image"])
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8


def test_polyp_weak_mask_kinds_directly():
    rng = np.random.default_rng(0)
    image, mask = polyp.render_frame(rng, (64, 64))
    assert image.shape == (64, 64, 3) and 0 <= image.min() and image.max() <= 1
    ell = polyp.weak_mask(rng, mask, "ellipse")
    dice = 2 * (ell & mask).sum() / (ell.sum() + mask.sum())
    assert 0.5 < dice < 1.0  # an approximation, not the outline
    assert not polyp.weak_mask(rng, mask, "missing").any()
    with pytest.raises(ValueError, match="scribble"):
        polyp.weak_mask(rng, mask, "scribble")


def test_atrium_labelled_fraction_and_disjoint(generated, tmp_path):
    desc = _desc(generated["atrium3d"]["a"])
    labelled = [c for c in desc["training"] if "label" in c]
    assert len(labelled) == 1 and all(c["annotated"] == "all" for c in labelled)
    assert all("annotated" not in c for c in desc["training"] if "label" not in c)
    make_dataset("atrium3d", tmp_path, seed=0, size=24, num_train=10, num_test=0, labelled_fraction=0.2)
    assert sum("label" in c for c in _desc(tmp_path)["training"]) == 2
    rng = C.case_rng(0, "atrium3d", "training", 0)
    image, gt, masks, _ = atrium.render_case(rng, (40, 40, 32), (2.4, 2.4, 2.25), "standard")
    assert _disjoint(masks) and masks["left_atrium"].sum() > 100
    # other blood pools stay at least one wall voxel away from the LA
    assert not (ndimage.binary_dilation(masks["left_atrium"]) & masks["other_blood"]).any()
    np.testing.assert_array_equal(gt == 1, masks["left_atrium"])


def test_atrium_standard_difficulty_is_the_original_benchmark():
    import hashlib

    # image and label of render_case before the difficulty options existed (seed 0, training case 0)
    image, gt, _, _ = atrium.render_case(C.case_rng(0, "atrium3d", "training", 0), (40, 40, 32), (2.4, 2.4, 2.25), "standard")
    h = hashlib.sha256(gt.tobytes())
    h.update(C.to_int16(image, 1000.0).tobytes())
    assert h.hexdigest() == "040f4f710daa1773f229428093dbb88a918c196d5bba26d859cc86ef7660d673"


def test_atrium_hard_difficulty():
    shape, spacing = (40, 40, 32), (2.4, 2.4, 2.25)
    sizes, touching, gaps = [], 0, []
    for i in range(4):
        case = {}
        for d in ("standard", "hard"):
            image, gt, masks, _ = atrium.render_case(C.case_rng(0, "atrium3d", "training", i), shape, spacing, d)
            assert _disjoint(masks) and masks["left_atrium"].sum() > 100
            np.testing.assert_array_equal(gt == 1, masks["left_atrium"])
            case[d] = (image, masks)
        image, masks = case["hard"]
        la = masks["left_atrium"]
        sizes.append(la.sum() / case["standard"][1]["left_atrium"].sum())
        # wall thickness 0 in patches: other blood meets the LA directly
        touching += bool((ndimage.binary_dilation(la) & masks["other_blood"]).any())
        # a fainter boundary: the ring just outside the LA is brighter relative to the LA than in "standard"
        ring = lambda img, m: img[ndimage.binary_dilation(m) & ~m].mean() / img[m].mean()
        gaps.append(ring(image, la) - ring(case["standard"][0], case["standard"][1]["left_atrium"]))
    assert touching == 4 and np.mean(gaps) > 0.05
    assert np.ptp(sizes) > 0.1  # scale and vein variation change the atrium's size case to case


def test_atrium_difficulty_options(tmp_path):
    assert atrium.difficulty_options("standard") == atrium.DIFFICULTY["standard"]
    assert atrium.difficulty_options({"wall_gap": 0.25})["wall_gap"] == 0.25
    for bad in ("harder", {"wall_gaps": 0.1}, {"wall_gap": 1.5}):
        with pytest.raises(ValueError):
            atrium.difficulty_options(bad)
    make_dataset("atrium3d", tmp_path / "h", seed=0, size=24, num_train=2, num_test=0)  # the default: hard
    assert _desc(tmp_path / "h")["difficulty"] == "hard"
    make_dataset("atrium3d", tmp_path / "s", seed=0, size=24, num_train=2, num_test=0, difficulty="standard")
    assert "difficulty" not in _desc(tmp_path / "s")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"family": "brain3d"}, ValueError),
        ({"family": "cardiac2d", "seed": -1}, ValueError),
        ({"family": "cardiac2d", "size": (32, 32, 32)}, ValueError),
        ({"family": "cardiac2d", "size": 8}, ValueError),
        ({"family": "cardiac2d", "variant": "partial"}, ValueError),
        ({"family": "abdomen3d", "modality": "PET"}, ValueError),
        ({"family": "polyp2d", "missing_fraction": 1.5}, ValueError),
        ({"family": "atrium3d", "labelled_fraction": 0.0}, ValueError),
        ({"family": "polyp2d", "modality": "CT"}, TypeError),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error):
    kwargs = dict(kwargs)
    family = kwargs.pop("family")
    with pytest.raises(error):
        make_dataset(family, tmp_path, **{"num_train": 1, "num_test": 0, **kwargs})


def test_families_listed():
    assert set(FAMILIES) == set(SMALL)


def test_cli_make_data(tmp_path, capsys):
    from partialseg.cli import main

    out = tmp_path / "card"
    rc = main(["make-data", "cardiac2d", "--out", str(out), "--size", "32", "--num-train", "2", "--num-test", "1",
               "--seed", "4", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "preview" in text and any(f"{s}_only" in text for s in ("LV", "MYO", "RV"))
    assert (out / "dataset.json").is_file() and (out / "preview.png").is_file()
    # an option of another family is refused, not silently ignored
    assert main(["make-data", "cardiac2d", "--out", str(out), "--modality", "MR", "--quiet"]) == 2
    with pytest.raises(SystemExit):
        main(["make-data", "brain3d", "--out", str(out)])


def _tiny_cli(out, *extra):
    return ["make-data", "cardiac2d", "--out", str(out), "--size", "32", "--num-train", "1", "--num-test", "1",
            "--quiet", *extra]


def test_cli_make_data_refuses_a_non_empty_folder(tmp_path, capsys):
    from partialseg.cli import main

    out = tmp_path / "userds"
    out.mkdir()
    (out / "dataset.json").write_text('{"name": "mine"}')
    (out / "imagesTr").mkdir()
    (out / "imagesTr" / "mine_000.nii.gz").write_bytes(b"x")
    before = _files(out)
    assert main(_tiny_cli(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "dataset.json" in err and "--overwrite" in err
    assert _files(out) == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["userds"]  # no temporary folder left
    # a file is refused too, with or without --overwrite
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(_tiny_cli(afile, "--overwrite")) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "keep"


def test_cli_make_data_overwrite_replaces_the_whole_folder(tmp_path, capsys):
    from partialseg.cli import main

    out = tmp_path / "userds"
    (out / "imagesTr").mkdir(parents=True)
    (out / "imagesTr" / "stale_000.nii.gz").write_bytes(b"old")
    (out / "notes.txt").write_text("old")
    assert main(_tiny_cli(out, "--overwrite")) == 0
    desc = _desc(out)
    assert not (out / "notes.txt").exists() and not (out / "imagesTr" / "stale_000.nii.gz").exists()
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(Path(c["image"]).name
                                                                          for c in desc["training"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["userds"]  # old folder and temporary one gone
    # an empty existing folder is filled (no --overwrite needed) and keeps being the same folder
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    assert main(_tiny_cli(empty)) == 0
    assert (empty / "dataset.json").is_file() and empty.stat().st_ino == inode
    capsys.readouterr()


def test_make_dataset_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    # a generator failing half-way: no --out folder, no half-written dataset, no temporary folder
    def failing(out_dir, **kwargs):
        (Path(out_dir) / "imagesTr").mkdir()
        (Path(out_dir) / "imagesTr" / "sub000_ED.nii.gz").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(cardiac, "generate", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        make_dataset("cardiac2d", tmp_path / "new" / "ds")
    assert list(tmp_path.iterdir()) == []  # not even the parent folder created for it
    old = tmp_path / "old"
    old.mkdir()
    (old / "dataset.json").write_text("{}")
    with pytest.raises(RuntimeError):
        make_dataset("cardiac2d", old, overwrite=True)
    assert _files(old) == {"dataset.json": b"{}"}  # the old dataset survives a failed overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    with pytest.raises(FileExistsError, match="not empty"):
        make_dataset("cardiac2d", old)


@pytest.mark.parametrize("size", [100000, (5000, 5000), (300, 300, 300)])
def test_size_above_the_memory_limit_is_refused_before_any_work(tmp_path, capsys, size):
    from partialseg.cli import main
    from partialseg.data.synthetic import MAX_VOXELS

    family = "atrium3d" if np.ndim(size) and len(size) == 3 else "cardiac2d"
    with pytest.raises(ValueError, match="voxels per image.*memory"):
        make_dataset(family, tmp_path / "ds", size=size)
    assert not (tmp_path / "ds").exists() and list(tmp_path.iterdir()) == []
    sizes = [str(s) for s in np.atleast_1d(size)]
    assert main(["make-data", family, "--out", str(tmp_path / "ds"), "--size", *sizes, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{MAX_VOXELS:,}" in err
    assert list(tmp_path.iterdir()) == []


def _content_hash(root: Path) -> str:
    """SHA-256 of dataset.json and every NIfTI's name, dtype and voxels (blind to gzip's bytes)."""
    import hashlib

    h = hashlib.sha256()
    h.update((root / "dataset.json").read_bytes())
    for p in sorted(root.rglob("*.nii.gz")):
        a = np.asarray(nib.load(str(p)).dataobj)
        h.update(p.name.encode())
        h.update(str(a.dtype).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def test_cardiac_default_output_is_unchanged_by_stack_mode(tmp_path):
    # computed before stack mode (levels=) existed: levels=0 must keep writing the same dataset
    make_dataset("cardiac2d", tmp_path, seed=3, size=48, num_train=3, num_test=1)
    assert _content_hash(tmp_path) == "5341ec1557cd1bcdd0212781355e1534457742528cceed8bc7e136f3b72b9d80"


def test_cardiac_stack_anatomy_by_level():
    shape = (64, 64)
    for i in range(3):
        params = cardiac.sample_subject(C.case_rng(4, "cardiac2d", "training", i), shape)
        params, positions = cardiac.sample_stack(params, cardiac.stack_rng(4, "training", i), 4)
        assert all((k / 4) <= t <= (k + 1) / 4 for k, t in enumerate(positions))  # one level per stratum
        for phase in cardiac.PHASES:
            areas, centres = [], []
            for level in (0.05, 0.4, 0.7, 0.97):
                _, gt, masks = cardiac.render_case(params, phase, np.random.default_rng(0), shape, level=level)
                assert _disjoint(masks)
                areas.append([int(masks[n].sum()) for n in ("LV", "MYO", "RV")])
                centres.append(np.argwhere(masks["MYO"] | masks["LV"]).mean(0))
            lv, myo, rv = np.array(areas).T
            assert (np.diff(lv) < 0).all() or lv[-1] == 0, lv  # the cavity narrows towards the apex
            assert (np.diff(rv) <= 0).all() and rv[0] > 20 and rv[-1] == 0, rv  # the RV ends above the apex
            assert lv[0] > 20 and (myo > 10).all(), (lv, myo)
            assert np.linalg.norm(centres[-1] - centres[0]) > 2.0  # the heart moves along its long axis (px)
    with pytest.raises(ValueError, match="sample_stack"):
        cardiac.render_case(cardiac.sample_subject(np.random.default_rng(0), shape), "ED", np.random.default_rng(0), shape, level=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cardiac.render_case(params, "ED", np.random.default_rng(0), shape, level=1.5)


def test_cardiac_stack_dataset(tmp_path):
    make_dataset("cardiac2d", tmp_path, seed=1, size=48, num_train=4, num_test=1, num_val=1, levels=3, variant="wholeheart")
    desc = _desc(tmp_path)
    assert desc["levels"] == 3 and len(desc["training"]) == 24 and len(desc["test"]) == 6 and len(desc["validation"]) == 6
    for c in desc["training"]:
        label, _ = _read(tmp_path / c["label"])
        assert c["present"] == bool(label.any())  # "present" says whether the annotated structure is in the slice
        assert 0.0 <= c["level"] <= 1.0 and c["image"].endswith(f"_L{c['slice']}_{c['phase']}.nii.gz")
    assert any(not c["present"] for c in desc["training"]), "no annotated-but-absent case at this seed"
    for c in desc["test"]:
        label, _ = _read(tmp_path / c["label"])
        if c["level"] > 0.85:
            assert not (label == 3).any()  # below every subject's RV end
    with pytest.raises(ValueError, match="levels"):
        make_dataset("cardiac2d", tmp_path / "bad", levels=-1)


def test_cli_make_data_levels(tmp_path):
    from partialseg.cli import main

    out = tmp_path / "stack"
    assert main(["make-data", "cardiac2d", "--out", str(out), "--size", "32", "--num-train", "1", "--num-test", "1",
                 "--levels", "2", "--quiet"]) == 0
    desc = _desc(out)
    assert desc["levels"] == 2 and [c["slice"] for c in desc["training"]] == [0, 0, 1, 1]
    assert main(["make-data", "polyp2d", "--out", str(tmp_path / "p"), "--levels", "2", "--quiet"]) == 2  # cardiac2d only


def test_polyp_hybrid_preset_continuous_weak_masks(tmp_path):
    # the hybrid preset at a test size: exact strong count, continuous ellipses, missing and wrong masks
    path = make_dataset("polyp2d", tmp_path / "h", seed=0, preset="hybrid", size=48, num_train=40, num_strong=4, num_test=1)
    desc = json.loads(path.read_text())
    assert desc["preset"] == "hybrid" and desc["weak_quality"] == "continuous"
    cases = desc["training"]
    assert [c["supervision"] for c in cases].count("strong") == 4 and all(c["source"] == c["supervision"] for c in cases)
    weak = [c for c in cases if c["supervision"] == "weak"]
    kinds = [c["weak_type"] for c in weak]
    assert kinds.count("missing") == round(0.15 * 36) and kinds.count("wrong") == round(0.1 * 36)
    assert set(kinds) == set(polyp.CONTINUOUS_WEAK_TYPES)
    dices = []
    for c in weak:
        label, _ = _read(tmp_path / "h" / c["label"])
        true, _ = _read(tmp_path / "h" / c["label_true"])
        if c["weak_type"] == "missing":
            assert not label.any()
        elif c["weak_type"] == "wrong":
            assert label.any() and not (label & true).any()  # on background only
        else:
            dices.append(2 * (label & true).sum() / (label.sum() + true.sum()))
    assert min(dices) < 0.65 and max(dices) > 0.75  # continuous quality, not one level
    image, _ = _read(tmp_path / "h" / cases[0]["image"])
    assert image.shape == (48, 48, 3)
    # the standard benchmark writes the supervision key too
    std = make_dataset("polyp2d", tmp_path / "s", seed=0, size=32, num_train=5, num_test=0)
    assert {c["supervision"] for c in json.loads(std.read_text())["training"]} <= {"strong", "weak"}


def test_polyp_continuous_weak_mask_geometry():
    mask = np.zeros((64, 64), np.uint8)
    ii, jj = np.indices(mask.shape)
    mask[((ii - 30) / 8.0) ** 2 + ((jj - 24) / 5.0) ** 2 <= 1] = 1
    rng = np.random.default_rng(3)
    areas = [polyp.continuous_weak_mask(rng, mask, "ellipse").sum() / mask.sum() for _ in range(40)]
    assert 0.5 < min(areas) and max(areas) < 2.8 and max(areas) - min(areas) > 0.8  # axes scaled 0.8-1.6 each
    for _ in range(10):
        w = polyp.continuous_weak_mask(rng, mask, "ellipse")
        ci, cj = np.argwhere(w).mean(0)
        assert np.hypot(ci - 30, cj - 24) <= 0.5 * 6.5 * 1.6 + 1.5  # shifted by at most half the (scaled) mean radius
    with pytest.raises(ValueError, match="continuous weak mask kind"):
        polyp.continuous_weak_mask(rng, mask, "distorted")


@pytest.mark.parametrize(
    "options, match",
    [({"preset": "hybird"}, "Did you mean 'hybrid'"), ({"num_strong": 9, "num_train": 5}, "num_strong"),
     ({"wrong_fraction": 0.2}, "continuous"), ({"contrast": 0.0}, "contrast")],
)
def test_polyp_bad_hybrid_options(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        make_dataset("polyp2d", tmp_path / "x", seed=0, size=32, num_test=0, **options)


def test_cli_make_data_atrium_difficulty(tmp_path):
    from partialseg.cli import main
    from partialseg.data.synthetic import cli as make_data_cli

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "preview.png"}

    args = ["--size", "24", "--num-train", "2", "--num-test", "1", "--quiet"]
    for difficulty in ("standard", "hard"):
        out = tmp_path / f"cli_{difficulty}"
        assert main(["make-data", "atrium3d", "--out", str(out), "--difficulty", difficulty, *args]) == 0
        api = make_dataset("atrium3d", tmp_path / f"api_{difficulty}", size=24, num_train=2, num_test=1, difficulty=difficulty).parent
        assert files(out) == files(api)  # the flag reaches the generator: the same bytes
        assert _desc(out).get("difficulty") == (None if difficulty == "standard" else "hard")
    assert main(["make-data", "atrium3d", "--out", str(tmp_path / "default"), *args]) == 0
    assert files(tmp_path / "default") == files(tmp_path / "cli_hard")  # hard is the default
    assert files(tmp_path / "cli_standard") != files(tmp_path / "cli_hard")
    assert main(["make-data", "cardiac2d", "--out", str(tmp_path / "c"), "--difficulty", "hard", "--quiet"]) == 2  # atrium3d only
    with pytest.raises(SystemExit):
        main(["make-data", "atrium3d", "--out", str(tmp_path / "x"), "--difficulty", "extreme"])
    choices = next(a.choices for a in _make_data_parser(make_data_cli)._actions if a.dest == "difficulty")
    assert sorted(choices) == sorted(atrium.DIFFICULTY)  # every preset reachable from the CLI


def _make_data_parser(module):
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser


def test_abdomen_multimodal_body_crop_agrees_across_modalities():
    # the atlas method crops every image to its Otsu body box: the MR look must give the body, not
    # only its bright organs (a T2 look with dark fat once did), so MR and CT boxes of one anatomy agree
    import torch

    from partialseg.transforms import AtlasCrop

    shape = abdomen.DEFAULT_SIZE  # with the dark-fat look the boxes differed by 22-35 voxels here
    spacing = tuple(f / n for f, n in zip(abdomen.FOV_MM, shape))
    for i in range(2):
        boxes = {}
        for source, modality in (("ct_a", "CT"), ("mr", "MR")):
            image = abdomen.render_case(C.case_rng(0, "abdomen3d", "test", i), shape, spacing, source, modality)[0]
            start, end = AtlasCrop(spatial_size=shape).compute_bounding_box(torch.as_tensor(image[None].astype(np.float32)))
            boxes[modality] = np.r_[np.asarray(start), np.asarray(end)]
        assert np.abs(boxes["CT"] - boxes["MR"]).max() <= 3, boxes
