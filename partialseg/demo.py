"""``make demo``: train the marginal + exclusion bundle on the synthetic abdomen and evaluate it.

Steps, each a real ``python -m monai.bundle run`` of ``bundles/marginal_exclusion_abdomen``:

1. generate the synthetic ``abdomen3d`` benchmark (a small fully labelled source plus liver-,
   spleen-, pancreas- and kidney-only sources) and validate it;
2. stage 1: the fully labelled source, Dice + CE;
3. stage 2: the union of all sources, marginal + exclusion losses (1 : 2) for partial cases and
   Dice + CE for full cases;
4. sliding-window inference on the fully labelled test split, evaluation (Dice, HD95, ASSD);
5. a per-organ table, overlay PNGs (image, reference, prediction) and a training-curve PNG.

Usage: ``python -m partialseg.demo --out demo_output [--quick]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "marginal_exclusion_abdomen"


def _bundle_run(configs: list[str], bundle_root: Path, log: Path, **overrides) -> None:
    """Run ``python -m monai.bundle run`` on the bundle's configs; stream a short progress line."""
    from partialseg.engines import bundle_command

    cmd = bundle_command(BUNDLE, bundle_root, configs, **overrides)
    print("  $ " + " ".join(c if " " not in c else repr(c) for c in cmd[1:]), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as out:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
            lines = proc.stdout if proc.stdout is not None else []
            for line in lines:
                out.write(line)
                if "Metrics --" in line or "Got new best" in line or "generating the synthetic" in line:
                    print("    " + line.split(" - ")[-1].strip(), flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: bundle run failed (exit {proc.returncode}); see {log}")
    print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m partialseg.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--epochs-stage1", type=int, default=15, help="stage-1 epochs of 20 iterations")
    parser.add_argument("--epochs-stage2", type=int, default=30, help="stage-2 epochs of 20 iterations")
    parser.add_argument("--quick", action="store_true", help="a 1-minute smoke run (2 + 2 epochs)")
    args = parser.parse_args(argv)
    extra = {"resume": False}  # every demo trains anew (a rerun into the same folder does not resume)
    if args.quick:  # validate every epoch, so that each stage saves its best checkpoint
        args.epochs_stage1 = args.epochs_stage2 = 2
        extra["val_interval"] = 1

    out = Path(args.out).resolve()
    root = out / "marginal_exclusion_abdomen"
    (root / "models").mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    t_start = time.perf_counter()

    print(f"=== 1/4 data: synthetic abdomen3d in {root / 'data' / 'abdomen3d'} ===", flush=True)
    from partialseg.data import ensure_dataset, validate_dataset

    data = Path(ensure_dataset(root / "data" / "abdomen3d", "abdomen3d", seed=0, num_val=2))
    report = validate_dataset(data)
    print(report.format())
    report.raise_if_invalid()

    print("\n=== 2/4 stage 1: fully labelled source, Dice + CE ===", flush=True)
    _bundle_run(["train.json"], root, log, stage=1, epochs_stage1=args.epochs_stage1, **extra)
    print("\n=== 3/4 stage 2: union of all sources, marginal + exclusion (1 : 2) ===", flush=True)
    _bundle_run(["train.json"], root, log, stage=2, epochs_stage2=args.epochs_stage2, **extra)

    print("\n=== 4/4 sliding-window inference on the test split, evaluation ===", flush=True)
    _bundle_run(["inference.json", "evaluate.json"], root, log)
    summary = json.loads((root / "eval" / "summary.json").read_text())
    from partialseg.evaluation import format_table

    print(format_table(summary))

    from partialseg.data import load_dataset
    from partialseg.evaluation import find_prediction
    from partialseg.plots import plot_overlays, plot_training_curves

    ds = load_dataset(data)
    cases = []
    for case in ds.datalist("test")[:3]:
        pred = find_prediction(root / "eval" / "pred", case["image"], case["case"])
        cases.append((case["case"], case["image"], case["label"], pred))
    overlays = plot_overlays(cases, out / "overlays.png", ds.num_classes, title="test cases: image | reference | prediction")
    curves = plot_training_curves(
        {"stage 1": root / "runs" / "stage1" / "metrics.json", "stage 2": root / "runs" / "stage2" / "metrics.json"},
        out / "training_curves.png", title="marginal + exclusion bundle on abdomen3d",
    )
    mean_dice = summary["overall"]["dice"]
    result = {"mean_organ_dice": mean_dice, "per_class": summary["per_class"], "seconds": time.perf_counter() - t_start}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print(f"\nmean organ Dice on the test split: {mean_dice:.3f}")
    print(f"outputs: {overlays}\n         {curves}\n         {root / 'eval'} (metrics.csv, summary.json, boxplot.png)")
    print(f"total {time.perf_counter() - t_start:.0f} s; the bundle lives in {BUNDLE}, its README shows the commands")
    return 0


if __name__ == "__main__":
    sys.exit(main())
