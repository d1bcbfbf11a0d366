"""MultiNetworkTrainer: two networks and two optimisers stepped by hand-checked amounts, alternating
updates, frozen copies (no gradient on their parameters, gradient through their input), AMP on CPU,
events in MONAI's order, and checkpoints (state dicts, MONAI's CheckpointSaver / CheckpointLoader,
ResumeCheckpoint: a resumed run ends where an uninterrupted one does)."""

from __future__ import annotations

import doctest

import pytest
import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

import partialseg.engines.multi_network as mn_module
from partialseg.engines import FrozenCopy, MultiNetworkEvents, MultiNetworkTrainer, ResumeCheckpoint, frozen_copy

X = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # sum over the batch: [4, 1]


def _linear(w):
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([w]))
    return net


def _batches(n=2):
    return [{"image": X.clone(), "label": torch.zeros(2, 1)} for _ in range(n)]


def test_one_loss_two_optimisers_step_each_network_by_its_own_gradient():
    a, b = _linear([1.0, 1.0]), _linear([0.5, -0.5])

    def step(engine, batch):
        image, _ = batch  # MONAI's default_prepare_batch: (image, label)
        loss = engine.networks["a"](image).sum() + 2.0 * engine.networks["b"](image).sum()
        engine.update(loss, "opt_a", "opt_b")

    trainer = MultiNetworkTrainer(
        "cpu", 1, _batches(1), networks={"a": a, "b": b},
        optimizers={"opt_a": torch.optim.SGD(a.parameters(), 0.1), "opt_b": torch.optim.SGD(b.parameters(), 0.01)},
        train_step=step, decollate=False,
    )  # fmt: skip
    trainer.run()
    # dL/dw_a = sum_x x = [4, 1]; dL/dw_b = 2 [4, 1]
    torch.testing.assert_close(a.weight, torch.tensor([[1.0 - 0.4, 1.0 - 0.1]]))
    torch.testing.assert_close(b.weight, torch.tensor([[0.5 - 0.08, -0.5 - 0.02]]))
    assert trainer.state.output["loss"].item() == pytest.approx(5.0 + 2 * 1.5)


def test_alternating_updates_step_only_the_named_optimiser_and_events_fire_in_order():
    g, d = _linear([1.0, 0.0]), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        d.weight.fill_(2.0)
    opt_g, opt_d = torch.optim.SGD(g.parameters(), 0.1), torch.optim.SGD(d.parameters(), 0.1)
    events, seen_updates = [], []

    def step(engine, batch):
        image, _ = batch
        fake = engine.networks["g"](image)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        # discriminator on detached fakes, then the generator through the discriminator
        engine.update(engine.networks["d"](fake.detach()).sum(), "opt_d", key="loss_d")
        engine.update(-engine.networks["d"](fake).sum(), opt_g)  # by object as well as by name
        return {"fake": fake.detach()}

    trainer = MultiNetworkTrainer("cpu", 1, _batches(1), networks={"g": g, "d": d},
                                  optimizers={"opt_g": opt_g, "opt_d": opt_d}, train_step=step, decollate=False)
    for ev in (*IterationEvents, MultiNetworkEvents.OPTIMIZER_COMPLETED, Events.ITERATION_COMPLETED):
        trainer.add_event_handler(ev, lambda e, ev=ev: events.append(ev.name))
    trainer.add_event_handler(MultiNetworkEvents.OPTIMIZER_COMPLETED, lambda e: seen_updates.append(e.state.updated))
    trainer.run()
    # fake = g(x) = [1, 3] (sum 4); d's step: dL/dw_d = sum(fake) = 4 -> 2 - 0.4
    torch.testing.assert_close(d.weight, torch.tensor([[1.6]]))
    # g's step uses the updated d (1.6) and only the generator loss: the gradient d's loss left on g
    # (2 [4, 1]) was zeroed first; dL/dw_g = -1.6 [4, 1]
    torch.testing.assert_close(g.weight, torch.tensor([[1.0 + 0.64, 0.16]]))
    assert seen_updates == [("opt_d",), ("opt_g",)]
    assert set(trainer.state.output) == {"loss_d", "loss", "fake"}
    assert events == [
        "FORWARD_COMPLETED",
        "LOSS_COMPLETED", "BACKWARD_COMPLETED", "OPTIMIZER_COMPLETED",
        "LOSS_COMPLETED", "BACKWARD_COMPLETED", "OPTIMIZER_COMPLETED",
        "MODEL_COMPLETED", "ITERATION_COMPLETED",
    ]  # fmt: skip


