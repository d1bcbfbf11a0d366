"""The atlas paper's ablation (Table 2) on ``abdomen3d --modality CT+MR``: intramodal vs cross-modal Dice per arm.

Arms (:data:`ARMS`): (a) none, (b) AMAN, (c) APRN, (d) MICPAM, (e) AMAN+APRN, (f) APRN+MICPAM,
(g) AMAN+MICPAM, full; one :class:`partialseg.engines.AtlasTrainer` with the module flags, every
arm of a seed starting from the same main-network weights and drawing the same patches.

Data (as ``benchmarks/atlas_gap.py``): ``abdomen3d --modality CT+MR`` data seed 0, three tasks
(CT ``ct_a`` liver + stomach, CT ``ct_b`` kidneys, MR ``mr`` spleen + pancreas, 8 cases each) and
16 fully labelled test cases (8 CT, 8 MR). The atlas is built from the training split
(``partialseg.data.atlas.build_atlas``, mean over the annotating cases, sigma 3; mean cropped
shape 61 x 47 x 48) and resized to the working frame ``--frame`` (default :data:`FRAME`,
48 x 32 x 32, multiples of the main network's stride 16); every image and label is body-cropped
(Otsu, ``AtlasCropd``) and resized to that frame, as the paper matches images and atlas; CT
clipped to +-325 HU and scaled to [-1, 1], MR z-scored (the paper's). Dice is scored in that
frame on the whole test volume (main network alone, one forward); an organ is cross-modal for a
test image when no training case of its modality labels it (``partialseg.evaluation.modality``).

Scaled down from the paper to fit 24 runs in about 100 minutes of one CPU core (``docs/results.md``,
measured: arm (a) 0.29 s of CPU per iteration, full about twice that): whole 48 x 32 x 32 frames
(``--patch`` for random sub-volumes) instead of 64 x 192 x 192 patches of 2 x 1 x 1 mm volumes
(a first try with 48 x 48 x 32 patches of a 64 x 48 x 48 frame reached 14 intramodal Dice in 300
iterations), batch 2 instead of 3, ``--iterations`` 400 instead of 600 epochs, the main network
``AtlasUNet(filters=(8, 16, 32, 64, 128))`` instead of 32-320, AMAN four layers (32-256) at half
resolution (what a 24 x 16 x 16 input takes), APRN the default ``AtlasRefiner()`` (16, 32, 64 at
half resolution), Adam lr ``--lr`` 3e-3 with poly decay on the main network (the paper: 5e-4 over
a much longer schedule; APRN and MICPAM use the same lr, AMAN ``--aman-lr`` 2e-4), the
pseudo-label terms from 10% of the epochs on (``pseudo_start_epoch`` 2 of 20; the paper does not
say, the public code waits 20 of 600 epochs).

Diagnostics per run (``diagnostics`` in the run file), on the test set: for every cross-modal
(case, organ) pair, the Dice of the main network's own mask, of the APRN-refined pseudo-label
(``refiner > 0.5``; arms with APRN), the share of the true organ covered by confident
pseudo-label voxels (> 0.9) and of the volume that is confident at all (> 0.9 or < 0.1); AMAN's
accuracy at telling labelled-modality pairs from cross-modal ones, and its mean probability on
cross-modal pairs (arms with AMAN). The summary adds the Dice of the thresholded atlas alone (no
training: what the location prior gives by itself). ``--probe-every N`` records, every N
iterations, the norms of the gradients that ``L_seg`` and ``lambda_2 L_adv`` send into the main
network's logits (:func:`gradient_probe`).

Run (one thread; resumable: one line per finished (arm, seed) in ``--runs``, done ones skipped)::

    OMP_NUM_THREADS=1 python benchmarks/atlas_ablation.py [--arms a full] [--seeds 0 1 2] [--iterations 400] [--device cuda]

(the recorded table: ``--iterations 400 --lr 3e-3 --seeds 0 1 2``, the defaults).

Writes ``benchmarks/results/atlas_ablation_runs.jsonl`` (runs), ``atlas_ablation.json`` (summary),
``atlas_ablation.md`` (table) and ``atlas_ablation.png`` (intra vs cross per arm).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by file path
import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: key -> (label, aman, aprn, micpam); the paper's Table 2 order
ARMS = {
    "a": ("(a) none", False, False, False),
    "b": ("(b) AMAN", True, False, False),
    "c": ("(c) APRN", False, True, False),
    "d": ("(d) MICPAM", False, False, True),
    "e": ("(e) AMAN+APRN", True, True, False),
    "f": ("(f) APRN+MICPAM", False, True, True),
    "g": ("(g) AMAN+MICPAM", True, False, True),
    "full": ("full", True, True, True),
}
#: the paper's Table 2, cross-modal Dice (AMOS)
PAPER_CROSS = {"a": 63.6, "b": 67.2, "c": 68.8, "d": 69.6, "e": 70.4, "f": 69.5, "g": 69.1, "full": 74.6}
#: the paper's Table 2, intramodal Dice (AMOS)
PAPER_INTRA = {"a": 80.1, "b": 80.8, "c": 82.6, "d": 82.1, "e": 82.1, "f": 82.8, "g": 83.3, "full": 83.4}
#: the working frame (x, y, z): about 3/4 of the atlas's mean cropped shape (61, 47, 48), multiples of 16
FRAME = (48, 32, 32)


def parse_arms(names) -> list[str]:
    """Arm keys in the table's order; accepts keys (``a``, ``full``) or labels (``"(e) AMAN+APRN"``).

    Example:
        >>> parse_arms(["full", "a", "(c) APRN"])
        ['a', 'c', 'full']
    """
    if not names:
        return list(ARMS)
    by_label = {v[0].lower(): k for k, v in ARMS.items()}
    keys = set()
    for n in names:
        k = n.strip().lower()
        k = by_label.get(k, k)
        if k not in ARMS:
            raise SystemExit(f"unknown arm {n!r}; choose from {list(ARMS)} or {[v[0] for v in ARMS.values()]}")
        keys.add(k)
    return [k for k in ARMS if k in keys]


def todo(runs: list[dict], arms: list[str], seeds: list[int], iterations: int) -> list[tuple[str, int]]:
    """The (arm, seed) pairs with no finished run of this schedule in ``runs`` (seed-major order)."""
    done = {(r["arm"], int(r["seed"])) for r in runs if int(r.get("iterations", -1)) == iterations}
    return [(a, s) for s in seeds for a in arms if (a, s) not in done]


# ---------------------------------------------------------------------------------------------- data


def normalise(image, modality: str):
    """CT: clip to [-325, 325] HU, scale to [-1, 1]; MR: z-score over the cropped volume (the paper's)."""
    import numpy as np

    image = image.astype(np.float32)
    if modality == "CT":
        return np.clip(image, -325.0, 325.0) / 325.0
    return (image - image.mean()) / max(float(image.std()), 1e-6)


def prepare(work: Path, data_seed: int = 0, frame=FRAME) -> dict:
    """Generate the data and atlas (once) and return the cases in the working frame (cached in ``work``)."""
    import numpy as np
    import torch

    cache = work / f"prepared_{'x'.join(map(str, frame))}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=False)
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    from partialseg.data import load_dataset
    from partialseg.data.atlas import build_atlas, load_atlas
    from partialseg.data.synthetic import make_dataset
    from partialseg.networks.atlas import resize_to
    from partialseg.transforms import PartialLabelToVector
    from partialseg.transforms.spatial import AtlasCropd

    data = work / "data"
    if not (data / "dataset.json").exists():
        make_dataset("abdomen3d", data, seed=data_seed, modality="CT+MR", overwrite=True)
    ds = load_dataset(data)
    names = [str(c) for c in ds.classes]
    atlas_file = data / "atlas.nii.gz"
    atlas = load_atlas(atlas_file if atlas_file.is_file() else build_atlas(data, progress=False), names)
    atlas_frame = resize_to(torch.as_tensor(atlas.data)[None].float(), frame)[0].clamp(0, 1).numpy()
    load = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]), Orientationd(["image", "label"], "RAS"),
                    AtlasCropd(["image", "label"], source_key="image", spatial_size=frame)])
    to_vec = PartialLabelToVector(len(names))
    out = {"classes": names, "atlas": atlas_frame, "atlas_shape": list(atlas.data.shape[1:]), "frame": list(frame),
           "training": [], "test": []}
    for split in ("training", "test"):
        for e in ds.datalist(split):
            d = load({"image": e["image"], "label": e["label"]})
            x = normalise(np.asarray(d["image"]), e["modality"])
            y = np.asarray(d["label"])[0].round().astype(np.int64)
            case = {"case": e["case"], "modality": e["modality"], "source": e.get("source"), "annotated": [int(c) for c in e["annotated"]],
                    "x": x, "y": y}
            if split == "training":
                case["t"] = np.asarray(to_vec(y[None], case["annotated"]), dtype=np.float32)
            out[split].append(case)
    torch.save(out, cache)
    return out


