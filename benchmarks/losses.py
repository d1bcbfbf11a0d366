"""Speed and memory of the partial-label losses against the losses they generalise (CPU).

    python benchmarks/losses.py            # (2, 8, 64, 64, 64) logits, writes benchmarks/results/losses_cpu.json
    python benchmarks/losses.py --quick    # (2, 4, 16, 16, 16), a smoke test
    python benchmarks/losses.py --sweep    # C = 4 ... 128 at (1, C, 48, 48, 48), writes benchmarks/results/losses_sweep.json

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

Class-count sweep (``--sweep``, issue 18): the same forward + backward at a fixed number of
voxels, ``(1, C, 48, 48, 48)`` for C = 4, 8, 16, 32, 64, 128 (unions of partial datasets reach
100+ classes), one partially labelled sample (class 1 annotated, the rest unknown). At every C
each loss and each baseline run interleaved in one round-robin per repetition; every loss gets
its ratio to ``torch.nn.functional.cross_entropy`` and, for the Dice-type losses, to its own
baseline (``DiceLoss`` / ``DiceCELoss``). Targets: ``MarginalCELoss`` <= 1.6x cross-entropy at
every C; the Dice-type and ``MarginalExclusionLoss`` ratios must not regress. ``--target movedim``
passes the target as ``one_hot(label, C).movedim(-1, 1)`` builds it (channels-last memory, not
made contiguous), the way a target made outside a collate function arrives; the default is a
contiguous ``(B, C, ...)`` target as a collated batch holds.

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
SWEEP_RESULT = ROOT / "benchmarks" / "results" / "losses_sweep.json"
SWEEP_CLASSES = (4, 8, 16, 32, 64, 128)
SWEEP_SPATIAL = (48, 48, 48)
SWEEP_CASES = (
    "MarginalCELoss",
    "ExclusionCELoss",
    "CompatibleLoss(ce, ce)",
    "MarginalDiceLoss",
    "ExclusionDiceLoss",
    "MarginalExclusionLoss",
    "CompatibleLoss(MMEE)",
)

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
    """Logits, a partial ``<0,p,1>`` target (sample 0 fully labelled, sample 1 annotates class 1 only;
    a batch of one is that partial sample), the class-index labels and the one-hot map."""
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    x = torch.randn(shape, generator=g)
    lab = torch.randint(0, c, (b, *shape[2:]), generator=g)
    oh = torch.nn.functional.one_hot(lab, c).movedim(-1, 1).float().contiguous()  # as a collated batch
    t = oh.clone()
    part = 1 if b > 1 else 0
    annotated = lab[part] == 1
    cls = torch.arange(c).view(c, *([1] * (len(shape) - 2)))
    t[part] = torch.where(annotated, oh[part], torch.where(cls == 1, 0.0, 0.5))
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


def sweep(reps: int, classes=SWEEP_CLASSES, spatial=SWEEP_SPATIAL, names=SWEEP_CASES, target: str = "contiguous") -> list[dict]:
    """Ratios of each loss to cross-entropy (and to its own baseline) at each class count.

    Per class count, every repetition runs each baseline and each loss once, in a fixed order
    (baselines first). ``ratio_*`` are ratios of minimums over repetitions (as the main table);
    ``ratio_*_median`` are medians of the per-repetition ratios (a loss against the baseline run
    just before it), steadier when other jobs load the machine unevenly.
    """
    ns = _namespace()
    rows = []
    for c in classes:
        x0, t, lab, oh = make_inputs((1, c, *spatial))
        if target == "movedim":  # the same values in channels-last memory
            t, oh = (v.movedim(1, -1).contiguous().movedim(-1, 1) for v in (t, oh))
        fns = {key: _loss_fn(BASELINES[key], ns, True) for key in BASELINES}
        fns.update({name: _loss_fn(CASES[name][0], ns, False) for name in names})
        times: dict[str, list[float]] = {key: [] for key in fns}
        for fn in fns.values():  # warm-up (first-touch allocations, kernel build)
            _one(fn, x0, t, lab, oh)
        for _ in range(reps):
            for key, fn in fns.items():
                times[key].append(_one(fn, x0, t, lab, oh))
        best = {key: min(v) for key, v in times.items()}

        def median_ratio(name: str, base: str) -> float:
            return statistics.median(a / b for a, b in zip(times[name], times[base]))

        for name in names:
            base = CASES[name][1]
            row = {
                "C": c,
                "loss": name,
                "time_ms": best[name] * 1e3,
                "cross_entropy_ms": best["cross_entropy"] * 1e3,
                "ratio_ce": best[name] / best["cross_entropy"],
                "ratio_ce_median": median_ratio(name, "cross_entropy"),
            }
            if base != "cross_entropy":
                row.update(
                    {
                        "baseline": base,
                        "baseline_ms": best[base] * 1e3,
                        "ratio_baseline": best[name] / best[base],
                        "ratio_baseline_median": median_ratio(name, base),
                    }
                )
            rows.append(row)
        del x0, t, lab, oh
    return rows


def print_sweep(rows: list[dict], suffix: str = "") -> None:
    """One line per loss: ratio to cross-entropy (and to its own baseline) at each class count
    (``suffix="_median"``: the medians of per-repetition ratios)."""
    classes = sorted({r["C"] for r in rows})
    what = "median per-repetition ratio" if suffix else "ratio of minimums"
    print(f"{'loss':30s} " + " ".join(f"{'C=' + str(c):>12s}" for c in classes) + f"   ({what} to CE [to own baseline])")
    for name in dict.fromkeys(r["loss"] for r in rows):
        cells = []
        for c in classes:
            r = next(r for r in rows if r["loss"] == name and r["C"] == c)
            cell = f"{r['ratio_ce' + suffix]:.2f}" + (f" [{r['ratio_baseline' + suffix]:.2f}]" if "ratio_baseline" in r else "")
            cells.append(f"{cell:>12s}")
        print(f"{name:30s} " + " ".join(cells))
    ce = {r["C"]: r["cross_entropy_ms"] for r in rows}
    print(f"{'cross_entropy (ms)':30s} " + " ".join(f"{ce[c]:12.1f}" for c in classes))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small shape {QUICK_SHAPE}, few repetitions, no memory")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per loss (default 15, quick 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON output (default {RESULT.relative_to(ROOT)}; none with --quick)")
    parser.add_argument("--only", nargs="*", default=None, help="subset of loss names")
    parser.add_argument(
        "--sweep", action="store_true", help=f"class-count sweep C = {SWEEP_CLASSES} at (1, C, {SWEEP_SPATIAL}) instead (default 9 reps)"
    )
    parser.add_argument("--classes", type=int, nargs="*", default=None, help="class counts of the sweep")
    parser.add_argument(
        "--target", choices=("contiguous", "movedim"), default="contiguous", help="sweep target layout (movedim: channels-last memory)"
    )
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


def _backend() -> str:
    from partialseg import _native

    return "native" if _native.library() is not None else "torch"  # PARTIALSEG_NATIVE=0 measures the torch path


def _meta() -> dict:
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "backend": _backend(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _run_sweep(args: argparse.Namespace) -> dict:
    reps = args.reps or 9
    classes = tuple(args.classes) if args.classes else SWEEP_CLASSES
    spatial = (8, 8, 8) if args.quick else SWEEP_SPATIAL
    names = tuple(args.only) if args.only else SWEEP_CASES
    rows = sweep(reps, classes, spatial, names, args.target)
    meta = _meta()
    print(
        f"class sweep at (1, C, {', '.join(map(str, spatial))}), {args.target} target, {reps} interleaved repetitions,"
        f" {meta['threads']} threads, {meta['backend']} kernels"
    )
    print_sweep(rows)
    print_sweep(rows, "_median")
    result = {"spatial": list(spatial), "classes": list(classes), "target": args.target, "reps": reps, **meta, "rows": rows}
    out = args.out if args.out is not None else (None if args.quick else SWEEP_RESULT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _run(args: argparse.Namespace) -> dict:
    if args.sweep:
        return _run_sweep(args)
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
    backend = _backend()
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
