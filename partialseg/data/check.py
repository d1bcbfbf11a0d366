"""``partialseg check DATASET_DIR``: validate a dataset and print a per-source summary."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset folder holding dataset.json (or the JSON file)")
    parser.add_argument(
        "--splits", nargs="+", default=["training", "validation", "test"], choices=["training", "validation", "test"],
        help="splits to check (default: all present)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the summary and problems as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from partialseg.data.spec import DatasetError
    from partialseg.data.validation import validate_dataset

    try:
        report = validate_dataset(args.dataset, splits=args.splits, progress=not args.quiet)
    except (FileNotFoundError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if args.json:
        text = json.dumps({"dataset": report.dataset.name, "classes": report.dataset.classes, "summary": report.summary, "problems": report.problems}, indent=2, default=list)
        try:
            with open(args.json, "w") as f:
                f.write(text)
        except OSError as e:
            print(f"error: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0 if report.ok else 1
