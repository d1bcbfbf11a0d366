"""The hybrid-supervision bundle (``hybrid_polyp``) through ``python -m monai.bundle run``.

Tiny data (synthetic polyp2d, hybrid preset, 32 x 32: 3 strong and 9 weak training masks, 2 test
frames) and a tiny schedule (3 iterations per epoch, batches of 2 pairs, an indicator update every
2 iterations). The training run is killed (SIGKILL) after its first resume checkpoint and run again
with the same command: it must continue from the checkpoint with both networks, both optimisers
and the indicators restored. Then: the gamma report (CSV + histogram), inference with network 1
(and the average of both), evaluation (Dice, ASSD), two gloo ranks under ``torchrun``, and the bad
inputs each refused naming the case or file. ``benchmarks/hybrid_ablation.py`` measures accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from partialseg.data import DatasetError, ensure_dataset, load_dataset
from partialseg.engines import bundle_command, run_bundle

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "hybrid_polyp"
CFG = BUNDLE / "configs"
DATA = {"preset": "hybrid", "size": 32, "num_train": 12, "num_test": 2, "num_strong": 3}
SMALL = {"spatial_size": [32, 32], "iterations_per_epoch": 3, "pairs_per_batch": 2, "tau": 2, "indicator_batch_size": 16,
         "progress": False}  # fmt: skip
EPOCHS = 4  # x 3 iterations; a resume checkpoint every 2
ENV = dict(os.environ, OMP_NUM_THREADS="1")

pytestmark = pytest.mark.slow


def make_data(root: Path, **overrides) -> Path:
    return Path(ensure_dataset(root / "data" / "polyp2d", "polyp2d", **{**DATA, **overrides}))


def parser(root: Path, config: str = "train.json", **overrides):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config(str(CFG / config))
    p.update({"bundle_root": str(root), **SMALL, **overrides})
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train, SIGKILL after the first resume checkpoint, train again with the same command."""
    root = tmp_path_factory.mktemp("hybrid_polyp")
    make_data(root)
    cmd = bundle_command(BUNDLE, root, ("train.json",), epochs=EPOCHS, checkpoint_interval=2, **SMALL)
    ckpt = root / "runs" / "train" / "checkpoint.pt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 240
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = torch.load(ckpt, weights_only=True, map_location="cpu")
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root, before, run


def test_killed_training_resumes_both_networks_optimisers_and_indicators(trained):
    root, before, run = trained
    killed_at = before["trainer"]["iteration"]
    total = EPOCHS * SMALL["iterations_per_epoch"]
    assert 2 <= killed_at < total and killed_at % 2 == 0
    assert sorted(before) == ["indicators", "net1", "net2", "opt1", "opt2", "trainer"]
    out = run.stdout + run.stderr
    assert f"resuming from {root / 'runs' / 'train' / 'checkpoint.pt'} after iteration {killed_at}" in out
    final = torch.load(root / "runs" / "train" / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert final["trainer"]["iteration"] == total
    ind = final["indicators"]
    # every update of the whole run is counted: the indicators (gamma, Adam moments, steps) were
    # restored at the kill, not started again from 0.5
    updates = total // SMALL["tau"]
    assert ind["updates"] == updates and ind["steps"].tolist() == [updates] * 9
    assert before["indicators"]["updates"] == killed_at // SMALL["tau"]
    assert ((ind["gamma"] >= 0) & (ind["gamma"] <= 1)).all() and (ind["gamma"] != 0.5).any()
    for net in ("net1", "net2"):  # both networks kept training after the resume
        assert any(not torch.equal(before[net][k], final[net][k]) for k in before[net] if before[net][k].is_floating_point())
    assert final["opt1"]["state"] and final["opt2"]["state"]  # SGD momentum buffers of both
    metrics = json.loads((root / "runs" / "train" / "metrics.json").read_text())
    assert metrics["iteration"][-1] == total and "loss_reg:" in out and "gamma_i:" in out


def test_indicator_report_and_saved_networks(trained):
    root = trained[0]
    ds = load_dataset(root / "data" / "polyp2d")
    weak_types = {c["case"]: c["weak_type"] for c in ds.splits["training"] if c.get("supervision") == "weak"}
    with open(root / "runs" / "train" / "gamma.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    weak = [r for r in rows if r["weak_type"] != "strong"]
    assert {r["case"]: r["weak_type"] for r in weak} == weak_types  # one row per weak case, its mask's type
    assert sum(r["weak_type"] == "strong" for r in rows) == 3 and all(0 <= float(r["gamma"]) <= 1 for r in rows)
    assert (root / "runs" / "train" / "gamma_hist.png").stat().st_size > 1000
    # models/model.pt is network 1 (inference, ckpt_export), models/model_net2.pt network 2: different weights
    p = parser(root, "inference.json", average=True)
    net1, net2 = (p.get_parsed_content(k).cpu() for k in ("network", "network2"))  # the config puts them on CUDA when there is one
    net1.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True, map_location="cpu"))
    net2.load_state_dict(torch.load(root / "models" / "model_net2.pt", weights_only=True, map_location="cpu"))
    assert not torch.equal(net1.classifier.weight, net2.classifier.weight)
    avg = p.get_parsed_content("predictor")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        net1.eval(), net2.eval()
        expected = (torch.softmax(net1(x), 1) + torch.softmax(net2(x), 1)) / 2
        torch.testing.assert_close(avg(x).exp(), expected, atol=1e-5, rtol=1e-5)


