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
from pathlib import Path
from typing import Any, Sequence

__all__ = ["FAMILIES", "make_dataset"]

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


def make_dataset(family: str, out_dir: str | os.PathLike, seed: int = 0,
                 size: int | Sequence[int] | None = None, **options: Any) -> Path:
    """Generate a synthetic benchmark in ``out_dir`` and return the path of its ``dataset.json``.

    The output depends only on (family, seed, size, options): the same arguments give
    byte-identical files.

    Args:
        family: one of :data:`FAMILIES`.
        out_dir: dataset folder (created; existing files of the same names are overwritten).
        seed: non-negative dataset seed.
        size: spatial size: one int for every axis, or one per axis; None for the family default.
        **options: family options: ``num_train``, ``num_test``, ``progress`` (all families);
            ``variant`` (cardiac2d); ``modality``, ``num_full`` (abdomen3d); ``strong_fraction``,
            ``missing_fraction`` (polyp2d); ``labelled_fraction`` (atrium3d).

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: unknown family, bad size or option value.
        TypeError: an option the family does not take.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    module = importlib.import_module(FAMILIES[family][0])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return module.generate(out, seed=int(seed), size=size, **options)
