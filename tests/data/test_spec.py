"""dataset.json parsing, class resolution and unions."""

from __future__ import annotations

import json

import pytest

from partialseg.data import DatasetError, load_dataset, union_datasets

CLASSES = ["background", "liver", "spleen", "kidney_left", "kidney_right"]


def _desc(**extra):
    desc = {
        "name": "d",
        "classes": CLASSES,
        "modality": {"0": "CT"},
        "training": [
            {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "annotated": ["spleen"], "source": "msd_spleen"},
            {"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz", "annotated": "all", "phase": "ED"},
            {"image": "imagesTr/k.nii.gz", "label": "labelsTr/k.nii.gz", "annotated": ["kidney_left", "kidney_right"], "source": "kits"},
            {"image": "imagesTr/c.nii.gz"},
        ],
        "test": ["imagesTs/t.nii.gz"],
        "label_maps": {"msd_spleen": {"1": "spleen"}, "kits": {"1": ["kidney_left", "kidney_right"], "2": ["kidney_left", "kidney_right"]}},
    }
    desc.update(extra)
    return desc


def test_load_from_folder_resolves_paths_classes_and_maps(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps(_desc()))
    ds = load_dataset(tmp_path)
    assert ds.classes == CLASSES and ds.num_classes == 5
    cases = ds.datalist("training")
    assert [c["case"] for c in cases] == ["a", "b", "k", "c"]
    assert cases[0]["image"] == str(tmp_path.resolve() / "imagesTr/a.nii.gz")
    assert cases[0]["annotated"] == [2] and cases[0]["label_map"] == {1: 2}
    assert cases[1]["annotated"] == [0, 1, 2, 3, 4] and cases[1]["phase"] == "ED" and cases[1]["source"] == "default"
    assert cases[2]["label_map"] == {1: [3, 4], 2: [3, 4]}
    assert cases[3]["annotated"] == [] and "label" not in cases[3]
    assert all(c["modality"] == "CT" for c in cases)
    assert ds.datalist("test")[0]["case"] == "t"
    assert ds.sources() == ["msd_spleen", "default", "kits"]
    assert [c["case"] for c in ds.datalist(sources=["kits"])] == ["k"]
    # datalist entries are copies: editing them does not change the dataset
    cases[0]["annotated"].append(4)
    assert ds.datalist()[0]["annotated"] == [2]


def test_msd_labels_fallback_and_label_without_annotated_means_all():
    ds = load_dataset({"labels": {"0": "background", "1": "liver"}, "training": [{"image": "a.nii", "label": "b.nii"}]}, root="/x")
    assert ds.classes == ["background", "liver"] and ds.datalist()[0]["annotated"] == [0, 1]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"training": [{"image": "a.nii", "label": "l.nii", "annotated": ["gallbladder"]}]}, r"case 'a' \(training\[0\]\): 'annotated' names class 'gallbladder'"),
        ({"label_maps": {"s": {"1": "heart"}}}, r"source 's', value 1: class 'heart'"),
        ({"label_maps": {"s": {"x": "liver"}}}, "key 'x' is not an integer"),
        ({"label_maps": {"s": {"1": ["kidney_left"]}}}, r"\[left, right\]"),
        ({"training": [{"image": "a.nii", "annotated": ["liver"]}]}, "has no 'label' file"),
        ({"training": [{"image": "a.nii"}, {"image": "a.nii"}]}, "listed twice"),
        ({"training": "imagesTr"}, "must be a list"),
        ({"classes": ["background"]}, "at least two"),
        ({"classes": ["background", "liver", "liver"]}, "duplicate"),
        ({"label_maps": {"s": {"-1": "liver"}}}, "key '-1' is negative"),
        ({"label_maps": {"s": {"1": "liver", "+1": "spleen"}}}, "both mean value 1"),
        ({"test": ["a/imagesTs/t.nii.gz", "b/imagesTs/t.nii.gz"]}, r"case 't': two test cases have this name.*'case' entry"),
        ({"test": [{"image": "t.nii", "case": "a/b"}]}, r"test\[0\]: 'case' must be a non-empty name"),
        ({"valdation": []}, r"'valdation' is not a key of the format: did you mean 'validation'"),
    ],
)
def test_description_errors_name_the_case(change, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset(_desc(**change), root="/x")


def test_case_names_can_be_given_and_repeat_in_training():
    # KiTS: every image is case_*/imaging.nii.gz; a 'case' entry names it
    desc = _desc(test=[{"image": "kits/case_00001/imaging.nii.gz", "case": "case_00001"}, {"image": "kits/case_00002/imaging.nii.gz", "case": "case_00002"}])
    desc["training"] += [{"image": "x/imagesTr/a.nii.gz"}]  # a training name may repeat (no prediction is keyed by it)
    ds = load_dataset(desc, root="/x")
    assert [c["case"] for c in ds.datalist("test")] == ["case_00001", "case_00002"]
    assert [c["case"] for c in ds.datalist("training")].count("a") == 2


def test_missing_dataset_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(tmp_path)


def test_union_reindexes_by_name_and_drops_merged_background():
    liver = load_dataset({"classes": ["background", "liver"], "training": [{"image": "l1.nii", "label": "ll1.nii", "annotated": "all", "source": "msd_liver"}]}, root="/a")
    full = load_dataset({"classes": ["background", "spleen", "liver"], "training": [{"image": "f1.nii", "label": "lf1.nii", "annotated": "all", "source": "btcv"}]}, root="/b")
    u = union_datasets([liver, full], classes=["background", "liver", "spleen"])
    cases = u.datalist()
    # liver-only "all" = {background, liver} of its own classes; its background is the union's unknown
    assert cases[0]["annotated"] == [1]
    # the full dataset covers the union: every class annotated, its label values re-mapped by name
    assert cases[1]["annotated"] == [0, 1, 2] and cases[1]["label_map"] == {1: 2, 2: 1}
    assert "label_map" not in cases[0]  # same class order for its own values: no map needed
    with pytest.raises(DatasetError, match="not in the union"):
        union_datasets([full], classes=["background", "liver"])
    with pytest.raises(DatasetError, match="more than one dataset"):
        union_datasets([liver, liver])


def test_validation_reuses_training_is_declared_not_hidden(tmp_path):
    # the MONAI Label train task validates on its training cases when nothing can be held out; the
    # dataset declares it, and only the training/validation overlap is let through
    from partialseg.data import DatasetError, load_dataset

    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "b.nii.gz").write_bytes(b"")
    case = {"image": "a.nii.gz"}
    desc = {"classes": ["background", "liver"], "training": [case], "validation": [case]}
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(DatasetError, match="listed twice"):
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({**desc, "validation_reuses_training": True}))
    ds = load_dataset(tmp_path)
    assert ds.validation_reuses_training and len(ds.datalist("validation")) == 1
    (tmp_path / "dataset.json").write_text(json.dumps({**desc, "validation_reuses_training": True, "test": [case]}))
    with pytest.raises(DatasetError, match="listed twice"):  # a test leak is still one
        load_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({**desc, "validation_reuses_training": "yes"}))
    with pytest.raises(DatasetError, match="must be true or false"):
        load_dataset(tmp_path)
