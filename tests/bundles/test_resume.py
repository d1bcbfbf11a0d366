"""Resume after SIGKILL, atomic checkpoints, and input errors that name the file (marginal bundle CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from partialseg.data import ensure_dataset, load_dataset
from partialseg.engines import bundle_command

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "marginal_exclusion_abdomen"
CFG = BUNDLE / "configs"
SMALL = {"pixdim": [18.0, 18.0, 16.0], "patch_size": [16, 16, 8], "iterations_per_epoch": 4, "val_interval": 2}

pytestmark = pytest.mark.slow


def command(root: Path, configs=("train.json",), **overrides) -> list[str]:
    return bundle_command(CFG.parent, root, configs, **overrides)


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_killed_stage2_resumes_where_it_stopped(tmp_path):
    ensure_dataset(tmp_path / "data" / "abdomen3d", "abdomen3d", size=24, num_train=1, num_full=2, num_test=1, num_val=1)
    s1 = subprocess.run(command(tmp_path, stage=1, epochs_stage1=1, **{**SMALL, "val_interval": 1}), capture_output=True, text=True, env=ENV, timeout=300)
    assert s1.returncode == 0, s1.stdout[-3000:] + s1.stderr[-3000:]

    # stage 2: 30 epochs x 4 iterations, a resume checkpoint every 2 iterations; SIGKILL after the first
    cmd = command(tmp_path, stage=2, epochs_stage2=30, checkpoint_interval=2, **SMALL)
    ckpt = tmp_path / "runs" / "stage2" / "checkpoint.pt"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # kill mid-run, possibly mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    # atomic writes: whatever the kill interrupted, the checkpoint on disk is complete
    killed_at = torch.load(ckpt, weights_only=True)["trainer"]["iteration"]
    assert 2 <= killed_at < 120 and killed_at % 2 == 0
    interrupted = list(ckpt.parent.glob(".checkpoint.pt.*.tmp"))  # a write the kill cut short, if any

    # the same command again: continues from the checkpoint, not from stage 1's weights alone
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    restored = out.index("Restored all variables from")  # stage-1 initialisation runs first ...
    resumed = out.index(f"resuming from {ckpt} after iteration {killed_at} ({killed_at // 4} full epochs)")
    assert restored < resumed  # ... and the resumed state overrides it
    assert "train [30/30]" in r.stderr  # a progress bar (ignite's tqdm ProgressBar)
    saved = sorted((tmp_path / "runs" / "stage2").glob("config_*.json"))  # the executed config, per run
    assert saved and json.loads(saved[-1].read_text())["epochs_stage2"] == 30
    metrics = json.loads((tmp_path / "runs" / "stage2" / "metrics.json").read_text())
    # the record continues the interrupted run's: no step repeated, everything after the restored
    # checkpoint from this run, the earlier steps as far as the killed run had written them
    its = metrics["iteration"]
    assert its == sorted(set(its)) and its[-1] == 120 and its[: its.index(killed_at + 1)] == list(range(1, its.index(killed_at + 1) + 1))
    assert its[its.index(killed_at + 1) :] == list(range(killed_at + 1, 121))
    assert metrics["epoch"] == sorted(set(metrics["epoch"]))

    final = torch.load(ckpt, weights_only=True)
    assert final["trainer"]["iteration"] == 120 and final["trainer"]["max_epochs"] == 30
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CFG / "inference.json"))
    parser["bundle_root"] = str(tmp_path)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))  # best-metric weights load
    net.load_state_dict(final["network"])  # and the last state
    assert not list(ckpt.parent.glob(".checkpoint.pt.*.tmp"))  # the resumed run cleared the stray temporary
    print(f"killed after iteration {killed_at} ({len(interrupted)} interrupted write); resumed at {killed_at + 1}..120")


def test_corrupt_or_missing_input_image_is_named(tmp_path):
    root = tmp_path / "data" / "abdomen3d"
    ensure_dataset(root, "abdomen3d", size=24, num_train=1, num_full=1, num_test=2, num_val=1)
    ds = load_dataset(root)
    train_image = ds.datalist("training")[0]["image"]
    data = Path(train_image).read_bytes()
    Path(train_image).write_bytes(data[: len(data) // 2])  # truncated .nii.gz
    r = subprocess.run(command(tmp_path, stage=1, epochs_stage1=1, **SMALL), capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode != 0 and f"{train_image}: cannot be read" in r.stderr, r.stderr[-3000:]

    # inference (no dataset validation pass): inference.json's own preprocessing, a truncated
    # image, then a missing one
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CFG / "inference.json"))
    parser["bundle_root"] = str(tmp_path)
    preprocessing = parser.get_parsed_content("preprocessing")
    test_image = ds.datalist("test")[0]["image"]
    data = Path(test_image).read_bytes()
    Path(test_image).write_bytes(data[: len(data) // 2])
    assert f"{test_image}: cannot be read (EOFError" in error_chain(preprocessing, {"image": test_image})
    os.remove(test_image)
    assert f"{test_image}: file not found" in error_chain(preprocessing, {"image": test_image})


def error_chain(fn, *args) -> str:
    """The messages of the exception ``fn(*args)`` raises and of its causes (as a traceback prints them)."""
    with pytest.raises(Exception) as info:
        fn(*args)
    e, messages = info.value, []
    while e is not None:
        messages.append(f"{type(e).__name__}: {e}")
        e = e.__cause__
    return "\n".join(messages)


def test_killed_dcl_stage2_resumes_with_its_dualnet(tmp_path):
    """DCL's DualNet (created lazily, refreshed on validation gains) is saved and restored too."""
    dcl = BUNDLE.parent / "dcl_cardiac"
    small = {"pixdim": [1.8, 1.8], "spatial_size": [32, 32], "iterations_per_epoch": 4, "val_interval": 1, "batch_size": 4}
    ensure_dataset(tmp_path / "data" / "cardiac2d", "cardiac2d", size=32, num_train=2, num_test=1, num_val=1, variant="wholeheart")
    s1 = subprocess.run(bundle_command(dcl, tmp_path, stage=1, epochs_stage1=1, **small), capture_output=True, text=True, env=ENV, timeout=300)
    assert s1.returncode == 0, s1.stdout[-3000:] + s1.stderr[-3000:]
    cmd = bundle_command(dcl, tmp_path, stage=2, epochs_stage2=20, checkpoint_interval=2, progress="false", **small)
    ckpt = tmp_path / "runs" / "stage2" / "checkpoint.pt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = torch.load(ckpt, weights_only=True)
    killed_at = before["trainer"]["iteration"]
    assert 2 <= killed_at < 80 and before["dual"]["weights"], sorted(before)
    assert before["dual"]["refreshes"].tolist()[0] == 1  # DualNet = PrimNet at the first stage-2 iteration

    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"resuming from {ckpt} after iteration {killed_at}" in r.stdout + r.stderr
    final = torch.load(ckpt, weights_only=True)
    refreshes = final["dual"]["refreshes"].tolist()
    assert final["trainer"]["iteration"] == 80
    # the pre-kill history is kept, and DualNet was restored, not re-copied from PrimNet on resuming
    assert refreshes[: len(before["dual"]["refreshes"])] == before["dual"]["refreshes"].tolist()
    assert killed_at + 1 not in refreshes


