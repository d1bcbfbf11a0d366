"""The hybrid-supervision keys of ``dataset.json`` (``supervision``, ``weak_type``, ``label_true``): parsing, validation, datalists, ``check``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from partialseg.data import DatasetError, bundle_datalist, load_dataset, validate_dataset


def _write(root: Path, cases: list[dict], size=(12, 12)) -> Path:
    """Frames ``<name>.png`` (RGB), masks ``<name>_mask.png`` (0/1), ``<name>_true.png``; a dataset.json of ``cases``."""
    for sub in ("img", "lab"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for c in cases:
        name = c.pop("name")
        Image.fromarray(np.full((*size, 3), 100, np.uint8)).save(root / "img" / f"{name}.png")
        mask = np.zeros(c.pop("mask_size", size), np.uint8)
        mask[3:7, 3:7] = 1
        Image.fromarray(mask).save(root / "lab" / f"{name}_mask.png")
        Image.fromarray(mask).save(root / "lab" / f"{name}_true.png")
        training.append({"image": f"img/{name}.png", "label": f"lab/{name}_mask.png", **c})
    (root / "dataset.json").write_text(json.dumps({"classes": ["background", "polyp"], "training": training}))
    return root


def test_keys_are_kept_resolved_and_counted(tmp_path):
    root = _write(tmp_path, [
        {"name": "s1", "supervision": "strong"}, {"name": "plain"},
        {"name": "w1", "supervision": "weak", "weak_type": "ellipse", "label_true": "lab/w1_true.png"},
        {"name": "w2", "supervision": "weak"},
    ])  # fmt: skip
    ds = load_dataset(root)
    w1 = next(c for c in ds.splits["training"] if c["case"] == "w1")
    assert w1["label_true"] == str(root / "lab" / "w1_true.png")  # resolved like image and label
    report = validate_dataset(ds, channels=3)
    assert report.ok, report.problems
    s = report.summary["training"]["default"]
    assert s["supervision"] == {"strong": 2, "weak": 2} and s["weak_types"] == {"ellipse": 1, "unspecified": 1}
    assert "supervision: 2 strong, 2 weak (ellipse 1, unspecified 1)" in report.format()
    # bundle datalists keep supervision and weak_type, never label_true; supervision=True fills the default
    plain = bundle_datalist(root, "training", channels=3)
    by_case = {c["case"]: c for c in plain}
    assert by_case["w1"]["supervision"] == "weak" and by_case["w1"]["weak_type"] == "ellipse"
    assert "supervision" not in by_case["plain"] and all("label_true" not in c for c in plain)
    hybrid = {c["case"]: c for c in bundle_datalist(root, "training", channels=3, supervision=True)}
    assert hybrid["plain"]["supervision"] == "strong" and hybrid["w2"]["supervision"] == "weak" and "weak_type" not in hybrid["w2"]


def test_a_plain_dataset_reports_no_supervision_line(tmp_path):
    root = _write(tmp_path, [{"name": "a"}, {"name": "b"}])
    assert "supervision:" not in validate_dataset(root, channels=3).format()


@pytest.mark.parametrize(
    "case,message",
    [
        ({"supervision": "Weak"}, "'supervision' must be one of ['strong', 'weak'], got 'Weak' (did you mean 'weak'?)"),
        ({"supervision": "strong", "weak_type": "ellipse"}, "has 'weak_type' 'ellipse' but 'supervision' is 'strong'"),
        ({"supervision": "weak", "weak_type": ""}, "'weak_type' must be a non-empty text"),
        ({"supervision": "weak", "label_true": 3}, "'label_true' must be a file path, got 3"),
    ],
)
def test_bad_values_are_refused_naming_the_case(tmp_path, case, message):
    root = _write(tmp_path, [{"name": "s"}, {"name": "bad", **case}])
    with pytest.raises(DatasetError) as e:
        load_dataset(root)
    assert "case 'bad' (training[1])" in str(e.value) and message in str(e.value)


def test_weak_masks_belong_to_training_and_need_a_label(tmp_path):
    root = _write(tmp_path, [{"name": "s"}])
    desc = json.loads((root / "dataset.json").read_text())
    desc["test"] = [{"image": "img/s.png", "label": "lab/s_mask.png", "supervision": "weak", "case": "t"}]
    desc["training"].append({"image": "img/s.png", "supervision": "strong", "case": "u"})
    (root / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(DatasetError) as e:
        load_dataset(root)
    msg = str(e.value)
    assert "case 't' (test[0]): a weak mask in the 'test' split" in msg
    assert "case 'u' (training[1]): 'supervision' 'strong' needs a 'label' file" in msg


def test_all_weak_missing_truth_and_wrong_shape_are_problems(tmp_path):
    root = _write(tmp_path, [
        {"name": "w1", "supervision": "weak", "label_true": "lab/gone.png"},
        {"name": "w2", "supervision": "weak", "mask_size": (6, 6)},
    ])  # fmt: skip
    problems = validate_dataset(root, channels=3).problems
    assert any(p.startswith(f"dataset {root / 'dataset.json'}: all 2 labelled training cases are weak") for p in problems)
    assert any("case 'w1' (training, source 'default', weak mask): label_true" in p and "gone.png: file not found" in p for p in problems)
    assert any("case 'w2' (training, source 'default', weak mask): label" in p and "has shape (6, 6)" in p for p in problems)
    # one strong case lifts the first problem
    desc = json.loads((root / "dataset.json").read_text())
    desc["training"][1].pop("supervision")
    (root / "dataset.json").write_text(json.dumps(desc))
    assert not any("are weak" in p for p in validate_dataset(root, channels=3).problems)


def test_check_cli_prints_the_counts(tmp_path, capsys):
    import argparse

    from partialseg.data import check

    root = _write(tmp_path, [{"name": "s"}, {"name": "w", "supervision": "weak", "weak_type": "shifted"}])
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    assert check.run(parser.parse_args([str(root), "--channels", "3", "--quiet", "--workers", "1"])) == 0
    assert "supervision: 1 strong, 1 weak (shifted 1)" in capsys.readouterr().out
