"""The MONAI Label tasks without a server: class names, the metadata declaration (train task and
served files), DCL stage choice, datastore cases, the conditional-class check, the atomic install of
the served files, the train-request checks and the datastore's name checks."""

from __future__ import annotations

import doctest
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("monailabel")

from monailabel_harness import FakeDatastore  # noqa: E402

from partialseg.monailabel import tasks  # noqa: E402
from partialseg.monailabel.bundle import read_declaration  # noqa: E402
from partialseg.monailabel.request_checks import RequestError  # noqa: E402
from partialseg.monailabel.tasks import (  # noqa: E402
    ConditionalTrainTask,
    PartialLabelTrainTask,
    bundle_classes,
    bundle_train_task,
)

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
DCL_CLASSES = ["background", "LV", "MYO", "RV"]


def _copy_bundle(name: str, dst: Path) -> Path:
    shutil.copytree(BUNDLES / name / "configs", dst / name / "configs")
    return dst / name


def _edit_metadata(bundle: Path, **changes) -> None:
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def test_doctests():
    assert doctest.testmod(tasks).failed == 0


def test_bundle_classes(tmp_path):
    # DCL: the metadata's class_names, though its network has 2m = 8 "(logit)" output channels
    assert bundle_classes(BUNDLES / "dcl_cardiac") == DCL_CLASSES
    # the marginal bundle: still its output channel_def, one channel per class
    meta = json.loads((BUNDLES / "marginal_exclusion_abdomen" / "configs" / "metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert "class_names" not in meta
    assert bundle_classes(BUNDLES / "marginal_exclusion_abdomen") == [channels[str(i)] for i in range(len(channels))]

    dcl = _copy_bundle("dcl_cardiac", tmp_path)
    _edit_metadata(dcl, class_names=None)  # without it, "(logit)" channels name no class
    assert bundle_classes(dcl) is None
    with pytest.raises(ValueError, match=r"metadata.json: declares the train task 'conditional' but names no classes"):
        bundle_train_task(dcl)
    _edit_metadata(dcl, class_names=["background", "LV", "MYO"])
    with pytest.raises(ValueError, match="name 3 classes, train.json num_classes is 4"):
        bundle_classes(dcl)
    for bad in ("background, LV, MYO, RV", ["background", "LV", "LV", "RV"], ["background", 1, "MYO", "RV"]):
        _edit_metadata(dcl, class_names=bad)
        with pytest.raises(ValueError, match="class_names must list"):
            bundle_classes(dcl)


def test_bundle_train_task_picks_the_task(tmp_path):
    dcl = bundle_train_task(BUNDLES / "dcl_cardiac", overrides={"pixdim": [2, 2]}, max_epochs=3)
    assert type(dcl) is ConditionalTrainTask and dcl.classes == DCL_CLASSES and dcl.dimension == 2
    assert dcl.overrides == {"pixdim": [2, 2]} and dcl.max_epochs == 3 and dcl.config()["stage"] == "auto"
    marginal = bundle_train_task(BUNDLES / "marginal_exclusion_abdomen")
    assert type(marginal) is PartialLabelTrainTask and marginal.dimension == 3 and "stage" not in marginal.config()
    # a conditional bundle whose train.json lacks a key the task sets
    bundle = _copy_bundle("dcl_cardiac", tmp_path)
    train = json.loads((bundle / "configs" / "train.json").read_text())
    del train["ckpt_name"]
    (bundle / "configs" / "train.json").write_text(json.dumps(train))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['ckpt_name'\]"):
        bundle_train_task(bundle)


def test_the_declaration_chooses_the_train_task_and_the_served_files(tmp_path):
    # the marginal bundle's train.json now mentions a support bank: the declaration, not the text, decides
    marginal = _copy_bundle("marginal_exclusion_abdomen", tmp_path)
    train = json.loads((marginal / "configs" / "train.json").read_text())
    train["support_bank_path"] = "$@ckpt_dir + '/support_bank.pt'"
    (marginal / "configs" / "train.json").write_text(json.dumps(train))
    assert type(bundle_train_task(marginal)) is PartialLabelTrainTask
    assert [p.name for p in tasks.BundleInferTask(marginal).required_files()] == ["model.pt"]
    # a declared extra file (an atlas) is served and installed, though no config text says 'atlas'
    meta = json.loads((marginal / "configs" / "metadata.json").read_text())
    meta["partialseg"]["model_files"] = {"atlas": {"path": "models/atlas.pt", "train_key": "support_bank_path"}}
    (marginal / "configs" / "metadata.json").write_text(json.dumps(meta))
    task = bundle_train_task(marginal)
    assert task.served == [("atlas", "atlas.pt"), ("checkpoint", "model.pt")]
    assert task.output_overrides(tmp_path / "run")["support_bank_path"] == str(tmp_path / "run" / "models" / "atlas.pt")
    infer = tasks.BundleInferTask(marginal)
    (marginal / "models").mkdir()
    torch.save({}, marginal / "models" / "model.pt")
    assert not infer.is_valid()
    torch.save({}, marginal / "models" / "atlas.pt")
    assert infer.is_valid()
    # a declared file whose train_key train.json lacks
    meta["partialseg"]["model_files"]["atlas"]["train_key"] = "atlas_path"
    (marginal / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['atlas_path'\]"):
        bundle_train_task(marginal)
    # "train": null: served, not trained
    meta["partialseg"] = {"train": None, "model_files": {}}
    (marginal / "configs" / "metadata.json").write_text(json.dumps(meta))
    assert bundle_train_task(marginal) is None


@pytest.mark.parametrize(
    "declaration, match",
    [
        (None, "no 'partialseg' declaration"),
        ("conditional", "partialseg must be an object"),
        ({"train": {"task": "conditional"}}, r"missing: \['model_files'\]"),
        ({"train": {"task": "conditionnal"}, "model_files": {}}, "Did you mean 'conditional'"),
        ({"train": {"task": "conditional"}, "model_files": {"bank": {"path": "../bank.pt", "train_key": "support_bank_path"}}}, "a file directly in models/"),
        ({"train": {"task": "conditional"}, "model_files": {"bank": {"path": "models/model.pt", "train_key": "support_bank_path"}}}, "other than model.pt"),
        ({"train": {"task": "conditional"}, "model_files": {"bank": "models/support_bank.pt"}}, "model_files.bank must be"),
        ({"train": {"task": "conditional"}, "model_files": {"a": {"path": "models/a.pt", "train_key": "k"}, "b": {"path": "models/a.pt", "train_key": "j"}}}, "declared more than once"),
    ],
)
def test_a_missing_or_malformed_declaration_names_the_file(tmp_path, declaration, match):
    dcl = _copy_bundle("dcl_cardiac", tmp_path)
    _edit_metadata(dcl, partialseg=declaration)
    for read in (read_declaration, bundle_train_task, tasks.BundleInferTask):
        with pytest.raises(ValueError, match=match) as e:
            read(dcl)
        assert str(dcl / "configs" / "metadata.json") in str(e.value)


def test_dcl_stage_choice(tmp_path):
    bundle = _copy_bundle("dcl_cardiac", tmp_path)
    task = ConditionalTrainTask(bundle, DCL_CLASSES, max_epochs=5)
    served = bundle.resolve() / "models" / "model.pt"
    # nothing served: stage 1 from scratch (its own epochs key, no checkpoint to load)
    assert task.choose_stage({}) == task.choose_stage({"stage": "auto"}) == 1
    assert task.stage_overrides({"max_epochs": 2}) == {"stage": 1, "epochs_stage1": 2}
    with pytest.raises(ValueError, match="stage 2 starts from the served models/model.pt, which does not exist"):
        task.choose_stage({"stage": 2})
    # a served model: stage 2 from it
    served.parent.mkdir()
    served.write_bytes(b"weights")
    assert task.choose_stage({}) == 2 and task.choose_stage({"stage": "1"}) == 1
    assert task.stage_overrides({}) == {"stage": 2, "epochs_stage2": 5, "stage1_ckpt": str(served)}
    with pytest.raises(ValueError, match="stage must be 1, 2 or 'auto', got 3"):
        task.choose_stage({"stage": 3})
    # the run writes model and bank into its own folder; install() serves them afterwards
    run = tmp_path / "run"
    assert task.output_overrides(run) == {"ckpt_dir": str(run / "models"), "ckpt_name": "model.pt",
                                          "support_bank_path": str(run / "models" / "support_bank.pt")}  # fmt: skip
    # the marginal task is unchanged: always stage 2, from the served model when there is one
    marginal = PartialLabelTrainTask(_copy_bundle("marginal_exclusion_abdomen", tmp_path), ["background", "liver"])
    assert marginal.stage_overrides({"max_epochs": 4}) == {"stage": 2, "epochs_stage2": 4, "init_from_stage1": False,
                                                           "stage1_ckpt": str(marginal.bundle_root / "models" / "model.pt")}  # fmt: skip
    # both tasks train into the run folder; install() serves the result only after success
    assert marginal.output_overrides(run) == {"ckpt_dir": str(run / "models"), "ckpt_name": "model.pt"}


def _case(folder: Path, name: str, label: np.ndarray, info: dict | None = None) -> tuple[Path, Path, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    image, path = folder / f"{name}.nii.gz", folder / f"{name}_label.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=label.shape).astype(np.float32), np.eye(4)), str(image))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), str(path))
    return image, path, info or {}


def test_dcl_dataset_and_conditional_class_check(tmp_path):
    task = ConditionalTrainTask(_copy_bundle("dcl_cardiac", tmp_path), DCL_CLASSES)
    disc = np.zeros((8, 8), np.uint8)
    disc[2:5, 2:5] = 1
    cases = {
        "lv": _case(tmp_path / "s", "lv", disc, {"annotated": ["LV"]}),
        "myo": _case(tmp_path / "s", "myo", 2 * disc),  # no `annotated`: read from the label's values
        "rv": _case(tmp_path / "s", "rv", 3 * disc, {"annotated": [3]}),  # an index
        "volume": _case(tmp_path / "s", "volume", np.ones((4, 4, 4)), {"annotated": ["liver"]}),  # 3D: left out
    }
    # a slice saved as (H, W, 1) is 2D, as the bundle's loader reads it; a volume is not
    flat = {"flat": _case(tmp_path / "s", "flat", disc[..., None], {"annotated": ["LV"]}), "volume": cases["volume"]}
    assert [c["case"] for c in task.dataset(FakeDatastore(flat), tmp_path / "d0")["training"]] == ["flat"]
    content = task.dataset(FakeDatastore(cases), tmp_path / "d1")
    assert {c["case"]: c["annotated"] for c in content["training"]} == {"lv": ["LV"], "myo": ["MYO"], "rv": ["RV"]}
    assert json.loads((tmp_path / "d1" / "dataset.json").read_text())["classes"] == DCL_CLASSES
    assert task.unannotated(content["training"]) == ["background"]
    overrides = {**task.stage_overrides({"max_epochs": 2}), "val_interval": 1}
    with pytest.raises(ValueError, match=r"class\(es\) \['background'\] are annotated in no labelled case.*\"annotated\": \[\"background\"\]"):
        task.check(content, overrides)
    task.check(content, {**overrides, "missing": "any"})  # the bundle's missing option allows it
    with pytest.raises(ValueError, match="2 epoch\\(s\\) but val_interval 3"):
        task.check(content, {**overrides, "missing": "any", "val_interval": 3})

    # a fully annotated case is held out only when the others still annotate every class
    full = disc + 2 * np.roll(disc, 3, axis=0) + 3 * np.roll(disc, 3, axis=1)
    cases["full"] = _case(tmp_path / "s", "full", full, {"annotated": "all"})
    content = task.dataset(FakeDatastore(cases), tmp_path / "d2")
    assert [c["case"] for c in content["validation"]] == ["full", "lv", "myo", "rv"]  # the training cases,
    assert content["validation_reuses_training"] is True  # declared, so the dataset loads (no link to hide them)
    from partialseg.data import load_dataset

    assert load_dataset(tmp_path / "d2").validation_reuses_training
    task.check(content, overrides)
    cases["heart"] = _case(tmp_path / "s", "heart", (full > 0), {"annotated": ["background"]})
    content = task.dataset(FakeDatastore(cases), tmp_path / "d3")
    assert [c["case"] for c in content["validation"]] == ["full"]
    assert {c["case"]: c["annotated"] for c in content["training"]}["heart"] == ["background"]
    task.check(content, overrides)

    # the marginal task holds the full case out regardless (unchanged)
    marginal = PartialLabelTrainTask(_copy_bundle("marginal_exclusion_abdomen", tmp_path), DCL_CLASSES)
    with pytest.raises(ValueError, match="no labelled 3D image"):
        marginal.dataset(FakeDatastore({k: v for k, v in cases.items() if k != "volume"}), tmp_path / "d4")


def test_dcl_install_replaces_model_and_bank(tmp_path):
    task = ConditionalTrainTask(_copy_bundle("dcl_cardiac", tmp_path), DCL_CLASSES)
    run = tmp_path / "run"
    overrides = task.output_overrides(run)
    with pytest.raises(RuntimeError, match=r"the run wrote no \['support_bank.pt', 'model.pt'\]"):
        task.install(run, overrides)
    (run / "models").mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, run / "models" / "model.pt")
    torch.save({"b": torch.zeros(2)}, run / "models" / "support_bank.pt")
    served = task.bundle_root / "models"
    served.mkdir()
    torch.save({"w": torch.zeros(2)}, served / "model.pt")
    assert task.install(run, overrides) == {"support_bank": str(served / "support_bank.pt"), "checkpoint": str(served / "model.pt")}
    assert torch.equal(torch.load(served / "model.pt", weights_only=True)["w"], torch.ones(2))
    assert (served / "support_bank.pt").read_bytes() == (run / "models" / "support_bank.pt").read_bytes()
    assert sorted(p.name for p in served.iterdir()) == ["model.pt", "support_bank.pt"]  # no temporary left
    assert (run / "models" / "model.pt").is_file()  # the run keeps its own copy


def test_request_values_are_checked_before_any_run_folder(tmp_path):
    task = PartialLabelTrainTask(_copy_bundle("marginal_exclusion_abdomen", tmp_path), ["background", "liver", "spleen"])
    # the task's advertised defaults apply (train.json's val_interval is 5: 2 epochs would save no model)
    assert task.request_values({"max_epochs": 2}) == {"max_epochs": 2, "iterations_per_epoch": 20, "val_interval": 1, "overrides": {}}
    got = task.request_values({"max_epochs": "3", "val_interval": "1", "learning_rate": "1e-4", "overrides": {"train#trainer#amp": False}})
    assert got["max_epochs"] == 3 and got["val_interval"] == 1 and got["learning_rate"] == 1e-4
    plain = {"pixdim": [9, 9.0, 8], "sampling": "source", "num_workers": 0, "validate#dataloader#batch_size": 2, "learning_rate": 1e-3, "train::trainer::amp": True}
    assert task.request_values({"overrides": plain})["overrides"] == plain
    for request, match in [
        ({"max_epochs": 0}, "max_epochs must be positive"),
        ({"max_epochs": -1}, "max_epochs must be positive"),
        ({"max_epochs": "two"}, "max_epochs must be an integer, got 'two'"),
        ({"max_epochs": 1.7}, "max_epochs must be an integer, got 1.7"),
        ({"max_epochs": True}, "max_epochs must be an integer"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"overrides": '{"a": 1}'}, "overrides must be an object"),
        ({"overrides": {"learnig_rate": 1e-3}}, "'learnig_rate' \\(did you mean 'learning_rate'\\?\\)"),
        # bounded, finite (issue 13: 1e300 epochs were launched, "inf" left a run folder)
        ({"max_epochs": 1e300}, "max_epochs must be at most 1000"),
        ({"max_epochs": "1e300"}, "max_epochs must be at most 1000"),
        ({"learning_rate": "inf"}, "learning_rate must be at most 1"),
        ({"learning_rate": "nan"}, "learning_rate must be a number"),
        ({"batch_size": 100000}, "batch_size must be at most 512"),
        ({"iterations_per_epoch": 10**7}, "iterations_per_epoch must be at most 10000"),
        # override values: plain JSON of the default's type, never a config expression
        ({"overrides": {"learning_rate": "$__import__('os').system('touch /tmp/x') and 3e-4"}}, "is a config expression"),
        ({"overrides": {"num_workers": "@batch_size"}}, "is a config expression"),
        ({"overrides": {"sampling": "%configs/inference.json#network_def"}}, "is a config expression"),
        ({"overrides": {"sampling": "case#x"}}, "is a config expression"),
        ({"overrides": {"train#trainer#amp": "yes"}}, "must be a boolean"),
        ({"overrides": {"train#dataloader#shuffle": False}}, "is not a plain value"),
        ({"overrides": {"num_workers": 1.5}}, "must be an integer"),
        ({"overrides": {"lambda_marginal": float("inf")}}, "must be finite"),
        ({"overrides": {"pixdim": [1, 2]}}, "must be a list of 3 plain values"),
        ({"overrides": {"pixdim": {"_target_": "os.system"}}}, "must be a list of 3"),
        ({"overrides": {"learning_rate": 5.0}}, "learning_rate'\\] must be at most 1"),
        ({"overrides": {"validate#dataloader#batch_size": 10**6}}, "batch_size'\\] must be at most 512"),
        ({"overrides": {"num_workers": 10**6}}, "num_workers'\\] must be at most 64"),
        ({"overrides": {"num_workers": -1}}, "num_workers'\\] must be >= 0"),
        ({"overrides": {"ckpt_dir": "/tmp"}}, "sets 'ckpt_dir' itself"),
        ({"overrides": {"output_dir": "/tmp"}}, "sets 'output_dir' itself"),
        ({"overrides": {"network_def#_target_": "os.system"}}, "component keys \\(_target_\\)"),
        ({"overrides": {"network_def": "x"}}, "is not a plain value"),
        ({"overrides": {"train#nothing": 1}}, "has no such id"),
    ]:
        with pytest.raises(RequestError, match=match) as e:
            task({**request}, FakeDatastore({}))
        assert e.value.status_code == 400 and "marginal_exclusion_abdomen" in e.value.detail
    assert not (task.bundle_root / "runs").exists() or not any((task.bundle_root / "runs").iterdir())
    # a datastore that cannot train leaves no run folder either
    with pytest.raises(ValueError, match="no labelled 3D image"):
        task({"max_epochs": 2}, FakeDatastore({}))
    assert not any((task.bundle_root / "runs").iterdir())


def test_annotated_entries_must_be_class_names_or_indices(tmp_path):
    task = PartialLabelTrainTask(_copy_bundle("marginal_exclusion_abdomen", tmp_path), ["background", "liver", "spleen"])
    label = _case(tmp_path / "s", "v", np.ones((4, 4, 4)))[1]
    assert task._annotated(str(label), {"annotated": [1, "2", "spleen"]}) == ["liver", "spleen", "spleen"]
    for bad, match in [([-1], r"index -1 is outside 0..2"), ([99], "index 99 is outside"), (True, "True must be a class name"),
                       (["heart"], "'heart' is not one of")]:
        with pytest.raises(ValueError, match=match):
            task._annotated(str(label), {"annotated": bad})


def test_nrrd_labels_and_hw1_slices(tmp_path):
    nrrd = pytest.importorskip("nrrd")

    task = PartialLabelTrainTask(_copy_bundle("marginal_exclusion_abdomen", tmp_path), ["background", "liver", "spleen"])
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1, 1, 1] = 2
    path = tmp_path / "v.nrrd"
    nrrd.write(str(path), lab, {"space": "left-posterior-superior", "space directions": np.eye(3), "space origin": np.zeros(3)})
    assert task._annotated(str(path), {}) == ["spleen"]  # values read from NRRD too (Slicer saves it)
    flat = {"flat": _case(tmp_path / "s", "flat", np.ones((8, 8, 1)), {"annotated": ["liver"]})}
    with pytest.raises(ValueError, match="no labelled 3D image"):  # an (H, W, 1) slice is 2D for every bundle
        task.dataset(FakeDatastore(flat), tmp_path / "d")


def test_dcl_is_listed_only_with_its_support_bank(tmp_path):
    from partialseg.monailabel.tasks import BundleInferTask

    root = _copy_bundle("dcl_cardiac", tmp_path)
    (root / "models").mkdir()
    torch.save({}, root / "models" / "model.pt")
    assert not BundleInferTask(root).is_valid()
    torch.save({}, root / "models" / "support_bank.pt")
    assert BundleInferTask(root).is_valid()
    marginal = _copy_bundle("marginal_exclusion_abdomen", tmp_path)
    (marginal / "models").mkdir()
    torch.save({}, marginal / "models" / "model.pt")
    assert BundleInferTask(marginal).is_valid()


def test_app_folder_keeps_edits_and_foreign_apps(tmp_path):
    from partialseg.monailabel.__main__ import MAIN_PY, init_app, main
    from partialseg.monailabel.app import _install

    dst = tmp_path / "app" / "model" / "dcl_cardiac"
    _install(BUNDLES / "dcl_cardiac", dst)
    edited = dst / "configs" / "inference.json"
    edited.write_text(edited.read_text().replace('"num_samples": 9', '"num_samples": 1'))
    _install(BUNDLES / "dcl_cardiac", dst)  # a later start (or a training process) keeps the edit
    assert '"num_samples": 1' in edited.read_text()
    assert (init_app(tmp_path / "app") / "main.py").read_text() == MAIN_PY
    other = tmp_path / "other"
    other.mkdir()
    (other / "main.py").write_text("# another MONAI Label app\n")
    assert main(["init", str(other)]) == 2
    assert (other / "main.py").read_text() == "# another MONAI Label app\n"


@pytest.mark.parametrize("shape", [(6, 5, 4), (6, 5)])
def test_results_in_the_format_a_client_asks_for(tmp_path, shape):
    from monai.transforms import LoadImage

    from partialseg.monailabel.tasks import convert_result

    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 2.0]
    lab = np.random.default_rng(0).integers(0, 3, size=shape).astype(np.uint8)
    src = tmp_path / "r.nii.gz"
    nib.save(nib.Nifti1Image(lab, affine), str(src))
    assert convert_result(str(src)) == str(src) and convert_result(str(src), ".nii.gz") == str(src)  # unchanged
    before = LoadImage(image_only=True)(str(src))
    out = convert_result(str(src), ".nrrd", "uint8")  # what OHIF's MONAI Label plugin asks for
    assert out.endswith(".nrrd") and not src.exists()
    after = LoadImage(image_only=True)(out)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    if len(shape) == 3:
        np.testing.assert_allclose(np.asarray(after.affine), np.asarray(before.affine), atol=1e-5)


