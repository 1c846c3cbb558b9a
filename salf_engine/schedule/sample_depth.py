"""Strategies with a depth per sample: SALF (Algorithm 3, and budgeted with its depth assignments and
schedules) and LIFT; the depth functions that place samples in a budget plan."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

import torch

from salf_engine.deviation.compute import eof_layers
from salf_engine.errors import ConfigError, positive_int
from salf_engine.schedule.base import Strategy
from salf_engine.schedule.budgets import (
    assign_depths,
    assign_depths_by_class,
    assign_depths_by_class_rank,
    budget_quotas,
    fill_quotas,
)
from salf_engine.schedule.names import DEFAULT_CUTS_PER_STEP
from salf_engine.schedule.plans import (
    MicroBatch,
    chunks,
    mask_above,
    mask_single,
    round_to_levels,
)

__all__ = ["DEFAULT_CUTS_PER_STEP", "ROW_ORDERS", "SampleDepthStrategy", "algorithm3_depths", "lift_depths",
           "quota_depths", "salf_depths"]

#: Schedules whose forwards take ``micro_size`` rows of the shuffled order, each row at its own cut.
ROW_ORDERS = ("per-row", "narrowing", "widening", "rising", "stepped")
#: Row orders that spread their depths over the whole run (the floor rises; ``begin`` needs the epochs).
RUN_ORDERS = ("rising", "stepped")


class SampleDepthStrategy(Strategy):
    """A depth per sample (SALF, LIFT), visited in micro-batches that each share one cut.

    Micro-batches are runs of ``ceil(step_size / cuts_per_step)`` samples in depth order (samples of one
    depth interleaved class by class, so a micro-batch mixes classes whenever its depth holds several);
    a run that straddles two depths is cut at the lower one, so no sample is ever frozen deeper than its
    depth. ``order``: ``"mixed"`` shuffles the micro-batches, so every optimizer step holds
    ``cuts_per_step`` random cuts; ``"rotation"`` visits depths front to end, again and again (LIFT);
    ``"ascending"`` visits depth 0 first and narrows the trained scope (Algorithm 4's order);
    ``"per-row"`` takes the samples in the same shuffled order as full fine-tuning and the static freezes
    (same seed, same steps) and runs every forward of ``micro_size`` rows with each row at its own depth
    (``MicroBatch.row_depths``), rounded down to at most ``cut_levels`` distinct cuts per forward when
    that is set (see :func:`round_to_levels`). ``"narrowing"`` and ``"widening"`` take the same order
    and rows, but a row's depth follows its position in the epoch: the epoch's depths sorted ascending
    (the trained scope narrows from every layer to the top one, Algorithm 4's visit order) or
    descending (it widens), every epoch again. ``"rising"`` is narrowing across the whole run: the row at
    position t of the run (0 .. E*N-1 over ``begin``'s E epochs, each epoch in the same shuffled order)
    takes the depth at quantile t / (E*N) of the budget's ascending depths, so the depths never fall, each
    budget depth gets E times its quota, and the frozen floor (:meth:`floor`) rises; steps after the E-th
    epoch stay at the top depth. ``"stepped"`` gives epoch e the same depths as ``"rising"`` (the budget's
    quantiles e/E .. (e+1)/E), but in a random order over the epoch's rows (a stream of its own per
    epoch): every row at its own cut above a floor that rises once per epoch, to the lowest depth of the
    epoch.
    ``mask``: ``"above"`` trains ``layers[depth..]``, ``"single"`` only ``layers[depth]``. Depths above m-1
    (eof m under the "frozen" boundary) are clamped to m-1 so that every sample trains at least one layer.

    With ``refresh`` the strategy observes the eofs of the training forward and recomputes the depths
    from them at the next epoch (``depth_fn`` runs again); without a profiled eof a sample keeps ``None``
    until its first training forward.
    """

    _state_attrs = (*Strategy._state_attrs, "eofs", "losses", "depths", "_stale")

    def __init__(
        self,
        name: str,
        depth_fn: Callable[[SampleDepthStrategy, list[int | None] | None], list[int]],
        *,
        order: str,
        cuts_per_step: int = DEFAULT_CUTS_PER_STEP,
        cut_levels: int | None = None,
        mask: str = "above",
        refresh: bool = False,
        by_loss: bool = False,
        boundary: str = "trainable",
        **kwargs,
    ) -> None:
        super().__init__(name, **kwargs)
        self._depth_fn = depth_fn
        self.order = order
        self.cuts_per_step = positive_int(cuts_per_step, "cuts_per_step")
        self.cut_levels = None if cut_levels is None else positive_int(cut_levels, "cut_levels")
        self._mask = mask_single if mask == "single" else mask_above
        self.needs_observe = refresh
        self.needs_losses = by_loss
        self.boundary = boundary
        self.eofs: list[int | None] | None = None
        self.losses: list[float | None] = []
        self.depths: list[int] = []
        self._stale = False

    def _setup(self, eofs: list[int | None] | None) -> None:
        if self.order in RUN_ORDERS and self.epochs is None:
            raise ConfigError(f"strategy {self.label!r} spreads its depths over the whole run: begin() needs "
                              "the run's epochs")
        self.eofs = eofs
        self.losses = [None] * self.num_samples
        self._assign()

    def _run_depths(self, start: int, count: int) -> list[int]:
        """``rising`` / ``stepped``: the depths of the rows at positions ``start .. start+count-1`` of the run
        (position t at quantile t / (E*N) of the budget's ascending depths)."""
        assert self.epochs is not None
        ranked, n = sorted(self.depths), self.num_samples
        return [ranked[min(t // self.epochs, n - 1)] for t in range(start, start + count)]

    def floor(self, step: int) -> int:
        """``rising``: the depth of step ``step``'s first row (the depths never fall over the run, and a
        forward's rounding to ``cut_levels`` keeps its lowest depth); ``stepped``: the lowest depth of the
        step's epoch; 0 under every other schedule."""
        if self.order not in RUN_ORDERS:
            return super().floor(step)
        if not self._begun:
            raise RuntimeError(f"strategy {self.label!r}: call begin() before floor()")
        if step and self.step_size is None:
            raise RuntimeError(f"strategy {self.label!r}: a step's rows depend on the step size: call "
                               "epoch_plans() before floor()")
        size = self.step_size or self.num_samples
        epoch, j = divmod(step, -(-self.num_samples // size))
        first = 0 if self.order == "stepped" else j * size
        return self._run_depths(epoch * self.num_samples + first, 1)[0]

    def max_floor(self) -> int:
        """``rising`` / ``stepped``: the run's top depth; 0 under every other schedule."""
        return max(self.depths) if self.order in RUN_ORDERS else super().max_floor()

    def _assign(self) -> None:
        top = self.num_layers - 1
        self.depths = [min(d, top) for d in self._depth_fn(self, self.eofs)]
        self._stale = False

    def _micro_batches(self, epoch: int, step_size: int, micro_size: int) -> Iterator[MicroBatch]:
        if self._stale:
            self._assign()  # eofs observed during the last epoch
        m = self.num_layers
        if self.order in ROW_ORDERS:
            order = self._shuffled(epoch)
            if self.order == "per-row":
                row_depths = [self.depths[i] for i in order]
            elif self.order in RUN_ORDERS:  # the epoch's band of the run's depths
                row_depths = self._run_depths(epoch * self.num_samples, self.num_samples)
                if self.order == "stepped":  # in an order of its own, not the training order's
                    random.Random(f"stepped-{self.seed}-{epoch}").shuffle(row_depths)
            else:  # the depth follows the position in the epoch, not the sample
                row_depths = sorted(self.depths, reverse=self.order == "widening")
            for start in range(0, len(order), micro_size):
                rows = round_to_levels(row_depths[start:start + micro_size], self.cut_levels)
                yield MicroBatch(order[start:start + micro_size], min(rows), self._mask(min(rows), m), rows)
            return
        rng = self._epoch_rng(epoch)
        runs = _depth_runs(self.depths, self.labels, -(-step_size // self.cuts_per_step), rng)
        if self.order == "mixed":
            rng.shuffle(runs)
        elif self.order == "rotation":
            by_depth: dict[int, list[list[int]]] = {}
            for run in runs:
                by_depth.setdefault(self.depths[run[0]], []).append(run)
            queues = [by_depth[d] for d in sorted(by_depth)]
            runs = [q[r] for r in range(max(map(len, queues))) for q in queues if r < len(q)]
        for run in runs:
            depth = min(self.depths[i] for i in run)
            yield MicroBatch(run, depth, self._mask(depth, m))

    def observe(self, indices: Sequence[int] | torch.Tensor, values: torch.Tensor | Sequence[int]) -> None:
        """Record the eofs of the given samples; the depths follow at the next epoch."""
        if not self.needs_observe:
            return
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        vals = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
        if vals.dim() == 2:
            m = self.num_layers
            if vals.shape[1] != m + 1:
                raise ValueError(f"deviations must have m+1 = {m + 1} columns, got {tuple(vals.shape)}")
            eof = eof_layers(vals.detach().float(), boundary=self.boundary)
        elif vals.dim() == 1:
            eof = vals.detach().long()
        else:
            raise ValueError(
                f"observe() takes deviations [B, m+1] or eofs [B], got shape {tuple(vals.shape)}"
            )
        if len(idx) != eof.shape[0]:
            raise ValueError(f"observe() got {len(idx)} indices for {eof.shape[0]} rows")
        assert self.eofs is not None
        for i, e in zip(idx, eof.tolist(), strict=True):
            if not 0 <= e <= self.num_layers:
                raise ValueError(f"eof {e} outside 0..{self.num_layers}")
            self.eofs[i] = e
        self._stale = True

    def observe_losses(self, indices: Sequence[int], losses: Sequence[float]) -> None:
        """Record the training loss of the given samples; under ``loss-rank`` the depths follow at the next
        epoch."""
        if not self.needs_losses:
            return
        idx = [int(i) for i in indices]
        values = [float(v) for v in losses]
        if len(idx) != len(values):
            raise ValueError(f"observe_losses() got {len(idx)} indices for {len(values)} losses")
        for i, v in zip(idx, values, strict=True):
            if not 0 <= i < self.num_samples:
                raise ValueError(f"sample index {i} outside 0..{self.num_samples - 1}")
            self.losses[i] = v if math.isfinite(v) else None
        self._stale = True

    def load_state_dict(self, state: dict) -> None:
        """As :meth:`Strategy.load_state_dict`; checkpoints from before loss rank existed hold no losses."""
        super().load_state_dict({"losses": [None] * self.num_samples, **state})


def _depth_runs(depths: list[int], labels: list[int], size: int, rng: random.Random) -> list[list[int]]:
    """Runs of ``size`` samples in ascending depth order; inside a depth the samples are shuffled and then
    interleaved class by class (one of each class in turn), so a run inside one depth mixes classes."""
    by_depth: dict[int, dict[int, list[int]]] = {}
    for i, (d, y) in enumerate(zip(depths, labels, strict=True)):
        by_depth.setdefault(d, {}).setdefault(y, []).append(i)
    ordered: list[int] = []
    for d in sorted(by_depth):
        classes = list(by_depth[d].values())
        for members in classes:
            rng.shuffle(members)
        rng.shuffle(classes)
        ordered += [c[r] for r in range(max(map(len, classes))) for c in classes if r < len(c)]
    return chunks(ordered, size)


def salf_depths(budget: str, infill: str, assignment: str
                 ) -> Callable[[SampleDepthStrategy, list[int | None] | None], list[int]]:
    def depths(s: SampleDepthStrategy, eofs: list[int | None] | None) -> list[int]:
        if assignment == "loss-rank":  # the hardest sample of a class trains the most layers
            keys = [None if v is None else -v for v in s.losses]
            return assign_depths_by_class_rank(keys, s.labels, budget, infill, s.num_layers, seed=s.seed)
        assert eofs is not None
        if assignment == "eof-match":
            return assign_depths(eofs, budget, infill, s.num_layers, seed=s.seed)
        return assign_depths_by_class(eofs, s.labels, budget, infill, s.num_layers, seed=s.seed)

    return depths


def quota_depths(budget: str, infill: str
                  ) -> Callable[[SampleDepthStrategy, list[int | None] | None], list[int]]:
    """The budget plan's depths, one per quota slot (the time-varying schedules place them by position)."""
    def depths(s: SampleDepthStrategy, eofs: list[int | None] | None) -> list[int]:
        return fill_quotas(list(range(s.num_samples)), budget_quotas(budget, infill, s.num_layers,
                                                                      s.num_samples))

    return depths


def lift_depths(s: SampleDepthStrategy, eofs: list[int | None] | None) -> list[int]:
    """Uniform-budget quotas, samples placed by a seeded permutation (no semantics)."""
    perm = list(range(s.num_samples))
    random.Random(s.seed).shuffle(perm)
    return fill_quotas(perm, budget_quotas("uniform", "bf", s.num_layers, s.num_samples))


def algorithm3_depths(s: SampleDepthStrategy, eofs: list[int | None] | None) -> list[int]:
    """Each sample at its own eof; a sample not profiled yet takes the median eof of its class."""
    assert eofs is not None
    known: dict[int, list[int]] = {}
    for e, y in zip(eofs, s.labels, strict=True):
        if e is not None:
            known.setdefault(y, []).append(e)
    every = sorted(e for e in eofs if e is not None)
    median = {y: sorted(v)[len(v) // 2] for y, v in known.items()}
    return [e if e is not None else median.get(y, every[len(every) // 2]) for e, y in zip(eofs, s.labels,
                                                                                            strict=True)]
