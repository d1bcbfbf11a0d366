"""Samplers for the training loader: a union of sources drawn evenly, two streams per batch.

Shi et al. (marginal and exclusion losses, section 4.2) train on a union of sources with "500
patches from each training dataset" per epoch: every source weighs the same, whatever its size,
so a small fully labelled set is not drowned by large single-organ sets. Drawing uniformly over
cases (a plain shuffled ``DataLoader``) weighs each source by its number of cases instead.
:class:`SourceBalancedSampler` gives the former, on one process or split over DDP ranks.

Semi- and weakly supervised methods (DTML's 20% labelled, the hybrid method's few strong masks
among many weak ones) instead put a fixed number of items of each kind in every batch:
:class:`TwoStreamBatchSampler` (Yu et al.'s UA-MT sampler, made reproducible per epoch and split
over DDP ranks). :func:`training_sampler` picks one of them from a bundle's ``sampling`` key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from partialseg._checks import check_int, check_option

__all__ = ["SAMPLINGS", "FlatBatches", "SourceBalancedSampler", "TwoStreamBatchSampler", "replicas", "stream", "training_sampler"]

#: the values of a bundle's ``sampling`` key (:func:`training_sampler`)
SAMPLINGS = ("case", "source", "two_stream")


def replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """DDP world size and rank: the arguments, else ``torch.distributed``'s, else 1 and 0.

    Example:
        >>> replicas(None, None), replicas(4, 3)
        ((1, 0), (4, 3))
    """
    distributed = dist.is_available() and dist.is_initialized()
    world = check_int(num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1), "num_replicas", minimum=1)
    rank = check_int(rank if rank is not None else (dist.get_rank() if distributed else 0), "rank")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside [0, {world}).")
    return world, rank


def _shard(order: list, num_replicas: int, rank: int) -> list:
    """Rank ``rank``'s share of one epoch: padded by wrapping around to a multiple of
    ``num_replicas`` (more than once when ranks outnumber the epoch), then every
    ``num_replicas``-th element from ``rank``."""
    padded = -(-len(order) // num_replicas) * num_replicas
    order = list(order)
    while len(order) < padded:
        order += order[: padded - len(order)]
    return order[rank:padded:num_replicas]


def stream(pool: np.ndarray, length: int, rng: np.random.Generator) -> list[int]:
    """``length`` draws from ``pool``: fresh permutations one after the other, so every index is
    drawn once before any is drawn twice.

    Example:
        >>> draws = stream(np.arange(3), 5, np.random.default_rng(0))
        >>> sorted(draws[:3]), len(draws)
        ([0, 1, 2], 5)
    """
    reps = -(-length // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:length].tolist()


#: former private names (kept for earlier imports)
_replicas, _stream = replicas, stream


def _sources_of(data: Any, key: str) -> list[str]:
    items = getattr(data, "data", data)  # a MONAI Dataset keeps its datalist in .data
    sources = []
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            if key not in item:
                raise ValueError(f"case {i} ({item.get('case', item.get('image', '?'))}) has no {key!r}; its keys are {sorted(item)}.")
            sources.append(str(item[key]))
        else:
            sources.append(str(item))
    if not sources:
        raise ValueError("SourceBalancedSampler needs at least one case.")
    return sources


class SourceBalancedSampler(DistributedSampler):
    """Each epoch, the same number of cases from every source, shuffled together.

    Source ``s`` contributes ``per_source`` indices per epoch (default: the size of the largest
    source): its cases in a fresh random order, repeated (each repeat reshuffled) when
    ``per_source`` exceeds its size, so every case of a source is drawn before any is drawn
    twice. The draws of an epoch depend only on ``seed`` and the epoch (``set_epoch``, which MONAI's
    workflows call at every epoch start because this is a ``DistributedSampler``).

    Under DDP (``torch.distributed`` initialised, or ``num_replicas`` / ``rank`` given) the epoch's
    list is padded by wrapping around to a multiple of ``num_replicas`` and rank ``r`` takes every
    ``num_replicas``-th index from ``r``: ranks see disjoint parts of one balanced epoch.

    Args:
        data: the datalist (dicts with a ``key`` entry, e.g. ``bundle_datalist(...)``), a MONAI
            ``Dataset`` over one, or the source name of every case.
        per_source: indices drawn from each source per epoch (None: the largest source's size).
        key: the entry naming the source.
        seed: seed of the draws.
        num_replicas, rank: DDP world size and rank (None: from ``torch.distributed`` when it is
            initialised, else 1 and 0).

    Raises:
        ValueError: no case, a case without ``key``, ``per_source`` < 1, a bad rank.

    Example:
        >>> sampler = SourceBalancedSampler(["full"] * 2 + ["liver"] * 6, seed=0)
        >>> idx = list(sampler)
        >>> len(idx), sum(i < 2 for i in idx), sum(i >= 2 for i in idx)
        (12, 6, 6)
    """

    def __init__(
        self,
        data: Any,
        per_source: int | None = None,
        key: str = "source",
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        sources = _sources_of(data, key)
        self.pools: dict[str, list[int]] = {}
        for i, s in enumerate(sources):
            self.pools.setdefault(s, []).append(i)
        if per_source is None:
            per_source = max(len(p) for p in self.pools.values())
        per_source = check_int(per_source, "per_source", minimum=1)
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        self.per_source, self.key, self.seed, self.epoch = per_source, key, int(seed), 0
        self.shuffle, self.drop_last = True, False
        self.total_size = per_source * len(self.pools)
        self.num_samples = -(-self.total_size // self.num_replicas)

    def epoch_indices(self) -> list[int]:
        """The whole epoch (every rank's indices), in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        drawn: list[int] = []
        for name in sorted(self.pools):
            drawn.extend(_stream(np.asarray(self.pools[name]), self.per_source, rng))
        return [drawn[i] for i in rng.permutation(len(drawn))]

    def __iter__(self) -> Iterator[int]:
        return iter(_shard(self.epoch_indices(), self.num_replicas, self.rank))

    def __len__(self) -> int:
        return self.num_samples

    def counts(self) -> dict[str, int]:
        """Cases per source in the data."""
        return {name: len(pool) for name, pool in sorted(self.pools.items())}


def _indices(values: Sequence[int], name: str) -> np.ndarray:
    out = [check_int(v, f"{name} index", minimum=0) for v in values]
    if not out:
        raise ValueError(f"the {name} stream is empty: TwoStreamBatchSampler needs at least one {name} index.")
    if len(set(out)) != len(out):
        raise ValueError(f"the {name} stream holds an index more than once: {sorted(i for i in set(out) if out.count(i) > 1)[:5]}.")
    return np.asarray(out, dtype=np.int64)


class TwoStreamBatchSampler(Sampler):
    """Batches of ``primary_per_batch`` primary then ``secondary_per_batch`` secondary indices.

    The primary stream (labelled, or strongly labelled, cases) and the secondary stream
    (unlabelled, or weakly labelled) are each drawn as fresh permutations one after the other, so
    within an epoch every index of a stream is drawn once before any is drawn twice; batch ``b``
    holds primary draws ``[b p, (b + 1) p)`` then secondary draws ``[b s, (b + 1) s)`` (the
    primary items first: a method splits a collated batch at ``p``). An epoch has ``num_batches``
    batches (default: one pass of the primary stream, ``ceil(len(primary) / p)``, as Yu et al.'s
    UA-MT sampler) and depends only on ``seed`` and the epoch (``set_epoch``).

    Under DDP the epoch's batches are padded by wrapping around to a multiple of ``num_replicas``
    and rank ``r`` takes every ``num_replicas``-th batch from ``r`` (as
    :class:`SourceBalancedSampler` splits its indices): each rank its own whole batches.

    Use it as a torch ``DataLoader``'s ``batch_sampler``; MONAI's workflows call ``set_epoch``
    only on a loader's ``sampler``, so inside a MONAI trainer either call ``set_epoch`` at each
    epoch start or pass :meth:`as_sampler` as the ``sampler`` with ``batch_size =``
    :attr:`batch_size` (what :func:`training_sampler` returns for the bundles): the same batches,
    and MONAI calls its ``set_epoch``.

    Args:
        primary: dataset indices of the primary stream.
        secondary: dataset indices of the secondary stream (disjoint from ``primary``).
        primary_per_batch: primary indices per batch (>= 1).
        secondary_per_batch: secondary indices per batch (>= 1).
        num_batches: batches per epoch over all ranks (None: ``ceil(len(primary) / primary_per_batch)``).
        seed: seed of the draws.
        num_replicas, rank: DDP world size and rank (None: from ``torch.distributed`` when it is
            initialised, else 1 and 0).

    Raises:
        ValueError: an empty stream, an index repeated or in both streams, a count < 1, a bad rank.
        TypeError: an index or count that is not an int.

    Example:
        >>> sampler = TwoStreamBatchSampler(primary=[0, 1, 2], secondary=[3, 4, 5, 6, 7, 8], primary_per_batch=1,
        ...                                 secondary_per_batch=2, seed=0)
        >>> batches = list(sampler)
        >>> len(batches), [sum(i < 3 for i in b) for b in batches], sorted(b[0] for b in batches)
        (3, [1, 1, 1], [0, 1, 2])
        >>> sorted(i for b in batches for i in b[1:])
        [3, 4, 5, 6, 7, 8]
    """

    def __init__(
        self,
        primary: Sequence[int],
        secondary: Sequence[int],
        primary_per_batch: int,
        secondary_per_batch: int,
        num_batches: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.primary, self.secondary = _indices(primary, "primary"), _indices(secondary, "secondary")
        both = np.intersect1d(self.primary, self.secondary)
        if both.size:
            raise ValueError(f"indices {both[:5].tolist()} are in both the primary and the secondary stream.")
        self.primary_per_batch = check_int(primary_per_batch, "primary_per_batch", minimum=1)
        self.secondary_per_batch = check_int(secondary_per_batch, "secondary_per_batch", minimum=1)
        if num_batches is None:
            num_batches = -(-len(self.primary) // self.primary_per_batch)
        self.num_batches = check_int(num_batches, "num_batches", minimum=1)
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        self.seed, self.epoch = check_int(seed, "seed"), 0

    @classmethod
    def from_datalist(
        cls,
        data: Any,
        primary_per_batch: int,
        secondary_per_batch: int,
        key: str = "annotated",
        predicate: Callable[[Mapping], bool] | None = None,
        **kwargs: Any,
    ) -> TwoStreamBatchSampler:
        """Streams from a datalist: primary = the items whose ``key`` is present and non-empty
        (default: labelled cases, those with a non-empty ``annotated``), or those for which
        ``predicate(item)`` is true; secondary = the rest. ``kwargs`` go to the constructor.

        Example:
            >>> data = [{"annotated": [0, 1]}, {"annotated": []}, {"image": "c"}, {"annotated": [2]}]
            >>> s = TwoStreamBatchSampler.from_datalist(data, 1, 1)
            >>> s.primary.tolist(), s.secondary.tolist()
            ([0, 3], [1, 2])
        """
        items = getattr(data, "data", data)  # a MONAI Dataset keeps its datalist in .data
        chosen = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise TypeError(f"item {i} of the datalist is a {type(item).__name__}, not a dict.")
            chosen.append(bool(predicate(item)) if predicate is not None else _present(item.get(key)))
        primary = [i for i, c in enumerate(chosen) if c]
        secondary = [i for i, c in enumerate(chosen) if not c]
        what = "the predicate" if predicate is not None else f"a non-empty {key!r}"
        if not primary or not secondary:
            raise ValueError(
                f"{len(primary)} of {len(chosen)} items have {what}: both streams need at least one item "
                f"(primary: {len(primary)}, secondary: {len(secondary)})."
            )
        return cls(primary, secondary, primary_per_batch, secondary_per_batch, **kwargs)

    @property
    def batch_size(self) -> int:
        """Indices per batch: ``primary_per_batch + secondary_per_batch``."""
        return self.primary_per_batch + self.secondary_per_batch

    def set_epoch(self, epoch: int) -> None:
        """Draw the batches of ``epoch`` from now on."""
        self.epoch = check_int(epoch, "epoch")

    def epoch_batches(self) -> list[list[int]]:
        """The whole epoch (every rank's batches), in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        p, s, n = self.primary_per_batch, self.secondary_per_batch, self.num_batches
        first, second = _stream(self.primary, n * p, rng), _stream(self.secondary, n * s, rng)
        return [first[b * p : (b + 1) * p] + second[b * s : (b + 1) * s] for b in range(n)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(_shard(self.epoch_batches(), self.num_replicas, self.rank))

    def __len__(self) -> int:
        return -(-self.num_batches // self.num_replicas)

    def as_sampler(self) -> FlatBatches:
        """This sampler's batches one index after another, as a ``DistributedSampler`` (so MONAI's
        workflows call ``set_epoch``); a loader with ``batch_size =`` :attr:`batch_size` (and
        ``drop_last=False``) regroups them into exactly these batches."""
        return FlatBatches(self)


def _present(value: Any) -> bool:
    if value is None:
        return False
    try:
        return len(value) > 0
    except TypeError:
        return True


class FlatBatches(DistributedSampler):
    """A batch sampler's batches flattened into one index sequence (see
    :meth:`TwoStreamBatchSampler.as_sampler`); ``set_epoch`` reaches the batch sampler.

    Example:
        >>> flat = TwoStreamBatchSampler([0, 1], [2, 3], 1, 1, seed=0).as_sampler()
        >>> len(flat), sorted(flat), flat.batch_size
        (4, [0, 1, 2, 3], 2)
    """

    def __init__(self, batch_sampler: TwoStreamBatchSampler) -> None:
        self.batch_sampler = batch_sampler
        self.shuffle, self.drop_last, self.seed = True, False, batch_sampler.seed

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    @property
    def batch_size(self) -> int:
        """The batch size a loader must use to regroup the batches."""
        return self.batch_sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return (i for batch in self.batch_sampler for i in batch)

    def __len__(self) -> int:
        return len(self.batch_sampler) * self.batch_sampler.batch_size


def training_sampler(
    sampling: str,
    datalist: Sequence[Mapping],
    dataset: Any,
    distributed: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    primary_per_batch: int | None = None,
    primary_key: str = "annotated",
    num_batches: int | None = None,
) -> Any:
    """The training ``DataLoader``'s ``sampler`` for a bundle's ``sampling`` setting.

    - ``"case"``: every case equally likely (None: the loader shuffles; under DDP MONAI's
      ``DistributedSampler`` over ``dataset``, shuffled, evenly divisible);
    - ``"source"``: every source equally likely, whatever its number of cases
      (:class:`SourceBalancedSampler` over ``datalist``'s ``source`` entries,
      one epoch's draws split over the ranks under DDP), as Shi et al. sample their union;
    - ``"two_stream"``: every batch of ``batch_size`` holds ``primary_per_batch`` items whose
      ``primary_key`` is non-empty (labelled cases, by default) and ``batch_size -
      primary_per_batch`` others (:class:`TwoStreamBatchSampler`, flattened with
      :meth:`~TwoStreamBatchSampler.as_sampler`: the loader keeps ``sampler`` and
      ``batch_size``, regroups exactly these batches, and MONAI calls ``set_epoch``; whole
      batches split over the ranks under DDP).

    Args:
        sampling: ``"case"``, ``"source"`` or ``"two_stream"``.
        datalist: the training datalist (``bundle_datalist``'s entries).
        dataset: the dataset over ``datalist`` (for MONAI's ``DistributedSampler``).
        distributed: ``"case"`` under DDP.
        seed: seed of the ``"source"`` and ``"two_stream"`` draws.
        batch_size: the loader's batch size (``"two_stream"`` only; required there).
        primary_per_batch: primary items per batch (``"two_stream"``; None: ``batch_size // 2``).
        primary_key: the entry that marks a primary item (``"two_stream"``).
        num_batches: batches per epoch over all ranks (``"two_stream"``; None: one pass of the
            primary stream). A trainer with a fixed ``epoch_length`` passes ``epoch_length x
            world size``, so that each epoch draws fresh batches (else ignite restarts the
            exhausted loader within the epoch, repeating its batches).

    Raises:
        ValueError: an unknown ``sampling``; for ``"two_stream"``, no ``batch_size``, a
            ``primary_per_batch`` outside ``[1, batch_size)``, or an empty stream.

    Example:
        >>> data = [{"annotated": [1]}, {"annotated": [1]}, {"annotated": []}, {"annotated": []}]
        >>> training_sampler("case", data, data) is None
        True
        >>> s = training_sampler("two_stream", data, data, batch_size=2)  # 1 labelled + 1 unlabelled per batch
        >>> len(s), s.batch_size, [b[0] < 2 <= b[1] for b in s.batch_sampler]
        (4, 2, [True, True])
    """
    sampling = check_option(sampling, SAMPLINGS, "sampling")
    if sampling == "source":
        return SourceBalancedSampler(datalist, seed=seed)
    if sampling == "two_stream":
        if batch_size is None:
            raise ValueError("sampling 'two_stream' needs the loader's batch_size (training_sampler(..., batch_size=...)).")
        batch_size = check_int(batch_size, "batch_size", minimum=2)
        if primary_per_batch is None:
            primary_per_batch = batch_size // 2
        primary_per_batch = check_int(primary_per_batch, "primary_per_batch", minimum=1, maximum=batch_size - 1)
        return TwoStreamBatchSampler.from_datalist(
            datalist, primary_per_batch, batch_size - primary_per_batch, key=primary_key, seed=seed, num_batches=num_batches
        ).as_sampler()
    if not distributed:
        return None
    from monai.data import DistributedSampler as MonaiDistributedSampler

    return MonaiDistributedSampler(dataset, even_divisible=True, shuffle=True)
