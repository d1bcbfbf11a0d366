"""The marginal + exclusion bundle through ``python -m monai.bundle run``: both stages, inference, evaluation.

Tiny data (the synthetic abdomen at a coarse spacing) and a few iterations: these tests check the
configs, the hand-over between the stages and that predictions land on the input's grid; the
demo (``make demo``) and ``benchmarks/marginal_ablation.py`` measure accuracy. The shared checks
live in ``tests/bundle_harness.py``.
"""

from __future__ import annotations

import pytest
from bundle_harness import (
    MARGINAL,
    assert_ok,
    check_inference_and_evaluation,
    check_stage2_needs_stage1,
    check_stages_hand_over,
    trained_fixture,
)

pytestmark = pytest.mark.slow

trained = trained_fixture(MARGINAL)


def test_both_stages_train_and_hand_over(trained):
    check_stages_hand_over(*trained)


def test_inference_and_evaluation_land_on_the_input_grid(trained):
    root = trained[0]
    check_inference_and_evaluation(MARGINAL, root, num_cases=2)
    assert (root / "eval" / "boxplot.png").is_file()


def test_inference_takes_the_stage1_model_or_any_checkpoint(trained):
    # issue 14: evaluating the stage-1 model needed an override of a handler's load_path
    from partialseg.transforms.io.record import read_run_record

    root = trained[0]
    out = root / "pred_stage1"
    assert_ok(MARGINAL.run(root, configs=("inference.json",), stage=1, output_dir=str(out), **MARGINAL.grid))
    records = {read_run_record(p)["model"] for p in out.glob("*_seg.nii.gz")}
    assert records == {"model_stage1.pt"}
    out = root / "pred_checkpoint"
    model = str(root / "models" / "model_stage1.pt")
    assert_ok(MARGINAL.run(root, configs=("inference.json",), checkpoint=model, output_dir=str(out), **MARGINAL.grid))
    assert {read_run_record(p)["model"] for p in out.glob("*_seg.nii.gz")} == {"model_stage1.pt"}
    r = MARGINAL.run(root, configs=("inference.json",), checkpoint=str(root / "nope.pt"), output_dir=str(out), **MARGINAL.grid)
    assert r.returncode != 0 and "nope.pt does not exist" in r.stderr and "--checkpoint PATH" in r.stderr


def test_stage2_without_stage1_names_the_missing_checkpoint(tmp_path):
    check_stage2_needs_stage1(MARGINAL, tmp_path)
    # `--init_from_stage1 false` on the command line (fire passes the string "false") trains from scratch
    r = MARGINAL.run(tmp_path, stage=2, epochs_stage2=1, init_from_stage1="false", **MARGINAL.small)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file() and "Restored all variables" not in r.stdout + r.stderr


def test_sampling_option_picks_the_training_sampler(tmp_path):
    # the config alone (no training): "source" balances the union's sources (the paper's "patches
    # from each training dataset"), "case" keeps the shuffled loader, anything else is refused
    from monai.bundle import ConfigParser

    from partialseg.data import SourceBalancedSampler

    MARGINAL.make_data(tmp_path, num_train=2, num_full=1, num_test=1)

    def parsed(key, **overrides):
        parser = ConfigParser()
        parser.read_config([str(MARGINAL.path / "configs" / "train.json")])
        parser.update({"bundle_root": str(tmp_path), **overrides})
        return parser.get_parsed_content(key)

    sampler = parsed("train#sampler", sampling="source")
    datalist = parsed("train#datalist")
    assert isinstance(sampler, SourceBalancedSampler)
    counts = {s: sum(c["source"] == s for c in datalist) for s in {c["source"] for c in datalist}}
    assert sampler.counts() == dict(sorted(counts.items())) and len(counts) >= 3
    assert len(sampler) == len(counts) * max(counts.values())
    assert parsed("train#sampler", sampling="case") is None
    assert parsed("train#dataloader", sampling="case").sampler.__class__.__name__ == "RandomSampler"
    assert parsed("train#dataloader", sampling="source").sampler.__class__ is SourceBalancedSampler
    with pytest.raises(Exception) as err:  # monai.bundle wraps the error; the cause names the options
        parsed("train#sampler", sampling="organ")
    message = str(err.value.__cause__)
    assert "sampling must be one of" in message and "'case'" in message and "'source'" in message


@pytest.mark.parametrize("key", ["iterations_per_epoch", "epochs_stage1"])
def test_an_empty_schedule_is_refused_naming_the_key(key, tmp_path):
    # `--iterations_per_epoch 0` ran epochs of no iteration and exited 0 with nothing trained
    MARGINAL.make_data(tmp_path)
    r = MARGINAL.run(tmp_path, stage=1, **{**MARGINAL.small, key: 0})
    assert r.returncode != 0
    assert f"{key} must be >= 1, got 0" in r.stdout + r.stderr
    assert not (tmp_path / "models" / "model_stage1.pt").exists()
