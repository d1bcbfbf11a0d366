"""benchmarks/dcl_ablation.py's training loader: conditional draws renewed every epoch (accuracy is the script's job)."""

from __future__ import annotations


import numpy as np
import torch
from ignite.engine import Events

from partialseg.data.dcl import ConditionalDataset
from partialseg.engines.dcl import DCLTrainer
from partialseg.losses import ConditionalCompatibleLoss
from partialseg.networks import CompNet
from partialseg.transforms import PartialLabelToVector

from benchmark_harness import load_benchmark

M = 4


def _bench():
    return load_benchmark("dcl_ablation")


def _cases(n=6, size=16):
    """n fully labelled cases, each holding the background and classes 1-3 (squares shifted by case)."""
    to_vec = PartialLabelToVector(M)
    cases = []
    for i in range(n):
        lab = np.zeros((1, size, size), np.int64)
        for j in range(1, M):
            lab[0, 4 * j - 3 + i % 2: 4 * j + i % 2, 2 + i: 6 + i] = j
        cases.append({"image": torch.randn(1, size, size), "label": torch.as_tensor(to_vec(lab, "all"))})
    return cases, ["all"] * n


def test_every_epoch_is_a_pass_with_new_draws_and_the_old_index_sequence():
    # Before the fix the phase's loader was one pass of iterations * batch draws: DCLTrainer sets the
    # conditional draws when a pass starts, so every slice kept its first draw for the whole run
    # (keys [(0, 0)] below); the recorded table drew anew each epoch of val_every iterations.
    torch.set_num_threads(1)
    bench = _bench()
    cases, annotated = _cases()
    dataset = ConditionalDataset(cases, M, annotated=annotated, seed=0)
    keys = []
    set_epoch = dataset.set_epoch
    dataset.set_epoch = lambda *a: (keys.append(a), set_epoch(*a))
    batch, val_every, epochs = 2, 3, 3
    loader = bench.training_loader(dataset, seed=0, phase=1, batch=batch, val_every=val_every)
    net = CompNet(2, 1, M, backbone_kwargs={"channels": (4, 8), "strides": (2,), "num_res_units": 0})
    trainer = DCLTrainer(device="cpu", max_epochs=epochs, epoch_length=val_every, train_data_loader=loader, network=net,
                         optimizer=torch.optim.SGD(net.parameters(), 0.0), loss_function=ConditionalCompatibleLoss(), decollate=False)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.batch["cond_index"].tolist()))
    trainer.run()
    assert keys == [(0, 0), (1, 0), (2, 0)]
    assert len(seen) == epochs * val_every
    # the indices: one long pass of the same generator, as before the fix
    g = torch.Generator().manual_seed(0 * 1000 + 1)
    one_pass = list(torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=epochs * val_every * batch, generator=g))
    g = torch.Generator().manual_seed(1)
    per_epoch = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=val_every * batch, generator=g)
    assert [i for _ in range(epochs) for i in per_epoch] == one_pass
    # each epoch's batches carry that epoch's draws of their slices
    for it, conds in enumerate(seen):
        dataset.set_epoch(it // val_every)
        items = one_pass[it * batch:(it + 1) * batch]
        assert conds == [dataset.draw(i) for i in items]

