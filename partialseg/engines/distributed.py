"""Helpers for bundles trained with ``torchrun`` (``configs/multi_gpu_train.json``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

# moved to the data layer (it makes a data decision); kept here as a re-export for old configs
from partialseg.data.sampling import SAMPLINGS, training_sampler  # noqa: F401

__all__ = ["get_rank", "rank_zero_only", "quiet_non_zero_ranks", "training_sampler", "RANK_ZERO_HANDLERS"]

#: handler class names that only log or write files: attached on rank 0 only. Every other handler
#: (checkpoint loading, validation, which gathers metrics across ranks, resume, method-specific
#: handlers that change training state) runs on every rank.
RANK_ZERO_HANDLERS = (
    "StatsHandler",
    "TensorBoardStatsHandler",
    "TensorBoardImageHandler",
    "MLFlowHandler",
    "ClearMLStatsHandler",
    "CheckpointSaver",
    "AtomicCheckpointSaver",
    "MetricsRecorder",
    "ProgressBar",
    "ConfigSaver",
)


def get_rank() -> int:
    """The process's rank in the default process group; 0 when no group is initialised."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_zero_only(handlers: Sequence[Any] | None, names: Sequence[str] = RANK_ZERO_HANDLERS) -> list[Any] | None:
    """Drop the logging / file-writing handlers on ranks other than 0.

    A handler is dropped on rank > 0 when its class (or a base class) is named in ``names``, or
    when it has an attribute ``rank_zero_only = True``. Handlers that every rank needs
    (``CheckpointLoader``, ``ValidationHandler``: its metrics are all-gathered,
    :class:`partialseg.engines.ResumeCheckpoint`: every rank loads, rank 0 writes) are kept.

    Args:
        handlers: the handlers of a trainer or evaluator (None stays None).
        names: class names to drop on rank > 0.

    Returns:
        ``handlers`` as a list on rank 0; the filtered list elsewhere.
    """
    if handlers is None:
        return None
    handlers = list(handlers)
    if get_rank() == 0:
        return handlers
    names = set(names)

    def writes(h: Any) -> bool:
        return bool(getattr(h, "rank_zero_only", False)) or any(c.__name__ in names for c in type(h).__mro__)

    kept = []
    for h in handlers:
        if writes(h):
            _discard(h)
        else:
            kept.append(h)
    return kept


def _discard(handler: Any) -> None:
    """Close a dropped handler's own TensorBoard writer and delete the empty event file it opened.

    MONAI's TensorBoard handlers open their ``SummaryWriter`` (and its event file) when constructed,
    before a config can decide not to attach them.
    """
    writer = getattr(handler, "_writer", None) if getattr(handler, "internal_writer", False) else None
    if writer is None:
        return
    path = getattr(getattr(getattr(writer, "file_writer", None), "event_writer", None), "_file_name", None)
    writer.close()
    if path and os.path.isfile(path):
        os.remove(path)


def quiet_non_zero_ranks(level: int = logging.WARNING) -> None:
    """On ranks other than 0, raise the root logger's level (default: warnings and errors only).

    The ignite engines log every epoch from every process; with this in a multi-GPU config's
    ``initialize`` only rank 0 reports progress, while errors still surface from every rank.
    """
    if get_rank() > 0:
        logging.getLogger().setLevel(level)
        for name in ("ignite", "monai"):
            logging.getLogger(name).setLevel(level)
