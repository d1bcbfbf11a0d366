"""``partialseg plan`` at scale: wall time on a 200-case 3D dataset of 128^3 volumes (issue 14).

The dataset (written once under ``--data``, reused when its ``dataset.json`` exists): ``--cases``
CT-like volumes of ``--size``^3 voxels (int16 HU: air, an elliptic body, three organs, noise),
gzip-compressed NIfTI as real datasets are, with per-case spacings (0.7-0.9 mm in plane, 1-5 mm
between slices, so the anisotropy rule is exercised) and labels of a union of three sources: 10%
fully labelled (``ctorg``), the rest liver-only or kidney-only.

Runs, each a fresh ``python -m partialseg plan`` process timed from outside (one thread per
process, ``--workers`` processes reading):
- ``cold``: no fingerprint cache and no ``plan.json`` (every file read);
- ``cached``: the same again (the fingerprint comes from the cache).

Baseline in the same run: MONAI's ``LoadImage`` reading the image and label of the first
``--baseline-cases`` cases in one process (no statistics at all), extrapolated per case to the
whole dataset: ``cold / baseline`` is what the fingerprint costs over a plain MONAI read of the
data with ``--workers`` processes.

Usage:
    python benchmarks/plan_speed.py --cases 200 --size 128 --data /tmp/partialseg_plan_bench \\
        --out benchmarks/results/plan_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(folder: Path, cases: int, size: int) -> float:
    """Write the dataset; seconds taken (0 when it exists already)."""
    if (folder / "dataset.json").is_file():
        return 0.0
    start = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size, dtype=np.float32)] * 3, indexing="ij"))
    training = []
    n_full = max(1, cases // 10)
    for k in range(cases):
        c = rng.uniform(-0.08, 0.08, 3).astype(np.float32)[:, None, None, None]
        g = grid - c
        body = (g[0] / 0.85) ** 2 + (g[1] / 0.65) ** 2 < 1.0
        img = np.where(body, 40.0, -1000.0).astype(np.float32) + rng.normal(0, 15, (size,) * 3).astype(np.float32)
        lab = np.zeros((size,) * 3, np.uint8)
        liver = ((g[0] + 0.35) / 0.3) ** 2 + ((g[1] - 0.1) / 0.25) ** 2 + (g[2] / 0.4) ** 2 < 1.0
        kidney = ((g[0] - 0.4) / 0.12) ** 2 + ((g[1] + 0.3) / 0.12) ** 2 + (g[2] / 0.25) ** 2 < 1.0
        spleen = ((g[0] - 0.4) / 0.15) ** 2 + ((g[1] - 0.25) / 0.15) ** 2 + ((g[2] - 0.2) / 0.2) ** 2 < 1.0
        img[liver] += 80.0
        img[kidney] += 150.0
        img[spleen] += 60.0
        if k < n_full:
            source, annotated = "ctorg", "all"
            lab[liver], lab[kidney], lab[spleen] = 1, 2, 3
        elif k % 2:
            source, annotated = "liver", ["liver"]
            lab[liver] = 1
        else:
            source, annotated = "kidney", ["kidney"]
            lab[kidney] = 2
        spacing = [rng.uniform(0.7, 0.9)] * 2 + [rng.choice([1.0, 2.5, 5.0])]
        affine = np.diag([*spacing, 1.0])
        name = f"case_{k:04d}.nii.gz"
        nib.save(nib.Nifti1Image(np.clip(img, -1024, 3071).astype(np.int16), affine), str(folder / "imagesTr" / name))
        nib.save(nib.Nifti1Image(lab, affine), str(folder / "labelsTr" / name))
        training.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}", "annotated": annotated, "source": source, "modality": "CT"})
    desc = {"name": "plan_bench", "classes": ["background", "liver", "kidney", "spleen"], "training": training}
    (folder / "dataset.json").write_text(json.dumps(desc, indent=1))
    return time.perf_counter() - start


def timed_plan(folder: Path, workers: int) -> tuple[float, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "partialseg", "plan", str(folder), "--workers", str(workers), "--quiet"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return wall, out.stdout


def baseline(folder: Path, n: int) -> float:
    """Seconds per case for MONAI's LoadImage to read an image and its label (one process)."""
    from monai.transforms import LoadImage

    desc = json.loads((folder / "dataset.json").read_text())
    loader = LoadImage(image_only=True)
    start = time.perf_counter()
    for case in desc["training"][:n]:
        loader(str(folder / case["image"]))
        loader(str(folder / case["label"]))
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--data", default="/tmp/partialseg_plan_bench")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--baseline-cases", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    folder = Path(args.data)
    gen = make_dataset(folder, args.cases, args.size)
    disk = sum(p.stat().st_size for p in folder.rglob("*.nii.gz"))
    for name in ("plan.json", ".partialseg_fingerprint.json"):
        (folder / name).unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    cold, table = timed_plan(folder, args.workers)
    load_after = os.getloadavg()[0]
    cached, _ = timed_plan(folder, args.workers)
    per_case = baseline(folder, args.baseline_cases)
    plan = json.loads((folder / "plan.json").read_text())
    result = {
        "cases": args.cases,
        "size": args.size,
        "dataset_bytes": disk,
        "generation_s": round(gen, 1),
        "workers": args.workers,
        "cold_s": round(cold, 2),
        "cached_s": round(cached, 2),
        "monai_loadimage_s_per_case": round(per_case, 4),
        "monai_loadimage_s_extrapolated": round(per_case * args.cases, 1),
        "cold_over_monai_read": round(cold / (per_case * args.cases), 2),
        "target_s": 60,
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
        "settings": plan["plans"]["marginal_exclusion_abdomen"]["settings"],
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(), "processor": platform.processor()},
    }
    print(table)
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
