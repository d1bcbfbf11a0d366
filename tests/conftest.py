"""Shared test helpers: tiny NIfTI datasets written to disk."""

from __future__ import annotations

import os

# `make test` runs two pytest workers on two cores: one thread each, also in the bundle / torchrun /
# MONAI Label processes the tests start (oversubscribed torch threads slow everything several-fold)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def tiny_dataset(tmp_path):
    """A 3-class (background, liver, spleen) dataset: one full case, one spleen-only, one unlabelled."""

    def make(training=None, label_maps=None, classes=("background", "liver", "spleen"), **arrays):
        img = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
        full = np.zeros((6, 5, 4), np.uint8)
        full[1:3, 1:3, 1:3] = 1
        full[4:6, 2:4, 1:3] = 2
        save_nifti(tmp_path / "imagesTr/full.nii.gz", arrays.get("full_image", img))
        save_nifti(tmp_path / "labelsTr/full.nii.gz", arrays.get("full_label", full))
        save_nifti(tmp_path / "imagesTr/spl.nii.gz", img)
        save_nifti(tmp_path / "labelsTr/spl.nii.gz", arrays.get("spl_label", (full == 2).astype(np.uint8)))
        save_nifti(tmp_path / "imagesTr/unl.nii.gz", img)
        desc = {
            "name": "tiny",
            "classes": list(classes),
            "training": training
            or [
                {"image": "imagesTr/full.nii.gz", "label": "labelsTr/full.nii.gz", "annotated": "all", "source": "full"},
                {"image": "imagesTr/spl.nii.gz", "label": "labelsTr/spl.nii.gz", "annotated": ["spleen"], "source": "spl"},
                {"image": "imagesTr/unl.nii.gz"},
            ],
        }
        if label_maps is not None:
            desc["label_maps"] = label_maps
        (tmp_path / "dataset.json").write_text(json.dumps(desc))
        return tmp_path

    return make
