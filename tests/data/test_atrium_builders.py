"""build-datalist: the 2018 Atrial Segmentation Challenge and MSD Task02_Heart folders -> one
valid dataset, with the DTML paper's labelled / unlabelled split."""

from __future__ import annotations

import json

import nrrd
import numpy as np
import pytest

from partialseg.cli import main
from partialseg.data import load_dataset, validate_dataset
from partialseg.data.builders import build_datalist
from partialseg.data.builders.atrium import labelled_count

from conftest import save_nifti

SHAPE = (8, 7, 5)
NRRD_HEADER = {"space": "left-posterior-superior", "space directions": np.diag([0.625, 0.625, 2.5]),
               "space origin": np.zeros(3)}


def _lasc(root, ids, without_label=()):
    """Challenge layout: <id>/lgemri.nrrd (uint8 MRI) + <id>/laendo.nrrd (0 / 255)."""
    rng = np.random.default_rng(0)
    for i, case in enumerate(ids):
        lab = np.zeros(SHAPE, np.uint8)
        lab[2:5, 2:5, 1:3 + i % 2] = 255
        (root / case).mkdir(parents=True)
        nrrd.write(str(root / case / "lgemri.nrrd"), rng.integers(0, 255, SHAPE).astype(np.uint8), NRRD_HEADER)
        if case not in without_label:
            nrrd.write(str(root / case / "laendo.nrrd"), lab, NRRD_HEADER)
    return root


def _msd_heart(root, n_train=5, n_test=2):
    affine = np.diag([1.25, 1.25, 1.37, 1.0])
    training = []
    for i in range(n_train):
        lab = np.zeros(SHAPE, np.uint8)
        lab[1:4, 2:6, 1:4] = 1
        save_nifti(root / f"imagesTr/la_{i:03d}.nii.gz", np.zeros(SHAPE, np.float32), affine)
        save_nifti(root / f"labelsTr/la_{i:03d}.nii.gz", lab, affine)
        training.append({"image": f"./imagesTr/la_{i:03d}.nii.gz", "label": f"./labelsTr/la_{i:03d}.nii.gz"})
    test = []
    for i in range(n_test):
        save_nifti(root / f"imagesTs/la_{100 + i:03d}.nii.gz", np.zeros(SHAPE, np.float32), affine)
        test.append(f"./imagesTs/la_{100 + i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "LeftAtrium", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"},
        "numTraining": n_train, "numTest": n_test, "training": training, "test": test,
    }))
    return root


