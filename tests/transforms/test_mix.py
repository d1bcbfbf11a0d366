"""Tests of ForegroundPaste(d): values by hand, same mask on every key, types, shape errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from partialseg.transforms.mix import ForegroundPaste, ForegroundPasted, ForegroundPasteD, ForegroundPasteDict

A = np.array([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]], dtype=np.float32)  # (1, 2, 3)
B = np.array([[[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]], dtype=np.float32)
M = np.array([[[1, 0, 1], [0, 0, 1]]], dtype=np.uint8)

HAND_CASES = [
    (M, [[[1.0, 20.0, 3.0], [40.0, 50.0, 6.0]]]),
    (M.astype(bool), [[[1.0, 20.0, 3.0], [40.0, 50.0, 6.0]]]),
    (M.astype(np.float32) * 0.25, [[[7.75, 20.0, 23.25], [40.0, 50.0, 46.5]]]),  # 0.25 a + 0.75 b
    (np.zeros_like(M), B.tolist()),
    (np.ones_like(M), A.tolist()),
]


@pytest.mark.parametrize("mask,expected", HAND_CASES)
def test_by_hand(mask, expected):
    out = ForegroundPaste()(A, B, mask)
    assert isinstance(out, np.ndarray) and out.shape == (1, 2, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_mask_threshold_and_channel_broadcast():
    prob = np.array([[[0.9, 0.2, 0.6], [0.1, 0.4, 0.51]]], dtype=np.float32)
    out = ForegroundPaste(mask_threshold=0.5)(A, B, prob)
    np.testing.assert_array_equal(out, [[[1.0, 20.0, 3.0], [40.0, 50.0, 6.0]]])
    a3, b3 = np.repeat(A, 3, 0), np.repeat(B, 3, 0)  # (3, 2, 3) images, (1, 2, 3) mask
    out3 = ForegroundPaste()(a3, b3, M)
    assert out3.shape == (3, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(out3[c], ForegroundPaste()(A, B, M)[0])
    # batched (B, C, H, W) with a per-sample mask (B, 1, H, W)
    xa, xb = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    mb = (torch.rand(2, 1, 4, 4) > 0.5).float()
    torch.testing.assert_close(ForegroundPaste()(xa, xb, mb), mb * xa + (1 - mb) * xb)


def test_integer_labels_keep_dtype_and_types():
    la = torch.tensor([[[2, 2, 0], [2, 0, 0]]])
    lb = torch.tensor([[[0, 1, 1], [0, 1, 1]]])
    out = ForegroundPaste()(la, lb, torch.as_tensor(M))
    assert out.dtype == lb.dtype
    assert out.tolist() == [[[2, 1, 0], [0, 1, 0]]]
    mt = MetaTensor(torch.as_tensor(B), affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])))
    out_mt = ForegroundPaste()(torch.as_tensor(A), mt, M)
    assert isinstance(out_mt, MetaTensor) and torch.equal(out_mt.affine, mt.affine)
    out_np = ForegroundPaste()(torch.as_tensor(A), B, M)  # container type follows dst
    assert isinstance(out_np, np.ndarray)


def test_dictionary_same_mask_on_all_keys():
    rng = np.random.default_rng(0)
    img_i, img_j = rng.random((1, 6, 5, 4)).astype(np.float32), rng.random((1, 6, 5, 4)).astype(np.float32)
    lab_i, lab_j = rng.integers(0, 3, (1, 6, 5, 4)), rng.integers(0, 3, (1, 6, 5, 4))
    pseudo_i, pseudo_j = rng.random((3, 6, 5, 4)), rng.random((3, 6, 5, 4))
    mask = (lab_i == 2).astype(np.float32)
    data = {
        "image_j": img_j, "label_j": lab_j, "pseudo_j": pseudo_j,
        "image_i": img_i, "label_i": lab_i, "pseudo_i": pseudo_i, "mask": mask,
    }
    t = ForegroundPasted(
        ["image_j", "label_j", "pseudo_j"],
        source_keys=["image_i", "label_i", "pseudo_i"],
        mask_key="mask",
        output_keys=["image_m", "label_m", "pseudo_m"],
    )
    out = t(data)
    sel = mask.astype(bool)
    for name, (src, dst) in {"image": (img_i, img_j), "label": (lab_i, lab_j), "pseudo": (pseudo_i, pseudo_j)}.items():
        expected = np.where(sel, src, dst)
        np.testing.assert_array_equal(out[f"{name}_m"], expected)
    assert out["image_j"] is img_j  # inputs untouched, new keys written
    assert np.all(out["label_m"][sel] == 2)
    inplace = ForegroundPasted("image_j", "image_i", "mask")(data)
    np.testing.assert_array_equal(inplace["image_j"], out["image_m"])
    assert ForegroundPasteD is ForegroundPasted and ForegroundPasteDict is ForegroundPasted


def test_dictionary_errors_and_missing():
    data = {"a": np.zeros((1, 4, 4)), "b": np.ones((1, 4, 5)), "m": np.ones((1, 4, 4)), "c": np.ones((1, 4, 4))}
    with pytest.raises(ValueError, match=r"'b'.*\(1, 4, 5\).*'a'.*\(1, 4, 4\)"):
        ForegroundPasted("a", "b", "m")(data)
    with pytest.raises(ValueError, match=r"mask 'm' \(1, 4, 4\)"):
        ForegroundPasted("b", "b", "m")(data)
    with pytest.raises(ValueError, match="source_keys"):
        ForegroundPasted(["a", "c"], "b", "m")
    with pytest.raises(ValueError, match="output_keys"):
        ForegroundPasted("a", "c", "m", output_keys=["x", "y"])
    with pytest.raises(KeyError, match="mask_key"):
        ForegroundPasted("a", "c", "nomask")(data)
    with pytest.raises(KeyError, match="source key"):
        ForegroundPasted("a", "nosrc", "m")(data)
    with pytest.raises(KeyError):
        ForegroundPasted("missing", "c", "m")(data)
    out = ForegroundPasted(["a", "missing"], ["c", "c"], "m", allow_missing_keys=True)(data)
    np.testing.assert_array_equal(out["a"], np.ones((1, 4, 4)))
    assert "missing" not in out


def test_array_errors():
    with pytest.raises(ValueError, match="same shape"):
        ForegroundPaste()(A, B[:, :1], M)
    with pytest.raises(ValueError, match="mask"):
        ForegroundPaste()(A, B, M[:, :1, :2])
    with pytest.raises(ValueError, match="mask"):
        ForegroundPaste()(A, B, M[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ForegroundPaste()(A, B, M * 2.0)
    with pytest.raises(ValueError, match="mask_threshold"):
        ForegroundPaste(mask_threshold=float("nan"))
