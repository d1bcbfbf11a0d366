"""The atlas-guided multimodal partial-label trainer (Liu et al., MICCAI 2024) on :class:`MultiNetworkTrainer`.

Per minibatch, in the paper's order (section 2, "Objective Function, Training, and Inference"):

1. the main network's forward pass: logits, softmax ``p`` and (with MICPAM) the decoder features;
2. **APRN step** (``aprn=True``): the refiner sees ``[p_c detached, atlas_c]`` for every organ the
   image labels and is updated on ``L_APRN`` with its own optimiser (no gradient reaches the main
   network: its input is detached); the updated refiner then refines the organs the image does not
   label (no gradient), giving the pseudo-labels and their confident-voxel mask;
3. **main step**: ``L_seg + lambda_1 L_pseudo + lambda_2 L_adv + lambda_3 L_proto`` (Eq. 4) with
   the main optimiser (and the MICPAMs' parameters, in that optimiser or their own); ``L_adv`` goes
   through the discriminator with its parameters frozen for the step; MICPAM's prototypes are
   updated (EMA of masked average pooling on consensus voxels) before its attention is computed;
4. **AMAN step** (``aman=True``): the discriminator is updated on ``L_D`` (Eq. 1) with its own
   optimiser, on the main network's prediction of this iteration, detached.

The three modules are flags (``aman``, ``aprn``, ``micpam``), so the paper's ablation arms (a)-(g)
and the full model are one trainer with different flags. Without APRN, MICPAM's pseudo-labels are
the main network's own (detached) probabilities. Inference uses the main network alone.

``docs/atlas.md`` has the equations, the interface and the choices where paper and code differ.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import contextlib

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import Tensor, nn

from partialseg._checks import check_int, unwrap_network
from partialseg.engines.multi_network import MultiNetworkTrainer
from partialseg.losses.atlas import AtlasLoss, consensus_masks, labelled_classes

__all__ = ["AtlasBatch", "AtlasTrainer", "modality_classes_from_datalist"]

#: the detached terms AtlasTrainer writes into engine.state.output
LOSS_TERMS = ("seg", "pseudo", "adv", "proto", "loss_refiner", "loss_discriminator")


def modality_classes_from_datalist(
    datalist: Iterable[Mapping], classes: Sequence[str], key: str = "modality"
) -> dict[str, list[int]]:
    """``{modality: sorted organ indices (>= 1) labelled by some case of that modality}``.

    What AMAN's indicator ``1(c)`` reads: organ ``c`` is labelled in an image's modality when a
    training case of that modality annotates it. ``key`` may name another grouping (``"source"``:
    one group per partial dataset). Reads the ``annotated`` indices of partialseg's datalists.

    Raises:
        ValueError: a labelled case without ``key``; an organ that no case annotates (named).

    Example:
        >>> dl = [{"annotated": [1], "modality": "CT"}, {"annotated": [2], "modality": "MR"}, {"annotated": [], "modality": "MR"}]
        >>> modality_classes_from_datalist(dl, ["background", "liver", "spleen"])
        {'CT': [1], 'MR': [2]}
    """
    out: dict[str, set[int]] = {}
    for i, case in enumerate(datalist):
        annotated = [int(c) for c in case.get("annotated", []) if int(c) > 0]
        if key not in case or case[key] is None:
            if annotated:
                raise ValueError(f"case {case.get('case', i)!r} has no {key!r}: AMAN needs the {key} of every labelled case.")
            continue
        out.setdefault(str(case[key]), set()).update(annotated)
    seen = set().union(*out.values()) if out else set()
    missing = [classes[c] for c in range(1, len(classes)) if c not in seen]
    if missing:
        raise ValueError(f"no training case annotates {missing}: the atlas, the refiner and the discriminator need every organ labelled somewhere.")
    return {k: sorted(v) for k, v in sorted(out.items())}


class AtlasBatch:
    """``prepare_batch`` of :class:`AtlasTrainer`: ``(image, label, atlas, modality)`` on the device.

    Args:
        image_key: images ``(B, in_channels, *spatial)``.
        label_key: ``<0,p,1>`` maps ``(B, m, *spatial)`` (``PartialLabelToVectord``).
        atlas_key: the atlas cropped with the image ``(B, m - 1, *spatial)`` (one channel per organ;
            ``(B, m, *spatial)`` with a background channel is accepted, channel 0 dropped).
        modality_key: one string per sample (the collated list), or None when no module needs it.

    Example:
        >>> import torch
        >>> b = {"image": torch.zeros(1, 1, 2), "label": torch.ones(1, 2, 2), "atlas": torch.ones(1, 1, 2), "modality": ["CT"]}
        >>> AtlasBatch()(b, "cpu")[3]
        ['CT']
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", atlas_key: str = "atlas", modality_key: str | None = "modality") -> None:
        self.image_key, self.label_key, self.atlas_key, self.modality_key = image_key, label_key, atlas_key, modality_key

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        if not isinstance(batchdata, Mapping):
            raise TypeError(f"AtlasTrainer: a batch must be a dict with {self.image_key!r}, {self.label_key!r}, {self.atlas_key!r}; got {type(batchdata).__name__}.")
        needed = [self.image_key, self.label_key, self.atlas_key]
        missing = [k for k in needed if k not in batchdata]
        if missing:
            raise KeyError(f"AtlasTrainer: the batch lacks {missing} (keys {sorted(map(str, batchdata))}); keep them through SelectItemsd.")

        def move(x: Any) -> Tensor:
            return torch.as_tensor(x).to(device, non_blocking=non_blocking, **kwargs)

        modality = None
        if self.modality_key is not None and self.modality_key in batchdata:
            m = batchdata[self.modality_key]
            modality = [str(v) for v in (m if isinstance(m, (list, tuple)) else [m])]
        return move(batchdata[self.image_key]), move(batchdata[self.label_key]), move(batchdata[self.atlas_key]), modality


