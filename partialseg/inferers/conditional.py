"""Inference with conditional images for DCL's CompNet.

:class:`SupportBank` holds training cases (an image and its binary label of one class each),
saved beside the model so a bundle is self-contained. :class:`ConditionalInferer` draws ``K``
conditional sets (one bank entry per class) from it, runs CompNet on the target with each set
(through any MONAI inferer, e.g. ``SlidingWindowInferer``: the target and its conditions are
concatenated along channels first, so every window crops them at the same positions) and
averages the ``m``-class probabilities ``z_cap + z_delta``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import ResizeWithPadOrCrop
from torch import Tensor, nn

from partialseg.data.conditional import annotated_classes, class_pools
from partialseg.networks.compnet import compnet_segment, pack_conditional_input

__all__ = ["ConditionalInferer", "SupportBank"]

#: how ConditionalInferer brings the bank's conditions to another grid
MATCH = ("pad", "resize", "error")


class SupportBank(nn.Module):
    """Conditional image-label pairs for inference, as buffers (``state_dict`` / ``torch.save``).

    Entry ``n`` is an image ``images[n]`` ``(C, *spatial)``, the class ``classes[n]`` it
    conditions, and the label of that class ``labels[n]`` ``(*spatial)``: binary (1 inside, 0
    outside) when the case annotates the class; the case's ``<0,p,1>`` channel when no case
    annotates it (``from_dataset(..., missing="any")``, as ``ConditionalDataset`` in training).
    Every class has at least one entry.

    Args:
        images: ``(N, C, *spatial)``.
        labels: ``(N, *spatial)`` values in ``[0, 1]``.
        classes: ``(N,)`` class index of each entry.
        num_classes: ``m``.

    Raises:
        ValueError: shapes disagree, a label lies outside ``[0, 1]``, a class is outside ``[0, m)`` or has
            no entry.

    Example:
        >>> import torch
        >>> bank = SupportBank(torch.rand(2, 1, 4, 4), torch.ones(2, 4, 4), torch.tensor([0, 1]), num_classes=2)
        >>> import numpy as np
        >>> img, lab = bank.draw(np.random.default_rng(0))
        >>> tuple(img.shape), tuple(lab.shape)
        ((2, 4, 4), (2, 4, 4))
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: Tensor, num_classes: int) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        images, labels, classes = torch.as_tensor(images), torch.as_tensor(labels), torch.as_tensor(classes).long().reshape(-1)
        if images.ndim < 3 or labels.shape != (images.shape[0], *images.shape[2:]) or classes.shape != (images.shape[0],):
            raise ValueError(
                f"images (N, C, *spatial), labels (N, *spatial) and classes (N,) expected, got {tuple(images.shape)},"
                f" {tuple(labels.shape)}, {tuple(classes.shape)}."
            )
        if labels.numel() and (float(labels.min()) < 0 or float(labels.max()) > 1):
            raise ValueError(f"support labels must lie in [0, 1], found [{float(labels.min())}, {float(labels.max())}].")
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
            raise ValueError(f"support classes {sorted(set(classes.tolist()))} are outside [0, {num_classes}).")
        empty = sorted(set(range(num_classes)) - set(classes.tolist()))
        if empty:
            raise ValueError(f"class(es) {empty} have no support entry.")
        self.num_classes = num_classes
        self.register_buffer("images", images.float())
        self.register_buffer("labels", labels.float())
        self.register_buffer("classes", classes)

    @property
    def pools(self) -> list[list[int]]:
        """For every class, the indices of its entries."""
        return class_pools([[c] for c in self.classes.tolist()], self.num_classes)

    def draw(self, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """One conditional set: ``(m * C, *spatial)`` images and ``(m, *spatial)`` labels."""
        idx = [pool[int(rng.integers(len(pool)))] for pool in self.pools]
        return self.images[idx].flatten(0, 1), self.labels[idx]

    @classmethod
    def from_dataset(
        cls,
        dataset: Sequence[dict],
        num_classes: int,
        annotated: Sequence[Any] | None = None,
        per_class: int = 4,
        seed: int = 0,
        missing: str = "error",
        image_key: str = "image",
        label_key: str = "label",
    ) -> SupportBank:
        """Pick up to ``per_class`` cases annotating each class (reproducibly from ``seed``).

        Args:
            dataset: transformed cases (``image`` ``(C, *spatial)``, ``label`` the ``<0,p,1>`` map).
            num_classes: ``m``.
            annotated: per case, its annotated classes; None reads ``dataset.data[i]["annotated"]``.
            per_class: entries per class (fewer when fewer cases annotate the class).
            seed: seed of the choice.
            missing: a class no case annotates: ``"error"`` raises ``ValueError``, ``"any"``
                draws its entries from every case (as ``ConditionalDataset(missing="any")``).
        """
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"per_class must be a positive int, got {per_class!r}.")
        if annotated is None:
            data = getattr(dataset, "data", None)
            if data is None:
                raise ValueError("annotated=None needs dataset.data (a MONAI dataset's datalist); pass annotated.")
            annotated = [case.get("annotated") for case in data]
        pools = class_pools([annotated_classes(a, num_classes) for a in annotated], num_classes)
        empty = [j for j, pool in enumerate(pools) if not pool]
        if missing not in ("error", "any"):
            raise ValueError(f"missing must be 'error' or 'any', got {missing!r}.")
        if empty and missing == "error":
            raise ValueError(f"class(es) {empty} are annotated in no case of the dataset; the support bank needs each class (or missing='any').")
        for j in empty:
            pools[j] = list(range(len(dataset)))
        rng = np.random.default_rng(seed)
        images, labels, classes = [], [], []
        cache: dict[int, dict] = {}
        for j, pool in enumerate(pools):
            for i in sorted(rng.choice(len(pool), size=min(per_class, len(pool)), replace=False).tolist()):
                case = pool[i]
                if case not in cache:  # each case loaded (and transformed) once
                    cache[case] = dataset[case]
                item = cache[case]
                label = torch.as_tensor(item[label_key])
                if label.ndim < 2 or label.shape[0] != num_classes:
                    raise ValueError(
                        f"case {case}: {label_key!r} must be the <0,p,1> map with {num_classes} channels (PartialLabelToVectord),"
                        f" got shape {tuple(label.shape)}."
                    )
                images.append(torch.as_tensor(item[image_key]).float())
                labels.append(label[j].float())
                classes.append(j)
        try:
            return cls(torch.stack(images), torch.stack(labels), torch.tensor(classes), num_classes)
        except RuntimeError as e:
            raise ValueError(f"support cases differ in size ({e}); crop or pad every case to one size.") from None

    def save(self, path: str | os.PathLike) -> None:
        """``torch.save`` the bank (buffers and ``num_classes``) to ``path``."""
        torch.save({"num_classes": self.num_classes, **{k: v.cpu() for k, v in self.state_dict().items()}}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> SupportBank:
        """Load a bank written by :meth:`save`."""
        d = torch.load(path, map_location=map_location, weights_only=True)
        return cls(d["images"], d["labels"], d["classes"], int(d["num_classes"]))


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

    Args:
        support: a :class:`SupportBank` (or the path of one saved with :meth:`SupportBank.save`).
        num_samples: ``K``, the number of conditional sets.
        seed: seed of the draws.
        inferer: the MONAI inferer run on the packed input (default ``SimpleInferer``); a
            ``SlidingWindowInferer`` crops target and conditions at the same positions.
        match: ``"pad"``, ``"resize"`` or ``"error"`` (see above).

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

    def __init__(self, support: SupportBank | str | os.PathLike, num_samples: int = 1, seed: int = 0, inferer: Inferer | None = None, match: str = "pad") -> None:
        super().__init__()
        if isinstance(support, (str, os.PathLike)):
            support = SupportBank.load(support)
        if not isinstance(support, SupportBank):
            raise TypeError(f"support must be a SupportBank or the path of one, got {type(support).__name__}.")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        if match not in MATCH:
            raise ValueError(f"match must be one of {MATCH}, got {match!r}.")
        if inferer is not None and not callable(inferer):
            raise TypeError(f"inferer must be a MONAI inferer, got {type(inferer).__name__}.")
        self.support, self.num_samples, self.seed, self.match = support, num_samples, seed, match
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

    def _draw(self, k: int, like: Tensor) -> tuple[Tensor, Tensor]:
        cond_image, cond_label = self.support.draw(np.random.default_rng([self.seed, k]))
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
            cond_image, cond_label = self.conditions(k, inputs)
            x = pack_conditional_input(inputs, cond_image, cond_label)
            out = self.inferer(x, segment, *args, **kwargs)
            if out.shape[1] != m:
                raise ValueError(f"the network gave {out.shape[1]} classes, the support bank has {m}.")
            total = out if total is None else total + out
        return total / self.num_samples  # type: ignore[operator]
