"""A real MONAI Label server on 127.0.0.1 serving the partialseg bundles (``partialseg.monailabel``).

Synthetic NIfTI studies in a temporary folder; the served ``marginal_exclusion_abdomen`` weights
are its seed-0 initialisation (serving and numerics do not depend on training). Checks: ``/info/``
lists every bundle, ``/infer/<bundle>`` returns a label voxel-identical (same affine) to ``python
-m monai.bundle run`` inference of the same bundle on the same image, 8 concurrent requests all
succeed (latency percentiles printed), and a train request keeps each case's annotated classes
and writes a checkpoint. The DCL bundle (``dcl_cardiac``, 2D synthetic cardiac slices in the same
datastore, one structure labelled per slice) is trained through the app: stage 1 on the first
request, stage 2 from the served model on the next, and the infer task then serves the new model
and support bank.

Security (issue 13; one server for the module): a train request whose override is a config
expression is refused with a 400 JSON answer and the command it carries does not run; datastore
names that leave the studies folder, a malformed ``params`` JSON and an unknown ``annotated`` class
are 400 answers and write nothing; ``PUT /model`` is off; CORS answers only the server's own
origin; unbounded and too-large ``run_sync`` requests are refused at once, and ``/info/`` answers
while a training runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from monailabel_harness import REPO, infer, save_label, serve, train

from partialseg.data import ensure_dataset

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

BUNDLE = "marginal_exclusion_abdomen"
#: a coarser grid than the bundle's 4.5 mm keeps every request and the training to seconds
OVERRIDES = {"pixdim": [9.0, 9.0, 8.0], "patch_size": [32, 32, 16]}
DCL = "dcl_cardiac"
#: 32 x 32 synthetic slices resampled to 1.8 mm and padded to 32 x 32 (tests/bundles/test_dcl_bundle.py)
DCL_OVERRIDES = {"pixdim": [1.8, 1.8], "spatial_size": [32, 32]}

pytestmark = pytest.mark.slow


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
    # 2D cardiac slices beside the 3D volumes: each train task uses the images of its own dimensionality
    cardiac = Path(ensure_dataset(tmp / "data" / "cardiac2d", "cardiac2d", size=32, num_train=2, num_test=1, num_val=1, variant="wholeheart"))
    for sub, name in [("imagesTr", "sub000_ED"), ("imagesTr", "sub000_ES"), ("imagesTr", "sub001_ED"), ("imagesTr", "sub001_ES"), ("imagesTs", "test000_ED")]:
        shutil.copy(cardiac / sub / f"{name}.nii.gz", studies / f"cardiac_{name}.nii.gz")
    app = init_app(tmp / "app")
    models = app / "model" / BUNDLE / "models"
    models.mkdir(parents=True)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / BUNDLE / "configs" / "inference.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), models / "model.pt")
    with serve(app, studies, tmp / "server.log", {BUNDLE: OVERRIDES, DCL: DCL_OVERRIDES}) as url:
        port = int(url.rsplit(":", 1)[1])
        yield {"url": url, "tmp": tmp, "data": data, "cardiac": cardiac, "studies": studies, "app": app, "port": port}


def _infer(url: str, image: str, model: str = BUNDLE) -> tuple[bytes, float]:
    return infer(url, image, model)


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


def test_info_lists_a_dcl_train_task(server):
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    # metadata class_names: the DCL bundle's m classes, although its network has 2m output logits
    assert DCL in info["trainers"] and "stage 1 until a model is served" in info["trainers"][DCL]["description"]
    assert info["trainers"][DCL]["config"]["stage"] == "auto"
    assert {"cardiac_sub000_ED", "cardiac_test000_ED"} <= set(requests.get(f"{server['url']}/datastore/?output=all", timeout=30).json()["objects"])


def test_dcl_trains_stage1_then_stage2_and_serves_the_new_model(server):
    url, tmp, cardiac = server["url"], server["tmp"], server["cardiac"]
    root = server["app"] / "model" / DCL
    models = root / "models"
    assert not (models / "model.pt").exists()
    labels = cardiac / "labelsTr"
    # one structure per slice; sub001_ED's MYO label carries no `annotated`: read from its values
    save_label(url, "cardiac_sub000_ED", labels / "sub000_ED.nii.gz", {"annotated": ["LV"]})
    save_label(url, "cardiac_sub000_ES", labels / "sub000_ES.nii.gz", {"annotated": ["RV"]})
    save_label(url, "cardiac_sub001_ED", labels / "sub001_ED.nii.gz")
    request = {"max_epochs": 1, "iterations_per_epoch": 2, "val_interval": 1, "batch_size": 4}

    # no case annotates the background: no conditional image for it, refused before training
    r = train(url, DCL, **request)
    # the reason reaches the client as JSON (it was a bare 500, the reason only in the server log)
    assert r.status_code == 422, r.text[:2000]
    detail = r.json()["detail"]
    assert "dcl_cardiac: class(es) ['background'] are annotated in no labelled case" in detail and "missing option to 'any'" in detail
    assert not (models / "model.pt").exists()

    # a whole-heart label annotates the background (value 1 = "one of LV / MYO / RV")
    save_label(url, "cardiac_sub001_ES", labels / "sub001_ES.nii.gz", {"annotated": ["background"]})
    r = train(url, DCL, **request)
    assert r.status_code == 200, r.text[:3000]
    stats = r.json()
    annotated = {"cardiac_sub000_ED": ["LV"], "cardiac_sub000_ES": ["RV"], "cardiac_sub001_ED": ["MYO"], "cardiac_sub001_ES": ["background"]}
    # stage 1 (nothing served yet) on the 2D cases only (the 3D volumes labelled above are left out)
    assert stats["stage"] == 1 and stats["annotated"] == annotated
    print(f"DCL stage 1 through /train: {stats['train_time']:.1f} s in the subprocess")
    assert stats["validation"] == sorted(annotated)  # no fully annotated case: the training cases
    run1 = Path(stats["run_dir"])
    assert json.loads((run1 / "metrics.json").read_text())["iteration"] == [1, 2]
    assert "Restored all variables from" not in (run1 / "train.log").read_text()
    assert stats["checkpoint"] == str(models / "model.pt") and stats["support_bank"] == str(models / "support_bank.pt")
    from partialseg.data.dcl import SupportBank

    bank = SupportBank.load(models / "support_bank.pt")  # rebuilt from the datastore's cases
    assert sorted(set(bank.classes.tolist())) == [0, 1, 2, 3] and tuple(bank.images.shape[1:]) == (1, 32, 32)
    # no temporary left; the settings the model was trained with are served beside it (issue 14)
    assert sorted(p.name for p in models.iterdir()) == ["model.pt", "model.settings.json", "support_bank.pt"]
    stage1 = torch.load(models / "model.pt", weights_only=True)

    info = requests.get(f"{url}/info/", timeout=30).json()
    assert info["models"][DCL]["dimension"] == 2 and info["models"][DCL]["labels"] == {"LV": 1, "MYO": 2, "RV": 3}
    content, _ = _infer(url, "cardiac_test000_ED", DCL)
    (tmp / "dcl_stage1.nii.gz").write_bytes(content)
    img = nib.load(str(server["studies"] / "cardiac_test000_ED.nii.gz"))
    out = nib.load(str(tmp / "dcl_stage1.nii.gz"))
    assert out.shape == img.shape == (32, 32)
    np.testing.assert_allclose(out.affine, img.affine, atol=1e-4)

    # the next request: stage 2 (DualNet, the bundle's stage-2 settings) from the served model
    bank_inode = (models / "support_bank.pt").stat().st_ino
    r = train(url, DCL, **request)
    assert r.status_code == 200, r.text[:3000]
    stats = r.json()
    assert stats["stage"] == 2 and stats["annotated"] == annotated
    print(f"DCL stage 2 through /train: {stats['train_time']:.1f} s in the subprocess")
    run2 = Path(stats["run_dir"])
    train_log = (run2 / "train.log").read_text()
    assert "Restored all variables from" in train_log and str(models / "model.pt") in train_log
    (executed,) = run2.glob("config_*.json")  # the executed config (ConfigSaver): stage 2 from the served model
    executed = json.loads(executed.read_text())
    assert executed["stage"] == 2 and executed["stage1_ckpt"] == str(models / "model.pt")
    stage2 = torch.load(models / "model.pt", weights_only=True)
    assert any(not torch.equal(stage2[k], stage1[k]) for k in stage1)  # a new model is served
    assert (models / "model.pt").read_bytes() == (run2 / "models" / "model.pt").read_bytes()  # the run's best model
    assert (models / "support_bank.pt").stat().st_ino != bank_inode  # and a new bank, swapped in by os.replace

    # the infer task uses them at once: its label equals `monai.bundle run` inference with the served files
    content, _ = _infer(url, "cardiac_test000_ED", DCL)
    (tmp / "dcl_stage2.nii.gz").write_bytes(content)
    cfg = root / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg / "inference.json"),
           "--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf"),
           "--bundle_root", str(root), "--dataset_dir", str(cardiac), "--output_dir", str(tmp / "dcl_reference"),
           "--progress", "false"]  # fmt: skip
    for key, value in DCL_OVERRIDES.items():
        cmd += [f"--{key}", json.dumps(value)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got, ref = nib.load(str(tmp / "dcl_stage2.nii.gz")), nib.load(str(tmp / "dcl_reference" / "test000_ED_seg.nii.gz"))
    assert got.shape == ref.shape == (32, 32)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(ref.dataobj))
    np.testing.assert_array_equal(got.affine, ref.affine)


# ---- security (issue 13): every test below failed on the app before the fix ----


def _escaped(server) -> list[Path]:
    """Files a traversal below would have written: named ``*escape*``, anywhere under the test's base folder."""
    return sorted(server["tmp"].parent.rglob("*escape*"))


