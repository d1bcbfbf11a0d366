"""Atomic checkpoints and resumable training for the bundles.

A training killed at any moment (SIGKILL, a pre-empted node) leaves every checkpoint file either
complete or as it was: files are written to a temporary file in the same folder, flushed to disk
and moved into place with ``os.replace`` (atomic on POSIX). Rerunning the same command resumes from
the last :class:`ResumeCheckpoint`.

Example (a bundle's ``train#handlers``)::

    {"_target_": "partialseg.engines.ResumeCheckpoint",
     "path": "$@output_dir + '/checkpoint.pt'",
     "save_dict": {"network": "@network", "optimizer": "@optimizer"},
     "interval": 20}
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from monai.handlers import CheckpointSaver

from partialseg._checks import check_int, unwrap_network
from partialseg._fileio import atomic_open, remove_stale_temporaries
from partialseg.engines.distributed import get_rank

__all__ = [
    "AtomicCheckpointSaver",
    "CLASSES_KEY",
    "ClassNamedModel",
    "ResumeCheckpoint",
    "atomic_save",
    "checkpoint_classes",
    "read_checkpoint",
    "require_classes",
    "with_classes",
]

logger = logging.getLogger(__name__)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``.

    A process killed while saving leaves ``path`` as it was (a stray ``.<name>.*.tmp`` at worst,
    never a truncated checkpoint). The file gets the permissions a plain ``torch.save`` would give.
    """
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", hint: str = "", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with an error that names the file and what to do.

    ``torch.load`` reports a truncated or corrupt file (a run killed while a non-atomic writer
    saved it, a partial copy) as a bare ``EOFError`` / ``PytorchStreamReader failed reading zip
    archive``, without the path; this raises a ``RuntimeError`` naming ``path``, the reader's
    error and ``hint`` (what to do: which run recreates the file).

    Args:
        path: the checkpoint file.
        map_location: ``torch.load``'s ``map_location``.
        hint: what to do about an unreadable file (default: replace it or train again).
        mmap: map the tensors instead of reading them (cheap check of a large file; torch's zip
            format only, a legacy file is read in full).

    Raises:
        FileNotFoundError: ``path`` does not exist (naming it).
        RuntimeError: ``path`` cannot be read as a checkpoint (naming it).

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save({"w": torch.ones(2)}, d + "/ok.pt")
        ...     read_checkpoint(d + "/ok.pt")["w"].tolist()
        [1.0, 1.0]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (f": {hint}" if hint else ""))
    if mmap:
        import zipfile

        mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - name the file whatever the reader's error
        todo = hint or "replace it with a complete copy, or delete it and train again"
        raise RuntimeError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}): the file is incomplete or corrupt"
            f" (a run killed while saving it, or a partial copy); {todo}"
        ) from e


