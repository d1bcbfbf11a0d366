"""Dual-Task Mutual Learning trainer (Zhang & Zhang, DTML, Eq. 5-6) on :class:`MultiNetworkTrainer`.

Per iteration: both networks see the batch (labelled and unlabelled cases together, e.g. 2 + 2
from :class:`~partialseg.data.sampling.TwoStreamBatchSampler`); :class:`~partialseg.losses.DTMLLoss`
gives ``L_seg + L_mask (+ L_dis) + w(t) L_con``; one backward pass of that sum and a step of both
optimisers. The gradient of the sum with respect to ``M_s`` is that of Eq. 5 and with respect to
``M_d`` that of Eq. 6 (each supervised term depends on one network only; ``L_con`` on both).

Hyperparameters (loss weights, ramp, optimisers, schedules) are constructor arguments set from
bundle configs; ``docs/dtml.md`` has the equations and the choices where the paper is silent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import Tensor, nn

from partialseg._checks import unwrap_network
from partialseg.engines.multi_network import MultiNetworkTrainer

__all__ = ["DTMLBatch", "DTMLTrainer"]

#: the loss terms DTMLTrainer copies (detached) into engine.state.output
LOSS_TERMS = ("seg", "mask", "dis", "con", "con_weight")


class DTMLBatch:
    """``prepare_batch`` of :class:`DTMLTrainer`: ``(image, label, sdm or None)`` on the device.

    Args:
        image_key: the images ``(B, in_channels, *spatial)``.
        label_key: the ``<0,p,1>`` maps ``(B, m, *spatial)`` (``PartialLabelToVectord``; an
            unlabelled case is all ``p``).
        sdm_key: the normalised SDMs ``(B, m-1, *spatial)`` (``SignedDistanceMapd``); optional in
            the batch (None when absent), needed only for ``L_dis``.

    Example:
        >>> import torch
        >>> image, label, sdm = DTMLBatch()({"image": torch.zeros(1), "label": torch.ones(1)}, "cpu")
        >>> sdm is None
        True
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", sdm_key: str = "sdm") -> None:
        self.image_key, self.label_key, self.sdm_key = image_key, label_key, sdm_key

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        if not isinstance(batchdata, dict):
            raise TypeError(f"DTMLTrainer: a batch must be a dict with {self.image_key!r} and {self.label_key!r}, got {type(batchdata).__name__}.")
        missing = [k for k in (self.image_key, self.label_key) if k not in batchdata]
        if missing:
            raise KeyError(
                f"DTMLTrainer: the batch lacks {missing} (keys {sorted(map(str, batchdata))}); unlabelled cases need a"
                " label too: the all-p <0,p,1> map PartialLabelToVectord writes for them."
            )

        def move(x: Any) -> Tensor:
            return torch.as_tensor(x).to(device, non_blocking=non_blocking, **kwargs)

        sdm = batchdata.get(self.sdm_key)
        return move(batchdata[self.image_key]), move(batchdata[self.label_key]), None if sdm is None else move(sdm)


