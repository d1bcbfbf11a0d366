"""The DCL bundle through ``python -m monai.bundle run``: both stages, inference, evaluation.

Tiny data (synthetic cardiac2d at 32 x 32, one case of each annotation type: LV, MYO, RV and
whole heart) and a few iterations: these tests check the configs, the hand-over between the
stages (stage-1 PrimNet, support bank saved beside the model) and that predictions land on the
input's grid; ``benchmarks/dcl_ablation.py`` measures accuracy. The shared checks live in
``tests/bundle_harness.py``.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_harness import DCL, check_inference_and_evaluation, check_stage2_needs_stage1, check_stages_hand_over, trained_fixture

pytestmark = pytest.mark.slow

trained = trained_fixture(DCL)


def test_both_stages_train_and_hand_over(trained):
    check_stages_hand_over(*trained)
    models = trained[0] / "models"
    # the support bank saved beside the model: every class, on the training grid
    from partialseg.data.dcl import SupportBank

    bank = SupportBank.load(models / "support_bank.pt")
    assert bank.num_classes == 4 and sorted(set(bank.classes.tolist())) == [0, 1, 2, 3]
    assert tuple(bank.images.shape[1:]) == (1, 32, 32)
    # the checkpoint is a CompNet: 9 packed input channels, 8 output maps
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    first = next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
    last = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 4][-1]
    assert first.shape[1] == 9 and 8 in (last.shape[0], last.shape[1])


def test_inference_and_evaluation_land_on_the_input_grid(trained):
    # ED and ES of one test subject, back on the original 1.37 mm grid, 2D
    cases, _ = check_inference_and_evaluation(DCL, trained[0], num_cases=2, num_samples=2)
    assert all(nib.load(c["image"]).shape == (32, 32) for c in cases)


def test_stage2_without_stage1_names_the_missing_checkpoint(tmp_path):
    check_stage2_needs_stage1(DCL, tmp_path)


def test_a_slice_saved_as_hw1_is_segmented_as_the_same_slice_and_a_volume_is_refused(trained, tmp_path):
    root = trained[0]
    case = DCL.dataset(root).datalist("test")[0]
    img = nib.load(case["image"])
    hw1 = tmp_path / "slice_hw1.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine), str(hw1))
    out = tmp_path / "pred"
    r = DCL.run(root, configs=("inference.json",), num_samples=1, output_dir=str(out),
                datalist=[{"image": case["image"]}, {"image": str(hw1)}, {"image": case["image"], "case": "named"}],
                **DCL.grid)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = nib.load(str(next(out.rglob(f"{case['case']}_seg.nii.gz"))))
    b = nib.load(str(next(out.rglob("slice_hw1_seg.nii.gz"))))
    assert b.shape == a.shape == (32, 32)
    np.testing.assert_array_equal(np.asarray(b.dataobj), np.asarray(a.dataobj))
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)
    assert np.asarray(a.dataobj).max() > 0  # not a trivially empty comparison
    # a dataset entry's case name names its prediction (KiTS's images are all called imaging.nii.gz)
    named = nib.load(str(out / "named_seg.nii.gz"))
    np.testing.assert_array_equal(np.asarray(named.dataobj), np.asarray(a.dataobj))
    # a volume is refused before the network sees it, naming the file
    volume = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.repeat(np.asarray(img.dataobj)[..., None], 3, -1), img.affine), str(volume))
    r = DCL.run(root, configs=("inference.json",), num_samples=1, output_dir=str(tmp_path / "pred3d"),
                datalist=[{"image": str(volume)}], **DCL.grid)
    assert r.returncode != 0
    assert "volume.nii.gz: a 3D image of spatial shape (32, 32, 3)" in r.stdout + r.stderr
