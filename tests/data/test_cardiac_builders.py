"""build-datalist, cardiac layouts: ACDC and MS-CMRSeg folders as downloaded -> 2D partial-label slices."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from partialseg.cli import main
from partialseg.data import bundle_datalist, validate_dataset
from partialseg.data.builders import cardiac as cardiac_builders
from partialseg.data.builders import build_datalist
from partialseg.data.builders.cardiac import CLASSES, build_slices
from partialseg.data.dcl import annotated_classes, class_pools

from conftest import save_nifti

REPO = Path(__file__).resolve().parents[2]
SHAPE = (40, 36, 4)  # slice 0 empty, 1-2 LV + MYO + RV, 3 (apex) LV + MYO only
SPACING = (1.8, 1.6, 10.0)
AFFINE = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])  # a flipped axis: spacing comes from column norms
AFFINE[:3, 3] = [30.0, -20.0, 5.0]
# in-plane boxes (rows, cols) in source voxels; MYO is the LV box's frame
LV_BOX, MYO_BOX, RV_BOX = (slice(16, 24), slice(14, 22)), (slice(13, 27), slice(11, 25)), (slice(14, 26), slice(25, 31))
ACDC = {"LV": 3, "MYO": 2, "RV": 1}
MSCMR = {"LV": 500, "MYO": 200, "RV": 600}
N_LABELLED = 3  # labelled slices per volume


def _volume(values: dict[str, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(SHAPE, np.int16)
    for z in (1, 2, 3):
        label[MYO_BOX + (z,)] = values["MYO"]
        label[LV_BOX + (z,)] = values["LV"]
        if z < 3:
            label[RV_BOX + (z,)] = values["RV"]
    image = (100 + 2 * (label > 0) * np.where(label == values["LV"], 200, 50) + rng.normal(0, 5, SHAPE)).astype(np.int16)
    return image, label


def _mm2(box: tuple[slice, slice]) -> tuple[float, float]:
    """Area (mm^2) of a source box and half its perimeter (mm)."""
    h, w = (box[0].stop - box[0].start) * SPACING[0], (box[1].stop - box[1].start) * SPACING[1]
    return h * w, h + w


def _acdc(root: Path, patients=(1, 2, 3)) -> Path:
    rng = np.random.default_rng(0)
    for n in patients:
        d = root / f"patient{n:03d}"
        d.mkdir(parents=True)
        (d / "Info.cfg").write_text("ED: 1\nES: 7\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
        for frame in (1, 7):
            image, label = _volume(ACDC, rng)
            save_nifti(d / f"patient{n:03d}_frame{frame:02d}.nii.gz", image, AFFINE)
            save_nifti(d / f"patient{n:03d}_frame{frame:02d}_gt.nii.gz", label.astype(np.uint8), AFFINE)
        save_nifti(d / f"patient{n:03d}_4d.nii.gz", np.zeros((4, 4, 2, 3), np.int16), AFFINE)  # ignored
    return root


def _mscmr(root: Path, patients=(1, 2, 10)) -> Path:
    rng = np.random.default_rng(1)
    for n in patients:  # the challenge's layout: images and labels in separate sub-folders
        for seq, gt in (("LGE", "lgegt"), ("C0", "c0gt")):
            if seq == "C0" and n != 1:
                continue
            image, label = _volume(MSCMR, rng)
            save_nifti(root / "c0t2lge" / f"patient{n}_{seq}.nii.gz", image, AFFINE)
            save_nifti(root / gt / f"patient{n}_{seq}_manual.nii.gz", label, AFFINE)
    return root


@pytest.fixture
def acdc(tmp_path):
    return _acdc(tmp_path / "ACDC" / "training")


@pytest.fixture
def mscmr(tmp_path):
    return _mscmr(tmp_path / "MSCMR")


def _load(root: Path, rel: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(root / rel))
    return np.asanyarray(img.dataobj), img.affine


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_classes_match_the_synthetic_data_and_doctests():
    from partialseg.data.synthetic import cardiac

    assert list(CLASSES) == cardiac.CLASSES
    assert doctest.testmod(cardiac_builders).failed == 0


def test_acdc_grid_spacing_areas_and_phases(acdc, tmp_path):
    out = tmp_path / "acdc2d" / "dataset.json"
    size = 64
    desc = build_slices([("acdc", acdc)], out, keep="all", size=size)
    assert desc["classes"] == ["background", "LV", "MYO", "RV"] and desc["name"] == "acdc2d"
    train = desc["training"]
    assert len(train) == 3 * 2 * N_LABELLED and desc["empty_slices_skipped"] == {"acdc": 3 * 2}
    assert "validation" not in desc and "test" not in desc
    assert [c["phase"] for c in train if c["subject"] == "patient001"] == ["ED"] * 3 + ["ES"] * 3
    assert train[0]["image"] == "slices/acdc/images/patient001_ED_z01.nii.gz" and train[0]["slice"] == 1
    assert all(c["annotated"] == "all" and c["sequence"] == "cine" and c["modality"] == "MR" for c in train)
    assert not (tmp_path / "acdc2d" / "slices" / ".acdc.partial").exists()
    s = 1.37
    for c in train:
        image, affine = _load(out.parent, c["image"])
        label, lab_affine = _load(out.parent, c["label"])
        assert image.shape == label.shape == (size, size) and image.dtype == np.float32 and label.dtype == np.uint8
        assert np.array_equal(affine, lab_affine)
        assert np.allclose(np.linalg.norm(affine[:3, :2], axis=0), s) and affine[2, 2] == SPACING[2]
        assert affine[2, 3] == SPACING[2] * c["slice"]
        # areas in mm^2 survive nearest-neighbour resampling: along each axis an interval of L mm
        # holds between (L - s) / s and (L + s) / s pixels, so a W x H box is off by <= s (W + H) + s^2
        for name, box in (("LV", LV_BOX), ("RV", RV_BOX)):
            area, half_perimeter = _mm2(box)
            if name == "RV" and c["slice"] == 3:
                assert not (label == 3).any()
                continue
            got = (label == CLASSES.index(name)).sum() * s * s
            assert abs(got - area) <= s * half_perimeter + s * s, (name, got, area)
        outer, outer_hp = _mm2(MYO_BOX)
        inner, inner_hp = _mm2(LV_BOX)
        got = (label == 2).sum() * s * s
        assert abs(got - (outer - inner)) <= s * (outer_hp + inner_hp) + 2 * s * s
        # the affine traces pixels back to source millimetres: the LV centre lands where it was
        rows, cols = np.nonzero(label == 1)
        centre = affine[:2, :2] @ [rows.mean(), cols.mean()] + affine[:2, 3]
        expected = [(LV_BOX[0].start + LV_BOX[0].stop - 1) / 2 * SPACING[0], (LV_BOX[1].start + LV_BOX[1].stop - 1) / 2 * SPACING[1]]
        assert np.allclose(centre, expected, atol=s)
        # linear interpolation keeps intensities: the LV is bright (~500), the padding 0
        assert abs(np.median(image[label == 1]) - 500) < 15 and image[0, 0] == 0


def test_keep_one_structure_per_training_slice(acdc, tmp_path):
    full = build_slices([("acdc", acdc)], tmp_path / "full" / "dataset.json", keep="all", size=48, val=1, seed=5)
    one = build_slices([("acdc", acdc)], tmp_path / "one" / "dataset.json", keep="one", size=48, val=1, seed=5)
    assert len(one["training"]) == 2 * 2 * N_LABELLED and len(one["validation"]) == 2 * N_LABELLED
    assert [c["image"] for c in one["training"]] == [c["image"] for c in full["training"]]  # same split, same slices
    kinds = [c["annotated"][0] for c in one["training"]]
    assert all(len(c["annotated"]) == 1 for c in one["training"])
    assert sorted(kinds) == sorted(["LV", "MYO", "RV", "background"] * 3)  # balanced: 12 slices, 4 kinds
    for c, ref in zip(one["training"], full["training"]):
        label, _ = _load(tmp_path / "one", c["label"])
        reference, _ = _load(tmp_path / "full", ref["label"])
        kind = c["annotated"][0]
        if kind == "background":  # whole heart: value 1 on LV + MYO + RV
            assert np.array_equal(label, (reference > 0).astype(np.uint8))
        else:
            k = CLASSES.index(kind)
            assert np.array_equal(label, np.where(reference == k, k, 0))
            assert label.any()  # the kept structure is present (slice 3 has no RV: never keeps it)
        assert c["slice"] != 3 or kind != "RV"
    for c in one["validation"]:  # held-out subjects stay fully labelled
        label, _ = _load(tmp_path / "one", c["label"])
        assert c["annotated"] == "all" and set(np.unique(label)) >= {0, 1, 2}
    assert {c["subject"] for c in one["validation"]}.isdisjoint(c["subject"] for c in one["training"])
    # DCL's conditional sampler finds, for every class, training slices annotating it
    data = bundle_datalist(tmp_path / "one", "training")
    pools = class_pools([annotated_classes(c["annotated"], 4) for c in data], 4)
    assert [len(p) for p in pools] == [3, 3, 3, 3]
    # --no-wholeheart: LV, MYO, RV only (4 each)
    three = build_slices([("acdc", acdc)], tmp_path / "three" / "dataset.json", size=48, val=1, seed=5, wholeheart=False)
    assert sorted(c["annotated"][0] for c in three["training"]) == sorted(["LV", "MYO", "RV"] * 4)


def test_keep_one_structure_per_subject(acdc, tmp_path):
    """keep="subject": every slice of a training subject (both phases) keeps the subject's one
    kind; slices without it are left out (counted); labels hold only that structure."""
    # three training subjects, three kinds (LV, MYO, RV): every class keeps a subject
    full = build_slices([("acdc", acdc)], tmp_path / "full" / "dataset.json", keep="all", size=48, seed=5)
    for seed in range(6):  # some seed gives a subject RV, which slice 3 lacks
        out = tmp_path / f"subject{seed}" / "dataset.json"
        sub = build_slices([("acdc", acdc)], out, keep="subject", size=48, seed=seed, wholeheart=False)
        kind_of = {}
        for c in sub["training"]:
            assert len(c["annotated"]) == 1
            assert kind_of.setdefault(c["subject"], c["annotated"][0]) == c["annotated"][0]  # one kind per subject
        assert len(set(kind_of.values())) == len(kind_of)  # balanced over subjects: all different here
        n_rv = sum(k == "RV" for k in kind_of.values())
        assert sub["slices_without_kept_structure"] == {"acdc": 2 * n_rv}  # slice 3, ED and ES
        assert len(sub["training"]) == len(full["training"]) - 2 * n_rv
        images = sorted(p.name for p in (out.parent / "slices" / "acdc" / "images").iterdir())
        listed = sorted(Path(c["image"]).name for c in sub["training"])
        assert images == listed  # the left-out slices' images are not written either
        for c in sub["training"]:
            label, _ = _load(out.parent, c["label"])
            kind = c["annotated"][0]
            if kind != "background":
                assert label.any() and set(np.unique(label)) <= {0, CLASSES.index(kind)}
        if n_rv:
            break
    else:
        pytest.fail("no seed in 0..5 gave a subject RV")
    # with the whole heart as a fourth kind, three subjects cannot cover four classes: a clear error
    with pytest.raises(ValueError, match="no training slice keeps"):
        build_slices([("acdc", acdc)], tmp_path / "four" / "dataset.json", keep="subject", size=48, seed=0)


def test_seed_gives_identical_files_and_rebuild_replaces(acdc, tmp_path):
    a, b, c = (tmp_path / n / "dataset.json" for n in "abc")
    options = dict(size=32, val=1, test=1)
    da = build_slices([("acdc", acdc)], a, seed=7, **options)
    build_slices([("acdc", acdc)], b, seed=7, **options)
    dc = build_slices([("acdc", acdc)], c, seed=8, **options)
    files_a = _files(a.parent)
    assert files_a == _files(b.parent) and len(files_a) == 1 + 2 * 3 * 2 * N_LABELLED
    assert [e["subject"] for e in da["validation"]] != [e["subject"] for e in dc["validation"]]  # the split moves too
    # on the same training slices (no hold-out), another seed keeps other structures
    d7, d8 = (build_slices([("acdc", acdc)], tmp_path / f"s{seed}" / "dataset.json", size=32, seed=seed) for seed in (7, 8))
    assert [e["image"] for e in d7["training"]] == [e["image"] for e in d8["training"]]
    assert [e["annotated"] for e in d7["training"]] != [e["annotated"] for e in d8["training"]]
    # rebuilding in place (another seed) replaces the slices: no file of the first build is left over
    build_slices([("acdc", acdc)], a, seed=8, **options)
    assert _files(a.parent) == _files(c.parent)


def test_another_json_in_the_folder_keeps_its_slices(acdc, tmp_path):
    """Two builds with different --out files in one folder would share slices/<source>/: the second
    is refused (naming both files) instead of silently replacing the labels the first references."""
    a, b = tmp_path / "cardiac" / "a.json", tmp_path / "cardiac" / "b.json"
    build_slices([("acdc", acdc)], a, size=32, seed=0)
    before = _files(a.parent)
    with pytest.raises(ValueError, match=r"slices.acdc holds the slices that .*a\.json references; building b\.json"):
        build_slices([("acdc", acdc)], b, size=32, seed=1)
    with pytest.raises(ValueError, match="Write b.json to another folder"):  # also through build_datalist
        build_datalist([("acdc", acdc)], b, size=32, seed=1)
    assert _files(a.parent) == before and not b.exists()
    # re-running the same command (same --out, here another seed) replaces its own slices
    desc = build_slices([("acdc", acdc)], a, size=32, seed=1)
    report = validate_dataset(a)
    assert report.ok, report.problems
    assert json.loads(a.read_text()) == desc and _files(a.parent) != before
    # a JSON file that references nothing there (not a dataset, or another source) is no owner
    (a.parent / "notes.json").write_text("[1, 2")
    (a.parent / "other.json").write_text(json.dumps({"training": [{"image": "slices/mscmrseg/images/x.nii.gz"}]}))
    os.replace(a, a.parent / "a.json.bak")  # a.json no longer exists: its slices can be replaced
    assert build_slices([("acdc", acdc)], b, size=32, seed=1) == desc


def test_out_must_be_a_json_file_cardiac(acdc, tmp_path):
    for out, match in ((tmp_path / "o15", "must be a .json file"), (tmp_path, "is a folder")):
        with pytest.raises(ValueError, match=match):
            build_slices([("acdc", acdc)], out, size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ACDC"]  # nothing written, no temporary file


def test_mscmrseg_layouts(mscmr, tmp_path):
    out = tmp_path / "ms" / "dataset.json"
    desc = build_slices([("mscmrseg", mscmr)], out, keep="all", size=48, test=1, seed=0)
    cases = desc["training"] + desc["test"]
    assert len(cases) == 3 * N_LABELLED and desc["numTest"] == N_LABELLED
    assert sorted({c["subject"] for c in cases}, key=lambda s: int(s[7:])) == ["patient1", "patient2", "patient10"]
    assert all("phase" not in c and c["sequence"] == "LGE" and "_LGE_z0" in c["image"] for c in cases)
    label, _ = _load(out.parent, desc["training"][0]["label"])
    assert set(np.unique(label)) == {0, 1, 2, 3}  # 500 -> LV 1, 200 -> MYO 2, 600 -> RV 3
    assert (label == 1).sum() < (label == 2).sum()  # the LV box is smaller than its MYO frame
    c0 = build_slices([("mscmrseg_c0", mscmr)], tmp_path / "c0" / "dataset.json", size=48, keep="all")
    assert [c["image"] for c in c0["training"]] == [f"slices/mscmrseg_c0/images/patient1_C0_z0{z}.nii.gz" for z in (1, 2, 3)]


def test_cli_default_grid_then_partialseg_check(acdc, tmp_path, capsys):
    mscmr = _mscmr(tmp_path / "MSCMR", patients=(1, 2, 3, 4, 5))  # 3 training subjects after --val 1 --test 1
    out = tmp_path / "cardiac" / "dataset.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "partialseg", "build-datalist", "--source", f"acdc={acdc}", "--source", f"mscmrseg={mscmr}",
           "--out", str(out), "--val", "1", "--test", "1", "--seed", "3", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "6 empty slices skipped" in proc.stdout and "5 empty slices skipped" in proc.stdout, proc.stdout
    desc = json.loads(out.read_text())
    assert desc["name"] == "acdc+mscmrseg2d" and desc["spacing"] == [1.37, 1.37] and desc["size"] == [212, 212]
    assert {c["source"] for c in desc["training"]} == {"acdc", "mscmrseg"}
    image, affine = _load(out.parent, desc["test"][0]["image"])
    assert image.shape == (212, 212) and np.allclose(np.linalg.norm(affine[:3, :2], axis=0), 1.37)
    report = validate_dataset(out.parent)
    assert report.ok, report.problems
    assert main(["check", str(out.parent), "--quiet"]) == 0
    assert "no problems found" in capsys.readouterr().out


def _expect(tmp_path, sources, match, exc=ValueError, **kwargs):
    out = tmp_path / "err" / "dataset.json"
    with pytest.raises(exc, match=match):
        build_datalist(sources, out, **kwargs)
    slices = out.parent / "slices"
    assert not out.exists() and not (slices.exists() and any(slices.iterdir())), "a failed build left files behind"


def test_errors_name_the_patient_or_file(tmp_path, capsys):
    def fresh(name, **kw):
        return _acdc(tmp_path / name, **kw)

    good = fresh("good")

    root = fresh("no_cfg")
    (root / "patient002" / "Info.cfg").unlink()
    _expect(tmp_path, [("acdc", root)], r"patient002: .*Info.cfg does not exist", FileNotFoundError)
    root = fresh("no_es")
    (root / "patient003" / "Info.cfg").write_text("ED: 1\nGroup: NOR\n")
    _expect(tmp_path, [("acdc", root)], r"patient003: .*Info.cfg has no 'ES: <frame>' line")
    root = fresh("no_gt")
    (root / "patient003" / "patient003_frame07_gt.nii.gz").unlink()  # fails after two patients were written
    _expect(tmp_path, [("acdc", root)], r"patient003: label .*patient003_frame07_gt.nii.gz does not exist")
    root = fresh("shape")
    save_nifti(root / "patient001" / "patient001_frame01_gt.nii.gz", np.zeros((40, 36, 3), np.uint8), AFFINE)
    _expect(tmp_path, [("acdc", root)], r"patient001: label .*frame01_gt.nii.gz has shape \(40, 36, 3\) but image")
    root = fresh("affine")
    save_nifti(root / "patient001" / "patient001_frame07_gt.nii.gz", np.zeros(SHAPE, np.uint8), np.diag([1.8, 1.6, 10, 1]))
    _expect(tmp_path, [("acdc", root)], r"patient001: label .*frame07_gt.nii.gz and image .* have different affines")
    root = fresh("values")
    label = np.zeros(SHAPE, np.uint8)
    label[5, 5, 1] = 4
    save_nifti(root / "patient002" / "patient002_frame01_gt.nii.gz", label, AFFINE)
    _expect(tmp_path, [("acdc", root)], r"patient002: label .*frame01_gt.nii.gz holds value\(s\) \[4\]")
    ms = _mscmr(tmp_path / "ms_values", patients=(1, 2))
    label = np.zeros(SHAPE, np.int16)
    label[5, 5, 1] = 1
    save_nifti(ms / "lgegt" / "patient2_LGE_manual.nii.gz", label, AFFINE)
    _expect(tmp_path, [("mscmrseg", ms)], r"patient2: label .*patient2_LGE_manual.nii.gz holds value\(s\) \[1\]")
    ms = _mscmr(tmp_path / "ms_nolabel", patients=(1, 2))
    (ms / "lgegt" / "patient2_LGE_manual.nii.gz").unlink()
    _expect(tmp_path, [("mscmrseg", ms)], r"patient2: no label patient2_LGE_manual.nii.gz")
    _expect(tmp_path, [("acdc", tmp_path / "ms_nolabel")], "no ACDC patient", FileNotFoundError)
    _expect(tmp_path, [("mscmrseg_t2", tmp_path / "ms_nolabel")], "no MS-CMRSeg patient<N>_T2", FileNotFoundError)
    _expect(tmp_path, [("acdc", tmp_path / "ms_values"), ("btcv", good)], "cannot be mixed")
    _expect(tmp_path, [("acdc", good)], "classes", classes=["background", "liver"])
    _expect(tmp_path, [("acdc", fresh("few"))], r"--val 2 and --test 1 leave no training subject of its 3", val=2, test=1)
    _expect(tmp_path, [("acdc", good)], "keep must be one of", keep="some")
    _expect(tmp_path, [("acdc", good)], "size must be", size=0)
    _expect(tmp_path, [("btcv", good)], r"seed: only for the layouts \[.*'acdc'", seed=1)
    assert main(["build-datalist", "--source", f"btcv={good}", "--out", str(tmp_path / "x.json"), "--keep", "one"]) == 2
    assert "keep: only for the cardiac layouts" in capsys.readouterr().err
    # a structure that no training slice has cannot be annotated: the DCL sampler would have no condition for it
    root = fresh("no_rv", patients=(1,))
    for frame in (1, 7):
        path = root / "patient001" / f"patient001_frame{frame:02d}_gt.nii.gz"
        label = np.asanyarray(nib.load(str(path)).dataobj).copy()
        label[label == ACDC["RV"]] = 0
        save_nifti(path, label, AFFINE)
    _expect(tmp_path, [("acdc", root)], r"no training slice keeps \['RV'\] \(RV in 0 of 6 training slices\)", size=32)
    # an earlier build stays intact when a later one fails
    out = tmp_path / "kept" / "dataset.json"
    build_slices([("acdc", good)], out, size=32)
    before = _files(out.parent)
    (good / "patient002" / "patient002_frame07_gt.nii.gz").unlink()
    with pytest.raises(ValueError, match="patient002"):
        build_slices([("acdc", good)], out, size=32, seed=1)
    assert _files(out.parent) == before