def test_frozen_copy_takes_no_gradient_but_passes_it_to_its_input():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5), nn.Linear(3, 2))
    grads, modes = [], []

    def step(engine, batch):
        image, _ = batch
        teacher = engine.frozen_network("teacher")
        modes.append((engine.networks["student"].training, teacher.training))
        loss = teacher(engine.networks["student"](image)).pow(2).sum()
        engine.update(loss)

    # the source wrapped in DataParallel: the copy is of the module inside
    trainer = MultiNetworkTrainer("cpu", 1, _batches(3), networks={"student": nn.DataParallel(student)},
                                  optimizers={"opt": torch.optim.SGD(student.parameters(), 0.1)},
                                  frozen={"teacher": "student"}, train_step=step, decollate=False)
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED,
                              lambda e: grads.append(sum(float(p.grad.abs().sum()) for p in student.parameters())))
    trainer.run()
    teacher = trainer.state.frozen["teacher"]
    assert isinstance(teacher, FrozenCopy) and isinstance(teacher.network, nn.Sequential)
    assert teacher.refreshes == [1]  # made at the first iteration that asked for it
    assert all(not p.requires_grad and p.grad is None for p in teacher.network.parameters())
    assert modes == [(True, False)] * 3  # student trains (dropout on), the copy stays in eval
    assert all(g > 0 for g in grads)
    # the copy kept the weights of iteration 1 while the student moved on
    assert not torch.equal(teacher.network[0].weight, student[0].weight)
    trainer.refresh_frozen("teacher")
    assert torch.equal(teacher.network[0].weight, student[0].weight) and teacher.refreshes == [1, 3]
    # gradient through the copy's input, by hand (eval: dropout off): out = W2 (W1 h + b1) + b2,
    # d/dh sum(out^2) = 2 out W2 W1
    h = torch.tensor([[0.3, -0.7]], requires_grad=True)
    out = teacher.network(h)
    out.pow(2).sum().backward()
    w1, w2 = teacher.network[0].weight, teacher.network[2].weight
    torch.testing.assert_close(h.grad, 2 * out.detach() @ w2 @ w1)
    # the functional helper: a separate, frozen module
    c = frozen_copy(nn.DataParallel(student))
    assert c is not student and not c.training and not any(p.requires_grad for p in c.parameters())
    assert all(p.requires_grad for p in student.parameters())


def _amp_supported() -> tuple[bool, str]:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = nn.Linear(2, 2)(torch.ones(1, 2))
        torch.amp.GradScaler("cpu")
    except Exception as e:  # noqa: BLE001 - any failure means: not on this build
        return False, f"CPU autocast / GradScaler unavailable: {e}"
    return y.dtype == torch.bfloat16, "CPU autocast does not give bfloat16 on this build"


@pytest.mark.skipif(not _amp_supported()[0], reason=_amp_supported()[1])
def test_amp_on_cpu_autocasts_the_step_and_scales_each_optimiser():
    torch.manual_seed(0)
    a, b = nn.Linear(2, 4), nn.Linear(2, 4)
    dtypes, backward_autocast = [], []

    def step(engine, batch):
        image, _ = batch
        pa, pb = engine.networks["a"](image), engine.networks["b"](image)
        dtypes.append(pa.dtype)
        loss = (pa.float() - pb.float().detach()).pow(2).mean() + pb.float().pow(2).mean()
        engine.update(loss, "opt_a", "opt_b")

    before = [p.detach().clone() for p in (*a.parameters(), *b.parameters())]
    trainer = MultiNetworkTrainer("cpu", 2, _batches(2), networks={"a": a, "b": b},
                                  optimizers={"opt_a": torch.optim.SGD(a.parameters(), 0.1), "opt_b": torch.optim.SGD(b.parameters(), 0.1)},
                                  train_step=step, amp=True, amp_kwargs={"dtype": torch.bfloat16}, decollate=False)
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda e: backward_autocast.append(torch.is_autocast_enabled("cpu")))
    trainer.run()
    assert dtypes == [torch.bfloat16] * 4 and backward_autocast == [False] * 4
    assert sorted(trainer.scalers) == ["opt_a", "opt_b"]
    assert {"opt_a_scaler", "opt_b_scaler"} <= set(trainer.checkpoint_dict())
    after = [p.detach() for p in (*a.parameters(), *b.parameters())]
    assert all(torch.isfinite(p).all() and not torch.equal(p, q) for p, q in zip(after, before))
    assert a.weight.dtype == torch.float32  # parameters stay float32


class Indicators:
    """Extra state as hybrid's per-instance indicators would be: a tensor updated by the method."""

    def __init__(self, n):
        self.gamma = torch.full((n,), 0.5)

    def state_dict(self):
        return {"gamma": self.gamma.clone()}

    def load_state_dict(self, state):
        self.gamma = state["gamma"].clone()


def _trainer(seed, max_epochs=2, handlers=None):
    torch.manual_seed(seed)
    a, b = nn.Linear(2, 3), nn.Linear(2, 3)
    ind = Indicators(4)

    def step(engine, batch):
        image, _ = batch
        teacher = engine.frozen_network("ema")
        loss = (engine.networks["a"](image) - engine.networks["b"](image)).pow(2).mean() + teacher(image).mean() * 0
        loss = loss + (engine.networks["a"](image) - teacher(image)).pow(2).mean()
        engine.update(loss, "opt_a", "opt_b")
        ind.gamma += 0.125  # the method's own state changes every step
        if engine.state.iteration % 2 == 0:
            engine.refresh_frozen("ema")

    data = [{"image": torch.randn(2, 2, generator=torch.Generator().manual_seed(i)), "label": torch.zeros(2)} for i in range(2)]
    return MultiNetworkTrainer(
        "cpu", max_epochs, data, networks={"a": a, "b": b},
        optimizers={"opt_a": torch.optim.Adam(a.parameters(), 0.05), "opt_b": torch.optim.Adam(b.parameters(), 0.05)},
        frozen={"ema": "a"}, extra_state={"indicators": ind}, train_step=step, train_handlers=handlers, decollate=False,
    )  # fmt: skip


