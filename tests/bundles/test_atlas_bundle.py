"""The atlas bundle through ``python -m monai.bundle run``: training, inference, evaluation, bad atlas.

Tiny data (synthetic abdomen3d ``--modality CT+MR`` at 24^3 voxels: 2 cases per task ct_a / ct_b /
mr, one CT and one MR test case), 16^3 patches, a 5-level AtlasUNet of 8-32 filters, a 3-level APRN
of 8 filters, a 3-layer AMAN at the config's half resolution (8 voxels per dimension is what three
stride-2 layers need) and the three MICPAM scales. The tests check the configs: the atlas is built on first run beside
``dataset.json``, every network, optimiser and the prototypes are checkpointed, the loss falls,
predictions land on the input grid and are scored intramodal vs cross-modal, an atlas of other
classes is refused naming both lists. ``benchmarks/atlas_ablation.py`` measures accuracy.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from bundle_harness import BundleSpec, assert_ok, check_inference_and_evaluation

pytestmark = pytest.mark.slow

ATLAS = BundleSpec(
    name="atlas_multimodal_abdomen",
    family="abdomen3d",
    data={"size": 24, "num_train": 2, "num_test": 2, "num_val": 0, "modality": "CT+MR"},
    small={"patch_size": [16, 16, 16], "network_def#filters": [8, 8, 16, 16, 32], "refiner_def#filters": [8, 8, 8],
           "discriminator_def#channels": [8, 8, 8], "iterations_per_epoch": 4, "learning_rate": 3e-3,
           "progress": False},
    grid_keys=(),  # inference reads the grid, atlas shape and filters from models/model.settings.json
    foreground=frozenset({"liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach"}),
)
EPOCHS = 8  # x 4 iterations
TERMS = ("loss", "seg", "loss_refiner")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp(ATLAS.name)
    return root, ATLAS.train_once(root, epochs=EPOCHS)


def _terms(log: str) -> dict[str, list[float]]:
    """Per-iteration terms of the StatsHandler lines (``... -- adv: 1.73 loss: 1.77 ...``)."""
    out: dict[str, list[float]] = {k: [] for k in TERMS}
    for line in log.splitlines():
        if "Iter:" not in line:
            continue
        values = dict(re.findall(r"(\w+): ([-\d.]+)", line.split("--", 1)[1]))
        for k in TERMS:
            out[k].append(float(values[k]))
    return out


def test_atlas_built_checkpoints_hold_every_module_and_the_loss_falls(trained):
    root, run = trained
    data = root / "data" / "abdomen3d"
    side = json.loads((data / "atlas.json").read_text())  # built on first run, beside dataset.json
    assert side["classes"] == json.loads((data / "dataset.json").read_text())["classes"]
    assert side["counts"] == {c: 2 for c in ATLAS.foreground}  # every organ annotated by its own task's 2 cases

    iterations = EPOCHS * ATLAS.small["iterations_per_epoch"]
    metrics = json.loads((root / "runs" / "train" / "metrics.json").read_text())
    assert metrics["iteration"] == list(range(1, iterations + 1))
    terms = _terms(run.stdout + run.stderr)
    assert all(len(v) == iterations for v in terms.values())
    first, last = ({k: np.mean(v[s]) for k, v in terms.items()} for s in (slice(0, 8), slice(-8, None)))
    print("atlas tiny run (first 8 -> last 8 iterations):", {k: f"{first[k]:.3f} -> {last[k]:.3f}" for k in TERMS})
    assert last["loss"] < first["loss"] and last["seg"] < first["seg"]  # learning happened
    assert last["loss_refiner"] < 0.9 * first["loss_refiner"]  # APRN learns on the labelled organs
    for k in ("adv", "pseudo", "proto", "loss_discriminator"):  # every module ran
        assert f"{k}:" in run.stdout + run.stderr

    # the resume checkpoint and models/model_all.pt hold every network, optimiser and the prototypes
    modules = ["discriminator", "discriminator_optimizer", "network", "optimizer", "prototypes",
               "prototypes_optimizer", "refiner", "refiner_optimizer"]
    ckpt = torch.load(root / "runs" / "train" / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert sorted(ckpt) == sorted(modules + ["lr_scheduler", "trainer"])
    assert ckpt["trainer"]["iteration"] == iterations and ckpt["lr_scheduler"]["last_epoch"] == iterations
    assert {"prototypes_0", "prototypes_1", "prototypes_2", "updates_0"} <= set(ckpt["prototypes"])
    assert ckpt["prototypes"]["updates_0"].sum() > 0  # EMA updates happened and are saved
    full = torch.load(root / "models" / "model_all.pt", weights_only=True, map_location="cpu")
    assert set(modules) <= set(full)
    # models/model.pt is the main network alone (what inference and ckpt_export load)
    main = torch.load(root / "models" / "model.pt", weights_only=True, map_location="cpu")
    torch.testing.assert_close({k: v for k, v in main.items() if isinstance(v, torch.Tensor)}, ckpt["network"])
    settings = json.loads((root / "models" / "model.settings.json").read_text())
    assert settings["settings"]["atlas_shape"] == side["shape"]


def test_inference_and_evaluation_by_modality(trained):
    root = trained[0]
    _, r = check_inference_and_evaluation(ATLAS, root, num_cases=2)
    summary = json.loads((root / "eval" / "summary.json").read_text())
    groups = summary["modality"]
    print("atlas tiny run, test Dice: overall", summary["overall"], "intramodal", groups["intramodal"]["dice"],
          "cross-modal", groups["cross_modal"]["dice"])
    assert set(groups) >= {"intramodal", "cross_modal"}
    assert "intramodal" in r.stdout and "cross_modal" in r.stdout


def test_an_atlas_of_other_classes_is_refused_naming_both(trained, tmp_path):
    data = tmp_path / "data" / "abdomen3d"
    shutil.copytree(trained[0] / "data" / "abdomen3d", data)  # the tiny dataset, without regenerating it
    (data / "atlas.nii.gz").unlink()
    classes = json.loads((data / "dataset.json").read_text())["classes"]
    from partialseg.data.atlas import build_atlas

    build_atlas(data, sigma=0.0, progress=False)
    side = json.loads((data / "atlas.json").read_text())
    side["classes"] = ["background", "liver", "spleen", "kidney", "pancreas", "stomach", "duodenum"]
    (data / "atlas.json").write_text(json.dumps(side))
    r = ATLAS.run(tmp_path, epochs=1, **ATLAS.small)
    assert r.returncode != 0
    assert "duodenum" in r.stderr and "kidney_left" in r.stderr  # both lists named
    assert not (tmp_path / "models" / "model.pt").exists()
    assert "kidney_left" in classes


def test_resume_restores_every_module_and_the_prototypes(trained):
    root = trained[0]
    path = root / "runs" / "train" / "checkpoint.pt"
    before = torch.load(path, weights_only=True, map_location="cpu")
    r = assert_ok(ATLAS.run(root, epochs=EPOCHS + 1, **ATLAS.small))  # one more epoch on top of the saved run
    iterations = EPOCHS * ATLAS.small["iterations_per_epoch"]
    assert len(_terms(r.stdout + r.stderr)["loss"]) == ATLAS.small["iterations_per_epoch"]  # only the new epoch ran
    after = torch.load(path, weights_only=True, map_location="cpu")
    assert after["trainer"]["iteration"] == iterations + ATLAS.small["iterations_per_epoch"]
    assert after["lr_scheduler"]["last_epoch"] == after["trainer"]["iteration"]  # the poly schedule went on
    # the EMA update counts continue from the saved ones (a fresh MICPAM would restart at 0)
    for s in range(3):
        assert (after["prototypes"][f"updates_{s}"] >= before["prototypes"][f"updates_{s}"]).all()
        assert after["prototypes"][f"updates_{s}"].sum() > before["prototypes"][f"updates_{s}"].sum()
    for name in ("optimizer", "refiner_optimizer", "discriminator_optimizer", "prototypes_optimizer"):
        steps = [int(v["step"]) for v in after[name]["state"].values()]
        assert steps and min(steps) == after["trainer"]["iteration"], name  # Adam's step counts carried on


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_intensity_by_modality_ct_window_mr_zscore_and_an_unknown_modality_is_refused(tmp_path, config):
    from monai.bundle import ConfigParser

    from partialseg.transforms import ModalityIntensityd

    parser = ConfigParser()
    parser.read_config(str(ATLAS.path / "configs" / config))
    parser["bundle_root"] = str(tmp_path)
    normalise = parser.get_parsed_content("normalise")
    assert isinstance(normalise, ModalityIntensityd)
    pipeline = parser.get("deterministic_transforms" if config == "train.json" else "preprocessing#transforms")
    assert pipeline.count("@normalise") == 1  # the preprocessing applies it
    image = torch.tensor([[-1000.0, -325.0, 0.0, 162.5, 325.0, 2000.0]])
    ct = normalise({"image": image, "modality": "CT", "case": "a"})["image"]
    torch.testing.assert_close(ct, torch.tensor([[-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]]))  # +-325 HU -> [-1, 1]
    mr = normalise({"image": image, "modality": "MR", "case": "b"})["image"]
    assert abs(float(mr.mean())) < 1e-5 and abs(float(mr.std()) - 1) < 1e-5
    with pytest.raises(ValueError, match="modality 'PET' of case 'c' has no intensity scheme .*known modalities: 'CT', 'MR'"):
        normalise({"image": image, "modality": "PET", "case": "c"})
    with pytest.raises(ValueError, match="case 'd' has no modality and no default_modality"):
        normalise({"image": image, "case": "d"})
    parser["default_modality"] = "CT"  # used for a case without a modality (e.g. a served image)
    torch.testing.assert_close(parser.get_parsed_content("normalise", lazy=False)({"image": image})["image"], ct)


def test_metadata_declares_the_atlas_monai_label_train_task_and_the_classes():
    from partialseg.monailabel.bundle import bundle_classes, read_declaration

    # trained through MONAI Label by AtlasTrainTask (tests/monailabel/test_atlas_server.py); served: model.pt alone
    declaration = read_declaration(ATLAS.path)
    assert declaration.train_task == "atlas" and declaration.model_files == ()
    assert bundle_classes(ATLAS.path) == ["background", "liver", "spleen", "kidney_left", "kidney_right", "pancreas",
                                          "stomach"]
