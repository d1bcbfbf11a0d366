"""DCL cost benchmark (issue 5 acceptance), CPU, one thread.

Each DCL measurement is compared with two baselines, timed in the same interleaved loop:

- **its backbone**: the network CompNet wraps, called alone (the same UNet with CompNet's
  ``C (1 + m) + m`` input channels and ``2m`` outputs) on an already packed input of the same
  size: what the CompNet machinery (conditional draw, packing, the ``2m``-map softmax, ``z_cap +
  z_delta``; for training, the dual task and DualNet) adds to the network it wraps;
- **a plain UNet**: the same UNet as an ordinary ``m``-class segmenter (1 input channel, ``m``
  outputs): what DCL costs over plain supervised segmentation, CompNet's wider first and last
  layers included.

1. Inference: ``ConditionalInferer(bank, num_samples=1)`` running CompNet (softmax over the
   ``2m`` maps, ``z_cap + z_delta``) vs the backbone's forward on the packed input, and vs the
   plain UNet with a softmax through ``SimpleInferer``. Target: <= 1.15x.
2. Training: one stage-2 iteration of ``DCLTrainer`` (PrimNet forward, the dual swap, DualNet
   forward, backward through both into PrimNet, Adam step) vs one iteration of MONAI's
   ``SupervisedTrainer`` (forward, ``CompatibleLoss``, backward, Adam step) on the backbone (the
   packed input, the ``2m``-map supervision ``z``) and on the plain UNet (the image, the ``m``-class
   partial label), same batch size and size. Target: <= 2.5x.

Trainers' real ``_iteration`` methods are called on prepared batches (no data loading), the
sides interleaved in one process (ABCABC...), and each ratio is a ratio of medians. Results go
to ``benchmarks/results/dcl_cpu.json``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/dcl_speed.py [--repeats 15] [--backbones bundle small paper] [--sizes 96 216] [--paper-sizes 224]
    # the stage-2 iteration alone, e.g. to compare two versions of the trainer (PYTHONPATH=<other checkout>):
    OMP_NUM_THREADS=1 python benchmarks/dcl_speed.py --parts training --backbones small bundle --sizes 96 --no-docs --out /tmp/dcl.json

Three backbones: the bundle's UNet (32 base channels); a CPU-sized one (16 base channels, CompNet's
default), where CompNet's wider first and last layers are a large share of the network; and a
UNet of the paper's width (64 base channels), where they are not.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by file path
import _common  # noqa: E402
M = 4
#: backbone presets: the dcl_cardiac bundle's UNet (32 base channels), a CPU-sized one (16, CompNet's
#: library default and the ablation's), and a UNet of the paper's width (UNet+ of Baumgartner et al.,
#: the paper's backbone: 64 base channels, 5 levels, two convolutions per level, batch norm;
#: approximated by MONAI's UNet with 2 residual subunits)
BACKBONES = {
    "bundle": {"channels": (32, 64, 128, 256), "strides": (2, 2, 2), "num_res_units": 1, "norm": "instance"},
    "small": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1, "norm": "instance"},
    "paper": {"channels": (64, 128, 256, 512, 1024), "strides": (2, 2, 2, 2), "num_res_units": 2, "norm": "batch"},
}
BACKBONE = BACKBONES["bundle"]


def unet(in_channels: int, out_channels: int, backbone: dict | None = None):
    from monai.networks.nets import UNet

    return UNet(2, in_channels, out_channels, **(backbone or BACKBONE))


def interleaved(*fns, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each function, called in turn (ABCABC...) ``repeats`` times after a warm-up."""
    return _common.interleaved(*fns, repeats=repeats, warmup=warmup)


def bench_inference(size: int, repeats: int, batch: int = 1, backbone: dict | None = None) -> dict:
    from monai.inferers import SimpleInferer

    from partialseg.data.dcl import SupportBank
    from partialseg.inferers import ConditionalInferer
    from partialseg.networks import CompNet

    torch.manual_seed(0)
    backbone = backbone or BACKBONE
    comp = CompNet(2, 1, M, backbone_kwargs=dict(backbone)).eval()
    plain = unet(1, M, backbone).eval()
    bank = SupportBank(torch.randn(2 * M, 1, size, size), (torch.rand(2 * M, size, size) > 0.5).float(),
                       torch.arange(2 * M) % M, num_classes=M)
    cond = ConditionalInferer(bank, num_samples=1)
    simple = SimpleInferer()
    x = torch.randn(batch, 1, size, size)
    packed = comp.pack(x, *(t[None].expand(batch, *t.shape) for t in bank.draw(np.random.default_rng(0))))

    def run_comp():
        with torch.no_grad():
            return cond(x, comp)

    def run_own():
        with torch.no_grad():
            return comp.backbone(packed)

    def run_plain():
        with torch.no_grad():
            return torch.softmax(simple(x, plain), 1)

    assert run_comp().shape == run_plain().shape == (batch, M, size, size) and run_own().shape == (batch, 2 * M, size, size)
    t_comp, t_own, t_plain = interleaved(run_comp, run_own, run_plain, repeats=repeats)
    return {"size": size, "batch": batch, "compnet_k1_s": t_comp, "own_backbone_s": t_own, "plain_unet_s": t_plain,
            "ratio_own": t_comp / t_own, "ratio_plain": t_comp / t_plain, "target": 1.15}


