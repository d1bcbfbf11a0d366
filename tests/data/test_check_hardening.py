"""`partialseg check` against adversarial datasets (issue 13, finding 5) and at scale (finding 7):
each test fails on the validation before the hardening."""

from __future__ import annotations

import gzip
import json
import os

import nibabel as nib
import numpy as np
import pytest

from conftest import save_nifti
from partialseg.cli import main
from partialseg.data import DatasetError, load_dataset, validate_dataset
import partialseg.data.validation as validation


def _with_validation(root, extra_training=(), validation=("val0",)):
    desc = json.loads((root / "dataset.json").read_text())
    for name in validation:
        save_nifti(root / f"imagesTr/{name}.nii.gz", np.full((6, 5, 4), 3.0, np.float32))
        save_nifti(root / f"labelsTr/{name}.nii.gz", np.zeros((6, 5, 4), np.uint8))
    desc["validation"] = [{"image": f"imagesTr/{n}.nii.gz", "label": f"labelsTr/{n}.nii.gz", "annotated": "all"} for n in validation]
    desc["training"] += list(extra_training)
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


def test_a_dotdot_path_to_a_validation_image_is_a_leak(tiny_dataset, capsys):
    root = _with_validation(tiny_dataset(), [{"image": "imagesTr/../imagesTr/val0.nii.gz"}])
    with pytest.raises(DatasetError, match="val0.nii.gz is listed twice"):
        load_dataset(root)
    assert main(["check", str(root), "--quiet"]) == 2
    assert "listed twice (training and validation: " in capsys.readouterr().err


def test_a_symlink_to_a_validation_image_is_a_leak(tiny_dataset):
    root = _with_validation(tiny_dataset(), [{"image": "imagesTr/link.nii.gz"}])
    os.symlink(root / "imagesTr/val0.nii.gz", root / "imagesTr/link.nii.gz")
    with pytest.raises(DatasetError, match=r"val0.nii.gz is listed twice \(training and validation: .*imagesTr/link.nii.gz and .*val0.nii.gz are the same file, .*/imagesTr/val0.nii.gz\)"):
        validate_dataset(root)
    # a linked folder is the same file too; `..` after a linked folder is not (string normalisation gets it wrong)
    (root / "imagesTr/link.nii.gz").unlink()
    os.symlink(root / "imagesTr", root / "alias")
    (root / "deep").mkdir()
    os.symlink(root / "deep", root / "imagesTr/hop")  # imagesTr/hop/.. is root/, not imagesTr/
    save_nifti(root / "val0.nii.gz", np.zeros((6, 5, 4), np.float32))
    desc = json.loads((root / "dataset.json").read_text())
    desc["training"][-1] = {"image": "alias/val0.nii.gz"}
    (root / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(DatasetError, match="alias/val0.nii.gz and .*imagesTr/val0.nii.gz are the same file"):
        load_dataset(root)
    desc["training"][-1] = {"image": "imagesTr/hop/../val0.nii.gz"}  # the root's val0: another file
    (root / "dataset.json").write_text(json.dumps(desc))
    assert validate_dataset(root).ok
    # a dataset changed in memory is checked by validate_dataset itself
    ds = load_dataset(root)
    ds.splits["training"].append(dict(ds.splits["validation"][0], image=str(root / "alias/val0.nii.gz"), case="dup"))
    problems = validate_dataset(ds).problems
    assert len(problems) == 1 and "case 'val0' (validation)" in problems[0] and "is the file of case 'dup'" in problems[0]


def test_a_copy_is_a_leak_by_content_with_hash(tiny_dataset, capsys):
    root = _with_validation(tiny_dataset(), [{"image": "imagesTr/copy.nii.gz"}])
    (root / "imagesTr/copy.nii.gz").write_bytes((root / "imagesTr/val0.nii.gz").read_bytes())
    assert validate_dataset(root).ok  # other files by path
    problems = [p for p in validate_dataset(root, content_hash=True).problems if "val0" in p]
    assert len(problems) == 1 and "has the same content as case 'copy'" in problems[0] and "training/validation leak" in problems[0]
    assert main(["check", str(root), "--quiet", "--hash"]) == 1
    assert "same content" in capsys.readouterr().out


def test_4d_images_need_the_expected_channels_and_4d_labels_are_refused(tiny_dataset, capsys):
    root = tiny_dataset()
    save_nifti(root / "imagesTr/full.nii.gz", np.zeros((6, 5, 4, 2), np.float32))
    problems = validate_dataset(root).problems
    assert len(problems) == 1 and "imagesTr/full.nii.gz has shape (6, 5, 4, 2): 2 channels, expected 1" in problems[0]
    assert main(["check", str(root), "--quiet", "--channels", "2"]) == 1  # now the 3 one-channel images are wrong
    assert capsys.readouterr().out.count("1 channels, expected 2") == 2
    two = validate_dataset(root, channels=2).problems
    assert len(two) == 2 and all("1 channels, expected 2" in p for p in two)
    save_nifti(root / "imagesTr/full.nii.gz", np.zeros((6, 5, 4), np.float32))
    save_nifti(root / "labelsTr/spl.nii.gz", np.zeros((6, 5, 4, 3), np.uint8))
    problems = validate_dataset(root).problems
    assert len(problems) == 1 and "labelsTr/spl.nii.gz is 4D with shape (6, 5, 4, 3)" in problems[0]


def _corrupt_stored_voxel(path):
    """Write a 32^3 image to ``path`` as stored (uncompressed) deflate blocks and change one voxel
    byte near the end (beyond what a reader buffers before the voxels: nibabel reads it without error)."""
    save_nifti(path, np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32))
    raw = gzip.decompress(path.read_bytes())
    data = bytearray(gzip.compress(raw, compresslevel=0))
    data[-8 - 4 - 20] ^= 0x40  # a byte of the voxel data, inside the stored block, before the trailer
    path.write_bytes(bytes(data))


