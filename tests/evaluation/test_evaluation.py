"""Tests of partialseg.evaluation on hand-made masks; expected values are computed by hand.

MONAI's surface: the edge of a mask is the set of its voxels that a binary erosion (cross-shaped
structuring element) removes, so a one-voxel-thick object is all edge and a filled 4 x 4 square's
edge is its 12-pixel ring. HD95 is, for each direction (prediction edge -> nearest reference edge
and back), the 95th percentile (linear interpolation) of the edge distances, then the larger of
the two; ASSD is the mean of the distances of both directions pooled together.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings

import nibabel as nib
import numpy as np
import pytest

from partialseg import evaluation
from partialseg.evaluation import report
from partialseg.evaluation import evaluate_case, evaluate_folder, find_prediction, image_diagonal, summarize

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no NaN arithmetic


def _mask(shape, *points):
    a = np.zeros(shape, dtype=np.int64)
    for p in points:
        a[p] = 1
    return a


def _row(rows, name):
    (row,) = [r for r in rows if r["class"] == name]
    return row


# --------------------------------------------------------------------------------------------
# evaluate_case
# --------------------------------------------------------------------------------------------

# (spacing, pred voxel, ref voxel, expected distance): a single voxel is all edge, so both
# directed distance sets hold one value, the voxels' distance; HD95 = ASSD = that distance.
SINGLE_VOXEL_CASES = [
    (None, (2, 1), (2, 4), 3.0),          # 3 pixels along axis 1
    ((2.0, 1.0), (2, 1), (2, 4), 3.0),    # along axis 1, spacing 1 there
    ((2.0, 1.0), (0, 1), (3, 1), 6.0),    # 3 pixels along axis 0, spacing 2: 6 mm
    ((2.0, 1.0), (0, 0), (3, 4), math.sqrt(6.0**2 + 4.0**2)),  # (3*2, 4*1) mm
]


@pytest.mark.parametrize("spacing,p,r,expected", SINGLE_VOXEL_CASES)
def test_single_voxel_distance(spacing, p, r, expected):
    rows = evaluate_case(_mask((5, 6), p), _mask((5, 6), r), ["background", "dot"], spacing=spacing)
    assert len(rows) == 1
    row = rows[0]
    assert row["class"] == "dot" and row["class_index"] == 1 and row["status"] == "ok"
    assert row["dice"] == 0.0  # no overlap
    assert row["hd95"] == pytest.approx(expected, abs=1e-5)
    assert row["assd"] == pytest.approx(expected, abs=1e-5)
    assert row["pred_voxels"] == 1 and row["ref_voxels"] == 1


def test_shifted_squares():
    # reference: rows 2-5, cols 2-5 (16 px); prediction: rows 2-5, cols 3-6 (16 px).
    # overlap rows 2-5 x cols 3-5 = 12 px -> Dice = 2 * 12 / (16 + 16) = 0.75.
    # Edges are the 12-pixel rings. Prediction ring -> reference ring: column 6 (4 px) is 1 away,
    # the interior pixels of column 3 (rows 3, 4) are 1 away ((3,2) / (4,2)), the other 6 lie on
    # the reference ring (0). Same the other way by symmetry. So each direction holds six 0s and
    # six 1s: the 95th percentile is 1 -> HD95 = 1; ASSD = (6 + 6) / 24 = 0.5.
    ref = np.zeros((8, 9), dtype=np.int64)
    ref[2:6, 2:6] = 1
    pred = np.zeros((8, 9), dtype=np.int64)
    pred[2:6, 3:7] = 1
    (row,) = evaluate_case(pred, ref, 2)
    assert row["class"] == "1"
    assert row["dice"] == pytest.approx(0.75)
    assert row["hd95"] == pytest.approx(1.0)
    assert row["assd"] == pytest.approx(0.5)
    assert (row["pred_voxels"], row["ref_voxels"]) == (16, 16)
    # with spacing (1, 3) (axis 1 is 3 mm): column 6's four pixels are now 3 mm away, but the
    # pixels (3, 3), (4, 3) stay 1 mm away (from (2, 3) / (5, 3), one row off along axis 0).
    # Each direction: six 0s, two 1s, four 3s -> ASSD = 2 * 14 / 24 = 7 / 6; the 95th
    # percentile (position 0.95 * 11 = 10.45 among the sorted values) is 3 -> HD95 = 3.
    (row,) = evaluate_case(pred, ref, 2, spacing=(1.0, 3.0))
    assert row["dice"] == pytest.approx(0.75)
    assert row["hd95"] == pytest.approx(3.0)
    assert row["assd"] == pytest.approx(7 / 6)


def test_hd95_ignores_one_outlier():
    # reference: a one-pixel-thick line, row 0, cols 0-19 (20 px, all edge).
    # prediction: the same line plus one stray pixel at (10, 0), 10 px below the line's start.
    # pred -> ref: twenty 0s and one 10; sorted, the 95th percentile sits at position
    # 0.95 * 20 = 19, still a 0. ref -> pred: twenty 0s. So HD95 = 0 (the maximum would be 10),
    # ASSD = 10 / (21 + 20) = 10 / 41, Dice = 2 * 20 / (21 + 20) = 40 / 41.
    ref = np.zeros((12, 20), dtype=np.int64)
    ref[0, :] = 1
    pred = ref.copy()
    pred[10, 0] = 1
    (row,) = evaluate_case(pred, ref, ["bg", "line"])
    assert row["dice"] == pytest.approx(40 / 41)
    assert row["hd95"] == pytest.approx(0.0, abs=1e-6)
    assert row["assd"] == pytest.approx(10 / 41)


def test_3d_cubes_anisotropic():
    # 2x2x2 cubes (all voxels are edge), the prediction 2 voxels further along axis 2 with
    # spacing (1, 1, 3). Each voxel's nearest voxel of the other cube is on the same (x, y):
    # z = 1 -> 2 is 1 voxel = 3 mm (4 voxels), z = 0 -> 2 is 2 voxels = 6 mm (4 voxels); the same
    # backwards. Directed sets [3, 3, 3, 3, 6, 6, 6, 6]: 95th percentile at position 6.65, between
    # two 6s -> HD95 = 6. ASSD = (8 * 3 + 8 * 6) / 16 = 4.5. No overlap: Dice = 0.
    ref = np.zeros((4, 4, 6), dtype=np.int64)
    ref[1:3, 1:3, 0:2] = 1
    pred = np.zeros((4, 4, 6), dtype=np.int64)
    pred[1:3, 1:3, 2:4] = 1
    (row,) = evaluate_case(pred, ref, ["background", "cube"], spacing=(1.0, 1.0, 3.0))
    assert row["status"] == "ok"
    assert row["dice"] == 0.0
    assert row["hd95"] == pytest.approx(6.0)
    assert row["assd"] == pytest.approx(4.5)
    # half overlap: z 1-2 vs z 0-1 -> |A n B| = 4, Dice = 8 / 16 = 0.5
    pred = np.zeros((4, 4, 6), dtype=np.int64)
    pred[1:3, 1:3, 1:3] = 1
    (row,) = evaluate_case(pred, ref, ["background", "cube"], spacing=(1.0, 1.0, 3.0))
    assert row["dice"] == pytest.approx(0.5)
    # pred z=1 voxels lie on the ref (0), z=2 voxels are 1 voxel = 3 mm away; same backwards:
    # ASSD = (8 * 0 + 8 * 3) / 16 = 1.5; directed sets [0,0,0,0,3,3,3,3] -> HD95 = 3.
    assert row["assd"] == pytest.approx(1.5)
    assert row["hd95"] == pytest.approx(3.0)


def test_cubes_offset_by_one_voxel_mm_and_voxels():
    # 3 x 3 x 3 cubes, the prediction one voxel further along axis 2, spacing (1, 1, 3).
    # Overlap 2 layers = 18 voxels: Dice = 2 * 18 / 54 = 2/3, Jaccard = 18 / 36 = 1/2.
    # Edges: all voxels but the centre (26 each). Prediction edges -> reference edges: its z = 2
    # layer (9 voxels) is 1 voxel = 3 mm from the reference's z = 3 face; (3, 3, 4), the
    # reference's centre (not an edge), is 1 voxel = 1 mm from (2, 3, 4) along axis 0; the other
    # 16 lie on reference edges (0). The reverse direction is the mirror image (same values).
    #   mm:     sixteen 0s, one 1, nine 3s -> ASSD = 2 * 28 / 52 = 28/26; HD95 (position
    #           0.95 * 25 = 23.75 among the sorted values) = 3
    #   voxels: sixteen 0s, ten 1s -> ASD (one direction) = 10/26; 95HD = 1
    ref = np.zeros((7, 7, 8), dtype=np.int64)
    ref[2:5, 2:5, 3:6] = 1
    pred = np.zeros_like(ref)
    pred[2:5, 2:5, 2:5] = 1
    (row,) = evaluate_case(pred, ref, ["background", "cube"], spacing=(1.0, 1.0, 3.0))
    assert row["status"] == "ok" and row["overlap_voxels"] == 18
    assert row["dice"] == pytest.approx(2 / 3) and row["jaccard"] == pytest.approx(0.5)
    assert row["assd"] == pytest.approx(28 / 26) and row["hd95"] == pytest.approx(3.0)
    assert row["asd_vox"] == pytest.approx(10 / 26) and row["hd95_vox"] == pytest.approx(1.0)
    # isotropic 1 mm: the mm figures equal the voxel ones (ASSD is symmetric, ASD one-way, and
    # here both directions agree)
    (iso,) = evaluate_case(pred, ref, ["background", "cube"])
    assert iso["assd"] == pytest.approx(10 / 26) and iso["hd95"] == iso["hd95_vox"] == pytest.approx(1.0)


def test_asd_is_one_directional_from_the_prediction():
    # reference: 5 x 5 square (rows / cols 1-5, edge = its 16-pixel ring); prediction: the
    # 3 x 3 square inside it (rows / cols 2-4, edge = 8-pixel ring, the centre is not edge).
    # Prediction ring -> reference ring: every pixel 1 away -> ASD (prediction -> reference) = 1.
    # Reference ring -> prediction ring: 4 corners sqrt(2), 12 others 1 -> (12 + 4 sqrt 2) / 16.
    # ASSD pools both: (8 + 12 + 4 sqrt 2) / 24. HD95: max(1, sqrt 2) (reverse: 95th percentile
    # at position 14.25 of 16 sorted values, both sqrt 2). Dice 2 * 9 / 34, Jaccard 9 / 25.
    ref = np.zeros((7, 7), dtype=np.int64)
    ref[1:6, 1:6] = 1
    pred = np.zeros_like(ref)
    pred[2:5, 2:5] = 1
    (row,) = evaluate_case(pred, ref, ["background", "square"])
    assert row["asd_vox"] == pytest.approx(1.0)
    assert row["assd"] == pytest.approx((20 + 4 * math.sqrt(2)) / 24)
    assert row["hd95"] == row["hd95_vox"] == pytest.approx(math.sqrt(2))
    assert row["dice"] == pytest.approx(18 / 34) and row["jaccard"] == pytest.approx(9 / 25)
    # swapping prediction and reference gives the other direction: the metric is not symmetric
    (swapped,) = evaluate_case(ref, pred, ["background", "square"])
    assert swapped["asd_vox"] == pytest.approx((12 + 4 * math.sqrt(2)) / 16)
    assert swapped["assd"] == pytest.approx(row["assd"]) and swapped["dice"] == pytest.approx(row["dice"])


def test_voxel_metrics_ignore_spacing_and_jaccard_matches_dice():
    # the squares of test_shifted_squares, spacing (1, 3): mm distances change, voxel ones do not
    ref = np.zeros((8, 9), dtype=np.int64)
    ref[2:6, 2:6] = 1
    pred = np.zeros((8, 9), dtype=np.int64)
    pred[2:6, 3:7] = 1
    (unit,) = evaluate_case(pred, ref, 2)
    (aniso,) = evaluate_case(pred, ref, 2, spacing=(1.0, 3.0))
    assert (unit["hd95_vox"], unit["asd_vox"]) == (aniso["hd95_vox"], aniso["asd_vox"]) == (1.0, 0.5)
    assert aniso["hd95"] == pytest.approx(3.0)
    # Jaccard = |P n R| / |P u R| = 12 / 20 = Dice / (2 - Dice)
    assert aniso["jaccard"] == pytest.approx(0.6) == aniso["dice"] / (2 - aniso["dice"])


@pytest.mark.parametrize("shape,spacing", [((12, 14), (0.7, 1.3)), ((9, 10, 7), (1.0, 1.0, 2.5)), ((9, 10, 7), None)])
def test_distances_equal_monai_metrics(shape, spacing):
    # evaluate_case computes MONAI's edge distances once per grid and reduces them itself: the
    # values must be those of MONAI's compute_hausdorff_distance / compute_average_surface_distance
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(len(shape))
    ref = (rng.random(shape) < 0.3).astype(np.int64) + (rng.random(shape) < 0.2)
    pred = (rng.random(shape) < 0.3).astype(np.int64) + (rng.random(shape) < 0.2)
    rows = evaluate_case(pred, ref, 3, spacing=spacing)
    p1h = torch.from_numpy(np.stack([pred == i for i in (1, 2)])[None]).float()
    r1h = torch.from_numpy(np.stack([ref == i for i in (1, 2)])[None]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI 1.6 calls its own deprecated get_mask_edges argument
        expected = {
            "hd95": compute_hausdorff_distance(p1h, r1h, include_background=True, percentile=95, spacing=spacing)[0],
            "assd": compute_average_surface_distance(p1h, r1h, include_background=True, symmetric=True,
                                                     spacing=spacing)[0],
            "hd95_vox": compute_hausdorff_distance(p1h, r1h, include_background=True, percentile=95)[0],
            "asd_vox": compute_average_surface_distance(p1h, r1h, include_background=True, symmetric=False)[0],
        }
    for j, row in enumerate(rows):
        assert row["status"] == "ok"
        for key, values in expected.items():
            assert row[key] == pytest.approx(float(values[j]), rel=1e-6), (key, j)


# grid 5 x 9, spacing (2, 0.5): diagonal = sqrt((4 * 2)^2 + (8 * 0.5)^2) = sqrt(80)
DIAG = math.sqrt(80.0)
EMPTY_CASES = [
    # (pred has class, ref has class, dice, hd95, assd, status)
    (False, False, 1.0, 0.0, 0.0, "both_empty"),
    (False, True, 0.0, DIAG, DIAG, "pred_empty"),
    (True, False, 0.0, DIAG, DIAG, "ref_empty"),
]


@pytest.mark.parametrize("in_pred,in_ref,dice,hd95,assd,status", EMPTY_CASES)
def test_empty_conventions(in_pred, in_ref, dice, hd95, assd, status):
    pred = _mask((5, 9), (1, 1)) if in_pred else np.zeros((5, 9), dtype=np.int64)
    ref = _mask((5, 9), (3, 7)) if in_ref else np.zeros((5, 9), dtype=np.int64)
    (row,) = evaluate_case(pred, ref, ["background", "x"], spacing=(2.0, 0.5))
    assert row["status"] == status
    assert row["dice"] == dice
    assert row["hd95"] == pytest.approx(hd95)
    assert row["assd"] == pytest.approx(assd)
    assert row["jaccard"] == dice  # 1 when both are empty, else 0
    assert all(math.isfinite(row[m]) for m in evaluation.METRICS)
    # the voxel distances take the diagonal in voxels: sqrt(4^2 + 8^2) on the 5 x 9 grid, which
    # equals the mm one at (2, 0.5); at (2, 1) mm it is sqrt(8^2 + 8^2), the voxel one unchanged
    (row,) = evaluate_case(pred, ref, ["background", "x"], spacing=(2.0, 1.0))
    vox = 0.0 if status == "both_empty" else math.sqrt(80.0)
    assert row["hd95_vox"] == pytest.approx(vox) and row["asd_vox"] == pytest.approx(vox)
    assert row["hd95"] == pytest.approx(0.0 if status == "both_empty" else math.sqrt(128.0))


def test_image_diagonal():
    assert image_diagonal((4, 5)) == 5.0  # (3, 4) -> 5
    assert image_diagonal((5, 9), (2.0, 0.5)) == pytest.approx(DIAG)
    assert image_diagonal((2, 3, 4), (1.0, 1.0, 1.0)) == pytest.approx(math.sqrt(1 + 4 + 9))
    with pytest.raises(ValueError, match="one entry per axis"):
        image_diagonal((4, 5), (1.0,))


def test_multiclass_and_background():
    # class 1: identical single pixel; class 2: only in the reference; class 3: absent from both
    ref = np.zeros((4, 4), dtype=np.int64)
    ref[0, 0] = 1
    ref[3, 3] = 2
    pred = np.zeros((4, 4), dtype=np.int64)
    pred[0, 0] = 1
    names = ["background", "a", "b", "c"]
    rows = evaluate_case(pred, ref, names)
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert [r["status"] for r in rows] == ["ok", "pred_empty", "both_empty"]
    a, b, c = rows
    assert (a["dice"], a["hd95"], a["assd"]) == (1.0, 0.0, 0.0)
    assert (b["dice"], b["hd95"], b["assd"]) == (0.0, pytest.approx(3 * math.sqrt(2)), pytest.approx(3 * math.sqrt(2)))
    assert (c["dice"], c["hd95"], c["assd"]) == (1.0, 0.0, 0.0)
    # background: pred has 15 px, ref 14 px, overlap 14 -> Dice = 28 / 29
    rows = evaluate_case(pred, ref, names, include_background=True)
    assert rows[0]["class"] == "background" and rows[0]["dice"] == pytest.approx(28 / 29)
    # a subset of classes, the float label maps MONAI's LoadImage returns, and a torch tensor
    import torch

    rows = evaluate_case(torch.from_numpy(pred.astype(np.float32)), ref.astype(np.float32), names, class_indices=[2])
    assert [r["class"] for r in rows] == ["b"]


BAD_INPUTS = [
    (np.zeros((3, 3)), np.zeros((3, 4)), {}, "case 'c7'.*differs"),
    (np.zeros((3, 3)), np.full((3, 3), 5), {}, "case 'c7'.*reference holds the value 5"),
    (np.full((3, 3), 0.5), np.zeros((3, 3)), {}, "case 'c7'.*non-integer"),
    (np.zeros((3, 3)), np.zeros((3, 3)), {"spacing": (1.0, 1.0, 1.0)}, "case 'c7'.*spacing"),
    (np.zeros(3), np.zeros(3), {}, "case 'c7'.*2D or 3D"),
    (np.zeros((3, 3)), np.zeros((3, 3)), {"class_indices": [4]}, "case 'c7'.*class_indices"),
]


@pytest.mark.parametrize("pred,ref,kwargs,match", BAD_INPUTS)
def test_bad_inputs(pred, ref, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_case(pred, ref, 3, case="c7", **kwargs)


def test_summarize():
    rows = [
        {"class": "a", "dice": 1.0, "hd95": 0.0, "assd": 0.0, "status": "ok"},
        {"class": "a", "dice": 0.0, "hd95": 4.0, "assd": 2.0, "status": "pred_empty"},
        {"class": "a", "dice": 0.5, "hd95": 1.0, "assd": 1.0, "status": "ok"},
        {"class": "b", "dice": 1.0, "hd95": 0.0, "assd": 0.0, "status": "both_empty"},
    ]
    s = summarize(rows, ["a", "b", "c"])
    a = s["per_class"]["a"]
    assert a["n"] == 3 and a["status"] == {"ok": 2, "both_empty": 0, "pred_empty": 1, "ref_empty": 0}
    assert a["dice"]["mean"] == pytest.approx(0.5)
    assert a["dice"]["std"] == pytest.approx(math.sqrt((0.25 + 0.25 + 0) / 3))  # population std
    assert a["hd95"]["median"] == 1.0
    assert s["per_class"]["c"] == {"n": 0, "status": {"ok": 0, "both_empty": 0, "pred_empty": 0, "ref_empty": 0}}
    # overall: mean over classes with rows (a: 0.5, b: 1.0)
    assert s["overall"]["dice"] == pytest.approx(0.75)
    assert s["overall"]["hd95"] == pytest.approx((5 / 3 + 0) / 2)


def _slice_row(subject, pred_n, ref_n, overlap, dice):
    status = "both_empty" if pred_n == ref_n == 0 else "pred_empty" if pred_n == 0 else "ok"
    return {"class": "a", "dice": dice, "status": status, "subject": subject,
            "pred_voxels": pred_n, "ref_voxels": ref_n, "overlap_voxels": overlap}


def test_aggregates_can_rank_runs_opposite():
    # issue 14: on 2D slices the per slice mean and the pooled Dice can rank two runs opposite.
    # Run A misses a 1-pixel structure (Dice 0), gets a 100-pixel one right (1), and an empty
    # slice scores 1: per slice mean 2/3; pooled 2 * 100 / (100 + 101) = 200/201.
    # Run B finds the pixel (1), half of the big one (2 * 50 / 150 = 2/3), the empty slice (1):
    # per slice mean 8/9; pooled 2 * 51 / (51 + 101) = 102/152.
    run_a = [_slice_row("s1", 0, 1, 0, 0.0), _slice_row("s1", 100, 100, 100, 1.0), _slice_row("s1", 0, 0, 0, 1.0)]
    run_b = [_slice_row("s1", 1, 1, 1, 1.0), _slice_row("s1", 50, 100, 50, 2 / 3), _slice_row("s1", 0, 0, 0, 1.0)]
    a, b = summarize(run_a, ["a"]), summarize(run_b, ["a"])
    assert a["per_class"]["a"]["dice"]["mean"] == pytest.approx(2 / 3)
    assert b["per_class"]["a"]["dice"]["mean"] == pytest.approx(8 / 9)
    assert a["pooled"]["per_class"]["a"]["dice"] == pytest.approx(200 / 201)
    assert b["pooled"]["per_class"]["a"]["dice"] == pytest.approx(102 / 152)
    assert a["pooled"]["per_class"]["a"]["jaccard"] == pytest.approx(100 / 101)
    # one subject: its pooled slices are the subject's (3D) Dice
    assert a["per_subject"]["per_class"]["a"]["n"] == 1
    assert a["per_subject"]["per_class"]["a"]["dice"]["mean"] == pytest.approx(200 / 201)
    assert a["pooled"]["overall"]["dice"] == pytest.approx(200 / 201)


def test_per_subject_groups_slices_and_falls_back_to_the_case():
    rows = [
        {**_slice_row("s1", 2, 2, 1, 0.5), "case": "s1_z0"},  # s1: (1 + 2) shared of (2 + 2) + (2 + 2)
        {**_slice_row("s1", 2, 2, 2, 1.0), "case": "s1_z1"},
        {**_slice_row(None, 4, 4, 0, 0.0), "case": "vol3"},  # no subject: its own subject, Dice 0
        {**_slice_row(None, 0, 0, 0, 1.0), "case": "vol4", "class": "b"},  # b: both empty -> 1
    ]
    for r in rows:
        if r["subject"] is None:
            del r["subject"]
    s = summarize(rows, ["a", "b", "c"])
    a = s["per_subject"]["per_class"]["a"]
    assert a["n"] == 2 and a["dice"]["mean"] == pytest.approx((6 / 8 + 0.0) / 2)
    assert a["jaccard"]["median"] == pytest.approx((3 / 5 + 0.0) / 2)
    assert s["per_subject"]["per_class"]["b"]["dice"]["mean"] == 1.0
    assert s["per_subject"]["per_class"]["c"] == {"n": 0}
    assert s["pooled"]["per_class"]["c"] == {"n": 0, "pred_voxels": 0, "ref_voxels": 0, "overlap_voxels": 0}
    # pooled a: 8 + 8 voxels, 3 shared -> 6 / 16; overall over classes with rows (a, b)
    assert s["pooled"]["per_class"]["a"]["dice"] == pytest.approx(6 / 16)
    assert s["pooled"]["overall"]["dice"] == pytest.approx((6 / 16 + 1.0) / 2)
    # rows without voxel counts (an older CSV): no pooled or per subject aggregate
    assert "pooled" not in summarize([{"class": "a", "dice": 1.0, "status": "ok"}], ["a"])


# --------------------------------------------------------------------------------------------
# prediction files and folders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["case_001.nii.gz", "case_001.nii", "case_001_seg.nii.gz", "case_001/case_001_seg.nii.gz", "case_001/case_001_trans.nii.gz"],
)
def test_find_prediction_names(tmp_path, name):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
    (tmp_path / "case_0011.nii.gz").write_bytes(b"")  # a neighbour that must not match
    assert find_prediction(tmp_path, "/data/imagesTs/case_001.nii.gz") == tmp_path / name
    assert find_prediction(tmp_path, "/data/imagesTs/case_002.nii.gz") is None


def test_find_prediction_ambiguous(tmp_path):
    (tmp_path / "case_001.nii.gz").write_bytes(b"")
    (tmp_path / "case_001_seg.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="case 'case_001'.*several prediction files"):
        find_prediction(tmp_path, "imagesTs/case_001.nii.gz", "case_001")


SPACING = (2.0, 1.0, 1.0)
SHAPE = (6, 6, 4)


def _save(path, arr, spacing=SPACING, origin=(0.0, 0.0, 0.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), affine), str(path))


def _make_dataset(root, labels_key="classes"):
    """Two labelled test cases (classes a, b) and one bare-string test image without a label."""
    ds = root / "ds"
    ref1 = np.zeros(SHAPE, dtype=np.uint8)
    ref1[1, 1, 1] = 1
    ref1[4, 4, 2] = 2
    ref2 = np.zeros(SHAPE, dtype=np.uint8)
    ref2[1, 1, 1] = 1
    for name, ref in (("case_001", ref1), ("case_002", ref2), ("case_003", ref2)):
        _save(ds / "imagesTs" / f"{name}.nii.gz", np.zeros(SHAPE))
        _save(ds / "labelsTs" / f"{name}.nii.gz", ref)
    desc = {
        "name": "tiny",
        "training": [],
        "test": [
            {"image": "imagesTs/case_001.nii.gz", "label": "labelsTs/case_001.nii.gz", "annotated": "all"},
            {"image": "imagesTs/case_002.nii.gz", "label": "labelsTs/case_002.nii.gz"},
            "imagesTs/case_003.nii.gz",
        ],
    }
    if labels_key == "classes":
        desc["classes"] = ["background", "a", "b"]
    else:
        desc["labels"] = {"0": "background", "1": "a", "2": "b"}
    (ds / "dataset.json").write_text(json.dumps(desc))
    return ds, ref1, ref2


def _cli(argv):
    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    return evaluation.run(parser.parse_args(argv))


def test_cli_end_to_end(tmp_path, capsys):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = tmp_path / "preds"
    _save(preds / "case_001.nii.gz", ref1)  # named like the image: perfect
    pred2 = np.zeros(SHAPE, dtype=np.uint8)
    pred2[2, 1, 1] = 1  # one voxel along axis 0 (2 mm) from the reference voxel; b absent in both
    _save(preds / "case_002" / "case_002_seg.nii.gz", pred2)  # MONAI SaveImage's naming

    assert _cli(["--pred", str(preds), "--dataset", str(ds), "--no-progress"]) == 0
    out = preds / "evaluation"
    assert {p.name for p in out.iterdir()} == {"metrics.csv", "summary.json", "boxplot.png"}
    assert (out / "boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import csv

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    got = {(r["case"], r["class"]): r for r in rows}
    assert sorted(got) == [("case_001", "a"), ("case_001", "b"), ("case_002", "a"), ("case_002", "b")]
    assert float(got["case_001", "a"]["dice"]) == 1.0 and float(got["case_001", "a"]["hd95"]) == 0.0
    assert got["case_002", "a"]["status"] == "ok"
    assert float(got["case_002", "a"]["dice"]) == 0.0
    assert float(got["case_002", "a"]["hd95"]) == pytest.approx(2.0)  # 1 voxel x 2 mm along axis 0
    assert float(got["case_002", "a"]["assd"]) == pytest.approx(2.0)
    assert got["case_002", "b"]["status"] == "both_empty"

    s = json.loads((out / "summary.json").read_text())
    assert s["num_cases"] == 2 and s["cases"] == ["case_001", "case_002"]
    assert s["skipped_unlabelled"] == ["case_003"] and s["missing_predictions"] == []
    assert s["classes"] == ["a", "b"]
    # a: Dice (1, 0) -> mean 0.5, std 0.5, median 0.5; HD95 (0, 2) -> mean 1; b: Dice (1, 1)
    assert s["per_class"]["a"]["dice"] == {"mean": 0.5, "std": 0.5, "median": 0.5}
    assert s["per_class"]["a"]["hd95"]["mean"] == pytest.approx(1.0)
    assert s["per_class"]["b"]["dice"]["mean"] == 1.0
    assert s["overall"]["dice"] == pytest.approx(0.75)
    assert s["overall"]["hd95"] == pytest.approx(0.5)
    assert s["status_counts"] == {"ok": 3, "both_empty": 1, "pred_empty": 0, "ref_empty": 0}
    assert s["arguments"]["pred"] == str(preds) and s["arguments"]["split"] == "test"
    printed = capsys.readouterr().out
    assert "Dice" in printed and "HD95" in printed and "0.5000 ± 0.5000" in printed
    # no phase in the dataset: the summary keys and the table are those from before phases
    assert list(s) == NO_PHASE_SUMMARY_KEYS and "per_phase" not in s
    assert printed.startswith(NO_PHASE_TABLE + "\n")
    assert evaluation.format_table(s) == NO_PHASE_TABLE
    assert list(rows[0]) == CSV_COLUMNS and {r["phase"] for r in rows} == {""} == {r["subject"] for r in rows}
    # case_002's a: one voxel off along axis 0 (2 mm): 2 mm, but 1 voxel; no overlap: Jaccard 0
    assert float(got["case_002", "a"]["hd95_vox"]) == pytest.approx(1.0)
    assert float(got["case_002", "a"]["asd_vox"]) == pytest.approx(1.0)
    assert float(got["case_002", "a"]["jaccard"]) == 0.0 and got["case_002", "a"]["overlap_voxels"] == "0"
    assert s["units"]["hd95_vox"] == s["units"]["asd_vox"] == "voxel"
    # pooled a: (1 + 0 overlap) / (2 + 2) voxels -> Dice 2 * 1 / 4; no subject key: no per_subject
    assert s["pooled"]["per_class"]["a"] == {"n": 2, "pred_voxels": 2, "ref_voxels": 2, "overlap_voxels": 1,
                                             "dice": 0.5, "jaccard": 1 / 3}
    assert "per_subject" not in s


# the outputs of test_cli_end_to_end as they were before per phase reporting existed, plus the
# run record of the predictions and the pooled aggregate (added last, so that earlier keys keep
# their order)
NO_PHASE_SUMMARY_KEYS = [
    "per_class", "overall", "status_counts", "num_cases", "cases", "missing_predictions",
    "skipped_unlabelled", "classes", "units", "outputs", "arguments", "prediction_run", "pooled",
]
NO_PHASE_TABLE = (
    "class                   n             Dice          Jaccard       HD95 (mm)       ASSD (mm)    95HD (voxel)     ASD (voxel)\n"
    "---------------------------------------------------------------------------------------------------------------------------\n"
    "a                       2  0.5000 ± 0.5000  0.5000 ± 0.5000     1.00 ± 1.00     1.00 ± 1.00     0.50 ± 0.50     0.50 ± 0.50\n"
    "b                       2  1.0000 ± 0.0000  1.0000 ± 0.0000     0.00 ± 0.00     0.00 ± 0.00     0.00 ± 0.00     0.00 ± 0.00\n"
    "---------------------------------------------------------------------------------------------------------------------------\n"
    "mean over classes                   0.7500           0.7500            0.50            0.50            0.25            0.25\n"
    "\n"
    "Dice by aggregate       n   per case     pooled\n"
    "-----------------------------------------------\n"
    "a                       2     0.5000     0.5000\n"
    "b                       2     1.0000     1.0000\n"
    "mean over classes             0.7500     0.7500\n"
    "\n"
    "2 cases; empty: 1 both, 0 prediction only, 0 reference only; missing predictions: 0"
)
# the old columns first, in their old order (readers by position keep working), then phase, then
# the voxel metrics, the overlap count and the subject
CSV_COLUMNS = ["case", "class", "class_index", "dice", "hd95", "assd", "pred_voxels", "ref_voxels", "status", "phase",
               "jaccard", "hd95_vox", "asd_vox", "overlap_voxels", "subject"]


def _make_phase_dataset(root):
    """ACDC-like: subjects s1, s2, each an ED and an ES case with "phase" (classes LV, MYO).

    Every reference: LV = voxels (1, 1, 1) and (1, 2, 1), MYO = voxel (4, 4, 2). Predictions
    are perfect except s1_ED, whose LV is shifted by one voxel along axis 1 (1 mm): (1, 2, 1)
    and (1, 3, 1). Its LV: overlap 1 voxel -> Dice = 2 * 1 / (2 + 2) = 0.5; both 2-voxel lines
    are all edge, each direction's distances are [0, 1] -> HD95 = 0.95 (linear interpolation
    at position 0.95), ASSD = (0 + 1 + 1 + 0) / 4 = 0.5.
    """
    ds = root / "ds"
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[1, 1:3, 1] = 1
    ref[4, 4, 2] = 2
    half = ref.copy()
    half[1, 1:3, 1] = 0
    half[1, 2:4, 1] = 1
    entries = []
    for subject in ("s1", "s2"):
        for phase in ("ED", "ES"):
            name = f"{subject}_{phase}"
            _save(ds / "imagesTs" / f"{name}.nii.gz", np.zeros(SHAPE))
            _save(ds / "labelsTs" / f"{name}.nii.gz", ref)
            _save(root / "preds" / f"{name}.nii.gz", half if name == "s1_ED" else ref)
            entries.append({"image": f"imagesTs/{name}.nii.gz", "label": f"labelsTs/{name}.nii.gz",
                            "annotated": "all", "subject": subject, "phase": phase})
    desc = {"classes": ["background", "LV", "MYO"], "training": [], "test": entries}
    (ds / "dataset.json").write_text(json.dumps(desc))
    return ds, root / "preds"


def test_per_phase(tmp_path, capsys):
    ds, preds = _make_phase_dataset(tmp_path)
    assert _cli(["--pred", str(preds), "--dataset", str(ds), "--no-progress"]) == 0
    out = preds / "evaluation"
    s = json.loads((out / "summary.json").read_text())
    # the keys from before stay, in their place; per_phase follows the summarize() keys
    assert list(s) == NO_PHASE_SUMMARY_KEYS[:3] + ["per_phase"] + NO_PHASE_SUMMARY_KEYS[3:] + ["per_subject"]
    # overall LV Dice over (0.5, 1, 1, 1): mean 0.875, population std sqrt(0.1875 / 4)
    assert s["per_class"]["LV"]["n"] == 4 and s["per_class"]["LV"]["dice"]["mean"] == 0.875
    assert s["per_class"]["LV"]["dice"]["std"] == pytest.approx(math.sqrt(0.1875 / 4))
    assert list(s["per_phase"]) == ["ED", "ES"]
    ed, es = s["per_phase"]["ED"], s["per_phase"]["ES"]
    # summarize()'s structure
    assert set(ed) == set(es) == {"per_class", "overall", "status_counts", "pooled", "per_subject"}
    # ED LV: Dice (0.5, 1) -> 0.75 ± 0.25, median 0.75; HD95 (0.95, 0) -> mean 0.475; ASSD (0.5, 0)
    assert ed["per_class"]["LV"]["n"] == 2
    assert ed["per_class"]["LV"]["dice"] == {"mean": 0.75, "std": 0.25, "median": 0.75}
    assert ed["per_class"]["LV"]["hd95"]["mean"] == pytest.approx(0.475, abs=1e-6)
    assert ed["per_class"]["LV"]["assd"]["mean"] == pytest.approx(0.25, abs=1e-6)
    assert ed["per_class"]["MYO"]["dice"] == {"mean": 1.0, "std": 0.0, "median": 1.0}
    assert ed["overall"]["dice"] == 0.875  # (0.75 + 1) / 2
    assert ed["overall"]["hd95"] == pytest.approx(0.2375, abs=1e-6)
    assert ed["status_counts"] == {"ok": 4, "both_empty": 0, "pred_empty": 0, "ref_empty": 0}
    # ES: both predictions perfect
    for name in ("LV", "MYO"):
        assert es["per_class"][name]["n"] == 2
        assert es["per_class"][name]["dice"] == {"mean": 1.0, "std": 0.0, "median": 1.0}
        assert es["per_class"][name]["hd95"]["mean"] == 0.0
    assert es["overall"] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "assd": 0.0, "hd95_vox": 0.0, "asd_vox": 0.0}
    # subjects: within ED, s1's LV volume is s1_ED alone (Dice 0.5), s2's is perfect; over both
    # phases s1's LV pools s1_ED (2 + 2 voxels, 1 shared) and s1_ES (2 + 2, 2 shared): 2 * 3 / 8
    assert ed["per_subject"]["per_class"]["LV"]["dice"] == {"mean": 0.75, "std": 0.25, "median": 0.75}
    assert s["per_subject"]["per_class"]["LV"]["n"] == 2
    assert s["per_subject"]["per_class"]["LV"]["dice"]["mean"] == pytest.approx((0.75 + 1.0) / 2)
    # pooled over the 4 LV cases: 8 + 8 voxels, 7 shared -> Dice 14 / 16, Jaccard 7 / 9
    assert s["pooled"]["per_class"]["LV"]["dice"] == 0.875
    assert s["pooled"]["per_class"]["LV"]["jaccard"] == pytest.approx(7 / 9)

    import csv

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS
    assert {(r["case"], r["class"]): r["phase"] for r in rows} == {
        (f"{sub}_{ph}", c): ph for sub in ("s1", "s2") for ph in ("ED", "ES") for c in ("LV", "MYO")
    }
    assert (out / "boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lines = capsys.readouterr().out.splitlines()
    table = evaluation.format_table(s).splitlines()
    assert lines[: len(table)] == table  # the command prints the same table
    names = [line[:20].rstrip() for line in table]
    main = names.index("")
    assert names[:main] == [
        "class", "-" * 20, "LV", "MYO", "-" * 20, "mean over classes",
        "=" * 20, "ED LV", "ED MYO", "ED mean over classes",
        "-" * 20, "ES LV", "ES MYO", "ES mean over classes",
    ]
    row = dict(zip(names[:main], table[:main]))
    assert row["ED LV"].split()[2:5] == ["2", "0.7500", "±"] and "0.2500" in row["ED LV"]
    assert row["ED mean over classes"].split()[4:] == ["0.8750", "0.8333", "0.24", "0.12", "0.24", "0.12"]
    assert row["ES mean over classes"].split()[4:] == ["1.0000", "1.0000", "0.00", "0.00", "0.00", "0.00"]
    assert row["mean over classes"].split()[3] == "0.9375"  # overall: (0.875 + 1) / 2
    # the aggregate table: n, per case, subjects, per subject, pooled; overall then per phase
    agg = {line[:20].rstrip(): line[20:].split() for line in table[main + 1:] if line and line[0] not in "-"}
    assert agg["Dice by aggregate"] == ["n", "per", "case", "subjects", "per", "subject", "pooled"]
    assert agg["LV"] == ["4", "0.8750", "2", "0.8750", "0.8750"]
    assert agg["ED LV"] == ["2", "0.7500", "2", "0.7500", "0.7500"]
    assert table[-1] == "4 cases; empty: 0 both, 0 prediction only, 0 reference only; missing predictions: 0"


def test_per_phase_cases_without_phase():
    # a phase on some rows only: the others are grouped last under "(none)"; "" is no phase
    rows = [
        {"class": "a", "dice": 0.2, "hd95": 1.0, "assd": 1.0, "status": "ok", "phase": "ES"},
        {"class": "a", "dice": 0.4, "hd95": 1.0, "assd": 1.0, "status": "ok"},
        {"class": "a", "dice": 0.6, "hd95": 1.0, "assd": 1.0, "status": "ok", "phase": ""},
        {"class": "a", "dice": 0.8, "hd95": 1.0, "assd": 1.0, "status": "ok", "phase": "ED"},
    ]
    s = summarize(rows, ["a", "b"])
    assert list(s["per_phase"]) == ["ED", "ES", "(none)"]
    assert {p: e["per_class"]["a"]["dice"]["mean"] for p, e in s["per_phase"].items()} == pytest.approx(
        {"ED": 0.8, "ES": 0.2, "(none)": 0.5}
    )
    assert s["per_phase"]["ED"]["per_class"]["b"]["n"] == 0
    table = evaluation.format_table(s)
    # the name column widens to fit "(none) mean over classes"
    assert "\n(none) a                    2 " in table and "\n(none) mean over classes " in table
    assert len({len(line) for line in table.splitlines()}) == 1  # every line, rules included, as wide
    # no phase anywhere: no per_phase, and the table is the overall one alone
    for r in rows:
        r.pop("phase", None)
    s = summarize(rows, ["a", "b"])
    assert "per_phase" not in s and "(none)" not in evaluation.format_table(s)


def test_missing_prediction(tmp_path, capsys):
    ds, ref1, _ = _make_dataset(tmp_path, labels_key="labels")  # MSD "labels" instead of "classes"
    preds = tmp_path / "preds"
    _save(preds / "case_001_seg.nii.gz", ref1)
    with pytest.raises(ValueError, match="case 'case_002'.*no prediction"):
        evaluate_folder(preds, ds, progress=False)
    # the command prints the error and returns 2, writing nothing
    assert _cli(["--pred", str(preds), "--dataset", str(ds), "--no-progress"]) == 2
    assert "case 'case_002'" in capsys.readouterr().err
    assert not (preds / "evaluation").exists()
    out = tmp_path / "eval"
    s = evaluate_folder(preds, ds, out_dir=out, allow_missing=True, classes=["a"], progress=False)
    assert s["missing_predictions"] == ["case_002"] and s["classes"] == ["a"]
    # case_002 counted as an empty prediction: a -> pred_empty, Dice 0, HD95 = ASSD = diagonal
    # of the 6 x 6 x 4 grid at (2, 1, 1) mm: sqrt((5 * 2)^2 + 5^2 + 3^2) = sqrt(134)
    a = s["per_class"]["a"]
    assert a["status"]["pred_empty"] == 1 and a["dice"]["mean"] == 0.5
    assert a["hd95"]["mean"] == pytest.approx(math.sqrt(134) / 2)
    assert (out / "metrics.csv").is_file()


@pytest.mark.parametrize("kind", ["shape", "affine"])
def test_grid_mismatch_names_case(tmp_path, kind):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = tmp_path / "preds"
    _save(preds / "case_001.nii.gz", ref1)
    if kind == "shape":
        _save(preds / "case_002.nii.gz", np.zeros((6, 6, 5)))
        match = "case 'case_002'.*shape"
    else:
        _save(preds / "case_002.nii.gz", ref2, origin=(0.0, 0.5, 0.0))
        match = "case 'case_002'.*affine"
    with pytest.raises(ValueError, match=match):
        evaluate_folder(preds, ds, progress=False)


def test_unknown_class_and_split(tmp_path):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = tmp_path / "preds"
    preds.mkdir()
    with pytest.raises(ValueError, match="unknown class 'liver'"):
        evaluate_folder(preds, ds, classes=["liver"], progress=False)
    with pytest.raises(ValueError, match="validation"):
        evaluate_folder(preds, ds, split="validation", progress=False)


def test_partial_reference_and_label_map(tmp_path):
    # a test case from a source whose value 1 means class "b" (label_maps), annotating only "b":
    # the reference is remapped before evaluation and class "a" gets no row.
    ds = tmp_path / "ds"
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[2, 2, 2] = 1
    _save(ds / "imagesTs" / "p1.nii.gz", np.zeros(SHAPE))
    _save(ds / "labelsTs" / "p1.nii.gz", ref)
    desc = {
        "classes": ["background", "a", "b"],
        "training": [],
        "test": [{"image": "imagesTs/p1.nii.gz", "label": "labelsTs/p1.nii.gz", "annotated": ["b"], "source": "src"}],
        "label_maps": {"src": {"1": "b"}},
    }
    (ds / "dataset.json").write_text(json.dumps(desc))
    pred = np.zeros(SHAPE, dtype=np.uint8)
    pred[2, 2, 2] = 2
    pred[0, 0, 0] = 1  # class a is not annotated in this case: not evaluated
    _save(tmp_path / "preds" / "p1.nii.gz", pred)
    s = evaluate_folder(tmp_path / "preds", ds, progress=False)
    assert s["per_class"]["a"]["n"] == 0 and "dice" not in s["per_class"]["a"]
    assert s["per_class"]["b"]["dice"]["mean"] == 1.0
    # class a has no rows: left out
    assert s["overall"] == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "assd": 0.0, "hd95_vox": 0.0, "asd_vox": 0.0}


def test_partialseg_command(tmp_path, capsys):
    from partialseg import cli

    for module_name, _ in cli.COMMANDS.values():  # the command imports every subcommand module
        pytest.importorskip(module_name, reason=f"{module_name} (another subcommand) is not there yet")
    main = cli.main
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = tmp_path / "preds"
    _save(preds / "case_001.nii.gz", ref1)
    _save(preds / "case_002.nii.gz", ref2)
    out = tmp_path / "out"
    argv = ["evaluate", "--pred", str(preds), "--dataset", str(ds), "--out", str(out), "--include-background", "--no-progress"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["classes"] == ["background", "a", "b"] and s["overall"]["dice"] == 1.0
    assert s["arguments"]["include_background"] is True
    assert "background" in capsys.readouterr().out


def test_a_hw1_reference_and_a_hw_prediction_are_the_same_grid(tmp_path):
    # a 2D bundle reads a slice saved as (H, W, 1) as (H, W) and writes its prediction so
    ds = tmp_path / "ds"
    affine = np.diag([1.5, 1.5, 1.0, 1.0])
    ref = np.zeros((6, 5), np.uint8)
    ref[1:3, 1:3] = 1  # 4 pixels
    pred = np.zeros((6, 5), np.uint8)
    pred[1:3, 1:4] = 1  # 6 pixels, 4 shared: Dice 8 / 10
    nib.save(nib.Nifti1Image(ref[..., None], affine), str(_mkdir(ds / "labelsTs") / "s1.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((6, 5, 1), np.float32), affine), str(_mkdir(ds / "imagesTs") / "s1.nii.gz"))
    nib.save(nib.Nifti1Image(pred, affine), str(_mkdir(tmp_path / "preds") / "s1.nii.gz"))
    desc = {"classes": ["background", "a"], "training": [], "test": [{"image": "imagesTs/s1.nii.gz", "label": "labelsTs/s1.nii.gz"}]}
    (ds / "dataset.json").write_text(json.dumps(desc))
    s = evaluate_folder(tmp_path / "preds", ds, progress=False)
    assert s["per_class"]["a"]["dice"]["mean"] == pytest.approx(0.8)
    # a real difference in depth is still refused
    nib.save(nib.Nifti1Image(np.stack([pred, pred], -1), affine), str(tmp_path / "preds" / "s1.nii.gz"))
    with pytest.raises(ValueError, match="case 's1'.*shape"):
        evaluate_folder(tmp_path / "preds", ds, progress=False)


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# output folder and files, one-line errors
# --------------------------------------------------------------------------------------------


def _perfect_preds(tmp_path, ref1, ref2):
    preds = tmp_path / "preds"
    _save(preds / "case_001.nii.gz", ref1)
    _save(preds / "case_002.nii.gz", ref2)
    return preds


def test_out_that_is_a_file_is_refused_up_front(tmp_path, capsys):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = _perfect_preds(tmp_path, ref1, ref2)
    out = tmp_path / "results"
    out.write_text("not a folder")
    assert _cli(["--pred", str(preds), "--dataset", str(ds), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and str(out) in err and "is a file" in err
    assert out.read_text() == "not a folder"
    # a file where a parent folder should be is refused the same way
    assert _cli(["--pred", str(preds), "--dataset", str(ds), "--out", str(out / "sub"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err


def test_output_name_taken_by_a_folder_writes_nothing(tmp_path, capsys):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = _perfect_preds(tmp_path, ref1, ref2)
    out = tmp_path / "results"
    (out / "summary.json").mkdir(parents=True)
    assert _cli(["--pred", str(preds), "--dataset", str(ds), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / "summary.json") in err and "not a file" in err
    assert [p.name for p in out.iterdir()] == ["summary.json"]  # no metrics.csv, no boxplot.png


def test_outputs_are_all_or_nothing(tmp_path, capsys, monkeypatch):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = _perfect_preds(tmp_path, ref1, ref2)
    out = tmp_path / "results"
    assert _cli(["--pred", str(preds), "--dataset", str(ds), "--out", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["boxplot.png", "metrics.csv", "summary.json"]
    capsys.readouterr()

    # the third output fails (disk full): the earlier run's outputs stay as they were, no temporary file
    def full(path, obj):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(report, "_write_json", full)
    _save(preds / "case_002.nii.gz", np.zeros(SHAPE, dtype=np.uint8))  # different metrics now
    assert _cli(["--pred", str(preds), "--dataset", str(ds), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out / 'summary.json'}: No space left on device"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_bad_value_names_the_prediction_file(tmp_path):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = _perfect_preds(tmp_path, ref1, ref2)
    affine = np.diag([*SPACING, 1.0])
    bad = preds / "case_002.nii.gz"
    nib.save(nib.Nifti1Image(np.where(ref2 > 0, 0.75, 0.0).astype(np.float32), affine), str(bad))
    where = re.escape(f"case 'case_002': the prediction {bad} holds the ")
    with pytest.raises(ValueError, match=where + "non-integer value 0.75"):
        evaluate_folder(preds, ds, progress=False)
    nib.save(nib.Nifti1Image(np.where(ref2 > 0, 255, 0).astype(np.uint8), affine), str(bad))
    with pytest.raises(ValueError, match=where + "value 255"):
        evaluate_folder(preds, ds, progress=False)
    assert not (preds / "evaluation").exists()  # nothing written when a case fails


def test_find_prediction_upper_case_extension(tmp_path):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = tmp_path / "preds"
    _save(preds / "case_001.NII.GZ", ref1)
    _save(preds / "case_002_seg.NII.GZ", ref2)
    assert find_prediction(preds, "imagesTs/case_001.nii.gz") == preds / "case_001.NII.GZ"
    s = evaluate_folder(preds, ds, progress=False)
    assert s["per_class"]["a"]["dice"]["mean"] == 1.0 and s["missing_predictions"] == []
    # both spellings present: ambiguous, as any two matches are
    _save(preds / "case_001.nii.gz", ref1)
    with pytest.raises(ValueError, match="several prediction files"):
        find_prediction(preds, "imagesTs/case_001.nii.gz")


# --------------------------------------------------------------------------------------------
# run records: predictions of one inference run only
# --------------------------------------------------------------------------------------------


def _save_from_run(path, arr, run_id, sha="ab" * 32):
    """A prediction as SavePredictiond writes it: the run record in a NIfTI comment extension."""
    from partialseg.transforms.io.record import PredictionRun

    run = PredictionRun(run_id=run_id)
    run._record = {"partialseg_run": run_id, "model_sha256": sha, "model": "model.pt"}  # a model's hash, as if read
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr.astype(np.uint8), np.diag([*SPACING, 1.0]))
    run.stamp(img.header)
    nib.save(img, str(path))


def test_predictions_of_one_run_are_scored_and_their_run_recorded(tmp_path, capsys):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = tmp_path / "preds"
    _save_from_run(preds / "case_001_seg.nii.gz", ref1, "run-A")
    _save_from_run(preds / "case_002_seg.nii.gz", ref2, "run-A")
    _save_from_run(preds / "case_003_seg.nii.gz", ref2, "run-B", sha="cd" * 32)  # not scored (no label): ignored
    assert _cli(["--pred", str(preds), "--dataset", str(ds), "--no-progress"]) == 0
    assert "predictions of inference run run-A, model sha256:abababababab" in capsys.readouterr().out
    s = json.loads((preds / "evaluation" / "summary.json").read_text())
    assert s["prediction_run"] == {"model": "model.pt", "model_sha256": "ab" * 32, "partialseg_run": "run-A"}
    assert s["per_class"]["a"]["dice"]["mean"] == 1.0
    # files of other tools carry no record: accepted, prediction_run null
    assert evaluate_folder(_perfect_preds(tmp_path / "plain", ref1, ref2), ds, progress=False)["prediction_run"] is None


MIXES = [
    # (second file's run, words naming it in the error)
    ("run-B", "(run run-B, model model.pt sha256:cdcdcdcdcdcd)"),
    (None, "(no partialseg run record"),
]


@pytest.mark.parametrize("other,named", MIXES)
def test_a_folder_mixing_runs_is_refused_naming_two_files(tmp_path, capsys, other, named):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = tmp_path / "preds"
    _save_from_run(preds / "case_001_seg.nii.gz", ref1, "run-A")
    if other is None:
        _save(preds / "case_002_seg.nii.gz", ref2)  # written by another tool
    else:
        _save_from_run(preds / "case_002_seg.nii.gz", ref2, other, sha="cd" * 32)
    assert _cli(["--pred", str(preds), "--dataset", str(ds), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: the prediction folder {preds} mixes the outputs of 2 inference runs")
    assert f"{preds / 'case_001_seg.nii.gz'} (run run-A, model model.pt sha256:abababababab)" in err
    assert f"{preds / 'case_002_seg.nii.gz'} {named}" in err
    assert "fresh (empty) output folder" in err
    assert not (preds / "evaluation").exists()  # refused before any case was scored
    with pytest.raises(ValueError, match="mixes the outputs of 2 inference runs"):
        evaluate_folder(preds, ds, progress=False)
    # allow_missing does not hide it: the predictions that exist are still two runs
    with pytest.raises(ValueError, match="mixes"):
        evaluate_folder(preds, ds, allow_missing=True, progress=False)


def test_check_one_run_counts_the_runs(tmp_path):
    from partialseg.evaluation import check_one_run

    arr = np.zeros(SHAPE)
    for run in ("r1", "r2", "r3"):
        _save_from_run(tmp_path / f"{run}_seg.nii.gz", arr, run)
    _save(tmp_path / "plain.nii.gz", arr)
    assert check_one_run(tmp_path, [tmp_path / "r1_seg.nii.gz"])["partialseg_run"] == "r1"
    assert check_one_run(tmp_path, [tmp_path / "plain.nii.gz"]) is None
    with pytest.raises(ValueError, match=r"mixes the outputs of 4 inference runs \(and 2 more\)"):
        check_one_run(tmp_path, sorted(tmp_path.iterdir()))


def test_an_unreadable_prediction_header_names_the_case(tmp_path):
    ds, ref1, ref2 = _make_dataset(tmp_path)
    preds = _perfect_preds(tmp_path, ref1, ref2)
    (preds / "case_002.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    with pytest.raises(ValueError, match=re.escape(f"case 'case_002': the prediction {preds / 'case_002.nii.gz'}: cannot read")):
        evaluate_folder(preds, ds, progress=False)