class AtlasTrainer(MultiNetworkTrainer):
    """The atlas method's training: main network + APRN + AMAN + MICPAM, one optimiser each.

    Networks (checkpoint names): ``"network"`` (main, e.g. :class:`~partialseg.networks.AtlasUNet`),
    ``"refiner"`` (APRN, :class:`~partialseg.networks.AtlasRefiner`), ``"discriminator"`` (AMAN,
    :class:`~partialseg.networks.AtlasDiscriminator`), ``"prototypes"`` (MICPAMs,
    :class:`~partialseg.networks.PrototypeAnchoring`: its prototype buffers and update counts are
    in its state dict, so checkpoints and resumes carry them); optimisers ``"optimizer"``,
    ``"refiner_optimizer"``, ``"discriminator_optimizer"`` and optionally
    ``"prototypes_optimizer"``. A module switched off is not registered (its network may be None).

    ``engine.state.output``: ``image``, ``label``, ``pred`` (softmax, detached), ``loss`` (Eq. 4's
    total), and the detached terms ``seg``, ``pseudo``, ``adv``, ``proto``, ``loss_refiner``,
    ``loss_discriminator`` (0 for a module that is off or had nothing to do).

    Args:
        device, max_epochs, train_data_loader: as :class:`~partialseg.engines.MultiNetworkTrainer`.
        **engine_kwargs: passed on to :class:`~partialseg.engines.MultiNetworkTrainer` (``epoch_length``, ``amp``, ...).
        network: the main network; called as ``network(x, return_features=True)`` when MICPAM is on.
        optimizer: its optimiser.
        loss_function: :class:`~partialseg.losses.AtlasLoss` (default: the paper's settings).
        refiner, refiner_optimizer: APRN and its optimiser (needed with ``aprn``); the refiner is
            called as ``refiner(prob, atlas, augment=bool)`` on ``(N, 1, *spatial)`` tensors.
        discriminator, discriminator_optimizer: AMAN and its optimiser (needed with ``aman``).
        prototypes: the MICPAMs (needed with ``micpam``).
        prototypes_optimizer: their optimiser; None: their parameters must be in ``optimizer``.
        modality_classes: ``{modality: organ indices labelled in that modality}``
            (:func:`modality_classes_from_datalist`); needed with ``aman``.
        aman, aprn, micpam: the three modules on / off (the ablation's arms).
        refiner_augment: APRN's erase / fill augmentation during its training step (the cubes
            are the refiner's ``erase_patches`` / ``erase_size``).
        pseudo_start_epoch: epochs trained before ``L_pseudo`` and ``L_proto`` apply (the public
            code: 20; the paper does not say; default 0).
        prepare_batch: default :class:`AtlasBatch` (keys ``image``, ``label``, ``atlas``, ``modality``).

    Raises:
        ValueError: a module on without its network or optimiser, MICPAM parameters in no
            optimiser, AMAN without ``modality_classes``; in a batch: an atlas whose channels or
            size do not match, a modality missing from ``modality_classes`` (named).

    Example:
        >>> import torch
        >>> from partialseg.networks import AtlasUNet
        >>> net = AtlasUNet(3, 1, 2, filters=(2, 2, 2), norm_name="instance", feature_levels=1)
        >>> label = torch.zeros(1, 2, 8, 8, 8); label[:, 0] = 1.0
        >>> data = [{"image": torch.randn(1, 1, 8, 8, 8), "label": label, "atlas": torch.zeros(1, 1, 8, 8, 8), "modality": ["CT"]}]
        >>> trainer = AtlasTrainer("cpu", 1, data, net, torch.optim.Adam(net.parameters(), 1e-3), aman=False, aprn=False, micpam=False, decollate=False)
        >>> trainer.run(); sorted(trainer.checkpoint_dict())
        ['network', 'optimizer']
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: AtlasLoss | None = None,
        refiner: nn.Module | None = None,
        refiner_optimizer: torch.optim.Optimizer | None = None,
        discriminator: nn.Module | None = None,
        discriminator_optimizer: torch.optim.Optimizer | None = None,
        prototypes: nn.Module | None = None,
        prototypes_optimizer: torch.optim.Optimizer | None = None,
        modality_classes: Mapping[str, Sequence[int]] | None = None,
        aman: bool = True,
        aprn: bool = True,
        micpam: bool = True,
        refiner_augment: bool = False,
        pseudo_start_epoch: int = 0,
        prepare_batch: Callable | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self.aman, self.aprn, self.micpam = bool(aman), bool(aprn), bool(micpam)
        networks: dict[str, nn.Module] = {"network": network}
        optimizers: dict[str, torch.optim.Optimizer] = {"optimizer": optimizer}
        for flag, name, net, opt in (
            (self.aprn, "refiner", refiner, refiner_optimizer),
            (self.aman, "discriminator", discriminator, discriminator_optimizer),
        ):
            if flag:
                if net is None or opt is None:
                    raise ValueError(f"AtlasTrainer: {'APRN' if name == 'refiner' else 'AMAN'} is on but {name} or {name}_optimizer is None (switch it off with {'aprn' if name == 'refiner' else 'aman'}=False).")
                networks[name], optimizers[f"{name}_optimizer"] = net, opt
        self.prototypes_optimizer_name: str | None = None
        if self.micpam:
            if prototypes is None:
                raise ValueError("AtlasTrainer: MICPAM is on but prototypes is None (switch it off with micpam=False).")
            networks["prototypes"] = prototypes
            if prototypes_optimizer is not None:
                optimizers["prototypes_optimizer"] = prototypes_optimizer
                self.prototypes_optimizer_name = "prototypes_optimizer"
            else:
                owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
                if any(id(p) not in owned for p in prototypes.parameters()):
                    raise ValueError("AtlasTrainer: the prototypes' parameters are in no optimiser: give prototypes_optimizer or add them to optimizer.")
        if self.aman:
            if not modality_classes:
                raise ValueError("AtlasTrainer: AMAN needs modality_classes ({modality: labelled organ indices}; modality_classes_from_datalist).")
            self.modality_classes = {str(k): {int(c) for c in v} for k, v in modality_classes.items()}
        else:
            self.modality_classes = {str(k): {int(c) for c in v} for k, v in (modality_classes or {}).items()}
        self.loss_function = AtlasLoss() if loss_function is None else loss_function
        self.refiner_augment = bool(refiner_augment)
        self.pseudo_start_epoch = check_int(pseudo_start_epoch, "pseudo_start_epoch", minimum=0)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            networks=networks,
            optimizers=optimizers,
            prepare_batch=AtlasBatch() if prepare_batch is None else prepare_batch,
            **engine_kwargs,
        )

    # ------------------------------------------------------------------------------ helpers

    def _organ_atlas(self, atlas: Tensor, label: Tensor) -> Tensor:
        organs = label.shape[1] - 1
        if atlas.shape[1] == organs + 1:
            atlas = atlas[:, 1:]
        if atlas.shape[1] != organs or atlas.shape[0] != label.shape[0] or atlas.shape[2:] != label.shape[2:]:
            raise ValueError(
                f"AtlasTrainer: the atlas has shape {tuple(atlas.shape)} but the label {tuple(label.shape)}: the atlas needs one channel per"
                f" organ ({organs}, the label's classes without the background) on the image's grid (crop both with AtlasCropd)."
            )
        return atlas.float()

    def modality_indicator(self, modality: Sequence[str] | None, batch: int, organs: int, device: Any) -> Tensor:
        """``(B, organs)`` bool: ``1(c)``, organ ``c`` (index ``c + 1``) is labelled in sample ``b``'s modality."""
        if modality is None or len(modality) != batch:
            raise ValueError(f"AtlasTrainer: AMAN needs one modality per sample in the batch, got {modality!r} for {batch} samples.")
        rows = []
        for m in modality:
            if m not in self.modality_classes:
                raise ValueError(f"AtlasTrainer: modality {m!r} is missing from modality_classes (known: {sorted(self.modality_classes)}).")
            rows.append([c + 1 in self.modality_classes[m] for c in range(organs)])
        return torch.tensor(rows, dtype=torch.bool, device=device)

    @staticmethod
    def _pairs(prob: Tensor, atlas: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        idx = pairs.nonzero(as_tuple=True)
        return prob[idx][:, None], atlas[idx][:, None], idx

    def _pseudo_active(self) -> bool:
        return int(self.state.epoch) > self.pseudo_start_epoch

    def full_precision(self) -> contextlib.AbstractContextManager:
        """Autocast off (under AMP): the losses sum over every voxel, which float16 cannot hold."""
        return torch.autocast(self._device_type(), enabled=False) if self.amp else contextlib.nullcontext()

    # ------------------------------------------------------------------------------ the steps

    def refiner_loss(self, prob: Tensor, atlas: Tensor, target: Tensor, labelled: Tensor) -> Tensor | None:
        """``L_APRN`` on the labelled (sample, organ) pairs (``prob`` detached).

        No labelled pair in the batch: None (the step is skipped), except under
        ``torch.distributed``, where the other processes' refiner steps wait for this one's
        gradients: a zero loss through one pair then joins the all-reduce (this process adds
        nothing to the averaged gradient).
        """
        if not bool(labelled.any()):
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                return None
            first = torch.zeros_like(labelled)
            first.view(-1)[0] = True
            p, a, _ = self._pairs(prob.detach(), atlas, first)
            return self.state.networks["refiner"](p, a, augment=False).float().sum() * 0.0
        p, a, idx = self._pairs(prob.detach(), atlas, labelled)
        logits = self.state.networks["refiner"](p, a, augment=self.refiner_augment)[:, 0]
        full = torch.zeros_like(prob, dtype=logits.dtype).index_put(idx, logits)
        with self.full_precision():
            return self.loss_function.refiner(full.float(), target.float(), labelled)

    @torch.no_grad()
    def refine(self, prob: Tensor, atlas: Tensor, pairs: Tensor) -> Tensor:
        """Refined probabilities ``(B, organs, *spatial)`` of ``pairs`` (0 elsewhere), no gradient."""
        out = torch.zeros_like(prob, dtype=torch.float32)
        if bool(pairs.any()):
            p, a, idx = self._pairs(prob.detach(), atlas, pairs)
            refiner = unwrap_network(self.state.networks["refiner"])
            out = out.index_put(idx, torch.sigmoid(refiner(p, a, augment=False)[:, 0].float()))
        return out

    def discriminator_logits(self, prob: Tensor, atlas: Tensor, frozen: bool, pairs: Tensor | None = None) -> Tensor:
        """AMAN's logits ``(B, organs)`` on ``[p_c, atlas_c]`` for every organ (or only ``pairs``, 0 elsewhere).

        ``frozen``: for the main step, through the unwrapped discriminator with its parameters not
        requiring gradient (the gradient reaches ``prob`` only); otherwise the trained module.
        ``pairs`` ``(B, organs)`` bool: compute only these (``L_adv`` reads the organs not labelled
        in the modality; the others would cost a forward and backward pass each for nothing).
        """
        b, k = prob.shape[:2]
        if pairs is None:
            x = torch.stack([prob, atlas.to(prob.dtype)], 2).flatten(0, 1)  # (B*K, 2, *spatial)
        else:
            idx = pairs.nonzero(as_tuple=True)
            x = torch.stack([prob[idx], atlas[idx].to(prob.dtype)], 1)
        net = self.state.networks["discriminator"]
        if frozen:
            net = unwrap_network(net)
            flags = [p.requires_grad for p in net.parameters()]
            net.requires_grad_(False)
        try:
            logits = net(x)[:, 0] if x.shape[0] else x.new_zeros(0)
        finally:
            if frozen:
                for p, f in zip(net.parameters(), flags):
                    p.requires_grad_(f)
        if pairs is None:
            return logits.view(b, k)
        return torch.zeros(b, k, dtype=logits.dtype, device=logits.device).index_put(idx, logits)

    def train_step(self, batch: tuple) -> None:
        """APRN step, main step (+ MICPAM), AMAN step; see the module docstring."""
        image, label, atlas, modality = batch
        out = self.state.output
        out.update({Keys.IMAGE: image, Keys.LABEL: label})
        for k in LOSS_TERMS:
            out[k] = torch.zeros((), device=image.device)
        atlas = self._organ_atlas(atlas, label)
        indicator = self.modality_indicator(modality, label.shape[0], label.shape[1] - 1, label.device) if self.aman else None
        if self.micpam:
            logits, features = self.state.networks["network"](image, return_features=True)
        else:
            logits, features = self.state.networks["network"](image), None
        prob = torch.softmax(logits.float(), 1)
        out[Keys.PRED] = prob.detach()
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        organ_prob, organ_target = prob[:, 1:], label[:, 1:]
        labelled = labelled_classes(label)[:, 1:]
        unlabelled = ~labelled

        refined = None
        if self.aprn:  # 1. APRN step: its input is detached, so nothing reaches the main network
            loss_r = self.refiner_loss(organ_prob, atlas, organ_target, labelled)
            if loss_r is not None:
                self.update(loss_r, "refiner_optimizer", key="loss_refiner")
                out["loss_refiner"] = loss_r.detach()
            refined = self.refine(organ_prob, atlas, unlabelled)
        elif self.micpam:  # MICPAM without APRN: the main network's own probabilities as pseudo-labels
            refined = organ_prob.detach() * unlabelled.view(*unlabelled.shape, *([1] * (label.ndim - 2)))

        # 2. main step
        names = ["optimizer"] + ([self.prototypes_optimizer_name] if self.prototypes_optimizer_name else [])
        self.update(self.main_loss(logits, prob, features, label, atlas, refined, unlabelled, indicator), *names)

        if self.aman:  # 3. AMAN step on this iteration's prediction, detached
            logits_d = self.discriminator_logits(organ_prob.detach(), atlas, frozen=False)
            with self.full_precision():
                loss_d = self.loss_function.discriminator(logits_d.float(), indicator)
            self.update(loss_d, "discriminator_optimizer", key="loss_discriminator")
            out["loss_discriminator"] = loss_d.detach()

    def main_loss(
        self,
        logits: Tensor,
        prob: Tensor,
        features: Sequence[Tensor] | None,
        label: Tensor,
        atlas: Tensor,
        refined: Tensor | None,
        unlabelled: Tensor,
        indicator: Tensor | None,
    ) -> Tensor:
        """Eq. 4 for the main network (and the MICPAMs); writes the detached terms to ``state.output``."""
        out, lf = self.state.output, self.loss_function
        organ_prob, organ_target = prob[:, 1:], label[:, 1:]
        with self.full_precision():  # the marginal sums run over every voxel: float32, outside autocast
            seg = lf.seg(logits.float(), label.float())
        pseudo_term = adv = proto = None
        pseudo = mask = None
        if refined is not None:
            pseudo, mask = lf.pseudo_targets(refined, organ_target, unlabelled)
        if self.aprn and self._pseudo_active():
            with self.full_precision():
                pseudo_term = lf.pseudo(organ_prob, pseudo, mask, unlabelled)
        if self.aman and lf.lambda_adv > 0 and not bool(indicator.all()):
            logits_adv = self.discriminator_logits(organ_prob, atlas, frozen=True, pairs=~indicator)
            with self.full_precision():
                adv = lf.adversarial(logits_adv.float(), indicator)
        if self.micpam:
            micpam = self.state.networks["prototypes"]
            expand = unlabelled.view(*unlabelled.shape, *([1] * (label.ndim - 2)))
            maybe_organ = ((refined >= lf.confident_low) & expand).any(1)
            # the argmax over the classes: max(1).indices is the same index (the first maximum) at a
            # fraction of argmax(1)'s cost on a strided class dimension (CPU: 50 vs 330 ms at 2 x 7 x 64^3)
            pred = logits.detach().max(1).indices
            unwrap_network(micpam).update(features, consensus_masks(pred, label, maybe_organ))
            maps = micpam(features)
            if self._pseudo_active():
                with self.full_precision():
                    proto = lf.proto([a.float() for a in maps], pseudo, mask, unlabelled)
            else:  # keep the projections on the graph (DDP) with a zero term
                proto = sum(m.sum() for m in maps) * 0.0
        for name, value in (("seg", seg), ("pseudo", pseudo_term), ("adv", adv), ("proto", proto)):
            if value is not None:
                out[name] = value.detach()
        return lf(seg, pseudo_term, adv, proto)
