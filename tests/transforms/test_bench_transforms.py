"""The transforms benchmark script runs end to end in quick mode (no timing assertion)."""

from __future__ import annotations

import json

from benchmark_harness import load_benchmark


def test_benchmark_quick(tmp_path, capsys):
    module = load_benchmark("transforms")
    out = tmp_path / "result.json"
    result = module.main(["--quick", "--size", "32", "--out", str(out)])
    assert result["identical"] and result["max_abs_diff"] <= 1e-5
    assert json.loads(out.read_text())["shape"] == [1, 32, 32, 32]
    printed = capsys.readouterr().out
    assert "max |ours - reference|" in printed and ("PASS" in printed) == result["pass"]
