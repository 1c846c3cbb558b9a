"""Step plans as batches, and each rank's share of a step's forwards.

:class:`PlanBatchSampler` turns a strategy's step plans into one batch per optimizer step (its
micro-batches tagged), and :func:`rank_slice` gives each of ``num_replicas`` ranks its own share of every
micro-batch: the plan is a function of (seed, epoch, eofs), so every rank computes the same plan and
trains the same cuts at every step without any communication.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch.utils.data import Sampler

from salf_engine.errors import ConfigError
from salf_engine.schedule.plans import MicroBatch

__all__ = ["PlanBatchSampler", "rank_slice"]


def _check_rank(rank: int, num_replicas: int) -> None:
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ConfigError(f"rank must be in 0..num_replicas-1, got rank {rank} of {num_replicas}")


def rank_slice(plan: Any, rank: int = 0, num_replicas: int = 1) -> list[MicroBatch]:
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
        out.append(MicroBatch(mine or list(mb.indices[:1]), mb.depth, list(mb.trainable), rows, weight))
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
        self.pending: list[list[MicroBatch]] = []

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

