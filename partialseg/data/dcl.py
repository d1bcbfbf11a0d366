"""Conditional sampling for DCL's CompNet (Zhang & Zhuang, Algorithm 1, lines 3-4 and 10-11).

:class:`ConditionalDataset` wraps a dataset of transformed cases (``image`` ``(C, *spatial)``,
``label`` the ``<0,p,1>`` map ``(m, *spatial)`` of ``PartialLabelToVectord``) and, for every
target, draws one conditional case per class among the cases that annotate that class, so the
conditional label of class ``j`` is known everywhere (1 inside class ``j``, 0 outside).
:class:`SupportBank` keeps such cases (one binary label each) beside a trained model, so that
inference (:class:`partialseg.inferers.ConditionalInferer`) can draw conditional sets.

Two departures from the paper, the first on by default, both switchable (see docs/dcl.md):

- ``pools="present"``: a case conditions class ``j`` only if its label *holds* ``j``. A case
  may annotate a class that is absent from it (an apical slice annotated "RV" with no RV); as a
  condition it would show the network an all-zero label for a class the target has. The
  paper's pools (``pools="annotated"``) take every case annotating ``j``.
- ``select="similar"`` (opt-in): the condition of a target is drawn among the ``neighbours``
  cases of the pool whose images are most like the target's (:func:`image_distances`), so a
  condition comes from a similar slice level, position and size; ``"random"`` (the default) is
  the paper's uniform draw.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from partialseg._checks import check_int, check_option
from partialseg.transforms.dcl.array import label_view
from partialseg.transforms.partial.array import annotated_mask

__all__ = [
    "ConditionalDataset", "SupportBank", "annotated_classes", "class_pools", "conditional_pools", "image_distances",
    "present_classes",
]

MISSING = ("error", "any")
#: which cases can condition a class: those whose label holds it (default), or every case annotating it (the paper)
POOLS = ("present", "annotated")
#: how a target's conditions are chosen from a pool: uniformly (the paper), or among the most similar images
SELECT = ("random", "similar")


def _class_index(name: Any, num_classes: int, class_names: Sequence[str] | None) -> int:
    if isinstance(name, str):
        if class_names is None:
            raise ValueError(f"annotated class {name!r} is a name: pass class_names (e.g. the dataset.json 'classes') or use indices.")
        if name not in class_names:
            raise ValueError(f"annotated class {name!r} is not one of the class names {list(class_names)}.")
        return list(class_names).index(name)
    return int(name)


def annotated_classes(annotated: Any, num_classes: int, class_names: Sequence[str] | None = None) -> list[int]:
    """Sorted annotated class indices of one case: indices, names (with ``class_names``), ``"all"``, a mask or None.

    Example:
        >>> annotated_classes(["background", "RV"], 4, class_names=["background", "LV", "MYO", "RV"])
        [0, 3]
    """
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes: {list(class_names)}.")
    if isinstance(annotated, str) and annotated != "all":
        annotated = [annotated]
    if isinstance(annotated, (list, tuple)) and any(isinstance(a, str) for a in annotated):
        annotated = [_class_index(a, num_classes, class_names) for a in annotated]
    return annotated_mask(annotated, num_classes).nonzero().flatten().tolist()


def present_classes(label: Tensor, classes: Sequence[int]) -> list[int]:
    """Those of ``classes`` that a ``<0,p,1>`` map ``(m, *spatial)`` holds (a 1 somewhere in their channel).

    Example:
        >>> import torch
        >>> label = torch.zeros(3, 2, 2); label[0] = 1.0  # annotates classes 0 and 2, holds only 0
        >>> present_classes(label, [0, 2])
        [0]
    """
    label = torch.as_tensor(label)
    return [j for j in classes if bool((label[j] == 1).any())]


def image_distances(a: Tensor, b: Tensor, size: int = 16) -> Tensor:
    """Dissimilarity of images ``a`` ``(A, C, *spatial)`` to ``b`` ``(N, C, *spatial)``: ``(A, N)``.

    Each image is average-pooled to at most ``size`` per axis and standardised (zero mean, unit
    std), and the distance is the mean squared difference, ``2 (1 - r)`` with ``r`` the
    correlation of the pooled images: insensitive to gain and offset, sensitive to where and
    how large the bright and dark structures are. Images of other grids than ``a``'s are
    compared after pooling to the same small grid.

    Example:
        >>> import torch
        >>> x = torch.zeros(3, 1, 8, 8); x[0, 0, :4] = 1; x[1, 0, :5] = 1; x[2, 0, 4:] = 1
        >>> image_distances(x[:1], x).argsort(1).tolist()
        [[0, 1, 2]]
    """
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.ndim < 3 or b.ndim != a.ndim or a.shape[1] != b.shape[1]:
        raise ValueError(f"images (A, C, *spatial) and (N, C, *spatial) expected, got {tuple(a.shape)} and {tuple(b.shape)}.")
    grid = tuple(min(size, n) for n in a.shape[2:])
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[a.ndim - 2]

    def feat(x: Tensor) -> Tensor:
        f = pool(x, grid).flatten(1)
        f = f - f.mean(1, keepdim=True)
        return f / f.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-6)

    fa, fb = feat(a), feat(b)
    return (fa.pow(2).mean(1)[:, None] + fb.pow(2).mean(1)[None] - 2.0 * fa @ fb.T / fa.shape[1]).clamp_min(0.0)


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


def conditional_pools(
    annotated: Sequence[Sequence[int]],
    num_classes: int,
    missing: str = "error",
    what: str = "conditional image",
    present: Sequence[Sequence[int]] | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Per class, the cases that can give its conditional image; and the classes no case can give.

    With ``present`` (per case, the annotated classes its label holds) a case conditions only
    the classes it holds (``pools="present"``); without it every annotated class
    (``pools="annotated"``, the paper). A class with no such case is an error
    (``missing="error"``, naming ``what`` the class lacks) or draws from every case
    (``missing="any"``, the classes returned second). Errors name classes by ``class_names``
    (class 0 is "background" without them).

    Example:
        >>> conditional_pools([[1], [1, 2]], 3, missing="any")
        ([[0, 1], [0, 1], [1]], [0])
        >>> conditional_pools([[1], [1, 2]], 3, missing="any", present=[[1], [2]])
        ([[0, 1], [0], [1]], [0])
    """
    check_option(missing, MISSING, "missing")
    if present is not None and len(present) != len(annotated):
        raise ValueError(f"present has {len(present)} entries for {len(annotated)} cases.")
    pools = class_pools(annotated if present is None else present, num_classes)
    empty = [j for j, pool in enumerate(pools) if not pool]
    if empty and missing == "error":
        def named(classes: Sequence[int]) -> str:
            return ", ".join(
                f"{class_names[j]} ({j})" if class_names is not None else ("background (0)" if j == 0 else f"class {j}")
                for j in classes
            )

        absent = [] if present is None else [j for j in empty if any(j in a for a in annotated)]
        note = f" ({named(absent)}: annotated, but absent from every annotating case's label)" if absent else ""
        raise ValueError(
            f"{named(empty)}: {'annotated' if present is None else 'held'} in no case, so no {what}{note};"
            " add cases annotating them (e.g. whole-heart cases for background), or use missing='any' (the"
            " bundle's --missing any), with which the model may predict such a class everywhere."
        )
    for j in empty:
        pools[j] = list(range(len(annotated)))
    return pools, empty


