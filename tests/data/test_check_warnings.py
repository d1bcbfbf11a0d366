"""`partialseg check` warnings (issue 14): an annotated class a source's labels never hold (a
forgotten label_maps entry) and a class no training case annotates; each fails before the change
(no ``warnings`` on the report, no warning section in the output)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import save_nifti
import partialseg.data.validation as validation
from partialseg.cli import main
from partialseg.data import ensure_dataset, validate_dataset


def _kind1(report):
    return [w for w in report.warnings if w.startswith("source ")]


def _spleen_only(tmp_path, held, label_maps=None, with_full=True, spleen_value=1):
    """A full case plus one spleen-only case per entry of ``held``: True stores spleen as
    ``spleen_value``, False leaves the label empty."""
    img = np.random.default_rng(0).normal(size=(6, 5, 4)).astype(np.float32)
    full = np.zeros((6, 5, 4), np.uint8)
    full[1:3, 1:3, 1:3] = 1
    full[4:6, 2:4, 1:3] = 2
    training = []
    if with_full:
        save_nifti(tmp_path / "imagesTr/full.nii.gz", img)
        save_nifti(tmp_path / "labelsTr/full.nii.gz", full)
        training.append({"image": "imagesTr/full.nii.gz", "label": "labelsTr/full.nii.gz", "annotated": "all", "source": "full"})
    for i, has in enumerate(held):
        save_nifti(tmp_path / f"imagesTr/spl{i}.nii.gz", img)
        save_nifti(tmp_path / f"labelsTr/spl{i}.nii.gz", ((full == 2) * spleen_value * has).astype(np.uint8))
        training.append({"image": f"imagesTr/spl{i}.nii.gz", "label": f"labelsTr/spl{i}.nii.gz", "annotated": ["spleen"], "source": "msd_spleen"})
    desc = {"name": "w", "classes": ["background", "liver", "spleen"], "training": training}
    if label_maps is not None:
        desc["label_maps"] = label_maps
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    return tmp_path


def test_forgotten_label_map_warns_per_source_with_the_entry_to_add(tmp_path, capsys):
    root = _spleen_only(tmp_path, [True] * 3)
    report = validate_dataset(root)
    assert report.ok  # value 1 is "liver": nothing is refused, which is why a warning is needed
    (line,) = _kind1(report)  # one line for the source, not one per case
    assert line.startswith("source 'msd_spleen': 3 case(s) annotate spleen (class 2) but none of their labels holds it")
    assert "hold values {0, 1}" in line and "value 1 is read as liver" in line
    assert '{"msd_spleen": {"1": "spleen"}}' in line
    assert main(["check", str(root), "--quiet", "--no-cache", "--json", str(tmp_path / "out.json")]) == 0  # warnings keep exit 0
    out = capsys.readouterr().out
    assert "1 warning(s):" in out and "no problems found" in out
    assert out.index("warning(s):") < out.index("no problems found")
    assert json.loads((tmp_path / "out.json").read_text())["warnings"] == report.warnings


def test_the_label_map_entry_silences_it(tmp_path):
    report = validate_dataset(_spleen_only(tmp_path, [True] * 3, label_maps={"msd_spleen": {"1": "spleen"}}))
    assert report.ok and report.warnings == []


def test_a_value_no_class_explains_is_refused_and_warned(tmp_path):
    report = validate_dataset(_spleen_only(tmp_path, [True, True], spleen_value=7))
    assert not report.ok and len(report.problems) == 2  # per case: value 7 is unexplained
    (line,) = _kind1(report)
    assert "hold values {0, 7}" in line and '{"msd_spleen": {"7": "spleen"}}' in line and "read as" not in line


def test_a_wrong_label_map_entry_is_named(tmp_path):
    # spleen stored as 1, but the map sends 1 to liver: nothing unexplained, spleen never held
    report = validate_dataset(_spleen_only(tmp_path, [True] * 2, label_maps={"msd_spleen": {"1": "liver"}}))
    assert report.ok
    (line,) = _kind1(report)
    assert "the label map of source 'msd_spleen'" in line and "likely maps the wrong value to spleen" in line


@pytest.mark.parametrize("held, warned", [([True, True, False], False), ([True, False, False], True), ([False], True)])
def test_most_cases_lacking_it_warns_a_few_do_not(tmp_path, held, warned):
    # label map right: a case lacking spleen is an empty slice; warn only when fewer than half hold it
    report = validate_dataset(_spleen_only(tmp_path, held, label_maps={"msd_spleen": {"1": "spleen"}}))
    lines = _kind1(report)
    assert bool(lines) is warned
    if warned:
        k = sum(held)
        assert (f"only {k} of their labels hold it" if k else "none of their labels holds it") in lines[0]
        assert "hold values {0}" in lines[0] and "these labels are empty" in lines[0]


def test_background_annotated_by_no_case_warns_with_the_dcl_consequence(tmp_path, capsys):
    root = _spleen_only(tmp_path, [True], label_maps={"msd_spleen": {"1": "spleen"}}, with_full=False)
    report = validate_dataset(root)
    assert report.ok
    text = "\n".join(report.warnings)
    assert "no training case annotates background (class 0)" in text and "[0]" not in text
    # background AND liver unannotated: the measured failure (two classes the model cannot tell apart)
    assert "--missing any" in text and "2 classes are annotated by no case" in text and '"annotated": "all"' in text
    assert "costs nothing" not in text
    assert "no training case annotates liver (class 1)" in text  # a foreground class nobody annotates
    # background the only unannotated class (liver annotated too): the measured harmless case
    desc = json.loads((root / "dataset.json").read_text())
    for case in desc["training"]:
        case["annotated"] = ["liver", "spleen"]
    (root / "dataset.json").write_text(json.dumps(desc))
    only_bg = [w for w in validate_dataset(root).warnings if "no training case annotates" in w]
    assert len(only_bg) == 1 and "background (class 0)" in only_bg[0] and "costs nothing" in only_bg[0]
    assert main(["check", str(root), "--quiet", "--no-cache"]) == 0
    assert "2 warning(s):" in capsys.readouterr().out
    # a fully labelled case annotates every class: no such warning
    assert not [w for w in validate_dataset(_spleen_only(tmp_path, [True], label_maps={"msd_spleen": {"1": "spleen"}})).warnings]


def test_warnings_come_from_cached_findings(tmp_path, monkeypatch):
    root = _spleen_only(tmp_path, [True] * 2)
    first = validate_dataset(root, cache=True)
    assert (root / validation.CACHE_NAME).is_file() and _kind1(first)

    def no_read(*args, **kwargs):
        raise AssertionError("a cached case was read again")

    monkeypatch.setattr(validation, "inspect_case", no_read)
    second = validate_dataset(root, cache=True)
    assert second.warnings == first.warnings


@pytest.mark.parametrize("family, options", [("cardiac2d", {"num_train": 6, "size": 32}), ("abdomen3d", {"num_train": 6, "size": 24})])
def test_synthetic_families_hold_every_annotated_class(tmp_path, family, options):
    report = validate_dataset(ensure_dataset(tmp_path / family, family, **options))
    assert report.ok and _kind1(report) == []
