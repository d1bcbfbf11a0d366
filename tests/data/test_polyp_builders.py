"""``partialseg build-datalist`` polyp layouts (Kvasir-SEG, CVC-ClinicDB) and the weak-mask recipe, on fake folders of real image files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from partialseg.data import load_dataset, validate_dataset
from partialseg.data.builders import build_datalist
from partialseg.data.builders.polyp import WEAK_KINDS, weak_mask


def _frame(rng, size=(40, 48)):
    """An RGB frame and a 0/255 mask with one elliptic polyp."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    cy, cx, ry, rx = rng.integers(12, h - 12), rng.integers(12, w - 12), rng.integers(5, 9), rng.integers(5, 9)
    mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8) * 255
    image = (rng.random((h, w, 3)) * 120 + 60).astype(np.uint8)
    image[mask > 0] = [200, 90, 90]
    return image, mask


def kvasir(root: Path, n: int = 10) -> Path:
    rng = np.random.default_rng(1)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        image, mask = _frame(rng)
        Image.fromarray(image).save(root / "images" / f"cju{i:04d}.jpg", quality=90)
        Image.fromarray(mask).convert("RGB").save(root / "masks" / f"cju{i:04d}.jpg", quality=75)  # lossy RGB, as distributed
    return root


def cvc(root: Path, n: int = 8, suffix: str = ".tif") -> Path:
    rng = np.random.default_rng(2)
    for sub in ("Original", "Ground Truth"):
        (root / sub).mkdir(parents=True)
    for i in range(1, n + 1):
        image, mask = _frame(rng)
        Image.fromarray(image).save(root / "Original" / f"{i}{suffix}")
        Image.fromarray(mask).save(root / "Ground Truth" / f"{i}{suffix}")
    return root


def test_kvasir_strong_and_weak_masks_pass_check_and_keep_the_truth(tmp_path):
    src = kvasir(tmp_path / "Kvasir-SEG")
    out = tmp_path / "out" / "dataset.json"
    desc = build_datalist([("kvasir_seg", src)], out, test=2, val=1, strong=3, seed=0)
    train = desc["training"]
    assert len(train) == 7 and len(desc["test"]) == 2 and len(desc["validation"]) == 1
    strong = [c for c in train if c["supervision"] == "strong"]
    weak = [c for c in train if c["supervision"] == "weak"]
    assert len(strong) == 3 and len(weak) == 4
    # the kinds are drawn in turn from a shuffled cycle: 4 weak masks, 4 different kinds of the 5
    assert len({c["weak_type"] for c in weak}) == 4 and {c["weak_type"] for c in weak} <= set(WEAK_KINDS)
    ds = load_dataset(out)
    for c in ds.splits["training"]:
        true = np.asarray(Image.open(c["label_true"] if c["supervision"] == "weak" else c["label"]))
        assert set(np.unique(true)) == {0, 1}  # the lossy 0/255 JPG binarised to class indices
        if c["supervision"] == "weak":
            assert Path(c["label"]).parent.name == "weak" and Path(c["label_true"]).parent.name == "masks"
            w = np.asarray(Image.open(c["label"]))
            assert w.shape == true.shape and set(np.unique(w)) <= {0, 1}
            assert not np.array_equal(w, true)  # every kind changes a mask that has a polyp
    for split in ("validation", "test"):  # held-out frames keep their true mask, no weak key
        assert all("supervision" not in c and Path(c["label"]).parent.name == "masks" for c in desc[split])
    report = validate_dataset(out, channels=3)
    assert report.ok, report.problems
    assert "supervision: 3 strong, 4 weak" in report.format()
    # the same arguments give the same files
    again = build_datalist([("kvasir_seg", src)], tmp_path / "again" / "dataset.json", test=2, val=1, strong=3, seed=0)
    assert [(c["case"], c.get("weak_type")) for c in again["training"]] == [(c["case"], c.get("weak_type")) for c in train]
    for a, b in zip(desc["training"], again["training"]):
        assert np.array_equal(np.asarray(Image.open(out.parent / a["label"])), np.asarray(Image.open(tmp_path / "again" / b["label"])))


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_cvc_clinicdb_tif_or_png(tmp_path, suffix):
    src = cvc(tmp_path / "CVC-ClinicDB", suffix=suffix)
    out = tmp_path / "out" / "dataset.json"
    desc = build_datalist([("cvc_clinicdb", src)], out, strong=0.5, weak_kinds=["ellipse", "missing"], seed=3)
    train = desc["training"]
    assert len(train) == 8 and sum(c["supervision"] == "strong" for c in train) == 4
    assert sorted(c["weak_type"] for c in train if c["supervision"] == "weak") == ["ellipse", "ellipse", "missing", "missing"]
    # TIF frames are converted to PNG (the bundle's reader takes PNG / JPG); PNG frames stay in place
    folders = {Path(c["image"]).parent.name for c in train}
    assert folders == ({"images"} if suffix == ".tif" else {"Original"})
    assert validate_dataset(out, channels=3).ok


