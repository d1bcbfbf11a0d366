"""Synthetic partial-label benchmarks: one generator per family, all writing the partialseg format.

Families (see docs/synthetic.md):

- ``cardiac2d``: short-axis MR slices, LV / MYO / RV, one structure annotated per training case
  (DCL setting; ``variant="wholeheart"`` adds whole-heart cases).
- ``abdomen3d``: CT (or ``modality="MR"``) volumes with six organs; a small fully labelled source
  plus liver-, spleen-, pancreas- and kidney-only sources with their own label maps (marginal-loss
  and atlas settings).
- ``polyp2d``: RGB endoscopy-like images; 10% strong masks, the rest weak (ellipse, distorted or
  missing), hybrid-supervision setting.
- ``atrium3d``: MR volumes with a left atrium; 20% labelled, the rest unlabelled (DTML setting).

Example:
    >>> import tempfile
    >>> from partialseg.data.synthetic import make_dataset
    >>> path = make_dataset("cardiac2d", tempfile.mkdtemp(), seed=0, size=48, num_train=2, num_test=1)
    >>> path.name
    'dataset.json'
"""

from __future__ import annotations

import importlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Sequence

__all__ = ["FAMILIES", "MAX_VOXELS", "check_out_dir", "make_dataset"]

#: family name -> (module, one-line description)
FAMILIES = {
    "cardiac2d": ("partialseg.data.synthetic.cardiac", "2D short-axis cardiac MR: LV, MYO, RV (DCL)"),
    "abdomen3d": (
        "partialseg.data.synthetic.abdomen",
        "3D abdominal CT/MR, six organs, partially labelled sources (marginal, atlas)",
    ),
    "polyp2d": ("partialseg.data.synthetic.polyp", "2D RGB endoscopy polyps, strong + weak masks (hybrid)"),
    "atrium3d": ("partialseg.data.synthetic.atrium", "3D left-atrium MR, labelled + unlabelled (DTML)"),
}


#: largest number of voxels (pixels in 2D) of one generated image: generating a case takes about
#: 100-250 bytes of memory per voxel (measured: 2048 x 2048 cardiac2d and polyp2d, 160^3
#: atrium3d, 144^3 abdomen3d), so this keeps a run under about 4 GiB. It allows, e.g.,
#: 4096 x 4096 in 2D and 256 x 256 x 256 in 3D.
MAX_VOXELS = 4096 * 4096

#: estimated peak memory per voxel of one case (bytes), used in the size-limit message
_BYTES_PER_VOXEL = 256


def _listing(folder: Path, limit: int = 4) -> str:
    """``"dataset.json, imagesTr/, labelsTr/ and 3 more"``: the first entries of a folder."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _human_bytes(n: float) -> str:
    """``2.3 TiB``: a byte count in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_size(size: int | Sequence[int] | None, ndim: int) -> None:
    """Refuse a ``size`` whose images would have more than :data:`MAX_VOXELS` voxels.

    Malformed sizes (wrong length, too small, not integers) are left to the family's own check.
    """
    if size is None:
        return
    try:
        values = [int(s) for s in size]  # type: ignore[union-attr]
    except TypeError:
        try:
            values = [int(size)] * ndim  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return
    except ValueError:
        return
    if not values or min(values) <= 0:
        return
    voxels = 1
    for v in values:
        voxels *= v
    if voxels > MAX_VOXELS:
        raise ValueError(
            f"size {' x '.join(map(str, values))} gives {voxels:,} voxels per image, which would take about "
            f"{_human_bytes(voxels * _BYTES_PER_VOXEL)} of memory to generate; the limit is {MAX_VOXELS:,} voxels "
            f"(e.g. 4096 x 4096 in 2D, 256 x 256 x 256 in 3D): choose a smaller size."
        )


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False, hint: str = "pass overwrite=True") -> None:
    """Check that ``out_dir`` can receive a new dataset, before anything is generated.

    A folder that does not exist yet, or an empty one, is fine. A non-empty folder is refused
    unless ``overwrite`` (it is then replaced as a whole); a file is always refused, and so is
    overwriting the current folder, a folder holding it, or the home folder.

    Args:
        out_dir: the dataset folder asked for.
        overwrite: allow replacing a non-empty folder.
        hint: how the caller asks for overwriting, for the message (the CLI: ``"add --overwrite"``).

    Raises:
        FileExistsError: ``out_dir`` is a file, or a non-empty folder without ``overwrite``, or
            a folder that must not be replaced; the message names it and what it holds.
    """
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: choose a folder for the dataset.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} is not empty (it holds {_listing(out)}): choose a new or empty folder, or {hint} "
            "to replace the whole folder."
        )
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path.home().resolve() or real == Path(real.anchor):
        raise FileExistsError(
            f"{out} is the current folder, a folder holding it, or the home folder: refusing to replace it; "
            "choose a dedicated dataset folder."
        )


