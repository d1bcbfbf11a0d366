"""Machinery shared by the dataset builders: the output path check, the atomic JSON write,
relative paths."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["check_out", "relative", "write_json"]


def check_out(out: str | os.PathLike) -> Path:
    """The output ``dataset.json`` path, checked before anything is built or written.

    Raises:
        ValueError: ``out`` does not end with ``.json``, is an existing folder, or lies in a
            folder that is a file.
    """
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; give the JSON file to write, e.g. {path / 'dataset.json'}")
    if path.suffix.lower() != ".json":
        raise ValueError(f"--out {out} must be a .json file, e.g. {path / 'dataset.json'} or {path}.json")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a folder")
            break
    return path


def write_json(out: Path, desc: dict[str, Any]) -> None:
    """Write ``desc`` to ``out`` atomically (a temporary file that never stays behind, even on failure)."""
    from partialseg._fileio import atomic_write_text

    atomic_write_text(out, json.dumps(desc, indent=2))


def relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return str(path)
