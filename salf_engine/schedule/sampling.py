"""Depth buckets and step plans as batches, and each rank's share of a step's forwards.

:class:`DepthBucketSampler` buckets samples by a fixed per-sample depth. :class:`PlanBatchSampler` turns a
strategy's step plans into one batch per optimizer step (its micro-batches tagged), and
:func:`rank_slice` gives each of ``num_replicas`` ranks its own share of every micro-batch: the plan is a
function of (seed, epoch, eofs), so every rank computes the same plan and trains the same cuts at every
step without any communication.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from salf_engine.errors import ConfigError
from salf_engine.schedule.strategies import MicroBatch

__all__ = ["DepthBucketSampler", "LocalMicroBatch", "PlanBatchSampler", "rank_slice"]


def _check_depths(depths: Sequence[int]) -> list[int]:
    values = torch.as_tensor(depths).tolist() if isinstance(depths, torch.Tensor) else list(depths)
    for i, d in enumerate(values):
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ConfigError(f"depths must be non-negative ints; sample {i} has depth {d!r}")
    return values


class DepthBucketSampler(Sampler[list[int]]):
    """Batch sampler yielding lists of sample indices that share one depth (use as ``batch_sampler=``).

    Per epoch, samples are grouped by depth, shuffled within each depth, cut into batches of at most
    ``batch_size`` (the last batch of a depth is dropped with ``drop_last``), and the batches of all
    depths are interleaved in a shuffled order. The order is a function of ``(seed, epoch)`` only; call
    ``set_epoch`` before each epoch, as with ``DistributedSampler``. Without ``shuffle`` the batches
    come depth by depth, ascending, with indices in ascending order.
    """

    def __init__(
        self,
        depths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self._depths = _check_depths(depths)  # depths of the epoch being (or last) iterated
        self._pending: list[int] | None = None  # set_depths: used from the next epoch on

    @property
    def depths(self) -> list[int]:
        """The per-sample depths the next epoch will use (pending ones from ``set_depths`` included)."""
        return list(self._pending if self._pending is not None else self._depths)

    def set_depths(self, depths: Sequence[int]) -> None:
        """New per-sample depths (e.g. refreshed eof-layers); they take effect at the next ``__iter__``."""
        values = _check_depths(depths)
        if len(values) != len(self._depths):
            raise ConfigError(f"set_depths got {len(values)} depths for {len(self._depths)} samples")
        self._pending = values

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``__iter__`` yields."""
        self.epoch = int(epoch)

    def depth_of(self, batch: Sequence[int]) -> int:
        """The shared depth of a batch yielded by the current epoch."""
        return self._depths[batch[0]]

    def _buckets(self, depths: list[int]) -> dict[int, list[int]]:
        buckets: dict[int, list[int]] = {}
        for index, depth in enumerate(depths):
            buckets.setdefault(depth, []).append(index)
        return dict(sorted(buckets.items()))

    def _batches(self, depths: list[int]) -> list[list[int]]:
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        batches: list[list[int]] = []
        for members in self._buckets(depths).values():
            if self.shuffle:
                order = torch.randperm(len(members), generator=gen).tolist()
                members = [members[i] for i in order]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    continue
                batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        if self._pending is not None:
            self._depths, self._pending = self._pending, None
        # the whole epoch is planned here, so set_depths during the epoch cannot change it
        return iter(self._batches(self._depths))

    def __len__(self) -> int:
        counts = [len(v) for v in self._buckets(self.depths).values()]
        if self.drop_last:
            return sum(c // self.batch_size for c in counts)
        return sum(math.ceil(c / self.batch_size) for c in counts)


@dataclass
class LocalMicroBatch(MicroBatch):
    """One rank's share of a micro-batch: its sample ``indices`` (with their ``row_depths`` under the
    per-row schedule), the shared lowest cut ``depth`` and ``trainable`` mask, and the loss ``weight`` that
    makes the averaged gradient of all ranks equal one process's."""

    weight: float = 1.0


def _check_rank(rank: int, num_replicas: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ConfigError(f"rank must be in 0..num_replicas-1, got rank {rank} of {num_replicas}")


def rank_slice(plan: Any, rank: int = 0, num_replicas: int = 1) -> list[LocalMicroBatch]:
    """``rank``'s share of every micro-batch of a step plan (samples ``rank::num_replicas``).

    Every rank gets the same number of micro-batches with the same lowest cut and mask (so the same
    ``requires_grad`` flags), so DDP's gradient hooks stay in step; under the per-row schedule each rank's
    rows keep their own cuts (``row_depths``), which may differ between ranks. Each example weighs
    ``num_replicas / len(plan)`` (DDP averages over ranks: 1 / len(plan) in all). A rank whose share of a
    micro-batch is empty runs its first sample with weight 0.
    """
    _check_rank(rank, num_replicas)
    total = len(plan)
    out = []
    for mb in plan.micro_batches:
        mine = list(mb.indices[rank::num_replicas])
        weight = len(mine) * num_replicas / total
        rows = None if mb.row_depths is None else list(mb.row_depths[rank::num_replicas] or mb.row_depths[:1])
        out.append(LocalMicroBatch(mine or list(mb.indices[:1]), mb.depth, list(mb.trainable), rows, weight))
    return out


class PlanBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler with one batch per optimizer step: the rank's share of the step plan, as
    ``(sample index, micro-batch number)`` pairs (use as ``batch_sampler=`` over a dataset that accepts such
    keys, e.g. ``salf_engine.integrations.hf.PlanDataset``).

    Args:
        plans: ``plans(epoch)`` -> that epoch's step plans (e.g. ``StrategyDriver.epoch_plans`` bound to the
            step and micro-batch sizes); consumed lazily, one plan per batch.
        steps_per_epoch: the number of plans per epoch (``len``).
        rank / num_replicas: this process and the world size.

    Each yielded batch's micro-batches are appended to :attr:`pending` (first in, first out) for the
    training step that consumes the batch. The epoch advances with every new iteration (or ``set_epoch``).
    """

    def __init__(self, plans: Callable[[int], Iterable[Any]], steps_per_epoch: int, *, rank: int = 0,
                 num_replicas: int = 1) -> None:
        _check_rank(rank, num_replicas)
        self.plans = plans
        self.steps_per_epoch = int(steps_per_epoch)
        self.rank = rank
        self.num_replicas = num_replicas
        self.epoch = 0
        self.pending: list[list[LocalMicroBatch]] = []

    def set_epoch(self, epoch: int) -> None:
        """Plan epoch ``epoch`` on the next iteration."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        # the next iteration plans the next epoch even when this one is never run to its end (the HF
        # Trainer fetches exactly steps_per_epoch batches and leaves the iterator suspended)
        self.epoch = epoch + 1
        for plan in self.plans(epoch):
            local = rank_slice(plan, self.rank, self.num_replicas)
            self.pending.append(local)
            yield [(i, k) for k, mb in enumerate(local) for i in mb.indices]

    def __len__(self) -> int:
        return self.steps_per_epoch

