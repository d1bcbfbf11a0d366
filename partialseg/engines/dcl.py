"""Deep Compatible Learning trainer (Zhang & Zhuang, DCL, Algorithm 1).

Stage 1 (``lambda_dual=0``) trains PrimNet (a :class:`~partialseg.networks.CompNet`) on the
conditional compatible loss ``L_cc`` (Eq. 8). Stage 2 (``lambda_dual=0.2`` in the paper) adds
the dual task: per iteration a random class ``c_s``; DualNet, a frozen copy of PrimNet, segments
the ``c_s`` conditional image with the primal target as its ``c_s`` condition, labelled by
PrimNet's prediction (section 3.3.2, Eq. 9-10). The loss ``(1 - lambda) L_prim + lambda L_dual``
reaches PrimNet only: DualNet's parameters take no gradient, ``L_dual`` flows back through
DualNet's input into PrimNet's prediction (the closed loop ``D(P(y^{c_s}))`` of Eq. 9).
:class:`DualNetworkUpdater` copies PrimNet into DualNet whenever the validation metric improves.

Hyperparameters (``lambda_dual``, the loss and its bases, the optimiser and its learning rate:
1e-2 in stage 1, 1e-4 in stage 2) are constructor arguments, set from bundle configs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer, SimpleInferer
from monai.utils import CommonKeys as Keys
from monai.utils import min_version, optional_import
from torch import Tensor, nn

from partialseg._checks import check_float, check_int, unwrap_network
from partialseg.engines.multi_network import MultiNetworkTrainer
from partialseg.networks.dcl import compnet_segment, pack_conditional_input
from partialseg.transforms.dcl.array import conditional_supervision, label_view

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

__all__ = ["DCLBatch", "DCLTrainer", "DualNetworkUpdater", "argmax_is", "dual_swap"]


def argmax_is(probs: Tensor, s: int) -> Tensor:
    """``probs.argmax(1, keepdim=True) == s`` (ties go to the first index, as ``argmax``), fast.

    ``argmax`` over the channel dimension of a ``(B, m, *spatial)`` tensor is a slow strided
    reduction on CPU (about 9 ms for ``(8, 4, 96, 96)``); ``m - 1`` element-wise comparisons of
    channel ``s`` with the others take a few hundred microseconds.

    Example:
        >>> import torch
        >>> argmax_is(torch.tensor([[[0.2], [0.5], [0.5]]]), 1).flatten().tolist()
        [True]
    """
    ps = probs[:, s : s + 1]
    hard = torch.ones_like(ps, dtype=torch.bool)
    for j in range(probs.shape[1]):
        if j != s:
            hard &= (ps > probs[:, j : j + 1]) if j < s else (ps >= probs[:, j : j + 1])
    return hard


def dual_swap(
    image: Tensor,
    cond_image: Tensor,
    cond_label: Tensor,
    prim_pred: Tensor,
    s: int,
    p: float = 0.5,
) -> dict[str, Tensor]:
    """The dual task of DCL section 3.3.2 for selected class ``s``.

    - dual target image ``x_d^t = x_p^{c_s}`` (the ``c_s`` conditional image);
    - dual target label ``y_d^t``: the ``<0,p,1>`` map of the ``c_s`` conditional case, which
      annotates ``s``: channel ``s`` is its conditional label, every other channel 0 inside
      class ``s`` and ``p`` outside (:func:`~partialseg.transforms.label_view`);
    - dual conditions: the primal ones, with the ``c_s`` pair replaced by the primal target
      image and PrimNet's prediction of class ``s`` on it, ``P(y^{c_s})`` of Eq. 9:
      ``cond_label`` (the network input) holds the probability, so ``L_dual`` reaches PrimNet
      through it; ``cond_label_hard`` holds ``argmax == s`` (detached), the label that
      ``z_d = g(y_d^t, y_d^c)`` and the prior loss read.

    Args:
        image: ``(B, C, *spatial)`` primal target images.
        cond_image: ``(B, m * C, *spatial)`` primal conditional images.
        cond_label: ``(B, m, *spatial)`` primal conditional labels.
        prim_pred: ``(B, m, *spatial)`` PrimNet's class probabilities on the primal target.
        s: the selected class.
        p: value of unknown entries.

    Returns:
        dict with ``image``, ``label``, ``cond_image``, ``cond_label``, ``cond_label_hard``.

    Example:
        >>> import torch
        >>> img = torch.zeros(1, 1, 1, 2); cimg = torch.tensor([[[[1.0, 1.0]], [[2.0, 2.0]]]])
        >>> clab = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
        >>> pred = torch.tensor([[[[0.9, 0.3]], [[0.1, 0.7]]]])
        >>> d = dual_swap(img, cimg, clab, pred, s=1)
        >>> d["image"].flatten().tolist(), d["label"].flatten().tolist()
        ([2.0, 2.0], [0.5, 0.0, 0.0, 1.0])
        >>> d["cond_image"].flatten().tolist(), d["cond_label"].flatten().tolist(), d["cond_label_hard"].flatten().tolist()
        ([1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.10000000149011612, 0.699999988079071], [1.0, 0.0, 0.0, 1.0])
    """
    c, m = image.shape[1], cond_label.shape[1]
    if not 0 <= s < m:
        raise ValueError(f"selected class s={s} is outside [0, {m}).")
    if prim_pred.shape != cond_label.shape:
        raise ValueError(f"prim_pred {tuple(prim_pred.shape)} must match cond_label {tuple(cond_label.shape)}.")
    lo, hi = s * c, (s + 1) * c
    hard = argmax_is(prim_pred.detach(), s).to(cond_label.dtype)
    return {
        "image": cond_image[:, lo:hi],
        "label": label_view(cond_label, [s], p, channel_dim=1),
        "cond_image": torch.cat([cond_image[:, :lo], image.to(cond_image.dtype), cond_image[:, hi:]], 1),
        "cond_label": torch.cat([cond_label[:, :s], prim_pred[:, s : s + 1].to(cond_label.dtype), cond_label[:, s + 1 :]], 1),
        "cond_label_hard": torch.cat([cond_label[:, :s], hard, cond_label[:, s + 1 :]], 1),
    }


class DCLBatch:
    """``prepare_batch`` of :class:`DCLTrainer`: the four tensors of a conditional batch on the device.

    Args:
        keys: the batch keys of the target image, its ``<0,p,1>`` map, the conditional images
            and the conditional labels (as :class:`~partialseg.data.dcl.ConditionalDataset` names them).

    Example:
        >>> import torch
        >>> prepare = DCLBatch(("image", "label", "cond_image", "cond_label"))
        >>> batch = {k: torch.zeros(1) for k in ("image", "label", "cond_image", "cond_label", "cond_index")}
        >>> len(prepare(batch, "cpu"))
        4
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> tuple[Tensor, ...]:
        missing = [k for k in self.keys if k not in batchdata]
        if missing:
            raise KeyError(f"DCLTrainer: the batch lacks {missing} (keys {sorted(batchdata)}); use ConditionalDataset.")
        return tuple(torch.as_tensor(batchdata[k]).to(device, non_blocking=non_blocking, **kwargs) for k in self.keys)


