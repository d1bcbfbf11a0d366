"""Sampling a union of partially labelled datasets.

Shi et al. (marginal and exclusion losses, section 4.2) train on a union of sources with "500
patches from each training dataset" per epoch: every source weighs the same, whatever its size,
so a small fully labelled set is not drowned by large single-organ sets. Drawing uniformly over
cases (a plain shuffled ``DataLoader``) weighs each source by its number of cases instead.
:class:`SourceBalancedSampler` gives the former, on one process or split over DDP ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

__all__ = ["SourceBalancedSampler"]


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
        if isinstance(per_source, bool) or not isinstance(per_source, int) or per_source < 1:
            raise ValueError(f"per_source must be a positive int, got {per_source!r}.")
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = int(num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1))
        self.rank = int(rank if rank is not None else (dist.get_rank() if distributed else 0))
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside [0, {self.num_replicas}).")
        self.per_source, self.key, self.seed, self.epoch = per_source, key, int(seed), 0
        self.shuffle, self.drop_last = True, False
        self.total_size = per_source * len(self.pools)
        self.num_samples = -(-self.total_size // self.num_replicas)

    def epoch_indices(self) -> list[int]:
        """The whole epoch (every rank's indices), in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        drawn: list[int] = []
        for name in sorted(self.pools):
            pool = np.asarray(self.pools[name])
            reps = -(-self.per_source // len(pool))
            drawn.extend(np.concatenate([rng.permutation(pool) for _ in range(reps)])[: self.per_source].tolist())
        return [drawn[i] for i in rng.permutation(len(drawn))]

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_indices()
        padded = self.num_samples * self.num_replicas
        while len(order) < padded:  # wrap around (more than once when ranks outnumber the epoch)
            order += order[: padded - len(order)]
        return iter(order[self.rank : padded : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples

    def counts(self) -> dict[str, int]:
        """Cases per source in the data."""
        return {name: len(pool) for name, pool in sorted(self.pools.items())}

