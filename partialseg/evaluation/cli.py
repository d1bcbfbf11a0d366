"""``partialseg evaluate``: the command's arguments and its run (see ``docs/evaluation.md``).

Only ``argparse`` is imported at module level, so ``partialseg --help`` stays fast.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``partialseg evaluate`` arguments to ``parser``."""
    parser.add_argument("--pred", metavar="DIR", help="folder of predicted label maps (required unless --compare)")
    parser.add_argument("--dataset", metavar="DIR", help="dataset folder with dataset.json (required unless --compare)")
    parser.add_argument("--split", default="test", help="dataset split holding the references (default: test)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <pred>/evaluation)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                        help="evaluate only these classes (names or indices; default: all but background)")
    parser.add_argument("--include-background", action="store_true", help="evaluate class 0 too")
    parser.add_argument("--allow-missing", action="store_true",
                        help="count a missing prediction as empty instead of stopping with an error")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--modality-dataset", default=None, metavar="DIR",
                        help="dataset whose training split says which organs each modality labels, for the "
                             "intramodal vs cross-modal Dice (default: --dataset's; the grouping is on by itself when "
                             "its labelled training cases have two modalities or more)")
    parser.add_argument("--no-modality", action="store_true", help="no intramodal vs cross-modal grouping")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("RUN_A", "RUN_B"),
                        help="instead of evaluating: Wilcoxon signed-rank test between two evaluated runs (each a "
                             "metrics.csv, its evaluation folder, or a prediction folder holding evaluation/), paired "
                             "by case; with --out, also writes comparison.json there")


def run(args: argparse.Namespace) -> int:
    """Runs ``partialseg evaluate``: writes the outputs and prints the per class table.

    Returns:
        0 on success; 2 when the evaluation cannot be done (a missing or mismatched prediction,
        a bad dataset, an output folder that cannot be written, ...), after printing a one-line
        ``error: ...`` to stderr, which names the case or the path.
    """
    import sys

    from partialseg.evaluation.folder import evaluate_folder
    from partialseg.evaluation.report import format_table

    if getattr(args, "compare", None):
        return _compare(args)
    if not args.pred or not args.dataset:
        print("error: --pred and --dataset are required (or --compare RUN_A RUN_B).", file=sys.stderr)
        return 2
    arguments = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    try:
        summary = evaluate_folder(
            pred_dir=args.pred,
            dataset_dir=args.dataset,
            split=args.split,
            out_dir=args.out,
            classes=args.classes,
            include_background=args.include_background,
            allow_missing=args.allow_missing,
            progress=not getattr(args, "no_progress", False),
            arguments=arguments,
            modality_dataset=getattr(args, "modality_dataset", None),
            by_modality=False if getattr(args, "no_modality", False) else None,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an output that cannot be written: one line naming the path
        reason = e.strerror or str(e)
        print(f"error: {e.filename}: {reason}" if e.filename else f"error: {reason}", file=sys.stderr)
        return 2
    print(format_table(summary))  # ends with the empty counts, as the bundles' evaluate.json prints it
    run = summary.get("prediction_run")
    if run:
        sha = f", model sha256:{run['model_sha256'][:12]}" if run.get("model_sha256") else ""
        print(f"predictions of inference run {run['partialseg_run']}{sha}")
    print(f"wrote {', '.join(summary['outputs'].values())}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    """``--compare RUN_A RUN_B``: prints the Wilcoxon table; 2 after ``error: ...`` when a run cannot be read."""
    import json
    import sys
    from pathlib import Path

    from partialseg._fileio import atomic_write_text
    from partialseg.evaluation.modality import compare_runs, format_comparison, read_metrics

    run_a, run_b = args.compare
    try:
        result = compare_runs(read_metrics(run_a), read_metrics(run_b))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"A = {run_a}\nB = {run_b}")
    print(format_comparison(result))
    if args.out:
        path = Path(args.out) / "comparison.json"
        atomic_write_text(path, json.dumps({"run_a": str(run_a), "run_b": str(run_b), **result}, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
