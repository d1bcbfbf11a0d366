"""LoadImageNamedd: missing and corrupt inputs fail with errors naming the file; SavePrediction(d):
whole files only (a kill between write and rename keeps the earlier file), stamped with their run."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from partialseg.transforms import LoadImageNamedd

from conftest import save_nifti


def test_loads_like_loadimaged_and_names_bad_files(tmp_path):
    good = save_nifti(tmp_path / "a.nii.gz", np.ones((4, 3, 2), np.float32))
    out = LoadImageNamedd("image", image_only=True, ensure_channel_first=True)({"image": str(good)})
    assert tuple(out["image"].shape) == (1, 4, 3, 2)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz: file not found"):
        LoadImageNamedd("image")({"image": str(tmp_path / "missing.nii.gz")})
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good.read_bytes()[:40])  # truncated gzip
    with pytest.raises(RuntimeError, match="broken.nii.gz: cannot be read"):
        LoadImageNamedd("image")({"image": str(broken)})


def _slice_pair(tmp_path):
    """The same slice saved as (H, W) and as (H, W, 1), with a non-trivial affine."""
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    arr = np.random.default_rng(0).random((5, 4)).astype(np.float32)
    return save_nifti(tmp_path / "hw.nii.gz", arr, affine), save_nifti(tmp_path / "hw1.nii.gz", arr[..., None], affine)


def test_spatial_dims_reads_a_hw1_slice_as_the_same_2d_image(tmp_path):
    hw, hw1 = _slice_pair(tmp_path)
    load = LoadImageNamedd("image", image_only=True, ensure_channel_first=True, spatial_dims=2)
    a, b = load({"image": str(hw)})["image"], load({"image": str(hw1)})["image"]
    assert tuple(b.shape) == tuple(a.shape) == (1, 5, 4)
    assert np.array_equal(b.numpy(), a.numpy())
    assert np.array_equal(b.affine.numpy(), a.affine.numpy())  # 4 x 4, translation kept
    assert b.affine[0, 3] == 10.0 and b.affine[1, 3] == -20.0
    assert list(b.meta["spatial_shape"]) == [5, 4]
    # without spatial_dims, and for a 3D pipeline, a depth-1 volume stays 3D
    for kwargs in ({}, {"spatial_dims": 3}):
        out = LoadImageNamedd("image", image_only=True, ensure_channel_first=True, **kwargs)({"image": str(hw1)})
        assert tuple(out["image"].shape) == (1, 5, 4, 1)


def test_spatial_dims_refuses_other_dimensionalities_naming_the_file(tmp_path):
    hw, _ = _slice_pair(tmp_path)
    volume = save_nifti(tmp_path / "volume.nii.gz", np.zeros((5, 4, 3), np.float32))
    two_d = LoadImageNamedd("image", image_only=True, ensure_channel_first=True, spatial_dims=2)
    with pytest.raises(ValueError, match=r"volume.nii.gz: a 3D image of spatial shape \(5, 4, 3\).*takes 2D images.*slices"):
        two_d({"image": str(volume)})
    three_d = LoadImageNamedd("image", image_only=True, ensure_channel_first=True, spatial_dims=3)
    with pytest.raises(ValueError, match=r"hw.nii.gz: a 2D image of spatial shape \(5, 4\).*takes 3D images"):
        three_d({"image": str(hw)})
    with pytest.raises(ValueError, match="ensure_channel_first"):
        LoadImageNamedd("image", spatial_dims=2)
    with pytest.raises(ValueError, match="1, 2 or 3"):
        LoadImageNamedd("image", ensure_channel_first=True, spatial_dims=4)


def test_case_name_names_the_saved_output(tmp_path):
    from monai.transforms import SaveImaged

    from partialseg.transforms import CaseNameToMetad, case_name_formatter

    img = save_nifti(tmp_path / "case_00001" / "imaging.nii.gz", np.zeros((4, 3, 2), np.float32))
    load = LoadImageNamedd("image", image_only=True, ensure_channel_first=True)
    d = CaseNameToMetad("image")(load({"image": str(img), "case": "case_00001"}))
    save = SaveImaged("image", output_dir=str(tmp_path / "out"), output_postfix="seg", separate_folder=False,
                      output_name_formatter=case_name_formatter, print_log=False)
    save(d)
    assert (tmp_path / "out" / "case_00001_seg.nii.gz").is_file()
    save(CaseNameToMetad("image")(load({"image": str(img)})))  # no case name: the file's name, as MONAI does
    assert (tmp_path / "out" / "imaging_seg.nii.gz").is_file()
    with pytest.raises(TypeError, match="MetaTensor"):
        CaseNameToMetad("image")({"image": np.zeros((1, 2, 2)), "case": "x"})


# --------------------------------------------------------------------------------------------
# SavePrediction(d): whole files only, stamped with the run
# --------------------------------------------------------------------------------------------


def _prediction(tmp_path, case="case_7"):
    """A (1, 5, 4, 3) uint8 label map on a non-trivial grid, loaded as the bundles load images."""
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    arr = (np.arange(60).reshape(5, 4, 3) % 4).astype(np.float32)
    img = save_nifti(tmp_path / "in" / "imaging.nii.gz", arr, affine)
    d = LoadImageNamedd("pred", image_only=True, ensure_channel_first=True)({"pred": str(img), "case": case})
    from partialseg.transforms import CaseNameToMetad

    return CaseNameToMetad("pred")(d), arr, affine


SAVE_ARGS = {"output_postfix": "seg", "separate_folder": False, "resample": False, "print_log": False}


def test_save_prediction_writes_what_saveimaged_writes_plus_the_record(tmp_path):
    import nibabel as nib
    import torch
    from monai.transforms import SaveImaged

    from partialseg.transforms import SavePredictiond, case_name_formatter, read_run_record

    d, arr, affine = _prediction(tmp_path)
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights v1")
    kwargs = dict(SAVE_ARGS, output_name_formatter=case_name_formatter, output_dtype=torch.uint8)
    SaveImaged("pred", output_dir=str(tmp_path / "monai"), **kwargs)(dict(d))
    save = SavePredictiond("pred", output_dir=str(tmp_path / "ours"), model_file=model, **kwargs)
    save(dict(d))
    ours, theirs = nib.load(tmp_path / "ours" / "case_7_seg.nii.gz"), nib.load(tmp_path / "monai" / "case_7_seg.nii.gz")
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj)) and ours.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(ours.dataobj), arr.astype(np.uint8))
    np.testing.assert_allclose(ours.affine, affine)
    assert (ours.header.get_sform(coded=True)[1], ours.header.get_qform(coded=True)[1]) == (1, 1)
    record = read_run_record(tmp_path / "ours" / "case_7_seg.nii.gz")
    assert record == {"model": "model.pt", "model_sha256": hashlib.sha256(b"weights v1").hexdigest(),
                      "partialseg_run": save.run.run_id}
    assert ours.header["descrip"].item().decode() == f"partialseg run {save.run.run_id}"
    assert read_run_record(tmp_path / "monai" / "case_7_seg.nii.gz") is None  # another writer: no record
    # the model is hashed once per run: a later change of the file does not change the record
    model.write_bytes(b"weights v2")
    from partialseg.transforms import CaseNameToMetad

    save(CaseNameToMetad("pred")({**d, "pred": d["pred"].clone(), "case": "case_8"}))
    assert read_run_record(tmp_path / "ours" / "case_7_seg.nii.gz") == record
    # a new instance is a new run, with the new model's hash
    SavePredictiond("pred", output_dir=str(tmp_path / "ours"), model_file=model, **kwargs)(dict(d))
    again = read_run_record(tmp_path / "ours" / "case_7_seg.nii.gz")
    assert again["partialseg_run"] != record["partialseg_run"]
    assert again["model_sha256"] == hashlib.sha256(b"weights v2").hexdigest()
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["case_7_seg.nii.gz", "case_8_seg.nii.gz"]


def test_save_prediction_refuses_other_formats_and_writers(tmp_path):
    from partialseg.transforms import SavePrediction, SavePredictiond

    with pytest.raises(ValueError, match="NIfTI.*'.nrrd'"):
        SavePredictiond("pred", output_dir=str(tmp_path), output_ext=".nrrd")
    with pytest.raises(ValueError, match="NIfTI.*'.png'"):
        SavePrediction(output_dir=str(tmp_path), output_ext="png")
    with pytest.raises(ValueError, match="drop writer"):
        SavePredictiond("pred", output_dir=str(tmp_path), writer="ITKWriter")
    with pytest.raises(ValueError, match="run_id"):
        SavePredictiond("pred", output_dir=str(tmp_path), run_id="")
    with pytest.raises(FileNotFoundError, match="missing.pt"):  # named when the first prediction is saved
        d, _, _ = _prediction(tmp_path)
        SavePredictiond("pred", output_dir=str(tmp_path / "out"), model_file=tmp_path / "missing.pt", **SAVE_ARGS)(d)


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path):
    """The write fails while its temporary file is open: the final name keeps its earlier content."""
    from partialseg.transforms import SavePrediction, read_run_record

    d, _, _ = _prediction(tmp_path)
    out = tmp_path / "out"
    first = SavePrediction(output_dir=str(out), run_id="first", **SAVE_ARGS)
    first(d["pred"])
    target = out / "imaging_seg.nii.gz"
    before = target.read_bytes()

    class Boom(Exception):
        pass

    class FailingRun:  # a record that fails to stamp the header (the writer stamps inside the open temporary file)
        run_id = "second"

        def stamp(self, header):
            raise Boom

    second = SavePrediction(output_dir=str(out), run_id="second", **SAVE_ARGS)
    second.set_options(init_kwargs={"run": FailingRun()})
    with pytest.raises(RuntimeError, match="imaging_seg.nii.gz"):
        second(d["pred"])
    assert target.read_bytes() == before and read_run_record(target)["partialseg_run"] == "first"
    assert sorted(p.name for p in out.iterdir()) == ["imaging_seg.nii.gz"]


KILL_BETWEEN_WRITE_AND_RENAME = r"""
import os, signal, sys
import numpy as np, torch
from monai.data import MetaTensor
from partialseg.transforms import SavePrediction
def hook(name, args):
    if name == "os.rename":
        os.kill(os.getpid(), signal.SIGKILL)