def test_inference_and_evaluation_on_the_test_frames(trained):
    import nibabel as nib
    from PIL import Image

    root = trained[0]
    r = run_bundle(BUNDLE, root, ("inference.json", "evaluate.json"), threads=1, timeout=600, spatial_size=[32, 32], progress=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cases = load_dataset(root / "data" / "polyp2d").datalist("test")
    for case in cases:
        pred = np.asarray(nib.load(str(root / "eval" / "pred" / f"{case['case']}_seg.nii.gz")).dataobj)
        width, height = Image.open(case["image"]).size
        assert pred.shape == (width, height) and set(np.unique(pred)) <= {0, 1}
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["num_cases"] == 2 and set(summary["per_class"]) == {"polyp"}
    assert {"dice", "assd"} <= set(summary["per_class"]["polyp"])
    assert "mean over classes" in r.stdout


def test_saved_networks_carry_class_names_and_other_classes_are_refused(trained, tmp_path):
    from partialseg.engines import checkpoint_classes

    root = trained[0]
    classes = load_dataset(root / "data" / "polyp2d").classes
    for name in ("model.pt", "model_net2.pt"):  # both networks carry the dataset's class names
        assert checkpoint_classes(root / "models" / name) == list(classes)
    other = tmp_path / "other"
    other.mkdir()
    desc = json.loads((root / "data" / "polyp2d" / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**desc, "classes": ["background", "adenoma"]}))
    with pytest.raises(RuntimeError) as e:  # refused while the config is parsed, before any prediction
        parser(root, "inference.json", dataset_dir=str(other)).get_parsed_content("checked_checkpoint")
    message = str(e.value.__cause__)
    assert "['background', 'polyp']" in message and "['background', 'adenoma']" in message and "model.pt" in message


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="torchrun not installed")
def test_two_gloo_ranks_keep_networks_and_indicators_identical(tmp_path):
    make_data(tmp_path)
    dump = ("$torch.save({'net1': @network.module.state_dict(), 'net2': @network2.module.state_dict(), 'gamma': @indicators.gamma},"
            " @bundle_root + '/rank' + str(dist.get_rank()) + '.pt')")  # fmt: skip
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run",
        "--config_file", repr([str(CFG / "train.json"), str(CFG / "multi_gpu_train.json")]),
        "--meta_file", str(CFG / "metadata.json"), "--logging_file", str(CFG / "logging.conf"),
        "--bundle_root", str(tmp_path), "--epochs", "1",
        "--finalize", repr([dump, "$dist.destroy_process_group()"]),
    ]  # fmt: skip
    for key, value in SMALL.items():
        cmd += [f"--{key}", json.dumps(value)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(ENV, CUDA_VISIBLE_DEVICES=""), timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    s0, s1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1))
    for net in ("net1", "net2"):  # parameters; batch-norm statistics follow each rank's last local batch
        for k in s0[net]:
            if "running_" in k or "num_batches_tracked" in k:
                continue
            torch.testing.assert_close(s0[net][k], s1[net][k], atol=0, rtol=0)
    # both ranks took the same indicator steps: network 1's batch-norm statistics are broadcast from
    # rank 0 before each indicator pass (multi_gpu_train.json's sync_indicator_network)
    torch.testing.assert_close(s0["gamma"], s1["gamma"], atol=0, rtol=0)
    assert (s0["gamma"] != 0.5).any()
    assert (tmp_path / "runs" / "train" / "gamma.csv").is_file() and (tmp_path / "models" / "model_net2.pt").is_file()


