"""Config helpers of the bundles: boolean flags from the command line, required checkpoints."""

from __future__ import annotations

import pytest

from partialseg.engines import as_bool, require_checkpoint


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), (0, False), (1, True),
    ("false", False), ("False", False), (" no ", False), ("0", False), ("off", False), ("", False),
    ("true", True), ("TRUE", True), ("yes", True), ("1", True), ("on", True),
])  # fmt: skip
def test_as_bool(value, expected):
    assert as_bool(value) is expected


def test_as_bool_rejects_other_words_and_require_checkpoint_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="'maybe'"):
        as_bool("maybe")
    with pytest.raises(FileNotFoundError, match="model.pt does not exist: train first"):
        require_checkpoint(tmp_path / "model.pt", "train first")
    (tmp_path / "model.pt").write_bytes(b"x")
    assert require_checkpoint(tmp_path / "model.pt") == str(tmp_path / "model.pt")
