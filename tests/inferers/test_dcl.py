"""ConditionalInferer / SupportBank: K-set averaging, sliding windows aligned with the conditions,
save / load with the model, reproducible draws, bad arguments."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer
from torch import nn

import partialseg.inferers.dcl as inferer_module
from partialseg.data.dcl import SupportBank
from partialseg.inferers import ConditionalInferer
from partialseg.networks import CompNet, compnet_segment, pack_conditional_input
from partialseg.transforms import PartialLabelToVector

M, C = 3, 1


def _bank(n_per_class=2, size=(24, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * M
    images = torch.rand(n, C, *size, generator=g)
    labels = (torch.rand(n, *size, generator=g) > 0.5).float()
    return SupportBank(images, labels, torch.arange(n) % M, num_classes=M)


def _pointwise_net(seed=0):
    torch.manual_seed(seed)
    return CompNet(2, C, M, backbone=nn.Conv2d(C * (1 + M) + M, 2 * M, 1)).eval()


def test_average_over_k_sets_by_hand():
    bank, net = _bank(), _pointwise_net()
    x = torch.rand(2, C, 24, 24)
    inf = ConditionalInferer(bank, num_samples=3, seed=5)
    with torch.no_grad():
        out = inf(x, net)
        manual = []
        for k in range(3):
            ci, cl = inf.conditions(k, x)
            assert ci.shape == (2, M * C, 24, 24) and cl.shape == (2, M, 24, 24)
            manual.append(compnet_segment(net(pack_conditional_input(x, ci, cl))))
    torch.testing.assert_close(out, torch.stack(manual).mean(0))
    torch.testing.assert_close(out.sum(1), torch.ones(2, 24, 24))
    # each set takes one entry of class j for condition j
    rng = np.random.default_rng([5, 1])
    idx = [pool[int(rng.integers(len(pool)))] for pool in bank.pools]
    assert bank.classes[idx].tolist() == list(range(M))
    torch.testing.assert_close(inf.conditions(1, x)[1][0], bank.labels[idx])
    # different K sets differ, the same seed repeats
    with torch.no_grad():
        assert not torch.allclose(ConditionalInferer(bank, 1, seed=5)(x, net), ConditionalInferer(bank, 1, seed=6)(x, net))
        torch.testing.assert_close(ConditionalInferer(bank, 3, seed=5)(x, net), out)


def test_drawn_sets_are_kept_per_grid_and_equal_fresh_draws():
    bank = _bank(size=(24, 24))
    inf = ConditionalInferer(bank, num_samples=2, seed=3)
    x = torch.rand(2, C, 24, 24)
    first = [inf.conditions(k, x) for k in range(2)]
    again = [inf.conditions(k, x) for k in range(2)]
    for (ci, cl), (ci2, cl2), k in zip(first, again, range(2)):
        assert ci2.data_ptr() == ci.data_ptr() and cl2.data_ptr() == cl.data_ptr()  # kept, not redrawn
        fresh = ConditionalInferer(bank, num_samples=2, seed=3)._draw(k, x)
        torch.testing.assert_close(ci[0], fresh[0])
        torch.testing.assert_close(cl[1], fresh[1])
    # another grid: resized sets for it, the old grid's sets dropped
    y = torch.rand(1, C, 12, 12)
    ci, cl = inf.conditions(0, y)
    assert ci.shape == (1, M * C, 12, 12) and set(cl.unique().tolist()) <= {0.0, 1.0}
    assert {key[1] for key in inf._cache} == {(12, 12)}
    # a batch of a different size reuses the set of its grid
    assert inf.conditions(0, torch.rand(3, C, 12, 12))[0].data_ptr() == ci.data_ptr()


def test_sliding_window_crops_target_and_conditions_together():
    # a pointwise network gives the same output on any window if (and only if) every window
    # sees the target and its conditions at the same positions
    bank, net = _bank(), _pointwise_net()
    x = torch.rand(1, C, 24, 24)
    with torch.no_grad():
        whole = ConditionalInferer(bank, 2, inferer=SimpleInferer())(x, net)
        windows = ConditionalInferer(bank, 2, inferer=SlidingWindowInferer(roi_size=(8, 8), sw_batch_size=3, overlap=0.25))(x, net)
    torch.testing.assert_close(windows, whole)


def test_sliding_window_with_a_unet_shapes():
    bank = _bank()
    net = CompNet(2, C, M, backbone_kwargs={"channels": (4, 8), "strides": (2,)}).eval()
    with torch.no_grad():
        out = ConditionalInferer(bank, 2, inferer=SlidingWindowInferer(roi_size=(16, 16), overlap=0.5, mode="gaussian"))(torch.rand(2, C, 24, 24), net)
    assert out.shape == (2, M, 24, 24)


def test_save_load_round_trip(tmp_path):
    bank, net = _bank(), _pointwise_net()
    path = tmp_path / "support_bank.pt"
    bank.save(path)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    loaded = SupportBank.load(path)
    for k, v in bank.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    x = torch.rand(1, C, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(ConditionalInferer(str(path), 2)(x, net), ConditionalInferer(bank, 2)(x, net))


def _square_bank(size, lo, hi):
    """A bank whose every entry is a bright square [lo, hi) with the same square as label."""
    images = torch.zeros(M, C, size, size)
    images[:, :, lo:hi, lo:hi] = 1.0
    return SupportBank(images, images[:, 0].clone(), torch.arange(M), num_classes=M)


def test_pad_resize_or_reject_other_grids():
    net = _pointwise_net()
    x = torch.rand(1, C, 40, 40)
    # default "pad": centrally padded (or cropped), a structure keeps its size in voxels
    ci, cl = ConditionalInferer(_square_bank(20, 6, 14), 1).conditions(0, x)
    assert ci.shape[2:] == cl.shape[2:] == (40, 40)
    assert cl[0, 0].sum() == 64 and cl[0, 0, 16:24, 16:24].all()  # 8 x 8, shifted by the 10-voxel margin
    torch.testing.assert_close(ci[0, 0], cl[0, 0])
    ci, cl = ConditionalInferer(_square_bank(60, 26, 34), 1).conditions(0, x)  # larger bank: cropped
    assert cl[0, 0].sum() == 64 and cl[0, 0, 16:24, 16:24].all()
    # "resize" scales by 2: 16 x 16, and label and image stay aligned (nearest-exact, voxel centres)
    ci, cl = ConditionalInferer(_square_bank(20, 6, 14), 1, match="resize").conditions(0, x)
    assert cl[0, 0].sum() == 256 and cl[0, 0, 12:28, 12:28].all()
    assert set(cl.unique().tolist()) <= {0.0, 1.0}
    assert ((ci[0, 0] > 0.5) == (cl[0, 0] > 0)).all()
    for size, lo in ((96, 30), (96, 31), (96, 47)):  # odd factors: 96 -> 40
        _, clr = ConditionalInferer(_square_bank(size, lo, lo + 15), 1, match="resize").conditions(0, x)
        cir = ConditionalInferer(_square_bank(size, lo, lo + 15), 1, match="resize").conditions(0, x)[0]
        rows_label = clr[0, 0].any(1).nonzero().flatten()
        rows_image = (cir[0, 0] > 0.5).any(1).nonzero().flatten()
        assert rows_label.tolist() == rows_image.tolist(), (size, lo)
    with torch.no_grad():
        assert ConditionalInferer(_bank(size=(12, 12)), 1)(x, net).shape == (1, M, 40, 40)
    with pytest.raises(ValueError, match="grid"):
        ConditionalInferer(_bank(size=(12, 12)), 1, match="error")(x, net)
    with pytest.raises(ValueError, match="2D cases"):
        ConditionalInferer(_bank(), 1)(torch.rand(1, C, 8, 8, 8), net)


def test_bank_and_network_must_agree_on_classes():
    with pytest.raises(ValueError, match="support bank has 3 classes, the network 4"):
        ConditionalInferer(_bank())(torch.rand(1, C, 24, 24), CompNet(2, C, 4, backbone=nn.Conv2d(C * 5 + 4, 8, 1)))


def test_from_dataset_takes_annotated_cases():
    rng = np.random.default_rng(0)
    annotated = [[1], [2], [0], [1], "all", []]
    gts = [rng.integers(0, M, size=(1, 8, 8)) for _ in annotated]
    cases = [{"image": torch.full((1, 8, 8), float(i)), "label": torch.as_tensor(PartialLabelToVector(M)(g, a))} for i, (g, a) in enumerate(zip(gts, annotated))]
    bank = SupportBank.from_dataset(cases, M, annotated=annotated, per_class=2, seed=1)
    for img, lab, c in zip(bank.images, bank.labels, bank.classes.tolist()):
        i = int(img[0, 0, 0])
        assert annotated[i] == "all" or c in annotated[i]
        torch.testing.assert_close(lab, torch.as_tensor(gts[i][0] == c, dtype=torch.float32))
    assert sorted(bank.classes.tolist()) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"^background \(0\): held in no case"):
        SupportBank.from_dataset(cases[:2], M, annotated=annotated[:2])
    assert SupportBank.from_dataset(cases[:2], M, annotated=annotated[:2], missing="any").num_classes == M

    class Counting(list):
        calls = 0

        def __getitem__(self, i):
            Counting.calls += 1
            return list.__getitem__(self, i)

    SupportBank.from_dataset(Counting(cases), M, annotated=annotated, per_class=4, seed=1, pools="annotated")
    assert Counting.calls == 5  # each case picked is loaded once (5 cases annotate something), not once per class
    Counting.calls = 0
    SupportBank.from_dataset(Counting(cases), M, annotated=annotated, per_class=4, seed=1)
    assert Counting.calls == 10  # pools="present": every annotating case read once for its classes, then the picked ones
    with pytest.raises(ValueError, match=r"case \d: 'label' must be the <0,p,1> map with 3 channels"):
        SupportBank.from_dataset([{"image": c["image"], "label": torch.zeros(1, 8, 8)} for c in cases], M, annotated=annotated)


BAD_BANKS = [
    (lambda: SupportBank(torch.rand(3, 1, 4, 4), torch.ones(3, 4, 4), torch.tensor([0, 1, 1]), 3), "no support entry"),
    (lambda: SupportBank(torch.rand(3, 1, 4, 4), torch.ones(3, 4, 5), torch.tensor([0, 1, 2]), 3), "expected"),
    (lambda: SupportBank(torch.rand(3, 1, 4, 4), 2 * torch.ones(3, 4, 4), torch.tensor([0, 1, 2]), 3), r"\[0, 1\]"),
    (lambda: SupportBank(torch.rand(3, 1, 4, 4), torch.ones(3, 4, 4), torch.tensor([0, 1, 3]), 3), "outside"),
    (lambda: SupportBank(torch.rand(3, 1, 4, 4), torch.ones(3, 4, 4), torch.tensor([0, 1, 2]), 1), "num_classes"),
    (lambda: ConditionalInferer(_bank(), num_samples=0), "num_samples"),
    (lambda: ConditionalInferer(_bank(), seed=-1), "seed"),
    (lambda: ConditionalInferer(_bank(), match="crop"), "match"),
]


@pytest.mark.parametrize("make, match", BAD_BANKS)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
    with pytest.raises(TypeError):
        ConditionalInferer(object())


def test_bad_inputs():
    net = _pointwise_net()
    with pytest.raises(ValueError, match="channel"):
        ConditionalInferer(_bank())(torch.rand(1, 2, 24, 24), net)


def test_doctests():
    assert doctest.testmod(inferer_module).failed == 0


def test_similar_selection_gives_each_target_its_nearest_entries():
    # bank: class c has entries n = c, c + 3, c + 6 with images of distinct random patterns
    g = torch.Generator().manual_seed(0)
    images = torch.rand(9, C, 8, 8, generator=g)
    bank = SupportBank(images, (torch.rand(9, 8, 8, generator=g) > 0.5).float(), torch.arange(9) % M, M)
    inf = ConditionalInferer(bank, num_samples=3, select="similar")
    targets = images[[4, 6]] * 2.0 + 1.0  # entries 4 (class 1) and 6 (class 0) up to gain and offset
    for k in range(3):
        cond_image, cond_label = inf.similar_conditions(k, targets)
        assert cond_image.shape == (2, M * C, 8, 8) and cond_label.shape == (2, M, 8, 8)
        for b, t in enumerate((4, 6)):
            for j in range(M):
                pool = [n for n in range(9) if n % M == j]
                want = sorted(pool, key=lambda n: (float(inferer_module.image_distances(targets[b : b + 1], images[n : n + 1])), n))[k]
                torch.testing.assert_close(cond_image[b, j * C : (j + 1) * C], images[want])
                torch.testing.assert_close(cond_label[b, j], bank.labels[want])
    first, _ = inf.similar_conditions(0, targets)
    torch.testing.assert_close(first[0, 1 * C : 2 * C], images[4])  # the target's own entry is the nearest of its class
    torch.testing.assert_close(first[1, 0:C], images[6])
    net = CompNet(2, C, M, backbone_kwargs={"channels": (4, 8), "strides": (2,)}).eval()
    out = inf(targets, net)
    manual = sum(compnet_segment(net(pack_conditional_input(targets, *inf.similar_conditions(k, targets)))) for k in range(3)) / 3
    torch.testing.assert_close(out, manual)
    with pytest.raises(ValueError, match="select"):
        ConditionalInferer(bank, select="nearest")
