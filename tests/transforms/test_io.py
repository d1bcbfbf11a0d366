"""LoadImageNamedd: missing and corrupt inputs fail with errors naming the file."""

from __future__ import annotations

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