class PatchSampler:
    """``epoch_length`` random batches per pass: ``batch`` distinct training cases, one random patch each.

    Yields AtlasTrainer batches: ``image`` (B, 1, *patch), ``label`` (B, m, *patch) ``<0,p,1>``,
    ``atlas`` (B, m - 1, *patch) cropped with the image, ``modality`` (list). Its own numpy
    generator (``seed``): every arm of a seed draws the same patches.
    """

    def __init__(self, cases: list[dict], atlas, patch, batch: int, epoch_length: int, seed: int) -> None:
        import numpy as np

        self.cases, self.atlas, self.patch, self.batch, self.epoch_length = cases, atlas, tuple(patch), batch, epoch_length
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.epoch_length

    def __iter__(self):
        import numpy as np
        import torch

        for _ in range(self.epoch_length):
            idx = self.rng.choice(len(self.cases), size=self.batch, replace=False)
            xs, ts, ats, mods = [], [], [], []
            for i in idx:
                c = self.cases[i]
                start = [int(self.rng.integers(0, s - p + 1)) for s, p in zip(c["x"].shape[1:], self.patch)]
                sl = (slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, self.patch))
                xs.append(c["x"][sl])
                ts.append(c["t"][sl])
                ats.append(self.atlas[sl])
                mods.append(c["modality"])
            yield {"image": torch.from_numpy(np.stack(xs)), "label": torch.from_numpy(np.stack(ts)),
                   "atlas": torch.from_numpy(np.stack(ats)), "modality": mods}