class ResumeCheckpoint:
    """Save the training state every ``interval`` iterations; resume from it when training starts.

    The checkpoint holds the trainer's state (epoch, iteration) under ``"trainer"`` and every object
    of ``save_dict`` (network, optimizer, LR scheduler: anything with ``state_dict``). On
    ``STARTED`` an existing ``path`` is loaded into all of them, so rerunning a killed training
    with the same command continues at the iteration it last saved (and the temporary file of a
    write the kill interrupted, if any, is deleted). Attach it **after** any
    ``CheckpointLoader`` that initialises the network (e.g. stage 2 from stage 1): both run on
    ``STARTED`` in attachment order, so the resumed state takes precedence.

    Under ``torchrun`` every rank loads; only rank 0 writes. Writes are atomic (:func:`atomic_save`).

    Args:
        path: the checkpoint file.
        save_dict: name -> object with ``state_dict`` / ``load_state_dict``; DDP / DataParallel
            wrappers are unwrapped, so a checkpoint from one process resumes under torchrun and back.
            A :class:`~partialseg.engines.MultiNetworkTrainer` gives its networks, optimisers,
            scalers, frozen copies and extra state as ``trainer.checkpoint_dict()`` (the DCL
            bundle: ``dict(@train#trainer.checkpoint_dict(), best=BestMetricState(...))``).
        interval: save every this many iterations; the final state is saved on ``COMPLETED`` too.
            A save that falls on an epoch's last iteration waits for the end of that epoch's
            ``EPOCH_COMPLETED`` handlers, so the validation they run (and the best metric it
            records, :class:`BestMetricState`) is part of it: a resume never repeats, nor
            forgets, a validation.
        enabled: False (``--resume false``): start afresh; an existing checkpoint is moved aside
            to ``<name>.previous<suffix>`` (so a later resumed run cannot continue that older
            run), and this run saves as usual, so it can be resumed in turn.
        map_location: ``torch.load``'s ``map_location`` (default: CPU, then ``load_state_dict`` moves).

    Raises:
        TypeError: ``interval`` is not an int.
        ValueError: ``interval`` < 1; at start, the checkpoint's epoch exceeds the trainer's
            ``max_epochs`` (it belongs to a longer run).
        RuntimeError: at start, ``path`` exists but cannot be read (the message names it and
            says to delete it or pass ``--resume false``: :func:`read_checkpoint`).
    """

    def __init__(
        self, path: str | os.PathLike, save_dict: dict[str, Any], interval: int = 20, enabled: bool = True, map_location: Any = "cpu"
    ) -> None:
        interval = check_int(interval, "interval", minimum=1)
        if not save_dict:
            raise ValueError("save_dict must name at least one object to save")
        self.path = Path(path)
        self.save_dict = dict(save_dict)
        self.interval = int(interval)
        self.enabled = bool(enabled)
        self.map_location = map_location
        self.resumed_from: int | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.load if self.enabled else self.discard)
        engine.add_event_handler(Events.STARTED, self._attach_epoch_end)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self._save_within_epoch)
        engine.add_event_handler(Events.COMPLETED, self.save)

    @staticmethod
    def _at_epoch_end(engine) -> bool:
        length = engine.state.epoch_length
        return bool(length) and engine.state.iteration % length == 0

    def _save_within_epoch(self, engine) -> None:
        if not self._at_epoch_end(engine):  # an epoch's last iteration is saved after its handlers
            self.save(engine)

    def _attach_epoch_end(self, engine) -> None:
        # registered when the run starts, so it comes after every EPOCH_COMPLETED handler
        # attached before (MONAI's ValidationHandler, DCL's DualNet refresh)
        from ignite.engine import Events

        if not engine.has_event_handler(self._save_at_epoch_end, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._save_at_epoch_end)

    def _save_at_epoch_end(self, engine) -> None:
        if engine.state.iteration % self.interval == 0:
            self.save(engine)

    def discard(self, engine) -> None:
        """``--resume false``: move an existing checkpoint aside (rank 0), so this run starts afresh."""
        if get_rank() != 0 or not self.path.is_file():
            return
        previous = self.path.with_name(f"{self.path.stem}.previous{self.path.suffix}")
        os.replace(self.path, previous)
        msg = f"resume disabled: {self.path} (an earlier run's state) moved to {previous.name}; starting afresh"
        (engine.logger if hasattr(engine, "logger") else logger).info(msg)

    def _objects(self, engine) -> dict[str, Any]:
        return {"trainer": engine, **{k: unwrap_network(v) for k, v in self.save_dict.items()}}

    def save(self, engine) -> None:
        if get_rank() != 0:
            return
        atomic_save({k: v.state_dict() for k, v in self._objects(engine).items()}, self.path)

    def load(self, engine) -> None:
        if get_rank() == 0:  # temporaries of writes a kill interrupted (the checkpoint itself is intact)
            remove_stale_temporaries(self.path)
        if not self.path.is_file():
            return
        checkpoint = read_checkpoint(
            self.path, self.map_location, hint="cannot resume from it: delete it (or rerun with --resume false) to start afresh"
        )
        max_epochs = engine.state.max_epochs
        for name, obj in self._objects(engine).items():
            if name not in checkpoint:
                if getattr(obj, "optional", False):  # e.g. a checkpoint written before it was saved
                    logger.warning(f"{self.path} has no {name!r} state; {type(obj).__name__} starts afresh")
                    continue
                raise RuntimeError(f"{self.path} has no {name!r} state (it holds {sorted(checkpoint)})")
            obj.load_state_dict(checkpoint[name])
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise ValueError(f"{self.path} is at epoch {engine.state.epoch}, beyond max_epochs={max_epochs}")
        engine.state.max_epochs = max_epochs
        self.resumed_from = int(engine.state.iteration)
        msg = f"resuming from {self.path} after iteration {engine.state.iteration} ({engine.state.epoch} full epochs)"
        (engine.logger if hasattr(engine, "logger") else logger).info(msg)