def bench_training(size: int, repeats: int, batch: int, backbone: dict | None = None) -> dict:
    from monai.engines import SupervisedTrainer

    from partialseg.engines import DCLTrainer
    from partialseg.losses import CompatibleLoss, ConditionalCompatibleLoss
    from partialseg.networks import CompNet, pack_conditional_input
    from partialseg.transforms.dcl.array import conditional_supervision

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def partial_map():
        """A random single-structure <0,p,1> map per sample (one class known, the rest 0 / p)."""
        lab = torch.randint(0, M, (batch, size, size), generator=g)
        onehot = torch.nn.functional.one_hot(lab, M).permute(0, 3, 1, 2).float()
        out = torch.full_like(onehot, 0.5)
        for b in range(batch):
            k = b % M
            out[b, k] = onehot[b, k]
            inside = onehot[b, k] == 1
            for j in range(M):
                if j != k:
                    out[b, j][inside] = 0.0
        return out

    image = torch.randn(batch, 1, size, size, generator=g)
    label = partial_map()
    cond_image = torch.randn(batch, M, size, size, generator=g)
    cond_label = (torch.rand(batch, M, size, size, generator=g) > 0.5).float()
    dcl_batch = {"image": image, "label": label, "cond_image": cond_image, "cond_label": cond_label}
    plain_batch = {"image": image, "label": label}
    own_batch = {"image": pack_conditional_input(image, cond_image, cond_label),
                 "label": conditional_supervision(label, cond_label, channel_dim=1)}

    backbone = backbone or BACKBONE
    comp = CompNet(2, 1, M, backbone_kwargs=dict(backbone))
    plain = unet(1, M, backbone)
    own = unet(comp.backbone_in_channels, comp.out_channels, backbone)
    dcl = DCLTrainer(device="cpu", max_epochs=1, train_data_loader=[dcl_batch], network=comp,
                     optimizer=torch.optim.Adam(comp.parameters(), 1e-4), loss_function=ConditionalCompatibleLoss(),
                     lambda_dual=0.2, decollate=False)
    sup = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=[plain_batch], network=plain,
                            optimizer=torch.optim.Adam(plain.parameters(), 1e-4), loss_function=CompatibleLoss("ce", "ce"),
                            decollate=False)
    sup_own = SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=[own_batch], network=own,
                                optimizer=torch.optim.Adam(own.parameters(), 1e-4), loss_function=CompatibleLoss("ce", "ce"),
                                decollate=False)
    step = {"i": 0}

    def run_dcl():
        step["i"] += 1
        dcl.state.iteration = step["i"]
        out = dcl._iteration(dcl, dcl_batch)
        assert out["dual_class"] >= 0 and float(out["loss_dual"]) > 0
        return out

    def run_own():
        return sup_own._iteration(sup_own, own_batch)

    def run_plain():
        return sup._iteration(sup, plain_batch)

    t_dcl, t_own, t_plain = interleaved(run_dcl, run_own, run_plain, repeats=repeats)
    dual_grads = [p.grad for p in dcl.dual_network.parameters() if p.grad is not None]
    return {"size": size, "batch": batch, "stage2_iteration_s": t_dcl, "own_backbone_iteration_s": t_own,
            "plain_unet_iteration_s": t_plain, "ratio_own": t_dcl / t_own, "ratio_plain": t_dcl / t_plain, "target": 2.5,
            "dualnet_params_with_grad": len(dual_grads)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--backbones", nargs="+", choices=sorted(BACKBONES), default=["bundle", "small", "paper"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 216], help="bundle / small backbones: multiples of 8 (3 halvings); 216 ~ the paper's 212")
    ap.add_argument("--batch", type=int, default=8, help="training batch size (bundle / small backbones)")
    ap.add_argument("--paper-sizes", type=int, nargs="+", default=[224], help="paper backbone: multiples of 16 (4 halvings)")
    ap.add_argument("--paper-batch", type=int, default=2, help="training batch size (paper backbone; it is ~30x the compute)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dcl_cpu.json"))
    ap.add_argument("--no-docs", action="store_true", help="don't write the section of docs/results.md")
    ap.add_argument("--parts", nargs="+", choices=["inference", "training"], default=["inference", "training"],
                    help="measure only these (e.g. --parts training: the stage-2 iteration alone)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
               "repeats": args.repeats, "num_classes": M, "inference": [], "training": [],
               "backbones": {name: {k: list(v) if isinstance(v, tuple) else v for k, v in BACKBONES[name].items()} for name in args.backbones}}
    plan = [(name, args.paper_sizes if name == "paper" else args.sizes, args.paper_batch if name == "paper" else args.batch)
            for name in args.backbones]
    for name, sizes, _ in plan if "inference" in args.parts else []:
        for size in sizes:
            r = {"backbone": name, **bench_inference(size, args.repeats, backbone=BACKBONES[name])}
            results["inference"].append(r)
            print(f"[{name}] inference {size}x{size}: CompNet K=1 {r['compnet_k1_s'] * 1e3:.1f} ms, its backbone "
                  f"{r['own_backbone_s'] * 1e3:.1f} ms ({r['ratio_own']:.3f}x), plain UNet {r['plain_unet_s'] * 1e3:.1f} ms "
                  f"({r['ratio_plain']:.3f}x); target <= 1.15", flush=True)
    for name, sizes, batch in plan if "training" in args.parts else []:
        for size in sizes:
            r = {"backbone": name, **bench_training(size, args.repeats, batch, backbone=BACKBONES[name])}
            results["training"].append(r)
            print(f"[{name}] training {size}x{size} batch {batch}: stage-2 {r['stage2_iteration_s'] * 1e3:.0f} ms, supervised: its "
                  f"backbone {r['own_backbone_iteration_s'] * 1e3:.0f} ms ({r['ratio_own']:.3f}x), plain UNet "
                  f"{r['plain_unet_iteration_s'] * 1e3:.0f} ms ({r['ratio_plain']:.3f}x); target <= 2.5; DualNet params with a "
                  f"gradient: {r['dualnet_params_with_grad']}", flush=True)
    command = " ".join(["OMP_NUM_THREADS=1 python benchmarks/dcl_speed.py", *(sys.argv[1:] if argv is None else argv)])
    _common.save_report(results, args.out, report(results, command), SECTION, docs=not args.no_docs)


