"""Speed and memory of the partial-label losses against the losses they generalise (CPU).

    python benchmarks/losses.py            # (2, 8, 64, 64, 64) logits, writes benchmarks/results/losses_cpu.json
    python benchmarks/losses.py --quick    # (2, 4, 16, 16, 16), a smoke test

Time: forward + backward from logits, repetitions of baseline and candidate interleaved in one
process (``baseline, candidate, baseline, candidate, ...``) so that load from other processes
hits both alike; the ratio is taken on the minimum over repetitions (the least disturbed run),
the median is stored too. One torch thread by default (``--threads``): on a machine shared with
other jobs this keeps the ratios reproducible.

Memory: the peak resident memory a single forward + backward adds, measured in a fresh
subprocess per loss: inputs are built, the kernel's peak counter (VmHWM) is reset through
``/proc/self/clear_refs``, one forward + backward runs, and the peak minus the resident memory
before the call is reported. ``MALLOC_MMAP_THRESHOLD_`` is fixed so that freed blocks go back
to the system and the resident size follows live tensors. (CPU tensors have no allocator
statistics, and tracemalloc does not see torch's allocations.)

Backend: the compiled CPU kernels of ``partialseg._native`` when they build here (the default),
else the torch implementation; ``PARTIALSEG_NATIVE=0`` measures the torch path on purpose.

Targets (issue 3): CE-type losses <= 1.6x ``torch.nn.functional.cross_entropy`` (class-index
target), Dice-type losses <= 1.3x ``monai.losses.DiceLoss(softmax=True)``,
``MarginalExclusionLoss`` <= 2.2x ``monai.losses.DiceCELoss(softmax=True)``; peak memory <= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FULL_SHAPE = (2, 8, 64, 64, 64)
QUICK_SHAPE = (2, 4, 16, 16, 16)
RESULT = ROOT / "benchmarks" / "results" / "losses_cpu.json"

# name -> (constructor source, baseline key, time target, memory target)
CASES = {
    "MarginalCELoss": ("MarginalCELoss()", "cross_entropy", 1.6, 1.5),
    "ExclusionCELoss": ("ExclusionCELoss()", "cross_entropy", 1.6, 1.5),
    "CompatibleLoss(ce)": ("CompatibleLoss('ce', None)", "cross_entropy", 1.6, 1.5),
    "CompatibleLoss(ce, ce)": ("CompatibleLoss('ce', 'ce')", "cross_entropy", 1.6, 1.5),
    "CompatibleLoss(ta_ce, ex_ce)": ("CompatibleLoss('ta_ce', 'ex_ce')", "cross_entropy", 1.6, 1.5),
    "MarginalDiceLoss": ("MarginalDiceLoss()", "DiceLoss", 1.3, 1.5),
    "ExclusionDiceLoss": ("ExclusionDiceLoss()", "DiceLoss", 1.3, 1.5),
    "CompatibleLoss(dice, dice)": ("CompatibleLoss('dice', 'dice')", "DiceLoss", 1.3, 1.5),
    "MarginalExclusionLoss": ("MarginalExclusionLoss()", "DiceCELoss", 2.2, 1.5),
    "CompatibleLoss(MMEE)": ("CompatibleLoss(('ta_ce', 'ta_dice'), ('ex_ce', 'ex_dice'))", "DiceCELoss", 2.2, 1.5),
}
BASELINES = {
    "cross_entropy": "lambda x, t, lab, oh: torch.nn.functional.cross_entropy(x, lab)",
    "DiceLoss": "lambda x, t, lab, oh: _DICE(x, oh)",
    "DiceCELoss": "lambda x, t, lab, oh: _DICECE(x, oh)",
}


def make_inputs(shape: tuple[int, ...], seed: int = 0):
    """Logits, a partial ``<0,p,1>`` target (sample 0 fully labelled, sample 1 annotates class 1 only),
    the class-index labels and the one-hot map."""
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    x = torch.randn(shape, generator=g)
    lab = torch.randint(0, c, (b, *shape[2:]), generator=g)
    oh = torch.nn.functional.one_hot(lab, c).movedim(-1, 1).float().contiguous()  # as a collated batch
    t = oh.clone()
    annotated = lab[1] == 1
    cls = torch.arange(c).view(c, *([1] * (len(shape) - 2)))
    t[1] = torch.where(annotated, oh[1], torch.where(cls == 1, 0.0, 0.5))
    return x, t, lab, oh


def _namespace() -> dict:
    import monai

    import partialseg.losses as L

    ns = {"torch": torch, **{n: getattr(L, n) for n in L.__all__}}
    ns["_DICE"] = monai.losses.DiceLoss(softmax=True)
    ns["_DICECE"] = monai.losses.DiceCELoss(softmax=True)
    return ns


def _loss_fn(src: str, ns: dict, baseline: bool):
    if baseline:
        return eval(src, ns)  # noqa: S307 - fixed strings of this file
    loss = eval(src, ns)  # noqa: S307
    return lambda x, t, lab, oh: loss(x, t)


def _one(fn, x0, t, lab, oh) -> float:
    x = x0.clone().requires_grad_(True)
    start = time.perf_counter()
    fn(x, t, lab, oh).backward()
    return time.perf_counter() - start


def time_cases(shape, reps: int, names) -> dict:
    ns = _namespace()
    x0, t, lab, oh = make_inputs(shape)
    out = {}
    for name in names:
        src, base, _, _ = CASES[name]
        cand_fn, base_fn = _loss_fn(src, ns, False), _loss_fn(BASELINES[base], ns, True)
        _one(cand_fn, x0, t, lab, oh), _one(base_fn, x0, t, lab, oh)  # warm-up
        tc, tb = [], []
        for _ in range(reps):
            tb.append(_one(base_fn, x0, t, lab, oh))
            tc.append(_one(cand_fn, x0, t, lab, oh))
        out[name] = {"candidate_s": tc, "baseline_s": tb}
    return out


_MEMORY_CHILD = r"""
import os, sys, re
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
from benchmarks.losses import make_inputs, _namespace, _loss_fn
ns = _namespace()
x0, t, lab, oh = make_inputs({shape!r})
fn = _loss_fn({src!r}, ns, {baseline!r})
x = x0.clone().requires_grad_(True)
def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
fn(x, t, lab, oh).backward()
print(status("VmHWM") - before)
"""


def peak_memory(src: str, baseline: bool, shape) -> int | None:
    """Peak bytes one forward + backward adds, in a fresh process; None where /proc is unavailable."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    code = _MEMORY_CHILD.format(root=str(ROOT), shape=tuple(shape), src=src, baseline=baseline, threads=torch.get_num_threads())
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
        return int(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small shape {QUICK_SHAPE}, few repetitions, no memory")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per loss (default 15, quick 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default {RESULT.relative_to(ROOT)}; none with --quick)")
    parser.add_argument("--only", nargs="*", default=None, help="subset of loss names")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: on a shared machine one busy core then disturbs less)"
    )
    args = parser.parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace) -> dict:
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    reps = args.reps or (2 if args.quick else 15)
    names = args.only or list(CASES)
    timings = time_cases(shape, reps, names)
    mem_base: dict[str, int | None] = {}
    rows = []
    for name in names:
        src, base, t_target, m_target = CASES[name]
        tc, tb = timings[name]["candidate_s"], timings[name]["baseline_s"]
        ratio = min(tc) / min(tb)
        row = {
            "loss": name,
            "baseline": base,
            "candidate_min_s": min(tc),
            "baseline_min_s": min(tb),
            "candidate_median_s": statistics.median(tc),
            "baseline_median_s": statistics.median(tb),
            "time_ratio": ratio,
            "time_ratio_median": statistics.median(tc) / statistics.median(tb),
            "time_target": t_target,
            "time_pass": ratio <= t_target,
        }
        if not (args.quick or args.no_memory):
            if base not in mem_base:
                mem_base[base] = peak_memory(BASELINES[base], True, shape)
            mc = peak_memory(src, False, shape)
            mb = mem_base[base]
            row.update({"candidate_peak_bytes": mc, "baseline_peak_bytes": mb})
            if mc is not None and mb:
                row.update({"memory_ratio": mc / mb, "memory_target": m_target, "memory_pass": mc / mb <= m_target})
        rows.append(row)
    from partialseg import _native

    backend = "native" if _native.library() is not None else "torch"  # PARTIALSEG_NATIVE=0 measures the torch path
    print(f"shape {shape}, {reps} interleaved repetitions, {torch.get_num_threads()} threads, torch {torch.__version__}, {backend} kernels")
    header = f"{'loss':32s} {'baseline':14s} {'time ms':>8s} {'base ms':>8s} {'ratio':>6s} {'target':>6s} {'':4s} {'mem':>5s} {'':4s}"
    print(header)
    for r in rows:
        mem = f"{r['memory_ratio']:5.2f} {'PASS' if r['memory_pass'] else 'FAIL'}" if "memory_ratio" in r else f"{'-':>5s} {'':4s}"
        print(
            f"{r['loss']:32s} {r['baseline']:14s} {r['candidate_min_s'] * 1e3:8.1f} {r['baseline_min_s'] * 1e3:8.1f}"
            f" {r['time_ratio']:6.2f} {r['time_target']:6.1f} {'PASS' if r['time_pass'] else 'FAIL'} {mem}"
        )
    result = {
        "shape": list(shape),
        "reps": reps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "backend": backend,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    out = args.out if args.out is not None else (None if args.quick else RESULT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
