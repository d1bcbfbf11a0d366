"""Tutorial 1: from a union of partially labelled datasets to one training batch.

Generates the synthetic ``abdomen3d`` benchmark (a small fully labelled source plus liver-,
spleen-, pancreas- and kidney-only sources, the kidneys of the latter in ONE label value),
validates it, and builds a MONAI pipeline whose batches mix every source: each label becomes
the ``<0,p,1>`` map that partialseg's losses read.

Run: ``python tutorials/01_partial_label_pipeline.py --out /tmp/abdomen [--size 48 48 32]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandSpatialCropd

from partialseg.data import load_dataset, validate_dataset
from partialseg.data.synthetic import make_dataset
from partialseg.transforms import PartialLabelToVectord, RemapLabelsd


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tutorial_abdomen")
    parser.add_argument("--size", type=int, nargs="+", default=None)
    parser.add_argument("--num-train", type=int, default=2, help="cases per partial source")
    args = parser.parse_args(argv)

    # 1. data: a union of partially labelled sources, described by one dataset.json
    if not (Path(args.out) / "dataset.json").exists():
        make_dataset("abdomen3d", args.out, seed=0, size=args.size, num_train=args.num_train, num_test=1, num_full=1)
    ds = load_dataset(args.out)

    # 2. validate every case before training: errors name the case, file and problem
    report = validate_dataset(ds)
    report.raise_if_invalid()
    print(report.format())

    # 3. a pipeline whose output mixes full, partial and unlabelled cases in one batch
    pipeline = Compose(
        [
            LoadImaged(["image", "label"], allow_missing_keys=True, image_only=True),
            EnsureChannelFirstd(["image", "label"], allow_missing_keys=True),
            RemapLabelsd("label", allow_missing_keys=True),  # source values -> global classes (+ lateral split)
            RandSpatialCropd(["image", "label"], roi_size=(32, 32, 16), random_size=False, allow_missing_keys=True),
            PartialLabelToVectord("label", num_classes=ds.num_classes),  # <0,p,1> map
        ]
    )
    cases = [ds.datalist("training", sources=[s])[0] for s in ds.sources("training")]
    loader = DataLoader(Dataset(cases, pipeline), batch_size=len(cases), num_workers=0)
    batch = next(iter(loader))
    target, annotated = batch["label"], batch["annotated"]
    print(f"\nbatch: image {tuple(batch['image'].shape)}, <0,p,1> target {tuple(target.shape)}")
    for src, vec, ann in zip(batch["source"], target, annotated):
        known = ((vec == 0) | (vec == 1)).float().mean().item()
        names = [ds.classes[i] for i in torch.nonzero(ann).flatten().tolist()]
        print(f"  {src:<10} annotated {names}: {100 * known:.0f}% of the label vector known")

    # 4. every partial-label loss reads this target directly
    from partialseg.losses import MarginalExclusionLoss

    logits = torch.randn(target.shape, requires_grad=True)
    loss = MarginalExclusionLoss()(logits, target)
    loss.backward()
    print(f"\nMarginalExclusionLoss on random logits: {loss.item():.4f} (gradient norm {logits.grad.norm():.3g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