def test_an_override_expression_is_refused_and_runs_nothing(server):
    url, tmp = server["url"], server["tmp"]
    marker = tmp / "injected"
    runs = server["app"] / "model" / BUNDLE / "runs"
    before = sorted(runs.iterdir()) if runs.is_dir() else []
    injection = f"$__import__('pathlib').Path({str(marker)!r}).touch() or 3e-4"
    for params, field in [
        ({"max_epochs": 1, "overrides": {"learning_rate": injection}}, "learning_rate"),
        ({"max_epochs": 1, "overrides": {"sampling": f"@network_def#{injection}"}}, "sampling"),
        ({"max_epochs": 1, "overrides": {"network_def#_target_": "os.system"}}, "network_def#_target_"),
    ]:
        for query in ({}, {"run_sync": "true"}):  # a background training too: refused before its process starts
            r = requests.post(f"{url}/train/{BUNDLE}", params=query, json=params, timeout=30)
            assert r.status_code == 400, (r.status_code, r.text[:500])
            assert field in r.json()["detail"], r.json()
    time.sleep(3)  # a background training would have started by now
    assert not marker.exists()
    assert (sorted(runs.iterdir()) if runs.is_dir() else []) == before  # no run folder either
    assert requests.get(f"{url}/train/", params={"check_if_running": "true"}, timeout=30).status_code == 404  # nothing running


