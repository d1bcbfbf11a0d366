"""DCL ablation (the paper's Table 2 and Table 4) on the synthetic ``cardiac2d`` benchmark.

Every arm trains the same 2D MONAI UNet backbone (CompNet arms: the same UNet with the packed
conditional input) with the same budget: ``--iters1`` iterations with Adam at ``--lr1`` then
``--iters2`` iterations with a fresh Adam at ``--lr2`` (DCL's stage 1 / stage 2 schedule; the
second phase starts from the best-validation weights of the first), batch ``--batch``,
validation every ``--val-every`` iterations, the best-validation weights tested.

Arms (``m = 4`` classes: background, LV, MYO, RV; ``variant="wholeheart"``: a quarter of the
training images annotate LV, MYO, RV or the whole heart = background, one structure per image):

- ``1_ce``        ordinary CE, unknown pixels as background (UNet)
- ``2_pos_ce``    positive CE only, Eq. 11 (UNet, ``CompatibleLoss("ce", None)``)
- ``3_comp``      compatible loss, Eq. 2 / 6 (UNet, ``CompatibleLoss("ce", "ce")``)
- ``4_cond``      + conditional images (CompNet, ``ConditionalCompatibleLoss(prior_weight=0)``)
- ``5_prior``     + prior loss (``ConditionalCompatibleLoss``, Eq. 8)
- ``6_dual``      + dual closed loop in the second phase (``lambda = 0.2``, Eq. 10)
- ``full_all``    fully supervised on all training images (UNet, CE on one-hot labels)
- ``full_quarter`` fully supervised on 1/4 of the images (first quarter of the subjects)
- ``dcl_cedice``  DCL (as ``6_dual``) with the CE + Dice bases
- ``dcl_mmee``    DCL with the MMEE bases (target-adaptive CE/Dice + exclusion CE/Dice)

The trainers are partialseg's (``DCLTrainer`` for the CompNet arms, MONAI's
``SupervisedTrainer`` otherwise); ``DualNetworkUpdater`` refreshes DualNet on validation
improvement. CompNet arms are validated with ``ConditionalInferer`` (K = 1) and tested with K =
``--k-test`` conditional sets from a ``SupportBank`` of training cases. Test Dice per structure
and phase (ED / ES) on the 16 test slices, mean and std over seeds.

Every finished (arm, seed) is appended to ``benchmarks/results/dcl_ablation_runs.jsonl`` and the
table is rewritten (``benchmarks/results/dcl_ablation.md`` and the "## dcl: ablation on
cardiac2d" section of ``docs/results.md``), so an interrupted run keeps what it finished;
``--resume`` skips runs already in the JSONL file (same configuration).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/dcl_ablation.py            # the documented run
    OMP_NUM_THREADS=1 python benchmarks/dcl_ablation.py --quick    # smoke run (minutes)
    python benchmarks/dcl_ablation.py --report-only                # rewrite the table from the JSONL
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by file path
import _common  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
SECTION = "## dcl: ablation on cardiac2d"
STACK_SECTION = "## dcl: ablation on cardiac2d stacks (base to apex)"
CLASSES = ["background", "LV", "MYO", "RV"]
ARMS = ["1_ce", "2_pos_ce", "3_comp", "4_cond", "5_prior", "6_dual", "full_all", "full_quarter", "dcl_cedice", "dcl_mmee",
        "5m_prior_maps", "6m_dual_maps"]
#: the arms the issue asks for; the "m" arms are an investigation (see the verdict in docs/results.md)
MAIN_ARMS = ARMS[:10]
LABELS = {
    "1_ce": "#1 CE, unknown = background (UNet)",
    "2_pos_ce": "#2 positive CE, Eq. 11 (UNet)",
    "3_comp": "#3 compatible loss L_comp (UNet)",
    "4_cond": "#4 + conditional images (CompNet)",
    "5_prior": "#5 + prior loss (L_cc)",
    "6_dual": "#6 + dual (DCL_ce)",
    "full_all": "UNet_F, all images fully labelled",
    "full_quarter": "UNet_F, 1/4 of the images fully labelled",
    "dcl_cedice": "DCL, CE+Dice bases",
    "dcl_mmee": "DCL, MMEE bases",
    "5m_prior_maps": "(investigation) #5 with L_comp on the 2m maps",
    "6m_dual_maps": "(investigation) #6 with L_comp on the 2m maps",
}
CONDITIONAL = {"4_cond", "5_prior", "6_dual", "dcl_cedice", "dcl_mmee", "5m_prior_maps", "6m_dual_maps"}
DUAL = {"6_dual", "dcl_cedice", "dcl_mmee", "6m_dual_maps"}
#: arms sharing their first phase with another arm (same loss, same seed): arm -> the arm that trains it
SHARED_PHASE1 = {"5_prior": "5_prior", "6_dual": "5_prior", "5m_prior_maps": "5m_prior_maps", "6m_dual_maps": "5m_prior_maps"}
BASES = {"dcl_cedice": (("ce", "dice"), ("ce", "dice")), "dcl_mmee": (("ta_ce", "ta_dice"), ("ex_ce", "ex_dice"))}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--num-train", type=int, default=24, help="training subjects (x2 phases)")
    ap.add_argument("--num-val", type=int, default=4)
    ap.add_argument("--num-test", type=int, default=8)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=MAIN_ARMS, choices=ARMS)
    ap.add_argument("--iters1", type=int, default=500)
    ap.add_argument("--iters2", type=int, default=250)
    ap.add_argument("--lr1", type=float, default=1e-2)
    ap.add_argument("--lr2", type=float, default=1e-4)
    ap.add_argument("--lambda-dual", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--k-test", type=int, default=3)
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--levels", type=int, default=0,
                    help="cardiac2d stack mode (make-data --levels): N slice levels base to apex per phase; the "
                         "default 0 is the original mid-ventricular benchmark. With N > 0 the results go to "
                         "benchmarks/results/dcl_stack_* and the '## dcl: ablation on cardiac2d stacks' section")
    ap.add_argument("--pools", choices=("present", "annotated"), default=None,
                    help="ConditionalDataset / SupportBank pools (default: the library's)")
    ap.add_argument("--select", choices=("random", "similar"), default=None,
                    help="condition selection in training and at inference (default: the library's)")
    ap.add_argument("--support-per-class", type=int, default=None, help="SupportBank entries per class (default 4; 0 = all)")
    ap.add_argument("--neighbours", type=int, default=None, help="ConditionalDataset neighbours of select='similar' (default: the library's)")
    ap.add_argument("--tag", default="", help="a label stored with the runs (an investigation setting)")
    ap.add_argument("--diagnostics", action="store_true",
                    help="CompNet arms: also score other inference settings (K, pools, selection; always on with --levels)")
    ap.add_argument("--data-dir", default="/tmp/partialseg_dcl_ablation")
    ap.add_argument("--out", default=None, help="JSONL of the runs (default benchmarks/results/dcl_ablation_runs.jsonl, "
                                                "dcl_stack_runs.jsonl with --levels)")
    ap.add_argument("--report", default=None, help="the table (Markdown) written after every run (default "
                                                   "benchmarks/results/dcl_ablation.md, dcl_stack.md with --levels)")
    ap.add_argument("--verdict", default=None,
                    help="Markdown appended under the table (default: benchmarks/results/dcl_ablation_verdict.md for the main study's report)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: 2 arms of each kind, few iterations")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-docs", action="store_true", help="don't touch docs/results.md (a study with its own --report never does)")
    args = ap.parse_args(argv)
    stem = "dcl_stack" if args.levels else "dcl_ablation"
    args.out = args.out or str(RESULTS / f"{stem}_runs.jsonl")
    args.report = args.report or str(RESULTS / f"{stem}.md")
    if args.quick:
        args.size, args.num_train, args.num_val, args.num_test = 32, 4, 1, 1
        args.iters1, args.iters2, args.val_every, args.seeds = 20, 10, 10, [0]
        args.out = "/tmp/partialseg_dcl_ablation_quick.jsonl"
        args.data_dir = "/tmp/partialseg_dcl_ablation_quick"
        args.no_docs = True
    for name in ("iters1", "iters2"):
        if getattr(args, name) % args.val_every:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be a multiple of --val-every {args.val_every}")
    return args


def config_of(args) -> dict:
    keys = ("size", "num_train", "num_val", "num_test", "data_seed", "iters1", "iters2", "lr1", "lr2", "lambda_dual",
            "batch", "val_every", "k_test", "channels")
    cfg = {k: getattr(args, k) for k in keys}
    # keys added later are stored only when set, so the runs of earlier versions keep matching
    for k in ("levels", "pools", "select", "support_per_class", "neighbours", "tag"):
        if getattr(args, k):
            cfg[k] = getattr(args, k)
    return cfg


# ----------------------------------------------------------------------------------------- data


def load_data(args):
    """Training cases (partial labels + regenerated full ground truth), validation and test cases."""
    import nibabel as nib

    from partialseg.data import ensure_dataset, load_dataset
    from partialseg.data.synthetic import _common as C
    from partialseg.data.synthetic import cardiac
    from partialseg.transforms import PartialLabelToVector

    levels = f"_L{args.levels}" if args.levels else ""
    root = Path(args.data_dir) / f"cardiac2d_s{args.size}_n{args.num_train}_v{args.num_val}_t{args.num_test}_seed{args.data_seed}{levels}"
    ensure_dataset(root, "cardiac2d", seed=args.data_seed, size=args.size, num_train=args.num_train, num_val=args.num_val,
                   num_test=args.num_test, variant="wholeheart", **({"levels": args.levels} if args.levels else {}))
    ds = load_dataset(root)
    to_vec = PartialLabelToVector(len(CLASSES))

    def read(path):
        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)

    def norm(img):
        return torch.from_numpy((img - img.mean()) / (img.std() + 1e-6))[None].float()

    shape = (args.size, args.size)
    full = {}
    if args.levels:  # stack mode: every level and phase of a subject from one stream, as make-data renders them
        for subj in range(args.num_train):
            rng = C.case_rng(args.data_seed, "cardiac2d", "training", subj)
            params, positions = cardiac.sample_stack(cardiac.sample_subject(rng, shape),
                                                     cardiac.stack_rng(args.data_seed, "training", subj), args.levels)
            for k, level in enumerate(positions):
                for phase in cardiac.PHASES:
                    image, gt, _ = cardiac.render_case(params, phase, rng, shape, level=level)
                    full[f"sub{subj:03d}_L{k}_{phase}"] = (image, gt)
    splits = {}
    for split in ("training", "validation", "test"):
        cases = []
        for i, c in enumerate(ds.datalist(split)):
            raw = read(c["image"])
            lab = read(c["label"]).astype(np.int64)
            case = {"image": norm(raw), "name": c["case"], "phase": c.get("phase"), "annotated": c["annotated"], "level": c.get("level")}
            case["label"] = torch.as_tensor(to_vec(lab[None], c["annotated"]))  # <0,p,1> map (4, H, W)
            if split == "training":
                # full ground truth of the training slice, regenerated by the generator's own code
                if args.levels:
                    image, gt = full[Path(c["image"]).name.split(".")[0]]
                else:
                    subj, p = divmod(i, 2)
                    rng = C.case_rng(args.data_seed, "cardiac2d", "training", subj)
                    params = cardiac.sample_subject(rng, shape)
                    for phase in cardiac.PHASES:  # the generator renders ED then ES from one stream
                        image, gt, _ = cardiac.render_case(params, phase, rng, shape)
                        if phase == c["phase"]:
                            break
                if not np.array_equal(C.to_int16(image, 1000.0), raw.astype(np.int16)):
                    raise RuntimeError(f"regenerated training image {c['case']} differs from the stored one")
                case["full"] = torch.as_tensor(to_vec(gt[None].astype(np.int64), "all"))
            else:
                case["gt"] = torch.from_numpy(lab)
            cases.append(case)
        splits[split] = cases
    return splits


# ----------------------------------------------------------------------------------------- arms


def make_unet(args, in_channels, out_channels):
    from monai.networks.nets import UNet

    return UNet(2, in_channels, out_channels, channels=tuple(args.channels), strides=(2,) * (len(args.channels) - 1),
                num_res_units=1, norm="instance")


class HardCE(torch.nn.Module):
    """Ordinary CE on the hard label: an annotated class where the map has a 1, else background."""

    def forward(self, logits, target):
        hard = (target == 1).float().argmax(1)  # no 1 in the column (unknown) -> 0 = background
        return torch.nn.functional.cross_entropy(logits, hard)


def build(arm, args):
    from partialseg.losses import CompatibleLoss, ConditionalCompatibleLoss
    from partialseg.networks import CompNet

    m = len(CLASSES)
    if arm in CONDITIONAL:
        pos, neg = BASES.get(arm, ("ce", "ce"))
        net = CompNet(2, 1, m, backbone=lambda spatial_dims, in_channels, out_channels: make_unet(args, in_channels, out_channels))
        # the investigation arms read Eq. 6 per map (L_comp on the 2m maps against z, + L_prior)
        reading = "maps" if arm in ("5m_prior_maps", "6m_dual_maps") else "sum"
        loss = ConditionalCompatibleLoss(pos, neg, prior_weight=0.0 if arm == "4_cond" else 1.0, reading=reading)
        return net, loss
    net = make_unet(args, 1, m)
    if arm == "1_ce":
        return net, HardCE()
    if arm == "2_pos_ce":
        return net, CompatibleLoss("ce", None)
    return net, CompatibleLoss("ce", "ce")  # 3_comp and the fully supervised references (one-hot targets)


def training_cases(arm, splits, args):
    """(cases with ``image`` and the ``<0,p,1>`` ``label``, their annotated classes)."""
    train = splits["training"]
    if arm in ("full_all", "full_quarter"):
        train = train if arm == "full_all" else train[: max(1, len(train) // 4)]
        return [{"image": c["image"], "label": c["full"]} for c in train], ["all"] * len(train)
    return [{"image": c["image"], "label": c["label"]} for c in train], [c["annotated"] for c in train]


def dice_per_class(pred: torch.Tensor, gt: torch.Tensor, m: int) -> list[float]:
    out = []
    for j in range(1, m):
        p, g = pred == j, gt == j
        denom = int(p.sum() + g.sum())
        out.append(1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom)
    return out


def training_loader(dataset, seed: int, phase: int, batch: int, val_every: int):
    """The training loader of one phase: one pass over it is one validation epoch (``val_every`` batches).

    Slices are drawn with replacement from ``torch.Generator().manual_seed(seed * 1000 + phase)``;
    the generator carries over from pass to pass, so the phase sees the index sequence of one
    long pass of ``iterations * batch`` draws (the loader before, same indices). A pass is where
    ``DCLTrainer`` gives the ``ConditionalDataset`` new conditional draws (``set_epoch(epoch, 0)``
    when the loader's iterator is created, since df0df31): with one pass for the whole phase every
    slice kept its first draw for all 500 + 250 iterations (both phases, the same draws),
    where the recorded table (e92d6f7) drew anew every epoch, as this loader does again.

    Example:
        >>> loader = training_loader(list(range(48)), seed=0, phase=1, batch=8, val_every=50)
        >>> len(loader), len(list(loader.sampler))
        (50, 400)
    """
    from monai.data import DataLoader

    g = torch.Generator().manual_seed(seed * 1000 + phase)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=val_every * batch, generator=g)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=0)


def run_arm(arm, seed, splits, args, phase1_cache: dict) -> dict:
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import MeanDice, ValidationHandler, from_engine
    from monai.inferers import SimpleInferer
    from monai.transforms import AsDiscreted
    from ignite.engine import Events

    from partialseg.data.dcl import ConditionalDataset
    from partialseg.engines import DCLTrainer, DualNetworkUpdater
    from partialseg.data.dcl import SupportBank
    from partialseg.inferers import ConditionalInferer

    m = len(CLASSES)
    cond = arm in CONDITIONAL
    cases, annotated = training_cases(arm, splits, args)
    torch.manual_seed(seed)
    np.random.seed(seed)
    net, loss = build(arm, args)
    if cond:
        lib = {k: getattr(args, k) for k in ("pools", "select", "neighbours") if getattr(args, k)}
        dataset = ConditionalDataset(cases, m, annotated=annotated, seed=seed, **lib)
        per_class = args.support_per_class if args.support_per_class is not None else (0 if args.select == "similar" else 4)
        bank = SupportBank.from_dataset(cases, m, annotated=annotated, per_class=per_class, seed=seed,
                                        **({"pools": args.pools} if args.pools else {}))
        infer_select = {"select": args.select} if args.select else {}
        val_inferer = ConditionalInferer(bank, num_samples=1, seed=seed, **infer_select)
    else:
        dataset, bank, val_inferer = cases, None, SimpleInferer()
    val_data = [{"image": c["image"], "label": torch.nn.functional.one_hot(c["gt"], m).permute(2, 0, 1).float()} for c in splits["validation"]]
    val_loader = DataLoader(val_data, batch_size=len(val_data), shuffle=False, num_workers=0)

    best = {"state": copy.deepcopy(net.state_dict()), "metric": -1.0}

    val_curve: list[float] = []

    def keep_best(engine):
        val_curve.append(float(engine.state.metrics["val_mean_dice"]))
        if engine.state.best_metric > best["metric"] and engine.state.best_metric_epoch == engine.state.epoch:
            best["metric"] = float(engine.state.best_metric)
            best["state"] = copy.deepcopy(net.state_dict())

    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=val_loader, network=net, inferer=val_inferer,
        postprocessing=AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[m, None]),
        key_val_metric={"val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
    )
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, keep_best)

    def trainer(phase, lam):
        lr = args.lr1 if phase == 1 else args.lr2
        opt = torch.optim.Adam(net.parameters(), lr)
        iters = args.iters1 if phase == 1 else args.iters2
        common = dict(device="cpu", max_epochs=iters // args.val_every, epoch_length=args.val_every,
                      train_data_loader=training_loader(dataset, seed, phase, args.batch, args.val_every), network=net, optimizer=opt, loss_function=loss,
                      train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True)])
        if cond:
            t = DCLTrainer(lambda_dual=lam, seed=seed, **common)
        else:
            t = SupervisedTrainer(**common)
        losses = []
        t.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"] if isinstance(e.state.output, list) else e.state.output["loss"])))
        return t, losses

    t0 = time.perf_counter()
    lam = args.lambda_dual if arm in DUAL else 0.0
    shared = arm in SHARED_PHASE1  # #5 and #6 share their first phase (same loss, same seed)
    key = (seed, SHARED_PHASE1.get(arm))
    if shared and key in phase1_cache:
        c = phase1_cache[key]
        net.load_state_dict(c["final"])
        best.update(state=copy.deepcopy(c["best_state"]), metric=c["best_metric"])
        loss1, t1 = c["loss1"], c["time1"]
    else:
        tr1, loss1 = trainer(1, 0.0)
        tr1.run()
        t1 = time.perf_counter() - t0
        if shared:
            phase1_cache[key] = {"final": copy.deepcopy(net.state_dict()), "best_state": copy.deepcopy(best["state"]),
                                 "best_metric": best["metric"], "loss1": loss1, "time1": t1}
    # phase 2 starts from the best phase-1 weights (the bundle's stage-1 checkpoint)
    net.load_state_dict(best["state"])
    t2s = time.perf_counter()
    tr2, loss2 = trainer(2, lam)
    # phase 2 must beat the best phase-1 validation (best_metric_epoch -1 would accept anything);
    # the evaluator's epoch counter restarts with each trainer, 0 is never a validation epoch
    evaluator.state.best_metric_epoch = 0
    evaluator.state.best_metric = best["metric"]
    if cond and lam > 0:
        updater = DualNetworkUpdater(tr2)
        updater(evaluator)  # DualNet = the phase-1 PrimNet (Algorithm 1, line 8); later: only on improvement
        updater.attach(evaluator)
    tr2.run()
    t2 = time.perf_counter() - t2s
    refreshes = list(getattr(tr2, "dual_refreshes", []))

    # test with the best-validation weights
    net.load_state_dict(best["state"])
    net.eval()
    inferer = ConditionalInferer(bank, num_samples=args.k_test, seed=seed, **infer_select) if cond else SimpleInferer()
    per_case = []
    with torch.no_grad():
        for c in splits["test"]:
            out = inferer(c["image"][None], net)
            pred = out.argmax(1)[0]
            per_case.append({"case": c["name"], "phase": c["phase"], "level": c.get("level"), "dice": dice_per_class(pred, c["gt"], m)})
    extra = inference_variants(net, cases, annotated, splits, seed, args) if cond and (args.levels or args.diagnostics) else {}
    return {"arm": arm, "seed": seed, "per_case": per_case, "extra": extra, "val_best": best["metric"], "loss1": loss1[:: max(1, len(loss1) // 50)],
            "loss2": loss2[:: max(1, len(loss2) // 25)], "time_phase1_s": t1, "time_phase2_s": t2, "dual_refreshes": refreshes,
            "val_curve": val_curve}


def inference_variants(net, cases, annotated, splits, seed, args) -> dict:
    """Mean test Dice of a trained CompNet under other inference settings (the stack study's diagnostics).

    ``K{k}_{pools}_{select}``: K sets from a bank of that pool / selection (``random``: 4 entries
    per class; ``similar``: every case); ``own_label``: the target's own image and ground truth
    as its only condition (an upper bound: how well the network copies a matching condition);
    ``train_full``: the training slices, scored on their full labels (K = 3, the arm's bank).
    """
    from partialseg.data.dcl import SupportBank
    from partialseg.inferers import ConditionalInferer

    m = len(CLASSES)

    def score(inferer, items, key):
        vals = []
        with torch.no_grad():
            for c in items:
                gt = c[key] if key == "gt" else c[key].argmax(0)
                vals.append(float(np.mean(dice_per_class(inferer(c["image"][None], net).argmax(1)[0], gt, m))))
        return float(np.mean(vals))

    out = {}
    for pools in ("annotated", "present"):
        for select, per_class in (("random", 4), ("similar", 0)):
            bank = SupportBank.from_dataset(cases, m, annotated=annotated, per_class=per_class, seed=seed, pools=pools)
            for k in ((1, 3, 9) if pools == "present" else (3,)):
                out[f"K{k}_{pools}_{select}"] = score(ConditionalInferer(bank, num_samples=k, seed=seed, select=select), splits["test"], "gt")
    own = []
    with torch.no_grad():
        for c in splits["test"]:
            onehot = torch.nn.functional.one_hot(c["gt"], m).permute(2, 0, 1).float()
            bank = SupportBank(c["image"][None].expand(m, -1, -1, -1), onehot, torch.arange(m), m)
            pred = ConditionalInferer(bank)(c["image"][None], net).argmax(1)[0]
            own.append(float(np.mean(dice_per_class(pred, c["gt"], m))))
    out["own_label"] = float(np.mean(own))
    bank = SupportBank.from_dataset(cases, m, annotated=annotated, per_class=4, seed=seed,
                                    **({"pools": args.pools} if args.pools else {}))
    train = [{"image": c["image"], "full": c["full"]} for c in splits["training"]]
    out["train_full"] = score(ConditionalInferer(bank, num_samples=3, seed=seed), train, "full")
    return out


# ----------------------------------------------------------------------------------------- report


def summarise(runs: list[dict]) -> dict:
    """arm -> {"cols": {(phase, class): (mean, std over seeds)}, "avg": (mean, std), "n": seeds}."""
    out = {}
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        cols, avgs = {}, []
        per_seed_cols: dict = {}
        for r in rs:
            vals = []
            for phase in ("ED", "ES"):
                for j, cls in enumerate(CLASSES[1:]):
                    v = float(np.mean([c["dice"][j] for c in r["per_case"] if c["phase"] == phase]))
                    per_seed_cols.setdefault((phase, cls), []).append(v)
                    vals.append(v)
            avgs.append(float(np.mean(vals)))
        for k, v in per_seed_cols.items():
            cols[k] = (float(np.mean(v)), float(np.std(v)))
        out[arm] = {"cols": cols, "avg": (float(np.mean(avgs)), float(np.std(avgs))), "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                    "time": float(np.mean([r["time_phase1_s"] + r["time_phase2_s"] for r in rs]))}
    return out


def table(summary: dict) -> str:
    head = "| arm | seeds | ED LV | ED MYO | ED RV | ES LV | ES MYO | ES RV | avg | wall s |\n|---|---|---|---|---|---|---|---|---|---|\n"
    rows = []
    for arm, s in summary.items():
        cells = [f"{s['cols'][(ph, c)][0]:.3f}±{s['cols'][(ph, c)][1]:.3f}" for ph in ("ED", "ES") for c in CLASSES[1:]]
        rows.append(f"| {LABELS[arm]} | {s['n']} | " + " | ".join(cells) + f" | **{s['avg'][0]:.3f}**±{s['avg'][1]:.3f} | {s['time']:.0f} |")
    return head + "\n".join(rows) + "\n"


def write_report(args, runs, command, verdict: str | None = None) -> str:
    summary = summarise(runs)
    cfg = config_of(args)
    done = {(r["arm"], r["seed"]) for r in runs}
    expected = {(a, s) for a in args.arms for s in args.seeds}
    status = "complete" if expected <= done else f"PARTIAL: {len(done & expected)} of {len(expected)} (arm, seed) runs finished"
    per = 2 * max(1, args.levels)
    stack = (f" in stack mode (`levels={args.levels}`: {args.levels} slice levels base to apex per phase; apical slices "
             f"lack the RV, and an LV or RV case there has an empty label)") if args.levels else ""
    lib = "".join(f", {k} = {cfg[k]}" for k in ("pools", "select", "support_per_class", "neighbours", "tag") if k in cfg)
    text = (
        f"{STACK_SECTION if args.levels else SECTION}\n\n"
        f"Command (one CPU thread): `{command}`\n\n"
        f"Synthetic `cardiac2d` (`variant=\"wholeheart\"`, data seed {cfg['data_seed']}){stack}, {cfg['size']} x {cfg['size']} px, "
        f"{per * cfg['num_train']} training slices (one structure each: LV, MYO, RV or whole heart, a quarter each), "
        f"{per * cfg['num_val']} fully labelled validation and {per * cfg['num_test']} test slices (ED + ES){lib}. "
        f"Same UNet backbone (channels {cfg['channels']}, instance norm) and budget for every arm: "
        f"{cfg['iters1']} iterations Adam lr {cfg['lr1']:g}, then {cfg['iters2']} iterations Adam lr {cfg['lr2']:g} "
        f"from the best-validation weights, batch {cfg['batch']}, validation every {cfg['val_every']} iterations, "
        f"best-validation weights tested; CompNet arms tested with K = {cfg['k_test']} conditional sets; "
        f"dual arms use lambda = {cfg['lambda_dual']} in the second phase. Test Dice, mean ± std over seeds {sorted(args.seeds)}. "
        f"Status: {status}. Raw runs: `{_rel(args.out)}`.\n\n"
        + table(summary)
    )
    if verdict:
        text += "\n" + verdict.strip() + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        Path(args.report).write_text(text)
    if not args.no_docs and Path(args.report).resolve() == (RESULTS / "dcl_ablation.md").resolve():  # only the main study
        _common.update_results_md(text, header=SECTION)
    if not args.no_docs and Path(args.report).resolve() == (RESULTS / "dcl_stack.md").resolve():  # the stack study
        _common.update_results_md(text, header=STACK_SECTION)
    return text


_rel = _common.rel


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/dcl_ablation.py", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out)
    cfg = config_of(args)
    runs = _common.read_runs(out, cfg)
    main_report = Path(args.report).resolve() in ((RESULTS / "dcl_ablation.md").resolve(), (RESULTS / "dcl_stack.md").resolve())
    stem = "dcl_stack" if args.levels else "dcl_ablation"
    verdict_path = Path(args.verdict) if args.verdict else (RESULTS / f"{stem}_verdict.md" if main_report else None)
    verdict = verdict_path.read_text() if verdict_path is not None and verdict_path.is_file() and not args.quick else None
    if args.report_only:
        # the table's command: the run that made the rows, i.e. these arguments without --report-only
        given = sys.argv[1:] if argv is None else list(argv)
        print(write_report(args, runs, " ".join(["OMP_NUM_THREADS=1 python benchmarks/dcl_ablation.py", *(a for a in given if a != "--report-only")]), verdict))
        return
    if not args.resume:
        runs = _common.start_afresh(out)
    splits = load_data(args)
    print(f"data: {len(splits['training'])} training, {len(splits['validation'])} validation, {len(splits['test'])} test slices", flush=True)
    cache: dict = {}
    done = {(r["arm"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for arm in args.arms:
            if (arm, seed) in done:
                continue
            t = time.perf_counter()
            r = run_arm(arm, seed, splits, args, cache)
            r["config"] = cfg
            runs.append(r)
            _common.append_run(out, r)
            s = summarise([r])[arm]
            print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}: avg Dice {s['avg'][0]:.3f} val {r['val_best']:.3f} "
                  f"({time.perf_counter() - t:.0f} s, dual refreshes {r['dual_refreshes']})", flush=True)
            write_report(args, runs, command, verdict)
    print(write_report(args, runs, command, verdict))


if __name__ == "__main__":
    main()
