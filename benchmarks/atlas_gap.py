"""The atlas paper's baseline gap on ``abdomen3d --modality CT+MR``: intramodal vs cross-modal Dice.

Arm (a) of the paper's ablation (Table 2): the main network alone, trained on the union of the
three partially labelled sources (CT ``ct_a``: liver + stomach, CT ``ct_b``: kidneys, MR ``mr``:
spleen + pancreas) with a partial-label loss and no atlas module. The loss is partialseg's
marginal CE + marginal Dice (``MarginalCELoss``, ``MarginalDiceLoss``) on the ``<0,p,1>`` map:
on the organs a case annotates it is ordinary CE + Dice, and the organs it does not annotate are
merged with the background instead of being read as background (the paper's baseline is "trained
only on labeled organs in each image"; the marginal loss is that, with the unlabelled organs
never pushed towards background).

Network: MONAI ``UNet`` (3D, instance norm, residual units), whole 64 x 64 x 48 volumes, batch 2,
Adam, polynomial learning-rate decay, no augmentation (as the paper). Normalisation as the paper:
CT clipped to [-325, 325] HU and scaled to [-1, 1], MR z-scored per volume. The test split
(fully labelled, half CT, half MR) is scored per case and organ; an organ is cross-modal for a
test image when no training case of the image's modality labels it
(``partialseg.evaluation.modality``). The predictions are also written as NIfTI, and
``partialseg evaluate`` on them gives the same grouping (``--check-cli``).

Run (one thread, about 5 minutes on the shared 2-core machine):
``OMP_NUM_THREADS=1 python benchmarks/atlas_gap.py`` writes ``benchmarks/results/atlas_gap_run.json``
(the data, the predictions and their evaluation go to ``--work``, a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach"]


def normalise(image, modality: str):
    """CT: clip to [-325, 325] HU, scale to [-1, 1]; MR: z-score over the volume (the paper's)."""
    import numpy as np

    image = image.astype(np.float32)
    if modality == "CT":
        return np.clip(image, -325.0, 325.0) / 325.0
    return (image - image.mean()) / max(float(image.std()), 1e-6)


def load_split(ds, split: str):
    import nibabel as nib
    import numpy as np

    out = []
    for e in ds.datalist(split):
        img = np.asarray(nib.load(e["image"]).dataobj)
        lab_nii = nib.load(e["label"])
        out.append({**e, "x": normalise(img, e["modality"])[None], "y": np.asarray(lab_nii.dataobj).astype(np.int64),
                    "affine": lab_nii.affine})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/atlas_gap_run.json", help="the results file")
    parser.add_argument("--work", default=None, help="data, predictions, evaluation (default: a temporary folder)")
    parser.add_argument("--data", default=None, help="dataset folder (default: generate WORK/data with --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check-cli", action="store_true", help="also run partialseg evaluate on the predictions")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from monai.networks.nets import UNet

    from partialseg.data import load_dataset
    from partialseg.data.synthetic import make_dataset
    from partialseg.evaluation import evaluate_case
    from partialseg.evaluation.modality import case_modality, labelled_by_modality, modality_group, summarize_modality
    from partialseg.losses import MarginalCELoss, MarginalDiceLoss
    from partialseg.transforms import PartialLabelToVector

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import tempfile

    out = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="atlas_gap_"))
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not (data / "dataset.json").exists():
        make_dataset("abdomen3d", data, seed=args.seed, modality="CT+MR", overwrite=True)
    ds = load_dataset(data)
    names = [str(c) for c in ds.classes]
    train, test = load_split(ds, "training"), load_split(ds, "test")
    labelled = labelled_by_modality(train)
    to_vec = PartialLabelToVector(len(names))
    for e in train:
        e["t"] = np.asarray(to_vec(e["y"][None], e["annotated"]), dtype=np.float32)

    net = UNet(spatial_dims=3, in_channels=1, out_channels=len(names), channels=tuple(args.channels),
               strides=(2,) * (len(args.channels) - 1), num_res_units=1, norm="instance")
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=5e-5)
    ce, dice = MarginalCELoss(), MarginalDiceLoss()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    losses = []
    net.train()
    for it in range(args.iterations):
        for g in opt.param_groups:
            g["lr"] = args.lr * (1 - it / args.iterations) ** 0.9
        idx = rng.choice(len(train), size=args.batch, replace=False)
        x = torch.from_numpy(np.stack([train[i]["x"] for i in idx]))
        t = torch.from_numpy(np.stack([train[i]["t"] for i in idx]))
        logits = net(x)
        loss = ce(logits, t) + dice(logits, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (it + 1) % 50 == 0:
            print(f"iter {it + 1}/{args.iterations} loss {np.mean(losses[-50:]):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    train_s = time.perf_counter() - start

    net.eval()
    rows = []
    pred_dir = out / "predictions"
    pred_dir.mkdir(exist_ok=True)
    import nibabel as nib

    with torch.no_grad():
        for e in test:
            pred = net(torch.from_numpy(e["x"][None])).argmax(1)[0].numpy().astype(np.uint8)
            nib.save(nib.Nifti1Image(pred, e["affine"]), str(pred_dir / f"{e['case']}_seg.nii.gz"))
            modality = case_modality(e, labelled)
            for row in evaluate_case(pred, e["y"], names, class_indices=list(range(1, len(names))), case=e["case"]):
                rows.append({"case": e["case"], **row, "modality": modality,
                             "group": modality_group(modality, row["class_index"], labelled)})
    summary = summarize_modality(rows, names[1:])
    intra, cross = summary["intramodal"]["dice"], summary["cross_modal"]["dice"]
    result = {
        "arm": "a (main network alone, marginal CE + Dice on the union)",
        "seed": args.seed, "iterations": args.iterations, "batch": args.batch, "lr": args.lr,
        "channels": args.channels, "threads": args.threads, "train_seconds": round(train_s, 1),
        "labelled_by_modality": {m: [names[i] for i in v] for m, v in labelled.items()},
        "intramodal_dice": intra, "cross_modal_dice": cross, "gap_points": 100 * (intra - cross),
        "by_modality": {m: {g: part[g].get("dice") for g in part} for m, part in summary["by_modality"].items()},
        "per_class": {g: {m: {n: e["dice"]["mean"] for n, e in part[g].get("per_class", {}).items()}
                          for m, part in summary["by_modality"].items()} for g in ("intramodal", "cross_modal")},
        "command": " ".join(["python", *sys.argv]),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.check_cli:
        from partialseg.evaluation import evaluate_folder

        s = evaluate_folder(pred_dir, data, out_dir=out / "evaluation", progress=False)
        print("partialseg evaluate: intramodal", s["modality"]["intramodal"]["dice"], "cross-modal",
              s["modality"]["cross_modal"]["dice"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
