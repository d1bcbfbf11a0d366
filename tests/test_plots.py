"""Figures: training curves from MetricsRecorder files, image / reference / prediction overlays."""

from __future__ import annotations

import json

import numpy as np
import pytest

from partialseg.plots import plot_overlays, plot_training_curves

from conftest import save_nifti


def test_training_curves_from_two_stages(tmp_path):
    for name, n in (("s1", 30), ("s2", 20)):
        data = {"iteration": list(range(1, n + 1)), "loss": list(np.linspace(2, 0.1, n)), "epoch": [1, 2],
                "metrics": {"val_mean_dice": [0.4, 0.6]}, "epoch_length": n // 2}
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    out = plot_training_curves({"stage 1": tmp_path / "s1.json", "stage 2": tmp_path / "s2.json"}, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overlays_and_grid_mismatch(tmp_path):
    img = np.random.default_rng(0).normal(size=(12, 10, 6)).astype(np.float32)
    lab = np.zeros((12, 10, 6), np.uint8)
    lab[2:6, 2:6, 2:4] = 1
    paths = [save_nifti(tmp_path / f"{n}.nii.gz", a) for n, a in (("img", img), ("ref", lab), ("pred", np.roll(lab, 1, 0)))]
    out = plot_overlays([("case", *paths)], tmp_path / "o.png", num_classes=2, window=None, slices=2)
    assert out.stat().st_size > 1000
    bad = save_nifti(tmp_path / "bad.nii.gz", lab[:, :, :5])
    with pytest.raises(ValueError, match="case 'case'"):
        plot_overlays([("case", paths[0], paths[1], bad)], tmp_path / "x.png", num_classes=2)


def test_overlays_show_the_labelled_slice_and_take_2d_slices(tmp_path, monkeypatch):
    import partialseg.data.synthetic._common as common

    shown = []
    monkeypatch.setattr(common, "write_preview", lambda path, panels, *a, **k: shown.extend(t for _, _, t in panels[::3]))
    img = np.zeros((12, 10, 12), np.float32)
    lab = np.zeros((12, 10, 12), np.uint8)
    lab[2:6, 2:6, 6] = 1  # only slice 6 is labelled
    paths = [save_nifti(tmp_path / f"{n}.nii.gz", a) for n, a in (("img", img), ("ref", lab), ("pred", lab))]
    plot_overlays([("v", *paths)], tmp_path / "o.png", num_classes=2, window=None)  # default: one slice
    assert shown == ["v z=6"]  # was z=2: linspace(-4, 4, 1) is [-4]
    shown.clear()
    plot_overlays([("v", *paths)], tmp_path / "o.png", num_classes=2, window=None, slices=3)
    assert shown == ["v z=2", "v z=6", "v z=10"]
    # 2D slices, (H, W) or (H, W, 1) as the DCL bundle reads and writes them
    flat = [save_nifti(tmp_path / f"{n}2d.nii.gz", a) for n, a in (("img", img[:, :, 6]), ("ref", lab[:, :, 6:7]), ("pred", lab[:, :, 6]))]
    shown.clear()
    plot_overlays([("s", *flat)], tmp_path / "s.png", num_classes=2, window=None)
    assert shown == ["s z=0"]
