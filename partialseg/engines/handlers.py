"""Small ignite handlers and config helpers shared by the bundles."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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


def require_checkpoint(path: str | os.PathLike, hint: str = "") -> str:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` naming it (and ``hint``).

    Bundle configs call it where a checkpoint must exist (stage 2 starting from stage 1, inference),
    because MONAI's ``CheckpointLoader`` disabled on a missing file silently loads nothing.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (f": {hint}" if hint else ""))
    return str(path)


class MetricsRecorder:
    """Record the training loss per iteration and the validation metrics per epoch as JSON.

    Attach it to a trainer (bundle ``train#handlers``), after the ``ValidationHandler`` that runs
    ``validator``, so the validator's ``state.metrics`` are recorded for the epochs it ran. The
    file, rewritten atomically at every epoch end, holds ``{"iteration": [...], "loss": [...], "epoch": [...], "metrics": {name: [...]},
    "epoch_length": N}``:
    what :func:`partialseg.plots.plot_training_curves` draws.

    Args:
        path: output JSON file (its folder is created when training starts).
        validator: the evaluator whose ``state.metrics`` to record (None: losses only).
    """

    def __init__(self, path: str | os.PathLike, validator: Any = None) -> None:
        self.path = Path(path)
        self.validator = validator
        self.data: dict[str, Any] = {"iteration": [], "loss": [], "epoch": [], "metrics": {}}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data["epoch_length"] = int(engine.state.epoch_length or 0)

    def _iteration(self, engine) -> None:
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
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)
