"""Atlas method networks: the main network's decoder features (and that its plain forward is
DynUNet's), APRN at half resolution and its erase / fill augmentation, AMAN's shapes and size
check, MICPAM's EMA prototypes against hand-computed values, its cross-attention (shapes, a
softmax over the classes, Eq. 3 by hand) and its prototypes in the state dict."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet

from partialseg.networks import AtlasDiscriminator, AtlasRefiner, AtlasUNet, PrototypeAnchoring, erase_fill
from partialseg.networks.atlas import CODE_DISCRIMINATOR_CHANNELS, CODE_REFINER_FILTERS


def test_main_network_gives_three_intermediate_decoder_scales_and_is_dynunet_at_inference():
    torch.manual_seed(0)
    net = AtlasUNet(3, 1, 4, filters=(4, 8, 8, 16, 16), norm_name="instance").eval()
    x = torch.randn(2, 1, 32, 32, 32)
    logits, feats = net(x, return_features=True)
    assert logits.shape == (2, 4, 32, 32, 32)
    # coarsest first: 1/8, 1/4, 1/2 with filters[3], filters[2], filters[1] channels
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 4, 4, 4), (8, 8, 8, 8), (8, 16, 16, 16)]
    assert net.feature_channels == (16, 8, 8)
    # the walk is DynUNet's forward: same weights, same logits
    ref = DynUNet(3, 1, 4, kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2], upsample_kernel_size=[2] * 4, filters=[4, 8, 8, 16, 16],
                  norm_name="instance", res_block=True).eval()
    ref.load_state_dict(net.state_dict())
    assert torch.allclose(ref(x), net(x), atol=1e-6)
    assert torch.equal(net(x), logits)
    with pytest.raises(ValueError, match="feature_levels"):
        AtlasUNet(3, 1, 2, filters=(4, 8, 8), feature_levels=3)
    assert AtlasUNet(3, 1, 2).feature_channels == (128, 64, 32)  # the default: the public code's prototype sizes


def test_refiner_runs_at_half_resolution_and_erase_fill_sets_cubes_to_0_or_1():
    torch.manual_seed(0)
    apr = AtlasRefiner(3, filters=(4, 8, 8), norm_name="instance", erase_patches=2, erase_size=2)
    seen = []
    apr.net.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape), tuple(o.shape))))
    out = apr(torch.rand(5, 1, 16, 16, 16), torch.rand(5, 16, 16, 16)[:, None])
    assert out.shape == (5, 1, 16, 16, 16)
    assert seen == [((5, 2, 8, 8, 8), (5, 1, 8, 8, 8))]  # [p_c, atlas_c] at half resolution, one output channel
    assert list(AtlasRefiner(3).net.filters) == [16, 32, 64]  # default: smaller than the public code's widths
    assert list(AtlasRefiner(3, filters=CODE_REFINER_FILTERS).net.filters) == [24, 48, 96]

    g = torch.Generator().manual_seed(1)
    p = torch.full((3, 1, 6, 6, 6), 0.5)
    q = erase_fill(p, num_patches=1, patch_size=3, generator=g)
    assert torch.equal(p, torch.full((3, 1, 6, 6, 6), 0.5))  # input unchanged
    for n in range(3):
        changed = q[n] != 0.5
        assert int(changed.sum()) == 27 and len(set(q[n][changed].tolist())) == 1  # one 3^3 cube of 0 or of 1
        idx = changed[0].nonzero()
        assert (idx.max(0).values - idx.min(0).values).tolist() == [2, 2, 2]
    assert torch.equal(erase_fill(p, 0), p)
    # augmentation only when asked
    x = torch.rand(2, 1, 16, 16, 16)
    a = torch.rand(2, 1, 16, 16, 16)
    assert torch.equal(apr(x, a), apr(x, a))


def test_discriminator_gives_one_logit_per_pair_and_refuses_too_small_inputs():
    d = AtlasDiscriminator(3)  # default: five layers at half resolution
    assert d.scale == 0.5 and [m.conv.out_channels for m in d.features] == [32, 64, 128, 256, 256]
    assert all(m.conv.kernel_size == (4, 4, 4) and m.conv.stride == (2, 2, 2) for m in d.features)
    with pytest.raises(ValueError, match="needs >= 32"):
        d(torch.zeros(1, 2, 32, 64, 64))  # 16 voxels at half resolution
    code = AtlasDiscriminator(3, channels=CODE_DISCRIMINATOR_CHANNELS, scale=1.0)  # the public code's widths
    assert len(code.features) == 6 and [m.conv.out_channels for m in code.features] == [32, 64, 128, 256, 256, 256]
    with pytest.raises(ValueError, match="needs >= 64"):
        code(torch.zeros(1, 2, 32, 64, 64))
    small = AtlasDiscriminator(3, channels=(4, 8, 8), scale=1.0)
    assert small(torch.rand(7, 2, 8, 8, 8)).shape == (7, 1)
    # at half resolution: the same layers see the input average-pooled by 2
    half = AtlasDiscriminator(3, channels=(4, 8, 8), scale=0.5)
    half.load_state_dict(small.state_dict())
    x = torch.rand(3, 2, 16, 16, 16)
    assert torch.allclose(half(x), small(torch.nn.functional.avg_pool3d(x, 2)), atol=1e-6)
    with pytest.raises(ValueError, match="at scale 0.5"):
        half(torch.rand(1, 2, 8, 8, 8))


def test_ema_prototypes_match_hand_computed_values():
    torch.manual_seed(0)
    m = PrototypeAnchoring(3, (2, 2), num_heads=1, momentum=0.99)
    p0, q0 = m.prototypes(0).clone(), m.prototypes(1).clone()
    # scale 0 at full resolution (1 x 1 x 4 voxels), scale 1 at half (1 x 1 x 2), two samples
    f0 = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]], [[5.0, 6.0, 7.0, 8.0], [2.0, 2.0, 2.0, 2.0]]]).view(2, 2, 1, 1, 4)
    f1 = torch.tensor([[[10.0, 20.0], [1.0, 3.0]], [[30.0, 40.0], [5.0, 7.0]]]).view(2, 2, 1, 1, 2)
    w = torch.zeros(2, 3, 1, 1, 4)
    w[0, 1, 0, 0, :2] = 1.0  # class 1: sample 0, voxels 0-1
    w[1, 1, 0, 0, 3] = 1.0  # class 1: sample 1, voxel 3
    w[0, 0, 0, 0, 2:] = 1.0  # class 0: sample 0, voxels 2-3; class 2: nowhere
    done = m.update([f0, f1], w)
    assert done.tolist() == [[True, True, False], [True, True, False]]
    # scale 0, class 1: mean of (1,0), (2,0), (8,2) = (11/3, 2/3); class 0: mean of (3,1), (4,1) = (3.5, 1)
    a1 = torch.tensor([11 / 3, 2 / 3])
    a0 = torch.tensor([3.5, 1.0])
    assert torch.allclose(m.prototypes(0)[1], 0.99 * p0[1] + 0.01 * a1)
    assert torch.allclose(m.prototypes(0)[0], 0.99 * p0[0] + 0.01 * a0)
    assert torch.equal(m.prototypes(0)[2], p0[2])  # no consensus voxel: unchanged
    # scale 1: the masks averaged to the half grid: class 1 weights sample 0 (1, 0), sample 1 (0, 0.5)
    # -> (1 * (10, 1) + 0.5 * (40, 7)) / 1.5 = (20, 3); class 0: sample 0 (0, 1) -> (20, 3)
    assert torch.allclose(m.prototypes(1)[1], 0.99 * q0[1] + 0.01 * torch.tensor([20.0, 3.0]))
    assert torch.allclose(m.prototypes(1)[0], 0.99 * q0[0] + 0.01 * torch.tensor([20.0, 3.0]))
    assert m.updates_0.tolist() == [1, 1, 0] and m.updates_1.tolist() == [1, 1, 0]
    # a second update: EMA of the EMA
    p1 = m.prototypes(0).clone()
    m.update([f0, f1], w)
    assert torch.allclose(m.prototypes(0)[1], 0.99 * p1[1] + 0.01 * a1)
    assert torch.allclose(m.prototypes(0)[1], 0.99**2 * p0[1] + (0.99 * 0.01 + 0.01) * a1)


def test_cross_attention_shapes_softmax_over_classes_and_eq3_by_hand():
    torch.manual_seed(0)
    m = PrototypeAnchoring(4, (8, 6), num_heads=2)
    feats = [torch.randn(2, 8, 3, 3, 3), torch.randn(2, 6, 5, 5, 5)]
    maps = m(feats)
    assert [tuple(a.shape) for a in maps] == [(2, 4, 3, 3, 3), (2, 4, 5, 5, 5)]
    for a in maps:
        assert torch.allclose(a.sum(1), torch.ones_like(a.sum(1)), atol=1e-6)  # a softmax over the classes at every voxel
        assert bool((a > 0).all() and (a < 1).all())
    # Eq. 3 by hand with one head: softmax_c(A W^A (F W^F)^T / sqrt(k))
    one = PrototypeAnchoring(3, (4,), num_heads=1)
    f = torch.randn(1, 4, 2, 2, 1)
    A = one.prototypes(0)
    q = A @ one.query[0].weight.T + one.query[0].bias
    k = f.flatten(2)[0].T @ one.key[0].weight.T + one.key[0].bias
    expected = torch.softmax(q @ k.T / 2.0, 0).view(1, 3, 2, 2, 1)
    assert torch.allclose(one([f])[0], expected, atol=1e-6)
    # the code's sigmoid: per class, not normalised
    sig = PrototypeAnchoring(3, (4,), num_heads=1, activation="sigmoid")
    sig.load_state_dict(one.state_dict())
    assert torch.allclose(sig([f])[0], torch.sigmoid(q @ k.T / 2.0).view(1, 3, 2, 2, 1), atol=1e-6)
    # gradients reach the projections and the features, never the prototypes (buffers)
    f.requires_grad_(True)
    one([f])[0][:, 1].sum().backward()
    assert f.grad is not None and one.query[0].weight.grad is not None
    assert all(not b.requires_grad for b in one.buffers())
    with pytest.raises(ValueError, match="softmax"):
        PrototypeAnchoring(3, (4,), activation="softmx")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        PrototypeAnchoring(3, (6,), num_heads=4)
    with pytest.raises(ValueError, match="scale 0 features"):
        one([torch.randn(1, 5, 2, 2, 2)])


def test_prototypes_are_in_the_state_dict_and_load_back():
    a, b = PrototypeAnchoring(3, (4, 2), num_heads=2), PrototypeAnchoring(3, (4, 2), num_heads=2)
    a.update([torch.randn(1, 4, 2, 2, 2), torch.randn(1, 2, 1, 1, 1)], torch.ones(1, 3, 2, 2, 2))
    state = a.state_dict()
    assert {"prototypes_0", "prototypes_1", "updates_0", "updates_1"} <= set(state)
    b.load_state_dict(state)
    assert torch.equal(b.prototypes(0), a.prototypes(0)) and b.updates_1.tolist() == [1, 1, 1]
