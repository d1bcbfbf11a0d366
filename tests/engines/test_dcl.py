"""DCL trainer (Algorithm 1): dual swap by hand, no gradient into DualNet, refresh on validation
improvement only, and few-iteration stage-1 / stage-2 runs on synthetic cardiac2d NIfTI data."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.transforms import AsDiscreted, Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd
from torch import nn

import partialseg.engines.dcl as dcl_module
from partialseg.data import load_dataset
from partialseg.data.dcl import ConditionalDataset
from partialseg.data.synthetic import make_dataset
from partialseg.engines.dcl import DCLTrainer, DualNetworkUpdater, argmax_is, dual_swap
from partialseg.data.dcl import SupportBank
from partialseg.inferers import ConditionalInferer
from partialseg.losses import ConditionalCompatibleLoss
from partialseg.networks import CompNet, compnet_segment, pack_conditional_input
from partialseg.transforms import PartialLabelToVectord, conditional_supervision

M = 4  # background, LV, MYO, RV
SMALL_UNET = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1}


def test_argmax_is_matches_argmax_with_ties():
    g = torch.Generator().manual_seed(0)
    probs = torch.randint(0, 3, (4, 5, 7, 6), generator=g).float()  # many ties
    for s in range(5):
        torch.testing.assert_close(argmax_is(probs, s), probs.argmax(1, keepdim=True) == s)


def test_dual_swap_by_hand():
    # B = 1, C = 1, m = 3, two voxels; conditional images hold their class index + 10
    image = torch.tensor([[[[-1.0, -2.0]]]])
    cond_image = torch.tensor([[[[10.0, 10.0]], [[11.0, 11.0]], [[12.0, 12.0]]]])
    cond_label = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]])
    pred = torch.tensor([[[[0.2, 0.1]], [[0.7, 0.3]], [[0.1, 0.6]]]], requires_grad=True)
    d = dual_swap(image, cond_image, cond_label, pred, s=1, p=0.5)
    assert d["image"].flatten().tolist() == [11.0, 11.0]  # x_d^t = x_p^{c_1}
    # y_d^t: the c_1 case annotates class 1 only: voxel 0 outside (others p), voxel 1 inside
    assert d["label"][0, :, 0].tolist() == [[0.5, 0.0], [0.0, 1.0], [0.5, 0.0]]
    assert d["cond_image"][0, :, 0].tolist() == [[10.0, 10.0], [-1.0, -2.0], [12.0, 12.0]]  # x_d^{c_1} = x_p^t
    torch.testing.assert_close(d["cond_label"][0, :, 0], torch.tensor([[1.0, 0.0], [0.7, 0.3], [1.0, 1.0]]))
    assert d["cond_label_hard"][0, :, 0].tolist() == [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]  # argmax == 1 at voxel 0 only
    d["cond_label"].sum().backward()  # the prediction reaches DualNet's input with its gradient
    assert pred.grad[0, 1].tolist() == [[1.0, 1.0]] and pred.grad[0, [0, 2]].abs().sum() == 0
    with pytest.raises(ValueError, match="outside"):
        dual_swap(image, cond_image, cond_label, pred, s=3)


@pytest.fixture(scope="module")
def cardiac(tmp_path_factory):
    root = tmp_path_factory.mktemp("cardiac2d")
    ds = load_dataset(make_dataset("cardiac2d", root, seed=0, size=32, num_train=6, num_test=2))
    load = [LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]), NormalizeIntensityd("image")]
    train = CacheDataset(ds.datalist("training"), Compose([*load, PartialLabelToVectord("label", num_classes=M)]), progress=False)
    test = CacheDataset(ds.datalist("test"), Compose(load), progress=False)
    return train, test


def _parts(cardiac, lambda_dual, seed=0, network=None, lr=1e-2):
    train, test = cardiac
    torch.manual_seed(seed)
    # the 'single' variant annotates LV, MYO or RV: background conditions come from any case (partial)
    cond = ConditionalDataset(train, M, seed=seed, missing="any")
    loader = DataLoader(cond, batch_size=4, shuffle=False, num_workers=0)
    net = network if network is not None else CompNet(2, 1, M, backbone_kwargs=SMALL_UNET)
    trainer = DCLTrainer(
        device="cpu", max_epochs=1, train_data_loader=loader, network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr), loss_function=ConditionalCompatibleLoss(),
        lambda_dual=lambda_dual, seed=seed, decollate=False,
    )
    bank = SupportBank.from_dataset(train, M, per_class=2, missing="any")
    return trainer, bank, test


def _evaluator(net, bank, test):
    post = AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=[M, M])
    return SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader(test, batch_size=4), network=net, inferer=ConditionalInferer(bank),
        postprocessing=post, key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
    )


def _losses(trainer):
    out = []
    trainer.add_event_handler(dcl_module.Events.ITERATION_COMPLETED, lambda e: out.append(e.state.output["loss"].item()))
    return out


def _mean_loss(trainer, batches, dual=None):
    """Mean stage-1 loss (or, with ``dual``, stage-2 loss over every class c_s) on fixed batches, no update."""
    vals = []
    net = trainer.network
    net.eval()
    with torch.no_grad():
        for b in batches:
            logits = net(pack_conditional_input(b["image"], b["cond_image"], b["cond_label"]))
            prim = float(trainer.loss_function(logits, conditional_supervision(b["label"], b["cond_label"], 1), b["cond_label"]))
            if dual is None:
                vals.append(prim)
                continue
            for s in range(M):
                d = dual_swap(b["image"], b["cond_image"], b["cond_label"], compnet_segment(logits), s)
                out = dual(pack_conditional_input(d["image"], d["cond_image"], d["cond_label"]))
                ld = float(trainer.loss_function(out, conditional_supervision(d["label"], d["cond_label_hard"], 1), d["cond_label_hard"]))
                vals.append((1 - trainer.lambda_dual) * prim + trainer.lambda_dual * ld)
    return float(np.mean(vals))


@pytest.mark.slow
def test_stage1_then_stage2_learn(cardiac):
    torch.set_num_threads(1)
    trainer, bank, test = _parts(cardiac, lambda_dual=0.0)
    batches = list(trainer.data_loader)
    before = _mean_loss(trainer, batches)
    trainer.state.max_epochs = 8
    losses = _losses(trainer)
    trainer.run()
    after = _mean_loss(trainer, batches)
    assert trainer.dual_network is None and all(np.isfinite(losses))
    assert after < 0.7 * before, (before, after)

    # stage 2 from the stage-1 weights, lr 1e-4 as the paper (raised here to see change in a few steps)
    net = trainer.network
    trainer2, _, _ = _parts(cardiac, lambda_dual=0.2, network=net, lr=1e-3)
    trainer2.state.max_epochs = 8
    losses2 = _losses(trainer2)
    classes = []
    trainer2.add_event_handler(dcl_module.Events.ITERATION_COMPLETED, lambda e: classes.append(e.state.output["dual_class"]))
    frozen = CompNet(2, 1, M, backbone_kwargs=SMALL_UNET)
    frozen.load_state_dict(net.state_dict())  # DualNet = stage-1 PrimNet (no refresh without a validation)
    before2 = _mean_loss(trainer2, batches, dual=frozen.eval())
    trainer2.run()
    after2 = _mean_loss(trainer2, batches, dual=frozen)
    assert trainer2.dual_network is not None and trainer2.dual_refreshes == [1]  # made at the first stage-2 iteration
    assert all(np.isfinite(losses2)) and after2 < before2, (before2, after2)
    assert classes == [trainer2.select_class(i, M) for i in range(1, len(classes) + 1)]
    # the evaluator runs through the conditional inferer and gives a Dice
    ev = _evaluator(net, bank, test)
    ev.run()
    assert 0.0 <= ev.state.metrics["dice"] <= 1.0


def test_dual_network_takes_no_gradient_and_primnet_gets_the_dual_loss(cardiac):
    torch.set_num_threads(1)
    trainer, _, _ = _parts(cardiac, lambda_dual=0.2)
    trainer.refresh_dual()
    dual_before = {k: v.clone() for k, v in trainer.dual_network.state_dict().items()}
    prim_grads = []
    trainer.add_event_handler(
        dcl_module.IterationEvents.BACKWARD_COMPLETED,
        lambda e: prim_grads.append(sum(float(p.grad.abs().sum()) for p in e.network.parameters() if p.grad is not None)),
    )
    trainer.state.max_epochs = 1
    trainer.state.epoch_length = 2
    trainer.run()
    assert all(p.grad is None for p in trainer.dual_network.parameters())
    assert all(not p.requires_grad for p in trainer.dual_network.parameters())
    assert all(torch.equal(v, trainer.dual_network.state_dict()[k]) for k, v in dual_before.items())
    assert prim_grads and all(g > 0 for g in prim_grads)
    assert not any(torch.equal(v, trainer.network.state_dict()[k]) for k, v in dual_before.items() if v.is_floating_point() and v.numel() > 1)

    # the dual term alone reaches PrimNet through DualNet's input (the closed loop of Eq. 9)
    b = next(iter(trainer.data_loader))
    net = trainer.network
    net.zero_grad()
    pred = compnet_segment(net(pack_conditional_input(b["image"], b["cond_image"], b["cond_label"])))
    d = dual_swap(b["image"], b["cond_image"], b["cond_label"], pred, s=1)
    out = trainer.dual_network(pack_conditional_input(d["image"], d["cond_image"], d["cond_label"]))
    trainer.loss_function(out, conditional_supervision(d["label"], d["cond_label_hard"], 1), d["cond_label_hard"]).backward()
    assert sum(float(p.grad.abs().sum()) for p in net.parameters()) > 0
    assert all(p.grad is None for p in trainer.dual_network.parameters())


class _ConstantClass(nn.Module):
    """A real 1x1-conv backbone whose output is one class everywhere (weights set by hand)."""

    def __init__(self, in_channels, m):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2 * m, 1)
        self.m = m
        self.set_class(0)

    def set_class(self, k):
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(-10.0)
            self.conv.bias[k] = 10.0  # intersection map of class k

    def forward(self, x):
        return self.conv(x)


def test_dual_refreshes_only_on_validation_improvement(cardiac):
    torch.set_num_threads(1)
    backbone = _ConstantClass(1 * (1 + M) + M, M)
    net = CompNet(2, 1, M, backbone=backbone)
    trainer, bank, test = _parts(cardiac, lambda_dual=0.2, network=net)
    trainer.refresh_dual()  # stage 2 starts from PrimNet
    evaluator = _evaluator(net, bank, test)
    DualNetworkUpdater(trainer).attach(evaluator)

    def dual_class():
        return int(trainer.dual_network.backbone.conv.bias.argmax())

    # mean foreground Dice (include_background=False): predicting one foreground class everywhere
    # scores 2|k| / (|k| + N) / 3 > 0, predicting background everywhere scores 0
    scores = {}
    for k in (1, 2, 3, 0):
        backbone.set_class(k)
        evaluator.run()
        scores[k] = evaluator.state.metrics["dice"]
    assert scores[0] == 0 and all(scores[k] > 0 for k in (1, 2, 3))
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1, -1
    refreshed_for, best = [], -1.0
    for epoch, k in enumerate([1, 0, max((1, 2, 3), key=scores.get), 0, 1], start=1):
        backbone.set_class(k)
        n = len(trainer.dual_refreshes)
        evaluator.run(global_epoch=epoch)
        improved = scores[k] > best
        best = max(best, scores[k])
        assert (len(trainer.dual_refreshes) == n + 1) == improved, (epoch, k, scores)
        if improved:
            refreshed_for.append(k)
            assert dual_class() == k
        assert int(net.backbone.conv.bias.argmax()) == k  # PrimNet is untouched
    assert refreshed_for == [1, max((1, 2, 3), key=scores.get)] or refreshed_for == [1]
    assert dual_class() == refreshed_for[-1]


def test_restored_best_metric_does_not_refresh_dual(cardiac):
    """After a resume (BestMetricState restored the best), a validation below it leaves DualNet."""
    torch.set_num_threads(1)
    backbone = _ConstantClass(1 * (1 + M) + M, M)
    net = CompNet(2, 1, M, backbone=backbone)
    trainer, bank, test = _parts(cardiac, lambda_dual=0.2, network=net)
    trainer.refresh_dual()
    evaluator = _evaluator(net, bank, test)
    DualNetworkUpdater(trainer).attach(evaluator)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.99, 3  # as restored from a checkpoint
    backbone.set_class(1)
    n = len(trainer.dual_refreshes)
    evaluator.run(global_epoch=4)
    assert evaluator.state.metrics["dice"] < 0.99 and len(trainer.dual_refreshes) == n


def _draws(cardiac, num_workers, epoch_length, max_epochs=3):
    """cond_index of every iteration, and the (epoch, pass_index) keys the dataset was given."""
    train, _ = cardiac
    cond = ConditionalDataset(train, M, seed=0, missing="any")
    keys = []
    set_epoch = cond.set_epoch
    cond.set_epoch = lambda *a: (keys.append(a), set_epoch(*a))
    loader = DataLoader(cond, batch_size=1, shuffle=False, num_workers=num_workers)
    net = CompNet(2, 1, M, backbone_kwargs=SMALL_UNET)
    trainer = DCLTrainer(device="cpu", max_epochs=max_epochs, epoch_length=epoch_length, train_data_loader=loader,
                         network=net, optimizer=torch.optim.SGD(net.parameters(), 0.0),
                         loss_function=ConditionalCompatibleLoss(), decollate=False)
    out = []
    trainer.add_event_handler(dcl_module.Events.ITERATION_COMPLETED, lambda e: out.append(e.state.batch["cond_index"].flatten().tolist()))
    trainer.run()
    return out, keys


def test_conditional_draws_do_not_depend_on_workers_or_epoch_length(cardiac):
    # 12 targets, batch 1: an epoch of 8 iterations continues the pass it is in; one of 16 starts
    # a second pass inside the epoch. Worker processes copy the dataset when a pass starts, so the
    # draws must be set then (before this, 2 workers kept a stale epoch and drew other cases).
    torch.set_num_threads(1)
    short0, keys = _draws(cardiac, 0, epoch_length=8)
    assert keys == [(0, 0), (1, 0)] and len(short0) == 24  # passes start at iterations 1 (epoch 1) and 13 (epoch 2)
    assert _draws(cardiac, 2, epoch_length=8)[0] == short0
    long0, keys = _draws(cardiac, 0, epoch_length=16, max_epochs=2)
    assert keys == [(0, 0), (0, 1), (1, 0)]  # 32 iterations: passes at 1 and 13 (epoch 1), 25 (epoch 2)
    assert _draws(cardiac, 2, epoch_length=16, max_epochs=2)[0] == long0
    # each pass draws anew: the same targets get other conditional cases in the next pass
    assert long0[:12] != long0[12:24] and long0[12:24] != long0[24:]
    with pytest.raises(ValueError, match="persistent_workers"):
        DCLTrainer(device="cpu", max_epochs=1, train_data_loader=DataLoader(ConditionalDataset(cardiac[0], M, missing="any"),
                   num_workers=1, persistent_workers=True), network=nn.Identity(), optimizer=None, loss_function=None)


def test_bad_arguments(cardiac):
    trainer, _, _ = _parts(cardiac, 0.0)
    kw = dict(device="cpu", max_epochs=1, train_data_loader=trainer.data_loader, network=trainer.network,
              optimizer=trainer.optimizer, loss_function=trainer.loss_function)
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="lambda_dual"):
            DCLTrainer(**kw, lambda_dual=bad)
    with pytest.raises(TypeError, match="dual_network"):
        DCLTrainer(**kw, lambda_dual=0.2, dual_network="net")
    with pytest.raises(ValueError, match="separate copy"):  # it would freeze PrimNet
        DCLTrainer(**kw, lambda_dual=0.2, dual_network=trainer.network)
    with pytest.raises(ValueError, match="dual_classes"):
        DCLTrainer(**kw, lambda_dual=0.2, dual_classes=[])
    with pytest.raises(TypeError):
        DualNetworkUpdater(object())


def test_doctests():
    assert doctest.testmod(dcl_module).failed == 0
