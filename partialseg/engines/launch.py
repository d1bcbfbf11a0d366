"""Command lines that run a bundle with ``python -m monai.bundle run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["bundle_command", "run_bundle"]


def bundle_command(
    bundle: str | os.PathLike, bundle_root: str | os.PathLike, configs: Sequence[str] = ("train.json",), **overrides: Any
) -> list[str]:
    """The ``python -m monai.bundle run`` command for a bundle's configs, with config overrides.

    Args:
        bundle: the bundle folder (holding ``configs/``; ``metadata.json`` and ``logging.conf``
            there are passed when present).
        bundle_root: the run's ``--bundle_root`` (data, models, runs and evaluations go there).
        configs: config files of ``configs/``, layered in this order.
        **overrides: config keys and values; each value is passed as a Python literal, which
            ``fire`` reads back as the same value (``False`` and ``None`` too, which JSON's
            ``false`` / ``null`` are not: fire reads those as strings). Paths become strings,
            numpy scalars and arrays plain numbers and lists.

    Example:
        >>> cmd = bundle_command("bundles/marginal_exclusion_abdomen", "/tmp/run", stage=1)
        >>> cmd[1:4], cmd[-2:]
        (['-m', 'monai.bundle', 'run'], ['--stage', '1'])
        >>> bundle_command("b", "/tmp/run", shuffle=False, ckpt=None, size=(32, 32))[-6:]
        ['--shuffle', 'False', '--ckpt', 'None', '--size', '[32, 32]']
    """
    cfg = Path(bundle) / "configs"
    files = [str(cfg / c) for c in configs]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files) if len(files) > 1 else files[0]]
    if (cfg / "metadata.json").is_file():
        cmd += ["--meta_file", str(cfg / "metadata.json")]
    if (cfg / "logging.conf").is_file():
        cmd += ["--logging_file", str(cfg / "logging.conf")]
    cmd += ["--bundle_root", str(bundle_root)]
    for key, value in overrides.items():
        cmd += [f"--{key}", _literal(value)]
    return cmd


def _literal(value: Any) -> str:
    """``value`` as a Python literal that ``fire`` parses back to it (via JSON's plain types)."""

    def plain(obj: Any) -> Any:
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
            return obj.tolist()
        raise TypeError(f"cannot pass {type(obj).__name__} {obj!r} as a bundle override")

    return repr(json.loads(json.dumps(value, default=plain)))


def run_bundle(
    bundle: str | os.PathLike,
    bundle_root: str | os.PathLike,
    configs: Sequence[str] = ("train.json",),
    threads: int | None = None,
    timeout: float | None = None,
    **overrides: Any,
) -> subprocess.CompletedProcess:
    """Run :func:`bundle_command` in a subprocess and return it with its captured output.

    Args:
        bundle, bundle_root, configs, **overrides: as :func:`bundle_command`.
        threads: ``OMP_NUM_THREADS`` of the run (None: inherited).
        timeout: seconds before the run is killed (``subprocess.TimeoutExpired``).

    Returns:
        The ``CompletedProcess`` (``returncode``, ``stdout``, ``stderr`` as text); it does not raise
        on a failed run.
    """
    env = dict(os.environ) if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = bundle_command(bundle, bundle_root, configs, **overrides)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
