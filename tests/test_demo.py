"""``make demo`` end to end on a short schedule: data, both stages, inference, evaluation, figures."""

from __future__ import annotations

import json

import pytest

from partialseg.demo import main


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "mean organ Dice on the test split" in out and "stage 2: union of all sources" in out
    result = json.loads((tmp_path / "demo_result.json").read_text())
    assert set(result["per_class"]) == {"liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach"}
    # 80 iterations of stage 1 + 40 of stage 2 already segment the large organs
    assert result["per_class"]["liver"]["dice"]["mean"] > 0.5
    for name in ("overlays.png", "training_curves.png"):
        assert (tmp_path / name).stat().st_size > 10_000
