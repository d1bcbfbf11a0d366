"""The shared trainer of the methods that train several networks with several optimisers.

DCL (PrimNet + a frozen DualNet), DTML (two networks, two optimisers, one loss), hybrid (two
networks + one learnable indicator per weak instance) and atlas (main network, refiner,
discriminator with its own optimiser and alternating updates) all run on
:class:`MultiNetworkTrainer`: a MONAI ``Trainer`` (ignite engine) that keeps its named networks,
named optimisers (one ``GradScaler`` each under AMP), frozen copies and extra state on the engine
state, as MONAI's ``AdversarialTrainer`` keeps its generator and discriminator. A method writes
only its losses: a ``train_step(engine, batch)`` callable, or a subclass overriding
:meth:`MultiNetworkTrainer.train_step`, that computes them and calls
:meth:`MultiNetworkTrainer.update` once per optimiser group. The trainer does the rest:
``prepare_batch`` (MONAI's contract), train / eval modes, autocast, ``zero_grad``, backward,
the (scaled) optimiser steps, MONAI's iteration events, and checkpoints
(:meth:`MultiNetworkTrainer.checkpoint_dict` for MONAI's ``CheckpointSaver`` /
``CheckpointLoader`` and :class:`partialseg.engines.ResumeCheckpoint`).

Events of one iteration, in order (MONAI handlers keep working)::

    prepare_batch -> train_step:  [FORWARD_COMPLETED, fired by the method after its forward]
                                  update(loss, *optimisers):
                                      LOSS_COMPLETED -> zero_grad, backward -> BACKWARD_COMPLETED
                                      -> step(s) -> OPTIMIZER_COMPLETED      (once per update)
                 -> MODEL_COMPLETED (once, when the iteration's output is complete)

``OPTIMIZER_COMPLETED`` is :class:`MultiNetworkEvents` (MONAI 1.6's ``IterationEvents`` has no
such event; its ``MODEL_COMPLETED`` follows the single optimiser step of ``SupervisedTrainer``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> def step(engine, batch):
    ...     image, label = batch
    ...     a, b = engine.networks["a"], engine.networks["b"]
    ...     loss = ((a(image) - label) ** 2).mean() + ((b(image) - a(image).detach()) ** 2).mean()
    ...     engine.update(loss, "opt_a", "opt_b")
    >>> torch.manual_seed(0) and None
    >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    >>> data = [{"image": torch.ones(4, 2), "label": torch.zeros(4, 1)}] * 3
    >>> trainer = MultiNetworkTrainer(
    ...     "cpu", 2, data, networks={"a": a, "b": b},
    ...     optimizers={"opt_a": torch.optim.SGD(a.parameters(), 0.1), "opt_b": torch.optim.SGD(b.parameters(), 0.1)},
    ...     train_step=step, decollate=False)
    >>> trainer.run()
    >>> trainer.state.iteration, sorted(trainer.checkpoint_dict())
    (6, ['a', 'b', 'opt_a', 'opt_b'])
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.engines.workflow import Workflow
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from partialseg._checks import unwrap_network

EventEnum, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum")

__all__ = ["FrozenCopy", "MultiNetworkEvents", "MultiNetworkTrainer", "freeze", "frozen_copy"]

#: checkpoint names a trainer's objects may not take (ResumeCheckpoint saves the engine as "trainer")
RESERVED_NAMES = ("trainer",)


class MultiNetworkEvents(EventEnum):
    """Events :class:`MultiNetworkTrainer` adds to MONAI's ``IterationEvents``.

    ``OPTIMIZER_COMPLETED``: the optimisers of one :meth:`MultiNetworkTrainer.update` have
    stepped (fired once per update, so twice in an iteration that updates a discriminator and
    then a generator); ``engine.state.updated`` names them.
    """

    OPTIMIZER_COMPLETED = "optimizer_completed"


def freeze(network: nn.Module) -> nn.Module:
    """``network`` with no parameter taking gradient, in eval mode (returned for chaining).

    Gradient still flows through its input: a loss on ``network(f(x))`` reaches ``f``.

    Example:
        >>> from torch import nn
        >>> net = freeze(nn.Linear(2, 2))
        >>> net.training, any(p.requires_grad for p in net.parameters())
        (False, False)
    """
    network.requires_grad_(False)
    network.eval()
    return network


def frozen_copy(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` (unwrapped from DDP / DataParallel), frozen (:func:`freeze`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> copy_ = frozen_copy(net)
        >>> x = torch.ones(1, 2, requires_grad=True)
        >>> copy_(x).sum().backward()
        >>> x.grad is not None, copy_.weight.grad is None, net.weight.requires_grad
        (True, True, True)
    """
    return freeze(copy.deepcopy(unwrap_network(network)))


