"""PartialLabelToVector, RemapLabels and LateralSplit, on hand-made labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate

from partialseg.transforms import (
    LateralSplit,
    LateralSplitd,
    PartialLabelToVector,
    PartialLabelToVectord,
    RemapLabels,
    RemapLabelsd,
    annotated_mask,
)

p = 0.5
# (label (1, 2, 2), annotated, expected (4, 2, 2) written as per-voxel vectors in raster order)
VECTOR_CASES = {
    # fully labelled: one-hot everywhere
    "full": ([[[0, 1], [2, 3]]], "all", [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
    # one structure (class 2) annotated: 2 -> one-hot; 0 -> "not 2": 0 for class 2, p for the rest
    "single": ([[[0, 2], [2, 0]]], [2], [[p, p, 0, p], [0, 0, 1, 0], [0, 0, 1, 0], [p, p, 0, p]]),
    # two annotated: value 3 is not annotated -> unknown among the non-annotated {0, 2}
    "two": ([[[1, 3], [0, 2]]], [1, 2], [[0, 1, 0, 0], [p, 0, 0, p], [p, 0, 0, p], [0, 0, 1, 0]]),
    # DCL whole heart: background annotated, heart carries the non-annotated value 1
    "background": ([[[0, 1], [1, 0]]], [0], [[1, 0, 0, 0], [0, p, p, p], [0, p, p, p], [1, 0, 0, 0]]),
    # a label with nothing annotated: every entry unknown
    "unlabelled": ([[[0, 1], [2, 3]]], [], [[p, p, p, p]] * 4),
}


def _as_vectors(out):
    out = np.asarray(out)
    return out.reshape(out.shape[0], -1).T.tolist()


@pytest.mark.parametrize("name", VECTOR_CASES)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_partial_label_to_vector_by_hand(name, kind):
    label, annotated, expected = VECTOR_CASES[name]
    label = np.asarray(label, dtype=np.int64)
    if kind == "torch":
        label = torch.as_tensor(label)
    out = PartialLabelToVector(4, p=p)(label, annotated)
    assert isinstance(out, np.ndarray if kind == "numpy" else torch.Tensor)
    assert out.shape == (4, 2, 2) and out.dtype in (np.float32, torch.float32)
    assert _as_vectors(out) == expected


def test_unlabelled_without_label_and_custom_p():
    out = PartialLabelToVector(3, p=0.25)(None, [], spatial_shape=(2, 3, 4))
    assert out.shape == (3, 2, 3, 4) and torch.all(out == 0.25)


def test_3d_metatensor_keeps_affine_and_every_voxel_is_consistent():
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 5, size=(1, 7, 6, 5))
    affine = torch.diag(torch.tensor([2.0, 1.5, 3.0, 1.0]))
    out = PartialLabelToVector(5)(MetaTensor(torch.as_tensor(lab), affine=affine), [1, 3])
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine.to(out.affine.dtype))
    out = out.as_tensor()
    lab = torch.as_tensor(lab[0])
    known = (lab == 1) | (lab == 3)
    # annotated voxels one-hot; others: 0 on annotated classes, p elsewhere
    assert torch.all(out[:, known].sum(0) == 1)
    assert torch.all(out[1][~known] == 0) and torch.all(out[3][~known] == 0)
    assert torch.all(out[[0, 2, 4]][:, ~known] == 0.5)


@pytest.mark.parametrize(
    "kwargs, call, match",
    [
        ({"num_classes": 1}, None, "num_classes"),
        ({"num_classes": 3, "p": 1.0}, None, "p must"),
        ({"num_classes": 3, "p": 0.0}, None, "p must"),
        ({"num_classes": 3}, (np.zeros((2, 2, 2)), [1]), "one channel"),
        ({"num_classes": 3}, (np.zeros((1, 2, 2)), [3]), "outside"),
        ({"num_classes": 3}, (None, [1]), "no label"),
        ({"num_classes": 3}, (None, []), "spatial_shape"),
        ({"num_classes": 3}, (np.zeros((1, 2, 2)), "some"), "annotated must"),
        # values that are not class indices would silently become an all-zero (impossible) vector
        ({"num_classes": 3}, (np.array([[[0, 9]]]), "all"), r"value\(s\) \[9\] outside the class indices \[0, 3\)"),
        ({"num_classes": 3}, (np.array([[[0, -1]]]), [1]), r"\[-1\] outside"),
        ({"num_classes": 3}, (np.array([[[0, 255]]], np.uint8), [1]), r"\[255\] outside.*label_maps"),
        ({"num_classes": 3}, (np.array([[[0, np.nan]]], np.float32), "all"), r"\[nan\] outside"),
        ({"num_classes": 3}, (np.array([[[0, 0.5]]], np.float32), "all"), "non-integer value 0.5.*nearest"),
        ({"num_classes": 3}, (np.array([[[0, 2.5]]], np.float32), "all"), "non-integer value 2.5"),
    ],
)
def test_partial_label_to_vector_rejects_bad_input(kwargs, call, match):
    with pytest.raises(ValueError, match=match):
        PartialLabelToVector(**kwargs)(*call) if call else PartialLabelToVector(**kwargs)


def test_annotated_mask_forms():
    assert annotated_mask("all", 3).tolist() == [True] * 3
    assert annotated_mask(None, 3).tolist() == [False] * 3
    assert annotated_mask(torch.tensor([0.0, 1.0, 0.0]), 3).tolist() == [False, True, False]
    assert annotated_mask(np.array([True, False, True]), 3).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="shape"):
        annotated_mask(torch.tensor([0.0, 1.0]), 3)


def test_dictionary_mixes_full_partial_and_unlabelled_cases_in_one_batch():
    image = torch.zeros(1, 4, 4)
    cases = [
        {"image": image, "label": torch.randint(0, 3, (1, 4, 4)), "annotated": [0, 1, 2]},
        {"image": image, "label": torch.randint(0, 2, (1, 4, 4)) * 2, "annotated": [2]},
        {"image": image, "annotated": []},  # unlabelled: no label key at all
    ]
    t = PartialLabelToVectord("label", num_classes=3)
    out = [t(c) for c in cases]
    assert "label" not in cases[2]  # the input is not mutated
    batch = list_data_collate(out)
    assert batch["label"].shape == (3, 3, 4, 4)
    assert batch["annotated"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert torch.all(batch["label"][2] == 0.5)
    assert torch.all(batch["label"][0].sum(0) == 1)


def test_remap_labels_merges_and_rejects_unlisted_values():
    assert RemapLabels({"1": 2, "2": 2})(np.array([[0, 1, 2, 1]])).tolist() == [[0, 2, 2, 2]]
    with pytest.raises(ValueError, match=r"value\(s\) \[5\]"):
        RemapLabels({1: 2})(np.array([[0, 1, 5]]))
    t = torch.tensor([[0, 1]])
    assert torch.equal(RemapLabels({1: 3})(t), torch.tensor([[0, 3]]))


def _two_blobs():
    lab = np.zeros((1, 10, 4, 3), dtype=np.int64)
    lab[0, 1:3, 1:3, 1] = 1  # low array index along axis 0
    lab[0, 7:9, 1:3, 1] = 1  # high array index along axis 0
    return lab


def test_lateral_split_uses_world_coordinates():
    lab = _two_blobs()
    ras = np.diag([1.5, 1.5, 3.0, 1.0])
    out = LateralSplit(1, left=3, right=4)(lab, affine=ras)
    # RAS: +x is the patient's right, so the blob at low x is the left kidney
    assert set(np.unique(out[0, 1:3])) == {0, 3} and set(np.unique(out[0, 7:9])) == {0, 4}
    flipped = ras.copy()
    flipped[0, 0], flipped[0, 3] = -1.5, 13.5  # axis 0 now runs towards the patient's left
    out = LateralSplit(1, left=3, right=4)(lab, affine=flipped)
    assert set(np.unique(out[0, 1:3])) == {0, 4} and set(np.unique(out[0, 7:9])) == {0, 3}
    out = LateralSplit(1, left=3, right=4, space="LPS")(lab, affine=ras)  # LPS: +x is the left
    assert set(np.unique(out[0, 1:3])) == {0, 4}
    # the voxel count is preserved and nothing else changes
    assert (out > 0).sum() == (lab == 1).sum()


def test_lateral_split_of_a_2d_slice_with_its_nifti_affine():
    # MONAI loads a 2D NIfTI with a 4 x 4 affine (the slice lies in 3D world space)
    lab = _two_blobs()[..., 1]  # (1, 10, 4)
    flipped3 = np.array([[-1.5, 0, 13.5], [0, 1.5, 0], [0, 0, 1.0]])
    flipped4 = np.array([[-1.5, 0, 0, 13.5], [0, 1.5, 0, 0], [0, 0, 3.0, 7.0], [0, 0, 0, 1.0]])
    out3 = LateralSplit(1, 3, 4)(lab, affine=flipped3)
    assert set(np.unique(out3[0, 1:3])) == {0, 4} and set(np.unique(out3[0, 7:9])) == {0, 3}
    np.testing.assert_array_equal(LateralSplit(1, 3, 4)(lab, affine=flipped4), out3)
    meta = MetaTensor(torch.as_tensor(lab), affine=torch.as_tensor(flipped4))
    np.testing.assert_array_equal(RemapLabels({1: [3, 4]})(meta).as_tensor().numpy(), out3)


def test_label_map_sources_are_non_negative_and_errors_name_the_case():
    with pytest.raises(ValueError, match=r"label_map\[-1\]: source values are non-negative"):
        RemapLabels({1: 2, -1: 3})  # -1 would index the lookup table from its end
    with pytest.raises(ValueError, match=r"case 'k3'.*'label_map'.*non-negative"):
        RemapLabelsd("label")({"label": torch.tensor([[0, 1]]), "label_map": {"-1": 2}, "case": "k3"})
    with pytest.raises(ValueError, match=r"case 'k4'.*key 'label'.*\[7\] outside"):
        PartialLabelToVectord("label", num_classes=3)({"label": torch.tensor([[[0, 7]]]), "annotated": "all", "case": "k4"})


def test_lateral_split_midline_options_and_errors():
    lab = _two_blobs()
    # a midline beyond both blobs puts both on the left (RAS: x below the midline)
    out = LateralSplit(1, 3, 4, midline=100.0)(lab, affine=np.eye(4))
    assert set(np.unique(out)) == {0, 3}
    out = LateralSplit(1, 3, 4, midline="mask")(lab, affine=np.eye(4))
    assert set(np.unique(out)) == {0, 3, 4}
    with pytest.raises(ValueError, match="affine"):
        LateralSplit(1, 3, 4)(lab)
    with pytest.raises(ValueError, match="midline"):
        LateralSplit(1, 3, 4, midline="middle")


def test_remap_labelsd_lateral_with_metatensor_and_consumes_the_map():
    lab = MetaTensor(torch.as_tensor(_two_blobs()), affine=torch.eye(4))
    d = {"label": lab, "label_map": {1: [3, 4]}, "case": "k1"}
    out = RemapLabelsd("label")(d)
    assert "label_map" not in out and "label_map" in d
    arr = out["label"].as_tensor()
    assert set(arr[0, 1:3].unique().tolist()) == {0, 3} and set(arr[0, 7:9].unique().tolist()) == {0, 4}
    with pytest.raises(ValueError, match="case 'k2'"):
        RemapLabelsd("label")({"label": torch.tensor([[0, 7]]), "label_map": {1: 2}, "case": "k2"})
    out = LateralSplitd("label", value=1, left=3, right=4)({"label": lab})
    assert torch.equal(out["label"].as_tensor(), arr)
