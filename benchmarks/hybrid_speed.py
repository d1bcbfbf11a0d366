"""Hybrid-supervision cost benchmark (issue 16 acceptance), CPU, one thread.

1. The DII update per weak instance. What the update needs of each weak instance is ``g_S .
   g_k``: the hot path (``last_layer_gradient_dots``) takes it without forming ``g_k`` (``g_S``
   as a second 1x1 convolution on the features, upsampled with the logits, dotted with the pixel
   errors); the references form the per-instance gradients (``last_layer_gradients``:
   ``"closed_form"`` batched matrix product, ``"functional"`` ``torch.func.vmap(grad)``,
   ``"loop"`` a Python loop of autograd calls) and dot them with ``g_S``; on the classifier
   input of the ablation's network for ``--instances`` 64 x 64 frames. Target: vectorised >= 5x
   faster than the loop. Also the whole indicator update (``HybridTrainer.update_indicators``:
   network 1's forward over every case, the per-instance part, Adam) per weak instance, and the
   forward alone (shared by every variant).
2. A DCR iteration (``HybridTrainer`` with ``dcr=True``: both networks on their tutorial and on
   the mixed image, pseudo-labels under ``no_grad``, Eq. 7, both updates) against a supervised
   iteration of one network on the same ``2 n`` frames (CE, SGD). Target: <= 2.3x (two networks
   cost about 2x; the pseudo-label forwards and the mixing are the rest). Variants: the
   pseudo-label forwards in eval mode (``pseudo_label_mode="eval"``), and that with both sides
   in ``channels_last``; extra rows (``--dcr-rows``) at 128 x 128 and with the paper's ResNet-50.

The sides are interleaved (ABAB...) in one process and each ratio is a ratio of medians, of wall
time and (``cpu_*``) of process CPU time, the robust one on a shared machine (one thread: it does
not count the waits for a core); the trainers' real ``_iteration`` is called on a prepared batch
(no data loading). Results:
``benchmarks/results/hybrid_speed.json`` (with ``uptime``'s load average before and after).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/hybrid_speed.py [--repeats 15] [--pairs 4] [--instances 64]
        [--dcr-rows 128:small:9 128:resnet50:3] [--skip-dii]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py, also when loaded by file path
import _common  # noqa: E402


def interleaved(*fns, repeats: int, warmup: int = 2) -> list[float]:
    """Median wall seconds of each function, called in turn (ABAB...) ``repeats`` times after a warm-up.

    ``_common.interleaved``; the process CPU time and the minor page faults of the same calls are
    kept in :data:`CPU_MEDIANS` and :data:`FAULT_MEDIANS` (one thread: the CPU time does not count
    the time the process waited for a core on a shared machine).
    """
    detail: list[dict] = []
    walls = _common.interleaved(*fns, repeats=repeats, warmup=warmup, detail=detail)
    CPU_MEDIANS[:] = [d["cpu_s"] for d in detail]
    FAULT_MEDIANS[:] = [d["minor_faults"] for d in detail]
    return walls


#: process CPU-time medians and minor page faults per call of the last :func:`interleaved` call, in its order
CPU_MEDIANS: list[float] = []
FAULT_MEDIANS: list[float] = []


def make_net(seed, widths, encoder="small"):
    from partialseg.networks.hybrid import HybridDeepLab

    torch.manual_seed(seed)
    if widths is None:  # the preset's widths (resnet50: the paper's DeepLabV3+ head)
        return HybridDeepLab(2, 3, 2, encoder=encoder)
    a, d, low = widths
    return HybridDeepLab(2, 3, 2, encoder=encoder, aspp_channels=a, decoder_channels=d, low_level_channels=low)


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
    """The per-instance operation of the indicator update, on the features of ``--instances`` frames.

    What the update needs per weak instance is ``g_S . g_k``: the hot path takes it directly
    (``last_layer_gradient_dots``); the references form ``g_k`` (closed form, ``vmap(grad)``, a
    loop of autograd calls) and dot it with ``g_S``. ``g_S`` is the mean gradient of the first 4
    instances (any vector serves; the values are checked against the loop).
    """
    from partialseg.losses.hybrid import instance_pixel_weights, last_layer_gradient_dots, last_layer_gradients

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
    g_s = ref[:4].mean(0)
    for m in ("closed_form", "functional"):
        torch.testing.assert_close(run(m)(), ref, rtol=1e-4, atol=1e-6)
    dots = lambda: last_layer_gradient_dots(features, net.classifier, label, rows, weights, g_s, matrices)  # noqa: E731
    torch.testing.assert_close(dots(), ref @ g_s, rtol=1e-4, atol=1e-9)
    dotted = {m: (lambda f=run(m): f() @ g_s) for m in ("closed_form", "functional", "loop")}
    t_dot, t_closed, t_func, t_loop = interleaved(dots, dotted["closed_form"], dotted["functional"], dotted["loop"], repeats=args.repeats)
    c_dot, c_closed, _, c_loop = CPU_MEDIANS
    k = args.instances
    return {"instances": k, "frame": [64, 64], "operation": "g_S . g_k for every instance of a batch (features given)",
            "dot_ms_per_instance": 1e3 * t_dot / k, "closed_form_ms_per_instance": 1e3 * t_closed / k,
            "functional_ms_per_instance": 1e3 * t_func / k, "loop_ms_per_instance": 1e3 * t_loop / k,
            "loop_over_dot": t_loop / t_dot, "loop_over_closed_form": t_loop / t_closed, "loop_over_functional": t_loop / t_func,
            "cpu_loop_over_dot": c_loop / c_dot, "cpu_loop_over_closed_form": c_loop / c_closed, "target": 5.0}  # fmt: skip


def bench_update(args) -> dict:
    """The whole indicator update (network 1's forward over every case + the per-instance part + Adam) per weak instance."""
    from torch.utils.data import DataLoader

    from partialseg.engines.hybrid import HybridTrainer
    from partialseg.losses.hybrid import InstanceIndicators, indicator_gradient

    image, label = data(args.cases, seed=1)
    items = [{"image": image[k], "label": label[k], "case": f"c{k}", "supervision": "strong" if k < args.cases // 20 else "weak"}
             for k in range(args.cases)]
    ind = InstanceIndicators.from_datalist(items, key="supervision")
    net = make_net(0, args.widths)
    loader = DataLoader(items, batch_size=70)
    trainers = {
        method: HybridTrainer("cpu", 1, [], net, torch.optim.SGD(net.parameters(), 0.01), indicators=ind, indicator_loader=loader,
                              dcr=False, gradient_method=method, decollate=False)
        for method in ("closed_form", "loop")
    }  # fmt: skip

    def gradients_then_dot():  # the closed form forming every g_k (the path before the dot products)
        g_s, rows, g_k = trainers["closed_form"].indicator_gradients()
        ind.step(rows, indicator_gradient(g_s, g_k))

    def forward_only():  # what every variant shares: network 1 (eval) over every case
        net.eval()
        with torch.no_grad():
            for batch in loader:
                net.forward_features(batch["image"])
        net.train()

    strong_last = HybridTrainer("cpu", 1, [], net, torch.optim.SGD(net.parameters(), 0.01), indicators=ind,
                                indicator_loader=DataLoader(items[::-1], batch_size=70), dcr=False, decollate=False)
    fns = {"dot": trainers["closed_form"].update_indicators, "dot_strong_last": strong_last.update_indicators,
           "closed_form_gradients": gradients_then_dot,
           "loop": trainers["loop"].update_indicators, "forward_only": forward_only}  # fmt: skip
    times = interleaved(*fns.values(), repeats=args.repeats, warmup=1)
    m = len(ind)
    out = {f"{name}_ms_per_weak_instance": 1e3 * t / m for name, t in zip(fns, times)}
    out.update({f"cpu_{name}_ms_per_weak_instance": 1e3 * t / m for name, t in zip(fns, CPU_MEDIANS)})
    t, c = dict(zip(fns, times)), dict(zip(fns, CPU_MEDIANS))
    out.update({
        "cases": args.cases, "weak_instances": m,
        "loop_over_dot": t["loop"] / t["dot"], "loop_over_closed_form_gradients": t["loop"] / t["closed_form_gradients"],
        "cpu_loop_over_dot": c["loop"] / c["dot"], "cpu_forward_share_of_dot": c["forward_only"] / c["dot"],
    })  # fmt: skip
    return out


def bench_dcr(args, size: int = 64, encoder: str = "small", repeats: int | None = None, variants: bool = True) -> dict:
    """A DCR iteration against a supervised iteration of one network on the same ``2 n`` frames.

    Always also: the pseudo-label forwards in bfloat16 (``pseudo_label_precision="bfloat16"``)
    and a pseudo-label forward alone in float32 and bfloat16 (the floors). Variants
    (``variants``): ``pseudo_label_mode="eval"`` (the pseudo-label forwards in eval mode), and
    that with both sides in ``channels_last`` memory format.
    """
    from partialseg.engines.hybrid import HybridTrainer

    n = args.pairs
    image, label = data(2 * n, size=size, seed=2)
    cases = [f"c{k}" for k in range(2 * n)]
    widths = args.widths if encoder == "small" else None
    sgd = lambda net: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)  # noqa: E731
    batch = {"image": image, "label": label, "case": cases}
    batch_cl = {**batch, "image": image.contiguous(memory_format=torch.channels_last)}

    def dcr_run(mode="train", channels_last=False, precision="float32"):
        net1, net2 = make_net(1, widths, encoder), make_net(2, widths, encoder)
        if channels_last:
            net1, net2 = net1.to(memory_format=torch.channels_last), net2.to(memory_format=torch.channels_last)
        trainer = HybridTrainer("cpu", 1, [], net1, sgd(net1), net2, sgd(net2), dii=False, dcr=True, pseudo_label_mode=mode,
                                pseudo_label_precision=precision, decollate=False)  # fmt: skip
        trainer.state.output = {}
        b = batch_cl if channels_last else batch

        def run():
            trainer.state.iteration += 1
            trainer._iteration(trainer, b)

        return run

    def sup_run(channels_last=False):
        plain = make_net(1, widths, encoder)
        x = image
        if channels_last:
            plain, x = plain.to(memory_format=torch.channels_last), batch_cl["image"]
        opt = sgd(plain)

        def run():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(plain(x), label[:, 0])
            loss.backward()
            opt.step()

        def pseudo():  # one pseudo-label forward: a network on n frames under no_grad, train mode
            with torch.no_grad():
                plain(x[:n])

        def pseudo_bf16():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                plain(x[:n])

        return run, pseudo, pseudo_bf16

    sup, pseudo, pseudo_bf16 = sup_run()
    fns = {"dcr": dcr_run(), "dcr_bf16_pseudo": dcr_run(precision="bfloat16"), "supervised": sup,
           "pseudo_label_forward": pseudo, "pseudo_label_forward_bf16": pseudo_bf16}  # fmt: skip
    if variants:
        fns.update({"dcr_eval_pseudo": dcr_run("eval"), "dcr_eval_pseudo_channels_last": dcr_run("eval", True),
                    "supervised_channels_last": sup_run(True)[0]})  # fmt: skip
    times = dict(zip(fns, interleaved(*fns.values(), repeats=repeats or args.repeats, warmup=1 if encoder != "small" else 2)))
    cpu, faults = dict(zip(fns, CPU_MEDIANS)), dict(zip(fns, FAULT_MEDIANS))
    t_dcr, t_sup, t_fwd = times["dcr"], times["supervised"], times["pseudo_label_forward"]
    # what Eq. 7 must compute: two networks' forward + backward on 2n frames (own tutorial + mixed
    # images) and two pseudo-label forwards on n frames: 2 (t_sup + t_fwd) / t_sup
    out = {"pairs": n, "frames": 2 * n, "frame": [size, size], "encoder": encoder, "repeats": repeats or args.repeats,
           **{f"{k}_ms": 1e3 * v for k, v in times.items()}, **{f"cpu_{k}_ms": 1e3 * v for k, v in cpu.items()},
           **{f"minor_faults_{k}": v for k, v in faults.items()},
           "ratio": t_dcr / t_sup, "floor_ratio": 2 * (t_sup + t_fwd) / t_sup, "overhead_over_floor": t_dcr / (2 * (t_sup + t_fwd)),
           "target": 2.3}  # fmt: skip
    c_sup = cpu["supervised"]
    out.update({"cpu_ratio": cpu["dcr"] / c_sup, "cpu_floor_ratio": 2 * (c_sup + cpu["pseudo_label_forward"]) / c_sup})
    out.update({
        "ratio_bf16_pseudo": times["dcr_bf16_pseudo"] / t_sup, "cpu_ratio_bf16_pseudo": cpu["dcr_bf16_pseudo"] / c_sup,
        "floor_ratio_bf16_pseudo": 2 * (t_sup + times["pseudo_label_forward_bf16"]) / t_sup,
        "cpu_floor_ratio_bf16_pseudo": 2 * (c_sup + cpu["pseudo_label_forward_bf16"]) / c_sup,
    })  # fmt: skip
    if variants:
        out["ratio_eval_pseudo"] = times["dcr_eval_pseudo"] / t_sup
        out["ratio_eval_pseudo_channels_last"] = times["dcr_eval_pseudo_channels_last"] / times["supervised_channels_last"]
        out["cpu_ratio_eval_pseudo"] = cpu["dcr_eval_pseudo"] / c_sup
        out["cpu_ratio_eval_pseudo_channels_last"] = cpu["dcr_eval_pseudo_channels_last"] / cpu["supervised_channels_last"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--instances", type=int, default=64)
    ap.add_argument("--cases", type=int, default=140, help="cases of the whole-update measurement (1 in 20 strong, listed first; dot_strong_last: listed last)")
    ap.add_argument("--widths", type=int, nargs=3, default=[16, 32, 16])
    ap.add_argument("--dcr-rows", nargs="*", default=["128:small:9", "128:resnet50:3"],
                    help="extra DCR rows SIZE:ENCODER:REPEATS (resnet50: the paper's network, preset widths); none: skip")
    ap.add_argument("--skip-dii", action="store_true", help="only the DCR rows")
    ap.add_argument("--skip-variants", action="store_true", help="DCR rows without the eval-mode / channels_last variants")
    ap.add_argument("--malloc", choices=["default", "retain"], default="default",
                    help="'retain': glibc keeps freed memory for the whole process, both sides alike (_common.retain_freed_memory)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hybrid_speed.json"))
    args = ap.parse_args(argv)
    _common.set_malloc(args.malloc)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = {
        "command": " ".join(["OMP_NUM_THREADS=1 python benchmarks/hybrid_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "network": f"HybridDeepLab small, widths {args.widths}", "malloc": args.malloc,
    }  # fmt: skip
    if not args.skip_dii:
        results["gradients"] = bench_gradients(args)
        results["indicator_update"] = bench_update(args)
    results["dcr"] = bench_dcr(args, variants=not args.skip_variants)
    results["dcr_rows"] = []
    for spec in args.dcr_rows:
        size, encoder, repeats = spec.split(":")
        results["dcr_rows"].append(bench_dcr(args, int(size), encoder, int(repeats), variants=not args.skip_variants))
    results["loadavg_before"], results["loadavg_after"] = list(load_before), list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
