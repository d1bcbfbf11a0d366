"""Atomic writes: a failed write leaves the target as it was and no temporary file behind."""

from __future__ import annotations

import os

import pytest

from partialseg._fileio import atomic_copy, atomic_open, atomic_write_text, remove_stale_temporaries


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_mode_follows_the_umask_and_copies_are_whole(tmp_path):
    umask = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a" / "b.txt", "x")  # parent folders are created
    finally:
        os.umask(umask)
    assert (tmp_path / "a" / "b.txt").stat().st_mode & 0o777 == 0o640
    src = tmp_path / "model.pt"
    src.write_bytes(os.urandom(1 << 20))
    atomic_copy(src, tmp_path / "served.pt")
    assert (tmp_path / "served.pt").read_bytes() == src.read_bytes()
    (tmp_path / ".served.pt.abc.tmp").write_bytes(b"")  # what a SIGKILL mid-write leaves
    remove_stale_temporaries(tmp_path / "served.pt")
    assert not list(tmp_path.glob(".served.pt.*"))
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "x", "a"):
            pass
