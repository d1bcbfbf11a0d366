"""DTMLTrainer: the step of each network is the gradient of its own equation (Eq. 5 for M_s, Eq. 6
for M_d), L_con alone moves both networks, the ramp follows the iteration, a tiny 3D toy learns
(loss falls, M_d's output is negative inside and positive outside the object), and a resumed run
ends where an uninterrupted one does (both networks, both optimisers, ramp position)."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from ignite.engine import Events
from monai.networks.nets import UNet
from scipy import ndimage as ndi
from torch import nn

import partialseg.engines.dtml as dtml_module
from partialseg.engines import DTMLTrainer, ResumeCheckpoint
from partialseg.losses import DTMLLoss, consistency_ramp
from partialseg.networks import SignedDistanceNet

S = 16  # toy volume side


def _sphere(g):
    centre = torch.rand(3, generator=g) * 6 + 5
    radius = float(torch.rand(1, generator=g) * 2 + 3)
    grid = torch.stack(torch.meshgrid(*[torch.arange(S, dtype=torch.float32)] * 3, indexing="ij"))
    mask = ((grid - centre.view(3, 1, 1, 1)) ** 2).sum(0).sqrt() <= radius
    image = mask.float() * 2 - 1 + 0.3 * torch.randn(S, S, S, generator=g)
    return image, mask.float()


def _toy_batches(n, seed):
    """n batches of 2 labelled + 2 unlabelled (all-p) 16^3 spheres, as a TwoStreamBatchSampler gives."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        images, labels = [], []
        for j in range(4):
            image, mask = _sphere(g)
            images.append(image[None])
            labels.append(torch.stack([1 - mask, mask]) if j < 2 else torch.full((2, S, S, S), 0.5))
        batches.append({"image": torch.stack(images), "label": torch.stack(labels)})
    return batches


def _record(trainer, keys=("loss", "seg", "mask", "con", "con_weight")):
    history = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: history.append({k: float(e.state.output[k].detach()) for k in keys}))
    return history


