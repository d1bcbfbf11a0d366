"""DTML networks: M_d's tanh head, the predictor (M_s alone or averaged with M_d's mask, by hand)
and the label map from per-class probabilities (threshold, argmax, background)."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn

import partialseg.networks.dtml as dtml_module
from partialseg.networks import DTMLPredictor, SignedDistanceNet, probabilities_to_label


class Constant(nn.Module):
    """A network whose output is ``value`` per channel, whatever the input."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        view = (1, -1) + (1,) * (x.ndim - 2)
        return (self.values.view(view) + self.dummy).expand(x.shape[0], -1, *x.shape[2:])


def test_signed_distance_net_is_tanh_of_its_backbone():
    net = SignedDistanceNet(Constant([0.0, 2.0, -100.0]))
    out = net(torch.zeros(2, 1, 3, 3))
    assert out.shape == (2, 3, 3, 3)
    assert out[0, :, 0, 0].tolist() == pytest.approx([0.0, math.tanh(2.0), -1.0])
    with pytest.raises(TypeError, match="backbone must be an nn.Module"):
        SignedDistanceNet("vnet")


def test_predictor_uses_m_s_alone_or_the_mean_of_both_masks():
    seg = Constant([math.log(3.0), 0.0])  # sigmoid: 0.75, 0.5
    sdm = SignedDistanceNet(Constant([0.0, -10.0]))  # tanh then sigmoid(-1500 s): 0.5, 1.0
    x = torch.zeros(1, 1, 2, 2, 2)
    assert DTMLPredictor(seg)(x)[0, :, 0, 0, 0].tolist() == pytest.approx([0.75, 0.5])
    assert DTMLPredictor(seg, sdm)(x)[0, :, 0, 0, 0].tolist() == pytest.approx([0.75, 0.5])  # average off
    avg = DTMLPredictor(seg, sdm, average=True)(x)
    assert avg.shape == (1, 2, 2, 2, 2) and avg[0, :, 0, 0, 0].tolist() == pytest.approx([0.625, 0.75])
    # a smaller k softens M_d's mask: sigmoid(-1 * tanh(-10)) = sigmoid(1)
    soft = DTMLPredictor(seg, sdm, k=1.0, average=True)(x)[0, 1, 0, 0, 0].item()
    assert soft == pytest.approx(0.5 * (0.5 + 1 / (1 + math.exp(-math.tanh(10.0)))))
    assert sorted(DTMLPredictor(seg, sdm).networks) == ["sdm", "seg"]


def test_predictor_bad_arguments():
    seg = Constant([0.0])
    with pytest.raises(ValueError, match="average=True needs sdm_net"):
        DTMLPredictor(seg, average=True)
    with pytest.raises(TypeError, match="seg_net must be an nn.Module"):
        DTMLPredictor(None)
    with pytest.raises(TypeError, match="average must be a bool"):
        DTMLPredictor(seg, seg, average=1)
    with pytest.raises(ValueError, match="k must be >"):
        DTMLPredictor(seg, k=0)
    with pytest.raises(ValueError, match=r"M_d's output \(1, 2, 2, 2\) differs from M_s's \(1, 1, 2, 2\)"):
        DTMLPredictor(seg, Constant([0.0, 0.0]), average=True)(torch.zeros(1, 1, 2, 2))


def test_probabilities_to_label():
    prob = torch.tensor([[0.2, 0.7, 0.6, 0.5, 0.1], [0.1, 0.8, 0.3, 0.5, 0.49]]).view(1, 2, 5)  # (B, m-1, N)
    assert probabilities_to_label(prob).tolist() == [[[0.0, 2.0, 1.0, 1.0, 0.0]]]  # tie -> lower class
    assert probabilities_to_label(prob, threshold=0.65).tolist() == [[[0.0, 2.0, 0.0, 0.0, 0.0]]]
    assert probabilities_to_label(prob[0], dim=0).tolist() == [[0.0, 2.0, 1.0, 1.0, 0.0]]
    binary = probabilities_to_label(torch.tensor([[[[0.49, 0.5, 0.99]]]]))  # one class: prob >= 0.5
    assert binary.tolist() == [[[[0.0, 1.0, 1.0]]]] and binary.dtype == torch.float32
    with pytest.raises(ValueError, match="threshold"):
        probabilities_to_label(prob, threshold=1.0)
    with pytest.raises(ValueError, match="dim"):
        probabilities_to_label(prob, dim=3)


def test_doctests():
    assert doctest.testmod(dtml_module).failed == 0
