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


def _permuted_copy(data: Path, dest: Path) -> Path:
    """The dataset at ``data`` with two classes' names swapped (``liver`` <-> ``spleen``): the same
    images and labels, whose value 1 now means spleen, as a model of another class order would see."""
    import json
    import shutil

    shutil.copytree(data, dest)
    desc = json.loads((dest / "dataset.json").read_text())
    a, b = desc["classes"].index("liver"), desc["classes"].index("spleen")
    desc["classes"][a], desc["classes"][b] = desc["classes"][b], desc["classes"][a]
    (dest / "dataset.json").write_text(json.dumps(desc))
    return dest


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A stage-1 marginal model trained on the tiny data (its class names stored in the checkpoint)."""
    from bundle_harness import assert_ok

    root = tmp_path_factory.mktemp("stage1")
    MARGINAL.make_data(root)
    assert_ok(MARGINAL.run(root, stage=1, epochs_stage1=1, **{**MARGINAL.small, **SHORT}))
    return root


def test_checkpoint_stores_its_class_names(stage1):
    import torch

    from partialseg.engines import checkpoint_classes

    ckpt = stage1 / "models" / "model_stage1.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # still a plain state dict (ckpt_export, MONAI Label)
    assert checkpoint_classes(ckpt) == ["background", "liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach"]


def test_inference_with_a_checkpoint_of_other_classes_is_refused(stage1, tmp_path):
    # same number of classes (the network fits), other names: before, this ran and wrote spleen as liver
    other = _permuted_copy(MARGINAL.make_data(tmp_path / "src"), tmp_path / "other")
    ckpt = stage1 / "models" / "model_stage1.pt"
    root = tmp_path / "run"
    err = refused(MARGINAL, root, configs=("inference.json", "evaluate.json"), checkpoint=str(ckpt), dataset_dir=str(other), **MARGINAL.grid)
    assert f"checkpoint {ckpt} was trained on classes ['background', 'liver', 'spleen'," in err
    assert f"the dataset {other} lists ['background', 'spleen', 'liver'," in err
    assert "--checkpoint PATH" in err and "--dataset_dir" in err
    assert not (root / "eval").is_dir() or not list((root / "eval").rglob("*.nii.gz"))


def test_stage2_from_a_stage1_of_other_classes_is_refused(stage1, tmp_path):
    other = _permuted_copy(MARGINAL.make_data(tmp_path / "src"), tmp_path / "other")
    ckpt = stage1 / "models" / "model_stage1.pt"
    err = refused(MARGINAL, tmp_path / "run", stage=2, epochs_stage2=1, stage1_ckpt=str(ckpt), dataset_dir=str(other))
    assert f"checkpoint {ckpt} was trained on classes ['background', 'liver'," in err and "lists ['background', 'spleen'," in err
    assert "--stage1_ckpt PATH" in err and "--init_from_stage1 false" in err


def test_a_checkpoint_without_class_names_still_loads_with_a_note(stage1, tmp_path):
    import torch

    from bundle_harness import assert_ok

    old = tmp_path / "old.pt"
    torch.save(dict(torch.load(stage1 / "models" / "model_stage1.pt", weights_only=True)), old)  # as saved before names
    data = MARGINAL.make_data(tmp_path)
    r = assert_ok(MARGINAL.run(tmp_path, configs=("inference.json",), checkpoint=str(old), dataset_dir=str(data), progress=False,
                               **MARGINAL.grid))  # fmt: skip
    assert f"checkpoint {old} stores no class names" in r.stderr
    assert len(list((tmp_path / "eval" / "pred").glob("*.nii.gz"))) == MARGINAL.data["num_test"]