def test_killed_dtml_training_resumes_both_networks_and_the_ramp(tmp_path):
    """DTML: M_s, M_d, both optimisers, both LR schedules and the iteration (the ramp's position)."""
    import re

    from bundle_harness import DTML

    from partialseg.losses.dtml import consistency_ramp

    DTML.make_data(tmp_path)
    # 10 epochs x 6 iterations; ramp_scale 0.5 makes w(t) climb within the run; the LR decays after iteration 3
    cmd = bundle_command(DTML.path, tmp_path, epochs=10, checkpoint_interval=2, ramp_scale=0.5, lr_milestones=[3], **DTML.small)
    ckpt = tmp_path / "runs" / "train" / "checkpoint.pt"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 120
    while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = torch.load(ckpt, weights_only=True)
    killed_at = before["trainer"]["iteration"]
    assert 2 <= killed_at < 60
    assert sorted(before) == ["lr_scheduler", "sdm", "sdm_lr_scheduler", "sdm_optimizer", "seg", "seg_optimizer", "trainer"]

    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"resuming from {ckpt} after iteration {killed_at}" in out
    # the ramp continues where it stopped: the first iteration after the resume has w(killed_at), not w(0)
    first = float(re.search(r"Iter: \d+/\d+ -- .*?con_weight: ([0-9.]+)", out).group(1))
    assert first == pytest.approx(consistency_ramp(killed_at, 1.0, 0.5, 40.0), abs=1e-4)
    assert abs(first - consistency_ramp(0, 1.0, 0.5, 40.0)) > 1e-2
    final = torch.load(ckpt, weights_only=True)
    assert final["trainer"]["iteration"] == 60
    # both schedules counted every iteration, across the kill; both networks kept training
    assert final["lr_scheduler"]["last_epoch"] == final["sdm_lr_scheduler"]["last_epoch"] == 60
    assert final["seg_optimizer"]["param_groups"][0]["lr"] == final["sdm_optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    for net in ("seg", "sdm"):
        assert any(not torch.equal(before[net][k], final[net][k]) for k in before[net])
    metrics = json.loads((tmp_path / "runs" / "train" / "metrics.json").read_text())
    assert metrics["iteration"] == sorted(set(metrics["iteration"])) and metrics["iteration"][-1] == 60
    print(f"DTML killed after iteration {killed_at}; resumed with w = {first:.4f}")