def test_the_cli_prints_strong_and_weak_counts(tmp_path):
    src = kvasir(tmp_path / "k", n=6)
    out = tmp_path / "o" / "dataset.json"
    r = subprocess.run([sys.executable, "-m", "partialseg", "build-datalist", "--source", f"kvasir_seg={src}", "--out", str(out),
                        "--strong", "2", "--test", "1", "--weak-kinds", "shifted", "dilated"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "5 training frames (2 strong, 3 weak: " in r.stdout and "0 validation, 1 test" in r.stdout
    assert {c["weak_type"] for c in json.loads(out.read_text())["training"] if "weak_type" in c} == {"shifted", "dilated"}


def test_bad_folders_and_options_are_named(tmp_path):
    src = kvasir(tmp_path / "k", n=4)
    out = tmp_path / "o" / "dataset.json"
    (src / "masks" / "cju0002.jpg").unlink()
    with pytest.raises(ValueError, match=r"cju0002\.jpg has no mask in .*masks"):
        build_datalist([("kvasir_seg", src)], out, strong=1)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(src / "masks" / "cju0002.png")
    with pytest.raises(ValueError, match=r"case 'cju0002': image .*cju0002\.jpg is 48 x 40 but its mask .*cju0002\.png is 10 x 10"):
        build_datalist([("kvasir_seg", src)], out, strong=1)
    with pytest.raises(FileNotFoundError, match="no Original/ folder; a cvc_clinicdb folder holds Original/ and Ground Truth/"):
        build_datalist([("cvc_clinicdb", src)], out)
    with pytest.raises(ValueError, match="--weak-kinds must be one of .*got 'elipse'. Did you mean 'ellipse'"):
        build_datalist([("kvasir_seg", src)], out, strong=1, weak_kinds=["elipse"])
    with pytest.raises(ValueError, match="--strong 9: .* only 4 training frames"):
        build_datalist([("kvasir_seg", src)], out, strong=9)


def test_weak_mask_kinds_on_a_disc():
    """Hand-checkable properties of each kind on a disc of radius 8 (equivalent radius 8)."""
    yy, xx = np.mgrid[:40, :40]
    disc = (((yy - 20) ** 2 + (xx - 20) ** 2) <= 64).astype(np.uint8)
    rng = np.random.default_rng(0)
    dil, ero = weak_mask(disc, "dilated", rng), weak_mask(disc, "eroded", rng)
    assert dil.sum() > disc.sum() and (dil >= disc).all()  # a superset
    assert 0 < ero.sum() < disc.sum() and (ero <= disc).all()  # a subset
    sh = weak_mask(disc, "shifted", rng)
    assert sh.sum() == disc.sum() and not np.array_equal(sh, disc)  # moved, not cut (inside the frame)
    ys, xs = np.nonzero(sh)
    shift = np.hypot(ys.mean() - 20, xs.mean() - 20)
    assert 0.3 * 8 - 1 <= shift <= 0.6 * 8 + 1
    el = weak_mask(disc, "ellipse", rng)  # the moment ellipse of a disc is the disc, axes scaled by 0.9-1.3
    assert 0.75 * disc.sum() <= el.sum() <= 1.75 * disc.sum() and el[20, 20] == 1
    assert weak_mask(disc, "missing", rng).sum() == 0
    assert weak_mask(np.zeros((8, 8)), "dilated", rng).sum() == 0  # no polyp: empty whatever the kind
