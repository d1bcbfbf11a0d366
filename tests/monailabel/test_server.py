"""A real MONAI Label server on 127.0.0.1 serving the partialseg bundles (``partialseg.monailabel``).

Synthetic NIfTI studies in a temporary folder; the served ``marginal_exclusion_abdomen`` weights
are its seed-0 initialisation (serving and numerics do not depend on training). Checks: ``/info/``
lists every bundle, ``/infer/<bundle>`` returns a label voxel-identical (same affine) to ``python
-m monai.bundle run`` inference of the same bundle on the same image, 8 concurrent requests all
succeed (latency percentiles printed), and a train request keeps each case's annotated classes
and writes a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from partialseg.data import ensure_dataset

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parents[2]
BUNDLE = "marginal_exclusion_abdomen"
#: a coarser grid than the bundle's 4.5 mm keeps every request and the training to seconds
OVERRIDES = {"pixdim": [9.0, 9.0, 8.0], "patch_size": [32, 32, 16]}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from monai.bundle import ConfigParser

    from partialseg.monailabel import init_app

    tmp = tmp_path_factory.mktemp("monailabel")
    data = Path(ensure_dataset(tmp / "data" / "abdomen3d", "abdomen3d", size=24, num_train=1, num_full=2, num_test=2, num_val=1))
    studies = tmp / "studies"
    studies.mkdir()
    for sub, name in [("imagesTs", "test_000"), ("imagesTs", "test_001"), ("imagesTr", "full_000"), ("imagesTr", "full_001")]:
        shutil.copy(data / sub / f"{name}.nii.gz", studies / f"{name}.nii.gz")
    app = init_app(tmp / "app")
    models = app / "model" / BUNDLE / "models"
    models.mkdir(parents=True)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / BUNDLE / "configs" / "inference.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), models / "model.pt")

    port = _free_port()
    # the documented command; the script splits its arguments on spaces (`$*`): compact JSON
    exe = os.path.join(os.path.dirname(sys.executable), "monailabel")
    cmd = [exe, "start_server", "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "bundles", str(REPO / "bundles"), "--conf", "bundle_overrides", json.dumps({BUNDLE: OVERRIDES}, separators=(",", ":"))]  # fmt: skip
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > 120:
            proc.kill()
            pytest.fail("server did not start:\n" + (tmp / "server.log").read_text()[-4000:])
        time.sleep(0.5)
    print(f"server answered /info/ after {time.monotonic() - t0:.1f} s")
    yield {"url": url, "tmp": tmp, "data": data, "studies": studies, "app": app}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _env() -> dict[str, str]:
    # the `monailabel` script runs the first `python` on PATH: this interpreter's
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ, PATH=path, OMP_NUM_THREADS="1")


def _infer(url: str, image: str) -> tuple[bytes, float]:
    t = time.perf_counter()
    r = requests.post(f"{url}/infer/{BUNDLE}", params={"image": image, "output": "image"}, timeout=300)
    assert r.status_code == 200, r.text[:2000]
    return r.content, time.perf_counter() - t


def test_info_lists_every_bundle(server):
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    bundles = {p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/inference.json")}
    # discovered generically: every bundle becomes an infer task; MONAI Label lists those with weights
    assert f"partialseg bundles from {REPO / 'bundles'}: {sorted(bundles)}" in (server["tmp"] / "server.log").read_text()
    assert {BUNDLE} <= set(info["models"]) <= bundles
    model = info["models"][BUNDLE]
    assert model["type"] == "segmentation" and model["dimension"] == 3 and model["labels"]["liver"] == 1
    assert BUNDLE in info["trainers"]
    assert {"test_000", "full_000"} <= set(requests.get(f"{server['url']}/datastore/?output=all", timeout=30).json()["objects"])


def test_infer_equals_bundle_run_and_serves_concurrent_requests(server):
    url, tmp = server["url"], server["tmp"]
    ref_dir = tmp / "reference"
    cfg = server["app"] / "model" / BUNDLE / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg / "inference.json"),
           "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf"),
           "--bundle_root", str(server["app"] / "model" / BUNDLE), "--dataset_dir", str(server["data"]),
           "--output_dir", str(ref_dir), "--progress", "false"]  # fmt: skip
    for key, value in OVERRIDES.items():
        cmd += [f"--{key}", json.dumps(value)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    sequential = []
    for image in ("test_000", "test_001"):
        content, seconds = _infer(url, image)
        sequential.append(seconds)
        served = tmp / f"served_{image}.nii.gz"
        served.write_bytes(content)
        got, ref, img = nib.load(str(served)), nib.load(str(ref_dir / f"{image}_seg.nii.gz")), nib.load(str(server["studies"] / f"{image}.nii.gz"))
        assert got.shape == ref.shape == img.shape
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(ref.dataobj))  # voxel-identical
        np.testing.assert_array_equal(got.affine, ref.affine)  # same affine
        np.testing.assert_allclose(got.affine, img.affine, atol=1e-4)  # the input's grid

    with ThreadPoolExecutor(8) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda i: _infer(url, ("test_000", "test_001")[i % 2]), range(8)))
        wall = time.perf_counter() - t0
    latencies = np.array([t for _, t in results])
    first = (tmp / "served_test_000.nii.gz").read_bytes()
    for i, (content, _) in enumerate(results):
        assert len(content) > 100
        if i % 2 == 0:
            out = tmp / "concurrent.nii.gz"
            out.write_bytes(content)
            np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), np.asarray(nib.load(str(tmp / "served_test_000.nii.gz")).dataobj))
    assert first
    p50, p90, mx = np.percentile(latencies, 50), np.percentile(latencies, 90), latencies.max()
    print(f"one /infer request at a time: {', '.join(f'{t:.2f}' for t in sequential)} s; 8 concurrent: all 200, "
          f"latency p50 {p50:.2f} s, p90 {p90:.2f} s, max {mx:.2f} s, wall {wall:.2f} s")


def test_train_keeps_annotated_classes_and_writes_a_checkpoint(server):
    url, data, tmp = server["url"], server["data"], server["tmp"]
    # full_000 labelled for the liver only (a partial label), full_001 fully
    label = nib.load(str(data / "labelsTr" / "full_000.nii.gz"))
    liver = nib.Nifti1Image((np.asarray(label.dataobj) == 1).astype(np.uint8), label.affine)
    nib.save(liver, str(tmp / "full_000_liver.nii.gz"))
    uploads = [("full_000", tmp / "full_000_liver.nii.gz", {"annotated": ["liver"]}),
               ("full_001", data / "labelsTr" / "full_001.nii.gz", {"annotated": "all"})]  # fmt: skip
    for image, path, params in uploads:
        with open(path, "rb") as f:
            r = requests.put(f"{url}/datastore/label", params={"image": image, "tag": "final"},
                             data={"params": json.dumps(params)}, files={"label": (path.name, f)}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text[:2000]

    ckpt = server["app"] / "model" / BUNDLE / "models" / "model.pt"
    before = torch.load(ckpt, weights_only=True)
    mtime = ckpt.stat().st_mtime
    r = requests.post(f"{url}/train/{BUNDLE}", params={"run_sync": "true"},
                      json={"max_epochs": 2, "iterations_per_epoch": 2, "val_interval": 1}, timeout=600)  # fmt: skip
    assert r.status_code == 200, r.text[:3000]
    stats = r.json()
    # trains on the liver-only label as a partial label; the fully labelled case is held out to validate
    assert stats["annotated"] == {"full_000": ["liver"]} and stats["validation"] == ["full_001"]
    run_dir = Path(stats["run_dir"])
    dataset = json.loads((run_dir / "dataset" / "dataset.json").read_text())
    assert [c["annotated"] for c in dataset["training"]] == [["liver"]] and dataset["validation"][0]["annotated"] == "all"
    assert json.loads((run_dir / "metrics.json").read_text())["iteration"] == [1, 2, 3, 4]
    assert "Restored all variables from" in (run_dir / "train.log").read_text()  # fine-tunes the served model
    after = torch.load(ckpt, weights_only=True)  # a new, complete checkpoint
    assert ckpt.stat().st_mtime > mtime and any(not torch.equal(after[k], before[k]) for k in before)
    content, _ = _infer(url, "test_000")  # the infer task serves the new weights
    assert len(content) > 100