# ---------------------------------------------------------------------------------------------- bad input


def _refusal(root: Path) -> str:
    """The DatasetError the training datalist raises (MONAI's parser wraps it in a RuntimeError)."""
    with pytest.raises(RuntimeError) as e:
        parser(root).get_parsed_content("train#datalist")
    cause = e.value.__cause__
    assert isinstance(cause, DatasetError), repr(cause)
    return str(cause)


def _rewrite(root: Path, edit) -> Path:
    path = root / "data" / "polyp2d" / "dataset.json"
    desc = json.loads(path.read_text())
    edit(desc)
    path.write_text(json.dumps(desc))
    return path


def test_a_dataset_without_a_strong_case_is_refused_naming_the_file(tmp_path):
    make_data(tmp_path)

    def all_weak(desc):
        for c in desc["training"]:
            c["supervision"] = "weak"

    path = _rewrite(tmp_path, all_weak)
    msg = _refusal(tmp_path)
    assert f"dataset {path}: all 12 labelled training cases are weak" in msg and "none strong" in msg


def test_an_unknown_supervision_value_is_refused_naming_the_case(tmp_path):
    make_data(tmp_path)
    _rewrite(tmp_path, lambda desc: desc["training"][1].update(supervision="weakly"))
    msg = _refusal(tmp_path)
    assert "case 'frame_0001' (training[1]): 'supervision' must be one of ['strong', 'weak'], got 'weakly' (did you mean 'weak'?)" in msg


def test_a_weak_mask_of_the_wrong_shape_is_refused_naming_the_case_and_file(tmp_path):
    from PIL import Image

    root = make_data(tmp_path)
    weak = next(c for c in load_dataset(root).splits["training"] if c["supervision"] == "weak")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(weak["label"])
    msg = _refusal(tmp_path)
    assert f"case {weak['case']!r}" in msg and "weak mask" in msg and weak["label"] in msg and "(16, 16)" in msg


def test_indicator_state_of_another_dataset_is_refused_on_resume(trained, tmp_path):
    """A resume checkpoint whose indicators hold other cases (another dataset) is refused, cases named."""
    make_data(tmp_path, num_strong=4)  # same frames, one more strong case: other weak instances
    (tmp_path / "runs" / "train").mkdir(parents=True)
    shutil.copy(trained[0] / "runs" / "train" / "checkpoint.pt", tmp_path / "runs" / "train" / "checkpoint.pt")
    p = parser(tmp_path, epochs=EPOCHS + 1)
    trainer = p.get_parsed_content("train#trainer")
    p.get_parsed_content("resume_checkpoint").attach(trainer)
    with pytest.raises(ValueError, match="another dataset") as e:
        trainer.run()
    assert "strong cases that differ" in str(e.value) and "frame_" in str(e.value)


# ---------------------------------------------------------------------------------------------- MONAI Label


def test_monailabel_trains_on_strong_and_weak_labels_and_serves_network1(tmp_path):
    """Weak labels are those saved with params {"supervision": "weak"}; both networks are served."""
    pytest.importorskip("monailabel")
    import nibabel as nib
    from PIL import Image

    from monailabel_harness import FakeDatastore

    from partialseg.monailabel.tasks import BundleInferTask, HybridTrainTask, bundle_train_task

    shutil.copytree(CFG, tmp_path / "hybrid_polyp" / "configs")
    small = {k: v for k, v in SMALL.items() if k != "progress"}
    task = bundle_train_task(tmp_path / "hybrid_polyp", overrides=small, max_epochs=1)
    assert type(task) is HybridTrainTask and task.classes == ["background", "polyp"] and task.dimension == 2  # RGB PNG frames are 2D
    assert task.served == [("network2", "model_net2.pt"), ("checkpoint", "model.pt")]
    data = load_dataset(make_data(tmp_path))
    train = data.datalist("training")
    info = {c["case"]: ({"supervision": "weak", "weak_type": c["weak_type"]} if c["supervision"] == "weak" else {}) for c in train}
    cases = {c["case"]: (c["image"], c["label"], info[c["case"]]) for c in train}
    content = task.dataset(FakeDatastore(cases), tmp_path / "d")
    assert {c["case"]: (c["supervision"], c.get("weak_type")) for c in content["training"]} == {
        c["case"]: (c["supervision"], c.get("weak_type")) for c in train}
    assert sorted(c["case"] for c in content["validation"]) == sorted(c["case"] for c in train if c["supervision"] == "strong")
    # refused before training: a datastore of weak labels only, a supervision value of another kind
    weak_only = task.dataset(FakeDatastore({k: (i, l, {"supervision": "weak"}) for k, (i, l, _) in cases.items()}), tmp_path / "w")
    with pytest.raises(ValueError, match="labels are all weak; hybrid supervision needs at least one strong"):
        task.check(weak_only, {})
    first = next(iter(cases))
    with pytest.raises(ValueError, match=r"frame_\d+\.png: label info 'supervision' must be one of \['strong', 'weak'\], got 'rough'"):
        task.dataset(FakeDatastore({**cases, first: (cases[first][0], cases[first][1], {"supervision": "rough"})}), tmp_path / "r")

    stats = task({"max_epochs": 1, "iterations_per_epoch": 3}, FakeDatastore(cases))
    models = task.bundle_root / "models"
    assert stats["cases"] == 12 and stats["network2"] == str(models / "model_net2.pt") and stats["checkpoint"] == str(models / "model.pt")
    assert (Path(stats["run_dir"]) / "gamma.csv").is_file()

    infer = BundleInferTask(task.bundle_root, overrides={"spatial_size": [32, 32]})
    assert infer.is_valid()
    image = data.datalist("test")[0]["image"]
    result, answer = infer({"image": image})
    assert nib.load(result).shape == Image.open(image).size and answer["label_names"] == {"polyp": 1}


