"""partialseg.data.atlas: build-atlas on real NIfTI files, per-organ counts, load_atlas checks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from partialseg.cli import main
from partialseg.data.atlas import atlas_sidecar, build_atlas, load_atlas

CLASSES = ["background", "liver", "spleen", "kidney"]
FULL = (14, 14, 10)
BODY = (10, 8, 6)  # every body box has this shape, at a different place in each image


def _write(root: Path, name: str, offset, masks: dict[int, np.ndarray], extra: np.ndarray | None = None) -> tuple[str, str]:
    """An image with a bright body box at ``offset`` and a label holding ``masks`` (body-frame) inside it."""
    img = np.zeros(FULL, np.float32)
    box = tuple(slice(o, o + b) for o, b in zip(offset, BODY))
    img[box] = 200.0
    lab = np.zeros(FULL, np.uint8)
    body_lab = np.zeros(BODY, np.uint8)
    for value, m in masks.items():
        body_lab[m] = value
    if extra is not None:
        body_lab[extra] = 2  # a spleen value in a case that does not annotate spleen
    lab[box] = body_lab
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(img, affine), str(root / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(lab, affine), str(root / f"{name}_seg.nii.gz"))
    return f"{name}.nii.gz", f"{name}_seg.nii.gz"


def _mask(slices) -> np.ndarray:
    m = np.zeros(BODY, bool)
    m[slices] = True
    return m


@pytest.fixture
def dataset(tmp_path):
    liver = [_mask(np.s_[0:4, 0:4, 0:3]), _mask(np.s_[1:5, 0:4, 0:3]), _mask(np.s_[0:4, 1:6, 1:4])]
    spleen_a = _mask(np.s_[6:9, 5:8, 2:5])
    kidney_c = _mask(np.s_[5:7, 0:2, 4:6])
    cases = []
    img, lab = _write(tmp_path, "a", (1, 2, 1), {1: liver[0], 2: spleen_a})
    cases.append({"image": img, "label": lab, "annotated": ["liver", "spleen"], "modality": "CT"})
    img, lab = _write(tmp_path, "b", (3, 1, 2), {1: liver[1]}, extra=_mask(np.s_[7:9, 6:8, 0:2]))
    cases.append({"image": img, "label": lab, "annotated": ["liver"], "modality": "CT"})
    img, lab = _write(tmp_path, "c", (2, 4, 3), {1: liver[2], 3: kidney_c})
    cases.append({"image": img, "label": lab, "annotated": ["liver", "kidney"], "modality": "MR"})
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": CLASSES, "training": cases}))
    return tmp_path, {"liver": liver, "spleen": spleen_a, "kidney": kidney_c}


def test_atlas_is_the_per_class_mean_over_annotating_cases(dataset):
    root, masks = dataset
    path = build_atlas(root, sigma=0.0, progress=False)
    assert path == root / "atlas.nii.gz" and atlas_sidecar(path).is_file()
    atlas = load_atlas(path, CLASSES)
    assert atlas.data.shape == (3, *BODY) and atlas.data.dtype == np.float32
    assert atlas.counts == {"liver": 3, "spleen": 1, "kidney": 1}
    assert atlas.channels == ["liver", "spleen", "kidney"]
    # liver: mean of three masks (values 0, 1/3, 2/3, 1); spleen: case a's mask only, case b's
    # unannotated value 2 ignored and b not counted; kidney: case c's mask alone (count 1, not 3)
    np.testing.assert_allclose(atlas.data[0], np.mean(masks["liver"], axis=0), atol=1e-6)
    np.testing.assert_array_equal(atlas.data[1], masks["spleen"].astype(np.float32))
    np.testing.assert_array_equal(atlas.data[2], masks["kidney"].astype(np.float32))
    np.testing.assert_allclose(np.unique(atlas.data[0]), [0.0, 1 / 3, 2 / 3, 1.0], atol=1e-6)
    # the NIfTI holds channels last, voxel size 1 (the images' spacing)
    img = nib.load(str(path))
    assert img.shape == (*BODY, 3)
    np.testing.assert_allclose(np.diag(img.affine)[:3], 1.0)
    meta = json.loads(atlas_sidecar(path).read_text())
    assert meta["classes"] == CLASSES and meta["counts"] == {"liver": 3, "spleen": 1, "kidney": 1}
    assert meta["num_cases"] == 3 and meta["shape"] == list(BODY)


def test_atlas_smoothing_and_max_normalisation(dataset):
    root, masks = dataset
    out = root / "sub" / "smooth.nii.gz"
    atlas = load_atlas(build_atlas(root, out=out, sigma=1.5, progress=False), CLASSES)
    expected = ndimage.gaussian_filter(np.mean(masks["liver"], axis=0).astype(np.float64), 1.5, mode="constant")
    np.testing.assert_allclose(atlas.data[0], expected, atol=1e-5)
    assert (root / "sub" / "smooth.json").is_file()
    maxed = load_atlas(build_atlas(root, out=root / "max.nii.gz", sigma=0.0, normalize="max", progress=False), CLASSES)
    total = np.sum(masks["liver"], axis=0)
    np.testing.assert_allclose(maxed.data[0], total / total.max(), atol=1e-6)


def test_atlas_common_shape_is_the_mean_cropped_shape(tmp_path):
    cases = []
    for name, body in (("a", (6, 6, 4)), ("b", (10, 8, 6)), ("c", (11, 9, 6))):
        img = np.zeros(FULL, np.float32)
        img[1:1 + body[0], 2:2 + body[1], 1:1 + body[2]] = 100.0
        lab = np.zeros(FULL, np.uint8)
        lab[1:1 + body[0], 2:2 + body[1], 1:1 + body[2]] = 1  # the whole body is "liver"
        nib.save(nib.Nifti1Image(img, np.diag([2.0, 1.0, 3.0, 1.0])), str(tmp_path / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.diag([2.0, 1.0, 3.0, 1.0])), str(tmp_path / f"{name}_seg.nii.gz"))
        cases.append({"image": f"{name}.nii.gz", "label": f"{name}_seg.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["background", "liver"], "training": cases}))
    atlas = load_atlas(build_atlas(tmp_path, sigma=0.0, progress=False), ["background", "liver"])
    assert atlas.data.shape == (1, 9, 8, 5)  # mean of (6,6,4), (10,8,6), (11,9,6) = (9, 7.67, 5.33), rounded
    assert np.all(atlas.data == 1.0)  # the body fills every crop
    np.testing.assert_allclose(np.diag(atlas.affine)[:3], [2.0, 1.0, 3.0])
    # with a target spacing: mean extent (18, 7.67, 16) mm / (3, 1, 4) mm
    atlas = load_atlas(build_atlas(tmp_path, out=tmp_path / "mm.nii.gz", sigma=0.0, spacing=(3.0, 1.0, 4.0),
                                   progress=False), ["background", "liver"])
    assert atlas.data.shape == (1, 6, 8, 4)


def test_atlas_applies_label_maps(tmp_path):
    img = np.zeros((8, 8, 6), np.float32)
    img[1:7, 1:7, 1:5] = 50.0
    lab = np.zeros((8, 8, 6), np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    lab[4:6, 4:6, 2:4] = 2  # tumour, merged into the organ by the label map
    for name in ("i", "j"):  # one file per case (a file listed twice is refused as a leak)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / f"{name}_seg.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({
        "classes": ["background", "spleen", "liver"],
        "training": [{"image": "i.nii.gz", "label": "i_seg.nii.gz", "annotated": ["liver"], "source": "msd"},
                     {"image": "j.nii.gz", "label": "j_seg.nii.gz", "annotated": ["spleen"], "source": "s"}],
        "label_maps": {"msd": {"1": "liver", "2": "liver"}, "s": {"1": "spleen", "2": "spleen"}}}))
    atlas = load_atlas(build_atlas(tmp_path, sigma=0.0, progress=False, axcodes=None), ["background", "spleen", "liver"])
    assert atlas.counts == {"spleen": 1, "liver": 1}
    assert atlas.data[1].sum() == 16  # both source values became liver (2x2x2 twice)


def test_atlas_refuses_an_organ_no_case_annotates(dataset):
    root, _ = dataset
    desc = json.loads((root / "dataset.json").read_text())
    desc["classes"] = [*CLASSES, "pancreas"]
    (root / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(ValueError, match=r"annotates pancreas \(class 4\)"):
        build_atlas(root, progress=False)
    assert not (root / "atlas.nii.gz").exists()


def test_load_atlas_refuses_other_classes(dataset):
    root, _ = dataset
    path = build_atlas(root, sigma=0.0, progress=False)
    with pytest.raises(ValueError, match=r"built for the classes \['background', 'liver', 'spleen', 'kidney'\].*"
                                         r"dataset has the classes \['background', 'spleen', 'liver', 'kidney'\]"):
        load_atlas(path, ["background", "spleen", "liver", "kidney"])
    atlas_sidecar(path).unlink()
    with pytest.raises(ValueError, match="has no sidecar"):
        load_atlas(path, CLASSES)


def test_build_atlas_command(dataset, capsys):
    root, _ = dataset
    out = root / "cli" / "atlas.nii.gz"
    assert main(["build-atlas", str(root), "--out", str(out), "--sigma", "0", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "liver                annotated by 3 case(s)" in text and out.is_file()
    assert main(["build-atlas", str(root), "--split", "test", "--no-progress"]) == 2
    assert "no split 'test'" in capsys.readouterr().err