def test_datastore_names_stay_inside_the_studies_folder(server):
    url, tmp, studies = server["url"], server["tmp"], server["studies"]
    label = server["data"] / "labelsTs" / "test_000.nii.gz"
    if not label.is_file():
        label = server["data"] / "labelsTr" / "full_000.nii.gz"
    for query in [{"image": "test_000", "tag": "../../escape"}, {"image": "test_000", "tag": str(tmp / "escape_abs")},
                  {"image": "../escape_img", "tag": "final"}]:  # fmt: skip
        with open(label, "rb") as f:
            r = requests.put(f"{url}/datastore/label", params=query, data={"params": "{}"}, files={"label": ("x.nii.gz", f)}, timeout=60)
        assert r.status_code == 400 and "is not a safe name" in r.json()["detail"], (query, r.status_code, r.text[:500])
    with open(server["studies"] / "test_000.nii.gz", "rb") as f:
        r = requests.put(f"{url}/datastore/image", params={"image": "../escape_image"}, files={"file": ("y.nii.gz", f)}, timeout=60)
    assert r.status_code == 400, r.text[:500]
    assert _escaped(server) == []
    # a malformed params JSON and an unknown annotated class: 400 with the reason, nothing saved
    for params, reason in [("{not json", "JSONDecodeError"), (json.dumps({"annotated": ["heart"]}), "'heart' is not a class")]:
        with open(label, "rb") as f:
            r = requests.put(f"{url}/datastore/label", params={"image": "test_001", "tag": "final"}, data={"params": params},
                             files={"label": ("x.nii.gz", f)}, timeout=60)  # fmt: skip
        assert r.status_code == 400 and reason in r.json()["detail"], (r.status_code, r.text[:500])
    assert not (studies / "labels" / "final" / "test_001.nii.gz").exists()


