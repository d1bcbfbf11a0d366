"""Benchmark: SignedDistanceMap against the DTML reference approach, same process, interleaved.

The reference approach (re-implemented from the DTML code's description) computes, per class,
two full-volume SciPy EDTs (inside and outside, float64) and skimage's ``find_boundaries`` on the
full volume. ``SignedDistanceMap`` must give the same maps (to float tolerance) in at most 0.75x
the reference's time.

Run ``python benchmarks/transforms.py`` (3-class 128^3 label) or ``--quick`` (48^3, one repeat).
Writes ``benchmarks/results/transforms_cpu.json`` (``--out`` to change; the quick mode does not
overwrite the recorded full result unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partialseg.transforms.distance import SignedDistanceMap  # noqa: E402

TARGET_RATIO = 0.75
RESULT = Path(__file__).resolve().parent / "results" / "transforms_cpu.json"


def make_label(size: int, seed: int = 0) -> np.ndarray:
    """A (1, size, size, size) label map with three non-overlapping smooth blobs (values 1, 2, 3)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(0.0, 1.0, size)] * 3, indexing="ij"))
    label = np.zeros((size,) * 3, dtype=np.int64)
    centres = [(0.3, 0.3, 0.35), (0.7, 0.35, 0.6), (0.45, 0.72, 0.5)]
    for value, centre in enumerate(centres, start=1):
        noise = ndi.gaussian_filter(rng.standard_normal((size,) * 3), sigma=size / 12.0)
        noise /= np.abs(noise).max()
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
        blob = (dist + 0.06 * noise) < 0.17
        label[blob & (label == 0)] = value
    return label[None]


def reference_sdm(label: np.ndarray, num_classes: int) -> np.ndarray:
    """DTML reference approach: two full EDTs + find_boundaries per foreground class (float64)."""
    out = np.zeros((num_classes - 1, *label.shape[1:]), dtype=np.float64)
    for c in range(1, num_classes):
        posmask = label[0] == c
        if posmask.any():
            negmask = ~posmask
            posdis = ndi.distance_transform_edt(posmask)
            negdis = ndi.distance_transform_edt(negmask)
            boundary = find_boundaries(posmask, mode="inner").astype(np.uint8)
            sdf = (negdis - np.min(negdis)) / (np.max(negdis) - np.min(negdis)) - (posdis - np.min(posdis)) / (
                np.max(posdis) - np.min(posdis)
            )
            sdf[boundary == 1] = 0
            out[c - 1] = sdf
    return out


def _time(fn, *args):
    t0 = time.perf_counter()
    res = fn(*args)
    return time.perf_counter() - t0, res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48^3 label, one repeat (seconds)")
    parser.add_argument("--size", type=int, default=None, help="cube side (default 128, 48 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5, 1 with --quick)")
    parser.add_argument(
        "--out", type=str, default=None, help="JSON path (default benchmarks/results/transforms_cpu.json)"
    )
    args = parser.parse_args(argv)
    size = args.size or (48 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 5)
    out_path = Path(args.out) if args.out else (None if args.quick else RESULT)

    label = make_label(size)
    sdm = SignedDistanceMap(num_classes=4)
    sdm_threads = SignedDistanceMap(num_classes=4, num_workers=2)
    ref_t, ours_t, thr_t, diffs = [], [], [], []
    for _ in range(repeats):  # interleaved so that load from other processes hits both alike
        t, ref = _time(reference_sdm, label, 4)
        ref_t.append(t)
        t, ours = _time(sdm, label)
        ours_t.append(t)
        t, ours_thr = _time(sdm_threads, label)
        thr_t.append(t)
        diffs.append(float(np.abs(ours.astype(np.float64) - ref).max()))
        diffs.append(float(np.abs(ours_thr.astype(np.float64) - ref).max()))
    ref_med, ours_med, thr_med = (float(np.median(x)) for x in (ref_t, ours_t, thr_t))
    ratio = ours_med / ref_med
    max_diff = max(diffs)
    identical = max_diff <= 1e-5
    passed = identical and ratio <= TARGET_RATIO
    result = {
        "benchmark": "SignedDistanceMap vs DTML reference approach",
        "shape": [1, size, size, size],
        "classes": 3,
        "voxels_per_class": [int((label == c).sum()) for c in (1, 2, 3)],
        "repeats": repeats,
        "reference_s": ref_t,
        "ours_s": ours_t,
        "ours_2threads_s": thr_t,
        "reference_median_s": ref_med,
        "ours_median_s": ours_med,
        "ours_2threads_median_s": thr_med,
        "ratio": ratio,
        "ratio_2threads": thr_med / ref_med,
        "target_ratio": TARGET_RATIO,
        "max_abs_diff": max_diff,
        "identical": identical,
        "pass": passed,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print(f"SignedDistanceMap on a 3-class {size}^3 label, {repeats} interleaved repeats (median):")
    print(f"  reference (2 full EDTs + find_boundaries per class): {ref_med:.3f} s")
    print(f"  SignedDistanceMap (num_workers=1):                   {ours_med:.3f} s  ratio {ratio:.3f}")
    print(f"  SignedDistanceMap (num_workers=2):                   {thr_med:.3f} s  ratio {thr_med / ref_med:.3f}")
    print(f"  max |ours - reference| = {max_diff:.2e}")
    print(f"  target ratio <= {TARGET_RATIO}: {'PASS' if passed else 'FAIL'}")
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  wrote {out_path}")
    return result


if __name__ == "__main__":
    main()
