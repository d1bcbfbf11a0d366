"""Tests of SignedDistanceMap(d): brute-force distances, reference agreement, edge cases, types."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from monai.data import MetaTensor
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from partialseg.transforms.distance import (
    SignedDistanceMap,
    SignedDistanceMapd,
    SignedDistanceMapD,
    SignedDistanceMapDict,
    signed_distance_map,
)


def brute_force_sdm(mask: np.ndarray, spacing=None) -> np.ndarray:
    """SDM by enumerating all voxel pairs: outside/max - inside/max, 0 on the inner boundary."""
    mask = mask.astype(bool)
    sp = np.ones(mask.ndim) if spacing is None else np.broadcast_to(np.asarray(spacing, float), (mask.ndim,))
    coords = np.array(list(itertools.product(*[range(s) for s in mask.shape])), dtype=float)
    flat = mask.reshape(-1)
    fg, bg = coords[flat] * sp, coords[~flat] * sp
    out = np.zeros(mask.size)
    if fg.size == 0:
        return out.reshape(mask.shape)
    # distance of each voxel to the nearest voxel of the other set
    d_out = np.sqrt(((coords[~flat][:, None] * sp - fg[None]) ** 2).sum(-1)).min(1)
    d_in = np.sqrt(((coords[flat][:, None] * sp - bg[None]) ** 2).sum(-1)).min(1)
    out[~flat] = d_out / d_out.max()
    out[flat] = -d_in / d_in.max()
    # inner boundary: object voxel with a face neighbour (inside the image) in the background
    for idx in zip(*np.nonzero(mask)):
        for ax in range(mask.ndim):
            for step in (-1, 1):
                nb = list(idx)
                nb[ax] += step
                if 0 <= nb[ax] < mask.shape[ax] and not mask[tuple(nb)]:
                    out[np.ravel_multi_index(idx, mask.shape)] = 0.0
    return out.reshape(mask.shape)


def reference_sdm(mask: np.ndarray) -> np.ndarray:
    """The DTML reference approach: two full SciPy EDTs and skimage's find_boundaries."""
    posmask = mask.astype(bool)
    if not posmask.any():
        return np.zeros(mask.shape)
    posdis = ndi.distance_transform_edt(posmask)
    negdis = ndi.distance_transform_edt(~posmask)
    boundary = find_boundaries(posmask, mode="inner")
    sdf = (negdis - negdis.min()) / (negdis.max() - negdis.min()) - (posdis - posdis.min()) / (
        posdis.max() - posdis.min()
    )
    sdf[boundary] = 0
    return sdf


TINY_MASKS_2D = [
    np.pad(np.ones((3, 3), bool), ((1, 2), (2, 1))),  # square
    np.array([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 0, 0]], bool),  # irregular
    np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1]], bool),  # touches the border, two parts
    np.eye(5, dtype=bool),  # diagonal line
    np.pad(np.ones((1, 1), bool), ((2, 3), (1, 4))),  # single pixel
    np.pad(np.ones((5, 6), bool), ((0, 1), (0, 0))),  # object on three borders
]


def _tiny_masks_3d():
    rng = np.random.default_rng(3)
    m1 = np.zeros((5, 6, 4), bool)
    m1[1:4, 1:5, 1:3] = True
    m2 = ndi.binary_opening(rng.random((6, 5, 5)) > 0.45) | (rng.random((6, 5, 5)) > 0.9)
    m3 = np.zeros((4, 4, 4), bool)
    m3[0, 0, 0] = m3[3, 2, 1] = True
    return [m1, m2, m3]


@pytest.mark.parametrize("mask", TINY_MASKS_2D + _tiny_masks_3d())
def test_brute_force(mask):
    np.testing.assert_allclose(signed_distance_map(mask), brute_force_sdm(mask), atol=1e-6)


