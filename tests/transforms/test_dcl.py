"""DCL conditional supervision g(y_t, y_c) (Eq. 5) by hand, label views, and the conditional sampler."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import partialseg.data.dcl as conditional_data
import partialseg.transforms.dcl.array as conditional_array
import partialseg.transforms.dcl.dictionary as conditional_dict
from partialseg.data.dcl import ConditionalDataset
from partialseg.transforms import (
    ConditionalSupervision,
    ConditionalSupervisiond,
    PartialLabelToVector,
    SingleLabelView,
    conditional_supervision,
    label_view,
)

P = 0.5
# m = 3 (background, A, B), 4 voxels in a row; ground truth classes (0, 1, 2, 1)
# target annotates only A: <0,p,1> map from PartialLabelToVector
TARGET_LABEL = np.array([[[0, 1, 2, 1]]])
YT = np.array(
    [[[P, 0, P, 0]],   # background: unknown except on A voxels
     [[0, 1, 0, 1]],   # A: known
     [[P, 0, P, 0]]],  # B: unknown except on A voxels
    dtype=np.float32,
)
# conditional labels, one per class: channel j is binary (its case annotates j)
YC = np.array([[[1, 0, 0, 1]], [[0, 1, 1, 0]], [[0, 0, 1, 0]]], dtype=np.float32)
# z_cap = yt * yc ; z_delta = yt - z_cap, element by element
Z_CAP = np.array([[[P, 0, 0, 0]], [[0, 1, 0, 0]], [[0, 0, P, 0]]], dtype=np.float32)
Z_DELTA = np.array([[[0, 0, P, 0]], [[0, 0, 0, 1]], [[P, 0, 0, 0]]], dtype=np.float32)


def test_target_is_the_partial_vector():
    np.testing.assert_array_equal(PartialLabelToVector(3, p=P)(TARGET_LABEL, annotated=[1]), YT)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_g_by_hand(as_tensor):
    yt, yc = (torch.as_tensor(YT), torch.as_tensor(YC)) if as_tensor else (YT, YC)
    z = ConditionalSupervision()(yt, yc)
    assert type(z) is type(yt) and z.shape == (6, 1, 4)
    np.testing.assert_array_equal(np.asarray(z[:3]), Z_CAP)
    np.testing.assert_array_equal(np.asarray(z[3:]), Z_DELTA)
    np.testing.assert_array_equal(np.asarray(z[:3]) + np.asarray(z[3:]), YT)  # Eq. 6: z_cap + z_delta = y_t


def test_g_batched_and_dictionary():
    yt, yc = torch.as_tensor(YT)[None], torch.as_tensor(YC)[None]
    z = conditional_supervision(yt, yc, channel_dim=1)
    np.testing.assert_array_equal(z[0].numpy(), np.concatenate([Z_CAP, Z_DELTA]))
    out = ConditionalSupervisiond("label", output_keys="z")({"label": YT, "cond_label": YC})
    np.testing.assert_array_equal(out["z"], np.concatenate([Z_CAP, Z_DELTA]))
    assert out["label"] is YT
    with pytest.raises(KeyError, match="cond_label"):
        ConditionalSupervisiond("label")({"label": YT})
    with pytest.raises(ValueError, match="same shape"):
        ConditionalSupervision()(YT, YC[:2])
    with pytest.raises(ValueError, match="output"):
        ConditionalSupervisiond(["a", "b"], output_keys="z")
    with pytest.raises(TypeError):
        ConditionalSupervision(dtype="float32")


def test_single_label_view_by_hand():
    full = PartialLabelToVector(3, p=P)(TARGET_LABEL, annotated="all")
    for j in range(3):
        expected = PartialLabelToVector(3, p=P)(TARGET_LABEL, annotated=[j])
        np.testing.assert_array_equal(SingleLabelView(P)(full, classes=[j]), expected)
        torch.testing.assert_close(label_view(torch.as_tensor(full)[None], [j], P, channel_dim=1)[0], torch.as_tensor(expected))
    with pytest.raises(ValueError, match="outside"):
        label_view(torch.as_tensor(full), [3])
    with pytest.raises(ValueError, match="p must"):
        SingleLabelView(1.0)


def _cases(annotated, m=4, size=6, seed=0):
    """Cases with a random ground truth each; case i has image value i; labels as PartialLabelToVector gives."""
    rng = np.random.default_rng(seed)
    out = []
    for i, ann in enumerate(annotated):
        gt = rng.integers(0, m, size=(1, size, size))
        gt[0, 0, :m] = np.arange(m)  # every class present
        out.append({"image": torch.full((1, size, size), float(i)), "label": torch.as_tensor(PartialLabelToVector(m)(gt, ann)), "gt": gt})
    return out


ANNOTATED = [[1], [2], [3], [0], [1], "all", [2, 3], [], [1]]


@pytest.mark.parametrize("seed", range(20))
def test_sampler_conditions_always_have_their_class(seed):
    cases = _cases(ANNOTATED, seed=seed)
    ds = ConditionalDataset(cases, 4, annotated=ANNOTATED, seed=seed)
    # full-annotation mode: "all" -> 4 views, [2, 3] -> 2 views
    assert len(ds) == len(ANNOTATED) - 2 + 4 + 2
    for epoch in range(2):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            case = ds.views[i][0]
            for j, c in enumerate(item["cond_index"].tolist()):
                classes = [0, 1, 2, 3] if ANNOTATED[c] == "all" else ANNOTATED[c]
                assert j in classes, (seed, i, j, c)
                if c != case:  # another case annotating j is available for every class here
                    assert item["cond_image"][j, 0, 0].item() == c
                lab = item["cond_label"][j]
                assert set(lab.unique().tolist()) <= {0.0, 1.0}
                torch.testing.assert_close(lab, torch.as_tensor(cases[c]["gt"][0] == j, dtype=torch.float32))
            assert item["cond_image"].shape == (4, 6, 6) and item["cond_label"].shape == (4, 6, 6)


def test_sampler_is_reproducible_and_views_are_single_label():
    cases = _cases(ANNOTATED)
    a = ConditionalDataset(cases, 4, annotated=ANNOTATED, seed=3)
    b = ConditionalDataset(cases, 4, annotated=ANNOTATED, seed=3)
    draws = [a.draw(i) for i in range(len(a))]
    assert draws == [b.draw(i) for i in reversed(range(len(b)))][::-1]
    a.set_epoch(1)
    assert draws != [a.draw(i) for i in range(len(a))]
    assert draws != [ConditionalDataset(cases, 4, annotated=ANNOTATED, seed=4).draw(i) for i in range(len(a))]
    full_views = [i for i, (c, _) in enumerate(a.views) if c == 5]
    for k, i in enumerate(full_views):
        item = a[i]
        assert item["target_classes"].tolist() == [float(j == k) for j in range(4)]
        expected = PartialLabelToVector(4)(cases[5]["gt"], [k])
        torch.testing.assert_close(item["label"], torch.as_tensor(expected))
    kept = ConditionalDataset(cases, 4, annotated=ANNOTATED, split_annotated=False)
    assert len(kept) == len(ANNOTATED)
    torch.testing.assert_close(kept[5]["label"], cases[5]["label"])


def test_sampler_missing_class():
    annotated = [[1], [2], [1]]
    cases = _cases(annotated, m=3)
    with pytest.raises(ValueError, match=r"^background \(0\): held in no case"):
        ConditionalDataset(cases, 3, annotated=annotated)
    ds = ConditionalDataset(cases, 3, annotated=annotated, missing="any")
    assert ds.missing_classes == [0] and ds[0]["cond_label"].shape == (3, 6, 6)


def test_sampler_bad_arguments():
    cases = _cases([[0], [1]], m=2)
    with pytest.raises(ValueError, match="missing"):
        ConditionalDataset(cases, 2, annotated=[[0], [1]], missing="skip")
    with pytest.raises(ValueError, match="num_classes"):
        ConditionalDataset(cases, 1, annotated=[[0], [1]])
    with pytest.raises(ValueError, match="seed"):
        ConditionalDataset(cases, 2, annotated=[[0], [1]], seed=-1)
    with pytest.raises(ValueError, match="entries"):
        ConditionalDataset(cases, 2, annotated=[[0]])
    with pytest.raises(ValueError, match="dataset.data"):
        ConditionalDataset(cases, 2)
    with pytest.raises(TypeError):
        ConditionalDataset(3, 2, annotated=[])
    bad = [dict(cases[0]), dict(cases[1], image=torch.zeros(1, 5, 5))]
    with pytest.raises(ValueError, match="one size"):
        ConditionalDataset(bad, 2, annotated=[[0], [1]])[0]


@pytest.mark.parametrize("module", [conditional_array, conditional_dict, conditional_data])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_sampler_names_a_conditional_case_without_the_class_map():
    cases = _cases([[0], [1]], m=2)
    cases[1] = {**cases[1], "label": torch.zeros(1, 6, 6)}  # an index map, not the <0,p,1> map
    with pytest.raises(ValueError, match=r"case 1: 'label' must be the <0,p,1> map with 2 channels"):
        ConditionalDataset(cases, 2, annotated=[[0], [1]])  # pools="present" reads every case at once
    ds = ConditionalDataset(cases, 2, annotated=[[0], [1]], pools="annotated")  # the paper's pools: found when drawn
    with pytest.raises(ValueError, match=r"conditional case 1 \(class 1\): 'label' must be the <0,p,1> map with 2 channels"):
        ds[0]
    # a second pass within one epoch draws anew; pass 0 keeps the epoch's draws
    ds = ConditionalDataset(_cases(ANNOTATED), 4, annotated=ANNOTATED)
    ds.set_epoch(2)
    first = [ds.draw(i) for i in range(len(ds))]
    ds.set_epoch(2, 1)
    assert [ds.draw(i) for i in range(len(ds))] != first
    ds.set_epoch(2, 0)
    assert [ds.draw(i) for i in range(len(ds))] == first
