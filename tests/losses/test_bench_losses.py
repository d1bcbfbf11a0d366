"""Smoke test of benchmarks/losses.py on its quick shape (timings are not checked here)."""

from __future__ import annotations

from benchmark_harness import load_benchmark


def test_quick_run_prints_a_row_per_loss(tmp_path, capsys):
    module = load_benchmark("losses")
    names = ["MarginalCELoss", "MarginalDiceLoss", "MarginalExclusionLoss", "CompatibleLoss(ce, ce)"]
    out = tmp_path / "losses.json"
    result = module.main(["--quick", "--reps", "1", "--out", str(out), "--only", *names])
    assert [r["loss"] for r in result["rows"]] == names
    assert all(r["time_ratio"] > 0 for r in result["rows"])
    assert out.exists()
    printed = capsys.readouterr().out
    assert "MarginalExclusionLoss" in printed and "DiceCELoss" in printed


def test_quick_class_sweep_gives_ratios_per_class_count(tmp_path, capsys):
    module = load_benchmark("losses")
    out = tmp_path / "sweep.json"
    argv = ["--sweep", "--quick", "--reps", "1", "--classes", "3", "5", "--target", "movedim", "--out", str(out)]
    result = module.main([*argv, "--only", "MarginalCELoss", "MarginalDiceLoss"])
    assert [(r["C"], r["loss"]) for r in result["rows"]] == [(3, "MarginalCELoss"), (3, "MarginalDiceLoss"), (5, "MarginalCELoss"), (5, "MarginalDiceLoss")]
    assert all(r["ratio_ce"] > 0 for r in result["rows"])
    assert "ratio_baseline" in result["rows"][1] and "ratio_baseline" not in result["rows"][0]
    assert out.exists() and "C=5" in capsys.readouterr().out
