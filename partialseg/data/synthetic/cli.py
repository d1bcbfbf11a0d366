"""``partialseg make-data FAMILY --out DIR``: generate a synthetic partial-label benchmark.

Only ``argparse`` is imported at module level; the generators (numpy, scipy, nibabel,
matplotlib) are imported inside :func:`run`.
"""

from __future__ import annotations

import argparse

FAMILY_CHOICES = ("cardiac2d", "abdomen3d", "polyp2d", "atrium3d")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``make-data`` arguments to ``parser``."""
    parser.add_argument("family", choices=FAMILY_CHOICES, help="benchmark family")
    parser.add_argument("--out", required=True,
                        help="output dataset folder: created, or an empty one (a non-empty folder is refused "
                             "unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out folder as a whole (its old files are deleted)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; same seed = identical files (default 0)")
    parser.add_argument("--size", type=int, nargs="+", default=None, metavar="N",
                        help="spatial size: one value for every axis or one per axis, e.g. '--size 96' or "
                             "'--size 64 64 48' (default: 96x96 for 2D families, 64x64x48 for 3D; at most "
                             "16,777,216 voxels per image, e.g. 4096x4096 or 256x256x256)")
    parser.add_argument("--num-train", type=int, default=None,
                        help="training cases: cardiac2d subjects (x2 phases, default 24); abdomen3d cases per "
                             "partially labelled source (default 8); polyp2d frames (default 100); atrium3d "
                             "volumes (default 40)")
    parser.add_argument("--num-test", type=int, default=None,
                        help="fully labelled test cases (cardiac2d: subjects x2 phases)")
    group = parser.add_argument_group("family options")
    group.add_argument("--variant", choices=("single", "wholeheart"), default=None,
                       help="cardiac2d: one structure per training case, or also whole-heart cases (default single)")
    group.add_argument("--levels", type=int, default=None, metavar="N",
                       help="cardiac2d: stack mode, N slice levels base to apex per phase (structures shrink, move "
                            "and vanish; RV absent in apical slices), with more position, size and contrast variation "
                            "between subjects (default 0: one mid-ventricular slice, the original benchmark)")
    group.add_argument("--modality", choices=("CT", "MR", "CT+MR"), default=None,
                       help="abdomen3d: CT (HU), MR, or CT+MR (atlas setting, three tasks with disjoint organs: CT "
                            "liver+stomach, CT kidneys, MR spleen+pancreas; 16 test cases, 8 per modality); default CT")
    group.add_argument("--num-full", type=int, default=None,
                       help="abdomen3d: training cases of the fully labelled source (default 4)")
    group.add_argument("--strong-fraction", type=float, default=None,
                       help="polyp2d: fraction of strong (true) training masks (default 0.1)")
    group.add_argument("--missing-fraction", type=float, default=None,
                       help="polyp2d: fraction of weak masks missing the polyp (default 0.4)")
    group.add_argument("--preset", choices=("standard", "hybrid"), default=None,
                       help="polyp2d: 'hybrid' is the hybrid-supervision benchmark (20 strong and 400 weak masks of "
                            "continuous quality, 64x64, 60 test frames); other options override it "
                            "(default standard)")
    group.add_argument("--num-strong", type=int, default=None,
                       help="polyp2d: exact number of strong training masks (overrides --strong-fraction)")
    group.add_argument("--weak-quality", choices=("levels", "continuous"), default=None,
                       help="polyp2d: weak masks in three levels (ellipse / distorted / missing, default) or of "
                            "continuous quality (ellipse scaled 0.8-1.6 and shifted / missing / wrong)")
    group.add_argument("--wrong-fraction", type=float, default=None,
                       help="polyp2d, continuous weak masks: fraction placed on background (default 0)")
    group.add_argument("--contrast", type=float, default=None,
                       help="polyp2d: polyp contrast against the mucosa, in (0, 1] (default 1)")
    group.add_argument("--labelled-fraction", type=float, default=None,
                       help="atrium3d: fraction of labelled training volumes (default 0.2)")
    group.add_argument("--difficulty", choices=("standard", "hard"), default=None,
                       help="atrium3d: anatomical variation between cases; 'hard' (the default) scales and rotates "
                            "the atrium, varies and bends the veins and thins the wall, 'standard' gives the "
                            "original benchmark's volumes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


#: option -> families that accept it
_FAMILY_OPTIONS = {
    "variant": ("cardiac2d",),
    "levels": ("cardiac2d",),
    "modality": ("abdomen3d",),
    "num_full": ("abdomen3d",),
    "strong_fraction": ("polyp2d",),
    "missing_fraction": ("polyp2d",),
    "preset": ("polyp2d",),
    "num_strong": ("polyp2d",),
    "weak_quality": ("polyp2d",),
    "wrong_fraction": ("polyp2d",),
    "contrast": ("polyp2d",),
    "labelled_fraction": ("atrium3d",),
    "difficulty": ("atrium3d",),
}


def run(args: argparse.Namespace) -> int:
    """Generate the dataset and print a summary; return the exit status.

    0 on success; 2, after a one-line ``make-data: ...`` message on stderr, for a bad option or
    size, an ``--out`` that is a file or a non-empty folder (without ``--overwrite``), or a
    dataset that cannot be written (the message names the path).
    """
    import json
    import sys
    import time
    from collections import Counter
    from pathlib import Path

    from partialseg.data.synthetic import check_out_dir, make_dataset

    options = {"num_train": args.num_train, "num_test": args.num_test, "progress": not args.quiet}
    for name, families in _FAMILY_OPTIONS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.family not in families:
            print(f"make-data: --{name.replace('_', '-')} applies to {', '.join(families)}, not {args.family}",
                  file=sys.stderr)
            return 2
        options[name] = value
    try:  # before generating: a non-empty --out is refused at once
        check_out_dir(args.out, overwrite=args.overwrite, hint="add --overwrite")
    except FileExistsError as err:
        print(f"make-data: {err}", file=sys.stderr)
        return 2
    size = None if args.size is None else (args.size[0] if len(args.size) == 1 else tuple(args.size))
    start = time.perf_counter()
    try:
        path = make_dataset(args.family, args.out, seed=args.seed, size=size, overwrite=args.overwrite, **options)
    except ValueError as err:
        print(f"make-data: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # FileExistsError from make_dataset names the folder; a system error names its path
        where = f" {err.filename}" if err.filename and str(err.filename) not in str(err) else ""
        print(f"make-data: cannot write the dataset{where}: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start

    desc = json.loads(Path(path).read_text())
    print(f"{desc['name']}: {desc['description']}")
    print(f"classes: {desc['classes']}")
    for split in ("training", "test"):
        groups: Counter = Counter()
        for case in desc[split]:
            ann = case.get("annotated", "unlabelled") if "label" in case else "unlabelled"
            ann = ann if isinstance(ann, str) else "+".join(ann)
            extra = f", {case['weak_type']}" if "weak_type" in case else ""
            groups[(case.get("source", "default"), ann + extra)] += 1
        print(f"{split}: {len(desc[split])} cases")
        for (source, ann), n in sorted(groups.items()):
            print(f"  source {source:<12} annotated {ann:<28} {n:4d}")
    if desc.get("label_maps"):
        print(f"label maps: {json.dumps(desc['label_maps'])}")
    print(f"dataset.json: {path}")
    print(f"preview:      {Path(path).parent / 'preview.png'}")
    print(f"generated in {elapsed:.1f} s")
    return 0
