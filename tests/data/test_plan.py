"""``partialseg plan``: the fingerprint against a brute-force computation, and the plan's rules on
three datasets shaped like real ones (built here, small)."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from partialseg.cli import main
from partialseg.data import load_dataset
from partialseg.data import plan as P


def _save(path, array, spacing):
    affine = np.diag([*spacing, 1.0]) if len(spacing) == 3 else np.diag([*spacing, 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))


def _body_case(rng, shape, box, organs, background, body, noise):
    """An image with a body box on a dark (or -1000 HU) background and organ boxes inside it."""
    img = np.full(shape, float(background)) + rng.normal(0, noise, shape)
    lab = np.zeros(shape, np.uint8)
    img[box] = body + rng.normal(0, noise, img[box].shape)
    for value, (sl, intensity) in organs.items():
        img[sl] = intensity + rng.normal(0, noise, img[sl].shape)
        lab[sl] = value
    return img, lab


def _write_dataset(root, classes, cases, spacing, modality, validation=(), test=()):
    """cases: list of (name, image, label, annotated, source); names in ``validation`` / ``test``
    go to those splits (not fingerprinted), the others to training."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for name, img, lab, annotated, source in cases:
        sp = spacing(name) if callable(spacing) else spacing
        _save(root / "imagesTr" / f"{name}.nii.gz", img.astype(np.int16 if modality == "CT" else np.float32), sp)
        _save(root / "labelsTr" / f"{name}.nii.gz", lab, sp)
        entries.append({"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz", "annotated": annotated,
                        "source": source, "modality": modality})  # fmt: skip
    name = lambda e: e["image"].split("/")[1][:-7]  # noqa: E731
    desc = {"name": root.name, "classes": classes, "training": [e for e in entries if name(e) not in (*validation, *test)],
            "validation": [e for e in entries if name(e) in validation]}  # fmt: skip
    if test:
        desc["test"] = [e for e in entries if name(e) in test]
    return desc


# ---------------------------------------------------------------------------------------------
# the fingerprint equals plain NumPy on the loaded arrays