class BestMetricState:
    """The validation's best-metric bookkeeping as a checkpointable object, for resumed runs.

    Without it a resumed training forgets its best validation score: the first validation after
    the resume counts as an improvement, so the key-metric checkpoint (``model.pt``) is
    overwritten by a possibly worse model and DCL's DualNet is refreshed from it. Put
    ``BestMetricState(evaluator, saver)`` in a :class:`ResumeCheckpoint`'s ``save_dict``: it
    saves and restores the evaluator's ``best_metric`` / ``best_metric_epoch`` and the
    ``(score, file)`` record of the saver's key-metric checkpoint (ignite's ``Checkpoint``
    state), so only a validation that beats the restored best writes ``model.pt`` again.

    Args:
        evaluator: the MONAI evaluator whose ``state.best_metric`` tracks the key metric.
        saver: the MONAI ``CheckpointSaver`` (or :class:`AtomicCheckpointSaver`) with
            ``save_key_metric=True`` attached to that evaluator, or None.
    """

    #: a checkpoint without this entry (written before it existed) still resumes, with a warning
    optional = True

    def __init__(self, evaluator: Any, saver: Any = None) -> None:
        if not hasattr(evaluator, "state"):
            raise TypeError(f"evaluator must be an ignite / MONAI engine with a state, got {type(evaluator).__name__}")
        self.evaluator = evaluator
        self.saver = saver

    def _key_checkpoint(self):
        return getattr(self.saver, "_key_metric_checkpoint", None) if self.saver is not None else None

    def state_dict(self) -> dict:
        s = self.evaluator.state
        out = {"best_metric": float(getattr(s, "best_metric", -1)), "best_metric_epoch": int(getattr(s, "best_metric_epoch", -1))}
        ckpt = self._key_checkpoint()
        if ckpt is not None:
            out["key_metric_saved"] = [(float(p), str(f)) for p, f in ckpt._saved]
        return out

    def load_state_dict(self, state: dict) -> None:
        s = self.evaluator.state
        s.best_metric = float(state["best_metric"])
        s.best_metric_epoch = int(state["best_metric_epoch"])
        ckpt = self._key_checkpoint()
        if ckpt is not None and "key_metric_saved" in state:
            ckpt.load_state_dict({"_saved": [(float(p), str(f)) for p, f in state["key_metric_saved"]]})


# ----------------------------------------------------------------------------------------------
# the class names a model predicts, stored in its checkpoint

#: where a saved state dict keeps the class names: its root entry of torch's ``_metadata``
#: (the per-module bookkeeping ``state_dict()`` attaches and ``torch.save`` / ``torch.load``,
#: ``weights_only`` included, keep), so the checkpoint stays a plain state dict for every reader
CLASSES_KEY = "partialseg_classes"


def with_classes(state_dict: Any, classes: Any) -> Any:
    """``state_dict`` with ``classes`` (names, index 0 first) recorded in its metadata.

    The tensors are untouched: ``load_state_dict`` (strict), MONAI's ``CheckpointLoader``,
    ``ckpt_export`` and MONAI Label read the file as before; :func:`checkpoint_classes` reads the
    names back. A plain ``dict`` is turned into an ``OrderedDict`` (only that carries metadata).

    Example:
        >>> import io, torch
        >>> sd = with_classes(torch.nn.Linear(2, 3).state_dict(), ["background", "liver", "kidney"])
        >>> buffer = io.BytesIO(); torch.save(sd, buffer); _ = buffer.seek(0)
        >>> checkpoint_classes(torch.load(buffer, weights_only=True))
        ['background', 'liver', 'kidney']
    """
    from collections import OrderedDict

    if not isinstance(state_dict, OrderedDict):
        state_dict = OrderedDict(state_dict)
    meta = getattr(state_dict, "_metadata", None)
    if meta is None:
        meta = OrderedDict()
        state_dict._metadata = meta  # type: ignore[attr-defined]
    meta[""] = {**meta.get("", {}), CLASSES_KEY: [str(c) for c in classes]}
    return state_dict


