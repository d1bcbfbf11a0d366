"""The transforms benchmark script runs end to end in quick mode (no timing assertion)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "transforms.py"


def test_benchmark_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_transforms", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "result.json"
    result = module.main(["--quick", "--size", "32", "--out", str(out)])
    assert result["identical"] and result["max_abs_diff"] <= 1e-5
    assert json.loads(out.read_text())["shape"] == [1, 32, 32, 32]
    printed = capsys.readouterr().out
    assert "max |ours - reference|" in printed and ("PASS" in printed) == result["pass"]
