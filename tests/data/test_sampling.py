"""SourceBalancedSampler: equal shares per source, every case before any repeat, reproducible
epochs, disjoint DDP shards, MONAI's set_epoch hook, a real DataLoader, bad input."""

from __future__ import annotations

import doctest
from collections import Counter

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer

import partialseg.data.sampling as sampling_module
from partialseg.data import SourceBalancedSampler

# 2 fully labelled cases, 6 liver-only, 3 spleen-only
CASES = [{"case": f"f{i}", "source": "full"} for i in range(2)] + [{"case": f"l{i}", "source": "liver"} for i in range(6)] + [
    {"case": f"s{i}", "source": "spleen"} for i in range(3)
]
SOURCE = [c["source"] for c in CASES]


def test_doctests():
    assert doctest.testmod(sampling_module).failed == 0


def test_every_source_gets_the_same_share():
    sampler = SourceBalancedSampler(CASES, seed=3)
    idx = list(sampler)
    assert len(idx) == len(sampler) == 3 * 6  # per_source defaults to the largest source (liver, 6)
    assert Counter(SOURCE[i] for i in idx) == {"full": 6, "liver": 6, "spleen": 6}
    # uniform over cases would give the full source 2/11 of the draws; here it gets 1/3
    assert sampler.counts() == {"full": 2, "liver": 6, "spleen": 3}


def test_each_case_drawn_before_any_repeats():
    idx = list(SourceBalancedSampler(CASES, per_source=7, seed=0))
    per = {s: [i for i in idx if SOURCE[i] == s] for s in ("full", "liver", "spleen")}
    # liver: 7 draws from 6 cases -> each once, one twice; full: 7 from 2 -> 4 and 3; spleen: 3, 2, 2
    assert sorted(Counter(per["liver"]).values()) == [1, 1, 1, 1, 1, 2]
    assert sorted(Counter(per["full"]).values()) == [3, 4]
    assert sorted(Counter(per["spleen"]).values()) == [2, 2, 3]


def test_epochs_are_reproducible_and_differ():
    a, b = SourceBalancedSampler(CASES, seed=1), SourceBalancedSampler(CASES, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(list(a)) != [] and Counter(SOURCE[i] for i in a) == Counter(SOURCE[i] for i in first)
    assert list(SourceBalancedSampler(CASES, seed=2)) != first


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_one_balanced_epoch(world):
    shards = [list(SourceBalancedSampler(CASES, seed=5, num_replicas=world, rank=r)) for r in range(world)]
    whole = SourceBalancedSampler(CASES, seed=5).epoch_indices()
    assert all(len(s) == -(-18 // world) for s in shards)
    merged = [i for pos in range(len(shards[0])) for s in shards for i in s[pos : pos + 1]]
    assert merged[: len(whole)] == whole  # rank r takes positions r, r + world, ...: disjoint, nothing lost
    assert merged[len(whole) :] == whole[: len(merged) - len(whole)]  # padding wraps around


def test_more_ranks_than_indices_wraps_around():
    shards = [list(SourceBalancedSampler(["a", "b"], per_source=1, num_replicas=5, rank=r)) for r in range(5)]
    assert all(len(s) == 1 for s in shards) and {s[0] for s in shards} == {0, 1}


def test_monai_trainer_calls_set_epoch_and_a_dataloader_balances_batches():
    data = [{"x": torch.tensor([float(i)]), "source": s} for i, s in enumerate(SOURCE)]
    sampler = SourceBalancedSampler(data, per_source=4, seed=0)
    loader = DataLoader(Dataset(data), batch_size=3, sampler=sampler)
    seen_epochs, drawn = [], []
    net = torch.nn.Linear(1, 1)

    def step(engine, batch):
        seen_epochs.append(sampler.epoch)
        drawn.extend(int(v) for v in batch["x"].flatten())
        return {}

    trainer = SupervisedTrainer(device="cpu", max_epochs=2, train_data_loader=loader, network=net,
                                optimizer=torch.optim.SGD(net.parameters(), 0.1), loss_function=torch.nn.MSELoss(),
                                iteration_update=step)  # fmt: skip
    trainer.run()
    assert seen_epochs == [1] * 4 + [2] * 4  # MONAI's workflow calls set_epoch(epoch): a new draw per epoch
    assert Counter(SOURCE[i] for i in drawn) == {"full": 8, "liver": 8, "spleen": 8}
    assert drawn[:12] != drawn[12:]


def test_bad_input():
    with pytest.raises(ValueError, match="at least one case"):
        SourceBalancedSampler([])
    with pytest.raises(ValueError, match="case 1 .*no 'source'"):
        SourceBalancedSampler([{"source": "a"}, {"image": "b.nii.gz"}])
    with pytest.raises(ValueError, match="per_source"):
        SourceBalancedSampler(CASES, per_source=0)
    with pytest.raises(ValueError, match="rank 2"):
        SourceBalancedSampler(CASES, num_replicas=2, rank=2)