@pytest.fixture(scope="module")
def small_union(tmp_path_factory):
    """4 CT-like cases: 2 of a fully labelled source, 2 of a liver-only source whose label holds
    1 (liver) and 2 (tumour, mapped to liver); one of them at another spacing."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("union")
    cases = []
    for k in range(2):
        img, lab = _body_case(rng, (20, 18, 12), np.s_[3:17, 2:15, 1:11],
                              {1: (np.s_[5:10, 4:9, 3:7], 120.0), 2: (np.s_[11:15, 10:13, 5:9], 200.0)}, -1000, 40, 8)  # fmt: skip
        cases.append((f"full{k}", img, lab, "all", "ctorg"))
    for k in range(2):
        img, lab = _body_case(rng, (20, 18, 12), np.s_[2:18, 3:16, 2:11],
                              {1: (np.s_[4:11, 5:10, 3:8], 110.0), 2: (np.s_[6:8, 6:8, 4:6], 90.0)}, -1000, 30, 8)  # fmt: skip
        cases.append((f"liver{k}", img, lab, ["liver"], "msd_liver"))
    desc = _write_dataset(root, ["background", "liver", "kidney"], cases,
                          lambda n: (2.0, 2.0, 4.0) if n == "liver1" else (1.5, 1.5, 3.0), "CT")  # fmt: skip
    desc["label_maps"] = {"msd_liver": {"1": "liver", "2": "liver"}}
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


def test_body_mask_is_otsu_foreground():
    from partialseg.transforms import OtsuForeground

    rng = np.random.default_rng(1)
    for shape in [(1, 30, 25), (2, 16, 14, 10)]:
        img = rng.normal(0, 1, shape)
        img[(slice(None), *[slice(3, s - 4) for s in shape[1:]])] += 6
        img[(slice(None), *[slice(0, 2) for _ in shape[1:]])] += 9  # a separate bright blob: not the largest component
        np.testing.assert_array_equal(P.body_mask(img), OtsuForeground()(img)[0].numpy())
    assert P.body_mask(np.ones((1, 4, 4))).all()


def test_fingerprint_equals_brute_force(small_union):
    from partialseg.transforms import OtsuForeground

    fp = P.fingerprint_dataset(small_union, workers=1, cache=False)
    ds = load_dataset(small_union)
    fg, spacings, shapes, crops, class_voxels, class_mm3 = [], [], [], [], {1: [], 2: []}, {1: [], 2: []}
    for case in ds.datalist("training"):
        img_nii, lab = nib.load(case["image"]), np.asarray(nib.load(case["label"]).dataobj).astype(int)
        img = np.asarray(img_nii.dataobj, dtype=np.float64)
        if "label_map" in case:
            lab = np.vectorize(lambda v: case["label_map"].get(v, 0) if v else 0)(lab)
        spacing = [float(z) for z in img_nii.header.get_zooms()[:3]]
        spacings.append(spacing)
        shapes.append(img.shape)
        mask = OtsuForeground()(img[None].astype(np.float32))[0].numpy()
        idx = np.argwhere(mask)
        crops.append(idx.max(0) - idx.min(0) + 1)
        keep = [c for c in case["annotated"] if c]
        fg.append(img[np.isin(lab, keep)])
        for c in keep:
            if (lab == c).sum():
                class_voxels[c].append((lab == c).sum())
                class_mm3[c].append((lab == c).sum() * np.prod(spacing))
    fg = np.concatenate(fg)
    ct = fp["modalities"]["CT"]
    assert ct["cases"] == 4 and ct["channels"] == [1]
    np.testing.assert_allclose(ct["spacing_median"], np.median(spacings, 0))
    np.testing.assert_allclose(fp["spacings"], spacings)
    np.testing.assert_allclose(ct["shape_median"], np.median(shapes, 0))
    np.testing.assert_allclose(ct["cropped_shape_median"], np.median(crops, 0))
    f = ct["foreground"]
    assert f["voxels"] == fg.size
    np.testing.assert_allclose([f["percentile_00_5"], f["percentile_99_5"]], np.percentile(fg, [0.5, 99.5]), rtol=1e-12)
    np.testing.assert_allclose([f["mean"], f["std"]], [fg.mean(), fg.std()], rtol=1e-9)
    liver, kidney = fp["class_stats"]["liver"], fp["class_stats"]["kidney"]
    assert (liver["cases_annotated"], liver["sources"]) == (4, ["ctorg", "msd_liver"])
    assert (kidney["cases_annotated"], kidney["sources"]) == (2, ["ctorg"])
    assert fp["class_stats"]["background"]["sources"] == ["ctorg"]
    np.testing.assert_allclose([liver["voxels_median"], liver["mm3_median"]], [np.median(class_voxels[1]), np.median(class_mm3[1])])
    np.testing.assert_allclose([kidney["voxels_median"], kidney["mm3_median"]], [np.median(class_voxels[2]), np.median(class_mm3[2])])
    assert fp["full_sources"] == ["ctorg"]
    assert fp["sources"]["msd_liver"] == {"cases": 2, "labelled": 2, "fully_labelled": False, "annotates": ["liver"]}


def test_fingerprint_cache_is_keyed_by_the_files(small_union, monkeypatch):
    first = P.fingerprint_dataset(small_union, workers=1)
    assert (small_union / P.FINGERPRINT_NAME).is_file()

    def no_read(job):
        raise AssertionError("read a file although nothing changed")

    monkeypatch.setattr(P, "_stats_job", no_read)
    assert P.fingerprint_dataset(small_union, workers=1) == first  # nothing read
    path = small_union / "imagesTr" / "full0.nii.gz"
    st = path.stat()
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a touched file is read again
    with pytest.raises(AssertionError, match="nothing changed"):
        P.fingerprint_dataset(small_union, workers=1)


def test_worker_processes_give_the_same_fingerprint(small_union):
    assert P.fingerprint_dataset(small_union, workers=2, cache=False) == P.fingerprint_dataset(small_union, workers=1, cache=False)


def test_unreadable_case_is_named(tmp_path, small_union):
    desc = json.loads((small_union / "dataset.json").read_text())
    desc["training"][1]["image"] = str(tmp_path / "gone.nii.gz")
    for e in desc["training"]:
        for k in ("image", "label"):
            e[k] = e[k] if e[k].startswith("/") else str(small_union / e[k])
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(ValueError, match="case 'gone'.*partialseg check"):
        P.fingerprint_dataset(tmp_path, workers=1, cache=False)


# ---------------------------------------------------------------------------------------------
# the rules


def test_target_spacing_anisotropy_rule():
    iso, why = P.target_spacing([[1.0, 1.0, 2.9], [1.0, 1.0, 3.0], [1.2, 1.2, 2.5]])
    assert iso == [1.0, 1.0, 2.9] and "median" in why
    # z median 5 is > 3 x 0.7: it takes its 10th percentile (np.percentile([1, 5, 5, 5, 6], 10) = 2.6)
    aniso, why = P.target_spacing([[0.7, 0.7, 5.0], [0.7, 0.7, 5.0], [0.7, 0.7, 1.0], [0.7, 0.7, 6.0], [0.7, 0.7, 5.0]])
    assert aniso == [0.7, 0.7, 2.6] and "10th percentile" in why
    # nnU-Net's second condition: the coarse axis must also hold 3x fewer voxels than the others
    spacings = [[0.7, 0.7, 5.0], [0.7, 0.7, 5.0], [0.7, 0.7, 1.0], [0.7, 0.7, 6.0], [0.7, 0.7, 5.0]]
    assert P.target_spacing(spacings, shapes=[[512, 512, 100]] * 5)[0] == [0.7, 0.7, 2.6]
    kept, why = P.target_spacing(spacings, shapes=[[512, 512, 200]] * 5)
    assert kept == [0.7, 0.7, 5.0] and "keeps its median" in why
    # never finer than the other axes
    assert P.target_spacing([[1, 4, 4], [1, 4, 4], [1, 4, 4], [1, 4, 0.1]])[0] == [1.0, 4.0, 4.0]


def test_patch_shrinks_to_the_memory_budget(small_union):
    fp = P.fingerprint_dataset(small_union, workers=1, cache=False)
    fp = dict(fp, modalities={"CT": dict(fp["modalities"]["CT"], cropped_mm_median=[600.0, 500.0, 400.0])})
    big = P.make_plan(fp, device="cuda")["settings"]
    small = P.make_plan(fp, device="cpu", memory=0.05)["settings"]
    assert math.prod(small["patch_size"]) < math.prod(big["patch_size"])
    for s in (big, small):
        div = [math.prod(st if isinstance(st, int) else st[a] for st in s["network_def#strides"]) for a in range(3)]
        assert all(p % d == 0 for p, d in zip(s["patch_size"], div))
        assert len(s["network_def#channels"]) == len(s["network_def#strides"]) + 1
    with pytest.raises(ValueError, match="3D data.*2D"):
        P.make_plan(dict(fp, spatial_dims=2), bundle="marginal_exclusion_abdomen")
    with pytest.raises(ValueError, match="device"):
        P.make_plan(fp, device="tpu")
    with pytest.raises(ValueError, match="memory"):
        P.make_plan(fp, memory=0)


# ---------------------------------------------------------------------------------------------
# three real-world-shaped datasets: the planned values are the ones the fingerprint implies


def _mr_slices(root):
    """2D short-axis-like MR slices at 0.8 x 0.8 mm (8 mm apart), 3 classes, one structure per slice."""
    rng = np.random.default_rng(2)
    cases = []
    for k in range(6):
        img, lab = _body_case(rng, (80, 72), np.s_[10:70, 8:64],
                              {1: (np.s_[30:45, 25:40], 900.0), 2: (np.s_[48:58, 40:52], 300.0)}, 5, 500, 20)  # fmt: skip
        which = "ring" if k % 2 else "core"
        lab[lab != (1 if which == "core" else 2)] = 0
        cases.append((f"s{k}", img[..., None], lab[..., None], [which], which))
    img, lab = _body_case(rng, (80, 72), np.s_[10:70, 8:64], {1: (np.s_[30:45, 25:40], 900.0), 2: (np.s_[48:58, 40:52], 300.0)}, 5, 500, 20)
    cases.append(("t0", img[..., None], lab[..., None], "all", "test"))
    desc = _write_dataset(root, ["background", "core", "ring"], cases, (0.8, 0.8, 8.0), "MR", validation=("s5",), test=("t0",))
    (root / "dataset.json").write_text(json.dumps(desc))


def _ct_union(root):
    """A CT union at 3 mm of two sources, neither named 'full': 'ctorg' labels every class, 'kits' kidneys only."""
    rng = np.random.default_rng(3)
    cases = []
    for k in range(3):
        img, lab = _body_case(rng, (32, 32, 24), np.s_[4:28, 6:26, 2:22],
                              {1: (np.s_[8:16, 8:16, 6:14], 140.0), 2: (np.s_[18:24, 10:16, 8:16], 200.0)}, -1000, 40, 10)  # fmt: skip
        cases.append((f"ctorg{k}", img, lab, "all", "ctorg"))
        img, lab = _body_case(rng, (32, 32, 24), np.s_[4:28, 6:26, 2:22], {2: (np.s_[18:24, 10:16, 8:16], 210.0)}, -1000, 45, 10)
        cases.append((f"kits{k}", img, lab, ["kidney"], "kits"))
    img, lab = _body_case(rng, (32, 32, 24), np.s_[4:28, 6:26, 2:22],
                          {1: (np.s_[8:16, 8:16, 6:14], 140.0), 2: (np.s_[18:24, 10:16, 8:16], 200.0)}, -1000, 40, 10)  # fmt: skip
    cases.append(("test0", img, lab, "all", "ctorg"))
    desc = _write_dataset(root, ["background", "liver", "kidney"], cases, (3.0, 3.0, 3.0), "CT", validation=("ctorg2",), test=("test0",))
    (root / "dataset.json").write_text(json.dumps(desc))


def _mr_volumes(root):
    """A 4-class 3D MR at 1.5 mm with 12-bit intensities (0-4095)."""
    rng = np.random.default_rng(4)
    cases = []
    for k in range(5):  # mr4: the test case
        img, lab = _body_case(rng, (40, 36, 28), np.s_[4:36, 4:32, 2:26],
                              {1: (np.s_[8:16, 8:16, 6:12], 3600.0), 2: (np.s_[20:28, 8:14, 6:12], 2400.0),
                               3: (np.s_[10:20, 20:28, 14:22], 3000.0)}, 40, 1500, 60)  # fmt: skip
        cases.append((f"mr{k}", np.clip(img, 0, 4095), lab, "all", "mine"))
    desc = _write_dataset(root, ["background", "a", "b", "c"], cases, (1.5, 1.5, 1.5), "MR", validation=("mr3",), test=("mr4",))
    (root / "dataset.json").write_text(json.dumps(desc))


def test_plan_2d_mr_slices(tmp_path, capsys):
    _mr_slices(tmp_path)
    assert main(["plan", str(tmp_path), "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "plan for dcl_cardiac" in out and "reason" in out and "no case annotates background" in out
    plan = json.loads((tmp_path / P.PLAN_NAME).read_text())
    s, fp = plan["plans"]["dcl_cardiac"]["settings"], plan["fingerprint"]
    assert fp["spatial_dims"] == 2  # (H, W, 1) slices are 2D; their 8 mm thickness is not an axis
    assert s["pixdim"] == [0.8, 0.8]
    # whole 80 x 72 slices; 4 halvings keep maps >= 8 (80, 72 -> 10, 9), so a multiple of 16: 80 x 80
    assert s["spatial_size"] == [80, 80]
    assert s["network_def#backbone_kwargs#strides"] == [2, 2, 2, 2]
    assert (s["num_classes"], s["classes"], s["full_sources"], s["missing"]) == (3, ["background", "core", "ring"], [], "any")
    assert s["normalization"] == {"MR": {"scheme": "zscore"}}
    assert s["validation"] == {"split": "validation", "cases": 1}
    assert P.plan_value(tmp_path, "spatial_size", [96, 96]) == [80, 80]
    assert P.plan_value(tmp_path, "pixdim", [1.0, 1.0], bundle="dcl_cardiac") == [0.8, 0.8]
    assert P.plan_value(tmp_path, "not_a_key", "default") == "default"


def test_plan_ct_union(tmp_path):
    _ct_union(tmp_path)
    plan = P.plan_dataset(tmp_path, workers=1)
    s, fp = plan["plans"]["marginal_exclusion_abdomen"]["settings"], plan["fingerprint"]
    assert s["pixdim"] == [3.0, 3.0, 3.0]
    # the body box is 24 x 20 x 20 voxels at 3 mm; two halvings keep maps >= 8 (-> 6, 5, 5): a multiple of 4 already
    assert fp["modalities"]["CT"]["cropped_shape_median"] == [24, 20, 20]
    assert s["patch_size"] == [24, 20, 20]
    assert (s["network_def#strides"], s["network_def#channels"]) == ([2, 2], [16, 32, 64])
    assert s["num_classes"] == 3 and s["full_sources"] == ["ctorg"]
    f = fp["modalities"]["CT"]["foreground"]
    assert s["normalization"]["CT"] == {"scheme": "ct", "clip": [f["percentile_00_5"], f["percentile_99_5"]], "mean": f["mean"], "std": f["std"]}
    assert 100 < f["percentile_00_5"] < f["percentile_99_5"] < 250  # liver 140 and kidney ~205 HU, noise 10
    assert s["intensity_range"] == [round(f["percentile_00_5"], 4), round(f["percentile_99_5"], 4)]
    assert s["batch_size"] == 2  # the 5% rule caps a 5-case dataset at the minimum
    assert P.plan_value(tmp_path, "full_sources", ["full"]) == ["ctorg"]


def test_plan_4class_mr_volumes(tmp_path):
    _mr_volumes(tmp_path)
    plan = P.plan_dataset(tmp_path, workers=1)
    s, fp = plan["plans"]["marginal_exclusion_abdomen"]["settings"], plan["fingerprint"]
    assert s["pixdim"] == [1.5, 1.5, 1.5]
    crop = fp["modalities"]["MR"]["cropped_shape_median"]
    assert crop == [32, 28, 24]
    # level 1: (32, 28, 24) -> (16, 14, 12); level 2 -> (8, 7, 6); level 3: only axis 0 (8 >= 8) -> stride (2, 1, 1)
    assert s["network_def#strides"] == [2, 2, [2, 1, 1]]
    assert s["patch_size"] == [32, 28, 24]
    assert s["num_classes"] == 4 and s["full_sources"] == ["mine"]
    assert s["normalization"] == {"MR": {"scheme": "zscore"}}
    f = fp["modalities"]["MR"]["foreground"]
    assert 2000 < f["percentile_00_5"] < f["percentile_99_5"] <= 4095
    # planning the other bundle keeps this one; the 2D bundle does not fit 3D data
    with pytest.raises(ValueError, match="3D"):
        P.plan_dataset(tmp_path, bundle="dcl_cardiac", workers=1)
    assert main(["plan", str(tmp_path), "--bundle", "dcl_cardiac", "--quiet"]) == 2


def test_body_mask_integer_path_is_otsu_foreground():
    """16-bit images take a bincount histogram: the same mask as OtsuForeground on the floats."""
    from partialseg.transforms import OtsuForeground

    rng = np.random.default_rng(5)
    for dtype, low, high in [(np.int16, -1024, 3071), (np.uint16, 0, 4095), (np.uint8, 0, 255)]:
        img = rng.integers(low, (low + high) // 2, (1, 24, 20, 12)).astype(dtype)
        img[0, 4:20, 3:17, 2:10] = rng.integers((low + high) // 2, high, (16, 14, 8))
        np.testing.assert_array_equal(P.body_mask(img), OtsuForeground()(img.astype(np.float32))[0].numpy())


def test_load_plan_for_a_bundle_config(tmp_path, capsys):
    """What a bundle config would call: the bundle's settings, {} without a plan, a warning when stale."""
    assert P.load_plan(tmp_path, "dcl_cardiac") == {}
    _mr_slices(tmp_path)
    assert P.load_plan(tmp_path, "dcl_cardiac") == {}
    P.plan_dataset(tmp_path, workers=1)
    settings = P.load_plan(tmp_path, "dcl_cardiac")
    assert settings["spatial_size"] == [80, 80] and settings["num_classes"] == 3
    assert P.load_plan(tmp_path, "marginal_exclusion_abdomen") == {}  # planned for the other bundle only
    assert "warning" not in capsys.readouterr().err
    import os

    image = tmp_path / "imagesTr" / "s0.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert P.load_plan(tmp_path, "dcl_cardiac") == settings
    assert "planned for an earlier state of the dataset" in capsys.readouterr().err
    (tmp_path / P.PLAN_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a plan written by `partialseg plan`"):
        P.load_plan(tmp_path, "dcl_cardiac")


BUNDLE_DIR = P.Path(__file__).resolve().parents[2] / "bundles"


def test_an_explicit_override_wins_over_the_plan(tmp_path, capsys):
    """Config level (no run): a command-line override replaces the key's expression, the other keys
    keep the plan; the settings a run records say where each came from; inference takes the model's
    settings first, then the dataset's plan, then the bundle's fallbacks."""
    from monai.bundle import ConfigParser

    data, bundle = tmp_path / "data", "marginal_exclusion_abdomen"
    data.mkdir()
    _ct_union(data)

    def parsed(config, **overrides):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE_DIR / bundle / "configs" / config))
        parser.update({"bundle_root": str(tmp_path), **overrides})
        return {k: parser.get_parsed_content(k) for k in ("pixdim", "patch_size", "num_classes", "network_def#strides")}

    fallback = {"pixdim": [4.5, 4.5, 4.0], "patch_size": [48, 48, 32], "num_classes": 7, "network_def#strides": [2, 2, 2]}
    # no plan.json yet: inference never plans (today's defaults), nor training when told not to
    assert parsed("inference.json", dataset_dir=str(data)) == fallback
    assert parsed("train.json", dataset_dir=str(data), plan_on_first_run=False) == fallback
    assert not (data / P.PLAN_NAME).exists()
    err = capsys.readouterr().err
    assert "holds no plan.json" in err and f"`partialseg plan {data} --bundle {bundle}`" in err
    # training plans on its first run: plan.json written, the table printed, its values used
    planned = {"pixdim": [3.0, 3.0, 3.0], "patch_size": [24, 20, 20], "num_classes": 3, "network_def#strides": [2, 2]}
    assert parsed("train.json", dataset_dir=str(data)) == planned
    assert P.load_plan(data, bundle)["full_sources"] == ["ctorg"]
    out, err = capsys.readouterr()
    assert f"plan for {bundle}" in out and f"written: {data / P.PLAN_NAME}" in out and "planning it now, for cpu" in err
    P.plan_dataset(data, workers=1)
    assert parsed("train.json", dataset_dir=str(data)) == planned
    assert parsed("train.json", dataset_dir=str(data / "dataset.json")) == planned  # the JSON file works too
    assert parsed("train.json", dataset_dir=str(data), pixdim=[2.0, 2.0, 2.0]) == {**planned, "pixdim": [2.0, 2.0, 2.0]}

    ckpt = tmp_path / "models" / "model.pt"
    P.save_model_settings(ckpt, bundle, {"pixdim": [2.0, 2.0, 2.0], "patch_size": [24, 20, 20], "num_classes": 3}, data)
    saved = json.loads(P.settings_path(ckpt).read_text())
    assert saved["source"] == {"pixdim": "override", "patch_size": "plan.json", "num_classes": "plan.json"}
    assert saved["classes"] == ["background", "liver", "kidney"]
    assert "overridden: pixdim" in capsys.readouterr().out
    # inference: the file is newer than the checkpoint (no model saved yet): ignored, the plan applies
    ckpt.write_bytes(b"old model")
    import os

    st = P.settings_path(ckpt).stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
    assert parsed("inference.json", dataset_dir=str(data)) == planned
    assert "saved no model yet" in capsys.readouterr().err
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the model saved after: its settings win, the plan fills in
    assert parsed("inference.json", dataset_dir=str(data)) == {**planned, "pixdim": [2.0, 2.0, 2.0]}
    assert parsed("inference.json", dataset_dir=str(data), pixdim=[5.0, 5.0, 5.0])["pixdim"] == [5.0, 5.0, 5.0]
    # without the model's settings nor a plan: the fallbacks (MONAI Label's infer task sets no dataset_dir)
    assert parsed("inference.json", checkpoint=str(tmp_path / "other.pt")) == fallback
    # a model trained on other classes than the dataset lists: said, naming both
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset.json").write_text(json.dumps({"name": "o", "classes": ["background", "a", "b"], "training": []}))
    assert P.load_model_settings(ckpt, other, bundle)["pixdim"] == [2.0, 2.0, 2.0]
    err = capsys.readouterr().err
    assert "trained on classes ['background', 'liver', 'kidney']" in err and "lists ['background', 'a', 'b']" in err
    # the MONAI Label app types a request override of a planned key by the fallback
    assert P.plan_fallback("$@dataset_plan.get('full_sources', ['full'])") == ["full"]
    assert P.plan_fallback("$@dataset_plan.get('pixdim', os.sep)") == "$@dataset_plan.get('pixdim', os.sep)"  # not a literal


