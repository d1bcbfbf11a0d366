"""Hybrid supervision losses: the DII upper-level gradient -g_S . g_k against hand-computed values,
vectorised per-instance gradients against a loop, Eq. 7 against hand-computed values, the
indicators' Adam step (torch's Adam, clipping to [0, 1]), checkpoint state and the CSV report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partialseg.losses.hybrid import (
    WHOLE_CASE,
    DCRLoss,
    InstanceIndicators,
    class_indices,
    indicator_gradient,
    instance_pixel_weights,
    last_layer_gradient_dots,
    last_layer_gradients,
    weighted_cross_entropy,
)

LN2, LN43 = math.log(2.0), math.log(4.0 / 3.0)


def _zero_conv(f=2, c=2):
    conv = nn.Conv2d(f, c, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def test_indicator_gradient_on_a_tiny_linear_model_matches_hand_computation():
    # one pixel per case, features f in R^2, zero classifier: p = (0.5, 0.5), e = p - onehot(y)
    # strong: f = (1, 0), y = 1 -> e = (0.5, -0.5); g = (e f^T, e) = (0.5, 0, -0.5, 0, 0.5, -0.5)
    # weak a: same as the strong one            -> g_S . g_a = 4 * 0.25 = 1.0 -> d gamma = -1
    # weak b: f = (1, 0), y = 0 (wrong label)   -> e = (-0.5, 0.5), g_S . g_b = -1 -> d gamma = +1
    # weak c: f = (0, 1), y = 1                 -> g = (0, 0.5, 0, -0.5, 0.5, -0.5), g_S . g_c = 0.5 -> -0.5
    conv = _zero_conv()
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).view(4, 2, 1, 1)
    y = torch.tensor([1, 1, 0, 1]).view(4, 1, 1, 1)
    rows, weights, _ = instance_pixel_weights(y, [[WHOLE_CASE]] * 4)
    g = last_layer_gradients(f, conv, y, rows, weights)
    torch.testing.assert_close(g[0], torch.tensor([0.5, 0.0, -0.5, 0.0, 0.5, -0.5]))
    d_gamma = indicator_gradient(g[:1], g[1:])
    torch.testing.assert_close(d_gamma, torch.tensor([-1.0, 1.0, -0.5]))
    # one Adam step (lr 0.1) from 0.5: the first step moves by -lr * sign(d gamma)
    ind = InstanceIndicators(["a", "b", "c"], strong=["s"])
    ind.step(torch.arange(3), d_gamma)
    torch.testing.assert_close(ind.gamma, torch.tensor([0.6, 0.4, 0.6]))


def test_indicator_gradient_with_a_nonzero_classifier_matches_autograd_dot_product():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 1)
    f, y = torch.randn(3, 3, 2, 2), torch.randint(0, 2, (3, 1, 2, 2))

    def grad_of(i):
        loss = F.cross_entropy(conv(f[i : i + 1]), y[i : i + 1, 0])
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(conv.parameters()))])

    g_s = (grad_of(0) + grad_of(1)) / 2
    expected = -(g_s @ grad_of(2))
    rows, weights, _ = instance_pixel_weights(y, [[WHOLE_CASE]] * 3)
    g = last_layer_gradients(f, conv, y, rows, weights)
    torch.testing.assert_close(indicator_gradient(g[:2], g[2:]), expected.view(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_tail", [False, True])
def test_vectorised_per_instance_gradients_equal_a_loop(with_tail):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 3, 1)
    size = 8 if with_tail else 4
    f = torch.randn(3, 4, 4, 4)
    y = torch.randint(0, 3, (3, 1, size, size))
    y[1, 0, 0, :2] = torch.tensor([1, 2])  # both classes present in row 1
    tail = (lambda z: F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)) if with_tail else None
    rows, weights, _ = instance_pixel_weights(y, [[WHOLE_CASE], [1, 2], [2]])
    loop = last_layer_gradients(f, conv, y, rows, weights, tail, method="loop")
    assert loop.shape == (4, 3 * 4 + 3)
    torch.testing.assert_close(last_layer_gradients(f, conv, y, rows, weights, tail), loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last_layer_gradients(f, conv, y, rows, weights, tail, method="functional"), loop, rtol=1e-5, atol=1e-6)



def test_gradient_dots_on_the_tiny_linear_model_match_hand_computation():
    # the tiny model above: g_S = (0.5, 0, -0.5, 0, 0.5, -0.5); g_S . g_a = 1, g_S . g_b = -1, g_S . g_c = 0.5
    # through the dot path: s = g_S applied as a 1x1 conv, <e_k, s_k>; e.g. weak c: f = (0, 1) -> s = (0 + 0.5, 0 - 0.5),
    # e = (0.5, -0.5) -> 0.25 + 0.25 = 0.5
    conv = _zero_conv()
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).view(3, 2, 1, 1)
    y = torch.tensor([1, 0, 1]).view(3, 1, 1, 1)
    rows, weights, _ = instance_pixel_weights(y, [[WHOLE_CASE]] * 3)
    g_s = torch.tensor([0.5, 0.0, -0.5, 0.0, 0.5, -0.5])
    torch.testing.assert_close(last_layer_gradient_dots(f, conv, y, rows, weights, g_s), torch.tensor([1.0, -1.0, 0.5]))
    # a direction along the bias only: g_k . (0, 0, 0, 0, 1, 0) = sum_p e_0 = +-0.5 (sign caught)
    v = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(last_layer_gradient_dots(f, conv, y, rows, weights, v), torch.tensor([0.5, -0.5, 0.5]))


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradient_dots_equal_the_loop_gradients_dotted(classes, bias):
    # nonzero classifier, bilinear upsampling tail, per-class instances: the dot path against -g_S . g_k from the loop
    from partialseg.networks.hybrid import BilinearTail

    torch.manual_seed(3)
    conv = nn.Conv2d(4, classes, 1, bias=bias)
    f = torch.randn(3, 4, 4, 4)
    y = torch.randint(0, classes, (3, 1, 8, 8))
    y[1, 0, 0, :2] = torch.tensor([1, classes - 1])
    tail = lambda z: F.interpolate(z, size=(8, 8), mode="bilinear", align_corners=False)  # noqa: E731
    rows, weights, _ = instance_pixel_weights(y, [[WHOLE_CASE], sorted({1, classes - 1}), [WHOLE_CASE]])
    loop = last_layer_gradients(f, conv, y, rows, weights, tail, method="loop")
    g_s = loop[0]  # row 0 plays the strong set
    expected = -indicator_gradient(g_s, loop)
    for t in (tail, BilinearTail((4, 4), (8, 8))):
        torch.testing.assert_close(last_layer_gradient_dots(f, conv, y, rows, weights, g_s, t), expected, rtol=1e-4, atol=1e-7)
    assert float(last_layer_gradient_dots(f, conv, y, rows[:1], weights[:1], g_s, tail)) > 0  # g_S . g_S = |g_S|^2
    with pytest.raises(ValueError, match="entries"):
        last_layer_gradient_dots(f, conv, y, rows, weights, g_s[:-1], tail)

def test_functional_gradients_serve_a_classifier_the_closed_form_refuses():
    torch.manual_seed(2)
    conv3 = nn.Conv2d(2, 2, 3, padding=1)
    f, y = torch.randn(2, 2, 3, 3), torch.randint(0, 2, (2, 1, 3, 3))
    rows, weights, _ = instance_pixel_weights(y, [[WHOLE_CASE]] * 2)
    with pytest.raises(TypeError, match="1x1"):
        last_layer_gradients(f, conv3, y, rows, weights)
    torch.testing.assert_close(
        last_layer_gradients(f, conv3, y, rows, weights, method="functional"),
        last_layer_gradients(f, conv3, y, rows, weights, method="loop"), rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_class_instances_split_the_case_loss():
    # instance (k, c): pixels of c at 1/P, background shared equally; they add up to the mean CE
    torch.manual_seed(3)
    logits, y = torch.randn(1, 3, 4, 4), torch.randint(0, 3, (1, 1, 4, 4))
    y[0, 0, 0, :3] = torch.tensor([0, 1, 2])
    rows, weights, classes = instance_pixel_weights(y, [[1, 2]])
    assert classes == [1, 2] and rows.tolist() == [0, 0]
    ce = F.cross_entropy(logits, y[:, 0], reduction="none")[0]
    parts = [(w * ce).sum() for w in weights]
    torch.testing.assert_close(sum(parts), ce.mean())
    assert float(weights[0][y[0, 0] == 2].sum()) == 0.0  # class 2's pixels are not instance 1's
    with pytest.raises(ValueError, match="whole-case"):
        instance_pixel_weights(y, [[WHOLE_CASE, 1]])


def test_eq7_matches_hand_computed_values():
    # one pixel, two classes. CE(logits (0, 0), any) = ln 2; CE((0, ln 3), 1) = CE((ln 3, 0), 0) = ln(4/3)
    z00 = torch.zeros(1, 2, 1, 1)
    z03 = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    z30 = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    zero, one = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1, 1, dtype=torch.long)
    g_i, g_j = torch.tensor([0.5]), torch.tensor([1.0])
    loss = DCRLoss(lambda_reg=4.0)
    # l1 = CE(f1(x_i), y_i) = ln 2; l2 = CE(f2(x_j), y_j) = ln 4/3
    # r = CE(f1(x_m), y2_m = 0) + CE(f2(x_m), y1_m = 1) = ln 4/3 + ln 2
    value = loss(z00, zero, z03, one, z30, z00, one, zero, g_i, g_j)
    expected = 0.5 * LN2 + 1.0 * LN43 + 4.0 * 0.75 * (LN43 + LN2)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    # the pseudo-labels cross: network 1 learns from network 2's (pseudo2_m), not its own:
    # swapping them gives r = CE((ln 3, 0), 1) + CE((0, 0), 0) = ln 4 + ln 2
    swapped = loss(z00, zero, z03, one, z30, z00, zero, one, g_i, g_j)
    assert swapped.item() == pytest.approx(0.5 * LN2 + LN43 + 3.0 * (math.log(4.0) + LN2), rel=1e-6)
    # a batch of two pairs is their mean; lambda = 0 leaves the supervised terms
    two = loss(torch.cat([z00, z00]), torch.cat([zero, zero]), torch.cat([z03, z03]), torch.cat([one, one]),
               torch.cat([z30, z30]), torch.cat([z00, z00]), torch.cat([one, one]), torch.cat([zero, zero]),
               torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.0]))  # fmt: skip
    assert two.item() == pytest.approx(expected / 2, rel=1e-6)
    assert DCRLoss(0.0)(z00, zero, z03, one, z30, z00, one, zero, g_i, g_j).item() == pytest.approx(0.5 * LN2 + LN43, rel=1e-6)


def test_eq7_kl_consistency_and_pixel_weights():
    z00 = torch.zeros(1, 2, 1, 1)
    z30 = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)  # p = (3/4, 1/4)
    half = torch.full((1, 2, 1, 1), 0.5)
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    g = torch.ones(1)
    # KL((1/2, 1/2) || (3/4, 1/4)) = 0.5 ln(2/3) + 0.5 ln 2 = 0.5 ln(4/3); KL(t || t) = 0
    kl = DCRLoss(lambda_reg=2.0, consistency="kl", reduction="none")
    terms = kl.terms(z00, zero, z00, zero, z30, z00, half, half, g, g)
    assert terms["reg"].item() == pytest.approx(0.5 * LN43, rel=1e-5)
    assert kl(z00, zero, z00, zero, z30, z00, half, half, g, g).item() == pytest.approx(2 * LN2 + 2.0 * 0.5 * LN43, rel=1e-5)
    # pixel weights replace gamma in the supervised terms only
    w = torch.tensor([[[[0.25, 0.75]]]])
    z = torch.zeros(1, 2, 1, 2)
    y = torch.zeros(1, 1, 1, 2, dtype=torch.long)
    assert weighted_cross_entropy(z, y, w).item() == pytest.approx(0.5 * LN2, rel=1e-6)
    with pytest.raises(ValueError, match="Did you mean .kl."):
        DCRLoss(consistency="kld")


def test_gamma_stays_in_unit_interval_and_adam_matches_torch():
    torch.manual_seed(4)
    ind = InstanceIndicators([f"w{i}" for i in range(50)], strong=["s"])
    for _ in range(40):
        ind.step(torch.arange(50), torch.randn(50) * 10.0 ** torch.randint(-6, 4, (50,)).float())
        assert float(ind.gamma.min()) >= 0.0 and float(ind.gamma.max()) <= 1.0
    push = InstanceIndicators(["a", "b"], strong=["s"])
    for _ in range(10):
        push.step([0, 1], torch.tensor([-1.0, 1.0]))
    assert push.gamma.tolist() == [1.0, 0.0]
    # away from the bounds an update is torch's Adam (lr 0.1, betas 0.9 / 0.999) on gamma
    grads = [torch.tensor([0.3, -0.02, 5.0]), torch.tensor([-0.1, -0.02, -4.0]), torch.tensor([0.2, 0.01, 1.0])]
    ind3 = InstanceIndicators(["a", "b", "c"], strong=["s"])
    param = torch.nn.Parameter(torch.full((3,), 0.5))
    opt = torch.optim.Adam([param], lr=0.1)
    for g in grads:
        ind3.step(torch.arange(3), g)
        param.grad = g.clone()
        opt.step()
        torch.testing.assert_close(ind3.gamma, param.detach())
    # an instance left out keeps its moments and step count
    ind3.step([0], torch.tensor([1.0]))
    assert ind3.steps.tolist() == [4, 3, 3]


def test_state_round_trip_and_a_state_of_another_dataset_is_refused():
    ind = InstanceIndicators({"w1": [1, 2], "w2": None}, strong=["s1"])
    ind.step([0, 2], torch.tensor([1.0, -1.0]))
    state = ind.state_dict()
    fresh = InstanceIndicators({"w1": [1, 2], "w2": None}, strong=["s1"])
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.gamma, ind.gamma)
    assert fresh.steps.tolist() == [1, 0, 1] and fresh.updates == 1
    other = InstanceIndicators({"w1": [1, 2], "w3": None}, strong=["s1"])
    with pytest.raises(ValueError, match="w3"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="s2"):
        InstanceIndicators({"w1": [1, 2], "w2": None}, strong=["s2"]).load_state_dict(state)


def test_construction_refuses_bad_case_lists():
    with pytest.raises(ValueError, match="strong case"):
        InstanceIndicators(["w"], strong=[])
    with pytest.raises(ValueError, match="both strong and weak"):
        InstanceIndicators(["a"], strong=["a"])
    with pytest.raises(ValueError, match="more than once"):
        InstanceIndicators(["a", "a"], strong=["s"])
    with pytest.raises(ValueError, match="frame_3"):
        InstanceIndicators.from_datalist([{"case": "frame_3", "source": "maybe"}])
    with pytest.raises(ValueError, match="neither"):
        InstanceIndicators(["a"], strong=["s"]).is_strong("zz")


def test_case_gamma_pixel_weights_and_csv(tmp_path):
    ind = InstanceIndicators(
        {"w": [1, 2], "m": None}, strong=["s"], weak_types={"w": "scribble", "m": "missing"}, class_names=["bg", "a", "b"]
    )
    ind.gamma[:] = torch.tensor([0.2, 0.6, 0.1])
    torch.testing.assert_close(ind.case_gamma(["s", "w", "m"]), torch.tensor([1.0, 0.4, 0.1]))
    y = torch.tensor([[[0, 1, 2]], [[0, 0, 0]], [[1, 1, 0]]])  # (B, H, W)
    w = ind.pixel_weights(["w", "m", "s"], y)
    torch.testing.assert_close(w[:, 0], torch.tensor([[[0.4, 0.2, 0.6]], [[0.1, 0.1, 0.1]], [[1.0, 1.0, 1.0]]]))
    lines = ind.to_csv(tmp_path / "gamma.csv", include_strong=True).read_text().splitlines()
    assert lines == [
        "case,class,weak_type,gamma,steps", "w,a,scribble,0.2,0", "w,b,scribble,0.6,0", "m,all,missing,0.1,0", "s,all,strong,1,0",
    ]  # fmt: skip


def test_class_indices_refuses_partial_annotation():
    onehot = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert class_indices(onehot, num_classes=2).tolist() == [[[0, 1]]]
    with pytest.raises(ValueError, match="fully labelled"):
        class_indices(torch.full((1, 2, 1, 2), 0.5), num_classes=2)
