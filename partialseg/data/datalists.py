"""Datalists for bundles: find (or generate) a dataset, validate it, and hand MONAI its cases.

Bundle configs call these two functions, so a bundle runs on the synthetic benchmark when its
``dataset_dir`` holds nothing, and on a real dataset (``dataset.json`` in the partialseg format,
see ``docs/data_format.md``) when it does.

Example:
    >>> import tempfile
    >>> from partialseg.data.datalists import bundle_datalist, ensure_dataset
    >>> root = ensure_dataset(tempfile.mkdtemp(), "cardiac2d", size=32, num_train=3, num_test=1)  # doctest: +ELLIPSIS
    partialseg: no dataset.json in ...; generating the synthetic cardiac2d benchmark (seed 0)
    >>> cases = bundle_datalist(root, "training")
    >>> sorted(cases[0])
    ['annotated', 'case', 'image', 'label', 'source']
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["bundle_datalist", "ensure_dataset"]

#: datalist keys a training pipeline needs; the rest (modality, contrast, ...) stay out of batches
_KEEP = ("image", "label", "annotated", "label_map", "source", "case")


def ensure_dataset(dataset_dir: str | os.PathLike, family: str, seed: int = 0, **options: Any) -> str:
    """Return ``dataset_dir``, generating the synthetic ``family`` benchmark there if it holds no dataset.

    A folder with a ``dataset.json`` is left untouched (whatever it describes). Otherwise the
    benchmark is generated in a temporary folder beside it and moved into place, so an
    interrupted generation never leaves a half-written dataset behind, and processes racing to
    generate it (torchrun ranks) end up sharing the first one moved into place.

    Args:
        dataset_dir: the dataset folder.
        family: synthetic benchmark family (see :data:`partialseg.data.synthetic.FAMILIES`).
        seed: benchmark seed.
        **options: generator options (``size``, ``num_train``, ``num_val``, ...).

    Returns:
        ``str(dataset_dir)``.
    """
    root = Path(dataset_dir)
    if (root / "dataset.json").is_file():
        return str(root)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} holds files but no dataset.json: point dataset_dir at a partialseg dataset "
                         "(docs/data_format.md) or at an empty folder to generate the synthetic benchmark there")
    from partialseg.data.synthetic import make_dataset

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0o700; the dataset gets a plain folder's mode
    print(f"partialseg: no dataset.json in {root}; generating the synthetic {family} benchmark (seed {seed})", flush=True)
    try:
        make_dataset(family, tmp, seed=seed, **options)
        try:
            if root.exists():
                root.rmdir()
            os.replace(tmp, root)
        except OSError:
            # another process (e.g. another torchrun rank) put a dataset there first: use it
            if not (root / "dataset.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(root)


def bundle_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "training",
    sources: Sequence[str] | None = None,
    exclude_sources: Sequence[str] | None = None,
    unknown_as_background: bool = False,
    validate: bool = True,
    limit: int | None = None,
    channels: int | None = None,
) -> list[dict[str, Any]]:
    """The cases of a dataset split as a MONAI datalist for a bundle's pipeline.

    Each entry keeps ``image``, ``label`` (absent when unlabelled), ``annotated`` (global class
    indices), ``label_map`` (only for sources that have one), ``source`` and ``case``.

    Args:
        dataset_dir: folder holding ``dataset.json``.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        sources: keep only cases of these sources (None: all).
        exclude_sources: drop cases of these sources.
        unknown_as_background: mark every labelled case as fully annotated, so unlabelled organs
            count as background (the naive baseline of the marginal paper's ablation).
        validate: run :func:`partialseg.data.validate_dataset` on the split first and raise a
            :class:`partialseg.data.DatasetError` listing every problem (each naming its case);
            the whole split is checked, before any filtering.
        limit: keep at most this many cases (after filtering), for smoke runs.
        channels: with ``validate``, the channels every image must have (a bundle passes its
            network's ``in_channels``; None: any, as ``partialseg check --channels`` is not told).

    Raises:
        FileNotFoundError: no ``dataset.json`` in ``dataset_dir``.
        ValueError: an unknown source was asked for, or the split is empty after filtering.
        DatasetError: validation failed.
    """
    from partialseg.data import load_dataset, validate_dataset

    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"no dataset.json in {dataset_dir}")
    ds = load_dataset(path)
    known = set(ds.sources(split))
    for name in list(sources or []) + list(exclude_sources or []):
        if name not in known:
            raise ValueError(f"source {name!r} has no case in split {split!r} of {path}; sources are {sorted(known)}")
    cases = ds.datalist(split, sources=sources)
    if exclude_sources:
        cases = [c for c in cases if c["source"] not in set(exclude_sources)]
    if limit is not None:
        cases = cases[: int(limit)]
    if not cases:
        raise ValueError(f"split {split!r} of {path} has no case (sources={sources}, exclude_sources={exclude_sources})")
    if validate:
        report = validate_dataset(ds, splits=[split], channels=channels)
        report.raise_if_invalid()
    out = []
    for case in cases:
        entry = {k: case[k] for k in _KEEP if case.get(k) is not None}
        if unknown_as_background and "label" in entry:
            entry["annotated"] = list(range(ds.num_classes))
        out.append(entry)
    return out
