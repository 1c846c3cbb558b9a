"""Budgeted SALF as Algorithm 4 is written (the ``paper`` depth schedule)."""

from __future__ import annotations

from collections.abc import Iterator

from salf_engine.schedule.budgets import assign_depths, budget_quotas
from salf_engine.schedule.plans import MicroBatch, chunks
from salf_engine.schedule.sample_depth import SampleDepthStrategy

__all__ = ["PaperScheduleStrategy"]


class PaperScheduleStrategy(SampleDepthStrategy):
    """Budgeted SALF as Algorithm 4 is written: for depth k = 0, 1, .., m-1 in turn, train on unused
    samples whose eof, recomputed when depth k is visited (through :attr:`probe`), is at most k, until
    depth k's quota is met; fill what is left of the quota with random unused samples. Steps hold
    ``step_size`` examples at one cut (a step that finishes one depth's quota continues with the next
    depth as a second micro-batch)."""

    _state_attrs = (*SampleDepthStrategy._state_attrs, "probed")

    def __init__(self, name: str, *, budget: str, infill: str, **kwargs) -> None:
        super().__init__(name, _paper_quota_depths(budget, infill), order="ascending", refresh=True,
                         cuts_per_step=1, **kwargs)
        self.budget = budget
        self.infill = infill
        self.probed = 0

    def _micro_batches(self, epoch: int, step_size: int, micro_size: int) -> Iterator[MicroBatch]:
        m = self.num_layers
        quotas = budget_quotas(self.budget, self.infill, m, self.num_samples)
        order = self._shuffled(epoch)
        assert self.eofs is not None
        used = [False] * self.num_samples
        depths = [0] * self.num_samples
        for k, quota in enumerate(quotas):
            chosen: list[int] = []
            taken: set[int] = set()
            candidates = [i for i in order if not used[i] and (self.eofs[i] is None or self.eofs[i] <= k)]
            pos = 0
            while len(chosen) < quota and pos < len(candidates):
                batch = candidates[pos : pos + step_size]
                pos += len(batch)
                if self.probe is not None:
                    for i, e in zip(batch, self.probe(batch), strict=True):
                        self.eofs[i] = int(e)
                    self.probed += len(batch)
                fits = [i for i in batch if self.eofs[i] is not None and self.eofs[i] <= k]
                chosen += fits[: quota - len(chosen)]
            taken.update(chosen)
            for i in order:
                if len(chosen) == quota:
                    break
                if not used[i] and i not in taken:
                    chosen.append(i)
            for i in chosen:
                used[i] = True
                depths[i] = min(k, m - 1)
            for chunk in chunks(chosen, step_size):
                yield MicroBatch(chunk, depths[chunk[0]], self._mask(depths[chunk[0]], m))
        self.depths = depths


def _paper_quota_depths(budget: str, infill: str):
    def depths(s: SampleDepthStrategy, eofs: list[int | None] | None) -> list[int]:
        # the depths of the paper schedule are decided while it runs; before that, Algorithm 4's
        # eof-matching on the profiled eofs is what it expects
        return assign_depths(eofs or [None] * s.num_samples, budget, infill, s.num_layers, seed=s.seed)

    return depths
