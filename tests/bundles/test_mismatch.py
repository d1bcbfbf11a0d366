"""No silent mismatch: a bundle whose settings do not fit the dataset is refused before training.

Each run goes through the real bundle (``python -m monai.bundle run``) on the tiny data of
``tests/bundle_harness.py`` and must fail at the datalist, naming the value, the dataset and the
flag that changes it, before any checkpoint is written. Before these checks, a 7-class network on
4-class data trained, exited 0 and failed only at inference; a ``full_sources`` naming no source
stopped stage 1 with an error that named no flag.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bundle_harness import DCL, MARGINAL, BundleSpec

pytestmark = pytest.mark.slow

#: one epoch of one iteration: a run that got past the datalist would finish (exit 0) in seconds
SHORT = {"iterations_per_epoch": 1, "val_interval": 1}


def refused(spec: BundleSpec, root: Path, configs=("train.json",), **overrides) -> str:
    """The stderr of a run of ``spec`` that must fail before any checkpoint or run output is written."""
    r = spec.run(root, configs=configs, **{**spec.small, **SHORT, **overrides})
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not list(root.glob("models/*.pt")) and not list(root.glob("runs/*/checkpoint.pt"))
    return r.stderr


def test_marginal_network_with_other_classes_is_refused_before_training(tmp_path):
    data = MARGINAL.make_data(tmp_path)
    err = refused(MARGINAL, tmp_path, stage=1, epochs_stage1=1, num_classes=4)
    assert "num_classes 4" in err and str(data / "dataset.json") in err and "--num_classes 7" in err
    assert "'liver', 'spleen', 'kidney_left'" in err  # the classes, by name


def test_dcl_network_with_other_classes_is_refused_before_training(tmp_path):
    data = DCL.make_data(tmp_path)
    err = refused(DCL, tmp_path, stage=1, epochs_stage1=1, num_classes=7)
    assert "num_classes 7" in err and str(data / "dataset.json") in err and "--num_classes 4" in err
    assert "'LV', 'MYO', 'RV'" in err


def test_inference_with_other_classes_is_refused(tmp_path):
    # the dataset's classes are known at inference too: the network is refused before any prediction
    data = MARGINAL.make_data(tmp_path)
    err = refused(MARGINAL, tmp_path, configs=("inference.json",), num_classes=4, **MARGINAL.grid)
    assert "num_classes 4" in err and str(data / "dataset.json") in err and "--num_classes 7" in err
    assert not (tmp_path / "eval" / "pred").is_dir() or not list((tmp_path / "eval" / "pred").iterdir())


def test_marginal_full_sources_naming_no_source_is_refused(tmp_path):
    # the README's real-data flow names the BTCV source "btcv"; here the dataset's full source is "full"
    data = MARGINAL.make_data(tmp_path)
    err = refused(MARGINAL, tmp_path, stage=1, epochs_stage1=1, full_sources=["btcv"])
    assert "full_sources ['btcv']" in err and str(data / "dataset.json") in err
    assert "'kidney'" in err  # the sources the dataset has
    assert """--full_sources "['full']\"""" in err  # the flag, with its only fully labelled source
