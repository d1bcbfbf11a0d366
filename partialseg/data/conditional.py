"""Conditional sampling for DCL's CompNet (Zhang & Zhuang, Algorithm 1, lines 3-4 and 10-11).

:class:`ConditionalDataset` wraps a dataset of transformed cases (``image`` ``(C, *spatial)``,
``label`` the ``<0,p,1>`` map ``(m, *spatial)`` of ``PartialLabelToVectord``) and, for every
target, draws one conditional case per class among the cases that annotate that class, so the
conditional label of class ``j`` is known everywhere (1 inside class ``j``, 0 outside).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from partialseg.transforms.conditional.array import label_view
from partialseg.transforms.partial.array import annotated_mask

__all__ = ["ConditionalDataset", "annotated_classes", "class_pools"]

MISSING = ("error", "any")


def annotated_classes(annotated: Any, num_classes: int) -> list[int]:
    """Sorted annotated class indices of one case (indices, ``"all"``, a mask or None)."""
    return annotated_mask(annotated, num_classes).nonzero().flatten().tolist()


def class_pools(annotated: Sequence[Sequence[int]], num_classes: int) -> list[list[int]]:
    """For every class, the indices of the cases annotating it.

    Example:
        >>> class_pools([[1], [0, 1, 2], [2]], 3)
        [[1], [0, 1], [1, 2]]
    """
    pools: list[list[int]] = [[] for _ in range(num_classes)]
    for i, classes in enumerate(annotated):
        for j in classes:
            pools[j].append(i)
    return pools


class ConditionalDataset(torch.utils.data.Dataset):
    """Targets with one conditional image-label pair per class, drawn reproducibly.

    Each item is the target's dictionary plus

    - ``cond_image_key``: ``(m * C, *spatial)``, the conditional images of classes ``0..m-1``;
    - ``cond_label_key``: ``(m, *spatial)``, channel ``j`` = channel ``j`` of the ``<0,p,1>``
      map of the conditional case of class ``j`` (binary: that case annotates class ``j``);
    - ``"cond_index"``: ``(m,)`` int64, the dataset indices of the conditional cases;
    - ``"target_classes"``: ``(m,)`` float mask of the classes the target (view) annotates.

    The draws of item ``i`` come from ``numpy.random.default_rng([seed, epoch, i])``: the same
    seed, epoch and index give the same conditional cases in any worker or process order;
    :meth:`set_epoch` gives new draws (DCLTrainer calls it whenever a pass over the data starts,
    before the loader's workers copy the dataset).

    Full-annotation mode (``split_annotated=True``, the paper's section 4.1.4): a case annotating
    ``k > 1`` classes is ``k`` single-label targets, each seeing only one of its classes
    (:func:`~partialseg.transforms.label_view`); as a conditional case it serves every class it
    annotates. Unlabelled cases are targets too (their all-``p`` label adds no loss, but the
    dual task of stage 2 still uses them) and never conditions.

    Args:
        dataset: a sequence of transformed cases (e.g. ``monai.data.CacheDataset``); every case
            must have the same spatial shape (crop or pad in its transform).
        num_classes: number of classes ``m``.
        annotated: per case, its annotated classes (indices, ``"all"`` or a mask); None reads
            ``dataset.data[i]["annotated"]`` (the datalist of a MONAI dataset).
        seed: seed of the draws.
        split_annotated: full-annotation mode (see above); False keeps each case as one target.
        missing: a class that no case annotates: ``"error"`` raises ``ValueError``;
            ``"any"`` draws its condition from every case, whose label channel may then hold
            unknown entries (they add no prior loss). The default never gives a condition that
            lacks its class.
        exclude_self: don't draw the target's own case as its condition when another case
            annotates the class.
        p: value of unknown entries (for the single-label views).
        image_key, label_key: keys of the image and the ``<0,p,1>`` map in the cases.
        cond_image_key, cond_label_key: output keys.

    Raises:
        ValueError: bad arguments, or (``missing="error"``) a class without an annotated case.
        TypeError: ``dataset`` is not a sized, indexable collection.

    Example:
        >>> import torch
        >>> cases = [{"image": torch.full((1, 2, 2), float(i)), "label": torch.eye(3)[:, i].view(3, 1, 1).expand(3, 2, 2)} for i in range(3)]
        >>> ds = ConditionalDataset(cases, num_classes=3, annotated=[[0], [1], [2]], seed=0)
        >>> item = ds[0]
        >>> item["cond_image"][:, 0, 0].tolist(), item["cond_index"].tolist()
        ([0.0, 1.0, 2.0], [0, 1, 2])
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        num_classes: int,
        annotated: Sequence[Any] | None = None,
        seed: int = 0,
        split_annotated: bool = True,
        missing: str = "error",
        exclude_self: bool = True,
        p: float = 0.5,
        image_key: str = "image",
        label_key: str = "label",
        cond_image_key: str = "cond_image",
        cond_label_key: str = "cond_label",
    ) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must be a sized, indexable collection of cases, got {type(dataset).__name__}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        if missing not in MISSING:
            raise ValueError(f"missing must be one of {list(MISSING)}, got {missing!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        if not 0.0 < float(p) < 1.0:
            raise ValueError(f"p must lie strictly between 0 and 1, got {p!r}.")
        self.dataset = dataset
        self.num_classes = num_classes
        if annotated is None:
            data = getattr(dataset, "data", None)
            if data is None or len(data) != len(dataset):
                raise ValueError("annotated=None needs dataset.data (a MONAI dataset's datalist) with one entry per case; pass annotated.")
            annotated = [case.get("annotated") for case in data]
        if len(annotated) != len(dataset):
            raise ValueError(f"annotated has {len(annotated)} entries for {len(dataset)} cases.")
        self.annotated = [annotated_classes(a, num_classes) for a in annotated]
        self.pools = class_pools(self.annotated, num_classes)
        empty = [j for j, pool in enumerate(self.pools) if not pool]
        if empty and missing == "error":
            raise ValueError(
                f"class(es) {empty} are annotated in no case, so they have no conditional image;"
                " add cases annotating them (e.g. whole-heart cases for background) or use missing='any'."
            )
        for j in empty:
            self.pools[j] = list(range(len(dataset)))
        self.missing_classes = empty
        # target views: (case index, annotated classes of the view)
        self.views: list[tuple[int, tuple[int, ...] | None]] = []
        for i, classes in enumerate(self.annotated):
            if split_annotated and len(classes) > 1:
                self.views.extend((i, (j,)) for j in classes)
            else:
                self.views.append((i, None))
        self.seed = int(seed)
        self.epoch = 0
        self.pass_index = 0
        self.split_annotated = bool(split_annotated)
        self.exclude_self = bool(exclude_self)
        self.p = float(p)
        self.image_key, self.label_key = image_key, label_key
        self.cond_image_key, self.cond_label_key = cond_image_key, cond_label_key

    def __len__(self) -> int:
        return len(self.views)

    def set_epoch(self, epoch: int, pass_index: int = 0) -> None:
        """Use the draws of ``epoch`` from now on.

        ``pass_index`` numbers the passes over the data that start within one epoch (more than
        one when an epoch is longer than the loader): pass ``k > 0`` draws from
        ``default_rng([seed, epoch, i, k])``, pass 0 as before.
        """
        self.epoch = int(epoch)
        self.pass_index = int(pass_index)

    def draw(self, index: int) -> list[int]:
        """The conditional case indices (one per class) of target view ``index``."""
        if not 0 <= index < len(self.views):
            raise IndexError(f"index {index} is outside [0, {len(self.views)}).")
        case = self.views[index][0]
        key = [self.seed, self.epoch, index] + ([self.pass_index] if self.pass_index else [])
        rng = np.random.default_rng(key)
        out = []
        for pool in self.pools:
            if self.exclude_self and len(pool) > 1 and case in pool:
                pool = [c for c in pool if c != case]
            out.append(int(pool[rng.integers(len(pool))]))
        return out

    def __getitem__(self, index: int) -> dict:
        case, classes = self.views[index]
        target = dict(self.dataset[case])
        label = torch.as_tensor(target[self.label_key])
        m = self.num_classes
        if label.shape[0] != m:
            raise ValueError(f"case {case}: {self.label_key!r} must be the <0,p,1> map with {m} channels, got shape {tuple(label.shape)}.")
        if classes is not None:
            target[self.label_key] = label_view(label, classes, self.p)
        mask = torch.zeros(m)
        mask[list(classes if classes is not None else self.annotated[case])] = 1.0
        target["target_classes"] = mask
        cond_index = self.draw(index)
        image = torch.as_tensor(target[self.image_key])
        cond_images, cond_labels = [], []
        for j, c in enumerate(cond_index):
            item = target if c == case else self.dataset[c]
            img, lab = torch.as_tensor(item[self.image_key]), torch.as_tensor(item[self.label_key] if c != case else label)
            if c != case and lab.shape[0] != m:
                raise ValueError(f"conditional case {c} (class {j}): {self.label_key!r} must be the <0,p,1> map with {m} channels, got shape {tuple(lab.shape)}.")
            if img.shape != image.shape or lab.shape[1:] != image.shape[1:]:
                raise ValueError(
                    f"conditional case {c} (class {j}) has image {tuple(img.shape)} / label {tuple(lab.shape)}, the target case"
                    f" {case} has image {tuple(image.shape)}: crop or pad every case to one size."
                )
            cond_images.append(img)
            cond_labels.append(lab[j])
        target[self.cond_image_key] = torch.cat(cond_images, 0)
        target[self.cond_label_key] = torch.stack(cond_labels, 0)
        target["cond_index"] = torch.as_tensor(cond_index, dtype=torch.int64)
        return target