SECTION = "## dcl: cost on CPU (one thread)"


def report(results: dict, command: str) -> str:
    shapes = "; ".join(f"{name}: MONAI UNet {spec['channels']}, {spec['num_res_units']} residual subunits, {spec['norm']} norm"
                       for name, spec in results["backbones"].items())
    lines = [SECTION, "", f"Command: `{command}` (results: `benchmarks/results/dcl_cpu.json`). Backbones ({shapes}); "
             f"{results['num_classes']} classes; medians of {results['repeats']} interleaved repeats, torch {results['torch']}, "
             "on a CPU shared with other jobs.", "",
             "| measurement | backbone | size | DCL | its backbone | plain UNet | ratio to its backbone | ratio to plain UNet | target |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(what, r, dcl, own, plain, unit_ms):
        fmt = "{:.1f} ms" if unit_ms else "{:.0f} ms"
        met = lambda x: f"**{x:.2f}x**" if x <= r["target"] else f"{x:.2f}x"
        return (f"| {what} (batch {r['batch']}) | {r['backbone']} | {r['size']}² | {fmt.format(dcl * 1e3)} | {fmt.format(own * 1e3)} | "
                f"{fmt.format(plain * 1e3)} | {met(dcl / own)} | {met(dcl / plain)} | <= {r['target']}x |")

    for r in results["inference"]:
        lines.append(row("inference: CompNet, ConditionalInferer K = 1", r, r["compnet_k1_s"], r["own_backbone_s"], r["plain_unet_s"], True))
    for r in results["training"]:
        lines.append(row("training: DCLTrainer stage-2 iteration vs SupervisedTrainer iteration", r, r["stage2_iteration_s"],
                         r["own_backbone_iteration_s"], r["plain_unet_iteration_s"], False))
    lines += ["", "Bold: within the target."]
    notes = ROOT / "benchmarks" / "results" / "dcl_cpu_notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
