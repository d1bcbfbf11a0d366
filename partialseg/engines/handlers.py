"""Small ignite handlers and config helpers shared by the bundles."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from partialseg._checks import check_int
from partialseg._fileio import atomic_write_text

__all__ = ["MetricsRecorder", "as_bool", "require_checkpoint"]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


def as_bool(value: Any) -> bool:
    """A config flag as a bool, accepting the strings a command line gives.

    ``python -m monai.bundle run ... --resume false`` passes the *string* ``"false"`` (fire reads
    only ``False`` as a bool), which Python treats as true; bundle configs read their flags through
    this function so that ``false``, ``False``, ``0``, ``no`` and ``off`` all mean False.

    Raises:
        ValueError: a string that is not a recognised boolean word (naming it).
    """
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError(f"expected a boolean flag (true/false, 1/0, yes/no, on/off), got {value!r}")
    return bool(value)


def positive_int(value: Any, name: str) -> int:
    """A bundle setting that must be a positive integer (``iterations_per_epoch``, epochs), checked.

    ``--iterations_per_epoch 0`` would let ignite run epochs of no iteration and exit 0 with
    nothing trained; bundle configs pass their schedule through this function so that such a run
    is refused before it starts, naming the key.

    Example:
        >>> positive_int(20, "iterations_per_epoch")
        20

    Raises:
        ValueError: ``value`` is not an integer >= 1 (a bool, a float, 0 or negative), naming ``name``.
    """
    return check_int(value, name, minimum=1)


def require_checkpoint(path: str | os.PathLike, hint: str = "") -> str:
    """Return ``path`` if it is a readable checkpoint, else raise an error naming it (and ``hint``).

    Bundle configs call it where a checkpoint must exist (stage 2 starting from stage 1,
    inference), because MONAI's ``CheckpointLoader`` disabled on a missing file silently loads
    nothing, and on a truncated or corrupt one fails with a bare ``EOFError`` /
    ``PytorchStreamReader failed`` that does not name the file. The file is opened with
    ``torch.load(weights_only=True, mmap=True)`` (tensors mapped, not read:
    :func:`partialseg.engines.checkpoint.read_checkpoint`).

    Args:
        path: the checkpoint file.
        hint: what to do about a missing or unreadable file (which run writes it).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: ``path`` is not a readable checkpoint (truncated, corrupt, not a checkpoint).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (f": {hint}" if hint else ""))
    from partialseg.engines.checkpoint import read_checkpoint

    todo = "replace it with a complete copy, or recreate it" + (f" ({hint})" if hint else "")
    read_checkpoint(path, hint=todo, mmap=True)
    return str(path)


class MetricsRecorder:
    """Record the training loss per iteration and the validation metrics per epoch as JSON.

    Attach it to a trainer (bundle ``train#handlers``), after the ``ValidationHandler`` that runs
    ``validator``, so the validator's ``state.metrics`` are recorded for the epochs it ran. The
    file, rewritten atomically at every epoch end, holds ``{"iteration": [...], "loss": [...], "epoch": [...], "metrics": {name: [...]},
    "epoch_length": N}``:
    what :func:`partialseg.plots.plot_training_curves` draws.

    A resumed run (its first iteration is not 1: a checkpoint was restored) continues the record
    already in ``path``: the entries up to the restored iteration and epoch are kept, later ones
    (written by the interrupted run after its last checkpoint) are dropped, so the file covers the
    whole training without repeating a step. Iterations the interrupted run did not record before
    it stopped stay missing (the record is written at epoch ends).

    Args:
        path: output JSON file (its folder is created when training starts).
        validator: the evaluator whose ``state.metrics`` to record (None: losses only).
    """

    def __init__(self, path: str | os.PathLike, validator: Any = None) -> None:
        self.path = Path(path)
        self.validator = validator
        self.data: dict[str, Any] = {"iteration": [], "loss": [], "epoch": [], "metrics": {}}
        self._first = True

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data["epoch_length"] = int(engine.state.epoch_length or 0)

    def _continue_record(self, iteration: int, epoch: int) -> None:
        """Keep the existing record's entries before ``iteration`` / up to ``epoch`` (a resumed run)."""
        try:
            old = json.loads(self.path.read_text())
            keep = [i for i, it in enumerate(old["iteration"]) if it < iteration]
            kept_epochs = [i for i, ep in enumerate(old["epoch"]) if ep <= epoch]
            self.data["iteration"] = [old["iteration"][i] for i in keep]
            self.data["loss"] = [old["loss"][i] for i in keep]
            self.data["epoch"] = [old["epoch"][i] for i in kept_epochs]
            self.data["metrics"] = {k: [v[i] for i in kept_epochs] for k, v in old["metrics"].items() if len(v) == len(old["epoch"])}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass  # no usable earlier record: this run's record starts here

    def _iteration(self, engine) -> None:
        if self._first:
            self._first = False
            if engine.state.iteration > 1:  # resumed from a checkpoint
                done = engine.state.epoch - 1 if engine.state.epoch_length else 0  # full epochs before this one
                self._continue_record(int(engine.state.iteration), int(done))
        out = engine.state.output
        loss = out[0]["loss"] if isinstance(out, list) else out["loss"] if isinstance(out, dict) else out
        self.data["iteration"].append(int(engine.state.iteration))
        self.data["loss"].append(float(loss))

    def _epoch(self, engine) -> None:
        validator = self.validator
        metrics = dict(getattr(getattr(validator, "state", None), "metrics", {}) or {})
        ran_now = validator is not None and getattr(validator.state, "epoch", None) == engine.state.epoch
        if metrics and ran_now:
            self.data["epoch"].append(int(engine.state.epoch))
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.data["metrics"].setdefault(name, []).append(float(value))
        atomic_write_text(self.path, json.dumps(self.data))
