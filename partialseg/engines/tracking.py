"""Run records for bundles: save the configuration a run executed beside its outputs."""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

from partialseg._fileio import atomic_write_text

__all__ = ["ConfigSaver"]


def _running_parser() -> Any:
    """The ``ConfigParser`` of the MONAI bundle workflow on the call stack (None outside one)."""
    from monai.bundle import ConfigParser, ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigWorkflow):
                return owner.parser
            if isinstance(owner, ConfigParser):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


class ConfigSaver:
    """Write the configuration a bundle run executes to ``output_dir/config_<time>.json``.

    The saved file is what MONAI's ``--tracking`` writes (``save_execute_config``): the merged
    config files with every command-line override applied, plus ``_meta_`` (metadata.json). It is
    taken from the ``ConfigWorkflow`` that builds this handler (found on the call stack when the
    handler is constructed), so it works for ``python -m monai.bundle run`` and ``torchrun``
    without repeating the command line. When ``--tracking`` is on, MONAI already saved the same
    file: nothing is written twice. Written on rank 0 only, when the engine starts.

    Args:
        output_dir: folder of the run's outputs.
        filename: file name; ``{time}`` becomes ``%Y%m%d_%H%M%S`` (a resumed run keeps its
            earlier records).
    """

    rank_zero_only = True

    def __init__(self, output_dir: str | os.PathLike, filename: str = "config_{time}.json") -> None:
        self.output_dir = Path(output_dir)
        self.filename = filename
        parser = _running_parser()
        self.config = None if parser is None else parser.get()
        self.tracked = parser is not None and bool(parser.get("save_execute_config"))
        self.path: Path | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        from partialseg.engines.distributed import get_rank

        if self.config is None or self.tracked or get_rank() != 0 or self.path is not None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / self.filename.format(time=time.strftime("%Y%m%d_%H%M%S"))
        atomic_write_text(self.path, json.dumps(self.config, indent=2, default=str))
