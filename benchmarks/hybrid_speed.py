"""Hybrid-supervision cost benchmark (issue 16 acceptance), CPU, one thread.

1. The DII update per weak instance: the last-layer gradients of every instance of a batch
   (``last_layer_gradients``) vectorised (``"closed_form"``: one batched matrix product;
   ``"functional"``: ``torch.func.vmap(grad)``) against a Python loop of autograd calls
   (``"loop"``), on the classifier input of the ablation's network for ``--instances`` 64 x 64
   frames; and the whole indicator update (``HybridTrainer.update_indicators``: network 1's
   forward over every case, the gradients, ``-g_S . g_k``, Adam) per weak instance. Target: the
   vectorised gradients >= 5x faster than the loop.
2. A DCR iteration (``HybridTrainer`` with ``dcr=True``: both networks on their tutorial and on
   the mixed image, pseudo-labels under ``no_grad``, Eq. 7, both updates) against a supervised
   iteration of one network on the same ``2 n`` frames (CE, SGD). Target: <= 2.3x (two networks
   cost about 2x; the pseudo-label forwards and the mixing are the rest).

The sides are interleaved (ABAB...) in one process and each ratio is a ratio of medians; the
trainers' real ``_iteration`` is called on a prepared batch (no data loading). Results:
``benchmarks/results/hybrid_speed.json`` (with ``uptime``'s load average before and after).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/hybrid_speed.py [--repeats 15] [--pairs 4] [--instances 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def interleaved(*fns, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each function, called in turn (ABAB...) ``repeats`` times after a warm-up."""
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for f, ts in zip(fns, times):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def make_net(seed, widths):
    from partialseg.networks.hybrid import HybridDeepLab

    torch.manual_seed(seed)
    a, d, low = widths
    return HybridDeepLab(2, 3, 2, encoder="small", aspp_channels=a, decoder_channels=d, low_level_channels=low)


def data(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, size, size, generator=g)
    label = torch.zeros(n, 1, size, size, dtype=torch.long)
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for k in range(n):
        c = torch.randint(16, size - 16, (2,), generator=g)
        label[k, 0] = ((ii - c[0]) ** 2 + (jj - c[1]) ** 2 <= 100).long()
    return image, label


def bench_gradients(args) -> dict:
    from partialseg.losses.hybrid import instance_pixel_weights, last_layer_gradients

    net = make_net(0, args.widths).eval()
    image, label = data(args.instances)
    with torch.no_grad():
        features = net.forward_features(image)
    rows, weights, _ = instance_pixel_weights(label, [[-1]] * args.instances)
    tail = lambda z: net.upsample_logits(z, image.shape[2:])  # noqa: E731  (autograd through F.interpolate)
    matrices = net.logit_tail(features.shape[2:], image.shape[2:])  # the engine's tail: matrices with a VJP

    def run(method):
        t = matrices if method == "closed_form" else tail
        return lambda: last_layer_gradients(features, net.classifier, label, rows, weights, t, method)

    ref = run("loop")()
    for m in ("closed_form", "functional"):
        torch.testing.assert_close(run(m)(), ref, rtol=1e-4, atol=1e-6)
    t_closed, t_func, t_loop = interleaved(run("closed_form"), run("functional"), run("loop"), repeats=args.repeats)
    k = args.instances
    return {"instances": k, "frame": [64, 64], "closed_form_ms_per_instance": 1e3 * t_closed / k,
            "functional_ms_per_instance": 1e3 * t_func / k, "loop_ms_per_instance": 1e3 * t_loop / k,
            "loop_over_closed_form": t_loop / t_closed, "loop_over_functional": t_loop / t_func, "target": 5.0}


def bench_update(args) -> dict:
    """The whole indicator update (forward over every case + gradients + Adam) per weak instance."""
    from torch.utils.data import DataLoader

    from partialseg.engines.hybrid import HybridTrainer
    from partialseg.losses.hybrid import InstanceIndicators

    image, label = data(args.cases, seed=1)
    items = [{"image": image[k], "label": label[k], "case": f"c{k}", "supervision": "strong" if k < args.cases // 20 else "weak"}
             for k in range(args.cases)]
    ind = InstanceIndicators.from_datalist(items, key="supervision")
    net = make_net(0, args.widths)
    out = {}
    for method in ("closed_form", "loop"):
        trainer = HybridTrainer("cpu", 1, [], net, torch.optim.SGD(net.parameters(), 0.01), indicators=ind,
                                indicator_loader=DataLoader(items, batch_size=70), dcr=False, gradient_method=method, decollate=False)
        (t,) = interleaved(trainer.update_indicators, repeats=max(3, args.repeats // 5), warmup=1)
        out[f"{method}_ms_per_weak_instance"] = 1e3 * t / len(ind)
    out["cases"] = args.cases
    out["weak_instances"] = len(ind)
    out["loop_over_closed_form"] = out["loop_ms_per_weak_instance"] / out["closed_form_ms_per_weak_instance"]
    return out


def bench_dcr(args) -> dict:
    from partialseg.engines.hybrid import HybridTrainer

    n = args.pairs
    image, label = data(2 * n, seed=2)
    cases = [f"c{k}" for k in range(2 * n)]
    net1, net2, plain = make_net(1, args.widths), make_net(2, args.widths), make_net(1, args.widths)
    sgd = lambda net: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)  # noqa: E731
    dcr = HybridTrainer("cpu", 1, [], net1, sgd(net1), net2, sgd(net2), dii=False, dcr=True, decollate=False)
    opt = sgd(plain)
    batch = {"image": image, "label": label, "case": cases}
    dcr.state.output = {}

    def run_dcr():
        dcr.state.iteration += 1
        dcr._iteration(dcr, batch)

    def run_sup():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(plain(image), label[:, 0])
        loss.backward()
        opt.step()

    def run_pseudo():  # one pseudo-label forward: a network on n frames under no_grad, train mode
        with torch.no_grad():
            plain(image[:n])

    t_dcr, t_sup, t_fwd = interleaved(run_dcr, run_sup, run_pseudo, repeats=args.repeats)
    # what Eq. 7 must compute: two networks' forward + backward on 2n frames (own tutorial + mixed
    # images) and two pseudo-label forwards on n frames: 2 (t_sup + t_fwd) / t_sup
    return {"pairs": n, "frames": 2 * n, "frame": [64, 64], "dcr_iteration_ms": 1e3 * t_dcr, "supervised_iteration_ms": 1e3 * t_sup,
            "pseudo_label_forward_ms": 1e3 * t_fwd, "ratio": t_dcr / t_sup, "floor_ratio": 2 * (t_sup + t_fwd) / t_sup,
            "overhead_over_floor": t_dcr / (2 * (t_sup + t_fwd)), "target": 2.3}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--instances", type=int, default=64)
    ap.add_argument("--cases", type=int, default=140, help="cases of the whole-update measurement (1 in 20 strong)")
    ap.add_argument("--widths", type=int, nargs=3, default=[16, 32, 16])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hybrid_speed.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = {
        "command": " ".join(["OMP_NUM_THREADS=1 python benchmarks/hybrid_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "network": f"HybridDeepLab small, widths {args.widths}",
        "gradients": bench_gradients(args), "indicator_update": bench_update(args), "dcr": bench_dcr(args),
    }  # fmt: skip
    results["loadavg_before"], results["loadavg_after"] = list(load_before), list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
