"""DTML cost benchmark (issue 15 acceptance), CPU, one thread.

1. Training: one iteration of :class:`partialseg.engines.dtml.DTMLTrainer` (M_s and M_d forward on
   the 4 volumes of a 2 labelled + 2 unlabelled batch, :class:`partialseg.losses.dtml.DTMLLoss`
   with L_seg, L_mask and L_con, one backward, both SGD steps) against one iteration of MONAI's
   ``SupervisedTrainer`` training M_s alone on the same 4 volumes (0.5 (BCE + Dice), SGD).
   Target: <= 2.2x (two networks of the same backbone cost about 2x; the rest is the loss).
2. Inference: M_s alone through :class:`partialseg.networks.dtml.DTMLPredictor` (sigmoid) in MONAI's
   ``SlidingWindowInferer`` against the bare M_s in the same inferer followed by a sigmoid of the
   blended logits (checked first: the predictor's output equals the sigmoid applied window by
   window). Target: <= 1.05x.

The trainers' real ``_iteration`` methods are called on prepared batches (no data loading), the
sides interleaved in one process (ABAB...), and each ratio is a ratio of medians. Results go to
``benchmarks/results/dtml_cpu.json`` and the "## dtml: cost on CPU (one thread)" section of
``docs/results.md``.

Backbones: ``small`` (the CPU-sized UNet of the ablation, channels 8-64), ``unet16`` (MONAI UNet
16-128, a CPU-sized bundle backbone) and ``vnet`` (MONAI VNet at the paper's width, 16 filters;
its crop must be a multiple of 16).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/dtml_speed.py [--repeats 7] [--backbones small unet16 vnet] [--crop 48 48 32]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by file path
import _common  # noqa: E402
SECTION = "## dtml: cost on CPU (one thread)"


def backbone(name: str):
    from monai.networks.nets import UNet, VNet

    if name == "small":
        return UNet(3, 1, 1, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1, norm="batch")
    if name == "unet16":
        return UNet(3, 1, 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1, norm="batch")
    if name == "vnet":
        return VNet(3, 1, 1)
    raise ValueError(f"unknown backbone {name!r}")


def interleaved(*fns, repeats: int, warmup: int = 2, detail: list | None = None) -> list[float]:
    """Median seconds of each function, called in turn (ABAB...); ``detail``: CPU time and page faults (``_common``)."""
    return _common.interleaved(*fns, repeats=repeats, warmup=warmup, detail=detail)


class SegLoss(torch.nn.Module):
    """0.5 (BCE + Dice), squared denominators pooled over the batch, on the foreground channel."""

    def forward(self, logits, label):
        y = label[:, 1:]
        p = torch.sigmoid(logits)
        dice = 1.0 - (2.0 * (p * y).sum() + 1e-5) / ((p * p).sum() + (y * y).sum() + 1e-5)
        return 0.5 * (torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + dice)


def bench_training(name: str, crop, repeats: int) -> dict:
    from monai.engines import SupervisedTrainer

    from partialseg.engines.dtml import DTMLTrainer
    from partialseg.losses.dtml import DTMLLoss
    from partialseg.networks.dtml import SignedDistanceNet

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 1, *crop, generator=g)
    fg = (torch.rand(4, 1, *crop, generator=g) > 0.7).float()
    onehot = torch.cat([1 - fg, fg], 1)
    partial = onehot.clone()
    partial[2:] = 0.5  # the two unlabelled volumes: every class unknown (the <0,p,1> map)
    seg, sdm = backbone(name), SignedDistanceNet(backbone(name))
    plain = backbone(name)
    sgd = lambda net: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    dtml_batch = {"image": image, "label": partial}
    sup_batch = {"image": image, "label": onehot}
    dtml = DTMLTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[dtml_batch], seg_network=seg, sdm_network=sdm,
                       seg_optimizer=sgd(seg), sdm_optimizer=sgd(sdm), loss_function=DTMLLoss(), decollate=False)
    sup = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[sup_batch], network=plain,
                            optimizer=sgd(plain), loss_function=SegLoss(), decollate=False)
    step = {"i": 0}

    def run_dtml():
        step["i"] += 1
        dtml.state.iteration = 1000 + step["i"]  # past the ramp's start: L_con weighted
        out = dtml._iteration(dtml, dtml_batch)
        assert float(out["con_weight"]) > 0
        return out

    def run_sup():
        return sup._iteration(sup, sup_batch)

    detail: list[dict] = []
    t_dtml, t_sup = interleaved(run_dtml, run_sup, repeats=repeats, detail=detail)
    return {"backbone": name, "crop": list(crop), "batch": 4, "dtml_iteration_s": t_dtml, "supervised_iteration_s": t_sup,
            "ratio": t_dtml / t_sup, "target": 2.2, "cpu_ratio": detail[0]["cpu_s"] / detail[1]["cpu_s"],
            "dtml": detail[0], "supervised": detail[1]}


def bench_inference(name: str, size, roi, repeats: int) -> dict:
    from monai.inferers import SlidingWindowInferer

    from partialseg.networks.dtml import DTMLPredictor

    torch.manual_seed(0)
    seg = backbone(name).eval()
    predictor = DTMLPredictor(seg).eval()
    inferer = SlidingWindowInferer(tuple(roi), sw_batch_size=4, overlap=0.5, mode="gaussian")
    x = torch.randn(1, 1, *size)

    def run_predictor():
        with torch.no_grad():
            return inferer(x, predictor)

    def run_bare():
        with torch.no_grad():
            return torch.sigmoid(inferer(x, seg))

    with torch.no_grad():  # DTMLPredictor(M_s) is sigmoid(M_s) window by window
        same = inferer(x, lambda z: torch.sigmoid(seg(z)))
    a, b = run_predictor(), run_bare()
    assert a.shape == b.shape == same.shape and torch.allclose(a, same, atol=1e-5), "DTMLPredictor(M_s) must be sigmoid(M_s)"
    t_pred, t_bare = interleaved(run_predictor, run_bare, repeats=repeats)
    return {"backbone": name, "size": list(size), "roi": list(roi), "predictor_s": t_pred, "bare_s": t_bare,
            "ratio": t_pred / t_bare, "target": 1.05}


def report(results: dict, command: str) -> str:
    alloc = " glibc told to keep freed memory (`--malloc retain`)," if results.get("malloc") == "retain" else ""
    lines = [SECTION, "", f"Command: `{command}` (results: `{results.get('out', 'benchmarks/results/dtml_cpu.json')}`); medians of "
             f"{results['repeats']} interleaved repeats, torch {results['torch']},{alloc} one thread on a CPU shared with other jobs"
             f" (load {results.get('load', '?')}).", "",
             "| measurement | backbone | shape | DTML | baseline | ratio | target |", "|---|---|---|---|---|---|---|"]
    ok = lambda r: f"**{r['ratio']:.2f}x**" if r["ratio"] <= r["target"] else f"{r['ratio']:.2f}x"
    for r in results["training"]:
        lines.append(f"| training: DTMLTrainer iteration (M_s + M_d, 2 labelled + 2 unlabelled) vs SupervisedTrainer M_s on the "
                     f"same 4 volumes | {r['backbone']} | 4 x {' x '.join(map(str, r['crop']))} | {r['dtml_iteration_s'] * 1e3:.0f} ms | "
                     f"{r['supervised_iteration_s'] * 1e3:.0f} ms | {ok(r)} | <= {r['target']}x |")
    for r in results["inference"]:
        lines.append(f"| inference: DTMLPredictor(M_s) vs bare M_s + sigmoid, sliding windows {' x '.join(map(str, r['roi']))} | "
                     f"{r['backbone']} | {' x '.join(map(str, r['size']))} | {r['predictor_s'] * 1e3:.0f} ms | {r['bare_s'] * 1e3:.0f} ms | "
                     f"{ok(r)} | <= {r['target']}x |")
    lines += ["", "Bold: within the target."]
    if results["training"]:
        lines += ["", "Training, process CPU time instead of wall time: " + ", ".join(
            f"{r['backbone']} {r['cpu_ratio']:.2f}x" for r in results["training"]) + "; minor page faults per iteration (DTML / "
            "supervised): " + ", ".join(f"{r['backbone']} {r['dtml']['minor_faults']:.0f} / {r['supervised']['minor_faults']:.0f}"
                                        for r in results["training"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backbones", nargs="+", choices=["small", "unet16", "vnet"], default=["small", "unet16", "vnet"])
    ap.add_argument("--crop", type=int, nargs=3, default=[48, 48, 32], help="training crop and sliding window (multiples of 16 for vnet)")
    ap.add_argument("--size", type=int, nargs=3, default=[64, 64, 48], help="inference volume")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dtml_cpu.json"))
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--malloc", choices=["default", "retain"], default="default",
                    help="'retain': glibc keeps freed memory (no heap trimming, no mmap for large blocks) for the whole "
                         "process, both sides alike; see retain_freed_memory")
    ap.add_argument("--skip-inference", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _common.set_malloc(args.malloc)
    load = None
    if hasattr(__import__("os"), "getloadavg"):
        load = " / ".join(f"{v:.1f}" for v in __import__("os").getloadavg())
    results = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
               "repeats": args.repeats, "malloc": args.malloc, "load": load, "out": str(Path(args.out).resolve().relative_to(ROOT))
               if Path(args.out).resolve().is_relative_to(ROOT) else args.out, "training": [], "inference": []}
    for name in args.backbones:
        r = bench_training(name, args.crop, args.repeats)
        results["training"].append(r)
        print(f"[{name}] training 4 x {args.crop}: DTML {r['dtml_iteration_s'] * 1e3:.0f} ms, supervised M_s "
              f"{r['supervised_iteration_s'] * 1e3:.0f} ms: {r['ratio']:.3f}x (target <= 2.2); CPU time {r['cpu_ratio']:.3f}x; "
              f"minor page faults per iteration {r['dtml']['minor_faults']:.0f} vs {r['supervised']['minor_faults']:.0f}", flush=True)
    for name in [] if args.skip_inference else args.backbones:
        r = bench_inference(name, args.size, args.crop, args.repeats)
        results["inference"].append(r)
        print(f"[{name}] inference {args.size} (windows {args.crop}): DTMLPredictor {r['predictor_s'] * 1e3:.0f} ms, bare "
              f"{r['bare_s'] * 1e3:.0f} ms: {r['ratio']:.3f}x (target <= 1.05)", flush=True)
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/dtml_speed.py", *(sys.argv[1:] if argv is None else argv)])
    _common.save_report(results, args.out, report(results, command), SECTION, docs=not args.no_docs)


if __name__ == "__main__":
    main()