def _scan(
    dataset: Sequence[dict], annotated: Sequence[Sequence[int]], num_classes: int, image_key: str, label_key: str, want_images: bool
) -> tuple[list[list[int]], Tensor | None]:
    """Per case, the annotated classes its label holds; and (``want_images``) every image, stacked."""
    present, images = [], []
    for i, classes in enumerate(annotated):
        if not classes and not want_images:
            present.append([])
            continue
        item = dataset[i]
        label = torch.as_tensor(item[label_key])
        if classes and (label.ndim < 2 or label.shape[0] != num_classes):
            raise ValueError(f"case {i}: {label_key!r} must be the <0,p,1> map with {num_classes} channels, got shape {tuple(label.shape)}.")
        present.append(present_classes(label, classes) if classes else [])
        if want_images:
            images.append(torch.as_tensor(item[image_key]).float())
    if not want_images:
        return present, None
    try:
        return present, torch.stack(images)
    except RuntimeError as e:
        raise ValueError(f"cases differ in size ({e}); crop or pad every case to one size.") from None


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
        annotated: per case, its annotated classes (indices, names with ``class_names``,
            ``"all"`` or a mask); None reads ``dataset.data[i]["annotated"]`` (the datalist of a
            MONAI dataset).
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
        pools: ``"present"`` (default): a case conditions an annotated class only if its label
            holds the class (a 1 in its channel), so no condition has an empty label;
            ``"annotated"``: every annotating case (the paper; an annotated-but-absent case
            then gives an all-zero conditional label). ``"present"`` reads every annotating
            case once here.
        select: ``"random"`` (default, the paper): a condition is drawn uniformly from the
            class's pool; ``"similar"``: from the ``neighbours`` pool cases whose images are
            closest to the target's (:func:`image_distances`, computed once here from every
            case's image), so conditions come from similar slices.
        neighbours: pool size of ``select="similar"`` (fewer when the pool is smaller).
        class_names: the class names, when ``annotated`` holds names (e.g. ``["background"]``).
        reference: the same cases, in the same order, without random transforms (e.g. the
            bundle's support dataset), read instead of ``dataset`` for the presence and the image
            distances; None reads ``dataset`` (a random flip there would then blur ``"similar"``).

    Raises:
        ValueError: bad arguments, or (``missing="error"``) a class without an annotated case
            (with ``pools="present"``: without a case holding it).
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
        pools: str = "present",
        select: str = "random",
        neighbours: int = 4,
        class_names: Sequence[str] | None = None,
        reference: Sequence[dict] | None = None,
    ) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must be a sized, indexable collection of cases, got {type(dataset).__name__}.")
        check_int(num_classes, "num_classes", minimum=2)
        check_option(missing, MISSING, "missing")
        check_option(pools, POOLS, "pools")
        check_option(select, SELECT, "select")
        check_int(neighbours, "neighbours", minimum=1)
        check_int(seed, "seed", minimum=0)
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
        self.annotated = [annotated_classes(a, num_classes, class_names) for a in annotated]
        self.pools_mode, self.select, self.neighbours = pools, select, int(neighbours)
        present, images = None, None
        if reference is not None and (not hasattr(reference, "__len__") or len(reference) != len(dataset)):
            raise ValueError(f"reference must hold the same {len(dataset)} cases as dataset, got {type(reference).__name__}"
                             f" of length {len(reference) if hasattr(reference, '__len__') else '?'}.")
        if pools == "present" or select == "similar":
            present, images = _scan(dataset if reference is None else reference, self.annotated, num_classes, image_key, label_key, select == "similar")
        #: per case, the annotated classes its label holds (None with pools="annotated")
        self.present = present if pools == "present" else None
        self.pools, self.missing_classes = conditional_pools(
            self.annotated, num_classes, missing, present=self.present, class_names=class_names
        )
        #: (N, N) image distances between the cases (select="similar"), else None
        self.distances = image_distances(images, images) if images is not None else None
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
            if self.distances is not None and len(pool) > self.neighbours:
                d = self.distances[case, pool]
                pool = [pool[i] for i in sorted(d.argsort(dim=0, stable=True)[: self.neighbours].tolist())]
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
        classes: ``(N,)`` class index of each entry (or a list of names, with ``class_names``).
        num_classes: ``m``.
        class_names: the class names, when ``classes`` holds names.

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

    def __init__(self, images: Tensor, labels: Tensor, classes: Tensor | Sequence[int | str], num_classes: int,
                 class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        check_int(num_classes, "num_classes", minimum=2)
        if not isinstance(classes, Tensor) and any(isinstance(c, str) for c in classes):
            classes = [_class_index(c, num_classes, class_names) for c in classes]
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
        pools: str = "present",
        class_names: Sequence[str] | None = None,
    ) -> SupportBank:
        """Pick up to ``per_class`` cases for each class (reproducibly from ``seed``).

        Args:
            dataset: transformed cases (``image`` ``(C, *spatial)``, ``label`` the ``<0,p,1>`` map).
            num_classes: ``m``.
            annotated: per case, its annotated classes (indices, or names with ``class_names``);
                None reads ``dataset.data[i]["annotated"]``.
            per_class: entries per class (fewer when fewer cases can give one); 0 keeps every
                case (for ``ConditionalInferer(select="similar")``, which picks per target).
            seed: seed of the choice.
            missing: a class no case can give: ``"error"`` raises ``ValueError``, ``"any"``
                draws its entries from every case (as ``ConditionalDataset(missing="any")``).
            pools: ``"present"`` (default): only cases whose label holds the class (no empty
                entry); ``"annotated"``: every case annotating it (the paper; reads only the
                chosen cases).
            class_names: the class names, when ``annotated`` holds names.
        """
        check_int(per_class, "per_class", minimum=0)
        check_option(missing, MISSING, "missing")
        check_option(pools, POOLS, "pools")
        if annotated is None:
            data = getattr(dataset, "data", None)
            if data is None:
                raise ValueError("annotated=None needs dataset.data (a MONAI dataset's datalist); pass annotated.")
            annotated = [case.get("annotated") for case in data]
        if len(annotated) != len(dataset):
            raise ValueError(f"annotated has {len(annotated)} entries for {len(dataset)} cases.")
        annotated = [annotated_classes(a, num_classes, class_names) for a in annotated]
        present = _scan(dataset, annotated, num_classes, image_key, label_key, False)[0] if pools == "present" else None
        class_pools_, _ = conditional_pools(
            annotated, num_classes, missing, "support bank entry", present=present, class_names=class_names
        )
        rng = np.random.default_rng(seed)
        images, labels, classes = [], [], []
        cache: dict[int, dict] = {}
        for j, pool in enumerate(class_pools_):
            n = len(pool) if per_class == 0 else min(per_class, len(pool))
            for i in sorted(rng.choice(len(pool), size=n, replace=False).tolist()):
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
