"""The DTML bundle through ``python -m monai.bundle run``: training, inference, evaluation, and its data pipeline.

Tiny data (synthetic atrium3d at 24^3 voxels: 2 labelled and 2 unlabelled training volumes, 2 test
volumes) and a 3-level UNet of 4-16 channels: these tests check the configs (two networks saved,
two-stream batches of 2 labelled + 2 unlabelled, the SDM target when ``L_dis`` is on, the
step-decay schedule, predictions on the input grid with one connected component, the
``--average`` option) and that training lowers the loss; ``benchmarks/dtml_ablation.py`` measures
accuracy. The shared checks live in ``tests/bundle_harness.py``.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_harness import DTML, assert_ok, check_inference_and_evaluation
from scipy import ndimage

pytestmark = pytest.mark.slow

EPOCHS = 8  # x 6 iterations: enough for the loss to fall clearly from random weights


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp(DTML.name)
    return root, DTML.train_once(root, epochs=EPOCHS)


def _parser(root, config="train.json", **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(DTML.path / "configs" / config))
    parser.update({"bundle_root": str(root), **DTML.small, **overrides})
    return parser


def test_training_lowers_the_loss_and_saves_both_networks(trained):
    root, run = trained
    iterations = EPOCHS * DTML.small["iterations_per_epoch"]
    metrics = json.loads((root / "runs" / "train" / "metrics.json").read_text())
    assert metrics["iteration"] == list(range(1, iterations + 1))
    loss = metrics["loss"]
    print(f"DTML tiny run: loss {np.mean(loss[:6]):.3f} (first 6 iterations) -> {np.mean(loss[-6:]):.3f} (last 6)")
    assert np.mean(loss[-6:]) < 0.9 * np.mean(loss[:6])  # learning happened
    # every term is logged per iteration, the consistency weight ramps up
    log = run.stdout + run.stderr
    assert "con_weight:" in log and "mask:" in log and "seg:" in log
    assert list((root / "runs" / "train").glob("events.out.tfevents.*"))

    # models/model.pt is M_s (what inference and ckpt_export load), models/model_sdm.pt M_d
    parser = _parser(root, "inference.json", average=True)
    seg, sdm = (parser.get_parsed_content(k).cpu() for k in ("network_def", "sdm_network_def"))  # on CUDA when there is one
    seg.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True, map_location="cpu"))
    sdm.load_state_dict(torch.load(root / "models" / "model_sdm.pt", weights_only=True, map_location="cpu"))
    # the resume checkpoint holds both networks, both optimisers, both LR schedules and the iteration
    ckpt = torch.load(root / "runs" / "train" / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert sorted(ckpt) == ["lr_scheduler", "sdm", "sdm_lr_scheduler", "sdm_optimizer", "seg", "seg_optimizer", "trainer"]
    assert ckpt["trainer"]["iteration"] == iterations
    assert ckpt["lr_scheduler"]["last_epoch"] == ckpt["sdm_lr_scheduler"]["last_epoch"] == iterations
    torch.testing.assert_close(ckpt["seg"], seg.state_dict())


def test_inference_and_evaluation_land_on_the_input_grid(trained, tmp_path):
    root = trained[0]
    cases, r = check_inference_and_evaluation(DTML, root, num_cases=2)
    summary = json.loads((root / "eval" / "summary.json").read_text())
    print("DTML tiny run, test Dice:", summary["per_class"]["left_atrium"])
    for case in cases:  # the largest connected component only (26-connected, as MONAI's and the reference code's)
        pred = np.asarray(nib.load(str(root / "eval" / "pred" / f"{case['case']}_seg.nii.gz")).dataobj)
        assert ndimage.label(pred > 0, structure=np.ones((3, 3, 3)))[1] <= 1

    # --average true: the mean of M_s's and M_d's masks, M_d loaded from models/model_sdm.pt
    out = tmp_path / "avg"
    r = assert_ok(DTML.run(root, configs=("inference.json",), average=True, output_dir=str(out), **DTML.grid))
    assert f"Restored all variables from {root / 'models' / 'model_sdm.pt'}" in r.stdout + r.stderr
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == sorted(f"{c['case']}_seg.nii.gz" for c in cases)
    # without M_d's checkpoint, --average is refused naming the file
    r = DTML.run(root, configs=("inference.json",), average=True, output_dir=str(tmp_path / "none"),
                 sdm_checkpoint=str(tmp_path / "missing_sdm.pt"), **DTML.grid)
    assert r.returncode != 0 and f"checkpoint {tmp_path / 'missing_sdm.pt'} does not exist" in r.stderr


def test_batches_hold_two_labelled_then_two_unlabelled_z_scored_crops(tmp_path):
    DTML.make_data(tmp_path)
    parser = _parser(tmp_path)
    loader = parser.get_parsed_content("train#dataloader")
    assert len(loader) == DTML.small["iterations_per_epoch"]  # one sampler epoch = one trainer epoch
    batches = list(loader)
    for batch in batches:
        assert tuple(batch["image"].shape) == (4, 1, 16, 16, 16) and tuple(batch["label"].shape) == (4, 2, 16, 16, 16)
        unknown = (batch["label"] == 0.5).flatten(1).all(1)  # an unlabelled case: all p
        assert unknown.tolist() == [False, False, True, True]
        assert "sdm" not in batch  # L_dis is off by default: no SDM computed
    # the volumes are z-scored before cropping (per volume, as the reference code)
    det = parser.get_parsed_content("deterministic_transforms")
    from monai.transforms import Compose

    image = Compose(det)(parser.get_parsed_content("train#datalist")[0])["image"]
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1) < 1e-2


def test_the_sdm_target_with_l_dis_on(tmp_path):
    DTML.make_data(tmp_path)
    dataset = _parser(tmp_path, dis_weight=1.0).get_parsed_content("train#dataset")
    labelled = [i for i, c in enumerate(dataset.data) if c.get("label")]
    item = next(d for d in (dataset[labelled[0]] for _ in range(20)) if (d["label"][1] == 1).any())
    sdm, inside = np.asarray(item["sdm"]), np.asarray(item["label"][1:] == 1)
    assert sdm.shape == (1, 16, 16, 16) and sdm.min() >= -1 and sdm.max() <= 1
    assert (sdm[inside] <= 0).all() and (sdm[inside] < 0).any() and (sdm[~inside] >= 0).all()  # negative inside (0 on its boundary)
    unlabelled = dataset[next(i for i, c in enumerate(dataset.data) if not c.get("label"))]
    assert not np.asarray(unlabelled["sdm"]).any()  # nothing known: an all-zero map (L_dis skips it)


def test_a_training_split_without_unlabelled_cases_is_refused_for_two_streams(tmp_path):
    DTML.make_data(tmp_path, labelled_fraction=1.0)
    with pytest.raises(Exception) as err:  # monai.bundle wraps the error; the cause says what is missing
        _parser(tmp_path).get_parsed_content("train#sampler")
    assert "both streams need at least one item (primary: 4, secondary: 0)" in str(err.value.__cause__)
    assert _parser(tmp_path, sampling="case").get_parsed_content("train#sampler") is None  # labelled cases alone


def test_the_learning_rate_decays_by_step_per_iteration(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(DTML.path / "configs" / "train.json"))
    parser.update({"bundle_root": str(tmp_path), "device": "$torch.device('cpu')", "network_def#channels": [4, 8], "network_def#strides": [2]})
    sched = parser.get_parsed_content("lr_scheduler")
    opt = parser.get_parsed_content("optimizer")
    lrs = []
    for _ in range(600):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # the CPU default, the paper's schedule / 10: 0.01, x0.1 after 250 and 500 of 600 iterations (paper: 2500, 5000 of 6000)
    assert lrs[0] == lrs[249] == 0.01 and lrs[250] == pytest.approx(1e-3) and lrs[499] == pytest.approx(1e-3)
    assert lrs[500] == lrs[-1] == pytest.approx(1e-4)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4
    # the ramp reaches its maximum at the end of the schedule: ramp_scale x ramp_length = the iterations
    assert parser["epochs"] * parser["iterations_per_epoch"] == parser["ramp_scale"] * parser["ramp_length"] == 600
