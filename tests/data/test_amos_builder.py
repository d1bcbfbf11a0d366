"""build-datalist layout amos22: AMOS22 as distributed, whole or as the atlas paper's three tasks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from partialseg.cli import main
from partialseg.data import load_dataset
from partialseg.data.builders import LAYOUTS, build_datalist
from partialseg.data.builders.amos import AMOS_ORGANS, PAPER_CLASSES, PAPER_TASKS
from partialseg.data.validation import validate_dataset

CT_IDS = list(range(1, 11))  # 10 CT cases
MR_IDS = list(range(500, 506))  # 6 MR cases


def _write_case(root: Path, images: str, labels: str | None, case_id: int, organs: int) -> None:
    img = np.zeros((6, 6, 4), np.int16)
    img[1:5, 1:5, :] = 100
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / images / f"amos_{case_id:04d}.nii.gz"))
    if labels is not None:
        lab = np.zeros((6, 6, 4), np.uint8)
        lab.flat[: organs] = np.arange(1, organs + 1)  # every organ value once
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / labels / f"amos_{case_id:04d}.nii.gz"))


@pytest.fixture(scope="module")
def amos(tmp_path_factory):
    root = tmp_path_factory.mktemp("amos22")
    for folder in ("imagesTr", "labelsTr", "imagesVa", "labelsVa", "imagesTs"):
        (root / folder).mkdir()
    for i in CT_IDS:
        _write_case(root, "imagesTr", "labelsTr", i, 15)
    for i in MR_IDS:
        _write_case(root, "imagesTr", "labelsTr", i, 13)  # MR labels hold 13 organs
    _write_case(root, "imagesVa", "labelsVa", 200, 15)
    _write_case(root, "imagesVa", "labelsVa", 560, 13)
    _write_case(root, "imagesTs", None, 300, 0)
    labels = {"0": "background", **{str(v): o for v, o in enumerate(
        ["spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach", "arota", "postcava",
         "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder", "prostate/uterus"], start=1)}}
    ids = CT_IDS + MR_IDS
    (root / "dataset.json").write_text(json.dumps({
        "name": "AMOS", "labels": labels, "modality": {"0": "CT"},
        "training": [{"image": f"./imagesTr/amos_{i:04d}.nii.gz", "label": f"./labelsTr/amos_{i:04d}.nii.gz"} for i in ids],
        "validation": [{"image": f"./imagesVa/amos_{i:04d}.nii.gz", "label": f"./labelsVa/amos_{i:04d}.nii.gz"}
                       for i in (200, 560)],
        "test": [{"image": "./imagesTs/amos_0300.nii.gz"}],
    }))
    return root


def test_amos_registered():
    assert LAYOUTS["amos22"].anatomy == "amos"


def test_amos_all_organs(amos, tmp_path):
    out = tmp_path / "all" / "dataset.json"
    desc = build_datalist([("amos22", amos)], out)
    assert desc["classes"] == ["background", *AMOS_ORGANS] and len(desc["classes"]) == 16
    assert [c["modality"] for c in desc["training"]] == ["CT"] * 10 + ["MR"] * 6
    assert [c["modality"] for c in desc["validation"]] == ["CT", "MR"]
    assert len(desc["test"]) == 1 and "label" not in desc["test"][0] and desc["test"][0]["modality"] == "CT"
    assert desc["label_maps"]["amos22"]["8"] == "aorta" and desc["label_maps"]["amos22"]["9"] == "ivc"
    report = validate_dataset(load_dataset(out))
    assert report.ok, report.problems


def test_amos_paper_three_tasks(amos, tmp_path):
    out = tmp_path / "paper" / "dataset.json"
    desc = build_datalist([("amos22", amos)], out, val=1, tasks="paper", test_per_modality=(2, 1), seed=3)
    assert desc["classes"] == PAPER_CLASSES and len(PAPER_CLASSES) == 14  # background + 13 organs
    by_source: dict[str, list[dict]] = {}
    for c in desc["training"]:
        by_source.setdefault(c["source"], []).append(c)
    assert sorted(by_source) == sorted(PAPER_TASKS)
    # 10 CT: 2 test, the other 8 in two halves of 4, each minus 1 validation case; 6 MR: 1 test, 1 validation
    assert [len(by_source[s]) for s in ("amos_ct_a", "amos_ct_b", "amos_mr")] == [3, 3, 4]
    assert [c["modality"] for c in desc["test"]] == ["CT", "CT", "MR"]
    assert len(desc["validation"]) == 3 and all(c["annotated"] == "all" for c in desc["validation"] + desc["test"])
    for source, (modality, organs) in PAPER_TASKS.items():
        assert all(c["modality"] == modality and c["annotated"] == organs for c in by_source[source])
        kept = {v for v, o in desc["label_maps"][source].items() if o != "background"}
        assert sorted(desc["label_maps"][source][v] for v in kept) == sorted(organs)
    # the three tasks are disjoint and cover the 13 organs; bladder and prostate/uterus are background
    annotated = [o for _, organs in PAPER_TASKS.values() for o in organs]
    assert sorted(annotated) == sorted(PAPER_CLASSES[1:])
    assert desc["label_maps"]["amos22"]["14"] == desc["label_maps"]["amos22"]["15"] == "background"
    # every image once over the splits (no leak), and the dataset validates with its files
    images = [c["image"] for s in ("training", "validation", "test") for c in desc[s]]
    assert len(images) == len(set(images)) == 16
    report = validate_dataset(load_dataset(out))
    assert report.ok, report.problems
    # the same seed gives the same split; another seed another one
    again = build_datalist([("amos22", amos)], tmp_path / "again" / "dataset.json", val=1, tasks="paper", test_per_modality=(2, 1), seed=3)
    assert again["training"] == desc["training"] and again["test"] == desc["test"]
    other = build_datalist([("amos22", amos)], tmp_path / "other" / "dataset.json", val=1, tasks="paper", test_per_modality=(2, 1), seed=4)
    assert [c["image"] for c in other["test"]] != [c["image"] for c in desc["test"]]


def test_amos_refusals(amos, tmp_path):
    with pytest.raises(ValueError, match="too few for 38 test"):
        build_datalist([("amos22", amos)], tmp_path / "a.json", tasks="paper")  # the paper's 38 CT test cases
    with pytest.raises(ValueError, match="leave --classes out"):
        build_datalist([("amos22", amos)], tmp_path / "b.json", tasks="paper", classes=["background", "liver"],
                       test_per_modality=(2, 1))
    with pytest.raises(ValueError, match="--tasks must be one of 'all', 'paper'"):
        build_datalist([("amos22", amos)], tmp_path / "c.json", tasks="papers")
    broken = tmp_path / "broken"
    broken.mkdir()
    desc = json.loads((amos / "dataset.json").read_text())
    desc["training"][0]["label"] = "./labelsTr/amos_9999.nii.gz"
    (broken / "dataset.json").write_text(json.dumps(desc).replace("./", str(amos) + "/"))
    with pytest.raises(ValueError, match="amos_9999.nii.gz does not exist"):
        build_datalist([("amos22", broken)], tmp_path / "d.json")


def test_amos_command(amos, tmp_path, capsys):
    out = tmp_path / "cli" / "dataset.json"
    assert main(["build-datalist", "--source", f"amos22={amos}", "--out", str(out), "--tasks", "paper",
                 "--test-per-modality", "2", "1", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "amos_ct_a" in text and "amos_mr" in text
    assert json.loads(out.read_text())["name"] == "amos22_paper"