class DCLTrainer(MultiNetworkTrainer):
    """DCL's Algorithm 1 (stage 1 or stage 2) on :class:`~partialseg.engines.MultiNetworkTrainer`.

    PrimNet is the trainer's network ``"network"`` with its optimiser ``"optimizer"``; DualNet is
    its frozen copy ``"dual"`` (:class:`~partialseg.engines.FrozenCopy`), so the trainer's
    :meth:`~partialseg.engines.MultiNetworkTrainer.checkpoint_dict` holds ``network``,
    ``optimizer`` and ``dual`` (DualNet's weights and refresh history) for a resumable checkpoint.

    Each batch is a dictionary with the target image (``image_key``, ``(B, C, *spatial)``), its
    ``<0,p,1>`` map (``label_key``, ``(B, m, *spatial)``) and one conditional pair per class
    (``cond_image_key`` ``(B, m * C, *spatial)``, ``cond_label_key`` ``(B, m, *spatial)``), as
    :class:`~partialseg.data.dcl.ConditionalDataset` gives. The iteration computes
    ``z = g(y_t, y_c)`` (Eq. 5), PrimNet's logits, ``L_prim = loss_function(logits, z, y_c)``
    and, when ``lambda_dual > 0``, the dual task (:func:`dual_swap`) through DualNet:
    ``loss = (1 - lambda_dual) L_prim + lambda_dual L_dual`` (Eq. 10), one update of PrimNet.

    ``engine.state.output`` holds ``image``, ``label``, ``pred`` (PrimNet's ``m``-class
    probabilities ``z_cap + z_delta``), ``loss``, ``loss_prim``, ``loss_dual`` (0 in stage 1) and
    ``dual_class`` (-1 in stage 1), so MONAI's handlers (stats, checkpoints, metrics) work. The
    selected class of iteration ``i`` comes from ``numpy.random.default_rng([seed, i])``
    (reproducible across resumes). Whenever a pass over the training data starts (the first
    epoch's start, and each time the loader runs out, which for an epoch as long as the loader is
    each epoch's start), the trainer calls ``train_data_loader.dataset.set_epoch(epoch,
    pass_index)`` when the dataset has it: ``epoch`` (from 0) is the epoch in which the pass
    starts, ``pass_index`` counts earlier passes started in that epoch. It is called before the
    loader's iterator (and its worker processes, which copy the dataset) is created, so every pass
    draws the same conditional cases with any ``num_workers``; an epoch shorter than the loader
    (``epoch_length``) continues the pass it is in. A loader with ``persistent_workers`` would keep
    stale copies and is refused. A loader whose one pass spans the whole run (e.g. a
    ``RandomSampler`` with ``num_samples = iterations * batch_size``) therefore gives every item
    one draw for the whole run: give such a loader one pass per epoch instead
    (``benchmarks/dcl_ablation.py``'s ``training_loader``).

    Args:
        device, max_epochs, train_data_loader: as :class:`~partialseg.engines.MultiNetworkTrainer`.
        **engine_kwargs: passed on to :class:`~partialseg.engines.MultiNetworkTrainer` (``epoch_length``, ``amp``, ...).
        network: PrimNet (a CompNet, or any module mapping the packed input to ``2m`` logits).
        optimizer: PrimNet's optimiser.
        loss_function: ``loss(logits, z, cond_label)``, e.g.
            :class:`~partialseg.losses.ConditionalCompatibleLoss` (Eq. 8).
        lambda_dual: weight of the dual task in ``[0, 1)``; 0 = stage 1, 0.2 = the paper's stage 2.
        dual_network: DualNet; None = a frozen copy of PrimNet made at the first stage-2
            iteration (after checkpoint loaders have run). It is frozen (no gradient) and kept
            in eval mode either way.
        dual_classes: classes ``c_s`` may take (None = all ``m``).
        seed: seed of the selected class.
        p: value of unknown entries (the dual target's other channels).
        image_key, label_key, cond_image_key, cond_label_key: batch keys.
        inferer: runs PrimNet on the packed input (default ``SimpleInferer``).
        prepare_batch: MONAI-style ``prepare_batch`` returning ``(image, label, cond_image,
            cond_label)`` on the device (default :class:`DCLBatch` of the four keys).

    Raises:
        ValueError: ``lambda_dual`` outside ``[0, 1)``, empty or negative ``dual_classes``, a
            ``dual_network`` that is PrimNet itself, a loader with ``persistent_workers``.
        TypeError: ``dual_network`` is not an ``nn.Module``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        lambda_dual: float = 0.0,
        dual_network: nn.Module | None = None,
        dual_classes: Sequence[int] | None = None,
        seed: int = 0,
        p: float = 0.5,
        image_key: str = "image",
        label_key: str = "label",
        cond_image_key: str = "cond_image",
        cond_label_key: str = "cond_label",
        inferer: Inferer | None = None,
        prepare_batch: Callable | None = None,
        **engine_kwargs: Any,
    ) -> None:
        try:
            lambda_dual = check_float(lambda_dual, "lambda_dual", minimum=0.0, maximum=1.0, include_maximum=False)
        except TypeError as e:  # a bool or a string is a bad value of lambda_dual
            raise ValueError(str(e)) from None
        if dual_network is not None and not isinstance(dual_network, nn.Module):
            raise TypeError(f"dual_network must be an nn.Module or None, got {type(dual_network).__name__}.")
        if dual_classes is not None:
            dual_classes = [check_int(c, "dual_classes entry") for c in dual_classes]
            if not dual_classes or min(dual_classes) < 0:
                raise ValueError(f"dual_classes must be non-empty class indices, got {dual_classes!r}.")
        seed = check_int(seed, "seed", minimum=0)
        p = check_float(p, "p", minimum=0.0, maximum=1.0, include_minimum=False, include_maximum=False)
        if hasattr(getattr(train_data_loader, "dataset", None), "set_epoch") and getattr(train_data_loader, "persistent_workers", False):
            raise ValueError(
                "train_data_loader has persistent_workers=True: its workers would keep the conditional draws of the first"
                " pass; use persistent_workers=False (workers are created once per pass over the data)."
            )
        if dual_network is not None and dual_network is unwrap_network(network):
            raise ValueError("dual_network must be a separate copy of the network (it is frozen); pass None to copy PrimNet.")
        keys = (image_key, label_key, cond_image_key, cond_label_key)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            networks={"network": network},
            optimizers={"optimizer": optimizer},
            frozen={"dual": ("network", dual_network)},
            prepare_batch=DCLBatch(keys) if prepare_batch is None else prepare_batch,
            **engine_kwargs,
        )
        self.loss_function = loss_function
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.lambda_dual = lambda_dual
        self.dual_classes = dual_classes
        self.seed = seed
        self.p = p
        self.keys = keys
        self._pass_key: tuple[int, int] | None = None  # (epoch, pass_index) of the last pass started

    @property
    def network(self) -> nn.Module:
        """PrimNet (the trainer's network ``"network"``, DDP-wrapped under torchrun)."""
        return self.state.networks["network"]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """PrimNet's optimiser."""
        return self.state.optimizers["optimizer"]

    @property
    def dual_network(self) -> nn.Module | None:
        """DualNet (None until the first stage-2 iteration or :meth:`refresh_dual`)."""
        return self.state.frozen["dual"].network

    @property
    def dual_refreshes(self) -> list[int]:
        """Trainer iterations at which DualNet was made or refreshed from PrimNet."""
        return self.state.frozen["dual"].refreshes

    def _setup_dataloader_iter(self) -> None:
        # ignite creates the loader's iterator here, at the start of every pass over the data:
        # set the pass's conditional draws first, so worker processes copy them.
        dataset = getattr(self.state.dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            epoch = max(int(self.state.epoch) - 1, 0)
            last = self._pass_key
            key = (epoch, last[1] + 1 if last is not None and last[0] == epoch else 0)
            dataset.set_epoch(*key)
            self._pass_key = key
        super()._setup_dataloader_iter()

    def refresh_dual(self) -> None:
        """Copy PrimNet's current weights into DualNet (creating DualNet if needed)."""
        self.refresh_frozen("dual")

    def select_class(self, iteration: int, m: int) -> int:
        """The dual class ``c_s`` of ``iteration``."""
        choices = self.dual_classes if self.dual_classes is not None else list(range(m))
        if max(choices) >= m:
            raise ValueError(f"dual_classes {choices} are outside [0, {m}).")
        return int(choices[int(np.random.default_rng([self.seed, iteration]).integers(len(choices)))])

    def train_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
        """Eq. 10 (:meth:`compute_loss`), then one update of PrimNet."""
        # the loss is computed in its own method so that its intermediate tensors (logits, the
        # dual swap, z) are released before the backward pass, not held through it
        self.update(self.compute_loss(*batch), "optimizer")

    def compute_loss(self, image: Tensor, label: Tensor, cond_image: Tensor, cond_label: Tensor) -> Tensor:
        """PrimNet's conditional compatible loss, plus the dual task in stage 2 (Eq. 10).

        Fills ``state.output`` (``image``, ``label``, ``pred``, ``loss_prim``, ``loss_dual``,
        ``dual_class``) and fires ``FORWARD_COMPLETED``; returns the loss to minimise.
        """
        out = self.state.output
        out.update({Keys.IMAGE: image, Keys.LABEL: label})
        stage2 = self.lambda_dual > 0
        dual = self.frozen_network("dual") if stage2 else None
        s = self.select_class(self.state.iteration, cond_label.shape[1]) if stage2 else -1
        logits = self.inferer(pack_conditional_input(image, cond_image, cond_label), self.network)
        pred = compnet_segment(logits.float())
        out[Keys.PRED] = pred
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        z = conditional_supervision(label, cond_label, channel_dim=1)
        loss_prim = self.loss_function(logits, z, cond_label).mean()
        loss = loss_prim
        loss_dual = torch.zeros((), device=loss_prim.device)
        if stage2:
            d = dual_swap(image, cond_image, cond_label, pred, s, self.p)
            dual_logits = dual(pack_conditional_input(d["image"], d["cond_image"], d["cond_label"]))  # type: ignore[misc]
            z_d = conditional_supervision(d["label"], d["cond_label_hard"], channel_dim=1)
            loss_dual = self.loss_function(dual_logits, z_d, d["cond_label_hard"]).mean()
            loss = (1.0 - self.lambda_dual) * loss_prim + self.lambda_dual * loss_dual
        out.update({"loss_prim": loss_prim.detach(), "loss_dual": loss_dual.detach(), "dual_class": s})
        return loss


class DualNetworkUpdater:
    """Refresh DualNet from PrimNet whenever the validation evaluator's key metric improves.

    Attach to the evaluator (e.g. the one a ``ValidationHandler`` runs): after the evaluator's
    own best-metric bookkeeping at ``EPOCH_COMPLETED``, a new ``best_metric_epoch`` /
    ``best_metric`` means PrimNet just reached its best validation score, and it is copied into
    the trainer's DualNet (Algorithm 1, line 17-18; section 4.1.2). Nothing happens in stage 1.

    Args:
        trainer: the :class:`DCLTrainer`.

    Example (bundle config):
        ``{"_target_": "partialseg.engines.dcl.DualNetworkUpdater", "trainer": "@train#trainer"}``
        in ``validate#handlers``.
    """

    def __init__(self, trainer: DCLTrainer) -> None:
        if not isinstance(trainer, DCLTrainer):
            raise TypeError(f"trainer must be a DCLTrainer, got {type(trainer).__name__}.")
        self.trainer = trainer
        self._seen: tuple[float, int] | None = None

    def attach(self, engine: Any) -> None:
        """Register on ``engine``'s (the evaluator's) ``EPOCH_STARTED`` and ``EPOCH_COMPLETED``.

        The best metric is noted when a validation starts and compared when it ends, so only an
        improvement made by that validation refreshes DualNet (not a best metric restored from a
        checkpoint, :class:`~partialseg.engines.BestMetricState`).
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self._note_best)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _note_best(self, engine: Any) -> None:
        self._seen = (float(engine.state.best_metric), int(engine.state.best_metric_epoch))

    def __call__(self, engine: Any) -> None:
        best = (float(engine.state.best_metric), int(engine.state.best_metric_epoch))
        if best[1] == -1 or best == self._seen:
            return
        self._seen = best
        if self.trainer.lambda_dual > 0:
            self.trainer.refresh_dual()