# what the fingerprint implies for each dataset (derived by hand in the rule tests above)
PLANNED = {
    "mr_slices": (_mr_slices, "dcl_cardiac", {"pixdim": [0.8, 0.8], "spatial_size": [80, 80], "num_classes": 3, "missing": "any",
                                              "network_def#backbone_kwargs#strides": [2, 2, 2, 2]}),
    "ct_union": (_ct_union, "marginal_exclusion_abdomen", {"pixdim": [3.0, 3.0, 3.0], "patch_size": [24, 20, 20], "num_classes": 3,
                                                           "full_sources": ["ctorg"], "network_def#strides": [2, 2], "batch_size": 2}),
    "mr_volumes": (_mr_volumes, "marginal_exclusion_abdomen", {"pixdim": [1.5, 1.5, 1.5], "patch_size": [32, 28, 24], "num_classes": 4,
                                                               "full_sources": ["mine"], "network_def#strides": [2, 2, [2, 1, 1]]}),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PLANNED))
def test_bundles_run_on_a_planned_dataset_with_no_override(name, tmp_path):
    """Issue 14's acceptance: `partialseg plan`, then the bundle with nothing but --dataset_dir,
    --stage 1 and a tiny schedule: training, inference and evaluation complete on the planned
    settings (sources 'ctorg' / 'mine', not 'full'; 3 or 4 classes, not 7 or 4; the planned grid)."""
    import torch

    from partialseg.engines import run_bundle

    build, bundle, implied = PLANNED[name]
    data = tmp_path / "data"
    data.mkdir()
    build(data)
    if name != "ct_union":  # the README recipe: `partialseg plan` first
        assert main(["plan", str(data), "--quiet", "--workers", "1"]) == 0
    root = tmp_path / "bundle"
    r = run_bundle(BUNDLE_DIR / bundle, root, ("train.json",), threads=1, timeout=600, dataset_dir=str(data), stage=1,
                   epochs_stage1=1, iterations_per_epoch=2, val_interval=1)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if name == "ct_union":  # no plan.json: the first training run planned it, showed the table and trained with it
        assert "planning it now" in r.stderr and f"plan for {bundle}" in r.stdout and f"written: {data / P.PLAN_NAME}" in r.stdout
    plan = P.load_plan(data, bundle)
    assert f"settings from {data / P.PLAN_NAME}" in r.stdout
    saved = json.loads((root / "models" / "model_stage1.settings.json").read_text())
    assert saved["settings"] == P.bundle_overrides(plan, bundle)  # every planned key, as planned
    assert set(saved["source"].values()) == {"plan.json"}
    for key, value in implied.items():
        assert saved["settings"][key] == value, key
    weights = torch.load(root / "models" / "model_stage1.pt", map_location="cpu", weights_only=True)
    last_bias = [v for k, v in weights.items() if k.endswith("conv.bias")][-1]
    m = implied["num_classes"]
    assert tuple(last_bias.shape) == ((2 * m,) if bundle == "dcl_cardiac" else (m,))  # CompNet: 2m logits
    r = run_bundle(BUNDLE_DIR / bundle, root, ("inference.json", "evaluate.json"), threads=1, timeout=600, dataset_dir=str(data),
                   stage=1, progress=False)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    test = json.loads((data / "dataset.json").read_text())["test"][0]
    (pred,) = (root / "eval" / "pred").glob("*.nii.gz")
    assert nib.load(pred).shape[:2] == nib.load(data / test["image"]).shape[:2]  # back on the image's grid
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary, r.stdout[-2000:]