# ---------------------------------------------------------------------------------------------- one run


def build(arm: str, classes: int, args, device):
    """The arm's modules and trainer arguments; the main network's initial weights depend only on the seed."""
    import torch

    from partialseg.networks import AtlasDiscriminator, AtlasRefiner, AtlasUNet, PrototypeAnchoring

    _, aman, aprn, micpam = ARMS[arm]
    torch.manual_seed(args.seed_now)
    net = AtlasUNet(3, 1, classes, filters=tuple(args.filters)).to(device)
    torch.manual_seed(args.seed_now + 1000)
    refiner = AtlasRefiner(3).to(device) if aprn else None
    disc = AtlasDiscriminator(3, channels=tuple(args.aman_channels), scale=args.aman_scale).to(device) if aman else None
    protos = PrototypeAnchoring(classes, net.feature_channels).to(device) if micpam else None
    return net, refiner, disc, protos


def gradient_probe(trainer, batch, device) -> dict:
    """Norms of the gradients that ``L_seg`` and ``lambda_2 L_adv`` (AMAN arms) send into the main network's
    logits on ``batch``, per organ channel and in all (no step taken): which term drives the main network.

    The adversarial term goes through the trainer's own frozen-discriminator pass on the cross-modal pairs.
    """
    import torch

    from partialseg.losses.atlas import labelled_classes

    image, label, atlas, modality = trainer.prepare_batch(batch, device)
    net = trainer.state.networks["network"]
    lf = trainer.loss_function
    logits = net(image).float().detach().requires_grad_(True)
    out = {"iteration": int(trainer.state.iteration)}
    seg = lf.seg(logits, label.float())
    g_seg = torch.autograd.grad(seg, logits)[0]
    out["seg"] = float(g_seg.norm())
    out["seg_per_class"] = [float(g_seg[:, c].norm()) for c in range(g_seg.shape[1])]
    if trainer.aman:
        organ_atlas = trainer._organ_atlas(atlas, label)
        indicator = trainer.modality_indicator(modality, label.shape[0], label.shape[1] - 1, label.device)
        prob = torch.softmax(logits, 1)
        d = trainer.discriminator_logits(prob[:, 1:], organ_atlas, frozen=True, pairs=~indicator)
        adv = lf.lambda_adv * lf.adversarial(d.float(), indicator)
        g_adv = torch.autograd.grad(adv, logits)[0]
        out["adv"] = float(g_adv.norm())
        out["adv_per_class"] = [float(g_adv[:, c].norm()) for c in range(g_adv.shape[1])]
        out["labelled"] = labelled_classes(label)[:, 1:].tolist()
    return out


