"""Every tutorial runs end to end (small sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


@pytest.mark.slow
def test_partial_label_pipeline(tmp_path):
    out = subprocess.run(
        [sys.executable, str(TUTORIALS / "01_partial_label_pipeline.py"), "--out", str(tmp_path / "abd"), "--size", "40", "40", "24", "--num-train", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no problems found" in out.stdout
    # one batch holds every source; the full source is entirely known, single-organ ones mostly unknown
    assert "full       annotated" in out.stdout and "100% of the label vector known" in out.stdout
    assert "kidney     annotated ['kidney_left', 'kidney_right']" in out.stdout
    assert "MarginalExclusionLoss on random logits" in out.stdout