def test_the_datastore_refuses_names_that_leave_it(tmp_path):
    from partialseg.monailabel.datastore import SafeDatastore

    studies, outside = tmp_path / "studies", tmp_path / "outside"
    studies.mkdir()
    outside.mkdir()
    image = _case(tmp_path / "src", "case", np.ones((4, 4, 4)))[0]
    store = SafeDatastore(str(studies))
    assert store.add_image("case", str(image), {}) == "case"
    label = tmp_path / "src" / "upload.nii.gz"
    shutil.copy(image, label)
    for image_id, tag, match in [
        ("case", "../../outside/x", "tag '../../outside/x' is not a safe name"),
        ("case", str(outside), "is not a safe name"),  # an absolute tag
        ("case", "..", "is not a safe name"),
        ("../case", "final", "image '../case' is not a safe name"),
    ]:
        with pytest.raises(RequestError, match=match):
            store.save_label(image_id, str(label), tag, {})
    with pytest.raises(RequestError, match="image '../outside/y' is not a safe name"):
        store.add_image("../outside/y", str(image), {})
    # a tag folder that is a link out of the datastore: refused by the resolved path
    (studies / "labels").mkdir(exist_ok=True)
    (studies / "labels" / "linked").symlink_to(outside)
    with pytest.raises(RequestError, match="outside the datastore"):
        store.save_label("case", str(label), "linked", {})
    assert list(outside.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["outside", "src", "studies"]
    assert store.save_label("case", str(label), "final", {"annotated": ["liver"]}) == "case"
    assert (studies / "labels" / "final" / "case.nii.gz").is_file()
    # the app's check of `annotated` runs before anything is written
    checked = SafeDatastore(str(studies), check_label_info=lambda i, info: (_ for _ in ()).throw(ValueError(f"{i}: bad {info}")))
    with pytest.raises(RequestError, match="case: bad"):
        checked.save_label("case", str(label), "other", {"annotated": ["heart"]})
    assert not (studies / "labels" / "other").exists()


@pytest.mark.slow
def test_dtml_trains_on_labelled_and_unlabelled_images_and_serves_both_networks(tmp_path):
    """The semi-supervised task: unlabelled datastore images join the training split, the run
    samples two streams, model.pt (M_s) and model_sdm.pt (M_d) are served, inference answers."""
    from bundle_harness import DTML

    from partialseg.data import ensure_dataset, load_dataset
    from partialseg.monailabel.tasks import BundleInferTask, SemiSupervisedTrainTask

    root = _copy_bundle("dtml_atrium", tmp_path)
    task = bundle_train_task(root, overrides=DTML.small, max_epochs=2)
    assert type(task) is SemiSupervisedTrainTask and task.classes == ["background", "left_atrium"] and task.dimension == 3
    assert task.served == [("sdm_network", "model_sdm.pt"), ("checkpoint", "model.pt")]
    data = load_dataset(ensure_dataset(tmp_path / "atrium3d", "atrium3d", **DTML.data))
    train = data.datalist("training")
    labelled = {c["case"]: (Path(c["image"]), Path(c["label"]), {}) for c in train if c.get("label")}
    unlabelled = {c["case"]: Path(c["image"]) for c in train if not c.get("label")}
    unlabelled["slice"] = _case(tmp_path / "s", "slice", np.zeros((8, 8)))[0]  # 2D: left out of a 3D bundle
    assert len(labelled) == len(unlabelled) - 1 == 2

    class Studies(FakeDatastore):  # with images that have no label
        def __init__(self, cases, images):
            super().__init__(cases)
            self.images = images

        def list_images(self):
            return list(self.cases) + list(self.images)

        def get_image_uri(self, image_id):
            return str(self.images[image_id]) if image_id in self.images else super().get_image_uri(image_id)

    content = task.dataset(Studies(labelled, unlabelled), tmp_path / "d")
    assert {c["case"]: c.get("annotated") for c in content["training"]} == {
        **{k: ["left_atrium"] for k in labelled}, **{k: None for k in unlabelled if k != "slice"}}
    assert [c["case"] for c in content["validation"]] == sorted(labelled)  # nothing held out: the few labels all train
    assert task.data_overrides(content) == {}  # two streams: labelled + unlabelled
    assert task.data_overrides(task.dataset(Studies(labelled, {}), tmp_path / "d2")) == {"sampling": "case"}

    stats = task({"max_epochs": 2, "iterations_per_epoch": 3}, Studies(labelled, unlabelled))
    models = task.bundle_root / "models"
    assert stats["cases"] == 4 and stats["epochs"] == 2
    assert stats["sdm_network"] == str(models / "model_sdm.pt") and stats["checkpoint"] == str(models / "model.pt")
    run = Path(stats["run_dir"])
    config = json.loads(next(run.glob("config_*.json")).read_text())
    assert config["sampling"] == "two_stream" and config["epochs"] == 2 and config["val_split"] == "validation"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iteration"] == list(range(1, 7)) and len(metrics["metrics"]["val_mean_dice"]) == 2
    print(f"DTML through the train task: {stats['train_time']:.1f} s in the subprocess")

    infer = BundleInferTask(task.bundle_root, overrides=DTML.grid)
    assert infer.is_valid()
    image = data.datalist("test")[0]["image"]
    result, info = infer({"image": image})
    assert nib.load(result).shape == nib.load(image).shape and info["label_names"] == {"left_atrium": 1}


def test_atlas_task_reads_modalities_builds_the_atlas_and_refuses_missing_modalities_and_organs(tmp_path):
    """The atlas train task: each image's modality from its label info, else its image info; the
    atlas built from the datastore's labels before the run; refused, naming them, before any run:
    an image without a modality, a modality without an intensity entry, organs no label annotates."""
    from partialseg.data import ensure_dataset, load_dataset
    from partialseg.monailabel.train import AtlasTrainTask

    root = _copy_bundle("atlas_multimodal_abdomen", tmp_path)
    task = bundle_train_task(root, max_epochs=2)
    assert type(task) is AtlasTrainTask and task.dimension == 3 and task.served == [("checkpoint", "model.pt")]
    assert task.classes == ["background", "liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach"]
    data = load_dataset(ensure_dataset(tmp_path / "abdomen3d", "abdomen3d", size=24, num_train=1, num_test=1, num_val=0, modality="CT+MR"))
    train = {c["case"]: c for c in data.datalist("training")}
    assert sorted(train) == ["ct_a_000", "ct_b_001", "mr_002"]
    # the CT liver/stomach label says what it annotates and its modality; the other two carry neither:
    # their organs are read from the label values, their modality from the image info
    cases = {k: (c["image"], c["label"], {"annotated": ["liver", "stomach"], "modality": "CT"} if k == "ct_a_000" else {})
             for k, c in train.items()}  # fmt: skip
    images = {"ct_b_001": {"modality": "CT"}, "mr_002": {"modality": "MR"}, "ct_a_000": {"modality": "MR"}}  # the label's wins
    content = task.dataset(FakeDatastore(cases, images), tmp_path / "run" / "dataset")
    assert {c["case"]: (c["modality"], c["annotated"]) for c in content["training"]} == {
        "ct_a_000": ("CT", ["liver", "stomach"]), "ct_b_001": ("CT", ["kidney_left", "kidney_right"]), "mr_002": ("MR", ["spleen", "pancreas"])}
    overrides = {"dataset_dir": str(tmp_path / "run" / "dataset")}
    task.check(content, overrides)  # builds the atlas where the run reads it
    side = json.loads((tmp_path / "run" / "dataset" / "atlas.json").read_text())
    assert side["classes"] == task.classes and side["counts"] == {c: 1 for c in task.classes[1:]}
    assert task.output_overrides(tmp_path / "run")["atlas_file"] == str(tmp_path / "run" / "dataset" / "atlas.nii.gz")

    def refused(cases, images, match):
        folder = tmp_path / f"refused{len(list(tmp_path.glob('refused*')))}"
        content = task.dataset(FakeDatastore(cases, images), folder)
        with pytest.raises(ValueError, match=match):
            task.check(content, {"dataset_dir": str(folder)})
        assert not (folder / "atlas.nii.gz").exists()

    refused(cases, {"mr_002": {"modality": "MR"}}, r"labelled image\(s\) \['ct_b_001'\] have no modality.*image/info")
    refused(cases, {**images, "mr_002": {"modality": "PET"}}, r"modality of \{'mr_002': 'PET'\} is not one of \['CT', 'MR'\]")
    refused({k: v for k, v in cases.items() if k != "mr_002"}, images,
            r"organ\(s\) \['spleen', 'pancreas'\] are annotated by no labelled image")  # fmt: skip
    # through the task: refused before any run folder is kept, nothing trained
    with pytest.raises(ValueError, match="have no modality"):
        task({"max_epochs": 1}, FakeDatastore(cases, {}))
    assert not list((root / "runs").iterdir()) and not (root / "models").exists()
    # a request may not point the run at another atlas
    with pytest.raises(RequestError, match="sets 'atlas_file' itself"):
        task.request_values({"overrides": {"atlas_file": "/tmp/other.nii.gz"}})
