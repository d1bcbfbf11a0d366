"""benchmarks/atlas_ablation.py's arm table, resume logic and summary (accuracy is the script's job; no training here)."""

from __future__ import annotations

import sys

import pytest

from benchmark_harness import load_benchmark


def _bench():
    return load_benchmark("atlas_ablation")


def test_arms_are_the_papers_table_2_with_their_modules():
    b = _bench()
    # (label, aman, aprn, micpam): (a)-(g) and full as Table 2 lists them
    flags = {k: v[1:] for k, v in b.ARMS.items()}
    assert flags == {
        "a": (False, False, False), "b": (True, False, False), "c": (False, True, False), "d": (False, False, True),
        "e": (True, True, False), "f": (False, True, True), "g": (True, False, True), "full": (True, True, True),
    }
    assert list(b.PAPER_CROSS.values()) == [63.6, 67.2, 68.8, 69.6, 70.4, 69.5, 69.1, 74.6]
    assert list(b.PAPER_INTRA.values()) == [80.1, 80.8, 82.6, 82.1, 82.1, 82.8, 83.3, 83.4]
    assert b.parse_arms(["full", "(b) AMAN", "a"]) == ["a", "b", "full"]  # table order, keys or labels
    assert b.parse_arms(None) == list(b.ARMS)
    with pytest.raises(SystemExit, match="unknown arm"):
        b.parse_arms(["h"])


def test_resume_skips_finished_runs_of_the_same_schedule_only(tmp_path):
    b = _bench()
    runs = tmp_path / "runs.jsonl"
    b._common.append_run(runs, {"arm": "a", "seed": 0, "iterations": 300})
    b._common.append_run(runs, {"arm": "full", "seed": 1, "iterations": 300})
    b._common.append_run(runs, {"arm": "c", "seed": 0, "iterations": 20})  # another schedule: not done
    done = b._common.read_runs(runs)
    assert b.todo(done, ["a", "c", "full"], [0, 1], 300) == [("c", 0), ("full", 0), ("a", 1), ("c", 1)]
    assert b.todo(done, ["c"], [0], 20) == []


def test_summary_is_mean_and_std_over_seeds_in_points():
    b = _bench()

    def run(seed, intra, cross, refined=None):
        return {"arm": "c", "seed": seed, "intramodal_dice": intra, "cross_modal_dice": cross, "train_seconds": 10.0,
                "per_class": {"intramodal": {"CT liver": intra}, "cross_modal": {"MR liver": cross}},
                "diagnostics": {"refined_dice": refined, "aman_correct": None}}

    s = b.summarise([run(0, 0.5, 0.1, 0.2), run(1, 0.7, 0.3, 0.4)], ["a", "c"])
    assert list(s) == ["c"]  # an arm without runs is left out
    c = s["c"]
    assert c["intramodal"]["mean"] == pytest.approx(60.0) and c["intramodal"]["std"] == pytest.approx(14.142, abs=1e-3)
    assert c["cross_modal"]["mean"] == pytest.approx(20.0) and c["paper_cross_modal"] == 68.8
    assert c["per_class"]["cross_modal"]["MR liver"] == pytest.approx(20.0)
    assert c["diagnostics"] == {"refined_dice": pytest.approx(0.3)}  # diagnostics of modules that are off stay out
    row = b.table(s).splitlines()[2]
    assert row.startswith("| (c) APRN | 2 | 60.0 ± 14.1 | 20.0 ± 14.1 | 82.6 / 68.8 | 30.0 |")


def test_patch_sampler_crops_image_label_and_atlas_together():
    import numpy as np

    b = _bench()
    frame = (6, 5, 4)
    x = np.arange(np.prod(frame), dtype=np.float32).reshape(1, *frame)
    cases = [{"x": x + 1000 * i, "t": np.concatenate([x, -x]) + 1000 * i, "modality": m} for i, m in enumerate(("CT", "MR"))]
    atlas = np.concatenate([x, 2 * x])
    batches = list(b.PatchSampler(cases, atlas, (3, 5, 2), batch=2, epoch_length=3, seed=0))
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (2, 1, 3, 5, 2) and batch["label"].shape == (2, 2, 3, 5, 2) and batch["atlas"].shape == (2, 2, 3, 5, 2)
        for i in range(2):
            k = int(batch["image"][i, 0, 0, 0, 0]) // 1000  # which case
            assert batch["modality"][i] == ("CT", "MR")[k]
            assert (batch["label"][i, 0] == batch["image"][i, 0]).all()  # same crop for the label
            assert (batch["atlas"][i, 1] == 2 * (batch["image"][i, 0] - 1000 * k)).all()  # and for the atlas
    again = list(b.PatchSampler(cases, atlas, (3, 5, 2), batch=2, epoch_length=3, seed=0))
    assert all((p["image"] == q["image"]).all() for p, q in zip(batches, again))  # the seed fixes the draws
    sys.modules.pop("bench_atlas_ablation", None)


def test_atlas_alone_scores_the_thresholded_prior_by_modality_group():
    import numpy as np

    b = _bench()
    y = np.zeros((4, 4, 2), np.int64)
    y[:2] = 1  # organ 1: the first half
    y[2:, :2] = 2  # organ 2: a quarter
    atlas = np.zeros((2, 4, 4, 2), np.float32)
    atlas[0, :2] = 0.9  # organ 1's prior: exact
    atlas[1, 2:] = 0.4  # organ 2's prior: twice the organ, below 0.5
    prep = {"classes": ["background", "a", "b"], "atlas": atlas,
            "training": [{"modality": "CT", "annotated": [1]}, {"modality": "MR", "annotated": [2]}],
            "test": [{"modality": "CT", "y": y}, {"modality": "MR", "y": y}]}
    out = b.atlas_alone(prep, thresholds=(0.3, 0.5))
    # > 0.3: organ a Dice 1, organ b 2 * 8 / (16 + 8) = 2/3; CT: a intra, b cross; MR: b intra, a cross
    assert out["0.3"]["intramodal"] == pytest.approx((1 + 2 / 3) / 2) and out["0.3"]["cross_modal"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["0.5"]["per_class"] == {"CT a": 1.0, "CT b": 0.0, "MR a": 1.0, "MR b": 0.0}