def test_a_corrupted_gzip_stream_names_the_file(tiny_dataset):
    root = tiny_dataset()
    _corrupt_stored_voxel(root / "imagesTr/spl.nii.gz")
    assert np.asanyarray(nib.load(str(root / "imagesTr/spl.nii.gz")).dataobj).shape == (32, 32, 32)  # nibabel reads it
    problems = [p for p in validate_dataset(root).problems if "shape" not in p]  # (the label is 6 x 5 x 4)
    assert len(problems) == 1 and "case 'spl'" in problems[0] and "imagesTr/spl.nii.gz: cannot be read (corrupted gzip" in problems[0]
    data = (root / "labelsTr/full.nii.gz").read_bytes()
    (root / "labelsTr/full.nii.gz").write_bytes(data[:-3])  # truncated trailer
    problems = validate_dataset(root).problems
    assert any("labelsTr/full.nii.gz: cannot be read (truncated gzip" in p for p in problems)
    with pytest.raises(ValueError, match="corrupted gzip"):
        validation.read_gzip_verified(str(root / "imagesTr/spl.nii.gz"))
    assert validation.read_image(str(root / "imagesTr/unl.nii.gz"))[0].shape == (6, 5, 4)


def test_latin1_dataset_json_is_a_one_line_error(tiny_dataset, capsys):
    root = tiny_dataset()
    desc = json.loads((root / "dataset.json").read_text())
    desc["description"] = "Données d'entraînement"
    (root / "dataset.json").write_bytes(json.dumps(desc, ensure_ascii=False).encode("latin-1"))
    assert main(["check", str(root), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "dataset.json: is not UTF-8 (byte 0xe9" in err and "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_an_rgb24_label_is_a_one_line_problem(tiny_dataset, capsys):
    root = tiny_dataset()
    rgb = np.zeros((6, 5, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(root / "labelsTr/spl.nii.gz"))
    assert main(["check", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "case 'spl'" in out and "labelsTr/spl.nii.gz has non-scalar dtype" in out and "Traceback" not in out


def test_an_empty_training_list_or_requested_split_is_an_error(tiny_dataset, capsys):
    root = tiny_dataset()
    assert validate_dataset(root, splits=["validation"]).problems == ["split 'validation' has no cases"]
    assert main(["check", str(root), "--quiet", "--splits", "test"]) == 1
    assert "split 'test' has no cases" in capsys.readouterr().out
    desc = json.loads((root / "dataset.json").read_text())
    desc["training"] = []
    (root / "dataset.json").write_text(json.dumps(desc))
    assert main(["check", str(root), "--quiet"]) == 1
    assert "split 'training' has no cases" in capsys.readouterr().out


def test_parallel_check_agrees_and_the_cache_skips_unchanged_cases(tiny_dataset):
    root = tiny_dataset()
    save_nifti(root / "labelsTr/spl.nii.gz", np.full((6, 5, 4), 7, np.uint8))
    serial = validate_dataset(root)
    parallel = validate_dataset(root, workers=2, cache=True)
    assert parallel.problems == serial.problems and parallel.summary == serial.summary
    assert (root / validation.CACHE_NAME).is_file()
    # change a file's content while keeping its size and times: the cache answers (it was not read)
    img = root / "imagesTr/unl.nii.gz"
    st = os.stat(img)
    save_nifti(img, np.full((6, 5, 4), np.nan, np.float32))
    if os.stat(img).st_size == st.st_size:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert validate_dataset(root, workers=2, cache=True).problems == serial.problems
    # a new modification time: read again
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = validate_dataset(root, workers=2, cache=True).problems
    assert any("case 'unl'" in p and "NaN" in p for p in again)
    assert validate_dataset(root, cache=False).problems == again  # the cache gives what reading gives


def test_bundle_datalist_checks_channels_only_when_told(tiny_dataset):
    from partialseg.data import bundle_datalist

    root = tiny_dataset()
    save_nifti(root / "imagesTr/full.nii.gz", np.zeros((6, 5, 4, 3), np.float32))  # an RGB-like 3-channel volume
    assert len(bundle_datalist(root, "training")) == 3  # a bundle that does not say its in_channels
    with pytest.raises(DatasetError, match="3 channels, expected 1"):
        bundle_datalist(root, "training", channels=1)