def test_a_user_dataset_is_planned_on_its_first_training_run_and_inference_reads_the_model_settings(tmp_path):
    """Issue 14's convention for this bundle: a dataset of the user's (no synthetic ``family``) with no
    plan is planned when training starts (frame size from its median frame, pairs per batch from the
    memory budget, classes, channels), training records the settings beside the model, and inference
    takes them from there with nothing but --dataset_dir."""
    from monai.bundle import ConfigParser

    from partialseg.data import plan as P

    data = make_data(tmp_path, size=48)
    desc = json.loads((data / "dataset.json").read_text())
    desc.pop("family")
    (data / "dataset.json").write_text(json.dumps(desc))
    r = run_bundle(BUNDLE, tmp_path, ("train.json",), threads=1, timeout=600, dataset_dir=str(data), epochs=1, iterations_per_epoch=2,
                   tau=2, indicator_batch_size=16, progress=False)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "planning it now" in r.stderr and "plan for hybrid_polyp" in r.stdout
    planned = P.load_plan(data, "hybrid_polyp")
    assert planned["spatial_size"] == [48, 48] and planned["in_channels"] == 3 and planned["num_classes"] == 2
    assert 2 <= planned["pairs_per_batch"] <= 8
    saved = json.loads((tmp_path / "models" / "model.settings.json").read_text())
    assert saved["settings"] == P.bundle_overrides(planned, "hybrid_polyp") and set(saved["source"].values()) == {"plan.json"}
    p = ConfigParser()
    p.read_config(str(CFG / "inference.json"))
    p.update({"bundle_root": str(tmp_path), "dataset_dir": str(data)})
    assert p.get_parsed_content("spatial_size") == [48, 48] and p.get_parsed_content("in_channels") == 3


def test_the_indicator_pass_lists_the_strong_cases_first(tmp_path):
    """g_S is known before the first weak case, so the indicator update takes its fast path
    (``HybridTrainer.indicator_dots``: no per-instance gradient) for every weak case."""
    make_data(tmp_path)
    data = parser(tmp_path).get_parsed_content("indicator#dataset").data
    kinds = [c["supervision"] for c in data]
    assert kinds == sorted(kinds, key=lambda k: k != "strong") and kinds.count("strong") == DATA["num_strong"]


def test_the_trainer_takes_the_configured_pseudo_label_precision(tmp_path):
    """The bundle's ``pseudo_label_precision`` reaches ``HybridTrainer`` (default ``"auto"``: bfloat16 where native)."""
    from partialseg.engines.hybrid import native_bfloat16

    make_data(tmp_path)
    auto = parser(tmp_path).get_parsed_content("train#trainer")
    assert auto.pseudo_label_precision == "auto"
    assert auto.pseudo_label_dtype() == (torch.bfloat16 if native_bfloat16(auto._device_type()) else torch.float32)
    exact = parser(tmp_path, pseudo_label_precision="float32").get_parsed_content("train#trainer")
    assert exact.pseudo_label_dtype() == torch.float32
