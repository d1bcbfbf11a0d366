"""Inference with conditional images for DCL's CompNet.

:class:`~partialseg.data.dcl.SupportBank` (in the data layer) holds training cases (an image and its
binary label of one class each), saved beside the model so a bundle is self-contained. :class:`ConditionalInferer` draws ``K``
conditional sets (one bank entry per class) from it, runs CompNet on the target with each set
(through any MONAI inferer, e.g. ``SlidingWindowInferer``: the target and its conditions are
concatenated along channels first, so every window crops them at the same positions) and
averages the ``m``-class probabilities ``z_cap + z_delta``. ``select="similar"`` gives each
target its own sets instead: for every class, the bank entries whose images are most like the
target's.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import ResizeWithPadOrCrop
from torch import Tensor, nn

from partialseg._checks import check_int, check_option
from partialseg.data.dcl import SELECT, SupportBank, image_distances
from partialseg.networks.dcl import compnet_segment, pack_conditional_input

__all__ = ["ConditionalInferer", "SupportBank"]  # SupportBank re-exported from partialseg.data.dcl

#: how ConditionalInferer brings the bank's conditions to another grid
MATCH = ("pad", "resize", "error")


class ConditionalInferer(Inferer):
    """Average CompNet's ``m``-class output over ``K`` conditional sets from a support bank.

    Set ``k`` is drawn with ``numpy.random.default_rng([seed, k])``: the same ``K`` sets for
    every target, so inference is deterministic. When the target's grid differs from the
    bank's (a larger image at the training spacing, run through a ``SlidingWindowInferer``), the
    conditions are brought to it:

    - ``match="pad"`` (default): centrally zero-padded or cropped (MONAI's
      ``ResizeWithPadOrCrop``, as training brings every case to one size), so a structure in a
      condition keeps its size in voxels, the same physical size as in the target;
    - ``match="resize"``: interpolated (images (bi/tri)linear, labels ``nearest-exact``, both
      voxel-centre aligned), which changes the conditions' scale;
    - ``match="error"``: ``ValueError``.

    The ``K`` sets, drawn and matched, are kept for the last grid, device and dtype seen (a bank
    is not meant to change; make a new inferer if it does).

    ``select="similar"``: set ``k`` of a target holds, for every class, the bank entry of that
    class whose image is the ``k``-th most like the target's (:func:`~partialseg.data.dcl.image_distances`
    on the whole input, before any sliding window; cycling when a class has fewer than ``K``
    entries), so conditions come from similar slices. Build the bank with more entries per
    class (``SupportBank.from_dataset(..., per_class=0)`` keeps every case). Deterministic, no
    ``seed``.

    Args:
        support: a :class:`SupportBank` (or the path of one saved with :meth:`SupportBank.save`).
        num_samples: ``K``, the number of conditional sets.
        seed: seed of the draws.
        inferer: the MONAI inferer run on the packed input (default ``SimpleInferer``); a
            ``SlidingWindowInferer`` crops target and conditions at the same positions.
        match: ``"pad"``, ``"resize"`` or ``"error"`` (see above).
        select: ``"random"`` (default; the same sets for every target) or ``"similar"`` (see above).

    Returns (when called):
        ``(B, m, *spatial)`` averaged class probabilities.

    Example:
        >>> import torch
        >>> from partialseg.networks import CompNet
        >>> bank = SupportBank(torch.rand(3, 1, 16, 16), torch.ones(3, 16, 16), torch.tensor([0, 1, 2]), num_classes=3)
        >>> net = CompNet(2, 1, 3, backbone_kwargs={"channels": (4, 8), "strides": (2,)}).eval()
        >>> ConditionalInferer(bank, num_samples=2)(torch.rand(2, 1, 16, 16), net).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(
        self,
        support: SupportBank | str | os.PathLike,
        num_samples: int = 1,
        seed: int = 0,
        inferer: Inferer | None = None,
        match: str = "pad",
        select: str = "random",
    ) -> None:
        super().__init__()
        if isinstance(support, (str, os.PathLike)):
            support = SupportBank.load(support)
        if not isinstance(support, SupportBank):
            raise TypeError(f"support must be a SupportBank or the path of one, got {type(support).__name__}.")
        check_int(num_samples, "num_samples", minimum=1)
        check_int(seed, "seed", minimum=0)
        check_option(match, MATCH, "match")
        check_option(select, SELECT, "select")
        if inferer is not None and not callable(inferer):
            raise TypeError(f"inferer must be a MONAI inferer, got {type(inferer).__name__}.")
        self.support, self.num_samples, self.seed, self.match, self.select = support, num_samples, seed, match, select
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def conditions(self, k: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """Conditional set ``k`` as ``(B, m * C, *spatial)`` images and ``(B, m, *spatial)`` labels for target ``like``."""
        key = (k, tuple(like.shape[2:]), like.device, like.dtype)
        if key not in self._cache:
            if any(old[1:] != key[1:] for old in self._cache):
                self._cache.clear()  # a new grid, device or dtype: keep only the sets of the current one
            self._cache[key] = self._draw(k, like)
        cond_image, cond_label = self._cache[key]
        b = like.shape[0]
        return cond_image.expand(b, *cond_image.shape), cond_label.expand(b, *cond_label.shape)

    def similar_conditions(self, k: int, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Set ``k`` of ``select="similar"``: per target and class, the ``k``-th most similar bank entry.

        Returns ``(B, m * C, *spatial)`` images and ``(B, m, *spatial)`` labels on ``inputs``' grid.
        """
        key = ("all", tuple(inputs.shape[2:]), inputs.device, inputs.dtype)
        if key not in self._cache:
            if any(old[1:] != key[1:] for old in self._cache):
                self._cache.clear()
            bank = self.support
            images, labels = self._match(bank.images.flatten(0, 1), bank.labels, inputs)
            self._cache[key] = (images.reshape(bank.images.shape[0], bank.images.shape[1], *images.shape[1:]), labels)
        images, labels = self._cache[key]
        dist = image_distances(inputs.detach().float(), images.float())  # (B, N)
        picks = []
        for pool in self.support.pools:
            idx = torch.as_tensor(pool, device=dist.device)
            order = dist[:, idx].argsort(dim=1, stable=True)  # (B, n_j)
            picks.append(idx[order[:, k % len(pool)]])
        sel = torch.stack(picks, 1)  # (B, m) entry indices
        return images[sel].flatten(1, 2), labels[sel]

    def _match(self, cond_image: Tensor, cond_label: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """Bring ``(n, *bank spatial)`` images and labels to ``like``'s grid, device and dtype."""
        cond_image = cond_image.to(like.device, like.dtype)
        cond_label = cond_label.to(like.device, like.dtype)
        spatial, bank = tuple(like.shape[2:]), tuple(cond_image.shape[1:])
        if len(bank) != len(spatial):
            raise ValueError(f"the support bank holds {len(bank)}D cases {bank}, the target is {len(spatial)}D {spatial}.")
        if bank != spatial:
            if self.match == "error":
                raise ValueError(f"the support bank's grid {bank} differs from the target's {spatial} (match='error').")
            if self.match == "pad":
                fit = ResizeWithPadOrCrop(spatial)
                cond_image, cond_label = fit(cond_image), fit(cond_label)
            else:
                mode = "bilinear" if len(spatial) == 2 else "trilinear"
                cond_image = F.interpolate(cond_image[None], size=spatial, mode=mode, align_corners=False)[0]
                cond_label = F.interpolate(cond_label[None], size=spatial, mode="nearest-exact")[0]
            cond_image, cond_label = torch.as_tensor(cond_image), torch.as_tensor(cond_label)
        return cond_image, cond_label

    def _draw(self, k: int, like: Tensor) -> tuple[Tensor, Tensor]:
        return self._match(*self.support.draw(np.random.default_rng([self.seed, k])), like)

    def __call__(self, inputs: Tensor, network: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        """
        Args:
            inputs: ``(B, C, *spatial)`` target images.
            network: CompNet (or any module mapping the packed input to ``2m`` logits).
        """
        if inputs.ndim < 3:
            raise ValueError(f"inputs must be (B, C, *spatial), got shape {tuple(inputs.shape)}.")
        m = self.support.num_classes
        if self.support.images.shape[1] != inputs.shape[1]:
            raise ValueError(f"the support images have {self.support.images.shape[1]} channel(s), the inputs {inputs.shape[1]}.")
        net_classes = getattr(getattr(network, "module", network), "num_classes", None)  # CompNet, or CompNet in DDP
        if isinstance(net_classes, int) and net_classes != m:
            raise ValueError(f"the support bank has {m} classes, the network {net_classes}: use the bank saved with this model.")

        def segment(x: Tensor, *a: Any, **kw: Any) -> Tensor:
            return compnet_segment(network(x, *a, **kw))

        total = None
        for k in range(self.num_samples):
            cond_image, cond_label = self.similar_conditions(k, inputs) if self.select == "similar" else self.conditions(k, inputs)
            x = pack_conditional_input(inputs, cond_image, cond_label)
            out = self.inferer(x, segment, *args, **kwargs)
            if out.shape[1] != m:
                raise ValueError(f"the network gave {out.shape[1]} classes, the support bank has {m}.")
            total = out if total is None else total + out
        return total / self.num_samples  # type: ignore[operator]
