"""The compiled loss kernels (partialseg._native) against the torch implementation.

Every loss gives the same value and gradient through either path (the torch one is selected with
``PARTIALSEG_NATIVE=0``); at extreme logits the kernels are checked against a float64 computation.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import partialseg._native as native
from partialseg.losses import (
    CompatibleLoss,
    ConditionalCompatibleLoss,
    ExclusionCELoss,
    ExclusionDiceLoss,
    MarginalCELoss,
    MarginalDiceLoss,
    MarginalExclusionLoss,
    MixedSupervisionLoss,
    PriorLoss,
)
from partialseg.losses import _native as native_losses

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def partial_batch(shape=(3, 5, 6, 7), seed=0, scale=2.0):
    """Logits and a <0,p,1> target: sample 0 fully labelled (but one all-zero voxel), sample 1
    annotates class 2 (one voxel row unlabelled), sample 2 annotates classes 1 and 3 with p = 0.3."""
    g = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    x = torch.randn(shape, generator=g) * scale
    lab = torch.randint(0, c, (b, *shape[2:]), generator=g)
    t = torch.nn.functional.one_hot(lab, c).movedim(-1, 1).float()
    inside = lab[1] == 2
    t[1] = torch.where(inside, t[1], 0.5)
    t[1, 2] = inside.float()
    t[1, :, 0] = 0.5  # an unlabelled row
    known = (lab[2] == 1) | (lab[2] == 3)
    other = torch.full_like(t[2], 0.3)
    other[1] = other[3] = 0.0
    t[2] = torch.where(known, t[2], other)
    t[0, :, 0, 0] = 0.0  # a contradictory all-zero voxel: both paths must read it alike
    return x, t


def run(loss, x, *rest, native_on: bool, monkeypatch, reduction_grad=None):
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1" if native_on else "0")
    assert native_losses.usable(x.float()) == native_on
    xr = x.clone().requires_grad_(True)
    out = loss(xr, *rest)
    weight = reduction_grad if reduction_grad is not None else torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    (out * weight).sum().backward()
    return out.detach(), xr.grad


def assert_same(loss, x, *rest, monkeypatch, atol=2e-5):
    v_n, g_n = run(loss, x, *rest, native_on=True, monkeypatch=monkeypatch)
    v_t, g_t = run(loss, x, *rest, native_on=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(v_n, v_t, atol=atol, rtol=1e-5)
    torch.testing.assert_close(g_n, g_t, atol=atol, rtol=1e-4)


def test_library_builds_and_loads():
    assert native.library() is not None
    assert native.build().exists()


BASES = [
    ("ce", None), ("dice", None), ("ta_ce", None), ("ta_dice", None),
    (None, "ce"), (None, "dice"), (None, "ex_ce"), (None, "ex_dice"),
    ("ce", "ce"), (("ce", "dice"), ("ce", "dice")), (("ta_ce", "ta_dice"), ("ex_ce", "ex_dice")),
]  # fmt: skip


@pytest.mark.parametrize("positive,negative", BASES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_compatible_matches_torch(positive, negative, reduction, monkeypatch):
    x, t = partial_batch()
    assert_same(CompatibleLoss(positive, negative, alpha_pos=1.3, alpha_neg=0.6, reduction=reduction), x, t, monkeypatch=monkeypatch)


@pytest.mark.parametrize("reading", ["sum", "maps"])
@pytest.mark.parametrize("positive,negative,prior_weight", [("ce", "ce", 1.0), (("ta_ce", "ta_dice"), ("ex_ce", "ex_dice"), 0.5), ("dice", "dice", 2.0), ("ce", None, 1.0), ("ce", "ce", 0.0)])
def test_conditional_matches_torch(positive, negative, prior_weight, reading, monkeypatch):
    g = torch.Generator().manual_seed(3)
    m = 3
    x = torch.randn(2, 2 * m, 9, 8, generator=g) * 2
    r = torch.rand(2, 2 * m, 9, 8, generator=g)
    z = torch.where(r < 0.3, 0.0, torch.where(r < 0.6, 1.0, 0.5))
    yc = torch.randint(0, 3, (2, m, 9, 8), generator=g).float() * 0.5
    loss = ConditionalCompatibleLoss(positive, negative, prior_weight=prior_weight, reduction="sum", reading=reading)
    assert_same(loss, x, z, yc, monkeypatch=monkeypatch, atol=1e-4)


@pytest.mark.parametrize("negative", ["ce", ("dice", "ex_ce"), "ex_dice"])
def test_prior_loss_matches_torch(negative, monkeypatch):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 9, 8, generator=g) * 2
    yc = torch.randint(0, 3, (2, 3, 9, 8), generator=g).float() * 0.5
    assert_same(PriorLoss(negative, reduction="none"), x, yc, monkeypatch=monkeypatch)


MARGINAL = [
    MarginalCELoss(), ExclusionCELoss(), ExclusionCELoss(eps=0.5), MarginalDiceLoss(), MarginalDiceLoss(batch=True),
    MarginalDiceLoss(include_background=False, reduction="none"), ExclusionDiceLoss(), ExclusionDiceLoss(weight=[1, 2, 1, 1, 3]),
    MarginalExclusionLoss(), MarginalExclusionLoss(batch=True, lambda_exclusion=1.0), MarginalExclusionLoss(lambda_exclusion=0.0),
    MarginalExclusionLoss(lambda_marginal=0.0),
]  # fmt: skip


@pytest.mark.parametrize("loss", MARGINAL, ids=lambda l: type(l).__name__)
def test_marginal_family_matches_torch(loss, monkeypatch):
    x, t = partial_batch(seed=1)
    assert_same(loss, x, t, monkeypatch=monkeypatch)


def _float64_reference(loss, x, t):
    """Value and gradient through the torch path in float64 (its exact log-space branches)."""
    xd = x.double().requires_grad_(True)
    out = loss(xd, t.double())
    out.sum().backward()
    return out.detach().float(), xd.grad.float()


@pytest.mark.parametrize(
    "loss",
    [CompatibleLoss(("ce", "ta_ce"), ("ce", "ex_ce"), reduction="none"), MarginalExclusionLoss(reduction="sum"), MarginalCELoss(reduction="none")],
    ids=["compatible", "marginal_exclusion", "marginal_ce"],
)
def test_extreme_logits_are_exact(loss, monkeypatch):
    """Saturated softmax (|logits| ~ 1e3-1e4): -log q and -log(1 - p) recomputed in log space."""
    x, t = partial_batch(seed=2, scale=3000.0)
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1")
    xr = x.clone().requires_grad_(True)
    out = loss(xr, t)
    out.sum().backward()
    ref, ref_grad = _float64_reference(loss, x, t)
    assert torch.isfinite(out).all() and torch.isfinite(xr.grad).all()
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(xr.grad, ref_grad, rtol=1e-4, atol=1e-5)
    assert out.detach().max() > 100  # the test does reach the saturated regime


@pytest.mark.parametrize("native_on", [True, False])
def test_confident_mistake_gets_the_full_gradient(native_on, monkeypatch):
    """A labelled voxel predicted confidently wrong (p_true ~ 1e-7): d(-log p_true)/dx = p - e_true.

    The torch path once formed this gradient as ``p (v - sum v p) / q`` and lost it to
    cancellation in float32 (a gradient of 0 on the winning wrong class).
    """
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1" if native_on else "0")
    x = torch.tensor([0.58, 10.21, -5.43, -4.49, -0.91]).view(1, 5, 1)
    t = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]).view(1, 5, 1)
    loss = MarginalExclusionLoss(lambda_exclusion=1.0, reduction="sum")  # mCE + mDice + eCE + eDice
    xr = x.clone().requires_grad_(True)
    loss(xr, t).backward()
    _, expected = _float64_reference(loss, x, t)
    torch.testing.assert_close(xr.grad, expected, atol=1e-5, rtol=1e-3)
    assert xr.grad[0, 1, 0] > 0.5  # the wrong winner is pushed down (about 1 from the CE term)


@pytest.mark.parametrize("make", [lambda: CompatibleLoss("ce", "ce"), lambda: MarginalExclusionLoss()], ids=["compatible", "marginal"])
def test_second_backward_with_retain_graph(make, monkeypatch):
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1")
    x, t = partial_batch()
    xr = x.clone().requires_grad_(True)
    out = make()(xr, t)
    (g1,) = torch.autograd.grad(out, xr, retain_graph=True)
    (g2,) = torch.autograd.grad(out * 3, xr)
    torch.testing.assert_close(g2, 3 * g1)


def test_threads_give_the_same_result(monkeypatch):
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1")
    x, t = partial_batch(shape=(3, 5, 40, 40))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xr = x.clone().requires_grad_(True)
            (CompatibleLoss(("ta_ce", "ta_dice"), ("ex_ce", "ex_dice"))(xr, t) + MarginalExclusionLoss()(xr, t)).backward()
            results.append(xr.grad)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0], results[1], atol=1e-7, rtol=1e-5)


def test_half_precision_uses_float32_kernels(monkeypatch):
    x, t = partial_batch()
    v16, g16 = run(CompatibleLoss("ta_ce", "ex_ce"), x.half(), t, native_on=True, monkeypatch=monkeypatch, reduction_grad=torch.ones(()))
    v32, g32 = run(CompatibleLoss("ta_ce", "ex_ce"), x.half().float(), t, native_on=True, monkeypatch=monkeypatch, reduction_grad=torch.ones(()))
    assert v16.dtype == torch.float32 and g16.dtype == torch.float16
    torch.testing.assert_close(v16, v32)
    torch.testing.assert_close(g16.float(), g32, atol=1e-3, rtol=1e-2)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PARTIALSEG_NATIVE", "0")
    assert native.library() is None
    assert not native_losses.usable(torch.zeros(1, 2, 3))


def test_build_failure_warns_once_and_falls_back(monkeypatch, tmp_path):
    """A broken compiler: one RuntimeWarning naming the failure, then the torch path."""
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1")
    monkeypatch.setenv("PARTIALSEG_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no input files' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    with pytest.warns(RuntimeWarning, match="no input files"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None  # no second warning
        x, t = partial_batch()
        assert torch.isfinite(CompatibleLoss()(x, t))
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written left behind


def test_fresh_cache_builds_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("PARTIALSEG_CACHE_DIR", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path and path.suffix == ".so"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed
    assert native.build() == path  # cached: same file, no rebuild


# ----------------------------------------------------------------------------------------------
# non-finite logits and empty inputs: defined, and the same on both paths (issue 13, item 4)
# ----------------------------------------------------------------------------------------------

# sample 0 is fully labelled, sample 1 voxel row 0 is unlabelled (see partial_batch)
NONFINITE_AT = [(0, 2, 3), (1, 0, 2)]  # (sample, *voxel): a labelled voxel, an unlabelled voxel
VOXELWISE = [  # (reduction) -> loss
    lambda r="none": MarginalCELoss(reduction=r),
    lambda r="none": ExclusionCELoss(reduction=r),
    lambda r="none": CompatibleLoss("ce", None, reduction=r),
    lambda r="none": CompatibleLoss("ce", "ce", reduction=r),
    lambda r="none": CompatibleLoss(("ta_ce", "ta_dice"), ("ex_ce", "ex_dice"), reduction=r),
    lambda r="none": CompatibleLoss("dice", "dice", reduction=r),
]
REGION = [
    lambda: MarginalDiceLoss(),
    lambda: ExclusionDiceLoss(reduction="none"),
    lambda: MarginalDiceLoss(batch=True, include_background=False),
    lambda: MarginalExclusionLoss(),
    lambda: MarginalExclusionLoss(lambda_marginal=0.0),
    lambda: MixedSupervisionLoss(MarginalExclusionLoss(lambda_exclusion=0.0), MarginalExclusionLoss()),
]


def _loss_id(make):
    loss = make()
    return type(loss).__name__ + "".join(f"-{b}" for b in getattr(loss, "positive", ()) + getattr(loss, "negative", ()))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("at", NONFINITE_AT, ids=["labelled", "unlabelled"])
@pytest.mark.parametrize("native_on", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("make", VOXELWISE, ids=_loss_id)
def test_nonfinite_logit_gives_nan_at_its_voxel(make, native_on, at, value, monkeypatch):
    """A NaN / +inf logit: NaN loss at that voxel whatever its target, finite elsewhere (the kernel
    once clamped it to a finite 69.08 or 16.64 while the gradient was NaN; the torch path returned
    0 at an unlabelled voxel)."""
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1" if native_on else "0")
    x, t = partial_batch()
    x[at[0], 1, at[1], at[2]] = value
    out = make()(x, t)
    expected = torch.zeros_like(out, dtype=torch.bool)
    expected[at] = True
    assert torch.equal(~torch.isfinite(out), expected)
    assert torch.isnan(out[at])
    assert torch.isnan(make("mean")(x, t)) and torch.isnan(make("sum")(x, t))


@pytest.mark.parametrize("at", NONFINITE_AT, ids=["labelled", "unlabelled"])
@pytest.mark.parametrize("native_on", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("make", REGION, ids=_loss_id)
def test_nonfinite_logit_gives_nan_region_loss(make, native_on, at, monkeypatch):
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1" if native_on else "0")
    x, t = partial_batch()
    x[at[0], 3, at[1], at[2]] = float("nan")
    assert not torch.isfinite(make()(x, t)).all()
    x[at[0], 3, at[1], at[2]] = 0.0
    assert torch.isfinite(make()(x, t)).all()


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("reading", ["sum", "maps"])
def test_nonfinite_logit_conditional_and_prior(reading, native_on, monkeypatch):
    """Prior and conditional losses: NaN at the voxel even where y^c and z say nothing (unknown)."""
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1" if native_on else "0")
    m = 3
    x = torch.randn(2, 2 * m, 5, 4, generator=torch.Generator().manual_seed(5))
    z = torch.full((2, 2 * m, 5, 4), 0.5)
    z[0, :, 0, 0] = torch.tensor([1.0, 0, 0, 0, 0, 0])
    yc = torch.full((2, m, 5, 4), 0.5)
    yc[0, :, 0, 0] = torch.tensor([1.0, 0, 0])
    for at in [(0, 0, 0), (1, 2, 3)]:  # every entry known / every entry unknown
        xs = x.clone()
        xs[(at[0], 2, *at[1:])] = float("nan")
        for out in (PriorLoss("ce", reduction="none")(xs, yc), ConditionalCompatibleLoss(reduction="none", reading=reading)(xs, z, yc)):
            expected = torch.zeros_like(out, dtype=torch.bool)
            expected[at] = True
            assert torch.equal(torch.isnan(out), expected)


EMPTY = [(0, 4, 3, 3), (2, 4, 0, 3), (2, 4, 3, 0)]


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("shape", EMPTY, ids=["batch0", "spatial0", "last0"])
@pytest.mark.parametrize("make", VOXELWISE[:2] + REGION + [lambda: CompatibleLoss("ce", "ce")], ids=_loss_id)
def test_empty_input_is_a_value_error_naming_the_shape(make, shape, native_on, monkeypatch):
    """A batch of 0 or a zero-size spatial dim: ValueError naming the shape on both paths (it was a
    NaN mean, a Dice of 0, or a RuntimeError inside a reshape)."""
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1" if native_on else "0")
    x = torch.zeros(shape, requires_grad=True)
    with pytest.raises(ValueError, match=rf"no voxel.*|.*{shape[0]}, 4, {shape[2]}, {shape[3]}"):
        make()(x, torch.full(shape, 0.5))


@pytest.mark.parametrize("native_on", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0)])
def test_empty_conditional_input_is_a_value_error(shape, native_on, monkeypatch):
    monkeypatch.setenv("PARTIALSEG_NATIVE", "1" if native_on else "0")
    b, m, n = shape
    x, z, yc = torch.zeros(b, 2 * m, n), torch.zeros(b, 2 * m, n), torch.zeros(b, m, n)
    with pytest.raises(ValueError, match=r"\(%d, 6, %d\)" % (b, n)):
        PriorLoss()(x, yc)
    with pytest.raises(ValueError, match=r"\(%d, 6, %d\)" % (b, n)):
        ConditionalCompatibleLoss()(x, z, yc)


CHANNELS_LAST = [
    lambda: MarginalCELoss(reduction="none"), lambda: ExclusionCELoss(), lambda: MarginalDiceLoss(), lambda: ExclusionDiceLoss(),
    lambda: MarginalExclusionLoss(), lambda: CompatibleLoss("ce", "ce", reduction="none"),
    lambda: CompatibleLoss(("ta_ce", "ta_dice"), ("ex_ce", "ex_dice")), lambda: CompatibleLoss("dice", "dice"),
]  # fmt: skip


@pytest.mark.parametrize("make", CHANNELS_LAST, ids=_loss_id)
def test_channels_last_target_reads_as_contiguous(make, monkeypatch):
    """A target built as ``one_hot(...).movedim(-1, 1)`` (channels-last) is read in place by the
    kernels (transposed per block, not copied whole): same values and gradients as contiguous,
    and as the torch path; 300 voxels span three blocks, the last one partial."""
    x, t = partial_batch(shape=(3, 5, 12, 25))
    t_cl = t.movedim(1, -1).contiguous().movedim(-1, 1)
    assert not t_cl.is_contiguous() and torch.equal(t_cl, t)
    v_cl, g_cl = run(make(), x, t_cl, native_on=True, monkeypatch=monkeypatch)
    v_c, g_c = run(make(), x, t, native_on=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(v_cl, v_c, atol=0, rtol=0)
    torch.testing.assert_close(g_cl, g_c, atol=0, rtol=0)
    v_t, g_t = run(make(), x, t_cl, native_on=False, monkeypatch=monkeypatch)
    torch.testing.assert_close(v_cl, v_t, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g_cl, g_t, atol=2e-5, rtol=1e-4)


def test_changed_source_gets_a_new_library(monkeypatch, tmp_path):
    """The cache key hashes the C source: an edited losses.c never loads a stale library."""
    cc = native._compiler()
    before = native._library_path(cc)
    source = tmp_path / "losses.c"
    source.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", source)
    assert native._library_path(cc) != before
    assert native._library_path(cc).parent == before.parent


@pytest.mark.parametrize("make", VOXELWISE + REGION[:4], ids=_loss_id)
def test_minus_inf_logit_is_a_zero_probability_on_both_paths(make, monkeypatch):
    """-inf on a class known absent is p = 0, as in F.cross_entropy: finite loss and gradient, alike on both paths."""
    x, t = partial_batch()
    x[0, 1, 2, 3] = float("-inf") if t[0, 1, 2, 3] == 0 else x[0, 1, 2, 3]
    x[0, 4, 2, 3] = float("-inf") if t[0, 4, 2, 3] == 0 else x[0, 4, 2, 3]
    assert bool(torch.isinf(x).any())
    v_n, g_n = run(make(), x, t, native_on=True, monkeypatch=monkeypatch)
    v_t, g_t = run(make(), x, t, native_on=False, monkeypatch=monkeypatch)
    assert torch.isfinite(v_n).all() and torch.isfinite(g_n).all()
    torch.testing.assert_close(v_n, v_t, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g_n, g_t, atol=2e-5, rtol=1e-4)
