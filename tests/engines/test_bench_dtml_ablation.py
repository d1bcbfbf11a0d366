"""benchmarks/dtml_ablation.py's ``--arbiter`` diagnostic (who is right where M_s and M_d disagree) by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmark_harness import load_benchmark


def _bench():
    return load_benchmark("dtml_ablation")


class _Fixed(torch.nn.Module):
    """Returns a fixed map (per voxel) whatever the input; records the mode it was called in."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.as_tensor(values, dtype=torch.float32)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return (self.values * self.scale).expand(x.shape[0], 1, *self.values.shape)


def test_who_is_right_weighs_the_consistency_by_hand():
    bench = _bench()
    # 4 voxels (1 x 1 x 4); truth 1, 1, 0, 0. M_s probabilities 0.9, 0.2, 0.6, 0.1 (logits), M_d's mask
    # sigma(-k s) with k = 1500 and s = -0.01 / +0.01: 1, 0, 1, 0 (to 1e-6)
    p_s = np.array([0.9, 0.2, 0.6, 0.1])
    seg = _Fixed(np.log(p_s / (1 - p_s)).reshape(1, 1, 4))
    sdm = _Fixed(np.array([-0.01, 0.01, -0.01, 0.01]).reshape(1, 1, 4))
    m_d = np.array([1.0, 0.0, 1.0, 0.0])
    y = np.array([1, 1, 0, 0], np.uint8)
    args = SimpleNamespace(crop=[1, 1, 4], k=1500.0, device="cpu")
    out = bench.who_is_right(seg.train(), sdm.train(), [(np.zeros((1, 1, 4), np.float32), y.reshape(1, 1, 4))], args)
    sq = (p_s - m_d) ** 2  # 0.01, 0.04, 0.36, 0.01
    # M_d is closer to the truth at voxels 0 (1 vs 0.9) and 3 (0 vs 0.1): there L_con pulls M_s the right way;
    # M_s is closer at voxels 1 (0.2 vs 0, truth 1) and 2 (0.6 vs 1, truth 0): 0.02 / 0.42 against 0.40 / 0.42
    assert out["to_truth_ms"] == pytest.approx((sq[0] + sq[3]) / sq.sum(), abs=1e-4)
    assert out["to_truth_md"] == pytest.approx((sq[1] + sq[2]) / sq.sum(), abs=1e-4)
    assert out["con"] == pytest.approx(sq.mean(), abs=1e-4)
    # thresholded: M_s 1, 0, 1, 0 = M_d's mask: no disagreement
    assert out["disagree"] == 0.0 and math.isnan(out["ms_right"])
    assert out["dice_ms"] == pytest.approx(2 * 1 / (2 + 2)) and out["dice_md"] == pytest.approx(0.5)
    # evaluated in eval mode, handed back in training mode
    assert seg.modes and not any(seg.modes) and not any(sdm.modes)
    assert seg.training and sdm.training


def test_who_is_right_counts_the_disagreeing_voxels():
    bench = _bench()
    # thresholded M_s 1, 1, 0, 0 against M_d's mask 0, 1, 1, 0, truth 1, 0, 1, 0: they disagree at voxel 0
    # (M_s right) and voxel 2 (M_d right); at voxel 1 both are wrong, at voxel 3 both right
    p_s = np.array([0.7, 0.7, 0.2, 0.2])
    seg = _Fixed(np.log(p_s / (1 - p_s)).reshape(1, 1, 4))
    sdm = _Fixed(np.array([0.01, -0.01, -0.01, 0.01]).reshape(1, 1, 4))
    y = np.array([1, 0, 1, 0], np.uint8).reshape(1, 1, 4)
    args = SimpleNamespace(crop=[1, 1, 4], k=1500.0, device="cpu")
    out = bench.who_is_right(seg, sdm, [(np.zeros((1, 1, 4), np.float32), y)], args)
    assert out["disagree"] == pytest.approx(2 / 4) and out["ms_right"] == pytest.approx(1 / 2)


def test_results_sections_are_replaced_only_while_nobody_edited_them(tmp_path, capsys):
    """benchmarks/_common.update_results_md: a script's section is rewritten on a rerun, but once a person
    has added text to it (or for a section without the script's stamp) it is left alone, with a note."""
    bench = _bench()  # puts benchmarks/ on sys.path
    import _common

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\n## other\n\nkept\n")
    assert _common.update_results_md("## mine\n\n| a |\n| 1 |\n", doc)
    assert _common.update_results_md("## mine\n\n| a |\n| 2 |\n", doc)  # unedited: replaced
    text = doc.read_text()
    assert "| 2 |" in text and "| 1 |" not in text and "## other\n\nkept" in text and text.count("## mine") == 1
    doc.write_text(text.replace("| 2 |\n", "| 2 |\n\nWhy 2: a paragraph written by hand.\n"))
    assert not _common.update_results_md("## mine\n\n| a |\n| 3 |\n", doc)
    assert "Why 2" in doc.read_text() and "| 3 |" not in doc.read_text()
    assert "written by hand: not replaced" in capsys.readouterr().err
    doc.write_text("# Results\n\n## mine\n\nan old section without a stamp\n")
    assert not _common.update_results_md("## mine\n\nnew\n", doc) and "old section" in doc.read_text()
    assert bench.SECTION  # the ablation's section header, for the record
