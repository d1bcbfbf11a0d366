"""Validation against files on disk, and the `partialseg check` command."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import save_nifti
from partialseg.cli import main
from partialseg.data import DatasetError, validate_dataset


def test_valid_dataset_summary(tiny_dataset):
    root = tiny_dataset()
    report = validate_dataset(root)
    assert report.ok, report.problems
    s = report.summary["training"]
    assert s["full"]["cases"] == 1 and s["full"]["label_values"] == [0, 1, 2]
    assert s["spl"]["annotated"] == {2: 1} and s["default"]["labelled"] == 0
    assert s["full"]["spacings"] == [(1.0, 1.0, 1.0)]
    report.raise_if_invalid()
    assert "no problems found" in report.format()


def test_every_file_problem_is_reported_with_its_case(tiny_dataset, tmp_path):
    root = tiny_dataset()
    img = np.zeros((6, 5, 4), np.float32)
    img[0, 0, 0] = np.nan
    save_nifti(root / "imagesTr/full.nii.gz", img)  # non-finite image
    save_nifti(root / "labelsTr/spl.nii.gz", np.full((6, 5, 4), 7, np.uint8))  # value no class explains
    (root / "imagesTr/unl.nii.gz").write_bytes(b"not a nifti")  # unreadable
    report = validate_dataset(root)
    text = "\n".join(report.problems)
    assert "case 'full'" in text and "1 NaN or infinite" in text
    assert "case 'spl'" in text and "value(s) [7] that no class explains" in text
    assert "case 'unl'" in text and "cannot be read" in text
    with pytest.raises(DatasetError, match="3 problem"):
        report.raise_if_invalid()


def test_grid_mismatch_and_missing_files(tiny_dataset):
    root = tiny_dataset()
    save_nifti(root / "labelsTr/full.nii.gz", np.zeros((6, 5, 3), np.uint8))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    save_nifti(root / "labelsTr/spl.nii.gz", np.zeros((6, 5, 4), np.uint8), affine=shifted)
    (root / "imagesTr/unl.nii.gz").unlink()
    text = "\n".join(validate_dataset(root).problems)
    assert "case 'full'" in text and "shape (6, 5, 3)" in text and "(6, 5, 4)" in text
    assert "case 'spl'" in text and "different affines" in text
    assert "case 'unl'" in text and "file not found" in text


def test_label_map_values(tiny_dataset):
    spl = np.zeros((6, 5, 4), np.uint8)
    spl[1, 1, 1], spl[2, 2, 2] = 1, 3
    root = tiny_dataset(label_maps={"spl": {"1": "spleen"}}, spl_label=spl)
    problems = validate_dataset(root).problems
    assert len(problems) == 1 and "value(s) [3] that the label map of source 'spl'" in problems[0]


def test_check_command(tiny_dataset, capsys):
    root = tiny_dataset()
    assert main(["check", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[training]" in out and "spleen (1)" in out and "all (1)" in out and "no problems found" in out
    save_nifti(root / "labelsTr/spl.nii.gz", np.full((6, 5, 4), 9, np.uint8))
    assert main(["check", str(root), "--quiet", "--json", str(root / "r.json")]) == 1
    assert "value(s) [9]" in capsys.readouterr().out and (root / "r.json").exists()
    assert main(["check", str(root / "nowhere")]) == 2
    assert main(["check", str(root), "--quiet", "--json", str(root / "no" / "such" / "r.json")]) == 2
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a misspelt split is refused, not skipped
        main(["check", str(root), "--splits", "valdation"])


def test_a_2d_label_for_a_3d_volume_is_a_mismatch_and_hw1_is_2d(tiny_dataset):
    img2d = np.zeros((6, 5), np.float32)
    root = tiny_dataset(spl_label=np.zeros((6, 5), np.uint8))  # the image is (6, 5, 4)
    text = "\n".join(validate_dataset(root).problems)
    assert "case 'spl'" in text and "label" in text and "(6, 5, 4)" in text
    # a slice saved as (H, W, 1) and its (H, W) label are one grid
    save_nifti(root / "imagesTr/spl.nii.gz", img2d[..., None])
    save_nifti(root / "labelsTr/spl.nii.gz", np.zeros((6, 5), np.uint8))
    assert not [p for p in validate_dataset(root).problems if "'spl'" in p]



def test_a_2d_nrrd_label_beside_a_2d_nifti_image(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    from partialseg.data import load_dataset

    affine = np.diag([1.5, 1.5, 1.0, 1.0])
    save_nifti(tmp_path / "img.nii.gz", np.zeros((6, 5), np.float32), affine)
    lab = np.zeros((6, 5), np.uint8)
    lab[1, 1] = 1
    # the same grid in LPS (NRRD's space here; NIfTI's affine is RAS): x and y flip sign
    header = {"space": "left-posterior-superior", "space directions": np.diag([-1.5, -1.5]), "space origin": np.zeros(2)}
    nrrd.write(str(tmp_path / "lab.nrrd"), lab, header)
    desc = {"classes": ["background", "a"], "training": [{"image": "img.nii.gz", "label": "lab.nrrd"}]}
    report = validate_dataset(load_dataset(desc, root=tmp_path))
    assert report.ok, report.problems  # 3 x 3 against 4 x 4: compared, not a broadcast error
    header["space directions"] = np.diag([1.5, 1.5])  # mirrored: a real mismatch, named
    nrrd.write(str(tmp_path / "lab.nrrd"), lab, header)
    problems = validate_dataset(load_dataset(desc, root=tmp_path)).problems
    assert len(problems) == 1 and "different affines" in problems[0]
