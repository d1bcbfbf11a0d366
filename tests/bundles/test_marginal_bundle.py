"""The marginal + exclusion bundle through ``python -m monai.bundle run``: both stages, inference, evaluation.

Tiny data (the synthetic abdomen at a coarse spacing) and a few iterations: these tests check the
configs, the hand-over between the stages and that predictions land on the input's grid; the
demo (``make demo``) and ``benchmarks/marginal_ablation.py`` measure accuracy.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from partialseg.data import ensure_dataset, load_dataset
from partialseg.engines import run_bundle

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "marginal_exclusion_abdomen"
#: a coarse grid keeps every run to seconds: about 16 x 16 x 12 voxels after resampling
SMALL = {"pixdim": [18.0, 18.0, 16.0], "patch_size": [16, 16, 8], "iterations_per_epoch": 4, "val_interval": 1}

pytestmark = pytest.mark.slow


def bundle_run(root: Path, configs=("train.json",), **overrides) -> subprocess.CompletedProcess:
    return run_bundle(BUNDLE, root, configs, threads=1, timeout=600, **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 1 then stage 2 on tiny data, through the monai.bundle CLI."""
    root = tmp_path_factory.mktemp("marginal_bundle")
    ensure_dataset(root / "data" / "abdomen3d", "abdomen3d", size=24, num_train=1, num_full=2, num_test=2, num_val=1)
    s1 = bundle_run(root, stage=1, epochs_stage1=3, **SMALL)
    assert s1.returncode == 0, s1.stdout[-3000:] + s1.stderr[-3000:]
    s2 = bundle_run(root, stage=2, epochs_stage2=1, **SMALL)
    assert s2.returncode == 0, s2.stdout[-3000:] + s2.stderr[-3000:]
    return root, s1, s2


def test_both_stages_train_and_hand_over(trained):
    root, s1, s2 = trained
    assert (root / "models" / "model_stage1.pt").is_file() and (root / "models" / "model.pt").is_file()
    assert "Restored all variables from" in s2.stdout + s2.stderr  # stage 2 starts from stage 1
    stage1 = json.loads((root / "runs" / "stage1" / "metrics.json").read_text())
    stage2 = json.loads((root / "runs" / "stage2" / "metrics.json").read_text())
    assert len(stage1["loss"]) == 12 and len(stage2["loss"]) == 4
    assert stage1["epoch"] == [1, 2, 3] and len(stage1["metrics"]["val_mean_dice"]) == 3
    # learning happened in stage 1 (Dice + CE from random weights falls quickly)
    assert np.mean(stage1["loss"][-4:]) < np.mean(stage1["loss"][:4])
    # stage 2 starts where stage 1 ended, not from scratch
    assert stage2["loss"][0] < stage1["loss"][0]
    assert list((root / "runs" / "stage2").glob("events.out.tfevents.*"))  # TensorBoard by default


def test_inference_and_evaluation_land_on_the_input_grid(trained):
    root, _, _ = trained
    r = bundle_run(root, configs=("inference.json", "evaluate.json"), **{k: SMALL[k] for k in ("pixdim", "patch_size")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ds = load_dataset(root / "data" / "abdomen3d")
    for case in ds.datalist("test"):
        pred = root / "eval" / "pred" / f"{case['case']}_seg.nii.gz"
        img, out = nib.load(case["image"]), nib.load(str(pred))
        assert out.shape == img.shape  # back on the original grid (3D, no channel)
        np.testing.assert_allclose(out.affine, img.affine, atol=1e-4)  # LPS-stored input, RAS inside
        values = np.unique(np.asarray(out.dataobj))
        assert values.min() >= 0 and values.max() < ds.num_classes
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == 2 and set(summary["per_class"]) == set(ds.classes[1:])
    assert (root / "eval" / "metrics.csv").is_file() and (root / "eval" / "boxplot.png").is_file()
    assert "mean over classes" in r.stdout


def test_stage2_without_stage1_names_the_missing_checkpoint(tmp_path):
    ensure_dataset(tmp_path / "data" / "abdomen3d", "abdomen3d", size=24, num_train=1, num_full=1, num_test=1, num_val=1)
    r = bundle_run(tmp_path, stage=2, epochs_stage2=1, **SMALL)
    assert r.returncode != 0
    assert "model_stage1.pt does not exist" in r.stderr and "run stage 1 first" in r.stderr
    # `--init_from_stage1 false` on the command line (fire passes the string "false") trains from scratch
    r = bundle_run(tmp_path, stage=2, epochs_stage2=1, init_from_stage1="false", **SMALL)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file() and "Restored all variables" not in r.stdout + r.stderr


def test_sampling_option_picks_the_training_sampler(tmp_path):
    # the config alone (no training): "source" balances the union's sources (the paper's "patches
    # from each training dataset"), "case" keeps the shuffled loader, anything else is refused
    from monai.bundle import ConfigParser

    from partialseg.data import SourceBalancedSampler

    ensure_dataset(tmp_path / "data" / "abdomen3d", "abdomen3d", size=24, num_train=2, num_full=1, num_test=1, num_val=1)

    def parsed(key, **overrides):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / "train.json")])
        parser.update({"bundle_root": str(tmp_path), **overrides})
        return parser.get_parsed_content(key)

    sampler = parsed("train#sampler", sampling="source")
    datalist = parsed("train#datalist")
    assert isinstance(sampler, SourceBalancedSampler)
    counts = {s: sum(c["source"] == s for c in datalist) for s in {c["source"] for c in datalist}}
    assert sampler.counts() == dict(sorted(counts.items())) and len(counts) >= 3
    assert len(sampler) == len(counts) * max(counts.values())
    assert parsed("train#sampler", sampling="case") is None
    assert parsed("train#dataloader", sampling="case").sampler.__class__.__name__ == "RandomSampler"
    assert parsed("train#dataloader", sampling="source").sampler.__class__ is SourceBalancedSampler
    with pytest.raises(Exception) as err:  # monai.bundle wraps the error; the cause names the options
        parsed("train#sampler", sampling="organ")
    assert "sampling must be one of ('case', 'source')" in str(err.value.__cause__)
