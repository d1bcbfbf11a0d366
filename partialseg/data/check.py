"""``partialseg check DATASET_DIR``: validate a dataset and print a per-source summary.

Cases are read in parallel (``--workers``, default: every CPU) with a progress bar on stderr, and
each case's findings are cached by its files' resolved paths, sizes and modification times
(``.partialseg_check_cache.json`` beside ``dataset.json``, or under ``~/.cache/partialseg/check/``
when that folder is read-only; ``--no-cache`` to read everything again).

Warnings (likely mistakes that do not stop training: an annotated class a source's labels never
hold, a class no training case annotates) are printed in their own section and do not change the
exit code: 0 without problems (with or without warnings), 1 with problems, 2 for a bad argument or
an unreadable ``dataset.json``.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset folder holding dataset.json (or the JSON file)")
    parser.add_argument(
        "--splits", nargs="+", default=None, choices=["training", "validation", "test"],
        help="splits to check, each of which must hold cases (default: training, and validation / test where present)",
    )
    parser.add_argument("--channels", type=int, default=1, help="channels every image must have: the network's in_channels (default 1)")
    parser.add_argument("--hash", action="store_true", help="also compare images by content (finds copies under other names)")
    parser.add_argument("--workers", type=int, default=None, help="processes reading the files (default: the number of CPUs)")
    parser.add_argument("--no-cache", action="store_true", help="read every file again instead of reusing the cached findings")
    parser.add_argument("--json", metavar="FILE", help="also write the summary and problems as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from partialseg.data.spec import DatasetError
    from partialseg.data.validation import validate_dataset

    workers = args.workers if args.workers is not None else max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        report = validate_dataset(
            args.dataset, splits=args.splits, progress=not args.quiet, channels=args.channels,
            content_hash=args.hash, workers=workers, cache=not args.no_cache,
        )  # fmt: skip
    except (FileNotFoundError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as e:  # a bad --channels / --workers
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if args.json:
        text = json.dumps({"dataset": report.dataset.name, "classes": report.dataset.classes, "summary": report.summary, "problems": report.problems, "warnings": report.warnings}, indent=2, default=list)
        try:
            with open(args.json, "w") as f:
                f.write(text)
        except OSError as e:
            print(f"error: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0 if report.ok else 1
