"""Intramodal vs cross-modal Dice in partialseg evaluate, and the Wilcoxon comparison of two runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from partialseg.cli import main
from partialseg.evaluation import compare_runs, evaluate_folder, labelled_by_modality, read_metrics

CLASSES = ["background", "liver", "spleen"]


def _save(path: Path, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.eye(4)), str(path))
    return path.name


def _ref() -> np.ndarray:
    ref = np.zeros((6, 6, 2), np.uint8)
    ref[0:2, 0:2, 0] = 1  # liver: 4 voxels
    ref[4:6, 4:6, 0] = 2  # spleen: 4 voxels
    return ref


@pytest.fixture
def dataset(tmp_path):
    """CT trains liver, MR trains spleen; one CT and one MR test case, and a run's predictions."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    img = np.ones((6, 6, 2), np.uint8)
    training = []
    for name, modality, organ in (("ct0", "CT", 1), ("mr0", "MR", 2)):
        lab = np.where(_ref() == organ, organ, 0)
        training.append({"image": "images/" + _save(root / "images" / f"{name}.nii.gz", img),
                         "label": "images/" + _save(root / "images" / f"{name}_lab.nii.gz", lab),
                         "annotated": [CLASSES[organ]], "modality": modality})
    test = []
    for name, modality in (("tct", "CT"), ("tmr", "MR")):
        test.append({"image": "images/" + _save(root / "images" / f"{name}.nii.gz", img),
                     "label": "images/" + _save(root / "images" / f"{name}_lab.nii.gz", _ref()),
                     "annotated": "all", "modality": modality})
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES, "modality": {"0": "CT+MR"},
                                                   "training": training, "test": test}))
    pred = tmp_path / "pred"
    pred.mkdir()
    p_ct = _ref()
    p_ct[5, 4:6, 0] = 0  # CT: liver exact (intramodal, 1.0), spleen 2 of 4 voxels (cross-modal, 2*2/6)
    _save(pred / "tct_seg.nii.gz", p_ct)
    p_mr = _ref()
    p_mr[p_mr == 1] = 0  # MR: liver missed (cross-modal, 0.0), spleen exact (intramodal, 1.0)
    _save(pred / "tmr_seg.nii.gz", p_mr)
    return root, pred


def test_labelled_by_modality_reads_the_training_split():
    training = [{"case": "a", "modality": "CT", "annotated": [0, 1]}, {"case": "b", "modality": "MR", "annotated": [2]},
                {"case": "u", "modality": "PET", "annotated": []}]  # unlabelled: labels nothing
    assert labelled_by_modality(training) == {"CT": [1], "MR": [2]}
    with pytest.raises(ValueError, match="training case 'x' has no modality"):
        labelled_by_modality([{"case": "x", "annotated": [1]}])


def test_intramodal_and_cross_modal_dice(dataset, tmp_path):
    root, pred = dataset
    summary = evaluate_folder(pred, root, out_dir=tmp_path / "eval", progress=False)
    mod = summary["modality"]
    assert mod["labelled_by_modality"] == {"CT": ["liver"], "MR": ["spleen"]}
    # intramodal: (CT, liver) 1.0 and (MR, spleen) 1.0; cross-modal: (CT, spleen) 2/3 and (MR, liver) 0
    assert mod["intramodal"]["dice"] == pytest.approx(1.0)
    assert mod["cross_modal"]["dice"] == pytest.approx(1 / 3)
    assert mod["intramodal"]["n_rows"] == mod["cross_modal"]["n_rows"] == 2
    assert mod["by_modality"]["CT"]["cross_modal"]["per_class"]["spleen"]["dice"]["mean"] == pytest.approx(2 / 3)
    assert mod["by_modality"]["MR"]["cross_modal"]["per_class"]["liver"]["dice"]["mean"] == 0.0
    assert "spleen" not in mod["by_modality"]["MR"]["cross_modal"]["per_class"]
    # the overall figures are unchanged by the grouping: liver (1 + 0) / 2, spleen (2/3 + 1) / 2
    assert summary["per_class"]["liver"]["dice"]["mean"] == pytest.approx(0.5)
    with open(tmp_path / "eval" / "metrics.csv", newline="") as f:
        rows = {(r["case"], r["class"]): r for r in csv.DictReader(f)}
    assert rows[("tct", "spleen")]["group"] == "cross_modal" and rows[("tct", "spleen")]["modality"] == "CT"
    assert rows[("tmr", "spleen")]["group"] == "intramodal"


