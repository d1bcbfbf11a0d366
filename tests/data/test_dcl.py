"""DCL's conditional pools and condition selection (partialseg.data.dcl): annotated-but-absent cases,
class names, image similarity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from partialseg.data.dcl import ConditionalDataset, SupportBank, annotated_classes, image_distances, present_classes
from partialseg.transforms import PartialLabelToVector

M = 4  # background, LV, MYO, RV
NAMES = ["background", "LV", "MYO", "RV"]
S = 8


def _case(i, gt, annotated):
    """Case ``i``: image value ``i`` (so a condition's source is readable), label the <0,p,1> map."""
    return {"image": torch.full((1, S, S), float(i)), "label": torch.as_tensor(PartialLabelToVector(M)(gt[None], annotated))}


def _gt(with_rv=True):
    gt = np.zeros((S, S), dtype=np.int64)
    gt[2:5, 2:5] = 1
    gt[1, 1:6] = 2
    if with_rv:
        gt[5:7, 1:4] = 3
    return gt


# an apical stack: cases 1 and 4 annotate RV but hold none ("no RV in this slice"); 0 and 3 hold it
ANNOTATED = [[3], [3], [1], [3], [3], [2], [0], [1, 2]]
HAS_RV = [True, False, True, True, False, True, True, True]
CASES = [_case(i, _gt(rv), a) for i, (rv, a) in enumerate(zip(HAS_RV, ANNOTATED))]


def test_no_conditional_image_without_its_class():
    ds = ConditionalDataset(CASES, M, annotated=ANNOTATED, seed=0)  # pools="present", the default
    assert ds.pools[3] == [0, 3]  # the RV pool holds only the cases with an RV
    assert ds.present[1] == [] and ds.present[0] == [3] and ds.present[7] == [1, 2]
    drawn = set()
    for epoch in range(5):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            for j, c in enumerate(item["cond_index"].tolist()):
                drawn.add((j, c))
                assert item["cond_label"][j].max() == 1, (epoch, i, j, c)  # the class is in its conditional label
                assert item["cond_image"][j, 0, 0] == c
    assert {(3, 0), (3, 3)} <= drawn
    # the paper's pools take every annotating case: an RV condition from case 1 or 4 is all zero
    paper = ConditionalDataset(CASES, M, annotated=ANNOTATED, seed=0, pools="annotated")
    assert paper.pools[3] == [0, 1, 3, 4] and paper.present is None
    empty = [(e, i) for e in range(5) for i in range(len(paper)) if (paper.set_epoch(e) or True) and paper[i]["cond_label"][3].max() == 0]
    assert empty, "pools='annotated' never drew an annotated-but-absent case: the test above could not fail"


def test_support_bank_holds_no_empty_entry():
    bank = SupportBank.from_dataset(CASES, M, annotated=ANNOTATED, per_class=0, seed=0)
    assert sorted(bank.pools[3]) == [i for i, c in enumerate(bank.classes.tolist()) if c == 3]
    rv_sources = sorted(int(img[0, 0, 0]) for img, c in zip(bank.images, bank.classes.tolist()) if c == 3)
    assert rv_sources == [0, 3]
    assert all(float(lab.max()) == 1.0 for lab in bank.labels)
    paper = SupportBank.from_dataset(CASES, M, annotated=ANNOTATED, per_class=0, seed=0, pools="annotated")
    assert sorted(int(img[0, 0, 0]) for img, c in zip(paper.images, paper.classes.tolist()) if c == 3) == [0, 1, 3, 4]
    assert min(float(lab.max()) for lab in paper.labels) == 0.0


def test_a_class_held_by_no_case():
    annotated = [[3], [3], [1], [2], [0]]
    cases = [_case(i, _gt(False), a) for i, a in enumerate(annotated)]
    with pytest.raises(ValueError, match=r"^class 3: held in no case.*annotated, but absent.*--missing any"):
        ConditionalDataset(cases, M, annotated=annotated)
    names = ["background", "LV", "MYO", "RV"]
    with pytest.raises(ValueError, match=r"^RV \(3\): held in no case"):  # errors name classes by name
        ConditionalDataset(cases, M, annotated=annotated, class_names=names)
    with pytest.raises(ValueError, match=r"^background \(0\): annotated in no case"):
        ConditionalDataset(cases[:4], M, annotated=annotated[:4], pools="annotated")
    with pytest.raises(ValueError, match="support bank entry"):
        SupportBank.from_dataset(cases, M, annotated=annotated)
    ds = ConditionalDataset(cases, M, annotated=annotated, missing="any")
    assert ds.missing_classes == [3] and ds.pools[3] == list(range(5))
    ConditionalDataset(cases, M, annotated=annotated, pools="annotated")  # the paper's pools accept it


def test_class_names():
    names = [["RV"], ["RV"], ["LV"], ["RV"], ["RV"], ["MYO"], ["background"], ["LV", "MYO"]]
    by_name = ConditionalDataset(CASES, M, annotated=names, class_names=NAMES, seed=2)
    by_index = ConditionalDataset(CASES, M, annotated=ANNOTATED, seed=2)
    assert by_name.annotated == by_index.annotated and by_name.pools == by_index.pools
    assert [by_name.draw(i) for i in range(len(by_name))] == [by_index.draw(i) for i in range(len(by_index))]
    a = SupportBank.from_dataset(CASES, M, annotated=names, class_names=NAMES, seed=1)
    b = SupportBank.from_dataset(CASES, M, annotated=ANNOTATED, seed=1)
    assert torch.equal(a.classes, b.classes) and torch.equal(a.images, b.images)
    assert SupportBank(torch.rand(2, 1, 4, 4), torch.ones(2, 4, 4), ["background", "LV"], 2, class_names=["background", "LV"]).classes.tolist() == [0, 1]
    assert annotated_classes("RV", M, NAMES) == [3] and annotated_classes("all", M) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="class_names"):
        ConditionalDataset(CASES, M, annotated=names)
    with pytest.raises(ValueError, match="not one of the class names"):
        annotated_classes(["Aorta"], M, NAMES)
    with pytest.raises(ValueError, match="3 names for 4 classes"):
        annotated_classes(["LV"], M, NAMES[:3])


