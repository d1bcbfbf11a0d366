"""HybridDeepLab: shapes (RGB and single-channel, output stride 16 and 8), the exposed last layer
(forward == upsample(classifier(features))), presets, bad arguments; AveragedNetworks."""

from __future__ import annotations

import math

import pytest
import torch

from partialseg.networks.hybrid import ENCODERS, AveragedNetworks, HybridDeepLab


@pytest.mark.parametrize("in_channels, out_channels, stride", [(3, 2, 16), (1, 3, 8)])
def test_shapes_and_exposed_last_layer(in_channels, out_channels, stride):
    torch.manual_seed(0)
    net = HybridDeepLab(2, in_channels, out_channels, output_stride=stride).eval()
    x = torch.rand(2, in_channels, 64, 48)
    with torch.no_grad():
        f = net.forward_features(x)
        y = net(x)
        assert tuple(f.shape) == (2, net.feature_channels, 16, 12)  # stride 4
        assert tuple(y.shape) == (2, out_channels, 64, 48)
        torch.testing.assert_close(y, net.upsample_logits(net.classifier(f), x.shape[2:]))
    assert net.classifier.kernel_size == (1, 1)
    # the encoder's deepest stage is dilated, not strided: stride 16 (or 8) at the ASPP
    high = net.layer4(net.layer3(net.layer2(net.layer1(net.stem(x)))))
    assert tuple(high.shape[2:]) == (64 // stride, 48 // stride)


def test_two_initialisations_differ_and_gradients_reach_the_encoder():
    a, b = HybridDeepLab(2, 3, 2), HybridDeepLab(2, 3, 2)
    assert not torch.equal(a.classifier.weight, b.classifier.weight)
    a(torch.rand(2, 3, 32, 32)).sum().backward()
    assert a.stem[0].weight.grad is not None and a.stem[0].weight.grad.abs().sum() > 0


def test_paper_encoder_preset_is_resnet50():
    assert ENCODERS["resnet50"]["block"] == "bottleneck" and ENCODERS["resnet50"]["layers"] == [3, 4, 6, 3]
    net = HybridDeepLab(2, 3, 2, encoder="resnet50")
    assert net.feature_channels == 256 and net.low_level.conv.in_channels == 256  # bottleneck expansion 4
    assert 20e6 < sum(p.numel() for p in net.parameters()) < 40e6
    small = sum(p.numel() for p in HybridDeepLab(2, 3, 2).parameters())
    assert small < 1e6  # the CPU default


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="2D"):
        HybridDeepLab(3, 1, 2)
    with pytest.raises(ValueError, match="Did you mean 'resnet50'"):
        HybridDeepLab(2, 3, 2, encoder="resnet5O")
    with pytest.raises(ValueError, match="output_stride"):
        HybridDeepLab(2, 3, 2, output_stride=32)
    with pytest.raises(ValueError, match="out_channels"):
        HybridDeepLab(2, 3, 1)


def test_averaged_networks_average_probabilities():
    torch.manual_seed(1)
    a, b = HybridDeepLab(2, 1, 2).eval(), HybridDeepLab(2, 1, 2).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        out = AveragedNetworks(a, b)(x)
        expected = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
    torch.testing.assert_close(out.exp(), expected)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(1, 32, 32))
    assert math.isfinite(out.min().item())
    with pytest.raises(TypeError):
        AveragedNetworks()


def test_bilinear_tail_equals_interpolate_and_its_transpose():
    from partialseg.networks.hybrid import BilinearTail

    torch.manual_seed(0)
    net = HybridDeepLab(2, 3, 2).eval()
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        z = net.classifier(net.forward_features(x))
    tail = net.logit_tail(z.shape[2:], x.shape[2:])
    torch.testing.assert_close(tail(z), net.upsample_logits(z, x.shape[2:]), rtol=1e-5, atol=1e-5)
    g = torch.rand(2, 2, 48, 40)
    zz = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad((net.upsample_logits(zz, x.shape[2:]) * g).sum(), zz)
    torch.testing.assert_close(tail.vjp(g), auto, rtol=1e-5, atol=1e-5)
    assert tuple(BilinearTail((3, 5), (7, 9)).rows.shape) == (7, 3)
