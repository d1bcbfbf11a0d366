"""Atomic file writes, shared by every part of partialseg that writes a file others read.

A reader (another process, a resumed run, a MONAI Label infer request) sees the old file or the
new one, never a partial one: the content goes to a temporary file in the same folder
(``.<name>.*.tmp``), is flushed to disk, gets the mode a plain ``open`` would give, and is moved
over the target with ``os.replace`` (atomic on POSIX). On any failure, or a kill before the
rename, the target is left as it was and the temporary file is removed (a SIGKILL can leave one,
which :func:`remove_stale_temporaries` deletes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write_text", "atomic_copy", "remove_stale_temporaries"]


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic across threads)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` for writing, made atomic (see the module docstring).

    Example:
        >>> import json, tempfile
        >>> target = Path(tempfile.mkdtemp()) / "summary.json"
        >>> with atomic_open(target) as f:
        ...     json.dump({"dice": 0.9}, f)
        >>> json.loads(target.read_text())
        {'dice': 0.9}
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(text)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` over ``dst`` atomically (a reader of ``dst`` never sees a partial copy)."""
    with open(src, "rb") as source, atomic_open(dst, "wb") as target:
        shutil.copyfileobj(source, target)


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete the temporary files that killed writes of ``path`` left beside it."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
