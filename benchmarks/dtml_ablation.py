"""DTML ablation (the paper's Tables 1-3) on the synthetic ``atrium3d`` benchmark, CPU-sized.

Every arm trains the same small 3D MONAI UNet backbone (``--channels``, batch norm, one residual
unit) with the same budget: ``--iters`` SGD iterations (lr ``--lr``, momentum 0.9, weight decay
1e-4, x0.1 at 5/12 and 10/12 of the schedule: the paper's 2500 and 5000 of 6000), batch 4 of
random ``--crop`` crops from z-scored volumes; the final weights are tested (as the paper: no
validation split). Test: sliding windows (``--crop``, overlap 0.5), threshold 0.5, the largest
connected component (MONAI's ``KeepLargestConnectedComponent``), then MONAI's Dice, Jaccard
(``MeanIoU``), one-directional ASD (prediction to ground truth, ``SurfaceDistanceMetric``) and
95HD (``HausdorffDistanceMetric(percentile=95)``), distances in voxels as the paper.

Arms (``L`` labelled and ``U`` unlabelled training volumes, 20 % labelled: the paper's 16 / 64
proportion):

- ``ms_lab``     M_s alone on the ``L`` labelled volumes: 0.5 (BCE + Dice), MONAI ``SupervisedTrainer``
- ``md_lab``     M_d alone (``SignedDistanceNet``, tanh) on the labelled volumes, L_mask
- ``dtml_lab``   DTML on the labelled volumes only (L_seg + L_mask + L_con)
- ``dtml_semi``  DTML semi-supervised: 2 labelled + 2 unlabelled per batch (``TwoStreamBatchSampler``), L_mask
- ``full``       M_s alone with every training volume labelled (the upper bound)
- ``dtml_dis``   DTML semi with L_dis instead of L_mask (Table 1)
- ``dtml_both``  DTML semi with L_dis + L_mask (Table 1)
- ``md_lab_ce``  (not in the default run) M_d alone with ``mask_ce``: L_mask = 0.5 (BCE + Dice) of its
  mask (logits ``-k s_hat``), the check of the ordering's explanation in ``docs/results.md``

The full ground truth of the unlabelled volumes (for ``full``) is rendered by the generator's own
code (``atrium.render_case`` with the generator's per-case random streams), so the data are the
volumes ``partialseg make-data atrium3d`` writes (before their int16 rounding).

The consistency ramp w(t) = exp(-5 (1 - min(t / s, 40) / 40)^2) is stretched to the short schedule
(``s = iters / 40``: full weight at the last iteration, as the paper's s = 150 over 6000).

Every finished (arm, seed) is appended to ``--out`` (JSONL) and the table is rewritten
(``--report`` and, for the default report, the "## dtml: ablation on atrium3d" section of
``docs/results.md``); ``--resume`` skips runs already in the JSONL file (same configuration).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/dtml_ablation.py                    # the documented run
    OMP_NUM_THREADS=1 python benchmarks/dtml_ablation.py --arms ms_lab full  # the gap check
    OMP_NUM_THREADS=1 python benchmarks/dtml_ablation.py --quick            # smoke run (a minute)
    python benchmarks/dtml_ablation.py --report-only                        # rewrite the table from the JSONL
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by file path
import _common  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
SECTION = "## dtml: ablation on atrium3d"
ARMS = ["ms_lab", "md_lab", "dtml_lab", "dtml_semi", "full", "dtml_dis", "dtml_both"]
#: arms run only when named (--arms): not part of the paper's tables
EXTRA_ARMS = ["md_lab_ce"]
LABELS = {
    "ms_lab": "M_s, labelled only",
    "md_lab": "M_d (SDM + L_mask), labelled only",
    "dtml_lab": "DTML, labelled only",
    "dtml_semi": "DTML semi (L_mask)",
    "full": "M_s, all labelled (upper bound)",
    "dtml_dis": "DTML semi, L_dis instead of L_mask",
    "dtml_both": "DTML semi, L_dis + L_mask",
    "md_lab_ce": "M_d, labelled only, L_mask = 0.5 (BCE + Dice)",
}
#: the paper's figures (Dice %, Jaccard %, ASD voxel, 95HD voxel); Table 2 / 3 / 1
PAPER = {
    "ms_lab": (86.03, 76.06, 3.51, 14.26),
    "md_lab": (88.69, 79.91, 3.12, 11.62),
    "dtml_lab": (89.17, 80.68, 2.13, 7.82),
    "dtml_semi": (90.12, 82.14, 1.82, 7.01),
    "full": (91.14, 83.82, 1.52, 5.75),
    "dtml_dis": (89.72, 81.55, 1.97, 7.64),
    "dtml_both": (89.89, 81.82, 1.93, 6.61),
}
DTML_ARMS = {"dtml_lab", "dtml_semi", "dtml_dis", "dtml_both"}
SEMI_ARMS = {"dtml_semi", "dtml_dis", "dtml_both"}
METRICS = ("dice", "jaccard", "asd", "hd95")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs=3, default=[40, 40, 32], help="volume shape (X Y Z); 2.4 x 2.4 x 2.25 mm voxels")
    ap.add_argument("--crop", type=int, nargs=3, default=[24, 24, 24], help="training crop and sliding window")
    ap.add_argument("--num-train", type=int, default=40)
    ap.add_argument("--num-test", type=int, default=10)
    ap.add_argument("--labelled-fraction", type=float, default=0.2)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS + EXTRA_ARMS)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05, help="SGD lr (the paper: 0.01 over 6000 iterations; at 0.01 the 300-iteration M_s underfits)")
    ap.add_argument("--batch", type=int, default=4, help="volumes per batch (DTML semi: half labelled, half unlabelled)")
    ap.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--k", type=float, default=1500.0, help="the SDM-to-mask steepness")
    ap.add_argument("--generator", default='{"difficulty": "hard"}',
                    help="atrium.render_case options as JSON (default: the hard preset, where the labelled-only / all-labelled gap is > 3 Dice points)")
    ap.add_argument("--tag", default="", help="a label stored with the runs")
    ap.add_argument("--device", default="cpu", help="torch device of training and inference (cuda: a GPU check; not part of the configuration key)")
    ap.add_argument("--out", default=str(RESULTS / "dtml_ablation_runs.jsonl"))
    ap.add_argument("--report", default=str(RESULTS / "dtml_ablation.md"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: small volumes, few iterations, one seed")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-docs", action="store_true", help="don't touch docs/results.md")
    ap.add_argument("--arbiter", type=int, default=0, metavar="N",
                    help="DTML arms: N times during training, on the first 8 unlabelled training volumes, measure who is "
                         "right where M_s and M_d disagree (the share of L_con that pulls M_s towards the truth); "
                         "stored as 'arbiter' in the run (a diagnostic; not part of the configuration key)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.crop, args.num_train, args.num_test = [32, 32, 24], [24, 24, 24], 10, 2
        args.iters, args.seeds = 6, [0]
        args.out, args.report, args.no_docs = "/tmp/partialseg_dtml_ablation_quick.jsonl", "/tmp/partialseg_dtml_ablation_quick.md", True
    args.generator_opts = json.loads(args.generator)
    return args


def config_of(args) -> dict:
    keys = ("size", "crop", "num_train", "num_test", "labelled_fraction", "data_seed", "iters", "lr", "batch", "channels", "k",
            "generator_opts", "tag")
    return {k: getattr(args, k) for k in keys}


# ----------------------------------------------------------------------------------------- data


def load_data(args) -> dict:
    """``{"train": [(image, gt)], "n_lab": int, "test": [(image, gt)]}``: z-scored float32 images, uint8 labels.

    The cases are rendered with the generator's code and random streams (``atrium.generate``'s
    ``case_rng(seed, "atrium3d", split, i)``), so they are the volumes ``make-data`` writes.
    """
    from partialseg.data.synthetic import _common as C
    from partialseg.data.synthetic import atrium

    shape = tuple(args.size)
    spacing = tuple(f / n for f, n in zip(atrium.FOV_MM, shape))
    n_lab = min(args.num_train, max(1, int(round(args.labelled_fraction * args.num_train))))

    def case(split, i):
        image, gt, _, _ = atrium.render_case(C.case_rng(args.data_seed, "atrium3d", split, i), shape, spacing, **args.generator_opts)
        image = C.to_int16(image, 1000.0).astype(np.float32)  # the stored volume
        return (image - image.mean()) / (image.std() + 1e-6), gt.astype(np.uint8)

    return {"train": [case("training", i) for i in range(args.num_train)], "n_lab": n_lab,
            "test": [case("test", i) for i in range(args.num_test)]}


class CropDataset(torch.utils.data.Dataset):
    """Random crops (MONAI ``RandSpatialCropd``) of in-memory volumes; ``label`` one-hot ``(2, ...)``
    for labelled cases, all-``p`` (0.5, unknown) for unlabelled ones: the ``<0,p,1>`` map."""

    def __init__(self, cases, labelled, crop, seed):
        from monai.transforms import RandSpatialCropd

        self.cases, self.labelled = cases, labelled
        self.crop = RandSpatialCropd(["image", "label"], roi_size=crop, random_size=False)
        self.crop.set_random_state(seed)

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        image, gt = self.cases[i]
        g = torch.from_numpy(gt.astype(np.float32))[None]
        label = torch.cat([1 - g, g]) if self.labelled[i] else torch.full((2, *gt.shape), 0.5)
        out = self.crop({"image": torch.from_numpy(image)[None], "label": label})
        return {"image": torch.as_tensor(out["image"]).float(), "label": torch.as_tensor(out["label"]).float()}


# ----------------------------------------------------------------------------------------- arms


def make_backbone(args):
    return _make_backbone(args).to(args.device)


def _make_backbone(args):
    from monai.networks.nets import UNet

    return UNet(3, 1, 1, channels=tuple(args.channels), strides=(2,) * (len(args.channels) - 1), num_res_units=1, norm="batch")


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - Dice with squared denominators, pooled over the batch (the reference code's ``dice_loss``)."""
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / ((prob * prob).sum() + (target * target).sum() + eps)