save = SavePrediction(output_dir=sys.argv[1], output_postfix="seg", separate_folder=False, resample=False,
                      print_log=False, output_dtype=torch.uint8, run_id="killed")
sys.addaudithook(hook)
save(MetaTensor(torch.full((1, 6, 5, 4), 2.0), meta={"filename_or_obj": "case_001.nii.gz"}))
"""


def test_a_kill_between_write_and_rename_keeps_the_earlier_prediction(tmp_path):
    """A real SIGKILL after the new file is complete but before its rename: the old file stays whole."""
    import subprocess
    import sys

    import nibabel as nib
    import torch
    from monai.data import MetaTensor

    from partialseg.transforms import SavePrediction, read_run_record

    out = tmp_path / "out"
    SavePrediction(output_dir=str(out), output_postfix="seg", separate_folder=False, resample=False, print_log=False,
                   output_dtype=torch.uint8, run_id="earlier")(MetaTensor(torch.ones(1, 6, 5, 4), meta={"filename_or_obj": "case_001.nii.gz"}))
    r = subprocess.run([sys.executable, "-c", KILL_BETWEEN_WRITE_AND_RENAME, str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    target = out / "case_001_seg.nii.gz"
    assert np.array_equal(np.asarray(nib.load(target).dataobj), np.ones((6, 5, 4), np.uint8))
    assert read_run_record(target)["partialseg_run"] == "earlier"
    (leftover,) = [p for p in out.iterdir() if p != target]  # the killed run's complete temporary file
    assert leftover.name.startswith(".case_001_seg.nii.gz.") and leftover.name.endswith(".tmp")


def test_read_run_record_names_an_unreadable_file(tmp_path):
    from partialseg.transforms import read_run_record

    bad = tmp_path / "c1_seg.nii.gz"
    bad.write_bytes(b"\x1f\x8b not a nifti")
    with pytest.raises(ValueError, match="c1_seg.nii.gz: cannot read the NIfTI header"):
        read_run_record(bad)
    assert read_run_record(tmp_path / "c1_seg.nrrd") is None  # not NIfTI: no record, the file is not opened
