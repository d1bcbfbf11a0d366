"""Tests of AtlasCrop(d): Otsu body box, same box for all keys, MONAI inverse round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from partialseg.transforms.spatial import AtlasCrop, AtlasCropd, AtlasCropD, AtlasCropDict, OtsuForeground


def _body_case(shape=(40, 48, 36), seed=0):
    """A noisy 'torso' ellipsoid on a dark background, a small bright 'table' blob, and a label inside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    centre = np.array([s / 2 for s in shape]).reshape(-1, 1, 1, 1)
    radii = np.array([0.35 * s for s in shape]).reshape(-1, 1, 1, 1)
    body = (((grid - centre) / radii) ** 2).sum(0) < 1.0
    img = 0.1 * rng.standard_normal(shape) + 1.0 * body
    img[1:3, 1:3, 1:3] = 1.0  # a separate bright speck: not the largest component
    label = np.zeros(shape, np.float32)
    label[(((grid - centre) / (0.5 * radii)) ** 2).sum(0) < 1.0] = 1.0
    label[(((grid - centre - 3) / (0.25 * radii)) ** 2).sum(0) < 1.0] = 2.0
    affine = torch.tensor([[1.5, 0, 0, -10.0], [0, 0.8, 0, 5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]], dtype=torch.float64)
    return (
        MetaTensor(torch.as_tensor(img[None], dtype=torch.float32), affine=affine),
        MetaTensor(torch.as_tensor(label[None]), affine=affine),
        body,
    )


def _dice(a, b, c):
    a, b = np.asarray(a) == c, np.asarray(b) == c
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_otsu_foreground_box_is_body():
    img, _, body = _body_case()
    mask = OtsuForeground()(img)
    assert mask.shape == (1, 40, 48, 36) and mask.dtype == torch.bool
    idx = np.argwhere(mask[0].numpy())
    expected = np.argwhere(body)
    np.testing.assert_array_equal(idx.min(0), expected.min(0))  # speck at (1..2)^3 dropped
    np.testing.assert_array_equal(idx.max(0), expected.max(0))
    # without the largest-component filter the speck widens the box
    assert np.argwhere(OtsuForeground(largest_component=False)(img)[0].numpy()).min(0).tolist() == [1, 1, 1]
    assert bool(OtsuForeground(sigma=1.0)(img).any())
    # constant image: everything is foreground (crop keeps the whole image)
    assert bool(OtsuForeground()(torch.ones(1, 5, 5)).all())


def test_array_crop_resize_and_inverse():
    img, _, body = _body_case()
    t = AtlasCrop(spatial_size=(20, 24, 18), margin=2, mode="trilinear")
    start, end = t.compute_bounding_box(img)
    expected = np.argwhere(body)
    np.testing.assert_array_equal(start, np.maximum(expected.min(0) - 2, 0))
    np.testing.assert_array_equal(end, np.minimum(expected.max(0) + 3, body.shape))
    out = t(img)
    assert isinstance(out, MetaTensor) and out.shape == (1, 20, 24, 18)
    back = t.inverse(out)
    assert back.shape == img.shape
    torch.testing.assert_close(back.affine, img.affine)
    # numpy input works and gives the same result
    out_np = t(img.numpy())
    torch.testing.assert_close(out_np.as_tensor(), out.as_tensor())


def test_dictionary_same_box_and_invertd_round_trip():
    img, label, _ = _body_case()
    pre = Compose([AtlasCropd(["image", "label"], spatial_size=(32, 40, 30), margin=1)])
    out = pre({"image": img, "label": label})
    assert out["image"].shape == out["label"].shape == (1, 32, 40, 30)
    assert set(np.unique(out["label"].numpy())) <= {0.0, 1.0, 2.0}  # nearest-exact for the label
    box_start = AtlasCrop((32, 40, 30), margin=1).compute_bounding_box(img)[0]
    np.testing.assert_array_equal(out["foreground_start_coord"], box_start)
    # a 'prediction' on the reference shape goes back to the label's original grid
    out["pred"] = out["label"].clone()
    inv = Invertd(keys="pred", transform=pre, orig_keys="label", nearest_interp=False)(out)
    pred = inv["pred"]
    assert pred.shape == label.shape
    torch.testing.assert_close(pred.affine, label.affine)
    for c in (1, 2):  # upsampled reference shape: nearest-exact there and back is lossless here
        assert _dice(pred[0], label[0], c) > 0.99
    # a smaller reference shape loses detail but the label stays in place
    small = Compose([AtlasCropd(["image", "label"], spatial_size=(24, 28, 22), margin=1)])
    out = small({"image": img, "label": label})
    out["pred"] = out["label"].clone()
    pred = Invertd(keys="pred", transform=small, orig_keys="label", nearest_interp=False)(out)["pred"]
    assert pred.shape == label.shape and _dice(pred[0], label[0], 1) > 0.85
    # the dictionary inverse restores every key
    back = pre.inverse(pre({"image": img, "label": label}))
    assert back["image"].shape == img.shape and back["label"].shape == label.shape
    torch.testing.assert_close(back["label"].affine, label.affine)


def test_dictionary_2d_and_modes():
    img = torch.zeros(1, 30, 40)
    img[0, 5:25, 10:35] = 1.0
    lab = torch.zeros(1, 30, 40)
    lab[0, 10:20, 15:30] = 3.0
    t = AtlasCropd(["image", "label"], spatial_size=(40, 50), mode=("bilinear", "nearest-exact"))
    out = t({"image": img, "label": lab})
    assert out["image"].shape == (1, 40, 50) and set(np.unique(out["label"].numpy())) == {0.0, 3.0}
    back = t.inverse(out)
    assert _dice(back["label"][0], lab[0], 3) > 0.95
    assert AtlasCropD is AtlasCropd and AtlasCropDict is AtlasCropd


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"spatial_size": (0, 4)}, "spatial_size"),
        ({"spatial_size": (4.5, 4)}, "spatial_size"),
        ({"spatial_size": (4, 4), "margin": -1}, "margin"),
        ({"spatial_size": (4, 4), "sigma": -1.0}, "sigma"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AtlasCrop(**kwargs)
    with pytest.raises(ValueError, match=match):
        AtlasCropd(["image"], **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="spatial_size"):
        AtlasCrop((4, 4, 4))(torch.rand(1, 8, 8))
    with pytest.raises(TypeError, match="MetaTensor"):
        AtlasCrop((4, 4)).inverse(torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="mode"):
        AtlasCropd(["image", "label", "x"], spatial_size=4, mode=("area", "nearest"))
    with pytest.raises(KeyError, match="source_key"):
        AtlasCropd(["label"], spatial_size=4)({"label": torch.rand(1, 8, 8)})
    with pytest.raises(ValueError, match="'label'"):
        AtlasCropd(["image", "label"], spatial_size=(4, 4))(
            {"image": torch.rand(1, 8, 8), "label": torch.rand(1, 8, 8, 8)}
        )