class FrozenCopy:
    """A frozen copy of one of the trainer's networks: made on first use, refreshed on demand.

    DCL's DualNet is one (a copy of PrimNet, refreshed whenever PrimNet reaches its best
    validation score); a mean teacher refreshed every step would be another. The copy is made
    when first asked for (:meth:`get`), that is after checkpoint loaders have run, not when the
    trainer is built. As a checkpointable object (``state_dict`` / ``load_state_dict``) it holds
    ``{"weights": the copy's state dict ({} before the copy exists), "refreshes": a long tensor of
    the trainer iterations at which it was made or refreshed}``, so a resumed run continues with
    the copy it had, not a fresh copy of the resumed source network.

    Args:
        trainer: the :class:`MultiNetworkTrainer`.
        source: the name of the trainer network it copies.
        network: an initial copy (None: made from ``source`` on first use); frozen and moved to
            the trainer's device. It must not be the source network itself.

    Raises:
        TypeError: ``network`` is not an ``nn.Module``.
        ValueError: ``network`` is the source network (freezing it would stop its training).
    """

    #: a checkpoint without this entry is an error (the copy would silently restart)
    optional = False

    def __init__(self, trainer: MultiNetworkTrainer, source: str, network: nn.Module | None = None) -> None:
        self.trainer = trainer
        self.source = source
        self.network: nn.Module | None = None
        self.refreshes: list[int] = []
        if network is not None:
            if not isinstance(network, nn.Module):
                raise TypeError(f"the frozen copy of {source!r} must be an nn.Module or None, got {type(network).__name__}.")
            if network is self._source():
                raise ValueError(f"the frozen copy of {source!r} must be a separate copy of that network (it is frozen); pass None to copy it.")
            self.network = freeze(network).to(trainer.state.device)

    def _source(self) -> nn.Module:
        return unwrap_network(self.trainer.state.networks[self.source])

    def get(self) -> nn.Module:
        """The copy, made (and recorded as a refresh) if it does not exist yet."""
        if self.network is None:
            self.refresh()
        return self.network  # type: ignore[return-value]

    def refresh(self) -> nn.Module:
        """Copy the source network's current weights into the copy (making it if needed)."""
        if self.network is None:
            self.network = frozen_copy(self._source())
        else:
            self.network.load_state_dict(self._source().state_dict())
            freeze(self.network)
        self.refreshes.append(int(self.trainer.state.iteration))
        return self.network

    def state_dict(self) -> dict:
        weights = self.network.state_dict() if self.network is not None else {}
        return {"weights": weights, "refreshes": torch.tensor(self.refreshes, dtype=torch.long)}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("weights"):
            if self.network is None:
                self.network = copy.deepcopy(self._source())
            self.network.load_state_dict(state["weights"])
            freeze(self.network)
        self.refreshes = [int(i) for i in torch.as_tensor(state.get("refreshes", [])).tolist()]


