"""Machinery shared by the dataset builders: the output path check, the atomic JSON write,
relative paths, an MSD task folder's cases."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["check_out", "relative", "write_json", "msd_pairs"]


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


def msd_pairs(root: Path, split: str = "training") -> list:
    """The cases of an MSD task folder, from its ``dataset.json``.

    Args:
        root: the task folder (``Task09_Spleen``, ``Task02_Heart`` ...).
        split: ``"training"``: ``(image, label)`` pairs of its ``training`` entries; ``"test"``:
            the image paths of its ``test`` list (no labels; an absent list gives none).

    Raises:
        FileNotFoundError: no ``dataset.json`` in ``root``.
        ValueError: a ``dataset.json`` that is not valid JSON, not an object, or whose entries
            are not of MSD's form (each message names the file).
    """
    desc_path = root / "dataset.json"
    if not desc_path.is_file():
        raise FileNotFoundError(f"{root}: not an MSD task folder (no dataset.json)")
    try:
        desc = json.loads(desc_path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{desc_path}: not valid JSON ({e}); restore the task's original dataset.json") from None
    if not isinstance(desc, Mapping):
        raise ValueError(
            f"{desc_path}: the top level is a JSON {type(desc).__name__}; an MSD dataset.json is an object "
            "with a 'training' list of {\"image\": ..., \"label\": ...} entries"
        )
    if split == "test":
        test = desc.get("test", [])
        if not isinstance(test, list) or not all(isinstance(t, str) for t in test):
            raise ValueError(f"{desc_path}: 'test' must be a list of image paths, got {test!r:.80}")
        return [root / t for t in test]
    training = desc.get("training", [])
    if not isinstance(training, list):
        raise ValueError(f"{desc_path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} entries, "
                         f"got a {type(training).__name__}")
    pairs = []
    for i, entry in enumerate(training):
        if not isinstance(entry, Mapping) or "image" not in entry or "label" not in entry:
            raise ValueError(f"{desc_path}: training[{i}] must have 'image' and 'label', got {entry!r}")
        pairs.append((root / entry["image"], root / entry["label"]))
    return pairs