def _same_state(s, t):
    sd, td = s.state_dicts(), t.state_dicts()
    assert sd.keys() == td.keys() == {"a", "b", "opt_a", "opt_b", "ema", "indicators"}
    for net in ("a", "b"):
        assert all(torch.equal(v, td[net][k]) for k, v in sd[net].items())
    for opt in ("opt_a", "opt_b"):
        for i, st in sd[opt]["state"].items():
            assert all(torch.equal(v, td[opt]["state"][i][k]) for k, v in st.items())
    assert all(torch.equal(v, td["ema"]["weights"][k]) for k, v in sd["ema"]["weights"].items())
    assert sd["ema"]["refreshes"].tolist() == td["ema"]["refreshes"].tolist()
    assert torch.equal(sd["indicators"]["gamma"], td["indicators"]["gamma"])


def test_checkpoint_round_trip_through_state_dicts_and_monai_handlers(tmp_path):
    src = _trainer(0)
    src.run()
    assert src.state.frozen["ema"].refreshes == [1, 2, 4] and src.state_dicts()["opt_a"]["state"]
    torch.save(src.state_dicts(), tmp_path / "states.pt")
    dst = _trainer(1)  # other initial weights
    assert not torch.equal(dst.networks["a"].weight, src.networks["a"].weight)
    dst.load_state_dicts(torch.load(tmp_path / "states.pt", weights_only=True))
    _same_state(src, dst)
    with pytest.raises(KeyError, match=r"missing \['indicators'\]"):
        dst.load_state_dicts({k: v for k, v in src.state_dicts().items() if k != "indicators"})

    # MONAI's CheckpointSaver / CheckpointLoader take checkpoint_dict() as they are
    saver = CheckpointSaver(str(tmp_path), save_dict={"trainer": src, **src.checkpoint_dict()}, save_final=True, final_filename="final.pt")
    saver.attach(src)
    src.state.max_epochs = 3
    src.run()
    dst = _trainer(2, max_epochs=3)
    CheckpointLoader(str(tmp_path / "final.pt"), load_dict={"trainer": dst, **dst.checkpoint_dict()}).attach(dst)
    dst.run()  # loads on STARTED, at the last iteration: nothing left to train
    assert dst.state.iteration == src.state.iteration == 6
    _same_state(src, dst)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    whole = _trainer(0, max_epochs=3)
    whole.run()
    path = tmp_path / "checkpoint.pt"
    first = _trainer(0, max_epochs=1)  # the first epoch, then "killed"
    ResumeCheckpoint(path, first.checkpoint_dict(), interval=2).attach(first)
    first.run()
    resumed = _trainer(5, max_epochs=3)
    ResumeCheckpoint(path, resumed.checkpoint_dict(), interval=2).attach(resumed)
    resumed.run()
    assert resumed.state.iteration == 6
    _same_state(whole, resumed)


def test_bad_arguments():
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), 0.1)
    kw = dict(device="cpu", max_epochs=1, train_data_loader=_batches(1))
    with pytest.raises(ValueError, match="non-empty mapping"):
        MultiNetworkTrainer(**kw, networks={})
    with pytest.raises(TypeError, match="network 'a' must be an nn.Module"):
        MultiNetworkTrainer(**kw, networks={"a": "net"})
    with pytest.raises(TypeError, match="optimizer 'o' must be a torch.optim.Optimizer"):
        MultiNetworkTrainer(**kw, networks={"a": net}, optimizers={"o": None})
    with pytest.raises(ValueError, match="already used"):
        MultiNetworkTrainer(**kw, networks={"a": net}, optimizers={"a": opt})
    with pytest.raises(ValueError, match="reserved"):
        MultiNetworkTrainer(**kw, networks={"trainer": net})
    with pytest.raises(ValueError, match="no network named 'b'"):
        MultiNetworkTrainer(**kw, networks={"a": net}, frozen={"t": "b"})
    with pytest.raises(ValueError, match="separate copy"):
        MultiNetworkTrainer(**kw, networks={"a": net}, frozen={"t": ("a", net)})
    with pytest.raises(TypeError, match="state_dict and load_state_dict"):
        MultiNetworkTrainer(**kw, networks={"a": net}, extra_state={"x": object()})
    trainer = MultiNetworkTrainer(**kw, networks={"a": net}, optimizers={"o": opt},
                                  train_step=lambda e, b: e.update(e.networks["a"](b[0]).sum(), "p"))
    with pytest.raises(ValueError, match="no optimiser named 'p'"):
        trainer.run()
    with pytest.raises(NotImplementedError, match="train_step"):
        MultiNetworkTrainer(**kw, networks={"a": net}).run()


def test_doctests():
    assert doctest.testmod(mn_module).failed == 0
