"""``multi_gpu_train.json`` through a real ``torchrun`` with two gloo (CPU) processes.

Each rank saves its network's state dict after training (a ``--finalize`` override); the test loads
both and compares them exactly: DistributedDataParallel must have kept the replicas identical. The
atlas bundle's ranks also save the APRN, AMAN and MICPAM prototypes (parameters and EMA buffers),
which must be identical too and equal to what ``models/model_all.pt`` holds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from partialseg.data import ensure_dataset

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
#: per bundle: synthetic family and size, tiny overrides, the files rank 0 writes to models/, and
#: whether all of its logging handlers are rank-0 only (TensorBoard events and epoch logs from one process)
CASES = {
    "marginal_exclusion_abdomen": (
        "abdomen3d", {"size": 24, "num_train": 1, "num_full": 2, "num_test": 1, "num_val": 2},
        {"pixdim": [18.0, 18.0, 16.0], "patch_size": [16, 16, 8], "iterations_per_epoch": 3, "val_interval": 1},
        ["model_stage1.pt", "model_stage1.settings.json"], True,
    ),
    "dcl_cardiac": (
        "cardiac2d", {"size": 32, "num_train": 2, "num_test": 1, "num_val": 1, "variant": "wholeheart"},
        {"pixdim": [1.8, 1.8], "spatial_size": [32, 32], "iterations_per_epoch": 3, "val_interval": 1, "batch_size": 4},
        ["model_stage1.pt", "model_stage1.settings.json", "support_bank.pt"], True,
    ),
    # single-stage: its epochs, run folder and model name set to what the checks read; validation on the test split
    "dtml_atrium": (
        "atrium3d", {"size": 24, "num_train": 4, "num_test": 2, "labelled_fraction": 0.5},
        {"pixdim": [4.5, 4.5, 3.5], "patch_size": [16, 16, 16], "network_def#channels": [4, 8, 16], "network_def#strides": [2, 2],
         "iterations_per_epoch": 3, "epochs": 2, "val_split": "test", "val_interval": 1,
         "output_dir": "$@bundle_root + '/runs/stage1'", "ckpt_name": "model_stage1.pt"},
        ["model_sdm.pt", "model_stage1.pt", "model_stage1.settings.json"], True,
    ),
    # single-stage, as DTML; four DDP modules: main, APRN, AMAN and the MICPAM prototypes (their projections'
    # gradients averaged; their EMA buffers not broadcast: the update sums over the ranks); a 4-layer AMAN at full
    # resolution fits the 16^3 patches
    "atlas_multimodal_abdomen": (
        "abdomen3d", {"size": 24, "num_train": 2, "num_test": 1, "num_val": 0, "modality": "CT+MR"},
        {"patch_size": [16, 16, 16], "network_def#filters": [8, 8, 16, 16, 32], "refiner_def#filters": [8, 8, 8],
         "discriminator_def#channels": [8, 8, 8, 8], "discriminator_def#scale": 1.0, "iterations_per_epoch": 3, "epochs": 2,
         "progress": False, "output_dir": "$@bundle_root + '/runs/stage1'", "ckpt_name": "model_stage1.pt"},
        ["model_all.pt", "model_stage1.pt", "model_stage1.settings.json"], True,
    ),
}  # fmt: skip
#: per bundle, the modules besides the main network whose replicas must stay identical and that the
#: checkpoint of every module (``models/model_all.pt``) must hold
MODULES = {"atlas_multimodal_abdomen": ("refiner", "discriminator", "prototypes")}
#: bundles whose training runs no validation
UNVALIDATED = {"atlas_multimodal_abdomen"}
NAMES = [n for n in CASES if (BUNDLES / n / "configs" / "multi_gpu_train.json").is_file()]
#: (bundle, extra overrides): the marginal bundle also with its sources balanced (SourceBalancedSampler split over ranks)
RUNS = [(n, {}) for n in NAMES] + [(n, {"sampling": "source"}) for n in NAMES if n == "marginal_exclusion_abdomen"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="torchrun not installed"),
]


@pytest.mark.parametrize("name,extra", RUNS, ids=[n + "".join(f"-{v}" for v in e.values()) for n, e in RUNS])
def test_two_gloo_ranks_stay_identical_and_only_rank0_writes(name, extra, tmp_path):
    family, data, small, written, rank0_logging = CASES[name]
    small = {**small, **extra}
    # a DistributedSampler needs at least one validation case per rank
    ensure_dataset(tmp_path / "data" / family, family, **data)
    cfg = BUNDLES / name / "configs"
    modules = MODULES.get(name, ())
    # each rank saves its replicas (unwrapped from DDP): the main network's state dict, and each other module's under its name
    others = f"{{'_' + k: v.state_dict() for k, v in @train#trainer.checkpoint_dict().items() if k in {modules!r}}}" if modules else "{}"
    dump = f"$torch.save(dict(@network.module.state_dict(), **{others}), @bundle_root + '/rank' + str(dist.get_rank()) + '.pt')"
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run",
        "--config_file", repr([str(cfg / "train.json"), str(cfg / "multi_gpu_train.json")]),
        "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf"),
        "--bundle_root", str(tmp_path), "--stage", "1", "--epochs_stage1", "2",
        # not a --run override: torchrun's own parser reads it as an ambiguous --run-path
        "--finalize", repr([dump, "$dist.destroy_process_group()"]),
    ]  # fmt: skip
    for key, value in small.items():
        cmd += [f"--{key}", json.dumps(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo even on a GPU machine
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]

    # both ranks ran; parameters (and buffers) identical on both after 6 DDP iterations
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    others0, others1 = ({m: s.pop("_" + m) for m in modules} for s in (s0, s1))
    assert s0.keys() == s1.keys() and len(s0) > 10
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    for m in modules:
        assert others0[m].keys() == others1[m].keys() and len(others0[m]) > 1, m
        for k in others0[m]:
            assert torch.equal(others0[m][k], others1[m][k]), f"{m}.{k}"
    if modules:  # every module, unwrapped, in the checkpoint of all of them
        full = torch.load(tmp_path / "models" / "model_all.pt", weights_only=True, map_location="cpu")
        assert {"network", "optimizer", *modules, *(f"{m}_optimizer" for m in modules)} <= set(full)
        assert set(full["network"]) == set(s0)
        for m in modules:
            assert set(full[m]) == set(others0[m]), m
            for k in others0[m]:
                assert torch.equal(full[m][k], others0[m][k]), f"{m}.{k}"
    # the best-metric checkpoint holds the network unwrapped from DDP (no 'module.' prefix)
    ckpt = torch.load(tmp_path / "models" / "model_stage1.pt", weights_only=True)
    assert set(ckpt.get("model", ckpt)) == set(s0)

    # exactly one writer: rank 0's files once each; metrics.json from one process
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == written
    metrics = json.loads((tmp_path / "runs" / "stage1" / "metrics.json").read_text())
    # "epoch": the validated epochs (the atlas bundle does not validate)
    assert metrics["iteration"] == [1, 2, 3, 4, 5, 6] and metrics["epoch"] == ([] if name in UNVALIDATED else [1, 2])
    if rank0_logging:
        events = list((tmp_path / "runs" / "stage1").glob("events.out.tfevents.*"))
        assert events and len({p.name.split(".")[4] for p in events}) == 1, events  # one pid
        # rank 1 logs warnings only: the per-epoch ignite lines come from one process
        assert log.count("Trainer - INFO - Epoch[2] Complete") == 1, log[-4000:]
