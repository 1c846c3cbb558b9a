"""What a strategy yields: a :class:`StepPlan` per optimizer step, made of :class:`MicroBatch` es (one
forward each, every row at its cut), and the helpers that shape them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["MicroBatch", "StepPlan", "chunks", "mask_above", "mask_single", "pack_steps", "round_to_levels"]


@dataclass
class MicroBatch:
    """Samples of one forward: ``indices``, the lowest cut ``depth`` (nothing below it runs backward), the
    per-layer ``trainable`` mask (length m, False below ``depth``, True at ``depth``) and, under the
    per-row schedule, ``row_depths``: each sample's own cut (>= ``depth``), which the runner applies row
    by row. Without ``row_depths`` every sample is cut at ``depth``. ``weight``: the loss weight of the
    forward; 1 in a plan, set by :func:`~salf_engine.schedule.sampling.rank_slice` for one rank's share so
    that the averaged gradient of all ranks equals one process's."""

    indices: list[int]
    depth: int
    trainable: list[bool]
    row_depths: list[int] | None = None
    weight: float = 1.0

    @property
    def depths(self) -> list[int]:
        """The cut of every sample."""
        return list(self.row_depths) if self.row_depths is not None else [self.depth] * len(self.indices)

    @property
    def runner_depth(self) -> int | list[int]:
        """What the runner's ``depth`` argument takes for this forward."""
        return list(self.row_depths) if self.row_depths is not None else self.depth


@dataclass
class StepPlan:
    """One optimizer step: its micro-batches, whose gradients accumulate before the update, and the
    strategy's frozen floor at the step (``Strategy.floor``; where the prefix cache enters)."""

    micro_batches: list[MicroBatch]
    floor: int = 0

    @property
    def indices(self) -> list[int]:
        """Every sample of the step, micro-batch by micro-batch."""
        return [i for mb in self.micro_batches for i in mb.indices]

    @property
    def depths(self) -> list[int]:
        """The (lowest) cut of each micro-batch."""
        return [mb.depth for mb in self.micro_batches]

    def __len__(self) -> int:
        return sum(len(mb.indices) for mb in self.micro_batches)


def pack_steps(micro_batches: Iterable[MicroBatch], step_size: int, micro_batch_size: int
               ) -> Iterator[StepPlan]:
    """Group micro-batches into steps of exactly ``step_size`` examples (the last one may hold fewer).

    A micro-batch larger than ``micro_batch_size`` or than the room left in the step is split (the parts
    keep its cut and mask). Lazy: it pulls a micro-batch only when the current step needs one.
    """
    current: list[MicroBatch] = []
    room = step_size
    for mb in micro_batches:
        rest = list(mb.indices)
        while rest:
            take = min(len(rest), room, micro_batch_size)
            done = len(mb.indices) - len(rest)
            rows = None if mb.row_depths is None else mb.row_depths[done : done + take]
            current.append(MicroBatch(rest[:take], mb.depth, mb.trainable, rows))
            rest = rest[take:]
            room -= take
            if room == 0:
                yield StepPlan(current)
                current, room = [], step_size
    if current:
        yield StepPlan(current)


def round_to_levels(depths: list[int], levels: int | None) -> list[int]:
    """Each depth rounded down to one of at most ``levels`` cut levels chosen to lose the least saving.

    The levels are distinct depths of the list (the smallest always among them); a depth becomes the
    largest level at or below it, so no row is ever frozen deeper than assigned. Chosen by dynamic
    programming to maximize the sum of the rounded depths. ``None``: the depths as they are.
    """
    values = sorted(set(depths))
    if levels is None or len(values) <= levels:
        return list(depths)
    count = {v: depths.count(v) for v in values}
    n = len(values)

    def kept(lo: int, hi: int) -> int:  # values[lo:hi] all rounded down to values[lo]
        return sum(count[values[j]] for j in range(lo, hi)) * values[lo]

    # best[j][l]: the most depth kept by values[j:] with l levels, values[j] being one of them
    best = [[-1] * (levels + 1) for _ in range(n + 1)]
    choice = [[n] * (levels + 1) for _ in range(n + 1)]
    for j in range(n - 1, -1, -1):
        best[j][1] = kept(j, n)
        for lv in range(2, levels + 1):
            for nxt in range(j + 1, n):
                if best[nxt][lv - 1] >= 0 and kept(j, nxt) + best[nxt][lv - 1] > best[j][lv]:
                    best[j][lv], choice[j][lv] = kept(j, nxt) + best[nxt][lv - 1], nxt
    chosen, j, lv = [], 0, levels
    while j < n:
        chosen.append(values[j])
        j, lv = (choice[j][lv], lv - 1) if lv > 1 else (n, 0)
    return [max(c for c in chosen if c <= d) for d in depths]


def mask_above(depth: int, m: int) -> list[bool]:
    return [i >= depth for i in range(m)]


def mask_single(depth: int, m: int) -> list[bool]:
    return [i == depth for i in range(m)]


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]