@pytest.mark.parametrize("spacing", [(2.0, 0.5), (1.0, 3.0), 2.5])
def test_brute_force_spacing_2d(spacing):
    mask = TINY_MASKS_2D[1]
    np.testing.assert_allclose(signed_distance_map(mask, spacing), brute_force_sdm(mask, spacing), atol=1e-6)


def test_brute_force_spacing_3d():
    mask = _tiny_masks_3d()[0]
    spacing = (1.0, 0.7, 2.0)
    np.testing.assert_allclose(signed_distance_map(mask, spacing), brute_force_sdm(mask, spacing), atol=1e-6)


def test_anisotropic_spacing_changes_map_isotropic_does_not():
    mask = TINY_MASKS_2D[1]
    base = signed_distance_map(mask)
    np.testing.assert_allclose(signed_distance_map(mask, 3.0), base, atol=1e-6)  # normalised per class
    assert np.abs(signed_distance_map(mask, (1.0, 4.0)) - base).max() > 0.05


def _blobs(shape, seed):
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    label = np.zeros(shape, np.int64)
    label[field > 0.08] = 1
    label[field < -0.1] = 2
    return label


@pytest.mark.parametrize("shape,seed", [((40, 36), 0), ((24, 20, 28), 1), ((17, 30, 9), 2)])
def test_matches_reference_on_random_blobs(shape, seed):
    label = _blobs(shape, seed)
    out = SignedDistanceMap(num_classes=3)(label[None])
    assert out.shape == (2, *shape) and out.dtype == np.float32
    for c in (1, 2):
        np.testing.assert_allclose(out[c - 1], reference_sdm(label == c), atol=1e-6)


def test_range_boundary_and_sign():
    label = _blobs((30, 30, 30), 4)
    out = SignedDistanceMap(num_classes=3, include_background=True)(label[None])
    assert out.shape == (3, 30, 30, 30)
    assert out.min() >= -1.0 and out.max() <= 1.0
    for c in range(3):
        m = label == c
        bnd = find_boundaries(m, mode="inner")
        assert np.all(out[c][bnd] == 0)
        assert np.all(out[c][m & ~bnd] < 0) and np.all(out[c][~m] > 0)
        assert out[c].min() == -1.0 and out[c].max() == 1.0


def test_empty_class_gives_zeros_and_full_class_gives_minus_one():
    label = np.zeros((1, 6, 7), np.int64)
    label[0, 2:4, 2:5] = 2
    out = SignedDistanceMap(num_classes=4)(label)
    assert out.shape == (3, 6, 7)
    assert np.all(out[0] == 0) and np.all(out[2] == 0)  # classes 1 and 3 absent
    assert np.abs(out[1]).max() == 1.0
    full = SignedDistanceMap(num_classes=2)(np.ones((1, 4, 4, 4), np.int64))
    assert np.all(full == -1.0)


def test_single_voxel_object():
    mask = np.zeros((5, 5, 5), bool)
    mask[2, 2, 2] = True
    out = signed_distance_map(mask)
    assert out[2, 2, 2] == 0.0  # the voxel is its own boundary
    assert np.isclose(out[0, 0, 0], 1.0) and np.isclose(out[2, 2, 3], 1.0 / np.sqrt(12))


def test_mask_input_and_one_hot():
    label = _blobs((20, 22), 5)
    onehot = np.stack([label == c for c in range(3)]).astype(np.float32)
    from_onehot = SignedDistanceMap()(onehot)
    from_label = SignedDistanceMap(num_classes=3)(label[None])
    np.testing.assert_array_equal(from_onehot, from_label)
    single = SignedDistanceMap(include_background=True)((label == 1)[None])
    np.testing.assert_array_equal(single[0], from_label[0])


