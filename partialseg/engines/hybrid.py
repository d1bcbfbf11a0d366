"""Hybrid-supervision trainer (Pan et al., AAAI 2022): dynamic instance indicators + co-regularization.

:class:`HybridTrainer` runs on :class:`~partialseg.engines.MultiNetworkTrainer`: networks
``"net1"`` / ``"net2"`` (same architecture, different initialisations) with optimisers
``"opt1"`` / ``"opt2"``, and the :class:`~partialseg.losses.hybrid.InstanceIndicators` registered
as extra state ``"indicators"`` (saved in checkpoints, restored on resume).

Each batch holds ``2 n`` cases: the first ``n`` from the primary tutorial (drawn with
probability proportional to gamma), the last ``n`` from the auxiliary one (uniform), as
:class:`HybridPairSampler` gives. One iteration (DCR, Eq. 4-7): the mask ``B`` of a random
foreground class of each ``y_i`` (or a CutMix box), ``x_m = B x_i + (1 - B) x_j``, both networks
on their tutorial and on ``x_m``, pseudo-labels mixed with the same ``B``, the loss
:class:`~partialseg.losses.hybrid.DCRLoss` and one update of both networks. Every ``tau``
iterations (Algorithm 1) :meth:`HybridTrainer.update_indicators` computes the last-layer
gradients of network 1 on every case of ``indicator_loader`` (strong: ``g_S``, their mean; weak:
``g_k``, vectorised) and takes one Adam step of the indicators on ``-g_S . g_k``.

Arms of the paper's ablation are options, not subclasses: ``dcr=False`` trains network 1 alone
on the gamma-weighted CE of all ``2 n`` cases (DII only; with ``dii=False`` too: the merged
baseline); ``dii=False`` fixes gamma at 1 (DCR only); ``mix="cutmix"``; ``consistency="kl"``; DII
sampling on/off is the sampler's ``weighted``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import min_version, optional_import
from torch import Tensor, nn
from torch.utils.data import Sampler

from partialseg._checks import check_int, check_option, unwrap_network
from partialseg.data.sampling import FlatBatches
from partialseg.data.sampling import replicas as _replicas
from partialseg.data.sampling import stream as _stream
from partialseg.engines.multi_network import MultiNetworkTrainer
from partialseg.losses.hybrid import (
    GRADIENT_METHODS,
    DCRLoss,
    InstanceIndicators,
    channel_argmax,
    class_indices,
    indicator_gradient,
    instance_pixel_weights,
    last_layer_gradient_dots,
    last_layer_gradients,
    weighted_cross_entropy,
)
from partialseg.transforms.mix.array import ForegroundPaste

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

__all__ = ["MIXES", "HybridBatch", "HybridPairSampler", "HybridTrainer", "mix_masks", "scan_present_classes"]

#: the mixture tutorial's masks: the paper's foreground paste, or a CutMix box (its ablation)
MIXES = ("paste", "cutmix")
PSEUDO_LABEL_PRECISIONS = ("float32", "bfloat16", "float16", "auto")


def native_bfloat16(device_type: str) -> bool:
    """Whether ``device_type`` computes bfloat16 natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX).

    What ``pseudo_label_precision="auto"`` asks: elsewhere bfloat16 is emulated and slower than float32.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch 2.x: absent means no
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def mix_masks(labels: Tensor, rng: np.random.Generator, mix: str = "paste", include_background: bool = False) -> Tensor:
    """The masks ``B`` of the mixture tutorial, one per pair.

    ``"paste"`` (Eq. 4): the mask of a class drawn uniformly among the foreground classes present
    in ``y_i`` (with ``include_background``, background too); a ``y_i`` without one gives an
    empty mask (``x_m = x_j``). ``"cutmix"``: a box of area ``(1 - lam) H W``, ``lam ~ U(0, 1)``
    (CutMix's Beta(1, 1)), centred uniformly and clipped at the borders (Yun et al.).

    Args:
        labels: ``(n, *spatial)`` class indices of the primary tutorial.
        rng: the draws' generator.
        mix: ``"paste"`` or ``"cutmix"``.
        include_background: let ``"paste"`` draw the background class.

    Returns:
        ``(n, 1, *spatial)`` bool masks.

    Example:
        >>> import numpy as np, torch
        >>> y = torch.tensor([[[0, 1], [2, 2]], [[0, 0], [0, 0]]])
        >>> m = mix_masks(y, np.random.default_rng(0))
        >>> m.shape, m[1].any().item(), m[0].sum().item() in (1, 2)
        (torch.Size([2, 1, 2, 2]), False, True)
    """
    mix = check_option(mix, MIXES, "mix")
    out = torch.zeros((labels.shape[0], 1, *labels.shape[1:]), dtype=torch.bool, device=labels.device)
    for b in range(labels.shape[0]):
        if mix == "paste":
            present = [int(c) for c in torch.unique(labels[b]).tolist() if include_background or c != 0]
            if present:
                out[b, 0] = labels[b] == present[int(rng.integers(len(present)))]
            continue
        lam = float(rng.uniform())
        box = []
        for size in labels.shape[1:]:
            side = int(round(size * (1.0 - lam) ** (1.0 / (labels.ndim - 1))))
            centre = int(rng.integers(size))
            box.append(slice(max(centre - side // 2, 0), min(centre + side - side // 2, size)))
        out[(b, 0, *box)] = True
    return out


def scan_present_classes(loader: Iterable, case_key: str = "case", label_key: str = "label") -> dict[str, list[int]]:
    """Case -> foreground classes present in its mask, read through ``loader`` (for per-class indicators).

    Args:
        loader: batches (dicts) with class-index labels ``(B, 1, *spatial)`` and case names.
        case_key, label_key: batch keys.

    Returns:
        ``{case: sorted classes >= 1}`` (empty for a mask without foreground), to pass as
        ``InstanceIndicators.from_datalist(..., present_classes=...)``.

    Example:
        >>> import torch
        >>> batch = {"case": ["a", "b"], "label": torch.tensor([[[[0, 2], [2, 1]]], [[[0, 0], [0, 0]]]])}
        >>> scan_present_classes([batch])
        {'a': [1, 2], 'b': []}
    """
    out: dict[str, list[int]] = {}
    for batch in loader:
        labels, cases = batch[label_key], batch[case_key]
        cases = [cases] if isinstance(cases, str) else [str(c) for c in cases]
        for case, lab in zip(cases, torch.as_tensor(labels)):
            out[case] = [int(c) for c in torch.unique(lab).tolist() if c >= 1]
    return out


class HybridPairSampler(Sampler):
    """Batches of ``n`` primary indices drawn with probability proportional to gamma, then ``n`` uniform ones.

    The primary tutorial (Pan et al.: "samples instances from the multinomial probability
    distribution corresponding to the DII weights") draws with replacement from the current
    case gammas (strong cases 1, weak cases their indicator, or the mean of their class
    indicators), read when each batch is drawn, so an indicator update changes the next batches.
    The auxiliary tutorial is uniform: fresh permutations one after the other (every case once
    before any twice). ``weighted=False`` makes the primary tutorial uniform too (DII sampling
    off; the DCR-only and DII-only arms). An epoch has ``num_batches`` batches (default: one pass
    of the auxiliary stream) and its draws depend on ``seed``, the epoch, the rank and the gammas.

    Use it as a ``DataLoader``'s ``batch_sampler``, or :meth:`as_sampler` as the ``sampler`` with
    ``batch_size=2 n`` (MONAI's workflows then call ``set_epoch``). Under DDP each rank draws its
    own ``ceil(num_batches / num_replicas)`` batches.

    Args:
        data: the datalist (dicts with ``case_key``), a MONAI ``Dataset`` over one, or case names.
        pairs_per_batch: ``n``.
        indicators: the :class:`~partialseg.losses.hybrid.InstanceIndicators` (None: uniform).
        weighted: draw the primary tutorial by gamma.
        num_batches, seed, num_replicas, rank: as :class:`~partialseg.data.sampling.TwoStreamBatchSampler`.
        case_key: the entry naming the case.

    Raises:
        ValueError: no case, a case unknown to the indicators (named), ``pairs_per_batch`` < 1.

    Example:
        >>> ind = InstanceIndicators(["w1", "w2"], strong=["s"])
        >>> ind.gamma[:] = torch.tensor([0.0, 1.0])  # w1 distrusted entirely
        >>> sampler = HybridPairSampler(["s", "w1", "w2"], 4, ind, num_batches=20, seed=0)
        >>> batches = list(sampler)
        >>> len(batches), any(1 in b[:4] for b in batches), sorted({i for b in batches for i in b[4:]})
        (20, False, [0, 1, 2])
    """

    def __init__(
        self,
        data: Any,
        pairs_per_batch: int,
        indicators: InstanceIndicators | None = None,
        weighted: bool = True,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        case_key: str = "case",
    ) -> None:
        items = getattr(data, "data", data)
        self.cases = [str(it[case_key]) if isinstance(it, Mapping) else str(it) for it in items]
        if not self.cases:
            raise ValueError("HybridPairSampler needs at least one case.")
        self.pairs = check_int(pairs_per_batch, "pairs_per_batch", minimum=1)
        self.indicators = indicators
        self.weighted = bool(weighted) and indicators is not None
        if indicators is not None:
            for c in self.cases:
                indicators.is_strong(c)  # unknown case -> ValueError naming it
        n = len(self.cases)
        self.num_batches = check_int(num_batches if num_batches is not None else -(-n // self.pairs), "num_batches", minimum=1)
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        self.seed, self.epoch = check_int(seed, "seed"), 0
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def batch_size(self) -> int:
        """``2 n``: the loader's batch size with :meth:`as_sampler`."""
        return 2 * self.pairs

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int(epoch, "epoch")

    def probabilities(self) -> np.ndarray:
        """The primary tutorial's probability of each dataset index now."""
        n = len(self.cases)
        if not self.weighted:
            return np.full(n, 1.0 / n)
        key = int(self.indicators.updates)  # type: ignore[union-attr]
        if self._cache is None or self._cache[0] != key:
            w = self.indicators.case_gamma(self.cases).double().numpy()  # type: ignore[union-attr]
            self._cache = (key, w / w.sum())  # strong cases weigh 1, so the sum is > 0
        return self._cache[1]

    def __len__(self) -> int:
        return -(-self.num_batches // self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        count = len(self)
        auxiliary = _stream(np.arange(len(self.cases)), count * self.pairs, rng)
        for b in range(count):
            primary = rng.choice(len(self.cases), size=self.pairs, replace=True, p=self.probabilities()).tolist()
            yield primary + auxiliary[b * self.pairs : (b + 1) * self.pairs]

    def as_sampler(self) -> FlatBatches:
        """The batches flattened into a ``DistributedSampler`` (loader ``batch_size =`` :attr:`batch_size`)."""
        return FlatBatches(self)  # type: ignore[arg-type]


class HybridBatch:
    """``prepare_batch`` of :class:`HybridTrainer`: ``(image, label, cases)`` with tensors on the device.

    Example:
        >>> import torch
        >>> image, label, cases = HybridBatch()({"image": torch.zeros(2, 1), "label": torch.zeros(2, 1), "case": ["a", "b"]}, "cpu")
        >>> cases
        ['a', 'b']
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", case_key: str = "case") -> None:
        self.keys = (image_key, label_key, case_key)

    def __call__(self, batchdata: Mapping, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> tuple[Tensor, Tensor, list[str]]:
        missing = [k for k in self.keys if k not in batchdata]
        if missing:
            raise KeyError(f"HybridTrainer: the batch lacks {missing} (keys {sorted(batchdata)}); each item needs its case name.")
        image, label, cases = (batchdata[k] for k in self.keys)
        cases = [cases] if isinstance(cases, str) else [str(c) for c in cases]
        to = {"non_blocking": non_blocking, **kwargs}
        return torch.as_tensor(image).to(device, **to), torch.as_tensor(label).to(device, **to), cases


def _last_layer(network: nn.Module) -> tuple[Callable[[Tensor], Tensor], nn.Module, Callable | None]:
    net = unwrap_network(network)
    features, classifier = getattr(net, "forward_features", None), getattr(net, "classifier", None)
    if not callable(features) or not isinstance(classifier, nn.Module):
        raise TypeError(
            f"the dynamic instance indicators need the network's last layer: {type(net).__name__} must have forward_features(x) "
            "and a classifier module (and optionally upsample_logits(z, spatial_size)), as partialseg.networks.HybridDeepLab."
        )
    return features, classifier, getattr(net, "upsample_logits", None)


def _balance_strong(weights: Tensor, y: Tensor, rows: Tensor, strong: Sequence[bool]) -> Tensor:
    """Pixel weights with each class present in a strong row weighing ``1 / (classes present)`` in all."""
    weights = weights.clone()
    for k, is_strong in enumerate(strong):
        if not is_strong:
            continue
        yk = y[int(rows[k])]
        present = torch.unique(yk)
        w = torch.zeros_like(weights[k])
        for c in present:
            m = yk == c
            w[m] = 1.0 / (len(present) * m.sum())
        weights[k] = w
    return weights


class _IndicatorBatch(NamedTuple):
    """One batch of the indicator pass: network 1's last-layer inputs and the instances in it."""

    cases: list[str]
    y: Tensor  # class indices (B, *spatial)
    features: Tensor  # the classifier's input, float32
    classifier: nn.Module
    tail: Callable | None  # logits -> image grid (upsampling), or None
    rows: Tensor  # instance -> batch row
    weights: Tensor  # instance pixel weights
    classes: list  # instance -> class (None: the whole case)


class HybridTrainer(MultiNetworkTrainer):
    """Pan et al.'s hybrid supervision (DII + DCR) on :class:`~partialseg.engines.MultiNetworkTrainer`.

    Args:
        device, max_epochs, train_data_loader: as :class:`~partialseg.engines.MultiNetworkTrainer`.
        **engine_kwargs: passed on to :class:`~partialseg.engines.MultiNetworkTrainer` (``epoch_length``, ``amp``, ...).
        network1, optimizer1: the primary network (``"net1"``, the one inferred with) and its
            optimiser (``"opt1"``; the paper: SGD lr 0.002, momentum 0.9, weight decay 5e-5).
        network2, optimizer2: the auxiliary network (``"net2"``, same architecture, another
            initialisation) and its optimiser (``"opt2"``); required when ``dcr``.
        indicators: the indicators (registered as extra state ``"indicators"``); required when ``dii``.
        indicator_loader: batches (image, label, case) over the training cases, without random
            augmentation, for the indicator update; required when ``dii``.
        dii: learn the indicators (False: gamma = 1 for every case).
        dcr: two networks co-regularized (False: network 1 alone on the gamma-weighted CE).
        tau: iterations between indicator updates (the paper: 400).
        lambda_reg: ``lambda`` of Eq. 7 (4).
        reg_rampup: iterations over which ``lambda`` ramps up linearly from 0 (0: constant, the
            paper, which is silent on a ramp; see ``docs/hybrid.md`` for why one may be needed
            without a pretrained encoder).
        mix: ``"paste"`` (foreground paste) or ``"cutmix"``.
        consistency: ``"ce"`` (pseudo-label CE) or ``"kl"``.
        include_background: let the paste draw the background class.
        pseudo_label_mode: the no-grad forwards that give the pseudo-labels on the other
            tutorial (``f1(x_j)``, ``f2(x_i)``): ``"train"`` (default, the ablation's runs: the
            networks as they train, batch norm normalising by the ``n`` frames' own statistics
            and updating its running statistics) or ``"eval"`` (the networks' inference
            predictions: running statistics, nothing updated; cheaper, another method: see
            ``docs/hybrid.md``, Cost). The predictions on the own tutorial always come from the
            training forward (detached), as the paper mixes them.
        pseudo_label_precision: the dtype of those no-grad forwards: ``"float32"`` (default) or
            ``"bfloat16"`` / ``"float16"`` (``torch.autocast`` around them only: the networks'
            training forwards, backward passes and updates stay in float32; the hard
            pseudo-labels change only where a pixel's logits nearly tie), or ``"auto"``
            (``"bfloat16"`` where the device computes it natively: a CUDA device with bfloat16, a
            CPU with AVX512-BF16 or AMX; else ``"float32"``). Cheaper with large networks (the
            paper's ResNet-50: its forward costs about half), not with small ones; see
            ``docs/hybrid.md``, Cost.
        balance_strong_classes: in ``g_S`` weigh each class present in a strong mask equally
            (its pixels share ``1 / (classes present)`` of the case's weight) instead of by its
            pixel count (the paper's mean pixel CE). Not the paper's Eq. 3: an option for data
            whose strong-set error would otherwise be outvoted by the background (see
            ``docs/results.md``, hybrid ablation, "Why the same indicators work with DCR").
        gradient_method: per-instance gradients: ``"closed_form"``, ``"functional"`` or ``"loop"``.
        seed: seed of the mix draws (iteration ``i`` draws from ``default_rng([seed, i])``).
        image_key, label_key, case_key: batch keys (:class:`HybridBatch`).
        prepare_batch: returns ``(image, label, cases)`` (default :class:`HybridBatch`).

    ``state.output``: ``image``, ``label``, ``pred`` (network 1's probabilities on the primary
    tutorial; the whole batch without DCR), ``loss``, ``loss_sup1``, ``loss_sup2``, ``loss_reg``,
    ``gamma_i``, ``gamma_j`` (mean case gammas), and with DCR ``mix_mask``, ``image_m``,
    ``pseudo1_m``, ``pseudo2_m``.

    Raises:
        ValueError: missing network 2 / optimiser 2 with ``dcr``, indicators or
            ``indicator_loader`` missing with ``dii``, bad options.
        TypeError: with ``dii``, a network 1 without ``forward_features`` / ``classifier``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network1: nn.Module,
        optimizer1: torch.optim.Optimizer,
        network2: nn.Module | None = None,
        optimizer2: torch.optim.Optimizer | None = None,
        indicators: InstanceIndicators | None = None,
        indicator_loader: Iterable | None = None,
        dii: bool = True,
        dcr: bool = True,
        tau: int = 400,
        lambda_reg: float = 4.0,
        reg_rampup: int = 0,
        mix: str = "paste",
        consistency: str = "ce",
        include_background: bool = False,
        pseudo_label_mode: str = "train",
        pseudo_label_precision: str = "float32",
        balance_strong_classes: bool = False,
        gradient_method: str = "closed_form",
        seed: int = 0,
        image_key: str = "image",
        label_key: str = "label",
        case_key: str = "case",
        prepare_batch: Callable | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self.dii, self.dcr = bool(dii), bool(dcr)
        networks, optimizers = {"net1": network1}, {"opt1": optimizer1}
        if self.dcr:
            if network2 is None or optimizer2 is None:
                raise ValueError("dcr=True needs network2 and optimizer2 (the auxiliary network, another initialisation).")
            if unwrap_network(network2) is unwrap_network(network1):
                raise ValueError("network2 must be a separate network (same architecture, another initialisation).")
            networks["net2"], optimizers["opt2"] = network2, optimizer2
        if self.dii:
            if indicators is None or indicator_loader is None:
                raise ValueError("dii=True needs indicators (InstanceIndicators) and an indicator_loader over the training cases.")
            _last_layer(network1)
        self.tau = check_int(tau, "tau", minimum=1)
        self.reg_rampup = check_int(reg_rampup, "reg_rampup", minimum=0)
        self.mix = check_option(mix, MIXES, "mix")
        self.gradient_method = check_option(gradient_method, GRADIENT_METHODS, "gradient_method")
        self.loss_function = DCRLoss(lambda_reg=lambda_reg, consistency=consistency, reduction="none")
        self.include_background = bool(include_background)
        self.pseudo_label_mode = check_option(pseudo_label_mode, ("train", "eval"), "pseudo_label_mode")
        self.pseudo_label_precision = check_option(pseudo_label_precision, PSEUDO_LABEL_PRECISIONS, "pseudo_label_precision")
        self.balance_strong_classes = bool(balance_strong_classes)
        self.seed = check_int(seed, "seed", minimum=0)
        self.indicators = indicators
        self.indicator_loader = indicator_loader
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            networks=networks,
            optimizers=optimizers,
            extra_state={"indicators": indicators} if indicators is not None else None,
            prepare_batch=HybridBatch(image_key, label_key, case_key) if prepare_batch is None else prepare_batch,
            **engine_kwargs,
        )
        self.state.indicator_updates = []
        if self.dii:
            self.add_event_handler(Events.ITERATION_COMPLETED(every=self.tau), lambda engine: engine.update_indicators())

    def pseudo_label_dtype(self) -> torch.dtype:
        """The dtype of the pseudo-label forwards (``pseudo_label_precision``, ``"auto"`` resolved)."""
        if self.pseudo_label_precision != "auto":
            return getattr(torch, self.pseudo_label_precision)
        return torch.bfloat16 if native_bfloat16(self._device_type()) else torch.float32

    def pseudo_label_autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to :meth:`pseudo_label_dtype` (a null context for float32)."""
        dtype = self.pseudo_label_dtype()
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type(), dtype=dtype)

    @property
    def lambda_reg(self) -> float:
        return self.loss_function.lambda_reg

    def current_lambda(self) -> float:
        """``lambda`` at this iteration: ``lambda_reg * min(1, iteration / reg_rampup)``."""
        if self.reg_rampup == 0:
            return self.lambda_reg
        return self.lambda_reg * min(1.0, float(self.state.iteration) / self.reg_rampup)

    @property
    def consistency(self) -> str:
        return self.loss_function.consistency

    # ------------------------------------------------------------------------------ weights

    def _gammas(self, cases: Sequence[str], y: Tensor) -> tuple[Tensor, Tensor | None]:
        """Case gammas ``(n,)`` and, for per-class indicators, pixel weights ``(n, 1, *spatial)``."""
        device = y.device
        if not self.dii or self.indicators is None:
            return torch.ones(len(cases), device=device), None
        gamma = self.indicators.case_gamma(cases).to(device)
        weights = self.indicators.pixel_weights(cases, y, spatial_dims=y.ndim - 1).to(device) if self.indicators.per_class else None
        return gamma, weights

    # ------------------------------------------------------------------------------ iteration

    def train_step(self, batch: tuple[Tensor, Tensor, list[str]]) -> None:
        """One lower-level step: Eq. 7 (DCR) or the gamma-weighted CE of network 1, then the update."""
        if self.dcr:
            self.update(self.compute_dcr_loss(*batch), "opt1", "opt2")
        else:
            self.update(self.compute_single_loss(*batch), "opt1")

    @staticmethod
    def _labels(label: Tensor, spatial_dims: int, image: Tensor | None = None, cases: Sequence[str] = ()) -> Tensor:
        has_channel = label.ndim == spatial_dims + 2
        y = class_indices(label, label.shape[1] if has_channel and label.shape[1] > 1 else None, spatial_dims)
        if image is not None and tuple(y.shape[1:]) != tuple(image.shape[2:]):
            raise ValueError(
                f"cases {list(cases)[:8]}: masks of spatial shape {tuple(y.shape[1:])} for images of {tuple(image.shape[2:])}; "
                "every strong or weak mask must have its image's grid."
            )
        return y

    def compute_single_loss(self, image: Tensor, label: Tensor, cases: list[str]) -> Tensor:
        """DII only (or the merged baseline): ``mean_b gamma_b CE(f1(x_b), y_b)`` over the whole batch."""
        out = self.state.output
        y = self._labels(label, image.ndim - 2, image, cases)
        gamma, weights = self._gammas(cases, y)
        logits = self.networks["net1"](image)
        out.update({Keys.IMAGE: image, Keys.LABEL: label, Keys.PRED: torch.softmax(logits.detach().float(), 1)})
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = weighted_cross_entropy(logits, y, gamma if weights is None else weights).mean()
        zero = torch.zeros((), device=loss.device)
        out.update({"loss_sup1": loss.detach(), "loss_sup2": zero, "loss_reg": zero, "gamma_i": gamma.mean(), "gamma_j": gamma.mean()})
        return loss

    def compute_dcr_loss(self, image: Tensor, label: Tensor, cases: list[str]) -> Tensor:
        """Eq. 4-7 on the batch's pairs (first half primary ``x_i``, second half auxiliary ``x_j``)."""
        if image.shape[0] % 2:
            raise ValueError(f"a DCR batch holds pairs (primary then auxiliary halves), got an odd batch of {image.shape[0]}.")
        n = image.shape[0] // 2
        out = self.state.output
        y = self._labels(label, image.ndim - 2, image, cases)
        x_i, x_j, y_i, y_j = image[:n], image[n:], y[:n], y[n:]
        gamma, weights = self._gammas(cases, y)
        rng = np.random.default_rng([self.seed, int(self.state.iteration)])
        mask = mix_masks(y_i, rng, self.mix, self.include_background)
        paste = ForegroundPaste()
        x_m = paste(x_i, x_j, mask)
        net1, net2 = self.networks["net1"], self.networks["net2"]
        z1_i, z1_m = net1(torch.cat([x_i, x_m])).split(n)
        z2_j, z2_m = net2(torch.cat([x_j, x_m])).split(n)
        with torch.no_grad(), self.pseudo_label_autocast():
            if self.pseudo_label_mode == "eval":
                modes = net1.training, net2.training
                net1.eval(), net2.eval()
                try:
                    z1_j, z2_i = net1(x_j), net2(x_i)
                finally:
                    net1.train(modes[0]), net2.train(modes[1])
            else:
                z1_j, z2_i = net1(x_j), net2(x_i)
        out.update({Keys.IMAGE: x_i, Keys.LABEL: label[:n], Keys.PRED: torch.softmax(z1_i.detach().float(), 1)})
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        if self.consistency == "ce":
            p1 = paste(channel_argmax(z1_i.detach()), channel_argmax(z1_j), mask)
            p2 = paste(channel_argmax(z2_i), channel_argmax(z2_j.detach()), mask)
        else:
            p1 = paste(torch.softmax(z1_i.detach().float(), 1), torch.softmax(z1_j.float(), 1), mask)
            p2 = paste(torch.softmax(z2_i.float(), 1), torch.softmax(z2_j.detach().float(), 1), mask)
        terms = self.loss_function.terms(
            z1_i, y_i, z2_j, y_j, z1_m, z2_m, p1, p2, gamma[:n], gamma[n:],
            None if weights is None else weights[:n], None if weights is None else weights[n:], self.current_lambda(),
        )  # fmt: skip
        out.update({
            "loss_sup1": terms["sup1"].mean().detach(), "loss_sup2": terms["sup2"].mean().detach(),
            "loss_reg": terms["reg"].mean().detach(), "gamma_i": gamma[:n].mean(), "gamma_j": gamma[n:].mean(),
            "mix_mask": mask, "image_m": x_m.detach(), "pseudo1_m": p1, "pseudo2_m": p2,
        })  # fmt: skip
        return terms["loss"].mean()

    # ------------------------------------------------------------------------------ upper level

    def _indicators_for(self, caller: str) -> InstanceIndicators:
        if self.indicators is None or self.indicator_loader is None:
            raise ValueError(f"{caller} needs indicators and an indicator_loader.")
        return self.indicators

    def _indicator_batches(self) -> Iterator[_IndicatorBatch]:
        """Network 1 (eval mode, restored after) over ``indicator_loader``: per batch what the last-layer
        gradients need (:class:`_IndicatorBatch`). Shared by :meth:`indicator_gradients` and :meth:`indicator_dots`.
        """
        ind = self._indicators_for("the indicator pass")
        network = self.networks["net1"]
        features_fn, classifier, upsample = _last_layer(network)
        make_tail = getattr(unwrap_network(network), "logit_tail", None)
        was_training = network.training
        network.eval()
        try:
            for batchdata in self.indicator_loader:
                image, label, cases = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
                sd = image.ndim - 2
                y = self._labels(label, sd, image, cases)
                with torch.no_grad(), self.autocast():
                    features = features_fn(image)
                rows, weights, classes = instance_pixel_weights(y, [ind.instance_classes(c) for c in cases], sd)
                if self.balance_strong_classes:
                    weights = _balance_strong(weights, y, rows, [ind.is_strong(cases[r]) for r in rows.tolist()])
                size = tuple(image.shape[2:])
                tail = None if upsample is None else (lambda z, size=size: upsample(z, size))
                if callable(make_tail):  # the same upsampling as matrices with their transpose (no autograd)
                    tail = make_tail(tuple(features.shape[2:]), size, device=features.device)
                yield _IndicatorBatch(list(cases), y, features.float(), classifier, tail, rows, weights, classes)
        finally:
            network.train(was_training)

    def indicator_gradients(self) -> tuple[Tensor, Tensor, Tensor]:
        """Network 1's last-layer gradients on ``indicator_loader``: ``(g_S, weak rows, g_k)``.

        ``g_S`` ``(n,)`` is the mean over the strong cases' instance gradients (the gradient of the
        mean CE over the strong set), ``g_k`` ``(M', n)`` the gradients of the weak instances seen
        (an instance seen more than once: the mean), ``weak rows`` their indicator rows. Network 1
        runs in eval mode (batch norm's running statistics, so instances do not interact).

        Raises:
            ValueError: no strong case in ``indicator_loader``, a case the indicators do not know.
        """
        ind = self._indicators_for("indicator_gradients")
        strong_sum: Tensor | None = None
        strong_n = 0
        weak_sum: Tensor | None = None
        weak_count = torch.zeros(len(ind), dtype=torch.long)
        for b in self._indicator_batches():
            grads = last_layer_gradients(b.features, b.classifier, b.y, b.rows, b.weights, b.tail, self.gradient_method).cpu()
            if weak_sum is None:
                weak_sum = torch.zeros(len(ind), grads.shape[1], dtype=torch.float64)
                strong_sum = torch.zeros(grads.shape[1], dtype=torch.float64)
            for k, (r, c) in enumerate(zip(b.rows.tolist(), b.classes)):
                case = b.cases[r]
                if ind.is_strong(case):
                    strong_sum += grads[k]
                    strong_n += 1
                else:
                    idx = ind.index[(case, c)]
                    weak_sum[idx] += grads[k]
                    weak_count[idx] += 1
        if strong_n == 0 or strong_sum is None or weak_sum is None:
            raise ValueError("indicator_loader holds no strong case: g_S (the strong set's gradient) cannot be computed.")
        seen = torch.nonzero(weak_count).flatten()
        g_k = (weak_sum[seen] / weak_count[seen, None]).float()
        return (strong_sum / strong_n).float(), seen, g_k

    def indicator_dots(self) -> tuple[Tensor, Tensor]:
        """``(weak rows, d gamma)``: ``-g_S . g_k`` of network 1 on ``indicator_loader``, without the ``g_k``.

        The hot path of :meth:`update_indicators` (``gradient_method="closed_form"``), one pass
        over the loader: the strong cases' closed-form gradients give ``g_S`` (their mean, as
        :meth:`indicator_gradients`); once every strong case of the indicators has been seen, each
        weak instance's ``g_S . g_k`` is taken directly by
        :func:`~partialseg.losses.hybrid.last_layer_gradient_dots` (``g_S`` as a second 1x1
        convolution on the features, upsampled with the logits, dotted with the pixel errors); a
        weak instance met before the last strong case keeps its closed-form ``g_k`` until ``g_S``
        is known. Same values as ``indicator_gradient(*indicator_gradients())`` up to rounding;
        fastest when the loader lists the strong cases first (e.g. over ``sorted(datalist, key=lambda
        c: c["supervision"] != "strong")``; strong cases last cost what the closed-form gradients
        cost). The loader must be deterministic
        (no random augmentation, as for :meth:`indicator_gradients`): a strong case met again
        after all strong cases were seen is skipped (its gradient is the one already counted);
        before that, a repeated case is averaged over its occurrences.

        Raises:
            ValueError: no strong case in ``indicator_loader``, a case the indicators do not know.
        """
        ind = self._indicators_for("indicator_dots")
        strong_all = set(ind.strong)
        strong_sum: dict[str, Tensor] = {}
        strong_count: dict[str, int] = {}
        g_s: Tensor | None = None  # set once every strong case has been seen
        dot_sum = torch.zeros(len(ind), dtype=torch.float64)
        pending: dict[int, Tensor] = {}  # weak row -> sum of its g_k met before g_S was known
        weak_count = torch.zeros(len(ind), dtype=torch.long)
        for b in self._indicator_batches():
            rows, weights = b.rows, b.weights
            is_strong = [ind.is_strong(b.cases[r]) for r in rows.tolist()]
            strong_k = [k for k, s in enumerate(is_strong) if s and (g_s is None)]
            if strong_k:
                sel = torch.tensor(strong_k, device=rows.device)
                grads = last_layer_gradients(b.features, b.classifier, b.y, rows[sel], weights[sel], b.tail, "closed_form").cpu().double()
                for k, g in zip(strong_k, grads):
                    case = b.cases[int(rows[k])]
                    strong_sum[case] = strong_sum[case] + g if case in strong_sum else g
                    strong_count[case] = strong_count.get(case, 0) + 1
                if set(strong_sum) == strong_all:
                    g_s = torch.stack([strong_sum[c] / strong_count[c] for c in ind.strong]).mean(0)
            weak_k = [k for k, s in enumerate(is_strong) if not s]
            if not weak_k:
                continue
            sel = torch.tensor(weak_k, device=rows.device)
            idx = torch.tensor([ind.index[(b.cases[int(rows[k])], b.classes[k])] for k in weak_k])
            weak_count.index_add_(0, idx, torch.ones_like(idx))
            if g_s is not None:
                dots = last_layer_gradient_dots(b.features, b.classifier, b.y, rows[sel], weights[sel], g_s.float(), b.tail)
                dot_sum.index_add_(0, idx, dots.cpu().double())
            else:
                grads = last_layer_gradients(b.features, b.classifier, b.y, rows[sel], weights[sel], b.tail, "closed_form").cpu().double()
                for i, g in zip(idx.tolist(), grads):
                    pending[i] = pending[i] + g if i in pending else g
        if g_s is None and strong_sum:  # not every strong case in the loader: the mean over those seen
            g_s = torch.stack([strong_sum[c] / strong_count[c] for c in strong_sum]).mean(0)
        if g_s is None:
            raise ValueError("indicator_loader holds no strong case: g_S (the strong set's gradient) cannot be computed.")
        for i, g in pending.items():
            dot_sum[i] += g @ g_s
        seen = torch.nonzero(weak_count).flatten()
        return seen, (-dot_sum[seen] / weak_count[seen]).float()

    def update_indicators(self) -> Tensor:
        """Algorithm 1, lines 8-18: ``d gamma_k = -g_S . g_k``, one Adam step, clip. Returns ``d gamma``.

        ``gradient_method="closed_form"`` (default) takes the dot products directly
        (:meth:`indicator_dots`); ``"functional"`` / ``"loop"`` form every ``g_k``
        (:meth:`indicator_gradients`, the references).
        """
        if self.gradient_method == "closed_form":
            rows, grad = self.indicator_dots()
        else:
            g_s, rows, g_k = self.indicator_gradients()
            grad = indicator_gradient(g_s, g_k)
        self.indicators.step(rows, grad)  # type: ignore[union-attr]
        self.state.indicator_updates.append(int(self.state.iteration))
        g = self.indicators.gamma  # type: ignore[union-attr]
        self.logger.info(
            f"iteration {self.state.iteration}: indicators updated ({rows.numel()} weak instances), gamma mean "
            f"{float(g.mean()):.3f}, below 0.1: {int((g < 0.1).sum())}, above 0.9: {int((g > 0.9).sum())}"
        )
        return grad
