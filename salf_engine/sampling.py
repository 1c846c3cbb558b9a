"""Depth buckets: batches whose samples all share one freeze depth, so one runner cut serves the batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from .errors import ConfigError

__all__ = ["DepthBucketSampler"]


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
