"""Cost of a stage-2 training iteration of the marginal bundle, against MONAI DiceCELoss on full labels.

Both arms use the bundle's own network, optimizer and batches (``configs/train.json`` parsed with
``monai.bundle.ConfigParser``) on the synthetic ``abdomen3d`` data:

* ``stage2``: forward, ``MixedSupervisionLoss`` (marginal + exclusion for partial samples, Dice +
  CE for full ones) on a stage-2 batch, backward, Adam step;
* ``dice_ce``: the same network and step with ``monai.losses.DiceCELoss(softmax=True)`` on a batch
  of fully labelled patches (one-hot targets).

The arms are interleaved in one process (ABAB...) and the ratio is taken on medians. Data
loading is measured separately: the time to draw a batch from the bundle's training DataLoader
(default caching: ``CacheDataset``, cache_rate 1.0, the random crop and intensity augmentations
and ``PartialLabelToVectord`` run per batch) relative to a stage-2 step.

Run: ``python benchmarks/marginal_iteration.py [--repeats 30] [--threads 1]``
(writes ``benchmarks/results/marginal_iteration_cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "marginal_exclusion_abdomen"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", default=None, help="dataset folder (default: a generated abdomen3d in a temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "marginal_iteration_cpu.json"))
    args = parser.parse_args(argv)

    import monai
    import torch
    from monai.bundle import ConfigParser

    torch.set_num_threads(args.threads)
    data = args.data or tempfile.mkdtemp(prefix="marginal_bench_")
    cfg = ConfigParser()
    cfg.read_config(str(BUNDLE / "configs" / "train.json"))
    cfg["bundle_root"] = tempfile.mkdtemp(prefix="marginal_bench_root_")
    cfg["dataset_dir"] = data
    cfg["stage"] = 2
    device = cfg.get_parsed_content("device")
    net = cfg.get_parsed_content("network")
    opt = cfg.get_parsed_content("optimizer")
    loss_stage2 = cfg.get_parsed_content("loss")
    dice_ce = monai.losses.DiceCELoss(softmax=True)
    loader = cfg.get_parsed_content("train#dataloader")

    # batches: stage-2 batches as the bundle draws them, and fully labelled patches for the baseline
    t0 = time.perf_counter()
    it = iter(loader)
    batches, load_s = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        load_s.append(time.perf_counter() - t)
        batches.append((b["image"].as_tensor().to(device), b["label"].as_tensor().to(device)))
    print(f"drew {len(batches)} batches in {time.perf_counter() - t0:.1f} s (cache filled before)", flush=True)
    full_batches = []
    for x, t in batches:
        onehot = torch.nn.functional.one_hot(t.argmax(1), t.shape[1]).movedim(-1, 1).to(t.dtype)
        full_batches.append((x, onehot))
    partial_share = sum(bool(((t > 0) & (t < 1)).any()) for _, t in batches) / len(batches)

    def step(x, t, loss_fn):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), t)
        loss.backward()
        opt.step()
        return loss.detach().item()

    net.train()
    for i in range(3):  # warm-up
        step(*batches[i], loss_stage2)
        step(*full_batches[i], dice_ce)
    times = {"stage2": [], "dice_ce": []}
    for i in range(args.repeats):
        for name, (x, t), fn in (("stage2", batches[i], loss_stage2), ("dice_ce", full_batches[i], dice_ce)):
            t0 = time.perf_counter()
            step(x, t, fn)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["stage2"] / med["dice_ce"]
    load_med = statistics.median(load_s)
    load_fraction = load_med / (load_med + med["stage2"])
    result = {
        "benchmark": "marginal bundle stage-2 iteration vs DiceCELoss iteration",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "monai": monai.__version__, "threads": args.threads, "device": str(device),
        "batch": list(batches[0][0].shape), "repeats": args.repeats,
        "share_of_batches_with_partial_samples": partial_share,
        "stage2_median_s": med["stage2"], "dice_ce_median_s": med["dice_ce"], "ratio": ratio, "target_ratio": 1.10,
        "data_loading_median_s": load_med, "data_loading_fraction": load_fraction, "target_loading_fraction": 0.20,
        "stage2_s": times["stage2"], "dice_ce_s": times["dice_ce"], "loading_s": load_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"stage-2 iteration {1e3 * med['stage2']:.1f} ms vs DiceCELoss {1e3 * med['dice_ce']:.1f} ms: "
          f"ratio {ratio:.3f} (target <= 1.10) {'PASS' if ratio <= 1.10 else 'FAIL'}")
    print(f"data loading {1e3 * load_med:.1f} ms per batch = {100 * load_fraction:.1f}% of an iteration "
          f"(target <= 20%) {'PASS' if load_fraction <= 0.20 else 'FAIL'}")
    print(f"({100 * partial_share:.0f}% of the batches hold a partially labelled sample; written {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
