"""Optional compiled CPU kernels for the loss hot paths (``losses.c``, loaded with ctypes).

The C source is compiled once per machine with the system C compiler (``$CC``, else ``cc``)
into a cache folder and reused by every later process: ``$PARTIALSEG_CACHE_DIR``, else
``$XDG_CACHE_HOME/partialseg``, else ``~/.cache/partialseg``. The file name carries a hash of
the source, the flags, the compiler and the CPU, so a change to any of them builds a new
library; the build writes a temporary file and renames it, so concurrent processes (torchrun
ranks, pytest workers) never load a half-written library.

Nothing here is required: without a compiler, or with ``PARTIALSEG_NATIVE=0`` in the
environment, :func:`library` returns None (with one warning when a build failed) and the losses
use their pure-torch implementation, which gives the same numbers (tested).

Example:
    >>> from partialseg import _native
    >>> lib = _native.library()  # None when no compiler is available
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["library", "enabled", "cache_dir", "build"]

SOURCE = Path(__file__).with_name("losses.c")
# -fno-math-errno lets gcc call glibc's vector expf / logf / log1pf (libmvec) in the voxel loops;
# -fno-trapping-math lets it turn the masked terms (`k ? a / b : 0`) into vector blends
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=gnu11", "-shared", "-fPIC"]
LIBS = ["-lmvec", "-lm"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    """False when ``PARTIALSEG_NATIVE`` is set to ``0`` / ``false`` / ``no`` / ``off``."""
    return os.environ.get("PARTIALSEG_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Folder holding the compiled libraries (see the module docstring)."""
    if os.environ.get("PARTIALSEG_CACHE_DIR"):
        return Path(os.environ["PARTIALSEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "partialseg"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _library_path(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS + LIBS).encode(), version.encode(), platform.machine().encode(), _cpu_signature().encode()):
        key.update(part)
    return cache_dir() / f"partialseg_losses-{key.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
    """Compile ``losses.c`` (unless already cached) and return the library's path.

    Raises:
        RuntimeError: no C compiler, or the compiler failed (its message is included).
    """
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc); the losses use their torch implementation")
    target = _library_path(cc)
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, *LIBS], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} with {cc} failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.ps_compatible.argtypes = [p, p, i32, p, p, i64, i64, i64, i64, i32, f32, f32, f32, f32, f32, f32, p, p, i32]
    lib.ps_compatible.restype = i32
    lib.ps_marginal_forward.argtypes = [p, p, i32, i64, i64, i64, i32, f32, p, p, p, p, i32]
    lib.ps_marginal_forward.restype = i32
    lib.ps_marginal_backward.argtypes = [p, p, i32, i64, i64, i64, f32, p, p, p, p, i32]
    lib.ps_marginal_backward.restype = i32
    lib.ps_unknown_classes.argtypes = [p, i64, i64, i64, p]
    lib.ps_unknown_classes.restype = None
    lib.ps_unknown_classes_cl.argtypes = [p, i64, i64, i64, p]
    lib.ps_unknown_classes_cl.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None when disabled or unavailable."""
    global _lib, _tried
    if not enabled():
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _declare(ctypes.CDLL(str(build())))
            except (RuntimeError, OSError) as err:
                warnings.warn(f"partialseg: native loss kernels unavailable, using torch ops ({err})", RuntimeWarning, stacklevel=2)
                _lib = None
            _tried = True
    return _lib