def test_each_network_steps_by_the_gradient_of_its_own_equation():
    torch.manual_seed(0)
    seg, sdm = nn.Conv3d(1, 2, 3, padding=1), SignedDistanceNet(nn.Conv3d(1, 2, 3, padding=1))
    x = torch.randn(2, 1, 4, 4, 4)
    label = torch.full((2, 3, 4, 4, 4), 0.5)
    label[0] = 0.0
    label[0, 0, :2], label[0, 1, 2:, :2], label[0, 2, 2:, 2:] = 1.0, 1.0, 1.0  # case 0 fully labelled, case 1 unlabelled
    loss_fn = DTMLLoss(k=20.0, consistency_weight=3.0, ramp_length=0.0)
    # Eq. 5: M_s minimises L_seg + w L_con; Eq. 6: M_d minimises L_mask + w L_con (w = 3 without ramp)
    seg_ref, sdm_ref = copy.deepcopy(seg), copy.deepcopy(sdm)
    out = loss_fn(seg_ref(x), sdm_ref(x), label)
    g_seg = torch.autograd.grad(out["seg"] + 3.0 * out["con"], list(seg_ref.parameters()), retain_graph=True)
    g_sdm = torch.autograd.grad(out["mask"] + 3.0 * out["con"], list(sdm_ref.parameters()))
    before = [p.detach().clone() for p in (*seg.parameters(), *sdm.parameters())]
    trainer = DTMLTrainer("cpu", 1, [{"image": x, "label": label}], seg, sdm, torch.optim.SGD(seg.parameters(), 1.0),
                          torch.optim.SGD(sdm.parameters(), 1.0), loss_fn, decollate=False)  # fmt: skip
    trainer.run()
    for p0, p1, g in zip(before, [*seg.parameters(), *sdm.parameters()], [*g_seg, *g_sdm]):
        assert torch.allclose(p0 - p1, g, atol=1e-6)
    assert trainer.state.output["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_consistency_alone_moves_both_networks_and_the_ramp_follows_the_iteration():
    torch.manual_seed(1)
    seg, sdm = nn.Conv3d(1, 1, 1), SignedDistanceNet(nn.Conv3d(1, 1, 1))
    with torch.no_grad():
        sdm.backbone.weight.mul_(1e-3)  # keep M_d's mask off saturation so L_con has a gradient
        sdm.backbone.bias.zero_()
    data = [{"image": torch.randn(2, 1, 3, 3, 3), "label": torch.full((2, 2, 3, 3, 3), 0.5)}] * 4  # nothing labelled
    before = [p.detach().clone() for p in (*seg.parameters(), *sdm.parameters())]
    trainer = DTMLTrainer("cpu", 1, data, seg, sdm, torch.optim.SGD(seg.parameters(), 0.1), torch.optim.SGD(sdm.parameters(), 1e-6),
                          DTMLLoss(ramp_scale=1.0, ramp_length=10.0), decollate=False)  # fmt: skip
    history = _record(trainer)
    trainer.run()
    assert all(h["seg"] == h["mask"] == 0.0 and h["con"] > 0 for h in history)
    assert not torch.equal(before[0], seg.weight) and not torch.equal(before[2], sdm.backbone.weight)
    # t = iterations done before this one: w(0), w(1), w(2), w(3)
    assert [h["con_weight"] for h in history] == pytest.approx([consistency_ramp(t, 1.0, 1.0, 10.0) for t in range(4)])


@pytest.mark.parametrize("mask_ce", [False, True])
def test_a_tiny_3d_toy_learns_and_m_d_gives_an_sdm_of_the_right_sign(mask_ce):
    torch.manual_seed(0)

    def backbone():
        return UNet(3, 1, 1, channels=(8, 16), strides=(2,), num_res_units=0)

    seg, sdm = backbone(), SignedDistanceNet(backbone())
    loss = DTMLLoss(ramp_scale=1.0, ramp_length=10.0, mask_ce=mask_ce)
    trainer = DTMLTrainer("cpu", 8, _toy_batches(8, seed=0), seg, sdm, torch.optim.Adam(seg.parameters(), 1e-2),
                          torch.optim.Adam(sdm.parameters(), 1e-2), loss, decollate=False)  # fmt: skip
    history = _record(trainer)
    trainer.run()  # 64 iterations of 2 labelled + 2 unlabelled volumes
    first, last = history[:8], history[-8:]
    mean = lambda hs, k: sum(h[k] for h in hs) / len(hs)  # noqa: E731
    assert mean(last, "seg") < 0.3 * mean(first, "seg") and mean(last, "mask") < 0.6 * mean(first, "mask")
    assert mean(last, "con") < 0.5 * mean(first, "con")

    seg.eval(), sdm.eval()
    inside, outside, accuracy = [], [], []
    for case in range(100, 104):  # unseen cases
        image, mask = _sphere(torch.Generator().manual_seed(case))
        with torch.no_grad():
            s = sdm(image[None, None])[0, 0]
            prob = torch.sigmoid(seg(image[None, None]))[0, 0]
        m = mask.numpy().astype(bool)  # away from the boundary: eroded interior, exterior beyond one voxel
        interior, exterior = torch.from_numpy(ndi.binary_erosion(m)), torch.from_numpy(~ndi.binary_dilation(m))
        inside.append((s[interior] < 0).float().mean())
        outside.append((s[exterior] > 0).float().mean())
        accuracy.append(((prob > 0.5).float() == mask).float().mean())
    assert min(outside) > 0.95 and min(accuracy) > 0.95
    # the Dice-only L_mask (the reference code's) can leave holes in M_d's object (interior voxels
    # saturated at tanh ~ +1, where sigmoid(-1500 s) passes no gradient; docs/dtml.md): on this toy
    # 75-100 % of the interior is negative; with its BCE (mask_ce) all of it is
    assert min(inside) > (0.95 if mask_ce else 0.6) and sum(inside) / len(inside) > (0.99 if mask_ce else 0.7)


def _resumable(seed, max_epochs, path=None):
    torch.manual_seed(seed)
    seg, sdm = nn.Conv3d(1, 1, 3, padding=1), SignedDistanceNet(nn.Conv3d(1, 1, 3, padding=1))
    data = _toy_batches(2, seed=3)
    trainer = DTMLTrainer("cpu", max_epochs, [{k: v[:, :, :6, :6, :6] for k, v in b.items()} for b in data], seg, sdm,
                          torch.optim.SGD(seg.parameters(), 0.05, momentum=0.9), torch.optim.Adam(sdm.parameters(), 1e-2),
                          DTMLLoss(k=50.0, ramp_scale=1.0, ramp_length=10.0), decollate=False)  # fmt: skip
    if path is not None:
        ResumeCheckpoint(path, trainer.checkpoint_dict(), interval=1).attach(trainer)
    return trainer, _record(trainer, ("con_weight", "loss"))


def test_a_resumed_run_keeps_both_networks_optimisers_and_the_ramp_position(tmp_path):
    whole, whole_history = _resumable(0, max_epochs=3)
    whole.run()
    path = tmp_path / "checkpoint.pt"
    first, _ = _resumable(0, max_epochs=1, path=path)  # the first epoch, then "killed"
    first.run()
    resumed, history = _resumable(7, max_epochs=3, path=path)  # other initial weights
    assert sorted(resumed.checkpoint_dict()) == ["sdm", "sdm_optimizer", "seg", "seg_optimizer"]
    resumed.run()
    assert resumed.state.iteration == whole.state.iteration == 6
    # the resumed iterations 3..6 continue the ramp at t = 2..5 with the same losses
    assert [h["con_weight"] for h in history] == pytest.approx([h["con_weight"] for h in whole_history[2:]])
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in whole_history[2:]], rel=1e-5)
    a, b = whole.state_dicts(), resumed.state_dicts()
    for net in ("seg", "sdm"):
        assert all(torch.allclose(v, b[net][k]) for k, v in a[net].items())
    for opt in ("seg_optimizer", "sdm_optimizer"):
        for i, st in a[opt]["state"].items():
            assert all(torch.allclose(torch.as_tensor(v), torch.as_tensor(b[opt]["state"][i][k])) for k, v in st.items())


