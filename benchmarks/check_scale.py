"""``partialseg check`` at scale: wall time and peak memory on a large synthetic dataset, before and after.

The dataset: ``--entries`` training cases (default 100,000) of tiny 8 x 8 x 8 NIfTI images and
labels. To keep generation to seconds and the disk use to kilobytes, only ``--distinct`` pairs
of files are written and every entry is a hard link to one of them (each entry has its own path
and real path, so none is a duplicate or a leak; every file is opened and decompressed as a
real dataset's would be). Each run is a fresh ``python -m partialseg check`` process; its wall
time is measured from outside and its peak resident memory read from
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the largest single process: the main one or a
worker). ``--before PATH`` runs the same command on another checkout (``git worktree add PATH
<commit>``) through ``PYTHONPATH``.

Runs (one thread per process, as the rest of the benchmarks):
- ``after, cold``: ``--workers`` processes, no cache file yet;
- ``after, cached``: the same again, every case answered by the cache;
- ``before``: the checkout before the change (serial, no cache), on ``--before-entries`` cases
  (then extrapolated linearly to ``--entries``, and ``after_cold_same_entries`` repeats the
  cold run after the change on that same smaller dataset).

Usage:
    python benchmarks/check_scale.py --entries 100000 --workers 2 --before /tmp/check_before \\
        --out benchmarks/results/check_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(folder: Path, entries: int, distinct: int) -> float:
    """Write ``distinct`` image/label pairs and ``entries`` hard-linked training entries; seconds taken."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    (folder / "src").mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir()
    for k in range(distinct):
        nib.save(nib.Nifti1Image(rng.normal(size=(8, 8, 8)).astype(np.float32), np.eye(4)), str(folder / f"src/img{k}.nii.gz"))
        nib.save(nib.Nifti1Image((rng.random((8, 8, 8)) > 0.7).astype(np.uint8), np.eye(4)), str(folder / f"src/lab{k}.nii.gz"))
    training = []
    for i in range(entries):
        k = i % distinct
        os.link(folder / f"src/img{k}.nii.gz", folder / f"imagesTr/c{i:06d}.nii.gz")
        os.link(folder / f"src/lab{k}.nii.gz", folder / f"labelsTr/c{i:06d}.nii.gz")
        training.append({"image": f"imagesTr/c{i:06d}.nii.gz", "label": f"labelsTr/c{i:06d}.nii.gz", "annotated": "all"})
    (folder / "dataset.json").write_text(json.dumps({"name": "scale", "classes": ["background", "organ"], "training": training}))
    return time.perf_counter() - start


_CHILD = """
import resource, subprocess, sys, time, json
start = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
print(json.dumps({"rc": r.returncode, "wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stderr_tail": r.stderr[-300:]}))
"""


def run_check(pythonpath: Path, dataset: Path, extra: list[str]) -> dict:
    """One ``partialseg check`` in a fresh process tree; wall time and the largest process's peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _CHILD, sys.executable, "-m", "partialseg", "check", str(dataset), "--quiet", *extra]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--distinct", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--before", type=Path, default=None, help="checkout of the code before the change (PYTHONPATH)")
    p.add_argument("--before-entries", type=int, default=None, help="entries for the before run (default --entries): a smaller dataset, extrapolated linearly")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="check_scale_"))
    result: dict = {"entries": args.entries, "distinct_files": args.distinct, "workers": args.workers, "cpus": os.cpu_count(),
                    "python": platform.python_version(), "runs": {}}
    def commit(path: Path) -> str | None:
        r = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return r.stdout.strip() or None

    result["after_commit"] = commit(ROOT)
    if args.before is not None:
        result["before_commit"] = commit(args.before)
    try:
        result["generation_s"] = round(make_dataset(tmp / "ds", args.entries, args.distinct), 1)
        print(f"generated {args.entries} entries in {result['generation_s']} s", flush=True)
        for name, extra in (("after_cold", ["--workers", str(args.workers)]), ("after_cached", ["--workers", str(args.workers)])):
            r = run_check(ROOT, tmp / "ds", extra)
            result["runs"][name] = {**r, "ms_per_case": 1000 * r["wall_s"] / args.entries}
            print(name, json.dumps(result["runs"][name]), flush=True)
        if args.before is not None:
            n = args.before_entries or args.entries
            ds = tmp / "ds"
            if n != args.entries:
                make_dataset(tmp / "ds_before", n, args.distinct)
                ds = tmp / "ds_before"
            r = run_check(args.before, ds, [])
            r.update(entries=n, ms_per_case=1000 * r["wall_s"] / n)
            if n != args.entries:
                r["extrapolated_wall_s"] = r["wall_s"] * args.entries / n
            result["runs"]["before"] = r
            print("before", json.dumps(r), flush=True)
            if n != args.entries:  # the same smaller dataset after the change: a like-for-like ratio and memory
                same = run_check(ROOT, ds, ["--workers", str(args.workers), "--no-cache"])
                same.update(entries=n, ms_per_case=1000 * same["wall_s"] / n)
                result["runs"]["after_cold_same_entries"] = same
                print("after_cold_same_entries", json.dumps(same), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