def test_single_modality_dataset_has_no_grouping_unless_asked(dataset, tmp_path):
    root, pred = dataset
    desc = json.loads((root / "dataset.json").read_text())
    for case in desc["training"] + desc["test"]:
        case["modality"] = "CT"
    (root / "dataset.json").write_text(json.dumps(desc))
    assert "modality" not in evaluate_folder(pred, root, out_dir=tmp_path / "e1", progress=False)
    forced = evaluate_folder(pred, root, out_dir=tmp_path / "e2", progress=False, by_modality=True)
    assert forced["modality"]["cross_modal"]["n_rows"] == 0  # CT labels both organs


def test_case_with_unknown_or_missing_modality_is_refused(dataset, tmp_path):
    root, pred = dataset
    desc = json.loads((root / "dataset.json").read_text())
    desc["test"][1]["modality"] = "MRI"
    (root / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(ValueError, match=r"case 'tmr': modality 'MRI' is not among the training modalities \['CT', 'MR'\]"):
        evaluate_folder(pred, root, out_dir=tmp_path / "e", progress=False)
    del desc["test"][1]["modality"]  # inherits the top-level "CT+MR", no training case's modality
    (root / "dataset.json").write_text(json.dumps(desc))
    assert main(["evaluate", "--pred", str(pred), "--dataset", str(root), "--no-progress"]) == 2
    assert not (tmp_path / "e").exists() and not (pred / "evaluation").exists()


def test_cli_prints_the_groups(dataset, capsys):
    root, pred = dataset
    assert main(["evaluate", "--pred", str(pred), "--dataset", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0].strip(): line.split() for line in out.splitlines() if "(all rows)" in line}
    assert lines["intramodal (all rows)"][-2:] == ["2", "1.0000"]
    assert lines["cross_modal (all rows)"][-2:] == ["2", "0.3333"]


def _rows(dice_by_case: dict[str, float]) -> list[dict]:
    return [{"case": c, "class": "liver", "dice": d} for c, d in dice_by_case.items()]


def test_wilcoxon_hand_computed():
    a = {f"c{i}": 0.5 for i in range(5)}
    b = {"c0": 0.6, "c1": 0.3, "c2": 0.8, "c3": 0.9, "c4": 1.0}  # B - A = +.1, -.2, +.3, +.4, +.5
    r = compare_runs(_rows(a), _rows(b))["all"]
    # ranks 1..5, W- = 2 (the -0.2), W+ = 13: two-sided statistic min(W+, W-) = 2;
    # exact p = 2 * P(W <= 2) = 2 * |{}, {1}, {2}| / 2**5 = 6 / 32
    assert r["n"] == 5 and r["statistic"] == 2.0
    assert r["p_value"] == pytest.approx(6 / 32)
    assert r["mean_diff"] == pytest.approx(0.22)
    same = compare_runs(_rows(a), _rows(a))["all"]
    assert same["p_value"] == 1.0 and same["mean_diff"] == 0.0
    with pytest.raises(ValueError, match="case 'c4' is scored in run A only"):
        compare_runs(_rows(a), _rows({k: v for k, v in b.items() if k != "c4"}))


def test_wilcoxon_per_case_means_and_groups():
    rows_a = [{"case": c, "class": k, "dice": 0.5, "group": g} for c in ("x", "y", "z")
              for k, g in (("liver", "intramodal"), ("spleen", "cross_modal"))]
    rows_b = [dict(r, dice=0.5 + (0.3 if r["group"] == "cross_modal" else 0.1)) for r in rows_a]
    result = compare_runs(rows_a, rows_b)
    assert result["all"]["mean_diff"] == pytest.approx(0.2)  # per case: mean of +0.1 and +0.3
    assert result["cross_modal"]["mean_diff"] == pytest.approx(0.3)
    assert result["intramodal"]["mean_diff"] == pytest.approx(0.1)
    assert result["per_class"]["spleen"]["p_value"] == pytest.approx(0.25)  # n = 3, all positive: 2 / 2**3


def test_compare_command(dataset, tmp_path, capsys):
    root, pred = dataset
    assert main(["evaluate", "--pred", str(pred), "--dataset", str(root), "--no-progress"]) == 0
    run_b = tmp_path / "b.csv"
    run_b.write_text((pred / "evaluation" / "metrics.csv").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--compare", str(pred), str(run_b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "cross_modal" in out and "Wilcoxon" in out
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["all"]["p_value"] == 1.0 and saved["cross_modal"]["n"] == 2
    assert len(read_metrics(run_b)) == 4
    assert main(["evaluate", "--compare", str(pred), str(tmp_path / "nothing")]) == 2
    assert "no metrics.csv for run" in capsys.readouterr().err
