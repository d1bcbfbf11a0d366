"""One harness for the bundle tests: each bundle's tiny data and schedule, the runs, the shared checks.

A bundle test states what differs for its bundle (a :class:`BundleSpec`) and calls the checks every
bundle must pass: both stages train and hand over, predictions land on the input grid and are
scored, a later stage without its earlier checkpoint is refused naming the file. A new method's
bundle adds one spec here and gets those tests by calling the same functions.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from partialseg.data import ensure_dataset, load_dataset
from partialseg.engines import run_bundle

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


@dataclass(frozen=True)
class BundleSpec:
    """What the shared checks need to know about one bundle.

    Attributes:
        name: folder under ``bundles/``.
        family: the synthetic benchmark ``ensure_dataset`` writes under ``<root>/data/<family>``.
        data: ``ensure_dataset`` arguments of the tiny dataset.
        small: overrides that make a run take seconds (grid, patch, iterations per epoch, ...).
        grid_keys: the keys of ``small`` that inference needs too (the training grid).
        foreground: the class names that evaluation reports.
    """

    name: str
    family: str
    data: dict[str, Any]
    small: dict[str, Any]
    grid_keys: tuple[str, ...]
    foreground: frozenset[str] = field(default_factory=frozenset)

    @property
    def path(self) -> Path:
        return BUNDLES / self.name

    @property
    def grid(self) -> dict[str, Any]:
        return {k: self.small[k] for k in self.grid_keys}

    def make_data(self, root: Path, **overrides: Any) -> Path:
        return Path(ensure_dataset(root / "data" / self.family, self.family, **{**self.data, **overrides}))

    def run(self, root: Path, configs=("train.json",), **overrides: Any) -> subprocess.CompletedProcess:
        """``python -m monai.bundle run`` on ``configs`` with ``bundle_root=root``, one thread."""
        return run_bundle(self.path, root, configs, threads=1, timeout=600, **overrides)

    def train(self, root: Path, epochs_stage1: int = 3, epochs_stage2: int = 1, **overrides: Any):
        """Stage 1 then stage 2 on the tiny data (written first); both must succeed."""
        self.make_data(root)
        s1 = assert_ok(self.run(root, stage=1, epochs_stage1=epochs_stage1, **self.small, **overrides))
        s2 = assert_ok(self.run(root, stage=2, epochs_stage2=epochs_stage2, **self.small, **overrides))
        return s1, s2

    def train_once(self, root: Path, epochs: int = 3, **overrides: Any) -> subprocess.CompletedProcess:
        """One training run (a single-stage bundle, ``epochs`` epochs) on the tiny data (written first); it must succeed."""
        self.make_data(root)
        return assert_ok(self.run(root, epochs=epochs, **self.small, **overrides))

    def dataset(self, root: Path):
        return load_dataset(root / "data" / self.family)


MARGINAL = BundleSpec(
    name="marginal_exclusion_abdomen",
    family="abdomen3d",
    data={"size": 24, "num_train": 1, "num_full": 2, "num_test": 2, "num_val": 1},
    # a coarse grid keeps every run to seconds: about 16 x 16 x 12 voxels after resampling
    small={"pixdim": [18.0, 18.0, 16.0], "patch_size": [16, 16, 8], "iterations_per_epoch": 4, "val_interval": 1},
    grid_keys=("pixdim", "patch_size"),
    foreground=frozenset({"liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach"}),
)

DCL = BundleSpec(
    name="dcl_cardiac",
    family="cardiac2d",
    data={"size": 32, "num_train": 2, "num_test": 1, "num_val": 1, "variant": "wholeheart"},
    # 32 x 32 slices resampled to 1.8 mm (25 x 25) and padded to 32 x 32: the inverse must undo both
    small={"pixdim": [1.8, 1.8], "spatial_size": [32, 32], "iterations_per_epoch": 4, "val_interval": 1, "batch_size": 4},
    grid_keys=("pixdim", "spatial_size"),
    foreground=frozenset({"LV", "MYO", "RV"}),
)

DTML = BundleSpec(
    name="dtml_atrium",
    family="atrium3d",
    # 24^3 voxels of 4 x 4 x 3 mm: 2 labelled + 2 unlabelled training volumes, 2 labelled test volumes
    data={"size": 24, "num_train": 4, "num_test": 2, "labelled_fraction": 0.5},
    # resampled to 4.5 x 4.5 x 3.5 mm (the inverse must undo it); a 3-level UNet of 4-16 channels
    small={"pixdim": [4.5, 4.5, 3.5], "patch_size": [16, 16, 16], "network_def#channels": [4, 8, 16],
           "network_def#strides": [2, 2], "iterations_per_epoch": 6, "progress": False},
    grid_keys=("pixdim", "patch_size", "network_def#channels", "network_def#strides"),
    foreground=frozenset({"left_atrium"}),
)


def assert_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result`` if its process exited 0, else a failure that shows the ends of its output."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def trained_fixture(spec: BundleSpec):
    """A module-scoped fixture: ``(root, stage1, stage2)`` after :meth:`BundleSpec.train`."""

    @pytest.fixture(scope="module")
    def trained(tmp_path_factory):
        root = tmp_path_factory.mktemp(spec.name)
        return (root, *spec.train(root))

    return trained


def check_stages_hand_over(root: Path, s1, s2, epochs_stage1: int = 3, epochs_stage2: int = 1, iterations: int = 4) -> None:
    """Both checkpoints written, stage 2 restored stage 1, losses recorded, learning happened."""
    models = root / "models"
    assert (models / "model_stage1.pt").is_file() and (models / "model.pt").is_file()
    assert "Restored all variables from" in s2.stdout + s2.stderr  # stage 2 starts from stage 1
    stage1 = json.loads((root / "runs" / "stage1" / "metrics.json").read_text())
    stage2 = json.loads((root / "runs" / "stage2" / "metrics.json").read_text())
    assert len(stage1["loss"]) == epochs_stage1 * iterations and len(stage2["loss"]) == epochs_stage2 * iterations
    assert stage1["epoch"] == list(range(1, epochs_stage1 + 1))
    assert len(stage1["metrics"]["val_mean_dice"]) == epochs_stage1
    # learning happened in stage 1 (the loss from random weights falls quickly)
    assert np.mean(stage1["loss"][-iterations:]) < np.mean(stage1["loss"][:iterations])
    # stage 2 starts where stage 1 ended, not from scratch
    assert stage2["loss"][0] < stage1["loss"][0]
    assert list((root / "runs" / "stage2").glob("events.out.tfevents.*"))  # TensorBoard by default


def check_inference_and_evaluation(spec: BundleSpec, root: Path, num_cases: int, **overrides: Any):
    """Inference + evaluation through the bundle: every test prediction on its image's grid, scored.

    Returns the test cases and the evaluation run's result, for bundle-specific checks.
    """
    r = assert_ok(spec.run(root, configs=("inference.json", "evaluate.json"), **overrides, **spec.grid))
    ds = spec.dataset(root)
    cases = ds.datalist("test")
    assert len(cases) == num_cases
    for case in cases:
        pred = root / "eval" / "pred" / f"{case['case']}_seg.nii.gz"
        img, out = nib.load(case["image"]), nib.load(str(pred))
        assert out.shape == img.shape  # back on the original grid, no channel
        np.testing.assert_allclose(out.affine, img.affine, atol=1e-4)
        values = np.unique(np.asarray(out.dataobj))
        assert values.min() >= 0 and values.max() < ds.num_classes
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == num_cases and set(summary["per_class"]) == set(spec.foreground)
    assert (root / "eval" / "metrics.csv").is_file()
    assert "mean over classes" in r.stdout
    return cases, r


def check_stage2_needs_stage1(spec: BundleSpec, root: Path) -> subprocess.CompletedProcess:
    """Stage 2 without a stage-1 checkpoint fails naming the missing file and what to run."""
    spec.make_data(root)
    r = spec.run(root, stage=2, epochs_stage2=1, **spec.small)
    assert r.returncode != 0
    assert "model_stage1.pt does not exist" in r.stderr and "run stage 1 first" in r.stderr
    return r
