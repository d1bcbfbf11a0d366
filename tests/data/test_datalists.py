"""Bundle datalists: generate-when-empty, filters, the naive baseline, validation errors."""

from __future__ import annotations

import doctest
import json
import os

import numpy as np
import pytest

from partialseg.data import DatasetError, bundle_datalist, ensure_dataset

from conftest import save_nifti


def test_ensure_dataset_generates_once_and_leaves_real_data_alone(tmp_path, capsys):
    root = tmp_path / "abd"
    ensure_dataset(root, "abdomen3d", size=24, num_train=1, num_full=1, num_test=1, num_val=1)
    desc = json.loads((root / "dataset.json").read_text())
    assert [c["image"] for c in desc["validation"]] == ["imagesTr/val_000.nii.gz"]
    assert desc["validation"][0]["annotated"] == "all"
    assert "generating the synthetic abdomen3d" in capsys.readouterr().out
    stamp = (root / "dataset.json").stat().st_mtime_ns
    ensure_dataset(root, "abdomen3d", size=24)  # present: untouched
    assert (root / "dataset.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".abd-")]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert root.stat().st_mode & 0o777 == 0o777 & ~umask  # a plain folder's mode, not mkdtemp's 0o700


def test_doctests():
    import partialseg.data.datalists as module

    assert doctest.testmod(module).failed == 0


def test_ensure_dataset_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no dataset.json"):
        ensure_dataset(tmp_path, "abdomen3d")


def test_validation_split_does_not_change_other_cases(tmp_path):
    a = ensure_dataset(tmp_path / "a", "abdomen3d", size=24, num_train=1, num_full=1, num_test=1)
    b = ensure_dataset(tmp_path / "b", "abdomen3d", size=24, num_train=1, num_full=1, num_test=1, num_val=2)
    for name in ("imagesTr/liver_001.nii.gz", "labelsTs/test_000.nii.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "validation" not in json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert len(bundle_datalist(b, "validation")) == 2 and a


def test_filters_and_unknown_as_background(tiny_dataset):
    root = tiny_dataset()
    everything = bundle_datalist(root, "training")
    assert [c["case"] for c in everything] == ["full", "spl", "unl"]
    assert everything[1]["annotated"] == [2] and "label" not in everything[2]
    assert set(everything[0]) == {"image", "label", "annotated", "source", "case"}
    assert [c["case"] for c in bundle_datalist(root, "training", sources=["full"])] == ["full"]
    assert [c["case"] for c in bundle_datalist(root, "training", exclude_sources=["full"])] == ["spl", "unl"]
    naive = bundle_datalist(root, "training", unknown_as_background=True)
    assert naive[1]["annotated"] == [0, 1, 2] and naive[2]["annotated"] == []
    assert len(bundle_datalist(root, "training", limit=1)) == 1
    with pytest.raises(ValueError, match="source 'kits' has no case"):
        bundle_datalist(root, "training", sources=["kits"])
    with pytest.raises(ValueError, match="split 'validation'"):
        bundle_datalist(root, "validation")
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        bundle_datalist(root / "imagesTr", "training")


def test_num_classes_and_full_sources_must_fit_the_dataset(tiny_dataset):
    root = tiny_dataset()
    path = str(root / "dataset.json")
    assert len(bundle_datalist(root, "training", num_classes=3, full_sources=["full"])) == 3
    with pytest.raises(ValueError) as err:
        bundle_datalist(root, "training", num_classes=7)
    message = str(err.value)  # the value, the dataset, its classes by name, the flag
    assert "num_classes 7" in message and path in message and "'liver', 'spleen'" in message
    assert "--num_classes 3" in message
    with pytest.raises(TypeError, match="num_classes"):
        bundle_datalist(root, "training", num_classes=3.0)
    with pytest.raises(ValueError) as err:
        bundle_datalist(root, "training", full_sources=["btcv", "full"])
    message = str(err.value)  # only 'full' labels every class, so the hint names it alone
    assert "full_sources ['btcv', 'full']" in message and "no source 'btcv'" in message and path in message
    assert "'spl'" in message and """--full_sources "['full']\"""" in message
    with pytest.raises(ValueError, match="no source 'f'"):  # a string is one name, not its letters
        bundle_datalist(root, "training", full_sources="f")


def test_invalid_case_is_named_before_training(tiny_dataset):
    bad = np.zeros((6, 5, 4), np.uint8)
    bad[0, 0, 0] = 7  # a value no class explains
    root = tiny_dataset(spl_label=bad)
    with pytest.raises(DatasetError, match="spl"):
        bundle_datalist(root, "training")
    assert bundle_datalist(root, "training", validate=False)
    save_nifti(root / "labelsTr/spl.nii.gz", np.zeros((6, 5, 3), np.uint8))  # grid differs
    with pytest.raises(DatasetError, match="spl"):
        bundle_datalist(root, "training")


def test_concurrent_generation_shares_one_dataset(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "abd"
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda _: ensure_dataset(root, "cardiac2d", size=32, num_train=2, num_test=1), range(3)))
    assert outs == [str(root)] * 3 and (root / "dataset.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["abd"]  # no temporary folder left behind
