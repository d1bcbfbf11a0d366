"""The atlas bundle trained and served through a real MONAI Label server on 127.0.0.1.

Tiny synthetic ``abdomen3d --modality CT+MR`` (24^3 voxels): one CT image labelling liver and
stomach, one CT image labelling both kidneys, one MR image labelling spleen and pancreas, and a CT
and an MR test image, in the studies folder. Each image's modality is set through ``PUT
/datastore/image/info`` (or the label's params); ``POST /train/atlas_multimodal_abdomen`` is
refused (422, named) while an organ has no label or a labelled image has no modality, then trains a
tiny schedule (2 iterations, small networks through the request's ``overrides``), the atlas built
from the datastore's three labels; the served ``models/model.pt`` appears and ``/infer`` then
answers with labels voxel-identical to the bundle's inference workflow with that model
(each image normalised by its modality: from the datastore's image info, or the request's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel_harness import REPO, infer, save_label, serve, set_image_info, train

from partialseg.data import ensure_dataset, load_dataset

pytest.importorskip("monailabel")
requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow

ATLAS = "atlas_multimodal_abdomen"
#: AMAN layers in the bundle's train.json: a request's override keeps each list's length
LAYERS = len(json.loads((REPO / "bundles" / ATLAS / "configs" / "train.json").read_text())["discriminator_def"]["channels"])
#: a tiny schedule through the request's overrides: a 5-level main network of 8-32 filters, a 3-level APRN of 8,
#: AMAN layers of 8 at full resolution on patches of the 2^layers voxels they need (16^3 for four layers)
SMALL = {"patch_size": [max(16, 2**LAYERS)] * 3, "network_def#filters": [8, 8, 16, 16, 32], "refiner_def#filters": [8, 8, 8],
         "discriminator_def#channels": [8] * LAYERS, "discriminator_def#scale": 1.0}  # fmt: skip


def test_atlas_trains_through_the_server_and_serves_the_new_model(tmp_path):
    from partialseg.monailabel import init_app

    data = load_dataset(ensure_dataset(tmp_path / "data", "abdomen3d", size=24, num_train=1, num_test=2, num_val=0, modality="CT+MR"))
    cases = {c["case"]: c for c in data.datalist("training") + data.datalist("test")}
    assert {k: c["modality"] for k, c in cases.items()} == {"ct_a_000": "CT", "ct_b_001": "CT", "mr_002": "MR", "test_000": "CT", "test_001": "MR"}
    studies = tmp_path / "studies"
    studies.mkdir()
    for name, case in cases.items():
        shutil.copy(case["image"], studies / f"{name}.nii.gz")
    app = init_app(tmp_path / "app")
    root = app / "model" / ATLAS
    with serve(app, studies, tmp_path / "server.log") as url:
        info = requests.get(f"{url}/info/", timeout=30).json()
        assert ATLAS in info["trainers"] and "CT and MR partial labels" in info["trainers"][ATLAS]["description"]
        assert ATLAS not in info["models"]  # nothing served before the first training
        for name in ("ct_a_000", "test_000"):
            set_image_info(url, name, {"modality": "CT"})
        set_image_info(url, "test_001", {"modality": "MR"})
        save_label(url, "ct_a_000", Path(cases["ct_a_000"]["label"]), {"annotated": ["liver", "stomach"]})
        save_label(url, "ct_b_001", Path(cases["ct_b_001"]["label"]), {"modality": "CT"})  # annotated: the label's values
        request = {"max_epochs": 1, "iterations_per_epoch": 2, "batch_size": 2, "overrides": SMALL}

        # refused before any training, named: organs without a label, then an image without a modality
        r = train(url, ATLAS, **request)
        assert r.status_code == 422 and "organ(s) ['spleen', 'pancreas'] are annotated by no labelled image" in r.json()["detail"], r.text
        save_label(url, "mr_002", Path(cases["mr_002"]["label"]))
        r = train(url, ATLAS, **request)
        assert r.status_code == 422 and "['mr_002'] have no modality" in r.json()["detail"], r.text
        assert not (root / "models" / "model.pt").exists() and not list((root / "runs").iterdir())

        set_image_info(url, "mr_002", {"modality": "MR"})
        r = train(url, ATLAS, **request)
        assert r.status_code == 200, r.text[:3000]
        stats = r.json()
        print(f"atlas through /train: {stats['train_time']:.1f} s in the subprocess")
        assert stats["modality"] == {"ct_a_000": "CT", "ct_b_001": "CT", "mr_002": "MR"}
        assert stats["annotated"] == {"ct_a_000": ["liver", "stomach"], "ct_b_001": ["kidney_left", "kidney_right"], "mr_002": ["spleen", "pancreas"]}
        run = Path(stats["run_dir"])
        # the atlas of the datastore's labels: every organ from its one label; the run read it, did not rebuild it
        side = json.loads((run / "dataset" / "atlas.json").read_text())
        assert stats["atlas"] == str(run / "dataset" / "atlas.nii.gz") and side["counts"] == {c: 1 for c in side["classes"][1:]}
        assert json.loads((run / "metrics.json").read_text())["iteration"] == [1, 2]
        # the served model: the main network of this run, with the settings inference reads
        models = root / "models"
        assert stats["checkpoint"] == str(models / "model.pt") and sorted(p.name for p in models.iterdir()) == ["model.pt", "model.settings.json"]
        assert (models / "model.pt").read_bytes() == (run / "models" / "model.pt").read_bytes()
        full = torch.load(run / "models" / "model_all.pt", weights_only=True, map_location="cpu")
        assert {"network", "refiner", "discriminator", "prototypes"} <= set(full)
        assert json.loads((models / "model.settings.json").read_text())["settings"]["network_def#filters"] == SMALL["network_def#filters"]

        info = requests.get(f"{url}/info/", timeout=30).json()
        assert info["models"][ATLAS]["labels"]["pancreas"] == 5 and info["models"][ATLAS]["dimension"] == 3
        served = {}
        for name, params in (("test_001", None), ("test_000", {"modality": "CT"})):  # MR from the image info; CT from the request
            content, seconds = infer(url, name, ATLAS, params)
            served[name] = tmp_path / f"served_{name}.nii.gz"
            served[name].write_bytes(content)
            print(f"atlas /infer {name}: {seconds:.2f} s")
        # an image without a modality (ct_b_001's is on its label, not the image), none in the request: refused, named
        r = requests.post(f"{url}/infer/{ATLAS}", params={"image": "ct_b_001", "output": "image"}, timeout=300)
        assert r.status_code == 422 and "image 'ct_b_001.nii.gz' has no modality" in r.json()["detail"], r.text[:2000]

    # the served labels are the bundle's own inference workflow with the served model, run here on the
    # dataset's test split (each case's modality from dataset.json, not from a request)
    from monai.bundle import ConfigWorkflow

    cfg = root / "configs"
    workflow = ConfigWorkflow(config_file=str(cfg / "inference.json"), meta_file=str(cfg / "metadata.json"), logging_file=False,
                              workflow_type="infer", bundle_root=str(root), dataset_dir=str(tmp_path / "data"),
                              output_dir=str(tmp_path / "reference"), progress=False)  # fmt: skip
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    for name, path in served.items():
        got, ref = nib.load(str(path)), nib.load(str(tmp_path / "reference" / f"{name}_seg.nii.gz"))
        assert got.shape == ref.shape == nib.load(cases[name]["image"]).shape
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(ref.dataobj))
        np.testing.assert_array_equal(got.affine, ref.affine)
