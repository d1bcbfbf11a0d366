"""build-datalist: BTCV, MSD and KiTS folders as downloaded -> one valid partial-label dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from partialseg.cli import main
from partialseg.data import bundle_datalist, load_dataset, validate_dataset
from partialseg.data.builders import build_datalist

from conftest import save_nifti

SHAPE = (8, 6, 4)
LPS = np.diag([-2.0, -2.0, 3.0, 1.0])


def _pair(img_path, lab_path, label):
    save_nifti(img_path, np.random.default_rng(0).normal(size=SHAPE).astype(np.float32), LPS)
    save_nifti(lab_path, label.astype(np.uint8), LPS)


def _msd(root, name, values):
    cases = []
    for i in range(2):
        lab = np.zeros(SHAPE, np.uint8)
        lab[2:4, 2:4, 1:3] = values[0]
        lab[2, 2, 1] = values[-1]  # tumour inside the organ
        _pair(root / f"imagesTr/{name}_{i}.nii.gz", root / f"labelsTr/{name}_{i}.nii.gz", lab)
        cases.append({"image": f"./imagesTr/{name}_{i}.nii.gz", "label": f"./labelsTr/{name}_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": name, "labels": {"0": "background", "1": name}, "training": cases}))
    return root


@pytest.fixture
def folders(tmp_path):
    btcv = tmp_path / "BTCV" / "RawData" / "Training"
    for i in (1, 2, 3):
        lab = np.zeros(SHAPE, np.uint8)
        lab[0:2, 0:2, 0:2] = 6   # liver
        lab[5:7, 0:2, 0:2] = 1   # spleen
        lab[3, 4, 2] = 8         # aorta: not a partialseg class -> background
        _pair(btcv / f"img/img{i:04d}.nii.gz", btcv / f"label/label{i:04d}.nii.gz", lab)
    kits = tmp_path / "kits19" / "data"
    lab = np.zeros(SHAPE, np.uint8)
    lab[0:2, 2:4, 1:3] = 1
    lab[6:8, 2:4, 1:3] = 1
    lab[0, 2, 1] = 2
    _pair(kits / "case_00000/imaging.nii.gz", kits / "case_00000/segmentation.nii.gz", lab)
    return {
        "btcv": tmp_path / "BTCV",
        "msd_liver": _msd(tmp_path / "Task03_Liver", "liver", (1, 2)),
        "msd_spleen": _msd(tmp_path / "Task09_Spleen", "spleen", (1,)),
        "kits19": kits,
    }


def test_union_is_valid_and_maps_every_source(folders, tmp_path):
    out = tmp_path / "union" / "dataset.json"
    desc = build_datalist([(k, str(v)) for k, v in folders.items()], out, val=1)
    assert len(desc["training"]) == 2 + 2 + 2 + 1 and len(desc["validation"]) == 1
    assert desc["label_maps"]["btcv"]["8"] == "background" and desc["label_maps"]["btcv"]["6"] == "liver"
    assert desc["label_maps"]["kits19"]["2"] == ["kidney_left", "kidney_right"]
    assert not any(c["image"].startswith("/") for c in desc["training"])  # relative to the output folder
    ds = load_dataset(out)
    report = validate_dataset(ds)
    assert report.ok, report.problems
    liver_case = ds.datalist("training", sources=["msd_liver"])[0]
    assert liver_case["annotated"] == [1]
    kits = bundle_datalist(out.parent, "training", sources=["kits19"])[0]
    assert kits["annotated"] == [3, 4]
    # the KiTS kidney and tumour values become left / right kidneys by world side (affine LPS)
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    from partialseg.transforms import RemapLabelsd

    d = RemapLabelsd("label")(EnsureChannelFirstd("label")(LoadImaged("label", image_only=True)(kits)))
    lab = np.asarray(d["label"][0])
    # array index 0 grows towards the patient's left (LPS): low i = right kidney
    assert set(np.unique(lab[0:2])) == {0, 4} and set(np.unique(lab[6:8])) == {0, 3}


def test_cli_and_errors(folders, tmp_path, capsys):
    out = tmp_path / "u" / "dataset.json"
    assert main(["build-datalist", "--source", f"btcv={folders['btcv']}", "--source", f"msd_spleen={folders['msd_spleen']}", "--out", str(out)]) == 0
    assert "btcv" in capsys.readouterr().out and out.is_file()
    assert main(["build-datalist", "--source", f"nope={tmp_path}", "--out", str(out)]) == 2
    assert "unknown layout 'nope'" in capsys.readouterr().err
    assert main(["build-datalist", "--source", f"btcv={folders['msd_spleen']}", "--out", str(out)]) == 2
    assert "no BTCV img/ and label/" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lacks"):
        build_datalist([("msd_spleen", folders["msd_spleen"])], out, classes=["background", "liver"])
    with pytest.raises(ValueError, match="more validation cases"):
        build_datalist([("msd_spleen", folders["msd_spleen"])], out, val=1)
    (folders["kits19"] / "case_00000" / "imaging.nii.gz").unlink()
    with pytest.raises(ValueError, match="imaging.nii.gz does not exist"):
        build_datalist([("kits19", folders["kits19"])], out)


def test_kits_cases_without_segmentation_are_unlabelled_test_images(folders, tmp_path, capsys):
    """KiTS19 as downloaded: cases 210-299 have imaging.nii.gz only. They become unlabelled test
    entries (named by their folder), counted in the output; the build does not stop."""
    kits = folders["kits19"]
    for n in (210, 211):
        save_nifti(kits / f"case_{n:05d}/imaging.nii.gz", np.zeros(SHAPE, np.float32), LPS)
    out = tmp_path / "k" / "dataset.json"
    assert main(["build-datalist", "--source", f"kits19={kits}", "--source", f"btcv={folders['btcv']}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 images without a label file kept as unlabelled test cases" in printed, printed
    desc = json.loads(out.read_text())
    assert [(c["case"], "label" in c) for c in desc["training"] if c["source"] == "kits19"] == [("case_00000", True)]
    assert [c["case"] for c in desc["test"]] == ["case_00210", "case_00211"]
    assert all("label" not in c and "annotated" not in c and c["source"] == "kits19" for c in desc["test"])
    report = validate_dataset(out)
    assert report.ok, report.problems
    # a KiTS folder without any labelled case is a mistake (the test images alone cannot train)
    (kits / "case_00000" / "segmentation.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"source 'kits19': none of the 3 cases in .* has a label"):
        build_datalist([("kits19", kits)], out)


def test_out_must_be_a_json_file(folders, tmp_path, capsys):
    source = ["--source", f"msd_spleen={folders['msd_spleen']}"]
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert main(["build-datalist", *source, "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {folder} is a folder" in err and "dataset.json" in err, err
    assert main(["build-datalist", *source, "--out", str(tmp_path / "o15")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be a .json file" in err and "o15.json" in err, err
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        build_datalist([("msd_spleen", folders["msd_spleen"])], tmp_path / "dir.json")
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "o15").exists() and not any(folder.iterdir())
    # a write that fails half way leaves no temporary file either
    from partialseg.data.builders import write_json

    with pytest.raises(OSError):
        write_json(folder, {"training": []})  # a folder cannot be replaced by a file
    assert not list(tmp_path.rglob("*.tmp"))
    # the hint names the file to check when it is not the folder's dataset.json
    assert main(["build-datalist", *source, "--out", str(tmp_path / "spleen.json")]) == 0
    assert f"next: partialseg check {tmp_path / 'spleen.json'}" in capsys.readouterr().out


def test_msd_dataset_json_errors_name_the_file(folders, tmp_path, capsys):
    task = folders["msd_spleen"]
    out = tmp_path / "m" / "dataset.json"
    (task / "dataset.json").write_text('{"name": "spleen",\n, "training": []}')
    assert main(["build-datalist", "--source", f"msd_spleen={task}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{task / 'dataset.json'}: not valid JSON (Expecting property name" in err, err
    (task / "dataset.json").write_text('[{"image": "a.nii.gz", "label": "b.nii.gz"}]')
    with pytest.raises(ValueError, match=r"Task09_Spleen.dataset\.json: the top level is a JSON list; an MSD dataset.json is an object"):
        build_datalist([("msd_spleen", task)], out)
    (task / "dataset.json").write_text('{"training": {"image": "a.nii.gz"}}')
    with pytest.raises(ValueError, match=r"dataset\.json: 'training' must be a list"):
        build_datalist([("msd_spleen", task)], out)
    assert not out.parent.exists()


def test_val_and_classes_are_checked(folders, tmp_path, capsys):
    out = tmp_path / "v" / "dataset.json"
    source = ["--source", f"btcv={folders['btcv']}"]
    assert main(["build-datalist", *source, "--out", str(out), "--val", "-1"]) == 2
    assert "--val must be >= 0, got -1" in capsys.readouterr().err
    assert main(["build-datalist", *source, "--out", str(out), "--classes", "background", "liver", "liver"]) == 2
    assert "names 'liver' more than once" in capsys.readouterr().err
    with pytest.raises(TypeError, match="--val must be an int, got bool True"):
        build_datalist([("btcv", folders["btcv"])], out, val=True)
    assert not out.parent.exists()