def test_dtml_atrium_reads_the_plan(tmp_path, capsys):
    """dtml_atrium plans spacing, patch, network, classes and the intensity normalisation it applies
    (CT: clip to the foreground percentiles, z-score with the foreground's mean / std; MR: per case),
    its configs read them, and its synthetic default is unchanged. Config level: no training run."""
    from monai.bundle import ConfigParser

    bundle = "dtml_atrium"

    def parsed(config, data, **overrides):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE_DIR / bundle / "configs" / config))
        parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(data), **overrides})
        keys = ("pixdim", "patch_size", "num_classes", "network_def#channels", "network_def#strides", "intensity_clip", "intensity_stats")
        out = {k: parser.get_parsed_content(k) for k in keys}
        transforms = parser.get_parsed_content("deterministic_transforms" if config == "train.json" else "preprocessing")
        return out, [type(t).__name__ for t in getattr(transforms, "transforms", transforms)]

    # without a plan (inference never plans): the synthetic atrium3d defaults, per-case z-score only
    default, names = parsed("inference.json", tmp_path / "none")
    assert default == {"pixdim": [1.5, 1.5, 1.5], "patch_size": [48, 48, 32], "num_classes": 2, "network_def#channels": [16, 32, 64, 128],
                       "network_def#strides": [2, 2, 2], "intensity_clip": None, "intensity_stats": None}  # fmt: skip
    assert "ScaleIntensityRanged" not in names and "NormalizeIntensityd" in names
    ct = tmp_path / "ct"
    ct.mkdir()
    _ct_union(ct)
    assert main(["plan", str(ct), "--bundle", bundle, "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "plan for dtml_atrium" in out and "--stage" not in out.split("train (in bundles/")[1]
    s = P.load_plan(ct, bundle)
    fg = json.loads((ct / P.PLAN_NAME).read_text())["fingerprint"]["modalities"]["CT"]["foreground"]
    # a batch of 4 (two-stream, fixed) of the 24 x 20 x 20 body box at 3 mm fits 0.5 GB: the patch of the marginal plan
    assert (s["pixdim"], s["patch_size"], s["num_classes"], s["batch_size"]) == ([3.0, 3.0, 3.0], [24, 20, 20], 3, 4)
    assert s["intensity_clip"] == [round(fg["percentile_00_5"], 4), round(fg["percentile_99_5"], 4)]
    assert s["intensity_stats"] == [round(fg["mean"], 4), round(fg["std"], 4)]
    assert "full_sources" not in s and "intensity_range" not in s
    assert set(P.bundle_overrides(s, bundle)) == set(P.BUNDLES[bundle]["config_keys"])
    planned, names = parsed("train.json", ct)
    assert planned == {k: s[k] for k in planned}
    assert names.index("ScaleIntensityRanged") < names.index("NormalizeIntensityd")  # clip, then z-score
    # MR: per-case z-score, as the synthetic default
    mr = tmp_path / "mr"
    mr.mkdir()
    _mr_volumes(mr)
    s = P.plan_dataset(mr, bundle=bundle, workers=1)["plans"][bundle]["settings"]
    assert (s["pixdim"], s["num_classes"], s["intensity_clip"], s["intensity_stats"]) == ([1.5, 1.5, 1.5], 4, None, None)


def test_dcl_missing_warns_when_two_classes_are_never_annotated(tmp_path):
    """One class annotated by no case (here the background) is learned as the complement of the
    others: missing='any', no warning. Two cannot be told apart: a warning naming both."""
    _mr_slices(tmp_path)
    fp = P.fingerprint_dataset(tmp_path, workers=1, cache=False)
    one = P.make_plan(fp, bundle="dcl_cardiac")
    assert one["settings"]["missing"] == "any" and not [w for w in one["warnings"] if "annotates" in w]
    assert "no case annotates background" in one["reasons"]["missing"]
    stats = dict(fp["class_stats"], ring=dict(fp["class_stats"]["ring"], cases_annotated=0))
    two = P.make_plan(dict(fp, class_stats=stats), bundle="dcl_cardiac")
    (warning,) = [w for w in two["warnings"] if "annotates" in w]
    assert two["settings"]["missing"] == "any" and "no case annotates background, ring" in warning and "apart" in warning


def _ct_mr_union(root):
    """A CT source labelling liver and an MR source labelling spleen, 3 cases each at 3 mm, their
    body boxes 32 x 28 x 24 (CT) and 28 x 28 x 20 (MR): the atlas bundle's kind of dataset."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(5)
    entries = []
    for k in range(3):
        ct = _body_case(rng, (40, 36, 28), np.s_[4:36, 4:32, 2:26], {1: (np.s_[8:16, 8:16, 6:12], 140.0)}, -1000, 40, 10)
        mr = _body_case(rng, (40, 36, 28), np.s_[6:34, 4:32, 2:22], {2: (np.s_[20:28, 8:14, 6:12], 2400.0)}, 40, 1500, 60)
        for name, (img, lab), organ, modality in ((f"ct{k}", ct, "liver", "CT"), (f"mr{k}", mr, "spleen", "MR")):
            _save(root / "imagesTr" / f"{name}.nii.gz", img.astype(np.int16 if modality == "CT" else np.float32), (3.0, 3.0, 3.0))
            _save(root / "labelsTr" / f"{name}.nii.gz", lab, (3.0, 3.0, 3.0))
            entries.append({"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz", "annotated": [organ],
                            "source": modality.lower(), "modality": modality})  # fmt: skip
    (root / "dataset.json").write_text(json.dumps({"name": "ctmr", "classes": ["background", "liver", "spleen"], "training": entries}))


def test_atlas_plan_takes_the_atlas_grid_and_each_modality(tmp_path, capsys):
    """atlas_multimodal_abdomen plans from the grid build-atlas resizes every body crop to (the mean
    cropped shape, no spacing), a DynUNet stride list (first 1), the MICPAM scales the levels allow,
    and each modality's normalisation by name; no spacing, stage or validation settings."""
    bundle = "atlas_multimodal_abdomen"
    _ct_mr_union(tmp_path)
    assert main(["plan", str(tmp_path), "--bundle", bundle, "--quiet", "--workers", "1"]) == 0
    assert f"plan for {bundle}" in capsys.readouterr().out
    s = P.load_plan(tmp_path, bundle)
    # mean body crop (32 + 28) / 2 x 28 x (24 + 20) / 2 = 30 x 28 x 22 voxels, raised to the 32 per axis that the
    # bundle's discriminator needs (four stride-2 layers at half resolution); halved while maps stay >= 8: 32 -> 4
    assert s["patch_size"] == [32, 32, 32]
    assert s["network_def#strides"] == [1, 2, 2, 2]
    assert s["network_def#filters"] == [16, 32, 64, 128]
    assert s["network_def#feature_levels"] == 2  # four levels: two intermediate decoder scales (the paper's three need five)
    assert s["intensity_by_modality"] == {"CT": "window", "MR": "zscore"}
    assert (s["num_classes"], s["batch_size"], s["validation"]) == (3, 2, {"split": None})
    assert not {"pixdim", "full_sources", "normalization", "intensity_range"} & set(s)
    assert set(P.bundle_overrides(s, bundle)) == set(P.BUNDLES[bundle]["config_keys"])


def test_hybrid_frames_plan_shrinks_large_frames_to_the_budget():
    """hybrid_polyp: whole frames resized to a multiple of the output stride (16); a Kvasir-sized
    median frame (530 x 620) is shrunk on the CPU budget, side by side relative to the median, until
    two pairs fit; on 8 GB (cuda) it keeps more of it; channels and classes come from the data."""
    fp = {"classes": ["background", "polyp"], "validation_cases": [], "spatial_dims": 2,
          "modalities": {"endoscopy": {"cases": 10, "channels": [3], "shape_median": [530.0, 620.0]}}}  # fmt: skip
    cpu = P.make_plan(fp, "hybrid_polyp", device="cpu")["settings"]
    gpu = P.make_plan(fp, "hybrid_polyp", device="cuda")["settings"]
    for s in (cpu, gpu):
        assert all(v % 16 == 0 for v in s["spatial_size"]) and 2 <= s["pairs_per_batch"] <= 8
        assert (s["num_classes"], s["in_channels"], s["validation"]) == (2, 3, {"split": None})
        h, w = s["spatial_size"]
        assert abs(h / w - 530 / 620) < 0.1  # shrunk side by side relative to the median frame
    assert cpu["spatial_size"][1] < gpu["spatial_size"][1] <= 624  # 620 rounded up to 16
    per_pair = lambda size: 3 * P.estimate_memory(size, 1, [16, 32, 64, 128, 256], [[2, 2]] * 4, 3, 2, 2.0)  # noqa: E731
    assert 2 * per_pair(cpu["spatial_size"]) <= 0.5 * 2**30 < 2 * per_pair([v + 16 for v in cpu["spatial_size"]])


@pytest.mark.slow
def test_atlas_bundle_plans_a_user_dataset_on_its_first_run_and_inference_builds_the_planned_network(tmp_path):
    """The atlas bundle on the CT + MR toy with nothing but --dataset_dir and a tiny schedule: the first
    training run plans the dataset (patch 32^3, four levels, two MICPAM scales), builds the atlas, trains
    and records the settings; inference then builds the same four-level network from them."""
    from monai.bundle import ConfigParser

    from partialseg.engines import run_bundle

    bundle = "atlas_multimodal_abdomen"
    data = tmp_path / "data"
    _ct_mr_union(data)
    root = tmp_path / "bundle"
    r = run_bundle(BUNDLE_DIR / bundle, root, ("train.json",), threads=1, timeout=600, dataset_dir=str(data), epochs=1,
                   iterations_per_epoch=2, progress=False)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "planning it now" in r.stderr and f"plan for {bundle}" in r.stdout and (data / "atlas.nii.gz").is_file()
    saved = json.loads((root / "models" / "model.settings.json").read_text())
    plan = P.load_plan(data, bundle)
    assert saved["settings"]["patch_size"] == plan["patch_size"] == [32, 32, 32]
    assert saved["settings"]["network_def#feature_levels"] == 2 and saved["source"]["network_def#filters"] == "plan.json"
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_DIR / bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(root), "dataset_dir": str(data)})
    net = parser.get_parsed_content("network_def")
    assert list(net.filters) == [16, 32, 64, 128]  # a plain DynUNet (inference needs no prototypes)
    import torch

    weights = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(weights)  # the trained network is the planned one