class SegLoss(torch.nn.Module):
    """M_s's supervised loss 0.5 (BCE + Dice) on the foreground channel of the ``<0,p,1>`` map."""

    def forward(self, logits, label):
        y = label[:, 1:]
        return 0.5 * (torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + soft_dice_loss(torch.sigmoid(logits), y))


class MaskLoss(torch.nn.Module):
    """M_d alone: the Dice of its mask sigma(-k s_hat) against the label (L_mask), as the DTML loss;
    ``ce=True``: 0.5 (BCE + Dice), the BCE on the mask's logits ``-k s_hat`` (``DTMLLoss(mask_ce=True)``)."""

    def __init__(self, k, ce=False):
        super().__init__()
        self.k, self.ce = k, ce

    def forward(self, sdm, label):
        from partialseg.losses.dtml import sdm_to_mask

        dice = soft_dice_loss(sdm_to_mask(sdm, self.k), label[:, 1:])
        if not self.ce:
            return dice
        return 0.5 * (torch.nn.functional.binary_cross_entropy_with_logits(sdm * -self.k, label[:, 1:]) + dice)


def sampler_for(arm, n_lab, n_train, args, seed):
    """(batch_sampler) for the arm: labelled-only / all-labelled random draws, or the two streams."""
    from partialseg.data.sampling import TwoStreamBatchSampler

    if arm in SEMI_ARMS:
        half = args.batch // 2
        return TwoStreamBatchSampler(list(range(n_lab)), list(range(n_lab, n_train)), half, args.batch - half,
                                     num_batches=args.iters, seed=seed)
    pool = n_train if arm == "full" else n_lab
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(range(pool), replacement=True, num_samples=args.iters * args.batch, generator=g)
    return torch.utils.data.BatchSampler(sampler, args.batch, drop_last=True)


