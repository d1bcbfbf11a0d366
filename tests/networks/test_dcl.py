"""CompNet (DCL section 3.2): shapes 2D / 3D, channel order, segmentation, backbones, bad arguments."""

from __future__ import annotations

import doctest

import pytest
import torch
from monai.networks.nets import BasicUNet, UNet

import partialseg.networks.dcl as compnet_module
from partialseg.networks import CompNet, compnet_segment, pack_conditional_input

SHAPE_CASES = [
    # spatial_dims, in_channels, num_classes, spatial
    (2, 1, 4, (32, 32)),
    (2, 3, 2, (16, 24)),
    (3, 1, 3, (16, 16, 16)),
]


@pytest.mark.parametrize("dims, c, m, spatial", SHAPE_CASES)
def test_shapes(dims, c, m, spatial):
    torch.manual_seed(0)
    net = CompNet(dims, c, m, backbone_kwargs={"channels": (4, 8), "strides": (2,), "num_res_units": 0})
    assert net.backbone_in_channels == c * (1 + m) + m and net.out_channels == 2 * m
    image, cond_image, cond_label = torch.rand(2, c, *spatial), torch.rand(2, m * c, *spatial), torch.randint(0, 2, (2, m, *spatial)).float()
    logits = net(image, cond_image, cond_label)
    assert logits.shape == (2, 2 * m, *spatial)
    assert torch.equal(logits, net(net.pack(image, cond_image, cond_label)))
    seg = net.segment(logits)
    assert seg.shape == (2, m, *spatial)
    torch.testing.assert_close(seg.sum(1), torch.ones(2, *spatial))


def test_pack_channel_order():
    image = torch.full((1, 1, 2, 2), -1.0)
    cond_image = torch.arange(3.0).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    cond_label = torch.arange(10.0, 13.0).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    x = pack_conditional_input(image, cond_image, cond_label)
    assert x[0, :, 0, 0].tolist() == [-1.0, 0.0, 1.0, 2.0, 10.0, 11.0, 12.0]


def test_segment_is_intersection_plus_extra():
    # 2m = 4 maps at one voxel with probabilities (.1, .2, .3, .4) -> y = (.1 + .3, .2 + .4)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1)
    torch.testing.assert_close(compnet_segment(probs.log()).flatten(), torch.tensor([0.4, 0.6]))
    torch.testing.assert_close(compnet_segment(probs, softmax=False).flatten(), torch.tensor([0.4, 0.6]))


def test_backbone_factory_and_instance():
    net = CompNet(2, 1, 3, backbone=BasicUNet, backbone_kwargs={"features": (4, 4, 8, 8, 16, 4)})
    assert net(torch.rand(1, 7, 32, 32)).shape == (1, 6, 32, 32)
    inst = UNet(2, 7, 6, channels=(4, 8), strides=(2,))
    assert CompNet(2, 1, 3, backbone=inst).backbone is inst


BAD_ARGS = [
    ({"spatial_dims": 4, "in_channels": 1, "num_classes": 3}, ValueError),
    ({"spatial_dims": 2.0, "in_channels": 1, "num_classes": 3}, TypeError),
    ({"spatial_dims": 2, "in_channels": 0, "num_classes": 3}, ValueError),
    ({"spatial_dims": 2, "in_channels": 1, "num_classes": 1}, ValueError),
    ({"spatial_dims": 2, "in_channels": 1, "num_classes": True}, TypeError),
    ({"spatial_dims": 2, "in_channels": 1, "num_classes": 3, "backbone": "unet"}, TypeError),
    ({"spatial_dims": 2, "in_channels": 1, "num_classes": 3, "backbone_kwargs": [1]}, TypeError),
    ({"spatial_dims": 2, "in_channels": 1, "num_classes": 3, "backbone": UNet(2, 7, 6, (4, 8), (2,)), "backbone_kwargs": {"a": 1}}, ValueError),
]


@pytest.mark.parametrize("kwargs, error", BAD_ARGS)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        CompNet(**kwargs)


def test_bad_inputs():
    net = CompNet(2, 1, 3, backbone_kwargs={"channels": (4, 8), "strides": (2,)})
    with pytest.raises(ValueError, match="7"):
        net(torch.rand(1, 5, 8, 8))
    with pytest.raises(ValueError, match="m \\* C"):
        net.pack(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="grid"):
        net.pack(torch.rand(1, 1, 8, 8), torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 4))
    with pytest.raises(ValueError, match="both"):
        net(torch.rand(1, 1, 8, 8), cond_image=torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="even"):
        compnet_segment(torch.rand(1, 3, 2, 2))
    wrong = CompNet(2, 1, 3, backbone=UNet(2, 7, 5, (4, 8), (2,)))
    with pytest.raises(ValueError, match="2m = 6"):
        wrong(torch.rand(1, 7, 8, 8))


def test_doctests():
    assert doctest.testmod(compnet_module).failed == 0
