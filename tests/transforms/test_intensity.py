"""Tests of ModalityIntensity(d): CT window and z-score by hand, the refusals, types (the atlas bundle's normalisation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from partialseg.transforms import ModalityIntensityd as ExportedModalityIntensityd
from partialseg.transforms.intensity import (
    ModalityIntensity,
    ModalityIntensityd,
    ModalityIntensityD,
    ModalityIntensityDict,
)

BY_MODALITY = {"CT": "window", "MR": "zscore"}
# window (-300, 500): centre 100, half-width 400
IMAGE = [[-1000.0, -300.0, 100.0, 300.0, 500.0, 2000.0]]
WINDOWED = [[-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]]
# z-score of [1, 2, 3, 6]: mean 3, unbiased std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14 / 3)
MR = [[1.0, 2.0, 3.0, 6.0]]
ZSCORED = [[v / (14 / 3) ** 0.5 for v in (-2.0, -1.0, 0.0, 3.0)]]


def test_ct_window_by_hand_off_centre():
    t = ModalityIntensityd("image", by_modality=BY_MODALITY, window=(-300, 500))
    out = t({"image": torch.tensor(IMAGE), "modality": "CT", "case": "a"})["image"]
    torch.testing.assert_close(out, torch.tensor(WINDOWED))


def test_mr_zscore_by_hand_unbiased_std():
    t = ModalityIntensityd("image", by_modality=BY_MODALITY, window=(-300, 500))
    out = t({"image": torch.tensor(MR), "modality": "MR", "case": "b"})["image"]
    torch.testing.assert_close(out, torch.tensor(ZSCORED))
    # a constant image: std clamped at 1e-6, so zeros rather than NaN
    flat = t({"image": torch.full((1, 3), 7.0), "modality": "MR"})["image"]
    torch.testing.assert_close(flat, torch.zeros(1, 3))


def test_matches_the_bundle_lambda_it_replaces_bit_for_bit():
    """The formula the atlas bundle's configs held (a ``$lambda``), on random volumes of both modalities."""
    lo, hi = -325.0, 325.0
    g = torch.Generator().manual_seed(0)
    t = ModalityIntensityd("image", by_modality=BY_MODALITY, window=[lo, hi])
    for modality in ("CT", "MR"):
        x = 600 * torch.randn(1, 6, 7, 5, generator=g) + 40
        ref = ((x.clamp(lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)) if modality == "CT" else (x - x.mean()) / x.std().clamp_min(1e-6)
        assert torch.equal(t({"image": x, "modality": modality})["image"], ref)


def test_unknown_modality_is_refused_naming_case_modality_and_known():
    t = ModalityIntensityd("image", by_modality=BY_MODALITY)
    with pytest.raises(ValueError, match=r"modality 'PET' of case 'case_7' has no intensity scheme .*known modalities: 'CT', 'MR'"):
        t({"image": torch.zeros(1, 2), "modality": "PET", "case": "case_7"})
    with pytest.raises(ValueError, match=r"modality 'ct' has no intensity scheme"):  # exact names; no case key: not named
        t({"image": torch.zeros(1, 2), "modality": "ct"})
    with pytest.raises(ValueError, match=r"image of case 'c' has no modality and no default_modality is set; known modalities: 'CT', 'MR'"):
        t({"image": torch.zeros(1, 2), "case": "c"})


def test_default_modality_covers_a_missing_or_empty_modality_only():
    t = ModalityIntensityd("image", by_modality=BY_MODALITY, window=(-300, 500), default_modality="CT")
    for item in ({}, {"modality": None}, {"modality": ""}):
        torch.testing.assert_close(t({"image": torch.tensor(IMAGE), **item})["image"], torch.tensor(WINDOWED))
    torch.testing.assert_close(t({"image": torch.tensor(MR), "modality": "MR"})["image"], torch.tensor(ZSCORED))


def test_types_numpy_metatensor_integer_and_several_keys():
    t = ModalityIntensityd(["image", "other"], modality_key="mod", by_modality=BY_MODALITY, window=(-300, 500), allow_missing_keys=True)
    out = t({"image": np.asarray(IMAGE, np.float32), "mod": "CT"})["image"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, WINDOWED)
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    meta = t({"image": MetaTensor(torch.tensor(MR), affine=affine), "other": torch.tensor(MR), "mod": "MR"})
    assert isinstance(meta["image"], MetaTensor) and torch.equal(meta["image"].affine, affine)
    torch.testing.assert_close(meta["image"].as_tensor(), torch.tensor(ZSCORED))
    torch.testing.assert_close(meta["other"], torch.tensor(ZSCORED))
    integer = ModalityIntensity(BY_MODALITY, window=(-300, 500))(torch.tensor([[-1000, 300]]), modality="CT")
    assert integer.dtype == torch.float32 and integer.tolist() == [[-1.0, 0.5]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"by_modality": {"CT": "clip"}}, r"by_modality\['CT'\] must be one of 'window', 'zscore'"),
        ({"by_modality": ["CT"]}, "by_modality must map"),
        ({"window": (325.0, -325.0)}, "lo < hi"),
        ({"window": (0.0, 0.0)}, "lo < hi"),
        ({"window": (-1.0, float("inf"))}, "finite"),
        ({"window": (1.0,)}, "two finite numbers"),
        ({"window": "wide"}, "two finite numbers"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModalityIntensity(**kwargs)


def test_aliases_and_export():
    assert ModalityIntensityD is ModalityIntensityDict is ModalityIntensityd is ExportedModalityIntensityd