def run_arm(arm, seed, data, args) -> dict:
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    np.random.seed(seed)
    n_lab, train = data["n_lab"], data["train"]
    labelled = [True] * len(train) if arm == "full" else [i < n_lab for i in range(len(train))]
    dataset = CropDataset(train, labelled, tuple(args.crop), seed)
    loader = DataLoader(dataset, batch_sampler=sampler_for(arm, n_lab, len(train), args, seed), num_workers=0)
    milestones = [round(args.iters * 5 / 12), round(args.iters * 10 / 12)]

    def sgd(net):
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)

    losses: list[float] = []
    if arm in DTML_ARMS:
        from partialseg.engines.dtml import DTMLTrainer
        from partialseg.losses.dtml import DTMLLoss
        from partialseg.networks.dtml import DTMLPredictor, SignedDistanceNet

        seg_net, sdm_net = make_backbone(args), SignedDistanceNet(make_backbone(args))
        (opt_s, sch_s), (opt_d, sch_d) = sgd(seg_net), sgd(sdm_net)
        loss = DTMLLoss(k=args.k, mask_weight=0.0 if arm == "dtml_dis" else 1.0,
                        dis_weight=1.0 if arm in ("dtml_dis", "dtml_both") else 0.0, ramp_scale=args.iters / 40.0)
        if arm in ("dtml_dis", "dtml_both"):
            from partialseg.transforms import SignedDistanceMap

            sdm_of = SignedDistanceMap(num_classes=2)

            def prepare(batch, device=None, non_blocking=False, **kwargs):
                lab = batch["label"]
                sdm = torch.stack([torch.as_tensor(sdm_of(lab[b, 1:2].round().long())) if lab[b, 1].min() != 0.5 or lab[b, 1].max() != 0.5
                                   else torch.zeros_like(lab[b, 1:2]) for b in range(lab.shape[0])])
                return {"image": batch["image"], "label": lab, "sdm": sdm.float()}

            loader = _MappedLoader(loader, prepare)
        trainer = DTMLTrainer(device=torch.device(args.device), max_epochs=1, train_data_loader=loader, seg_network=seg_net,
                              sdm_network=sdm_net, seg_optimizer=opt_s, sdm_optimizer=opt_d, loss_function=loss,
                              epoch_length=args.iters, decollate=False)
        schedulers = (sch_s, sch_d)
        predictor = DTMLPredictor(seg_net)
        nets = (seg_net, sdm_net)
    else:
        if arm in ("md_lab", "md_lab_ce"):
            from partialseg.networks.dtml import SignedDistanceNet

            net = SignedDistanceNet(make_backbone(args))
            loss = MaskLoss(args.k, ce=arm == "md_lab_ce")
        else:
            net, loss = make_backbone(args), SegLoss()
        opt, sch = sgd(net)
        trainer = SupervisedTrainer(device=torch.device(args.device), max_epochs=1, epoch_length=args.iters, train_data_loader=loader,
                                    network=net, optimizer=opt, loss_function=loss, decollate=False)
        schedulers = (sch,)
        nets = (net,)
        predictor = _MdPredictor(net, args.k) if arm in ("md_lab", "md_lab_ce") else _SigmoidPredictor(net)

    terms: dict[str, list[float]] = {}

    def on_iter(engine):
        out = engine.state.output
        out = out[0] if isinstance(out, list) else out
        losses.append(float(out["loss"]))
        for key in ("seg", "mask", "dis", "con", "con_weight"):
            if key in out:
                terms.setdefault(key, []).append(float(out[key]))
        for s in schedulers:
            s.step()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, on_iter)
    arbiter: list[dict] = []
    if arm in DTML_ARMS and args.arbiter > 0:
        held = data["train"][n_lab:][:8]
        every = max(1, args.iters // args.arbiter)
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every),
                                  lambda e: arbiter.append({"iteration": e.state.iteration, **who_is_right(seg_net, sdm_net, held, args)}))
    t0 = time.perf_counter()
    trainer.run()
    t_train = time.perf_counter() - t0
    for n in nets:
        n.eval()
    t1 = time.perf_counter()
    per_case = evaluate(predictor, data["test"], args)
    extra = {}
    if arm in DTML_ARMS:  # diagnostics: the loss terms at the end, and M_d's own mask on the test set
        extra["terms_last"] = {k: float(np.mean(v[-20:])) for k, v in terms.items()}
        extra["terms"] = {k: v[:: max(1, len(v) // 50)] for k, v in terms.items()}
        extra["md_per_case"] = evaluate(_MdPredictor(sdm_net, args.k), data["test"], args)
        if arbiter:
            extra["arbiter"] = arbiter
    return {"arm": arm, "seed": seed, "per_case": per_case, "loss": losses[:: max(1, len(losses) // 50)],
            "loss_last": float(np.mean(losses[-20:])), "time_train_s": t_train, "time_test_s": time.perf_counter() - t1, **extra}


class _MappedLoader:
    """A loader whose batches pass through ``fn`` (adds the SDM target of the L_dis arms)."""

    def __init__(self, loader, fn):
        self.loader, self.fn = loader, fn

    def __iter__(self):
        return (self.fn(b) for b in self.loader)

    def __len__(self):
        return len(self.loader)


class _SigmoidPredictor(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.sigmoid(self.net(x))


class _MdPredictor(torch.nn.Module):
    """M_d alone at inference: the foreground probability sigma(-k s_hat) of its SDM."""

    def __init__(self, net, k):
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x):
        from partialseg.losses.dtml import sdm_to_mask

        return sdm_to_mask(self.net(x), self.k)


def evaluate(predictor, cases, args) -> list[dict]:
    """Per test case: Dice, Jaccard, ASD (prediction to ground truth), 95HD, in voxels (MONAI metrics)."""
    from monai.inferers import SlidingWindowInferer
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDistanceMetric
    from monai.transforms import KeepLargestConnectedComponent

    inferer = SlidingWindowInferer(tuple(args.crop), sw_batch_size=4, overlap=0.5, mode="gaussian")
    keep = KeepLargestConnectedComponent(applied_labels=[1], is_onehot=False, connectivity=3)
    rows = []
    with torch.no_grad():
        for i, (image, gt) in enumerate(cases):
            prob = inferer(torch.from_numpy(image)[None, None].to(args.device), predictor).cpu()
            pred = keep((prob[0] >= 0.5).long())[None]  # (1, 1, ...)
            g = torch.from_numpy(gt.astype(np.int64))[None, None]
            p1 = torch.cat([1 - pred, pred], 1).float()
            g1 = torch.cat([1 - g, g], 1).float()
            row = {"case": i, "fg_pred": int(pred.sum()), "fg_gt": int(g.sum())}
            row["dice"] = float(DiceMetric(include_background=False)(p1, g1)[0, 0])
            row["jaccard"] = float(MeanIoU(include_background=False)(p1, g1)[0, 0])
            if row["fg_pred"] == 0:
                row["asd"] = row["hd95"] = float("nan")
            else:
                row["asd"] = float(SurfaceDistanceMetric(include_background=False, symmetric=False)(p1, g1)[0, 0])
                row["hd95"] = float(HausdorffDistanceMetric(include_background=False, percentile=95)(p1, g1)[0, 0])
            rows.append(row)
    return rows


def who_is_right(seg_net, sdm_net, cases, args) -> dict:
    """Where M_s and M_d disagree on ``cases`` (whole volumes, sliding windows), which one is right.

    L_con = mean (p_s - m_d)^2 pulls M_s's probability p_s towards M_d's mask m_d = sigma(-k s_hat)
    (and m_d towards p_s). At a voxel the pull on M_s points to the truth y when M_d is closer to it,
    |m_d - y| < |p_s - y|. Returned: ``to_truth_ms``, the share of L_con's mass sum (p_s - m_d)^2 at
    such voxels (M_s is pulled towards the truth; > 0.5 is the paper's premise that M_d teaches M_s),
    ``to_truth_md`` the same for M_d, ``disagree`` the fraction of voxels whose thresholded masks differ,
    ``ms_right`` the share of those where M_s's mask is the correct one, and each network's Dice on the
    cases. Both networks are put back in training mode afterwards.
    """
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(tuple(args.crop), sw_batch_size=4, overlap=0.5, mode="gaussian")
    md = _MdPredictor(sdm_net, args.k)
    mass_s = mass_d = mass = 0.0
    n_dis = n_ms_right = n_vox = 0
    inter = {"ms": 0.0, "md": 0.0}
    sums = {"ms": 0.0, "md": 0.0, "gt": 0.0}
    seg_net.eval(), sdm_net.eval()
    try:
        with torch.no_grad():
            for image, gt in cases:
                x = torch.from_numpy(image)[None, None].to(args.device)
                p_s = inferer(x, _SigmoidPredictor(seg_net)).cpu()[0, 0].double()
                m_d = inferer(x, md).cpu()[0, 0].double()
                y = torch.from_numpy(gt.astype(np.float64))
                sq = (p_s - m_d) ** 2
                mass += float(sq.sum())
                mass_s += float(sq[(m_d - y).abs() < (p_s - y).abs()].sum())
                mass_d += float(sq[(p_s - y).abs() < (m_d - y).abs()].sum())
                b_s, b_d = p_s >= 0.5, m_d >= 0.5
                dis = b_s != b_d
                n_dis += int(dis.sum())
                n_ms_right += int((dis & (b_s == (y > 0.5))).sum())
                n_vox += y.numel()
                inter["ms"] += float((b_s & (y > 0.5)).sum())
                inter["md"] += float((b_d & (y > 0.5)).sum())
                sums["ms"] += float(b_s.sum())
                sums["md"] += float(b_d.sum())
                sums["gt"] += float((y > 0.5).sum())
    finally:
        seg_net.train(), sdm_net.train()
    return {"to_truth_ms": mass_s / mass if mass else float("nan"), "to_truth_md": mass_d / mass if mass else float("nan"),
            "con": mass / n_vox, "disagree": n_dis / n_vox, "ms_right": n_ms_right / n_dis if n_dis else float("nan"),
            "dice_ms": 2 * inter["ms"] / (sums["ms"] + sums["gt"]), "dice_md": 2 * inter["md"] / (sums["md"] + sums["gt"])}


# ----------------------------------------------------------------------------------------- report


def summarise(runs: list[dict]) -> dict:
    """arm -> {metric: (mean over seeds of the per-seed case mean, std over seeds)}, "n", "time"."""
    out = {}
    for arm in ARMS + EXTRA_ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        s = {"n": len(rs), "seeds": sorted(r["seed"] for r in rs), "time": float(np.mean([r["time_train_s"] for r in rs])),
             "empty": sum(c["fg_pred"] == 0 for r in rs for c in r["per_case"])}
        for m in METRICS:
            per_seed = [float(np.nanmean([c[m] for c in r["per_case"]])) for r in rs]
            s[m] = (float(np.mean(per_seed)), float(np.std(per_seed)))
        out[arm] = s
    return out


def table(summary: dict) -> str:
    head = ("| arm | seeds | Dice % | Jaccard % | ASD vox | 95HD vox | paper Dice / Jaccard / ASD / 95HD | train s |\n"
            "|---|---|---|---|---|---|---|---|\n")
    rows = []
    for arm, s in summary.items():
        pct = lambda m: f"{100 * s[m][0]:.2f} ± {100 * s[m][1]:.2f}"
        dist = lambda m: f"{s[m][0]:.2f} ± {s[m][1]:.2f}"
        paper = " / ".join(f"{v:g}" for v in PAPER[arm]) if arm in PAPER else "-"
        empty = f" ({s['empty']} empty)" if s["empty"] else ""
        rows.append(f"| {LABELS[arm]} | {s['n']} | **{pct('dice')}** | {pct('jaccard')} | {dist('asd')}{empty} | {dist('hd95')} | {paper} | {s['time']:.0f} |")
    return head + "\n".join(rows) + "\n"


def write_report(args, runs, command) -> str:
    cfg = config_of(args)
    summary = summarise(runs)
    done = {(r["arm"], r["seed"]) for r in runs}
    expected = {(a, s) for a in args.arms for s in args.seeds}
    status = "complete" if expected <= done else f"PARTIAL: {len(done & expected)} of {len(expected)} (arm, seed) runs finished"
    n_lab = min(cfg["num_train"], max(1, int(round(cfg["labelled_fraction"] * cfg["num_train"]))))
    gen = f", generator options {cfg['generator_opts']}" if cfg["generator_opts"] else ""
    text = (
        f"{SECTION}\n\n"
        f"Command (one CPU thread): `{command}`\n\n"
        f"Synthetic `atrium3d` (data seed {cfg['data_seed']}{gen}), {' x '.join(map(str, cfg['size']))} voxels, "
        f"{n_lab} labelled + {cfg['num_train'] - n_lab} unlabelled training volumes, {cfg['num_test']} test volumes. "
        f"Same 3D UNet (channels {cfg['channels']}, batch norm) for M_s and M_d in every arm, {cfg['iters']} SGD iterations "
        f"(lr {cfg['lr']:g}, momentum 0.9, wd 1e-4, x0.1 at 5/12 and 10/12), batch {cfg['batch']} of "
        f"{' x '.join(map(str, cfg['crop']))} random crops (DTML semi: 2 labelled + 2 unlabelled), k = {cfg['k']:g}, "
        f"consistency ramp stretched to the schedule; final weights, sliding windows, largest component. "
        f"Mean ± std over seeds {sorted(args.seeds)} of the test-case means; ASD one-directional, both distances in voxels. "
        f"A CPU-sized schedule (the paper: 6000 iterations, VNet 16 filters, 112 x 112 x 80 crops): the numbers are "
        f"for the ordering, not for the paper's values. Status: {status}. Raw runs: `{_rel(args.out)}`.\n\n"
        + table(summary)
    )
    notes = Path(args.report).with_name(Path(args.report).stem + "_notes.md")
    if notes.is_file() and not args.quick:
        text += "\n" + notes.read_text().strip() + "\n"
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    if not args.no_docs and Path(args.report).resolve() == (RESULTS / "dtml_ablation.md").resolve():
        _common.update_results_md(text, header=SECTION)
    if summary:
        plot(runs, Path(args.report).with_suffix(".png"))
    if any(r.get("arbiter") for r in runs):
        plot_arbiter(runs, Path(args.report).with_name(Path(args.report).stem + "_arbiter.png"))
    return text


def plot(runs: list[dict], path: Path) -> None:
    """Test Dice and 95HD per arm: one dot per seed, a bar at the mean (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    arms = [a for a in ARMS + EXTRA_ARMS if any(r["arm"] == a for r in runs)]
    fig = Figure(figsize=(9, 3.2), dpi=80)
    for k, (metric, scale, title) in enumerate((("dice", 100.0, "Dice %"), ("hd95", 1.0, "95HD (voxels)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for i, arm in enumerate(arms):
            vals = [scale * float(np.nanmean([c[metric] for c in r["per_case"]])) for r in runs if r["arm"] == arm]
            ax.bar(i, np.mean(vals), color="#9ecae1")
            ax.plot([i] * len(vals), vals, "k.")
        ax.set_xticks(range(len(arms)), arms, rotation=30, fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), format="png", metadata={"Software": None})


def plot_arbiter(runs: list[dict], path: Path) -> None:
    """The ``--arbiter`` diagnostic over training: the share of L_con that pulls M_s towards the truth
    (0.5 dashed: above it M_d teaches M_s), and both networks' Dice on the held-out unlabelled volumes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), dpi=80)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for r in (r for r in runs if r.get("arbiter")):
        it = [a["iteration"] for a in r["arbiter"]]
        style = "-" if r["arm"] in SEMI_ARMS else "--"
        ax1.plot(it, [a["to_truth_ms"] for a in r["arbiter"]], style, label=f"{r['arm']} s{r['seed']}")
        line = ax2.plot(it, [a["dice_ms"] for a in r["arbiter"]], style, label=f"M_s {r['arm']} s{r['seed']}")[0]
        ax2.plot(it, [a["dice_md"] for a in r["arbiter"]], ":", color=line.get_color())
    ax1.axhline(0.5, color="k", lw=0.8, ls="--")
    ax1.set_title("share of L_con pulling M_s towards the truth", fontsize=9)
    ax2.set_title("Dice on unlabelled volumes: M_s (line), M_d (dotted)", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xlabel("iteration", fontsize=8)
    ax1.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(str(path), format="png", metadata={"Software": None})


_rel = _common.rel


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/dtml_ablation.py", *(a for a in given if a not in ("--report-only", "--resume", "--no-docs"))])
    out = Path(args.out)
    cfg = config_of(args)
    runs = _common.read_runs(out, cfg)
    if args.report_only:
        print(write_report(args, runs, command))
        return
    if not args.resume:
        runs = _common.start_afresh(out)
    t = time.perf_counter()
    data = load_data(args)
    print(f"data: {len(data['train'])} training ({data['n_lab']} labelled), {len(data['test'])} test volumes "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    done = {(r["arm"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for arm in args.arms:
            if (arm, seed) in done:
                continue
            t = time.perf_counter()
            r = run_arm(arm, seed, data, args)
            r["config"] = cfg
            runs.append(r)
            _common.append_run(out, r)
            s = summarise([r])[arm]
            print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}: Dice {s['dice'][0]:.4f} Jaccard {s['jaccard'][0]:.4f} "
                  f"ASD {s['asd'][0]:.2f} 95HD {s['hd95'][0]:.2f} loss {r['loss_last']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
            write_report(args, runs, command)
    print(write_report(args, runs, command))


if __name__ == "__main__":
    main()
