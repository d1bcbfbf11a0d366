"""``make demo``: generate the synthetic benchmarks, validate them, and show what the losses see.

For each benchmark family this generates the dataset, runs the same validation as
``partialseg check``, prints its per-source summary, and reports, per source, how much of
the ``<0,p,1>`` label vector is known (1 or 0) versus unknown (p) — the supervision a
partial-label loss can use. Previews are written as PNG files beside each dataset.

Usage: ``python -m partialseg.demo --out demo_output [--families abdomen3d cardiac2d] [--seed 0]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _known_fraction(ds, max_cases_per_source: int = 3) -> dict[str, float]:
    """Fraction of known entries of the <0,p,1> map, per training source (first few cases)."""
    import numpy as np
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from partialseg.transforms import PartialLabelToVectord, RemapLabelsd

    load = Compose(
        [
            LoadImaged(["image", "label"], allow_missing_keys=True, image_only=True),
            EnsureChannelFirstd(["image", "label"], allow_missing_keys=True),
            RemapLabelsd("label", allow_missing_keys=True),
            PartialLabelToVectord("label", num_classes=ds.num_classes),
        ]
    )
    out = {}
    for source in ds.sources("training"):
        cases = ds.datalist("training", sources=[source])[:max_cases_per_source]
        fractions = []
        for case in cases:
            vec = np.asarray(load(case)["label"])
            fractions.append(float(((vec == 0) | (vec == 1)).mean()))
        out[source] = float(np.mean(fractions))
    return out


def main(argv: list[str] | None = None) -> int:
    from partialseg.data.synthetic import FAMILIES

    parser = argparse.ArgumentParser(prog="python -m partialseg.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from partialseg.data import validate_dataset
    from partialseg.data.synthetic import make_dataset

    out = Path(args.out)
    previews = []
    for family in args.families:
        t0 = time.perf_counter()
        print(f"\n=== {family}: generating into {out / family} (seed {args.seed}) ===", flush=True)
        json_path = make_dataset(family, out / family, seed=args.seed)
        report = validate_dataset(json_path.parent)
        print(report.format())
        if not report.ok:
            print(f"error: the generated {family} benchmark failed validation", file=sys.stderr)
            return 1
        print("\nknown entries of the <0,p,1> label vector (training, per source):")
        for source, frac in _known_fraction(report.dataset).items():
            print(f"  {source:<14}{100 * frac:6.1f}% known, {100 * (1 - frac):5.1f}% unknown (p)")
        preview = json_path.parent / "preview.png"
        if preview.exists():
            previews.append(preview)
        print(f"({time.perf_counter() - t0:.1f} s)")
    print("\npreviews:")
    for p in previews:
        print(f"  {p}")
    print("\nnext: `partialseg check DIR` validates your own data in the same way; see README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
