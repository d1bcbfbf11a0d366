"""AtlasTrainer: the update order (APRN's gradients never reach the main network; AMAN's reach it
only through the adversarial term; the main loss never reaches APRN or AMAN), the ablation's
eight arms as flags, prototypes and every network / optimiser restored on resume, a tiny 3D
CT + MR toy where the loss falls, and bad input refused with a message naming it."""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Events

from partialseg.engines import AtlasTrainer, MultiNetworkEvents, ResumeCheckpoint, modality_classes_from_datalist
from partialseg.losses import AtlasLoss
from partialseg.networks import AtlasDiscriminator, AtlasRefiner, AtlasUNet, PrototypeAnchoring

S = 16


def _case(g, modality):
    """A 16^3 image with organ 1 (upper left) and organ 2 (lower right); CT labels organ 1, MR organ 2."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(S, dtype=torch.float32)] * 3, indexing="ij"))
    c1 = torch.tensor([5.0, 5.0, 8.0]) + torch.rand(3, generator=g) * 2
    c2 = torch.tensor([11.0, 11.0, 8.0]) + torch.rand(3, generator=g) * 2
    m1 = ((grid - c1.view(3, 1, 1, 1)) ** 2).sum(0).sqrt() <= 3
    m2 = ((grid - c2.view(3, 1, 1, 1)) ** 2).sum(0).sqrt() <= 3
    a, b = (1.0, 2.0) if modality == "CT" else (2.0, -1.0)  # another contrast order in MR
    image = a * m1.float() + b * m2.float() + 0.2 * torch.randn(S, S, S, generator=g)
    lab, other = (m1, m2) if modality == "CT" else (m2, m1)
    label = torch.full((3, S, S, S), 0.5)
    k = 1 if modality == "CT" else 2
    label[k] = lab.float()
    label[0] = torch.where(lab, 0.0, 0.5)
    label[3 - k] = torch.where(lab, 0.0, 0.5)
    return image[None], label, torch.stack([m1, m2]).float()


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches, masks = [], []
    for _ in range(n):
        cases = [_case(g, m) for m in ("CT", "MR")]
        batches.append({"image": torch.stack([c[0] for c in cases]), "label": torch.stack([c[1] for c in cases]), "modality": ["CT", "MR"]})
        masks += [c[2] for c in cases]
    atlas = torch.stack(masks).mean(0)
    for b in batches:
        b["atlas"] = atlas[None].repeat(2, 1, 1, 1, 1)
    return batches


def _modules(seed=0):
    torch.manual_seed(seed)
    net = AtlasUNet(3, 1, 3, filters=(8, 8, 16, 16), norm_name="instance", feature_levels=2)
    return {
        "network": net,
        "refiner": AtlasRefiner(3, filters=(4, 8, 8), norm_name="instance", erase_patches=1, erase_size=3),
        "discriminator": AtlasDiscriminator(3, channels=(4, 8, 8), scale=1.0),
        "prototypes": PrototypeAnchoring(3, net.feature_channels, num_heads=2),
    }


def _trainer(data, modules, epochs=1, aman=True, aprn=True, micpam=True, loss=None, lr=1e-2, **kwargs):
    m = modules
    return AtlasTrainer(
        "cpu", epochs, data, m["network"], torch.optim.Adam(m["network"].parameters(), lr), loss or AtlasLoss(),
        m["refiner"], torch.optim.Adam(m["refiner"].parameters(), lr),
        m["discriminator"], torch.optim.Adam(m["discriminator"].parameters(), 1e-3),
        m["prototypes"], torch.optim.Adam(m["prototypes"].parameters(), lr),
        modality_classes={"CT": [1], "MR": [2]}, aman=aman, aprn=aprn, micpam=micpam, decollate=False, optim_set_to_none=True, **kwargs,
    )


def _grads(net):
    return [None if p.grad is None else p.grad.clone() for p in net.parameters()]


def _same(a, b):
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(a, b))


def test_update_order_and_where_each_gradient_goes():
    mods = _modules()
    trainer = _trainer(_batches(1), mods)
    snaps = []
    trainer.add_event_handler(
        MultiNetworkEvents.OPTIMIZER_COMPLETED, lambda e: snaps.append((e.state.updated, {k: _grads(v) for k, v in mods.items()}))
    )
    trainer.run()
    assert [s[0] for s in snaps] == [("refiner_optimizer",), ("optimizer", "prototypes_optimizer"), ("discriminator_optimizer",)]
    (_, after_r), (_, after_m), (_, after_d) = snaps
    # APRN step: only the refiner has gradients (its input is p detached)
    assert all(g is not None for g in after_r["refiner"])
    assert all(g is None for g in after_r["network"] + after_r["discriminator"] + after_r["prototypes"])
    # main step: the main network and the MICPAM projections; the refiner's gradients are APRN's own
    # (the pseudo-labels carry none) and the discriminator, frozen for L_adv, has none
    assert all(g is not None for g in after_m["network"]) and all(g is not None for g in after_m["prototypes"])
    assert _same(after_m["refiner"], after_r["refiner"])
    assert all(g is None for g in after_m["discriminator"])
    # AMAN step: only the discriminator's gradients change; the main network keeps the main step's
    assert all(g is not None for g in after_d["discriminator"])
    assert _same(after_d["network"], after_m["network"]) and _same(after_d["refiner"], after_m["refiner"])
    assert _same(after_d["prototypes"], after_m["prototypes"])


def test_aman_reaches_the_main_network_only_through_the_adversarial_term():
    data = _batches(1)
    base = _modules()

    def main_grads(aman, lambda_adv):
        mods = copy.deepcopy(base)
        trainer = _trainer(data, mods, aman=aman, aprn=False, micpam=False, loss=AtlasLoss(lambda_adv=lambda_adv))
        out = {}
        trainer.add_event_handler(
            MultiNetworkEvents.OPTIMIZER_COMPLETED,
            lambda e: out.setdefault("g", _grads(mods["network"])) if e.state.updated == ("optimizer",) else None,
        )
        trainer.run()
        return out["g"]

    without = main_grads(False, 0.01)
    assert _same(main_grads(True, 0.0), without)  # AMAN on, no adversarial term: the main step is unchanged
    with_adv = main_grads(True, 0.01)
    assert not _same(with_adv, without)  # through L_adv only
    assert not _same(main_grads(True, 1.0), with_adv)  # and in proportion to its weight


@pytest.mark.parametrize(
    "aman,aprn,micpam",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True),
     (True, True, False), (False, True, True), (True, False, True), (True, True, True)],
)
def test_the_ablation_arms_are_flags(aman, aprn, micpam):
    trainer = _trainer(_batches(1), _modules(), aman=aman, aprn=aprn, micpam=micpam)
    trainer.run()
    names = {"network", "optimizer"}
    names |= {"refiner", "refiner_optimizer"} if aprn else set()
    names |= {"discriminator", "discriminator_optimizer"} if aman else set()
    names |= {"prototypes", "prototypes_optimizer"} if micpam else set()
    assert set(trainer.checkpoint_dict()) == names
    out = trainer.state.output
    assert (out["loss_refiner"] > 0) == aprn and (out["loss_discriminator"] > 0) == aman and (out["adv"] > 0) == aman
    assert (out["pseudo"] > 0) == aprn and (out["proto"] > 0) == micpam
    assert out["pred"].shape == (2, 3, S, S, S)


def test_a_resumed_run_restores_the_prototypes_and_every_network_and_optimiser(tmp_path):
    data = _batches(2)
    whole = _modules(seed=3)
    _trainer(data, whole, epochs=2).run()

    path = tmp_path / "ckpt.pt"
    first = _modules(seed=3)
    t1 = _trainer(data, first, epochs=1)
    ResumeCheckpoint(path, t1.checkpoint_dict(), interval=1).attach(t1)
    t1.run()
    resumed = _modules(seed=7)  # other initial weights and prototypes: everything must come from the file
    t2 = _trainer(data, resumed, epochs=2)
    loaded = {}
    t2.add_event_handler(Events.ITERATION_STARTED, lambda e: loaded.setdefault("p", resumed["prototypes"].prototypes(0).clone()))
    ResumeCheckpoint(path, t2.checkpoint_dict(), interval=1).attach(t2)
    t2.run()
    assert t2.state.iteration == 4
    assert torch.equal(loaded["p"], first["prototypes"].prototypes(0))  # restored before the first resumed step
    for name in whole:
        a, b = whole[name].state_dict(), resumed[name].state_dict()
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a), name
    assert resumed["prototypes"].updates_0.tolist() == whole["prototypes"].updates_0.tolist()
    assert int(resumed["prototypes"].updates_0[1]) == 4  # organ 1 is labelled (CT) in every batch


def test_a_tiny_ct_mr_toy_learns():
    torch.manual_seed(0)
    trainer = _trainer(_batches(8), _modules(), epochs=3, refiner_augment=True)
    history = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: history.append({k: float(e.state.output[k].detach()) for k in ("loss", "seg", "loss_refiner")}))
    trainer.run()
    first, last = history[:4], history[-4:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    assert mean(last, "seg") < 0.5 * mean(first, "seg")
    assert mean(last, "loss") < 0.8 * mean(first, "loss")
    assert mean(last, "loss_refiner") < mean(first, "loss_refiner")


def test_bad_input_is_refused_with_a_message_naming_it():
    data = _batches(1)
    with pytest.raises(ValueError, match="refiner or refiner_optimizer"):
        AtlasTrainer("cpu", 1, data, _modules()["network"], torch.optim.SGD(_modules()["network"].parameters(), 0.1), aman=False, micpam=False)
    mods = _modules()
    with pytest.raises(ValueError, match="prototypes' parameters are in no optimiser"):
        AtlasTrainer("cpu", 1, data, mods["network"], torch.optim.SGD(mods["network"].parameters(), 0.1), prototypes=mods["prototypes"], aman=False, aprn=False)
    with pytest.raises(ValueError, match="modality_classes"):
        AtlasTrainer("cpu", 1, data, mods["network"], torch.optim.SGD(mods["network"].parameters(), 0.1), discriminator=mods["discriminator"],
                     discriminator_optimizer=torch.optim.SGD(mods["discriminator"].parameters(), 0.1), aprn=False, micpam=False)
    bad_atlas = [dict(data[0], atlas=data[0]["atlas"][:, :1])]
    with pytest.raises(ValueError, match="one channel per organ"):
        _trainer(bad_atlas, _modules()).run()
    bad_modality = [dict(data[0], modality=["CT", "PET"])]
    with pytest.raises(ValueError, match="'PET' is missing"):
        _trainer(bad_modality, _modules()).run()
    with pytest.raises(KeyError, match="atlas"):
        _trainer([{k: v for k, v in data[0].items() if k != "atlas"}], _modules()).run()
    dl = [{"case": "a", "annotated": [1], "modality": "CT"}, {"case": "b", "annotated": [1]}]
    with pytest.raises(ValueError, match="'b' has no 'modality'"):
        modality_classes_from_datalist(dl, ["background", "liver", "spleen"])
    with pytest.raises(ValueError, match=r"no training case annotates \['spleen'\]"):
        modality_classes_from_datalist(dl[:1], ["background", "liver", "spleen"])
    assert modality_classes_from_datalist([dict(dl[0], source="ct1"), {"annotated": [2], "source": "mr"}], ["bg", "liver", "spleen"], key="source") == {
        "ct1": [1], "mr": [2]}


def test_the_adversarial_term_computes_only_the_cross_modal_pairs_with_the_same_value():
    mods = _modules()
    trainer = _trainer(_batches(1), mods)
    prob, atlas = torch.rand(2, 2, S, S, S), torch.rand(2, 2, S, S, S)
    indicator = trainer.modality_indicator(["CT", "MR"], 2, 2, "cpu")
    assert indicator.tolist() == [[True, False], [False, True]]
    full = trainer.discriminator_logits(prob, atlas, frozen=True)
    some = trainer.discriminator_logits(prob, atlas, frozen=True, pairs=~indicator)
    assert torch.allclose(some[~indicator], full[~indicator], atol=1e-6) and torch.equal(some[indicator], torch.zeros(2))
    loss = AtlasLoss()
    assert loss.adversarial(some, indicator).item() == pytest.approx(loss.adversarial(full, indicator).item(), rel=1e-6)
    assert all(p.requires_grad for p in mods["discriminator"].parameters())  # unfrozen again after the frozen pass


def test_amp_keeps_the_losses_and_the_prototype_sums_in_float32():
    # under autocast the marginal L_seg and the prototypes' masked sums run over every voxel: they
    # are computed in float32 outside autocast. On CUDA (float16) they overflowed to NaN before
    # (seen on an H200, docs/atlas.md); here, on CPU (bfloat16), the test checks that the AMP path
    # runs, one GradScaler per optimiser, and that the prototypes stay float32 and finite.
    mods = _modules()
    trainer = _trainer(_batches(2), mods, amp=True)
    trainer.run()
    out = trainer.state.output
    assert all(bool(torch.isfinite(out[k])) for k in ("loss", "seg", "pseudo", "adv", "proto", "loss_refiner", "loss_discriminator"))
    assert mods["prototypes"].prototypes(0).dtype == torch.float32 and bool(torch.isfinite(mods["prototypes"].prototypes(0)).all())
    assert sorted(trainer.scalers) == ["discriminator_optimizer", "optimizer", "prototypes_optimizer", "refiner_optimizer"]


def test_a_batch_without_labelled_organs_skips_aprn_alone_and_joins_with_zero_under_distributed(tmp_path):
    data = _batches(1)
    unlabelled = [dict(data[0], label=torch.full_like(data[0]["label"], 0.5))]
    mods = _modules()
    steps = []
    trainer = _trainer(unlabelled, mods)
    trainer.add_event_handler(MultiNetworkEvents.OPTIMIZER_COMPLETED, lambda e: steps.append(e.state.updated))
    trainer.run()
    assert ("refiner_optimizer",) not in steps and float(trainer.state.output["loss_refiner"]) == 0.0
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        steps.clear()
        mods = _modules()
        trainer = _trainer(unlabelled, mods)
        trainer.add_event_handler(
            MultiNetworkEvents.OPTIMIZER_COMPLETED, lambda e: steps.append((e.state.updated, _grads(mods["refiner"])))
        )
        trainer.run()  # the prototypes' all_reduce runs too
        refiner_steps = [g for u, g in steps if u == ("refiner_optimizer",)]
        assert len(refiner_steps) == 1 and all(g is not None and not bool(g.any()) for g in refiner_steps[0])
    finally:
        torch.distributed.destroy_process_group()