def test_lasc2018_split_labelled_unlabelled_and_check(tmp_path, capsys):
    ids = [f"CASE{i:02d}" for i in range(10)]
    src = _lasc(tmp_path / "AtriaSeg2018" / "Training Set", ids, without_label=("CASE03",))
    out = tmp_path / "la" / "dataset.json"
    # 9 labelled cases: the last 2 -> test, 1 before -> validation; 6 training, 0.5 of them keep labels
    assert main(["build-datalist", "--source", f"lasc2018={src.parent}", "--out", str(out),
                 "--test", "2", "--val", "1", "--labelled", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "7 training cases (3 labelled, 4 unlabelled), 1 validation, 2 test" in printed, printed
    desc = json.loads(out.read_text())
    assert desc["classes"] == ["background", "left_atrium"]
    assert desc["label_maps"] == {"lasc2018": {"255": "left_atrium"}}
    labelled_ids = [i for i in ids if i != "CASE03"]
    assert [c["case"] for c in desc["test"]] == labelled_ids[-2:]
    assert [c["case"] for c in desc["validation"]] == labelled_ids[-3:-2]
    train = desc["training"]
    # the first 3 (sorted) keep their label; the next 3 lose it; CASE03 (no laendo.nrrd) is an image only
    assert [(c["case"], "label" in c) for c in train] == [
        ("CASE00", True), ("CASE01", True), ("CASE02", True),
        ("CASE04", False), ("CASE05", False), ("CASE06", False), ("CASE03", False)]
    assert all(c["annotated"] == "all" for c in train[:3]) and not any("annotated" in c for c in train[3:])
    assert train[0]["image"] == "../AtriaSeg2018/Training Set/CASE00/lgemri.nrrd" and train[0]["modality"] == "MR"
    # the dataset passes partialseg check: NRRD grids equal, 255 explained by the label map
    report = validate_dataset(out)
    assert report.ok, report.problems
    assert main(["check", str(out.parent)]) == 0
    ds = load_dataset(out)
    assert ds.datalist("training")[0]["annotated"] == [0, 1]


def test_msd_heart_with_its_test_images_unlabelled(tmp_path):
    src = _msd_heart(tmp_path / "Task02_Heart")
    out = tmp_path / "msd" / "dataset.json"
    desc = build_datalist([("msd_heart", src)], out, test=1, labelled=2)
    assert desc["label_maps"] == {"msd_heart": {"1": "left_atrium"}}
    assert [c["image"] for c in desc["test"]] == ["../Task02_Heart/imagesTr/la_004.nii.gz"]
    # 4 labelled training cases, 2 keep their label; the 2 imagesTs images join as unlabelled
    assert [("label" in c, c["image"].split("/")[-1]) for c in desc["training"]] == [
        (True, "la_000.nii.gz"), (True, "la_001.nii.gz"), (False, "la_002.nii.gz"), (False, "la_003.nii.gz"),
        (False, "la_100.nii.gz"), (False, "la_101.nii.gz")]
    report = validate_dataset(out)
    assert report.ok, report.problems
    # the default keeps every label
    desc = build_datalist([("msd_heart", src)], out)
    assert sum("label" in c for c in desc["training"]) == 5 and "test" not in desc


def test_labelled_count_and_errors(tmp_path, capsys):
    assert labelled_count(0.2, 80) == 16 and labelled_count(16, 80) == 16 and labelled_count(0, 5) == 0
    assert labelled_count(None, 7) == 7 and labelled_count(1.0, 7) == 7
    with pytest.raises(ValueError, match="more labelled cases than the 5"):
        labelled_count(6, 5)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        labelled_count(0.0, 5)
    with pytest.raises(ValueError, match="--labelled"):
        labelled_count(1.5, 5)
    with pytest.raises(TypeError, match="--labelled must be"):
        labelled_count("16", 5)
    src = _msd_heart(tmp_path / "Task02_Heart", n_train=3, n_test=0)
    out = tmp_path / "o" / "dataset.json"
    with pytest.raises(ValueError, match=r"--val 1 and --test 2 leave none of its 3 labelled cases"):
        build_datalist([("msd_heart", src)], out, val=1, test=2)
    with pytest.raises(ValueError, match="cannot be used"):
        build_datalist([("msd_heart", src)], out, classes=["background", "liver"])
    with pytest.raises(ValueError, match="different anatomies"):
        build_datalist([("msd_heart", src), ("msd_spleen", src)], out)
    with pytest.raises(ValueError, match=r"labelled: only for the atrium layouts \['lasc2018', 'msd_heart'\]"):
        build_datalist([("msd_spleen", src)], out, labelled=2)
    with pytest.raises(FileNotFoundError, match="no <case>/lgemri.nrrd"):
        build_datalist([("lasc2018", tmp_path / "Task02_Heart")], out)
    lasc = _lasc(tmp_path / "nolabels", ["A", "B"], without_label=("A", "B"))
    with pytest.raises(ValueError, match="none of the 2 cases .* has a label"):
        build_datalist([("lasc2018", lasc)], out)
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses the value, exit status 2
        main(["build-datalist", "--source", f"msd_heart={src}", "--out", str(out), "--labelled", "two"])
    assert exit_info.value.code == 2
    assert "expected a number of cases (16) or a fraction (0.2), got 'two'" in capsys.readouterr().err
    assert not out.parent.exists()