def test_present_classes_reads_ones_only():
    label = torch.full((3, 2, 2), 0.5)  # unknown everywhere: nothing present
    assert present_classes(label, [0, 1, 2]) == []
    label[1, 0, 0] = 1.0
    assert present_classes(label, [0, 1, 2]) == [1]


def test_image_distances_by_hand():
    x = torch.zeros(4, 1, 4, 4)
    x[0, 0, :2] = 1.0  # top half
    x[1] = 3.0 * x[0] + 7.0  # same pattern, other gain and offset
    x[2] = 1.0 - x[0]  # the inverse: correlation -1
    x[3, 0, :, :2] = 1.0  # left half: correlation 0 with the top half
    d = image_distances(x[:1], x)
    torch.testing.assert_close(d, torch.tensor([[0.0, 0.0, 4.0, 2.0]]), atol=1e-5, rtol=0)
    assert image_distances(x, x).shape == (4, 4)
    big = torch.nn.functional.interpolate(x, size=(32, 32), mode="nearest")  # pooled to 16 x 16 first
    torch.testing.assert_close(image_distances(big[:1], big), d, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected"):
        image_distances(x[:, :, 0], x)


def _shifted_cases():
    """Bright squares at 6 positions along the diagonal, each annotating the square's class 1 (+ background cases)."""
    cases, annotated = [], []
    for i in range(6):
        gt = np.zeros((16, 16), dtype=np.int64)
        gt[2 * i : 2 * i + 6, 2 * i : 2 * i + 6] = 1  # overlaps 16 px with the next square, 4 with the one after
        case = _case(i, gt, [1])
        case["image"] = torch.as_tensor(gt[None], dtype=torch.float32) + 0.01 * i
        cases.append(case)
        annotated.append([1])
    gt = np.zeros((16, 16), dtype=np.int64)
    gt[:4, :4] = 1
    cases.append({"image": torch.as_tensor(gt[None], dtype=torch.float32), "label": torch.as_tensor(PartialLabelToVector(2)(gt[None], [0]))})
    annotated.append([0])
    for c in cases[:6]:
        c["label"] = c["label"][[0, 1]]  # m = 2: background, square
    return cases, annotated


def test_similar_selection_draws_neighbours():
    cases, annotated = _shifted_cases()
    ds = ConditionalDataset(cases, 2, annotated=annotated, seed=0, select="similar", neighbours=2)
    assert ds.distances.shape == (7, 7)
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(6):
            c = ds.draw(i)[1]
            assert abs(c - i) == 1 or (i in (0, 5) and abs(c - i) == 2), (epoch, i, c)  # the two nearest squares
    random = ConditionalDataset(cases, 2, annotated=annotated, seed=0)
    far = {abs(random.draw(i)[1] - i) for e in range(6) for i in range(6) if (random.set_epoch(e) or True)}
    assert max(far) > 2  # uniform draws reach far squares: the check above can fail


def test_bad_arguments():
    with pytest.raises(ValueError, match="pools"):
        ConditionalDataset(CASES, M, annotated=ANNOTATED, pools="labelled")
    with pytest.raises(ValueError, match="select"):
        ConditionalDataset(CASES, M, annotated=ANNOTATED, select="nearest")
    with pytest.raises(ValueError, match="neighbours"):
        ConditionalDataset(CASES, M, annotated=ANNOTATED, neighbours=0)
    with pytest.raises(ValueError, match="pools"):
        SupportBank.from_dataset(CASES, M, annotated=ANNOTATED, pools="all")
    with pytest.raises(ValueError, match="per_class"):
        SupportBank.from_dataset(CASES, M, annotated=ANNOTATED, per_class=-1)
    with pytest.raises(ValueError, match="case 1: 'label' must be the <0,p,1> map"):
        ConditionalDataset([CASES[0], {"image": CASES[1]["image"], "label": torch.zeros(1, S, S)}], M, annotated=[[3], [3]])


def test_reference_is_read_instead_of_the_augmented_dataset():
    cases, annotated = _shifted_cases()
    flipped = [dict(c, image=c["image"].flip(-1)) if i % 2 else c for i, c in enumerate(cases)]  # a random flip of some cases
    ds = ConditionalDataset(flipped, 2, annotated=annotated, select="similar", neighbours=2, reference=cases)
    torch.testing.assert_close(ds.distances, ConditionalDataset(cases, 2, annotated=annotated, select="similar", neighbours=2).distances)
    assert not torch.allclose(ds.distances, ConditionalDataset(flipped, 2, annotated=annotated, select="similar").distances)
    assert torch.equal(ds[0]["image"], flipped[0]["image"])  # items still come from the dataset
    with pytest.raises(ValueError, match="same 7 cases"):
        ConditionalDataset(cases, 2, annotated=annotated, reference=cases[:3])
