"""The DCL bundle through ``python -m monai.bundle run``: both stages, inference, evaluation.

Tiny data (synthetic cardiac2d at 32 x 32, one case of each annotation type: LV, MYO, RV and
whole heart) and a few iterations: these tests check the configs, the hand-over between the
stages (stage-1 PrimNet, support bank saved beside the model) and that predictions land on the
input's grid; ``benchmarks/dcl_ablation.py`` measures accuracy.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from partialseg.data import ensure_dataset, load_dataset
from partialseg.engines import run_bundle

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "dcl_cardiac"
#: 32 x 32 slices resampled to 1.8 mm (25 x 25) and padded to 32 x 32: the inverse must undo both
SMALL = {"pixdim": [1.8, 1.8], "spatial_size": [32, 32], "iterations_per_epoch": 4, "val_interval": 1, "batch_size": 4}
DATA = {"size": 32, "num_train": 2, "num_test": 1, "num_val": 1, "variant": "wholeheart"}

pytestmark = pytest.mark.slow


def bundle_run(root: Path, configs=("train.json",), **overrides) -> subprocess.CompletedProcess:
    return run_bundle(BUNDLE, root, configs, threads=1, timeout=600, **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 1 then stage 2 on tiny data, through the monai.bundle CLI."""
    root = tmp_path_factory.mktemp("dcl_bundle")
    ensure_dataset(root / "data" / "cardiac2d", "cardiac2d", **DATA)
    s1 = bundle_run(root, stage=1, epochs_stage1=3, **SMALL)
    assert s1.returncode == 0, s1.stdout[-3000:] + s1.stderr[-3000:]
    s2 = bundle_run(root, stage=2, epochs_stage2=1, **SMALL)
    assert s2.returncode == 0, s2.stdout[-3000:] + s2.stderr[-3000:]
    return root, s1, s2


def test_both_stages_train_and_hand_over(trained):
    root, s1, s2 = trained
    models = root / "models"
    assert (models / "model_stage1.pt").is_file() and (models / "model.pt").is_file()
    assert "Restored all variables from" in s2.stdout + s2.stderr  # stage 2 starts from stage 1
    stage1 = json.loads((root / "runs" / "stage1" / "metrics.json").read_text())
    stage2 = json.loads((root / "runs" / "stage2" / "metrics.json").read_text())
    assert len(stage1["loss"]) == 12 and len(stage2["loss"]) == 4
    assert stage1["epoch"] == [1, 2, 3] and len(stage1["metrics"]["val_mean_dice"]) == 3
    # learning happened in stage 1 (L_cc from random weights falls quickly at lr 1e-2)
    assert np.mean(stage1["loss"][-4:]) < np.mean(stage1["loss"][:4])
    # stage 2 starts where stage 1 ended, not from scratch
    assert stage2["loss"][0] < stage1["loss"][0]
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
    assert list((root / "runs" / "stage2").glob("events.out.tfevents.*"))  # TensorBoard by default


def test_inference_and_evaluation_land_on_the_input_grid(trained):
    root, _, _ = trained
    r = bundle_run(root, configs=("inference.json", "evaluate.json"), num_samples=2,
                   **{k: SMALL[k] for k in ("pixdim", "spatial_size")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ds = load_dataset(root / "data" / "cardiac2d")
    cases = ds.datalist("test")
    assert len(cases) == 2  # ED and ES of one test subject
    for case in cases:
        pred = root / "eval" / "pred" / f"{case['case']}_seg.nii.gz"
        img, out = nib.load(case["image"]), nib.load(str(pred))
        assert out.shape == img.shape == (32, 32)  # back on the original 1.37 mm grid, 2D, no channel
        np.testing.assert_allclose(out.affine, img.affine, atol=1e-4)
        values = np.unique(np.asarray(out.dataobj))
        assert values.min() >= 0 and values.max() < ds.num_classes
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == 2 and set(summary["per_class"]) == {"LV", "MYO", "RV"}
    assert (root / "eval" / "metrics.csv").is_file()
    assert "mean over classes" in r.stdout


def test_stage2_without_stage1_names_the_missing_checkpoint(tmp_path):
    ensure_dataset(tmp_path / "data" / "cardiac2d", "cardiac2d", **DATA)
    r = bundle_run(tmp_path, stage=2, epochs_stage2=1, **SMALL)
    assert r.returncode != 0
    assert "model_stage1.pt does not exist" in r.stderr and "run stage 1 first" in r.stderr


def test_a_slice_saved_as_hw1_is_segmented_as_the_same_slice_and_a_volume_is_refused(trained, tmp_path):
    root, _, _ = trained
    case = load_dataset(root / "data" / "cardiac2d").datalist("test")[0]
    img = nib.load(case["image"])
    hw1 = tmp_path / "slice_hw1.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine), str(hw1))
    out = tmp_path / "pred"
    r = bundle_run(root, configs=("inference.json",), num_samples=1, output_dir=str(out),
                   datalist=[{"image": case["image"]}, {"image": str(hw1)}, {"image": case["image"], "case": "named"}],
                   **{k: SMALL[k] for k in ("pixdim", "spatial_size")})
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
    r = bundle_run(root, configs=("inference.json",), num_samples=1, output_dir=str(tmp_path / "pred3d"),
                   datalist=[{"image": str(volume)}], **{k: SMALL[k] for k in ("pixdim", "spatial_size")})
    assert r.returncode != 0
    assert "volume.nii.gz: a 3D image of spatial shape (32, 32, 3)" in r.stdout + r.stderr