def make_dataset(family: str, out_dir: str | os.PathLike, seed: int = 0,
                 size: int | Sequence[int] | None = None, overwrite: bool = False, **options: Any) -> Path:
    """Generate a synthetic benchmark in ``out_dir`` and return the path of its ``dataset.json``.

    The output depends only on (family, seed, size, options): the same arguments give
    byte-identical files.

    The dataset is built in a temporary folder beside ``out_dir`` (``.NAME.partial-*``) and moved
    into place only once complete, so a failed or interrupted run leaves ``out_dir`` as it was
    (and creates no empty one). A new ``out_dir`` appears in one rename; into an existing empty
    folder the entries are moved with ``dataset.json`` last; with ``overwrite`` an existing
    folder is moved aside, the new one renamed into place, and the old one deleted.

    Args:
        family: one of :data:`FAMILIES`.
        out_dir: dataset folder: new or empty, or any folder with ``overwrite``.
        seed: non-negative dataset seed.
        size: spatial size: one int for every axis, or one per axis; None for the family default.
            At most :data:`MAX_VOXELS` voxels per image.
        overwrite: replace a non-empty ``out_dir`` as a whole (see :func:`check_out_dir`).
        **options: family options: ``num_train``, ``num_test``, ``progress`` (all families);
            ``variant``, ``levels`` (cardiac2d); ``modality``, ``num_full`` (abdomen3d); ``strong_fraction``,
            ``missing_fraction`` (polyp2d); ``labelled_fraction`` (atrium3d).

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: unknown family, bad size (or one above :data:`MAX_VOXELS`) or option value.
        TypeError: an option the family does not take.
        FileExistsError: ``out_dir`` is a file, or a non-empty folder without ``overwrite``.
        OSError: the dataset cannot be written or moved into place (the message names the path).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    module = importlib.import_module(FAMILIES[family][0])
    _check_size(size, len(module.DEFAULT_SIZE))
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    if out.is_symlink():  # replace the folder the link points to, keep the link
        out = out.resolve()
    out = Path(os.path.abspath(out))

    # parent folders created here are removed again if the run fails
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # not tempfile.mkdtemp: that one is 0o700, and the dataset keeps the folder's mode
    try:
        module.generate(tmp, seed=int(seed), size=size, **options)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return Path(out_dir) / "dataset.json"


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished dataset ``tmp`` at ``out`` (see :func:`make_dataset`)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        # keep the folder itself (its mode, a mount point, a shell sitting in it); dataset.json
        # last, so the folder only looks like a dataset once it is complete
        entries = sorted(tmp.iterdir(), key=lambda p: p.name == "dataset.json")
        moved: list[Path] = []
        try:
            for entry in entries:
                moved.append(out / entry.name)
                shutil.move(str(entry), str(moved[-1]))
        except BaseException:
            for path in moved:  # leave the folder empty again, as it was
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise
        tmp.rmdir()
        return
    if not overwrite:  # filled by someone else while generating
        raise FileExistsError(f"{out} is no longer empty (it holds {_listing(out)}); the dataset was not written.")
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
