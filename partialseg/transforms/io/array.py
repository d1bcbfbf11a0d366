"""Saving predictions: whole files only, each stamped with the run that wrote it.

MONAI's ``SaveImage`` writes a NIfTI file in place (``nib.save`` streams through gzip into the
final name), so a process killed mid-write leaves a 0-byte or truncated file that looks like a
prediction. :class:`SavePrediction` is ``SaveImage`` with a writer that builds the whole file in
memory, writes it to a temporary file in the same folder (``.<name>.<random>.tmp``), flushes it
to disk and renames it over the final name (:mod:`partialseg._fileio`): a reader, or a kill at
any moment, sees the old file or the new one, never part of one. A kill can leave the hidden
temporary file, which the next successful write of that name removes. Each file carries the run
record of :mod:`partialseg.transforms.io.record` (run id, the model's SHA-256).
"""

from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np
from monai.data.image_writer import NibabelWriter
from monai.data.utils import to_affine_nd
from monai.transforms import SaveImage
from monai.utils import convert_data_type

from partialseg._fileio import atomic_open, remove_stale_temporaries
from partialseg.transforms.io.record import PredictionRun

__all__ = ["AtomicNiftiWriter", "SavePrediction", "NIFTI_EXTENSIONS"]

#: output extensions :class:`SavePrediction` writes (the run record lives in the NIfTI header)
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
#: gzip level of ``.nii.gz`` outputs (nibabel's default for ``nib.save``)
GZIP_LEVEL = 1


class AtomicNiftiWriter(NibabelWriter):
    """MONAI's ``NibabelWriter``, writing atomically and stamping a :class:`PredictionRun` record.

    The image is serialised exactly as ``NibabelWriter`` does (sform and qform from the affine,
    code 1; gzip for ``.nii.gz``, with mtime 0 so equal data give equal bytes), then written
    through :func:`partialseg._fileio.atomic_open`; the temporary files that killed writes of the
    same name left (``.<name>.*.tmp``) are removed once it is in place. ``run`` comes from ``SaveImage``'s
    ``init_kwargs`` (``SavePrediction`` sets it); without one no record is written.
    """

    run: PredictionRun | None = None

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        name = str(filename)
        if not name.lower().endswith(NIFTI_EXTENSIONS):
            raise ValueError(f"{name}: {type(self).__name__} writes NIfTI files only ({', '.join(NIFTI_EXTENSIONS)})")
        if verbose:
            super(NibabelWriter, self).write(filename, verbose=verbose)  # ImageWriter: the log line only
        img = self.create_backend_obj(self.data_obj, affine=self.affine, dtype=self.output_dtype, **obj_kwargs)
        if self.affine is None:
            self.affine = np.eye(4)
        affine = to_affine_nd(r=3, affine=convert_data_type(self.affine, np.ndarray)[0])
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        with atomic_open(filename, "wb") as f:  # any failure below removes the temporary file
            if self.run is not None:
                self.run.stamp(img.header)
            data = img.to_bytes()
            f.write(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0) if name.lower().endswith(".gz") else data)
        remove_stale_temporaries(filename)  # what earlier killed writes of this name left
        self.data_obj = img


def _check_nifti(output_ext: str, owner: str) -> None:
    if output_ext not in NIFTI_EXTENSIONS:
        raise ValueError(f"{owner} writes NIfTI files (output_ext {' or '.join(map(repr, NIFTI_EXTENSIONS))}), got {output_ext!r}: the run record lives in the NIfTI header")


class SavePrediction(SaveImage):
    """MONAI's ``SaveImage`` writing whole NIfTI files only, each with the run's record.

    Every file goes to a temporary name in its folder and is renamed into place once complete
    (see the module docstring), and its header records the run id and the SHA-256 of
    ``model_file`` (:mod:`partialseg.transforms.io.record`), which ``partialseg evaluate`` reads
    to refuse a folder that mixes the predictions of several runs. One instance is one run.

    Args:
        model_file: checkpoint the predictions come from (hashed once, on the first save), or
            ``None`` to record the run id alone.
        run_id: the run id (default: a fresh one per instance).
        args, kwargs: as ``SaveImage`` (``output_dir``, ``output_postfix``, ``output_ext``, ...),
            except ``writer``; ``output_ext`` must be ``.nii.gz`` (default) or ``.nii``.

    Raises:
        ValueError: for another ``output_ext`` or a ``writer`` argument.

    Example:
        >>> import tempfile, torch
        >>> from monai.data import MetaTensor
        >>> from partialseg.transforms.io.record import read_run_record
        >>> out = tempfile.mkdtemp()
        >>> save = SavePrediction(output_dir=out, output_postfix="seg", separate_folder=False,
        ...                       output_dtype=torch.uint8, resample=False, run_id="run-1", print_log=False)
        >>> _ = save(MetaTensor(torch.ones(1, 4, 4, 3), meta={"filename_or_obj": "case_001.nii.gz"}))
        >>> read_run_record(os.path.join(out, "case_001_seg.nii.gz"))["partialseg_run"]
        'run-1'
    """

    def __init__(self, *args: Any, model_file: str | os.PathLike | None = None, run_id: str | None = None, **kwargs: Any) -> None:
        if "writer" in kwargs:
            raise ValueError(f"{type(self).__name__} always writes with AtomicNiftiWriter; drop writer={kwargs['writer']!r}")
        super().__init__(*args, writer=AtomicNiftiWriter, **kwargs)
        _check_nifti(self.output_ext, type(self).__name__)
        self.run = PredictionRun(model_file, run_id)
        self.set_options(init_kwargs={"run": self.run})

    def __call__(self, img: Any, meta_data: dict | None = None, filename: Any = None) -> Any:
        self.run.record  # noqa: B018 - hash the model now: a missing file raises as itself, not inside MONAI's writer loop
        return super().__call__(img, meta_data, filename)
