"""Smoke test of benchmarks/losses.py on its quick shape (timings are not checked here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "losses.py"


def test_quick_run_prints_a_row_per_loss(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_losses", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = ["MarginalCELoss", "MarginalDiceLoss", "MarginalExclusionLoss", "CompatibleLoss(ce, ce)"]
    out = tmp_path / "losses.json"
    result = module.main(["--quick", "--reps", "1", "--out", str(out), "--only", *names])
    assert [r["loss"] for r in result["rows"]] == names
    assert all(r["time_ratio"] > 0 for r in result["rows"])
    assert out.exists()
    printed = capsys.readouterr().out
    assert "MarginalExclusionLoss" in printed and "DiceCELoss" in printed
