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

#: datalist keys a training pipeline needs; the rest (modality, contrast, ``label_true``, ...) stay out
#: of batches (``label_true`` is for analysis only: training and inference never read it)
_KEEP = ("image", "label", "annotated", "label_map", "source", "case", "supervision", "weak_type")


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
    num_classes: int | None = None,
    full_sources: Sequence[str] | str | None = None,
    supervision: bool = False,
) -> list[dict[str, Any]]:
    """The cases of a dataset split as a MONAI datalist for a bundle's pipeline.

    Each entry keeps ``image``, ``label`` (absent when unlabelled), ``annotated`` (global class
    indices), ``label_map`` (only for sources that have one), ``source``, ``case``, and the
    hybrid keys ``supervision`` / ``weak_type`` where the case has them (``label_true`` is left
    out: analysis only). Entries may therefore differ in keys: select the batch keys
    (``SelectItemsd``) before collating.

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
        num_classes: the bundle's ``num_classes`` (its network's output channels, background
            included); when given it must equal the dataset's class count, else a ValueError names
            both, the classes and the ``--num_classes`` flag (None: not checked).
        full_sources: the bundle's ``full_sources`` (its fully labelled sources); when given,
            each must have a case in ``split``, whatever ``sources`` is, else a ValueError names
            it, the split's sources and the ``--full_sources`` flag (a string is one name).
        supervision: give every labelled entry its ``supervision`` (``"strong"`` where the case
            has no such key, as ``docs/data_format.md`` defines), for a hybrid-supervision
            bundle; with ``validate``, a training split of weak masks only is refused.

    Raises:
        FileNotFoundError: no ``dataset.json`` in ``dataset_dir``.
        ValueError: an unknown source was asked for, ``num_classes`` or ``full_sources`` do not fit
            the dataset, or the split is empty after filtering.
        DatasetError: validation failed.
    """
    from partialseg._checks import check_int
    from partialseg.data import load_dataset, validate_dataset

    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"no dataset.json in {dataset_dir}")
    ds = load_dataset(path)
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", minimum=1)
        if num_classes != ds.num_classes:
            raise ValueError(
                f"num_classes {num_classes} does not fit {path}: it has {ds.num_classes} classes "
                f"(background included) {ds.classes}; pass --num_classes {ds.num_classes}"
            )
    known = set(ds.sources(split))
    if isinstance(full_sources, str):
        full_sources = [full_sources]
    if isinstance(sources, str):
        sources = [sources]
    missing = [name for name in (full_sources or []) if name not in known]
    if missing:
        everything = set(range(ds.num_classes))
        labelled = {n: [set(c.get("annotated") or []) for c in ds.datalist(split, sources=[n]) if c.get("label")]
                    for n in ds.sources(split)}
        full = [n for n, annotated in labelled.items() if annotated and all(a >= everything for a in annotated)]
        hint = (f'pass --full_sources "{full!r}" (its fully labelled sources)' if full else
                "no source of it labels every class: pass --full_sources with the sources to train stage 1 on")
        raise ValueError(
            f"full_sources {list(full_sources)}: no source {', '.join(map(repr, missing))} in split {split!r} "
            f"of {path}; its sources are {ds.sources(split)}: {hint}"
        )
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
        if supervision and "label" in entry:
            entry.setdefault("supervision", "strong")
        out.append(entry)
    return out