class MultiNetworkTrainer(Trainer):
    """A MONAI ``Trainer`` with named networks, optimisers, frozen copies and extra state.

    Kept on the engine state as MONAI's ``AdversarialTrainer`` keeps its networks:
    ``state.networks`` (name -> module, DDP-wrapped or not), ``state.optimizers`` (name ->
    optimiser), ``state.scalers`` (optimiser name -> ``torch.amp.GradScaler``; empty without
    AMP), ``state.frozen`` (name -> :class:`FrozenCopy`) and ``state.extra`` (name -> any object
    with ``state_dict`` / ``load_state_dict``: per-instance indicators, prototype banks, a loss
    with buffers). Every name is unique across the five; together they are the trainer's
    :meth:`checkpoint_dict`.

    One iteration: ``engine.prepare_batch(batchdata, device, non_blocking, **to_kwargs)`` (MONAI's
    contract: ``default_prepare_batch`` gives ``(image, label)``), every trainable network in
    train mode and every frozen copy in eval mode, ``state.output`` set to ``{}``, then
    :meth:`train_step` under ``torch.autocast(device type, **amp_kwargs)`` when ``amp``; a dict
    it returns is merged into ``state.output``; ``MODEL_COMPLETED`` fires last.

    Args:
        device: the device of the networks and batches.
        max_epochs: epochs to train.
        train_data_loader: the loader (or any iterable of batches).
        networks: name -> network trained by this trainer (at least one).
        optimizers: name -> optimiser (any number, each stepped by :meth:`update`).
        train_step: ``train_step(engine, batch) -> dict | None``, the method's losses and updates
            (None: a subclass overrides :meth:`train_step`).
        frozen: name -> the name of the network it is a frozen copy of (:class:`FrozenCopy`, made
            on first use); or name -> ``(source name, initial copy)``.
        extra_state: name -> object with ``state_dict`` / ``load_state_dict`` to checkpoint.
        epoch_length, non_blocking, prepare_batch, iteration_update, postprocessing,
        key_train_metric, additional_metrics, metric_cmp_fn, train_handlers, event_names,
        event_to_attr, decollate, optim_set_to_none, to_kwargs: as ``monai.engines.AdversarialTrainer``.
        amp: mixed precision: autocast on the device's type (CUDA: float16; CPU: bfloat16) around
            :meth:`train_step`, one ``GradScaler`` per optimiser, backward and steps outside autocast.
        amp_kwargs: arguments of ``torch.autocast`` (e.g. ``{"dtype": torch.bfloat16}``).

    Raises:
        TypeError: a network that is not an ``nn.Module``, an optimiser that is not a
            ``torch.optim.Optimizer``, an extra state without ``state_dict`` / ``load_state_dict``,
            ``train_step`` not callable.
        ValueError: no network, a name used twice or reserved (``"trainer"``), a frozen copy of an
            unknown network.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        networks: Mapping[str, nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        train_step: Callable[[MultiNetworkTrainer, Any], dict | None] | None = None,
        frozen: Mapping[str, str | tuple[str, nn.Module | None]] | None = None,
        extra_state: Mapping[str, Any] | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        if not isinstance(networks, Mapping) or not networks:
            raise ValueError(f"networks must be a non-empty mapping of name -> nn.Module, got {networks!r}.")
        if train_step is not None and not callable(train_step):
            raise TypeError(f"train_step must be callable or None, got {type(train_step).__name__}.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=None,  # attached below, once the networks are on the state
            amp=amp,
            event_names=[*(event_names or []), MultiNetworkEvents],
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.optim_set_to_none = optim_set_to_none
        self._train_step = train_step
        self._names: set[str] = set()
        self.state.networks, self.state.optimizers, self.state.scalers = {}, {}, {}
        self.state.frozen, self.state.extra = {}, {}
        self.state.updated = ()
        for name, net in networks.items():
            self.add_network(name, net)
        for name, opt in (optimizers or {}).items():
            self.add_optimizer(name, opt)
        for name, spec in (frozen or {}).items():
            source, initial = (spec, None) if isinstance(spec, str) else spec
            self.add_frozen_copy(name, source, initial)
        for name, obj in (extra_state or {}).items():
            self.register_state(name, obj)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    # ------------------------------------------------------------------------------ registration

    def _claim(self, name: str, what: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {what} name must be a non-empty string, got {name!r}.")
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is reserved (the engine's own checkpoint entry); name the {what} otherwise.")
        if name in self._names:
            raise ValueError(f"the name {name!r} is already used by this trainer's networks, optimisers or state.")
        self._names.add(name)

    def add_network(self, name: str, network: nn.Module) -> None:
        """Register a trained network (DDP / DataParallel wrappers allowed) under ``name``."""
        if not isinstance(network, nn.Module):
            raise TypeError(f"network {name!r} must be an nn.Module, got {type(network).__name__}.")
        self._claim(name, "network")
        self.state.networks[name] = network

    def add_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Register an optimiser under ``name`` (and, under AMP, its ``GradScaler`` as ``<name>_scaler``)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer {name!r} must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        self._claim(name, "optimizer")
        self.state.optimizers[name] = optimizer
        if self.amp:
            self._claim(f"{name}_scaler", "scaler")
            self.state.scalers[name] = torch.amp.GradScaler(self._device_type())

    def add_frozen_copy(self, name: str, source: str, network: nn.Module | None = None) -> FrozenCopy:
        """Register a :class:`FrozenCopy` of network ``source`` under ``name``."""
        if source not in self.state.networks:
            raise ValueError(f"frozen copy {name!r}: no network named {source!r} (networks: {sorted(self.state.networks)}).")
        self._claim(name, "frozen copy")
        self.state.frozen[name] = FrozenCopy(self, source, network)
        return self.state.frozen[name]

    def register_state(self, name: str, obj: Any) -> None:
        """Register any object with ``state_dict`` / ``load_state_dict`` for checkpoints under ``name``."""
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"extra state {name!r} needs state_dict and load_state_dict, got {type(obj).__name__}.")
        self._claim(name, "state")
        self.state.extra[name] = obj

    @property
    def networks(self) -> dict[str, nn.Module]:
        """``state.networks``: name -> trained network."""
        return self.state.networks

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """``state.optimizers``: name -> optimiser."""
        return self.state.optimizers

    @property
    def scalers(self) -> dict[str, Any]:
        """``state.scalers``: optimiser name -> ``GradScaler`` (empty without AMP)."""
        return self.state.scalers

    def frozen_network(self, name: str) -> nn.Module:
        """The frozen copy ``name`` (made from its source network on first use)."""
        return self.state.frozen[name].get()

    def refresh_frozen(self, name: str) -> nn.Module:
        """Copy the source network's current weights into frozen copy ``name``."""
        return self.state.frozen[name].refresh()

    # ------------------------------------------------------------------------------ checkpoints

    def checkpoint_dict(self) -> dict[str, Any]:
        """Name -> checkpointable object: networks (unwrapped from DDP), optimisers, scalers
        (``<optimiser>_scaler``, AMP only), frozen copies and extra state.

        What MONAI's ``CheckpointSaver`` / ``CheckpointLoader`` take as ``save_dict`` /
        ``load_dict`` and :class:`partialseg.engines.ResumeCheckpoint` as ``save_dict`` (add
        ``"trainer": trainer`` for MONAI's savers to keep the iteration; ResumeCheckpoint adds
        it itself).
        """
        out: dict[str, Any] = {name: unwrap_network(net) for name, net in self.state.networks.items()}
        out.update(self.state.optimizers)
        out.update({f"{name}_scaler": scaler for name, scaler in self.state.scalers.items()})
        out.update(self.state.frozen)
        out.update(self.state.extra)
        return out

    def state_dicts(self) -> dict[str, Any]:
        """``{name: obj.state_dict()}`` of :meth:`checkpoint_dict` (for ``torch.save``)."""
        return {name: obj.state_dict() for name, obj in self.checkpoint_dict().items()}

    def load_state_dicts(self, states: Mapping[str, Any], strict: bool = True) -> None:
        """Load what :meth:`state_dicts` gave into this trainer's objects.

        Raises:
            KeyError: with ``strict``, an object of this trainer without an entry in ``states``,
                or an entry that names none of them.
        """
        objects = self.checkpoint_dict()
        if strict:
            missing, unknown = sorted(set(objects) - set(states)), sorted(set(states) - set(objects))
            if missing or unknown:
                raise KeyError(f"state dicts do not match the trainer: missing {missing}, unknown {unknown}.")
        for name, obj in objects.items():
            if name in states:
                obj.load_state_dict(states[name])

    # ------------------------------------------------------------------------------ iteration

    def _device_type(self) -> str:
        return getattr(self.state.device, "type", None) or "cpu"

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` on the device's type with ``amp_kwargs`` under AMP, else a null context."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type(), **self.amp_kwargs)

    def _optimizers(self, optimizers: Sequence[str | torch.optim.Optimizer]) -> list[tuple[str, torch.optim.Optimizer]]:
        named = self.state.optimizers
        if not optimizers:
            if not named:
                raise ValueError("update() needs an optimiser: this trainer has none.")
            return list(named.items())
        out = []
        for o in optimizers:
            if isinstance(o, str):
                if o not in named:
                    raise ValueError(f"no optimiser named {o!r} (optimisers: {sorted(named)}).")
                out.append((o, named[o]))
            else:
                name = next((k for k, v in named.items() if v is o), None)
                if name is None:
                    raise ValueError(f"the {type(o).__name__} given to update() is not one of this trainer's optimisers {sorted(named)}.")
                out.append((name, o))
        return out

    def update(
        self, loss: torch.Tensor, *optimizers: str | torch.optim.Optimizer, key: str | None = Keys.LOSS, retain_graph: bool = False
    ) -> None:
        """One optimisation step of ``optimizers`` (names or objects; none given: all) on ``loss``.

        Stores ``loss`` as ``state.output[key]`` (unless ``key`` is None), fires
        ``LOSS_COMPLETED``, zeroes the optimisers' gradients (``optim_set_to_none``), runs the
        backward pass (outside autocast; under AMP scaled by the ``GradScaler`` of the first
        optimiser named, which then steps them all and updates once: one scale per backward, as
        PyTorch's AMP recipe for several optimisers on one loss), fires ``BACKWARD_COMPLETED``,
        steps, sets ``state.updated`` to the optimisers' names and fires ``OPTIMIZER_COMPLETED``.

        Gradients reach every parameter the loss depends on; only the named optimisers step and
        only their gradients are zeroed first (an alternating discriminator / generator method
        updates the discriminator, then the generator, each with its own optimiser).

        Raises:
            ValueError: an unknown optimiser, or none at all.
        """
        named = self._optimizers(optimizers)
        if key is not None:
            self.state.output[key] = loss
        self.fire_event(IterationEvents.LOSS_COMPLETED)
        for _, opt in named:
            opt.zero_grad(set_to_none=self.optim_set_to_none)
        scaler = self.state.scalers.get(named[0][0]) if self.amp else None
        with torch.autocast(self._device_type(), enabled=False) if self.amp else contextlib.nullcontext():
            if scaler is not None:
                scaler.scale(loss).backward(retain_graph=retain_graph)
                self.fire_event(IterationEvents.BACKWARD_COMPLETED)
                for _, opt in named:
                    scaler.step(opt)
                scaler.update()
            else:
                loss.backward(retain_graph=retain_graph)
                self.fire_event(IterationEvents.BACKWARD_COMPLETED)
                for _, opt in named:
                    opt.step()
        self.state.updated = tuple(name for name, _ in named)
        self.fire_event(MultiNetworkEvents.OPTIMIZER_COMPLETED)

    def train_step(self, batch: Any) -> dict | None:
        """The method's losses and updates for one prepared ``batch``.

        Override it in a subclass, or pass ``train_step`` to the constructor. It writes what
        handlers read into ``self.state.output`` (``image``, ``label``, ``pred``: the key metric's
        inputs; the loss is written by :meth:`update`), fires ``FORWARD_COMPLETED`` after its
        forward pass if handlers want it, and calls :meth:`update` for each optimiser group. A
        dict it returns is merged into ``state.output``.

        Compute each loss in a function of its own (``self.update(self.compute_loss(...))``):
        intermediate tensors still referenced by ``train_step``'s locals (logits, targets built
        on the fly) would stay alive through the backward pass, raising the peak memory; for
        DCL's stage 2 on CPU that cost 5-9% of the iteration.
        """
        if self._train_step is None:
            raise NotImplementedError(f"{type(self).__name__}: pass train_step= or override train_step().")
        return self._train_step(self, batch)

    def _iteration(self, engine: MultiNetworkTrainer, batchdata: Any) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        for net in engine.state.networks.values():
            net.train()
        for frozen in engine.state.frozen.values():
            if frozen.network is not None:
                frozen.network.eval()
        engine.state.output = {}
        engine.state.updated = ()
        with engine.autocast():
            out = engine.train_step(batch)
        if out:
            engine.state.output.update(out)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def run(self) -> None:  # type: ignore[override]
        """Train (MONAI's ``Workflow.run``; the scalers are this trainer's, kept across runs)."""
        Workflow.run(self)
