"""The marginal-loss paper's ablation (Tables 3 and 5) on the synthetic ``abdomen3d`` benchmark.

Four arms, the same network, schedule, validation-based model selection and test set, trained
through the bundle's own configs (``bundles/marginal_exclusion_abdomen``) with config overrides:

1. ``full_only``: the fully labelled source only, ordinary Dice + CE (stage 1, then stage 2 on
   the same source);
2. ``naive_union``: the union of all sources, organs a source does not annotate read as
   background, ordinary Dice + CE;
3. ``marginal``: the union, marginal CE + Dice for partial cases (Dice + CE for full ones);
4. ``marginal_exclusion``: the union, marginal + exclusion (CE + Dice each), weights 1 : 2.

Each seed generates its own benchmark (``--num-full`` fully labelled cases, ``--num-train``
cases per single-organ source, 2 validation and ``--num-test`` test cases), trains stage 1 once
(shared by every arm of that seed), then each arm's stage 2 from it; every arm is evaluated on
the seed's test split (per-organ Dice, HD95). Results are written after every arm to
``OUT/results.json`` (a rerun skips arms already there), and the table to ``OUT/table.md``.

Run: ``python benchmarks/marginal_ablation.py --seeds 0 1 2 --out benchmarks/results/marginal_ablation``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "marginal_exclusion_abdomen"
ARMS = {
    "full_only": {"train#datalist": "$partialseg.data.bundle_datalist(@data_root, 'training', sources=@full_sources)"},
    "naive_union": {"unknown_as_background": True},
    "marginal": {"lambda_exclusion": 0.0},
    "marginal_exclusion": {"lambda_exclusion": 2.0},
    # Table 5 of the paper: other marginal : exclusion weights (not run by default)
    "marginal_exclusion_1to1": {"lambda_exclusion": 1.0},
    "marginal_exclusion_1to4": {"lambda_exclusion": 4.0},
    # sources balanced per epoch, as the paper samples its union (the bundle default draws uniformly over cases)
    "marginal_source": {"lambda_exclusion": 0.0, "sampling": "source"},
    "marginal_exclusion_source": {"lambda_exclusion": 2.0, "sampling": "source"},
    # diagnosis: the exclusion CE alone (no exclusion Dice), weight 2
    "marginal_exclusion_ce": {"partial_loss": "$lambda i, t, m=partialseg.losses.MarginalExclusionLoss(lambda_exclusion=0.0), "
                                              "e=partialseg.losses.ExclusionCELoss(): m(i, t) + 2.0 * e(i, t)"},
}
MAIN_ARMS = ["full_only", "naive_union", "marginal", "marginal_exclusion"]
LABELS = {
    "full_only": "(1) full source only, Dice + CE",
    "naive_union": "(2) union, unknown = background, Dice + CE",
    "marginal": "(3) union, marginal CE + Dice",
    "marginal_exclusion": "(4) union, marginal + exclusion 1 : 2",
    "marginal_exclusion_1to1": "(4') union, marginal + exclusion 1 : 1",
    "marginal_exclusion_1to4": "(4'') union, marginal + exclusion 1 : 4",
    "marginal_exclusion_ce": "(4ce) union, marginal + 2 x exclusion CE only",
    "marginal_source": "(3s) as (3), sources balanced",
    "marginal_exclusion_source": "(4s) as (4), sources balanced",
}
ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach"]


def _workflow(configs: list[str], root: Path, **overrides):
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLE / "configs" / c) for c in configs]
    wf = ConfigWorkflow(config_file=files if len(files) > 1 else files[0], meta_file=str(BUNDLE / "configs" / "metadata.json"),
                        logging_file=str(BUNDLE / "configs" / "logging.conf"), workflow_type="train",
                        bundle_root=str(root), **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()


def run_seed(seed: int, args, results: dict, out: Path) -> None:
    from partialseg.data import ensure_dataset

    data = Path(ensure_dataset(out / f"seed{seed}" / "data", "abdomen3d", seed=seed, num_val=2, num_full=args.num_full,
                               num_train=args.num_train, num_test=args.num_test))
    common = {"dataset_dir": str(data), "iterations_per_epoch": args.iterations_per_epoch, "val_interval": args.val_interval}
    stage1_dir = out / f"seed{seed}" / "stage1"
    stage1 = stage1_dir / "models" / "model_stage1.pt"
    if not stage1.is_file():
        t0 = time.perf_counter()
        _workflow(["train.json"], stage1_dir, stage=1, epochs_stage1=args.epochs_stage1, **common)
        print(f"seed {seed}: stage 1 in {time.perf_counter() - t0:.0f} s", flush=True)
    for arm in args.arms:
        arm_overrides = ARMS[arm]
        key = f"{seed}/{arm}"
        if key in results:
            continue
        root = out / f"seed{seed}" / arm
        (root / "models").mkdir(parents=True, exist_ok=True)
        shutil.copy(stage1, root / "models" / "model_stage1.pt")
        t0 = time.perf_counter()
        _workflow(["train.json"], root, stage=2, epochs_stage2=args.epochs_stage2, **common, **arm_overrides)
        train_s = time.perf_counter() - t0
        _workflow(["inference.json", "evaluate.json"], root, dataset_dir=str(data))
        summary = json.loads((root / "eval" / "summary.json").read_text())
        results[key] = {
            "seed": seed, "arm": arm, "train_seconds": train_s,
            "dice": {o: summary["per_class"][o]["dice"]["mean"] for o in ORGANS},
            "hd95": {o: summary["per_class"][o]["hd95"]["mean"] for o in ORGANS},
            "mean_dice": summary["overall"]["dice"], "mean_hd95": summary["overall"]["hd95"],
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"seed {seed} {arm}: mean Dice {summary['overall']['dice']:.4f}, HD95 {summary['overall']['hd95']:.2f} mm "
              f"(stage 2 {train_s:.0f} s)", flush=True)


def table(results: dict, command: str) -> str:
    import numpy as np

    seeds = sorted({r["seed"] for r in results.values()})
    lines = [f"Command: `{command}`", "", f"Seeds: {seeds}; test Dice (mean ± std over seeds of the per-seed test means) and HD95 (mm).", "",
             "| arm | " + " | ".join(ORGANS) + " | mean Dice | mean HD95 (mm) |", "|---" * (len(ORGANS) + 3) + "|"]
    means = {}
    for arm in ARMS:
        rows = sorted((r for r in results.values() if r["arm"] == arm), key=lambda r: r["seed"])
        if not rows:
            continue
        cells = []
        for o in ORGANS:
            v = np.array([r["dice"][o] for r in rows])
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
        md = np.array([r["mean_dice"] for r in rows])
        hd = np.array([r["mean_hd95"] for r in rows])
        means[arm] = {r["seed"]: (r["mean_dice"], r["mean_hd95"]) for r in rows}
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + f" | {md.mean():.3f} ± {md.std():.3f} | {hd.mean():.2f} ± {hd.std():.2f} |")
    lines += ["", "HD95 (mm) per organ, mean ± std over seeds:", "",
              "| arm | " + " | ".join(ORGANS) + " |", "|---" * (len(ORGANS) + 1) + "|"]
    for arm in ARMS:
        rows = [r for r in results.values() if r["arm"] == arm]
        if rows:
            cells = [f"{np.mean([r['hd95'][o] for r in rows]):.1f} ± {np.std([r['hd95'][o] for r in rows]):.1f}" for o in ORGANS]
            lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    lines.append("")
    if all(a in means for a in MAIN_ARMS):
        common = sorted(set.intersection(*(set(means[a]) for a in MAIN_ARMS)))
        dice = {a: np.array([means[a][s][0] for s in common]) for a in MAIN_ARMS}
        hd95 = {a: np.array([means[a][s][1] for s in common]) for a in MAIN_ARMS}

        def cmp(a, b, margin=0.0):
            wins = int(np.sum(dice[a] > dice[b] + margin))
            verdict = "holds" if dice[a].mean() > dice[b].mean() + margin else "does not hold"
            return f"{dice[a].mean():.3f} vs {dice[b].mean():.3f} ({verdict}; {wins}/{len(common)} seeds)"

        a, b = dice["marginal_exclusion"], dice["marginal"]
        lines += [
            f"Ordering on the mean organ Dice over seeds {common} (paper: (3) > (1), (3) >> (2), (4) >= (3)):",
            "",
            f"- (3) > (1): {cmp('marginal', 'full_only')}",
            f"- (3) >> (2): {cmp('marginal', 'naive_union', 0.02)} (\">>\" read as a margin of at least 0.02)",
            f"- (4) >= (3): {a.mean():.3f} vs {b.mean():.3f} ({'holds' if a.mean() >= b.mean() - 0.002 else 'does not hold'}, "
            f"within 0.002 counted as equal; {int(np.sum(a >= b))}/{len(common)} seeds)",
            f"- HD95, (4) vs (3) (the paper: exclusion mainly removes stray islands inside other organs): "
            f"{hd95['marginal_exclusion'].mean():.2f} vs {hd95['marginal'].mean():.2f} mm",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/marginal_ablation")
    parser.add_argument("--num-full", type=int, default=2, help="fully labelled training cases (the paper's F is small)")
    parser.add_argument("--num-train", type=int, default=8, help="training cases per single-organ source")
    parser.add_argument("--num-test", type=int, default=8)
    parser.add_argument("--epochs-stage1", type=int, default=10)
    parser.add_argument("--epochs-stage2", type=int, default=20)
    parser.add_argument("--iterations-per-epoch", type=int, default=20)
    parser.add_argument("--val-interval", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=MAIN_ARMS, choices=list(ARMS), help="arms to run (default: the four of the paper's Table 3)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    command = "python benchmarks/marginal_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    for seed in args.seeds:
        run_seed(seed, args, results, out)
    text = table(results, command.strip())
    (out / "table.md").write_text(text + "\n")
    print(text)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
