"""Which inference run wrote a prediction: a run id and the model's hash in the NIfTI header.

Every prediction that :class:`~partialseg.transforms.SavePredictiond` writes carries a *run
record*: a NIfTI-1 header extension of code 6 (``NIFTI_ECODE_COMMENT``, free text, ignored by
every reader that does not look for it) holding one line of JSON::

    {"partialseg_run": "20261203T171500Z-1f2e3d4c", "model_sha256": "9c1f...", "model": "model.pt"}

``partialseg_run`` is the run id (UTC start time and 8 random hex digits; one per saving
transform, so one per ``monai.bundle run``), ``model_sha256`` the SHA-256 of the checkpoint
file (read once per run, ``null`` when the run was given no model file) and ``model`` its file
name. The header's ``descrip`` field also says ``partialseg run <id>`` for people reading it
with ``fslhd`` or ITK-SNAP; the extension is what :func:`read_run_record` reads.

``partialseg evaluate`` reads the records of the predictions it scores and refuses a folder whose
predictions come from more than one run (``docs/evaluation.md``). Files written by other tools
have no record (:func:`read_run_record` gives ``None``) and are evaluated as before.

Only the standard library is imported at module level (nibabel inside :func:`read_run_record`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RUN_RECORD_ECODE", "PredictionRun", "file_sha256", "new_run_id", "read_run_record"]

#: NIfTI-1 extension code of the record: ``NIFTI_ECODE_COMMENT`` (plain text)
RUN_RECORD_ECODE = 6
#: the key that marks an extension as a partialseg run record
RUN_KEY = "partialseg_run"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def new_run_id() -> str:
    """A fresh run id: the UTC time and 8 random hex digits, e.g. ``20261203T171500Z-1f2e3d4c``.

    Example:
        >>> run = new_run_id()
        >>> len(run), run[8], run[15:17]
        (25, 'T', 'Z-')
    """
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, as 64 hex digits, read in chunks of ``chunk_size`` bytes.

    Raises:
        FileNotFoundError: naming the file, when it does not exist.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "model.pt"
        >>> _ = path.write_bytes(b"abc")
        >>> file_sha256(path)[:16]
        'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(chunk_size), b""):
                digest.update(block)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: the model file to record in the predictions does not exist") from e
    return digest.hexdigest()


class PredictionRun:
    """The record of one inference run: a run id and the SHA-256 of the model file.

    The hash is computed on first use (:attr:`record`), once per run: after the bundle's
    ``CheckpointLoader`` has loaded the same file, so a missing checkpoint fails first with the
    bundle's own message.

    Args:
        model_file: the checkpoint the run's predictions come from, or ``None`` (no hash recorded).
        run_id: the run id; default :func:`new_run_id`. Give one id to every process of a
            distributed inference so that their predictions form one run.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "model.pt"
        >>> _ = path.write_bytes(b"abc")
        >>> run = PredictionRun(path, run_id="run-1")
        >>> run.record["partialseg_run"], run.record["model_sha256"][:8], run.record["model"]
        ('run-1', 'ba7816bf', 'model.pt')
        >>> run.descrip
        'partialseg run run-1'
    """

    def __init__(self, model_file: str | os.PathLike | None = None, run_id: str | None = None) -> None:
        if run_id is not None and (not isinstance(run_id, str) or not run_id or len(run_id) > 64 or not run_id.isprintable()):
            raise ValueError(f"run_id must be a non-empty printable string of at most 64 characters, got {run_id!r}")
        if model_file is not None and not isinstance(model_file, (str, os.PathLike)):
            raise TypeError(f"model_file must be a path or None, got {type(model_file).__name__} {model_file!r}")
        self.model_file = None if model_file is None else Path(model_file)
        self.run_id = run_id or new_run_id()
        self._record: dict[str, Any] | None = None

    @property
    def record(self) -> dict[str, Any]:
        """``{"partialseg_run", "model_sha256", "model"}``; the model file is hashed on the first call only."""
        if self._record is None:
            sha = None if self.model_file is None else file_sha256(self.model_file)
            name = None if self.model_file is None else self.model_file.name
            self._record = {RUN_KEY: self.run_id, "model_sha256": sha, "model": name}
        return dict(self._record)

    @property
    def descrip(self) -> str:
        """The NIfTI ``descrip`` text (at most 80 bytes): ``partialseg run <id>``."""
        return f"partialseg run {self.run_id}"[:80]

    def stamp(self, header: Any) -> None:
        """Write the record into a ``nibabel.Nifti1Header`` (extension and ``descrip``), replacing an older one."""
        import nibabel as nib

        extensions = header.extensions
        for ext in [e for e in extensions if _parse(e) is not None]:
            extensions.remove(ext)
        content = json.dumps(self.record, sort_keys=True).encode()
        extensions.append(nib.nifti1.Nifti1Extension(RUN_RECORD_ECODE, content))
        header["descrip"] = self.descrip.encode()

    def __repr__(self) -> str:
        return f"PredictionRun(model_file={str(self.model_file) if self.model_file else None!r}, run_id={self.run_id!r})"


def _parse(extension: Any) -> dict[str, Any] | None:
    if extension.get_code() != RUN_RECORD_ECODE:
        return None
    raw = extension.get_content()
    try:
        value = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, ValueError):
        return None  # another tool's comment
    return value if isinstance(value, Mapping) and isinstance(value.get(RUN_KEY), str) else None


def read_run_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The run record of a prediction file, or ``None`` for a file without one.

    Only the header is read. Files that are not NIfTI (``.nii``, ``.nii.gz``, any case) and NIfTI
    files written by other tools have no record.

    Raises:
        ValueError: naming the file, when its NIfTI header cannot be read.

    Example:
        >>> import tempfile, numpy as np, nibabel as nib
        >>> img = nib.Nifti1Image(np.zeros((2, 2), np.uint8), np.eye(4))
        >>> PredictionRun(run_id="run-1").stamp(img.header)
        >>> path = Path(tempfile.mkdtemp()) / "c1_seg.nii.gz"
        >>> nib.save(img, path)
        >>> read_run_record(path)
        {'model': None, 'model_sha256': None, 'partialseg_run': 'run-1'}
        >>> nib.save(nib.Nifti1Image(np.zeros((2, 2), np.uint8), np.eye(4)), path)
        >>> read_run_record(path) is None
        True
    """
    name = Path(path).name.lower()
    if not name.endswith(_NIFTI_SUFFIXES):
        return None
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
    except Exception as e:  # noqa: BLE001 - nibabel's errors vary by failure; one message naming the file
        raise ValueError(f"{path}: cannot read the NIfTI header ({type(e).__name__}: {e})") from e
    for extension in getattr(header, "extensions", ()):
        record = _parse(extension)
        if record is not None:
            return dict(sorted(record.items()))
    return None