def checkpoint_classes(checkpoint: Any) -> list[str] | None:
    """The class names stored in a checkpoint (a path or what ``torch.load`` returned), or None.

    Looks in the state dict's metadata (:func:`with_classes`), then in that of each entry of a
    checkpoint holding several objects (``{"model": state_dict, ...}``). None for a checkpoint
    saved without names (before they were recorded, or by another tool).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint, mmap=True)
    candidates = [checkpoint]
    if isinstance(checkpoint, dict):
        candidates += [v for v in checkpoint.values() if isinstance(v, dict)]
    for state in candidates:
        names = (getattr(state, "_metadata", None) or {}).get("", {}).get(CLASSES_KEY)
        if names is not None:
            return [str(c) for c in names]
    return None


def require_classes(path: str | os.PathLike, classes: Any, hint: str = "", dataset: Any = None) -> str:
    """Return ``path`` if the model saved there predicts ``classes``; refuse a model of other classes.

    Bundle configs wrap the checkpoint a run loads (inference, evaluation, stage 2 from stage 1,
    a MONAI Label fine-tune) in it, after :func:`partialseg.engines.require_checkpoint`, so that a
    checkpoint trained on other classes is refused before any prediction or training, instead of
    silently writing indices that mean other structures. A checkpoint saved without class names
    (before they were recorded) loads with a note on stderr.

    Args:
        path: the checkpoint file.
        classes: the class names the run expects (the dataset's ``dataset.json``), or None / empty:
            nothing to compare (a served bundle without a dataset).
        hint: what to do (the flags that change the checkpoint or the dataset).
        dataset: the dataset the names come from, for the message.

    Raises:
        ValueError: the checkpoint's class names differ from ``classes``; the message names both
            lists, the checkpoint, the dataset and ``hint``.

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/model.pt"
        >>> torch.save(with_classes(torch.nn.Linear(2, 2).state_dict(), ["background", "LV"]), path)
        >>> require_classes(path, ["background", "LV"]) == path
        True
        >>> require_classes(path, ["background", "RV"], "pass --checkpoint")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: checkpoint ... was trained on classes ['background', 'LV'] but the dataset lists ['background', 'RV']...
    """
    import sys

    if not classes:
        return str(path)
    expected = [str(c) for c in classes]
    saved = checkpoint_classes(path)
    where = f"the dataset {dataset}" if dataset is not None else "the dataset"
    if saved is None:
        print(f"partialseg: note: checkpoint {path} stores no class names (saved before they were recorded): cannot check that"
              f" it predicts {where}'s classes {expected}", file=sys.stderr)  # fmt: skip
    elif saved != expected:
        raise ValueError(f"checkpoint {path} was trained on classes {saved} but {where} lists {expected}: output channel i of the"
                         " model means its class i, so its predictions would name other structures" + (f"; {hint}" if hint else ""))  # fmt: skip
    return str(path)


class ClassNamedModel:
    """A ``CheckpointSaver`` entry that saves ``network``'s weights with the class names it predicts.

    ``state_dict()`` is the (DDP / DataParallel-unwrapped) network's, with ``classes`` in its
    metadata (:func:`with_classes`); ``load_state_dict`` loads into the network. Bundles get it
    through :class:`AtomicCheckpointSaver`'s ``classes`` argument.
    """

    def __init__(self, network: Any, classes: Any) -> None:
        if not hasattr(network, "state_dict"):
            raise TypeError(f"network must be a torch module, got {type(network).__name__}")
        self.network = network
        self.classes = [str(c) for c in classes]

    def state_dict(self) -> Any:
        return with_classes(unwrap_network(self.network).state_dict(), self.classes)

    def load_state_dict(self, state: Any, strict: bool = True) -> Any:
        return unwrap_network(self.network).load_state_dict(state, strict=strict)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` with atomic writes, and the class names in the saved model.

    MONAI 1.6 builds its ignite ``DiskSaver`` with ``atomic=False`` (its comment: atomic files used
    to be readable by their owner only; ignite 0.5 now adds group/other read after the move), so a
    kill during ``torch.save`` leaves a truncated checkpoint. This subclass switches the savers back
    to ignite's atomic mode: a temporary file in the same folder, then ``os.replace``. Arguments as
    ``CheckpointSaver``; under DDP ignite writes on rank 0 only.

    Args:
        classes: the class names the networks of ``save_dict`` predict (the dataset's, index 0
            first), or None. Given, every torch module of ``save_dict`` is saved with them
            (:class:`ClassNamedModel`): the file is still a plain state dict, and
            :func:`require_classes` refuses it where a dataset of other classes loads it.
    """

    def __init__(self, *args: Any, classes: Any = None, **kwargs: Any) -> None:
        if classes is not None:
            key = "save_dict" if "save_dict" in kwargs else None
            save_dict = kwargs[key] if key else args[1]
            named = {k: ClassNamedModel(v, classes) if isinstance(v, torch.nn.Module) else v for k, v in save_dict.items()}
            if key:
                kwargs[key] = named
            else:
                args = (args[0], named, *args[2:])
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler._atomic = True
