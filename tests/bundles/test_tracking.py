"""MLflow tracking of a bundle run (``--tracking mlflow``): a local store under the run's output_dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from partialseg.data import ensure_dataset

pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")  # MONAI 1.6's MLFlowHandler refuses file:// stores: it uses SQLite

CFG = Path(__file__).resolve().parents[2] / "bundles" / "marginal_exclusion_abdomen" / "configs"

pytestmark = pytest.mark.slow


def test_mlflow_local_store_tensorboard_and_config(tmp_path):
    ensure_dataset(tmp_path / "data" / "abdomen3d", "abdomen3d", size=24, num_train=1, num_full=2, num_test=1, num_val=1)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CFG / "train.json"),
           "--meta_file", str(CFG / "metadata.json"), "--logging_file", str(CFG / "logging.conf"),
           "--bundle_root", str(tmp_path), "--tracking", "mlflow", "--stage", "1", "--epochs_stage1", "2",
           "--pixdim", "[18.0,18.0,16.0]", "--patch_size", "[16,16,8]", "--iterations_per_epoch", "3", "--val_interval", "1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    run_dir = tmp_path / "runs" / "stage1"
    assert (run_dir / "mlruns.db").is_file() and list(run_dir.glob("events.out.tfevents.*"))
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlruns.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "monai_experiment"]
    (run,) = client.search_runs([exp.experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6  # every iteration
    assert len(client.get_metric_history(run.info.run_id, "val_mean_dice")) == 2  # every validation
    # the executed config: beside the outputs once (MONAI's own copy when tracking) and as an artifact
    (saved,) = run_dir.glob("config_*.json")
    assert json.loads(saved.read_text())["stage"] == 1
    assert list((run_dir / "mlruns").glob(f"*/artifacts/{saved.name}"))
    assert "train [2/2]" in r.stderr  # progress bar