def test_bad_arguments_and_batches():
    net, other = nn.Conv3d(1, 1, 1), nn.Conv3d(1, 1, 1)
    opt, opt2 = torch.optim.SGD(net.parameters(), 0.1), torch.optim.SGD(other.parameters(), 0.1)
    kw = dict(device="cpu", max_epochs=1, loss_function=DTMLLoss())
    with pytest.raises(ValueError, match="one module"):
        DTMLTrainer(train_data_loader=[], seg_network=net, sdm_network=net, seg_optimizer=opt, sdm_optimizer=opt2, **kw)
    with pytest.raises(ValueError, match="one optimiser"):
        DTMLTrainer(train_data_loader=[], seg_network=net, sdm_network=other, seg_optimizer=opt, sdm_optimizer=opt, **kw)
    with pytest.raises(TypeError, match="loss_function must be callable"):
        DTMLTrainer("cpu", 1, [], net, other, opt, opt2, loss_function="dtml")
    trainer = DTMLTrainer(train_data_loader=[{"image": torch.zeros(1, 1, 2, 2, 2)}], seg_network=net, sdm_network=other,
                          seg_optimizer=opt, sdm_optimizer=opt2, decollate=False, **kw)  # fmt: skip
    with pytest.raises(KeyError, match=r"lacks \['label'\].*all-p"):
        trainer.run()
    trainer = DTMLTrainer(train_data_loader=[{"image": torch.zeros(1, 1, 2, 2, 2), "label": torch.zeros(1, 1, 2, 2, 2)}], seg_network=net,
                          sdm_network=other, seg_optimizer=opt, sdm_optimizer=opt2, decollate=False, **kw)  # fmt: skip
    with pytest.raises(ValueError, match=r"target shape \(1, 1, 2, 2, 2\) does not fit"):
        trainer.run()


def test_doctests():
    assert doctest.testmod(dtml_module).failed == 0