class DTMLTrainer(MultiNetworkTrainer):
    """DTML's training (Eq. 5-6): ``M_s`` and ``M_d`` trained together by one loss.

    The trainer's networks are ``"seg"`` (``M_s``, raw logits) and ``"sdm"`` (``M_d``, ``tanh``
    output, e.g. :class:`~partialseg.networks.SignedDistanceNet`), its optimisers
    ``"seg_optimizer"`` and ``"sdm_optimizer"``; :meth:`checkpoint_dict` holds these four, and the
    engine (``"trainer"``, added by ``ResumeCheckpoint`` / given to MONAI's savers) holds the
    iteration, so a resumed run continues the consistency ramp where it was.

    The ramp reads ``t = engine.state.iteration - 1``, the iterations done before this one (0 at
    the first, as the reference code's ``iter_num``).

    ``engine.state.output``: ``image``, ``label``, ``pred`` (``sigmoid(M_s)``, detached,
    ``(B, m-1, *spatial)``), ``loss`` (the total, written by :meth:`update`), and the detached
    terms ``seg``, ``mask``, ``dis``, ``con``, ``con_weight``.

    Args:
        device, max_epochs, train_data_loader: as :class:`~partialseg.engines.MultiNetworkTrainer`.
        **engine_kwargs: passed on to :class:`~partialseg.engines.MultiNetworkTrainer` (``epoch_length``, ``amp``, ...).
        seg_network: ``M_s``.
        sdm_network: ``M_d`` (a separate network of the same backbone).
        seg_optimizer: ``M_s``'s optimiser.
        sdm_optimizer: ``M_d``'s optimiser.
        loss_function: :class:`~partialseg.losses.DTMLLoss` (or any callable with its signature
            returning a dict with ``"loss"``).
        prepare_batch: MONAI-style ``prepare_batch`` returning ``(image, label, sdm or None)``
            (default :class:`DTMLBatch`: keys ``image``, ``label``, optional ``sdm``).

    Raises:
        ValueError: the two networks (or the two optimisers) are one object.
        TypeError: ``loss_function`` not callable (and MultiNetworkTrainer's type checks).

    Example:
        >>> import torch
        >>> from partialseg.losses import DTMLLoss
        >>> from partialseg.networks import SignedDistanceNet
        >>> torch.manual_seed(0) and None
        >>> seg, sdm = torch.nn.Conv3d(1, 1, 3, padding=1), SignedDistanceNet(torch.nn.Conv3d(1, 1, 3, padding=1))
        >>> label = torch.full((2, 2, 4, 4, 4), 0.5); label[0, 1] = 0.0; label[0, 0] = 1.0  # case 0: all background
        >>> data = [{"image": torch.randn(2, 1, 4, 4, 4), "label": label}] * 2
        >>> trainer = DTMLTrainer("cpu", 1, data, seg, sdm, torch.optim.SGD(seg.parameters(), 0.01),
        ...                       torch.optim.SGD(sdm.parameters(), 0.01), DTMLLoss(), decollate=False)
        >>> trainer.run()
        >>> trainer.state.iteration, sorted(trainer.checkpoint_dict())
        (2, ['sdm', 'sdm_optimizer', 'seg', 'seg_optimizer'])
        >>> round(float(trainer.state.output["con_weight"]), 6)  # w(1)
        0.006749
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        seg_network: nn.Module,
        sdm_network: nn.Module,
        seg_optimizer: torch.optim.Optimizer,
        sdm_optimizer: torch.optim.Optimizer,
        loss_function: Callable[..., dict],
        prepare_batch: Callable | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if isinstance(seg_network, nn.Module) and unwrap_network(seg_network) is unwrap_network(sdm_network):
            raise ValueError("seg_network and sdm_network are one module: DTML trains two separate networks (M_s and M_d).")
        if seg_optimizer is sdm_optimizer:
            raise ValueError("seg_optimizer and sdm_optimizer are one optimiser: give each network its own (each would step twice).")
        if not callable(loss_function):
            raise TypeError(f"loss_function must be callable (a DTMLLoss), got {type(loss_function).__name__}.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            networks={"seg": seg_network, "sdm": sdm_network},
            optimizers={"seg_optimizer": seg_optimizer, "sdm_optimizer": sdm_optimizer},
            prepare_batch=DTMLBatch() if prepare_batch is None else prepare_batch,
            **engine_kwargs,
        )
        self.loss_function = loss_function

    @property
    def seg_network(self) -> nn.Module:
        """``M_s`` (the trainer's network ``"seg"``, DDP-wrapped under torchrun)."""
        return self.state.networks["seg"]

    @property
    def sdm_network(self) -> nn.Module:
        """``M_d`` (the trainer's network ``"sdm"``)."""
        return self.state.networks["sdm"]

    def train_step(self, batch: tuple[Tensor, Tensor, Tensor | None]) -> None:
        """:meth:`compute_loss`, then one backward pass and a step of both optimisers."""
        # the loss is computed in its own method so that its intermediate tensors are released
        # before the backward pass (MultiNetworkTrainer.train_step)
        self.update(self.compute_loss(*batch), "seg_optimizer", "sdm_optimizer")

    def compute_loss(self, image: Tensor, label: Tensor, sdm: Tensor | None = None) -> Tensor:
        """Both networks' forward passes and the DTML loss; fills ``state.output``, returns the total."""
        out = self.state.output
        out.update({Keys.IMAGE: image, Keys.LABEL: label})
        seg_logits = self.seg_network(image)
        sdm_pred = self.sdm_network(image)
        out[Keys.PRED] = torch.sigmoid(seg_logits.detach().float())
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = self.loss_function(seg_logits, sdm_pred, label, sdm, iteration=max(int(self.state.iteration) - 1, 0))
        if not isinstance(terms, dict) or Keys.LOSS not in terms:
            raise TypeError(f"DTMLTrainer: loss_function must return a dict with 'loss' (a DTMLLoss), got {type(terms).__name__}.")
        out.update({k: v.detach() if isinstance(v, Tensor) else v for k, v in terms.items() if k != Keys.LOSS})
        return terms[Keys.LOSS]
