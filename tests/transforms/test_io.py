"""LoadImageNamedd: missing and corrupt inputs fail with errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from partialseg.transforms import LoadImageNamedd

from conftest import save_nifti


def test_loads_like_loadimaged_and_names_bad_files(tmp_path):
    good = save_nifti(tmp_path / "a.nii.gz", np.ones((4, 3, 2), np.float32))
    out = LoadImageNamedd("image", image_only=True, ensure_channel_first=True)({"image": str(good)})
    assert tuple(out["image"].shape) == (1, 4, 3, 2)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz: file not found"):
        LoadImageNamedd("image")({"image": str(tmp_path / "missing.nii.gz")})
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good.read_bytes()[:40])  # truncated gzip
    with pytest.raises(RuntimeError, match="broken.nii.gz: cannot be read"):
        LoadImageNamedd("image")({"image": str(broken)})
