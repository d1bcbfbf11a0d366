"""Bundle inference outputs: a killed run leaves no partial prediction, a folder mixing runs is refused.

Real ``python -m monai.bundle run`` inference of the marginal bundle (random weights: no training
needed) in a subprocess that is killed with SIGKILL at a chosen file operation. The kill point is
set with a Python audit hook installed before MONAI starts (``sys.addaudithook``): just before the
N-th ``open`` for writing of a file whose name contains ``_seg.nii.gz`` (MONAI's ``nib.save`` opens
the final name; ``SavePredictiond`` opens its temporary file), at the first write after it, or
just before the N-th rename onto such a name, the process kills itself, as an out-of-memory killer
or a cluster's time limit would.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from partialseg.data import ensure_dataset, load_dataset
from partialseg.engines import bundle_command
from partialseg.evaluation import evaluate_folder
from partialseg.transforms import read_run_record

pytestmark = pytest.mark.slow

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
MARGINAL = BUNDLES / "marginal_exclusion_abdomen"
FAMILY = "abdomen3d"
#: a coarse grid keeps every run to seconds (about 16 x 16 x 12 voxels after resampling)
GRID = {"pixdim": [18.0, 18.0, 16.0], "patch_size": [16, 16, 8]}
NUM_TEST = 3

#: installed in the inference process before monai.bundle runs. KILL_EVENT: "open" (just before the
#: N-th open for writing of a prediction file: between two predictions), "write" (at the first write
#: after that open: mid-file) or "rename" (just before the N-th rename onto a prediction name)
KILLER = r"""
import os, runpy, signal, sys
event, at, seen = os.environ["KILL_EVENT"], int(os.environ["KILL_AT"]), [0]
def kill(*_):
    os.kill(os.getpid(), signal.SIGKILL)
def kill_on_write(frame, what, arg):
    if what == "c_call" and getattr(arg, "__name__", "") == "write":
        kill()
def hook(name, args):
    if name == "open" and event in ("open", "write"):
        path, flags = args[0], args[2]
        hit = isinstance(path, (str, bytes, os.PathLike)) and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
    elif name == "os.rename" and event == "rename":
        path, hit = args[1], True
    else:
        return
    if hit and "_seg.nii.gz" in os.path.basename(os.fsdecode(path)):
        seen[0] += 1
        if seen[0] == at:
            kill() if event != "write" else sys.setprofile(kill_on_write)
