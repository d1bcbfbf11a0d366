"""benchmarks/hybrid_speed.py's DCR measurement (its logic, not its speed): the sides it times, the floors it
derives from them, and the bfloat16 pseudo-label agreement diagnostic of hybrid_ablation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from benchmark_harness import load_benchmark


def test_dcr_row_times_every_side_and_derives_the_floors_from_them():
    bench = load_benchmark("hybrid_speed")
    args = SimpleNamespace(pairs=1, widths=[8, 8, 8], repeats=1)
    row = bench.bench_dcr(args, size=48, variants=False)
    for side in ("dcr", "dcr_bf16_pseudo", "supervised", "pseudo_label_forward", "pseudo_label_forward_bf16"):
        assert row[f"cpu_{side}_ms"] > 0 and f"minor_faults_{side}" in row
    sup, fwd, fwd16 = (row[f"cpu_{k}_ms"] for k in ("supervised", "pseudo_label_forward", "pseudo_label_forward_bf16"))
    assert row["cpu_floor_ratio"] == pytest.approx(2 * (sup + fwd) / sup)
    assert row["cpu_floor_ratio_bf16_pseudo"] == pytest.approx(2 * (sup + fwd16) / sup)
    assert row["cpu_ratio"] == pytest.approx(row["cpu_dcr_ms"] / sup)
    assert row["cpu_ratio"] > 1.5  # two networks' forward + backward cost more than one's
    assert "ratio_eval_pseudo" not in row  # variants off


class _Logits(torch.nn.Conv2d):
    """A 1x1 convolution (autocast runs it in bfloat16): logits ``(x, x + margin)``."""

    def __init__(self, margin: float) -> None:
        super().__init__(1, 2, 1)
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.copy_(torch.tensor([0.0, margin]))


@pytest.mark.parametrize(("margin", "share"), [(1.0, 1.0), (0.1, 0.0)])
def test_pseudo_label_agreement_compares_float32_and_bfloat16_classes(margin, share):
    bench = load_benchmark("hybrid_ablation")
    net1, net2 = _Logits(margin), _Logits(margin)
    batch = torch.full((4, 1, 3, 3), 100.0)  # bfloat16 spacing at 100: 0.5
    engine = SimpleNamespace(
        prepare_batch=lambda b: (b, None, None), state=SimpleNamespace(batch=batch, iteration=7), networks={"net1": net1, "net2": net2}
    )
    # a margin of 1 survives bfloat16 rounding at 100; 0.1 rounds away (100.1 -> 100: a tie, class 0 wins)
    assert bench.pseudo_label_agreement(engine) == {"iteration": 7, "share": share}