def test_model_upload_is_off_and_cors_answers_only_the_servers_origin(server):
    url, port = server["url"], server["port"]
    ckpt = server["app"] / "model" / BUNDLE / "models" / "model.pt"
    weights = ckpt.read_bytes()
    for method in ("put", "delete"):
        kwargs = {"files": {"file": ("model.pt", b"not weights")}} if method == "put" else {}
        r = getattr(requests, method)(f"{url}/model/{BUNDLE}", timeout=30, **kwargs)
        assert r.status_code == 403 and "allow_model_upload" in r.json()["detail"], r.text[:500]
    assert ckpt.read_bytes() == weights
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    evil = requests.options(f"{url}/train/{BUNDLE}", headers={"Origin": "http://evil.example", **preflight}, timeout=30)
    assert evil.headers.get("access-control-allow-origin") is None
    own = requests.options(f"{url}/train/{BUNDLE}", headers={"Origin": f"http://127.0.0.1:{port}", **preflight}, timeout=30)
    assert own.status_code == 200 and own.headers["access-control-allow-origin"] == f"http://127.0.0.1:{port}"
    r = requests.get(f"{url}/info/", headers={"Origin": "http://evil.example", "Cookie": "session=1"}, timeout=30)
    assert r.status_code == 200 and r.headers.get("access-control-allow-origin") is None


def test_unbounded_requests_are_refused_and_info_answers_during_a_training(server):
    url, data = server["url"], server["data"]
    runs = server["app"] / "model" / BUNDLE / "runs"
    save_label(url, "full_001", data / "labelsTr" / "full_001.nii.gz", {"annotated": "all"})
    before = sorted(runs.iterdir()) if runs.is_dir() else []
    for params, query, status, reason in [
        ({"max_epochs": 1e300}, {"run_sync": "true"}, 400, "max_epochs must be at most 1000"),
        ({"max_epochs": 1e300}, {}, 400, "max_epochs must be at most 1000"),
        ({"learning_rate": "inf", "max_epochs": 1}, {"run_sync": "true"}, 400, "learning_rate must be at most 1"),
        ({"max_epochs": 100, "iterations_per_epoch": 20}, {"run_sync": "true"}, 422, "run_sync training may run at most 50 iterations"),
    ]:
        t0 = time.monotonic()
        r = requests.post(f"{url}/train/{BUNDLE}", params=query, json=params, timeout=30)
        assert r.status_code == status and reason in r.json()["detail"], (params, r.status_code, r.text[:500])
        assert time.monotonic() - t0 < 10
    assert (sorted(runs.iterdir()) if runs.is_dir() else []) == before
    # a label the marginal bundle cannot use (a DCL class): the run_sync answer says why, as JSON
    save_label(url, "test_001", data / "labelsTr" / "full_000.nii.gz", {"annotated": ["LV"]})
    r = requests.post(f"{url}/train/{BUNDLE}", params={"run_sync": "true"}, json={"max_epochs": 1, "iterations_per_epoch": 1}, timeout=120)
    assert r.status_code == 422 and "'LV' is not one of" in r.json()["detail"], (r.status_code, r.text[:500])
    assert requests.delete(f"{url}/datastore/label", params={"id": "test_001", "tag": "final"}, timeout=30).status_code == 200

    # a background training: /info/ keeps answering while it runs
    r = requests.post(f"{url}/train/{BUNDLE}", json={"max_epochs": 1, "iterations_per_epoch": 2, "val_interval": 1}, timeout=30)
    assert r.status_code == 200, r.text[:500]
    task = r.json()["id"]
    latencies, t0 = [], time.monotonic()
    while (status := requests.get(f"{url}/train/", timeout=30).json())["status"] not in ("DONE", "ERROR", "STOPPED"):
        assert status["id"] == task
        t = time.perf_counter()
        assert requests.get(f"{url}/info/", timeout=10).status_code == 200
        latencies.append(time.perf_counter() - t)
        assert time.monotonic() - t0 < 300, "the training did not end"
        time.sleep(0.5)
    assert status["status"] == "DONE", json.dumps(status, indent=1)[-3000:]
    assert len(latencies) >= 3 and max(latencies) < 5
    print(f"/info/ during a background training: {len(latencies)} answers, max {max(latencies):.2f} s")