sys.addaudithook(hook)
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def _save_model(path: Path, seed: int) -> Path:
    """A checkpoint of the bundle's network with random weights (seeded), as its trainer saves it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(MARGINAL / "configs" / "inference.json"))
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict()}, path)
    return path


def _infer(root: Path, out: Path, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """Bundle inference into ``out``; with ``kill=(event, n)`` the process SIGKILLs itself there."""
    cmd = bundle_command(MARGINAL, root, ("inference.json",), output_dir=str(out), progress=False, **GRID)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if kill is not None:
        assert cmd[1:3] == ["-m", "monai.bundle"]
        cmd = [sys.executable, "-c", KILLER, *cmd[3:]]
        env.update(KILL_EVENT=kill[0], KILL_AT=str(kill[1]))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _killed(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == -signal.SIGKILL, f"expected a SIGKILL, got {r.returncode}: " + r.stderr[-3000:]


def _complete(path: Path) -> np.ndarray:
    """The voxels of a prediction, read to the end (a truncated gzip or 0-byte file raises)."""
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory):
    """Tiny abdomen data (3 test cases) and two different random-weight models."""
    root = tmp_path_factory.mktemp("outputs")
    ensure_dataset(root / "data" / FAMILY, FAMILY, size=24, num_train=1, num_full=1, num_test=NUM_TEST, num_val=1)
    _save_model(root / "models" / "model.pt", seed=0)
    _save_model(root / "other_model.pt", seed=1)
    return root


def _use_model(root: Path, source: Path) -> None:
    (root / "models" / "model.pt").write_bytes(source.read_bytes())


def test_killed_inference_leaves_no_partial_prediction(bundle_root, tmp_path):
    root, out = bundle_root, tmp_path / "pred"
    # killed as it writes its second prediction: the first is whole, the second absent
    _killed(_infer(root, out, kill=("write", 2)))
    written = sorted(out.glob("*_seg.nii.gz"))
    for path in written:  # MONAI's SaveImaged left the second one with 0 bytes
        assert path.stat().st_size > 0 and _complete(path).ndim == 3, f"{path.name}: {path.stat().st_size} bytes"
    assert len(written) == 1, [p.name for p in out.iterdir()]
    # killed between writing its second prediction and renaming it: still nothing partial under
    # a final name; the temporary files of both kills are hidden (".<name>.*.tmp"), evaluate ignores them
    _killed(_infer(root, out, kill=("rename", 2)))
    assert len(sorted(out.glob("*_seg.nii.gz"))) == 1
    assert len(list(out.glob(".*_seg.nii.gz.*.tmp"))) == 2
    # the rerun completes: every prediction whole and from that one run, no temporary file left,
    # and evaluate accepts it
    _ok(_infer(root, out))
    assert not list(out.glob("*.tmp"))
    cases = load_dataset(root / "data" / FAMILY).datalist("test")
    records = [read_run_record(out / f"{c['case']}_seg.nii.gz") for c in cases]
    assert len({r["partialseg_run"] for r in records}) == 1
    assert records[0]["model_sha256"] == hashlib.sha256((root / "models" / "model.pt").read_bytes()).hexdigest()
    summary = evaluate_folder(out, root / "data" / FAMILY, out_dir=tmp_path / "eval", progress=False)
    assert summary["num_cases"] == NUM_TEST and summary["prediction_run"] == records[0]


def test_evaluate_refuses_a_folder_mixing_two_runs(bundle_root, tmp_path):
    root, out = bundle_root, tmp_path / "pred"
    first_model = tmp_path / "first_model.pt"
    first_model.write_bytes((root / "models" / "model.pt").read_bytes())
    _ok(_infer(root, out))  # run 1: every case
    first = {p.name: read_run_record(p) for p in out.glob("*_seg.nii.gz")}
    assert len(first) == NUM_TEST
    # run 2, another model, stopped between its second and third predictions: 2 new files beside 1 old one
    _use_model(root, root / "other_model.pt")
    try:
        _killed(_infer(root, out, kill=("open", 3)))
    finally:
        _use_model(root, first_model)
    # partialseg evaluate: exit 2, one line naming the folder, a file of each run, and the fix
    cli = subprocess.run(
        [sys.executable, "-m", "partialseg", "evaluate", "--pred", str(out), "--dataset", str(root / "data" / FAMILY),
         "--out", str(tmp_path / "eval"), "--no-progress"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600,
    )
    assert cli.returncode == 2, cli.stdout + cli.stderr
    err = cli.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "mixes the outputs of 2 inference runs" in err
    records = {p.name: read_run_record(p) for p in sorted(out.glob("*_seg.nii.gz"))}
    assert len(records) == NUM_TEST and all(r is not None for r in records.values())
    runs = {r["partialseg_run"] for r in records.values()}
    assert len(runs) == 2 and len({r["model_sha256"] for r in records.values()}) == 2  # two models
    named = [name for name in records if name in err]
    assert len(named) == 2 and {records[n]["partialseg_run"] for n in named} == runs
    assert "fresh" in err and "output folder" in err
    assert not (tmp_path / "eval").exists()  # refused before any case was scored
    # the bundles' evaluate (evaluate_folder) refuses it the same way
    with pytest.raises(ValueError, match="mixes the outputs of 2 inference runs"):
        evaluate_folder(out, root / "data" / FAMILY, out_dir=tmp_path / "eval", progress=False)


@pytest.mark.parametrize("bundle", ["marginal_exclusion_abdomen", "dcl_cardiac"])
def test_bundles_save_through_save_predictiond(bundle, tmp_path):
    """Both bundles' inference writes with SavePredictiond, recording the model they load."""
    from monai.bundle import ConfigParser

    from partialseg.transforms import SavePredictiond

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(tmp_path), "data_root": str(tmp_path)})
    saver = parser.get_parsed_content("postprocessing").transforms[-1]
    assert isinstance(saver, SavePredictiond)
    assert saver.run.model_file == Path(parser.get_parsed_content("ckpt_dir")) / "model.pt"
    config = json.loads((BUNDLES / bundle / "configs" / "inference.json").read_text())
    assert "model.pt" in json.dumps(config["handlers"])  # the file the CheckpointLoader loads