def test_types_numpy_torch_metatensor():
    label = _blobs((16, 18), 6)[None]
    tr = SignedDistanceMap(num_classes=3)
    out_np = tr(label)
    assert isinstance(out_np, np.ndarray)
    out_t = tr(torch.as_tensor(label))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_array_equal(out_t.numpy(), out_np)
    affine = torch.diag(torch.tensor([2.0, 0.5, 1.0, 1.0]))
    mt = MetaTensor(torch.as_tensor(label), affine=affine)
    out_mt = tr(mt)
    assert isinstance(out_mt, MetaTensor) and torch.equal(out_mt.affine, affine)
    meta = SignedDistanceMap(num_classes=3, spacing="meta")(mt)
    expected = SignedDistanceMap(num_classes=3, spacing=(2.0, 0.5))(label)
    np.testing.assert_allclose(meta.numpy(), expected, atol=1e-7)
    assert np.abs(expected - out_np).max() > 0.01


def test_threads_identical():
    label = _blobs((20, 20, 20), 7)[None]
    a = SignedDistanceMap(num_classes=3)(label)
    b = SignedDistanceMap(num_classes=3, num_workers=3)(label)
    np.testing.assert_array_equal(a, b)


def test_dictionary():
    label = _blobs((12, 14, 10), 8)[None]
    data = {"label": label, "image": np.zeros_like(label, dtype=np.float32)}
    out = SignedDistanceMapd("label", num_classes=3, output_keys="sdm")(data)
    assert out["label"] is label and "sdm" not in data
    np.testing.assert_array_equal(out["sdm"], SignedDistanceMap(num_classes=3)(label))
    inplace = SignedDistanceMapd(["label", "missing"], num_classes=3, allow_missing_keys=True)(data)
    assert inplace["label"].shape == (2, 12, 14, 10) and "missing" not in inplace
    mt = MetaTensor(torch.as_tensor(label), affine=torch.diag(torch.tensor([1.0, 2.0, 3.0, 1.0])))
    via_meta = SignedDistanceMapd("label", num_classes=3, spacing="meta")({"label": mt})["label"]
    np.testing.assert_allclose(via_meta.numpy(), SignedDistanceMap(num_classes=3, spacing=(1, 2, 3))(label), atol=1e-7)
    assert SignedDistanceMapD is SignedDistanceMapd and SignedDistanceMapDict is SignedDistanceMapd
    with pytest.raises(KeyError):
        SignedDistanceMapd("missing", num_classes=3)(data)
    with pytest.raises(ValueError, match="output_keys"):
        SignedDistanceMapd(["a", "b"], num_classes=3, output_keys="c")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"num_classes": 1}, "include_background"),
        ({"spacing": "pixdim"}, "spacing"),
        ({"spacing": (1.0, -1.0)}, "spacing"),
        ({"num_workers": 0}, "num_workers"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SignedDistanceMap(**kwargs)


def test_bad_inputs():
    label = np.zeros((1, 5, 5), np.int64)
    with pytest.raises(ValueError, match="label map"):
        SignedDistanceMap(num_classes=2)(np.zeros((2, 5, 5)))
    with pytest.raises(ValueError, match="label values"):
        SignedDistanceMap(num_classes=2)(label + 2)
    with pytest.raises(ValueError, match="integers"):
        SignedDistanceMap(num_classes=2)(label + 0.5)
    with pytest.raises(ValueError, match="include_background=True"):
        SignedDistanceMap()(label)
    with pytest.raises(ValueError, match="MetaTensor"):
        SignedDistanceMap(num_classes=2, spacing="meta")(label)
    with pytest.raises(ValueError, match="spacing"):
        SignedDistanceMap(num_classes=2, spacing=(1.0, 2.0, 3.0))(label)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5)),
    st.tuples(*[st.floats(0.5, 3.0)] * 3),
)
def test_property_brute_force(mask, spacing):
    sp = spacing[: mask.ndim]
    out = signed_distance_map(mask, sp)
    if mask.all():
        assert np.all(out == -1.0)
        return
    np.testing.assert_allclose(out, brute_force_sdm(mask, sp), atol=1e-5)
    assert np.all(np.abs(out) <= 1.0)
