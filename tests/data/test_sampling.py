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


# ---------------------------------------------------------------- TwoStreamBatchSampler

from partialseg.data import TwoStreamBatchSampler, training_sampler  # noqa: E402

PRIMARY, SECONDARY = [0, 1, 2, 3, 4], list(range(5, 17))  # 5 labelled, 12 unlabelled


def two_stream(**kw):
    args = {"primary": PRIMARY, "secondary": SECONDARY, "primary_per_batch": 2, "secondary_per_batch": 3, "seed": 0}
    return TwoStreamBatchSampler(**{**args, **kw})


def test_two_stream_proportions_per_batch():
    batches = list(two_stream())
    assert len(batches) == len(two_stream()) == 3  # ceil(5 / 2): one pass of the primary stream
    for b in batches:
        assert len(b) == 5 and all(i in PRIMARY for i in b[:2]) and all(i in SECONDARY for i in b[2:])


def test_two_stream_no_repeat_before_exhaustion():
    s = two_stream(num_batches=7)  # 14 primary draws from 5 (2.8 passes), 21 secondary from 12 (1.75)
    batches = s.epoch_batches()
    first = [i for b in batches for i in b[:2]]
    second = [i for b in batches for i in b[2:]]
    for stream, pool in ((first, PRIMARY), (second, SECONDARY)):
        for start in range(0, len(stream), len(pool)):  # every pass is a permutation of the pool
            chunk = stream[start : start + len(pool)]
            assert len(set(chunk)) == len(chunk) and set(chunk) <= set(pool)
        assert set(stream[: len(pool)]) == set(pool)
    assert sorted(Counter(first).values()) == [2, 3, 3, 3, 3]


def test_two_stream_epochs_are_reproducible_and_differ():
    a, b = two_stream(seed=4), two_stream(seed=4)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(5)
    b.set_epoch(1)  # the draws depend on (seed, epoch) alone, not on what was drawn before
    assert list(b) == list(a)
    assert list(two_stream(seed=5)) != first


@pytest.mark.parametrize("world", [2, 3])
def test_two_stream_ranks_take_whole_batches_of_one_epoch(world):
    whole = two_stream(seed=7, num_batches=5).epoch_batches()
    shards = [list(two_stream(seed=7, num_batches=5, num_replicas=world, rank=r)) for r in range(world)]
    assert all(len(s) == -(-5 // world) for s in shards)
    merged = [b for pos in range(len(shards[0])) for s in shards for b in s[pos : pos + 1]]
    assert merged[:5] == whole and merged[5:] == whole[: len(merged) - 5]  # rank r: batches r, r + world, ...
    assert all(len(b) == 5 and set(b[:2]) <= set(PRIMARY) for s in shards for b in s)


def test_two_stream_from_datalist_and_in_a_monai_trainer():
    data = [{"x": torch.tensor([float(i)]), "annotated": [1] if i < 4 else []} for i in range(10)]
    s = TwoStreamBatchSampler.from_datalist(data, 1, 2, seed=0)
    assert s.primary.tolist() == [0, 1, 2, 3] and s.secondary.tolist() == [4, 5, 6, 7, 8, 9]
    by_source = TwoStreamBatchSampler.from_datalist(data, 1, 1, predicate=lambda c: c["x"].item() >= 8)
    assert by_source.primary.tolist() == [8, 9]
    # as a batch_sampler of a plain DataLoader
    only_x = Dataset(data, transform=lambda d: {"x": d["x"]})
    loader = DataLoader(only_x, batch_sampler=s)
    assert [[int(v) for v in b["x"].flatten()] for b in loader] == s.epoch_batches()
    # flattened as the bundles use it: MONAI's trainer calls set_epoch, the loader regroups the batches
    flat = training_sampler("two_stream", data, Dataset(data), batch_size=3, primary_per_batch=1)
    loader = DataLoader(only_x, sampler=flat, batch_size=flat.batch_size)
    seen, batches = [], []
    net = torch.nn.Linear(1, 1)

    def step(engine, batch):
        seen.append(flat.epoch)
        batches.append([int(v) for v in batch["x"].flatten()])
        return {}

    trainer = SupervisedTrainer(device="cpu", max_epochs=2, train_data_loader=loader, network=net,
                                optimizer=torch.optim.SGD(net.parameters(), 0.1), loss_function=torch.nn.MSELoss(),
                                iteration_update=step)  # fmt: skip
    trainer.run()
    assert seen == [1] * 4 + [2] * 4
    expected = []
    for epoch in (1, 2):
        flat.set_epoch(epoch)
        expected += flat.batch_sampler.epoch_batches()
    assert batches == expected and all(b[0] < 4 and min(b[1:]) >= 4 for b in batches)


def test_case_sampling_is_unchanged(tmp_path):
    # 'case' keeps the shuffled loader (None) and MONAI's DistributedSampler under DDP: the
    # bundles' default draws are those of the loader before the move
    import torch.distributed as dist
    from monai.data import DistributedSampler as MonaiDistributedSampler

    import partialseg.engines as engines

    assert training_sampler("case", CASES, CASES) is None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        d = training_sampler("case", CASES, CASES, distributed=True)
    finally:
        dist.destroy_process_group()
    assert type(d) is MonaiDistributedSampler and d.shuffle and len(d) == len(CASES)

    assert engines.training_sampler is training_sampler  # the old path is a re-export


def test_two_stream_bad_arguments():
    with pytest.raises(ValueError, match="primary stream is empty"):
        two_stream(primary=[])
    with pytest.raises(ValueError, match=r"indices \[4\] are in both"):
        two_stream(secondary=[4, 5, 6])
    with pytest.raises(ValueError, match="more than once"):
        two_stream(secondary=[5, 5, 6])
    with pytest.raises(ValueError, match="primary_per_batch must be >= 1"):
        two_stream(primary_per_batch=0)
    with pytest.raises(TypeError, match="secondary_per_batch must be an int"):
        two_stream(secondary_per_batch=1.5)
    with pytest.raises(TypeError, match="primary index"):
        two_stream(primary=[0, True])
    with pytest.raises(ValueError, match="rank 2 is outside"):
        two_stream(num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="0 of 3 items have a non-empty 'annotated'"):
        TwoStreamBatchSampler.from_datalist([{"annotated": []}] * 3, 1, 1)
    with pytest.raises(ValueError, match="sampling must be one of .*two_stream.*Did you mean 'two_stream'"):
        training_sampler("two-stream", CASES, CASES)
    with pytest.raises(ValueError, match="needs the loader's batch_size"):
        training_sampler("two_stream", CASES, CASES)
    with pytest.raises(ValueError, match="primary_per_batch must be <= 1"):
        training_sampler("two_stream", [{"annotated": [1]}, {}], None, batch_size=2, primary_per_batch=2)