def dice(a, b) -> float:
    import numpy as np

    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def run_one(arm: str, seed: int, prep: dict, args, device) -> dict:
    import numpy as np
    import torch
    from ignite.engine import Events

    from partialseg.engines import AtlasTrainer
    from partialseg.engines.atlas import LOSS_TERMS
    from partialseg.evaluation.modality import labelled_by_modality, modality_group
    from partialseg.losses import AtlasLoss

    label, aman, aprn, micpam = ARMS[arm]
    names = prep["classes"]
    m = len(names)
    train, test = prep["training"], prep["test"]
    labelled = labelled_by_modality(train)
    args.seed_now = seed
    net, refiner, disc, protos = build(arm, m, args, device)
    adam = lambda mod: torch.optim.Adam(mod.parameters(), args.lr, weight_decay=args.weight_decay)
    opt = adam(net)
    epoch_length = args.epoch_length
    epochs = max(1, args.iterations // epoch_length)
    iterations = epochs * epoch_length
    sampler = PatchSampler(train, prep["atlas"], args.patch, args.batch, epoch_length, seed)
    trainer = AtlasTrainer(
        device, epochs, sampler, net, opt, AtlasLoss(),
        refiner, adam(refiner) if aprn else None, disc, torch.optim.Adam(disc.parameters(), args.aman_lr) if aman else None,
        protos, adam(protos) if micpam else None, modality_classes=labelled,
        aman=aman, aprn=aprn, micpam=micpam, pseudo_start_epoch=int(round(args.warmup * epochs)),
        epoch_length=epoch_length, decollate=False, optim_set_to_none=True,
    )
    log: dict[str, list[float]] = {k: [] for k in ("loss", *LOSS_TERMS)}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _poly(engine):
        it = engine.state.iteration
        for g in opt.param_groups:
            g["lr"] = args.lr * (1 - min(it, iterations - 1) / iterations) ** 0.9
        for k in log:
            log[k].append(float(torch.as_tensor(engine.state.output[k]).detach()))

    probes: list[dict] = []
    if args.probe_every:
        @trainer.on(Events.ITERATION_COMPLETED(every=args.probe_every))
        def _probe(engine):
            probes.append(gradient_probe(engine, engine.state.batch, device))

    t0, c0 = time.perf_counter(), time.process_time()
    trainer.run()
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0

    # ------------------------------------------------------------------ evaluation and diagnostics
    net.eval()
    atlas = torch.as_tensor(prep["atlas"])[None].to(device)
    rows, diag = [], {"main_dice": [], "refined_dice": [], "confident_cover": [], "confident_share": [],
                      "pred_voxels_ratio": [], "aman_correct": [], "aman_cross_prob": [], "aman_intra_prob": []}
    with torch.no_grad():
        for e in test:
            x = torch.as_tensor(e["x"])[None].to(device)
            prob = torch.softmax(net(x).float(), 1)
            pred = prob.argmax(1)[0].cpu().numpy()
            own = set(labelled[e["modality"]])
            for c in range(1, m):
                truth = e["y"] == c
                group = modality_group(e["modality"], c, labelled)
                rows.append({"case": e["case"], "modality": e["modality"], "class": names[c], "group": group,
                             "dice": dice(pred == c, truth)})
                if group == "cross_modal":
                    diag["main_dice"].append(dice(pred == c, truth))
                    diag["pred_voxels_ratio"].append(float((pred == c).sum()) / max(1, int(truth.sum())))
                    if aprn:
                        r = torch.sigmoid(refiner(prob[:, c:c + 1], atlas[:, c - 1:c])[0, 0].float()).cpu().numpy()
                        diag["refined_dice"].append(dice(r > 0.5, truth))
                        diag["confident_cover"].append(float((r[truth] > 0.9).mean()))
                        diag["confident_share"].append(float(((r > 0.9) | (r < 0.1)).mean()))
            if aman:  # on the centre patch (the size AMAN was trained on)
                sl = (slice(None), slice(None)) + tuple(slice((f - p) // 2, (f - p) // 2 + p) for f, p in zip(x.shape[2:], args.patch))
                pairs = torch.cat([prob[:, 1:].transpose(0, 1), atlas.transpose(0, 1)], 1)[sl]  # (organs, 2, *patch)
                p_lab = torch.sigmoid(disc(pairs)[:, 0]).cpu().numpy()
                for c in range(1, m):
                    is_own = c in own
                    diag["aman_correct"].append(float((p_lab[c - 1] > 0.5) == is_own))
                    diag["aman_intra_prob" if is_own else "aman_cross_prob"].append(float(p_lab[c - 1]))
    def mean(v):
        return float(np.mean(v)) if v else None

    groups = {}
    for g in ("intramodal", "cross_modal"):
        sel = [r for r in rows if r["group"] == g]
        groups[g] = {"dice": mean([r["dice"] for r in sel]),
                     "per_class": {f"{mod} {c}": mean([r["dice"] for r in sel if r["modality"] == mod and r["class"] == c])
                                   for mod in ("CT", "MR") for c in names[1:] if any(r["modality"] == mod and r["class"] == c for r in sel)}}
    tail = max(1, iterations // 10)
    return {
        "arm": arm, "label": label, "seed": seed, "iterations": iterations, "epoch_length": epoch_length,
        "pseudo_start_epoch": int(round(args.warmup * epochs)), "patch": list(args.patch), "batch": args.batch, "lr": args.lr,
        "filters": list(args.filters), "aman_channels": list(args.aman_channels), "aman_scale": args.aman_scale,
        "device": str(device), "threads": torch.get_num_threads(), "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
        "intramodal_dice": groups["intramodal"]["dice"], "cross_modal_dice": groups["cross_modal"]["dice"],
        "per_class": {g: groups[g]["per_class"] for g in groups},
        "diagnostics": {k: mean(v) for k, v in diag.items()},
        "final_losses": {k: mean(v[-tail:]) for k, v in log.items()},
        **({"gradient_probe": probes} if probes else {}),
        "labelled_by_modality": {k: [names[i] for i in v] for k, v in labelled.items()},
    }


# ---------------------------------------------------------------------------------------------- report


def atlas_alone(prep: dict, thresholds=(0.3, 0.5)) -> dict:
    """Dice of the thresholded atlas itself against the test truth (no training): how much of a
    cross-modal score the location prior alone gives. ``{threshold: {intramodal, cross_modal, per_class}}``."""
    import numpy as np

    from partialseg.evaluation.modality import labelled_by_modality, modality_group

    names, atlas = prep["classes"], prep["atlas"]
    labelled = labelled_by_modality(prep["training"])
    out = {}
    for thr in thresholds:
        groups: dict[str, list[float]] = {"intramodal": [], "cross_modal": []}
        per: dict[str, list[float]] = {}
        for e in prep["test"]:
            for c in range(1, len(names)):
                d = dice(atlas[c - 1] > thr, e["y"] == c)
                groups[modality_group(e["modality"], c, labelled)].append(d)
                per.setdefault(f"{e['modality']} {names[c]}", []).append(d)
        out[str(thr)] = {g: float(np.mean(v)) for g, v in groups.items()}
        out[str(thr)]["per_class"] = {k: float(np.mean(v)) for k, v in per.items()}
    return out



def summarise(runs: list[dict], arms: list[str]) -> dict:
    """Per arm: mean and std over seeds of intramodal / cross-modal Dice (points), per organ, diagnostics."""

    def ms(v):
        v = [100 * x for x in v if x is not None]
        return {"mean": statistics.mean(v) if v else None, "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}

    out = {}
    for a in arms:
        rs = [r for r in runs if r["arm"] == a]
        if not rs:
            continue
        per_class = {}
        for g in ("intramodal", "cross_modal"):
            keys = sorted({k for r in rs for k in r["per_class"][g]})
            per_class[g] = {k: ms([r["per_class"][g].get(k) for r in rs])["mean"] for k in keys}
        diag_keys = sorted({k for r in rs for k, v in r["diagnostics"].items() if v is not None})
        out[a] = {"label": ARMS[a][0], "seeds": sorted(int(r["seed"]) for r in rs),
                  "intramodal": ms([r["intramodal_dice"] for r in rs]), "cross_modal": ms([r["cross_modal_dice"] for r in rs]),
                  "paper_intramodal": PAPER_INTRA[a], "paper_cross_modal": PAPER_CROSS[a], "per_class": per_class,
                  "diagnostics": {k: statistics.mean(r["diagnostics"][k] for r in rs if r["diagnostics"].get(k) is not None) for k in diag_keys},
                  "train_seconds": statistics.mean(r["train_seconds"] for r in rs)}
    return out


def table(summary: dict) -> str:
    def f(s):
        return "-" if s["mean"] is None else f"{s['mean']:.1f} ± {s['std']:.1f}"

    lines = ["| arm | seeds | intramodal Dice | cross-modal Dice | paper intra / cross (Table 2) | APRN pseudo-label Dice (cross) | confident cover of the organ | AMAN accuracy | AMAN p(labelled) cross | train s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a, s in summary.items():
        d = s["diagnostics"]

        def p(k):
            return f"{100 * d[k]:.1f}" if d.get(k) is not None else "-"

        lines.append(f"| {s['label']} | {len(s['seeds'])} | {f(s['intramodal'])} | {f(s['cross_modal'])} | {s['paper_intramodal']} / {s['paper_cross_modal']} | "
                     f"{p('refined_dice')} | {p('confident_cover')} | {p('aman_correct')} | {p('aman_cross_prob')} | {s['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    xs = range(len(arms))
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.38
    for off, g, colour in ((-w / 2, "intramodal", "tab:blue"), (w / 2, "cross_modal", "tab:orange")):
        means = [summary[a][g]["mean"] or 0.0 for a in arms]
        stds = [summary[a][g]["std"] or 0.0 for a in arms]
        ax.bar([x + off for x in xs], means, w, yerr=stds, capsize=3, label=g.replace("_", "-"), color=colour)
    ax.plot(list(xs), [PAPER_CROSS[a] for a in arms], "k_", markersize=18, label="paper cross-modal (AMOS)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([summary[a]["label"] for a in arms], rotation=20, fontsize=8)
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title("atlas ablation, abdomen3d CT+MR (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="*", help=f"arm keys {list(ARMS)} (default all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=400, help="training iterations per run (rounded down to whole epochs)")
    ap.add_argument("--epoch-length", type=int, default=20, help="iterations per epoch (pseudo-label warm-up is counted in epochs)")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of the epochs before L_pseudo / L_proto apply")
    ap.add_argument("--frame", type=int, nargs=3, default=list(FRAME), help="the working frame every image and the atlas are resized to")
    ap.add_argument("--patch", type=int, nargs=3, default=None, help="random training patches (default: the whole frame)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam lr of the main network (poly 0.9), APRN and MICPAM")
    ap.add_argument("--aman-lr", type=float, default=2e-4, help="Adam lr of AMAN")
    ap.add_argument("--weight-decay", type=float, default=5e-5)
    ap.add_argument("--filters", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="main network filters")
    ap.add_argument("--aman-channels", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--aman-scale", type=float, default=0.5)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (modules, batches and evaluation go there)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--work", default=str(ROOT / ".benchmarks" / "atlas_ablation"), help="data, atlas and the prepared arrays")
    ap.add_argument("--runs", default=str(RESULTS / "atlas_ablation_runs.jsonl"), help="the resumable run file (JSONL)")
    ap.add_argument("--out", default=str(RESULTS / "atlas_ablation"), help="stem of the .json / .md / .png summary")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the summary from the run file")
    ap.add_argument("--probe-every", type=int, default=0,
                    help="diagnostic: every N iterations, the gradient norms L_seg and lambda_2 L_adv send into the logits (gradient_probe)")
    args = ap.parse_args(argv)
    args.patch = list(args.frame) if args.patch is None else args.patch

    import torch

    arms = parse_arms(args.arms)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    epochs = max(1, args.iterations // args.epoch_length)
    iterations = epochs * args.epoch_length
    if not args.report_only:
        prep = prepare(Path(args.work), frame=tuple(args.frame))
        for arm, seed in todo(_common.read_runs(args.runs), arms, args.seeds, iterations):
            print(f"{ARMS[arm][0]} seed {seed}: {iterations} iterations ...", flush=True)
            run = run_one(arm, seed, prep, args, device)
            run["command"] = " ".join(["python benchmarks/atlas_ablation.py", *(sys.argv[1:] if argv is None else argv)])
            _common.append_run(args.runs, run)
            print(f"  intramodal {100 * run['intramodal_dice']:.1f}  cross-modal {100 * run['cross_modal_dice']:.1f}  "
                  f"({run['train_seconds']:.0f} s) {json.dumps(run['diagnostics'])}", flush=True)
    runs = [r for r in _common.read_runs(args.runs) if int(r.get("iterations", -1)) == iterations and int(r["seed"]) in args.seeds]
    summary = summarise(runs, arms)
    if not summary:
        return 0
    prior = atlas_alone(prepare(Path(args.work), frame=tuple(args.frame)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = table(summary)
    first = runs[0]
    head = (f"`{first.get('command', '')}`; {len(runs)} runs, {iterations} iterations, patch {' x '.join(map(str, first['patch']))}, batch "
            f"{first['batch']}, main network filters {first['filters']}, device {first['device']}, {first['threads']} thread(s).\n\n")
    text += "".join(f"| atlas alone (> {t}, no training) | - | {100 * v['intramodal']:.1f} | {100 * v['cross_modal']:.1f} | - | - | - | - | - | 0 |\n"
                    for t, v in prior.items())
    out.with_suffix(".md").write_text("### atlas ablation (benchmarks/atlas_ablation.py)\n\n" + head + text)
    out.with_suffix(".json").write_text(json.dumps({"iterations": iterations, "seeds": args.seeds, "arms": summary, "atlas_alone": prior},
                                                   indent=2) + "\n")
    plot(summary, out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
