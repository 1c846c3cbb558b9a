"""Training strategies: which layers train, and at which runner cut, for every micro-batch of every step.

A :class:`Strategy` turns ``(num_layers, num_samples, eofs, labels)`` into a stream of :class:`StepPlan` s,
one per optimizer step. A step holds exactly ``step_size`` examples (the last step of an epoch aside),
split into :class:`MicroBatch` es, one forward each. A micro-batch has a lowest runner cut ``depth``
(``layers[0..depth-1]`` run without autograd and never see backward) and a per-layer ``trainable`` mask;
under SALF's default ``per-row`` schedule it also carries ``row_depths``, each sample's own cut, which
the runner applies row by row. Layers at or above the cut whose mask is False (TOP, INT, LIFT, ADT) get
``requires_grad=False`` but still run in the forward and pass gradients through. Gradients of a step's
micro-batches accumulate.

The trainer drives a strategy like this (see :class:`Strategy` for each hook)::

    strategy = make_strategy("salf", budget="uniform", infill="df")
    eofs = profile(...) if strategy.needs_profile else None      # one no-grad pass before epoch 0
    strategy.begin(num_layers, num_samples, eofs, seed, labels=labels)
    strategy.on_train_start(parts.layers)                         # after LoRA / requires_grad setup
    for epoch in range(epochs):
        for plan in strategy.epoch_plans(epoch, step_size, micro_batch_size):  # lazily, one per step
            for mb in plan.micro_batches:
                set requires_grad of layers[i] (or its LoRA adapters) to mb.trainable[i]
                out = runner(batch(mb.indices), depth=mb.runner_depth, ...); loss.backward()
                strategy.observe(mb.indices, eofs of out.deviations)  # if strategy.needs_observe
            optimizer.step(); step += 1
            strategy.after_step(step, parts.layers)
    strategy.realized_saving()                                    # mean depth / m over trained samples
"""

from __future__ import annotations

import copy
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from salf_engine import config as _config
from salf_engine.deviation.compute import eof_layers
from salf_engine.deviation.contract import BOUNDARIES
from salf_engine.errors import ConfigError
from salf_engine.schedule.budgets import (
    assign_depths,
    assign_depths_by_class,
    assign_depths_by_class_rank,
    budget_quotas,
    fill_quotas,
)

__all__ = [
    "MicroBatch",
    "StepPlan",
    "Strategy",
    "StaticStrategy",
    "SampleDepthStrategy",
    "AdaptiveStrategy",
    "STRATEGIES",
    "BUDGETS",
    "INFILLS",
    "SCHEDULES",
    "ASSIGNMENTS",
    "DEFAULT_CUTS_PER_STEP",
    "ROW_ORDERS",
    "TIMED_SCHEDULES",
    "make_strategy",
    "pack_steps",
    "round_to_levels",
    "frozen_count",
    "interleaved_frozen",
]

#: Every strategy name :func:`make_strategy` accepts (``bot``/``top``/``int`` need ``freeze_fraction``).
STRATEGIES = (
    "full",
    "lora-full",
    "lora-half",
    "lift-half",
    "lift-star-half",
    "salf",
    "bot25",
    "bot50",
    "bot75",
    "top25",
    "top50",
    "top75",
    "int25",
    "int50",
    "int75",
    "bot",
    "top",
    "int",
    "adt-low",
    "adt-high",
)
#: Budget plans a ``salf`` strategy accepts (``None`` / ``"none"`` = Algorithm 3, each sample at its eof).
BUDGETS = ("uniform", "arith", "geom", "none")
#: The names are defined in `config`. Infilling orders of budgeted ``salf`` (bf / df) decide the
#: per-depth quotas, never the visit order. Schedules say how a depth-varying strategy visits its
#: depths: ``per-row`` (every row of a forward at its own cut), ``mixed`` (micro-batches of one cut each,
#: several per optimizer step) or ``paper`` (Algorithm 4 as written: depth 0 first, ascending, each
#: sample's eof recomputed when its depth is visited). Assignments say how budgeted SALF fills the
#: quotas: ``class-rank`` (each class spread over the depths by its samples' eof rank inside the class),
#: ``eof-match`` (Algorithm 4's global eof-matching) or ``loss-rank`` (by the samples' last training
#: loss inside each class, the hardest deepest; random inside each class until a loss is seen).
INFILLS, SCHEDULES, ASSIGNMENTS = _config.INFILLS, _config.DEPTH_SCHEDULES, _config.DEPTH_ASSIGNMENTS
#: Schedules whose forwards take ``micro_size`` rows of the shuffled order, each row at its own cut.
ROW_ORDERS = ("per-row", "narrowing", "widening")
#: Schedules that visit a budget plan's depths in an order of time (they need a budget plan).
TIMED_SCHEDULES = ("paper", "narrowing", "widening")
#: Distinct cuts (micro-batches) per optimizer step of a depth-varying strategy.
DEFAULT_CUTS_PER_STEP: int = _config.TrainConfig.cuts_per_step
#: Optimizer steps of full training before ADT picks its frozen layers.
ADT_STEPS = 5


@dataclass
class MicroBatch:
    """Samples of one forward: ``indices``, the lowest cut ``depth`` (nothing below it runs backward), the
    per-layer ``trainable`` mask (length m, False below ``depth``, True at ``depth``) and, under the
    per-row schedule, ``row_depths``: each sample's own cut (>= ``depth``), which the runner applies row
    by row. Without ``row_depths`` every sample is cut at ``depth``."""

    indices: list[int]
    depth: int
    trainable: list[bool]
    row_depths: list[int] | None = None

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
    """One optimizer step: its micro-batches, whose gradients accumulate before the update."""

    micro_batches: list[MicroBatch]

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


def frozen_count(fraction: float, num_layers: int, what: str) -> int:
    """``floor(fraction * m)`` frozen layers; ConfigError when that is 0 or all m layers."""
    n = math.floor(Fraction(fraction).limit_denominator(10**6) * num_layers)
    if n <= 0 or n >= num_layers:
        raise ConfigError(
            f"{what} freezes floor({fraction:g} * {num_layers}) = {n} of the model's {num_layers} layers; "
            "it must freeze at least one layer and leave at least one trainable"
        )
    return n


def interleaved_frozen(fraction: float, num_layers: int) -> list[int]:
    """Layers INT freezes: layer i (0-based) is frozen iff ``floor((i+1) f) > floor(i f)``.

    That is every n-th layer spread evenly, ``floor(f m)`` in all, layer 0 always trainable:
    f = 1/4 -> layers 3, 7, 11, ..; f = 1/2 -> the odd layers 1, 3, 5, ..; f = 3/4 -> all but
    layers 0, 4, 8, ...
    """
    f = Fraction(fraction).limit_denominator(10**6)
    return [i for i in range(num_layers) if math.floor((i + 1) * f) > math.floor(i * f)]


def _mask_above(depth: int, m: int) -> list[bool]:
    return [i >= depth for i in range(m)]


def _mask_single(depth: int, m: int) -> list[bool]:
    return [i == depth for i in range(m)]


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _as_layers(layers: object) -> Sequence[nn.Module]:
    """Accept a DecoderParts-like object (``.layers``) or a sequence of layer modules."""
    return getattr(layers, "layers", layers)  # type: ignore[return-value]


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
    return value


class Strategy:
    """Base class: per-micro-batch depth + trainable-layer mask, and the hooks the trainer calls.

    Attributes: ``name`` (canonical strategy name), ``label`` (name plus options, for logs),
    ``needs_profile`` (wants one no-grad eof pass before epoch 0, passed as ``eofs`` to :meth:`begin`),
    ``needs_observe`` (wants :meth:`observe` with the eofs of every trained micro-batch), ``needs_losses``
    (wants ``observe_losses`` with the training loss of every trained sample), ``uses_lora``
    (False, True = LoRA on every layer, or ``"half"`` = LoRA on the top half only; the masks say which
    layers' adapters train), ``probe`` (set by the trainer for the ``paper`` schedule: a function from
    sample indices to their eofs under the current weights).
    """

    name: str = ""
    needs_profile: bool = False
    needs_observe: bool = False
    needs_losses: bool = False

    def __init__(self, name: str, *, seed: int = 0, uses_lora: bool | str = False) -> None:
        self.name = name
        self.label = name
        self.seed = seed
        self.uses_lora = uses_lora
        self.num_layers = 0
        self.num_samples = 0
        self.labels: list[int] = []
        self.probe: Callable[[list[int]], list[int]] | None = None
        self._begun = False
        self._tally_samples = 0
        self._tally_depth = 0
        self._tally_frozen = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def begin(
        self,
        num_layers: int,
        num_samples: int,
        eofs: Sequence[int | None] | torch.Tensor | None = None,
        seed: int | None = None,
        *,
        labels: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        """Fix the model depth m, the training-set size N, the profiled eof per sample (SALF; ``None``
        for a sample that was not profiled) and the class label per sample (for class-mixed steps).

        ``seed`` overrides the seed given to :func:`make_strategy`. Resets the realized-saving tally.
        """
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.num_samples = _positive_int(num_samples, "num_samples")
        if seed is not None:
            self.seed = seed
        if labels is None:
            self.labels = [0] * num_samples
        else:
            self.labels = [int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
            if len(self.labels) != num_samples:
                raise ConfigError(f"got {len(self.labels)} labels for {num_samples} samples")
        self._tally_samples = self._tally_depth = self._tally_frozen = 0
        self._setup(self._check_eofs(eofs))
        self._begun = True

    def _check_eofs(self, eofs: Sequence[int | None] | torch.Tensor | None) -> list[int | None] | None:
        if eofs is None:
            if self.needs_profile:
                raise ConfigError(f"strategy {self.label!r} needs per-sample eofs from a profiling pass")
            return None
        raw = eofs.tolist() if isinstance(eofs, torch.Tensor) else list(eofs)
        values = [None if v is None else int(v) for v in raw]
        if len(values) != self.num_samples:
            raise ConfigError(f"got {len(values)} eofs for {self.num_samples} samples")
        bad = [v for v in values if v is not None and not 0 <= v <= self.num_layers]
        if bad:
            raise ConfigError(f"eofs must lie in 0..{self.num_layers} (num_layers), got {bad[0]}")
        if self.needs_profile and all(v is None for v in values):
            raise ConfigError(f"strategy {self.label!r} got no profiled eof at all")
        return values

    def _setup(self, eofs: list[int | None] | None) -> None:
        """Subclass hook run by :meth:`begin`."""

    def on_train_start(self, layers: Sequence[nn.Module] | object) -> None:
        """Called once before the first step, after LoRA / requires_grad setup (ADT snapshots weights)."""

    def epoch_plans(self, epoch: int, step_size: int, micro_batch_size: int | None = None
                    ) -> Iterator[StepPlan]:
        """The steps of one epoch: every sample exactly once, ``step_size`` examples per step (the last
        aside), micro-batches of at most ``micro_batch_size`` (default ``step_size``) at one cut each.

        Consume lazily (one plan per optimizer step): ADT's masks change after its warm-up steps and the
        ``paper`` schedule picks a depth's samples when training reaches that depth.
        """
        if not self._begun:
            raise RuntimeError(f"strategy {self.label!r}: call begin() before epoch_plans()")
        size = _positive_int(step_size, "step_size (batch_size)")
        micro = size if micro_batch_size is None else _positive_int(micro_batch_size, "micro_batch_size")
        micro = min(micro, size)
        return self._tallied(pack_steps(self._micro_batches(epoch, size, micro), size, micro))

    def _micro_batches(self, epoch: int, step_size: int, micro_size: int) -> Iterator[MicroBatch]:
        raise NotImplementedError

    def _tallied(self, plans: Iterator[StepPlan]) -> Iterator[StepPlan]:
        m = self.num_layers
        for plan in plans:
            for mb in plan.micro_batches:
                n = len(mb.indices)
                self._tally_samples += n
                self._tally_depth += sum(mb.depths)
                # a row trains no layer below its own cut, whatever the forward's mask says
                self._tally_frozen += sum(m - sum(mb.trainable[d:]) for d in mb.depths)
            yield plan

    def _epoch_rng(self, epoch: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + epoch)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(self.num_samples))
        self._epoch_rng(epoch).shuffle(order)
        return order

    def observe(self, indices: Sequence[int] | torch.Tensor, values: torch.Tensor | Sequence[int]) -> None:
        """Per-sample eof refresh from the training forward (SALF uses it for its next epoch).

        ``values``: deviations ``[B, m+1]`` of the micro-batch, or eof-layers ``[B]``.
        """

    def after_step(self, step: int, layers: Sequence[nn.Module] | object) -> None:
        """Called after every optimizer step; ``step`` = steps completed so far (1 after the first)."""

    # -- checkpoints ---------------------------------------------------------------------------

    #: Attributes that change after :meth:`begin` (observations, ADT's choice, the tallies); together
    #: with ``begin``'s deterministic setup they are the strategy's whole state.
    _state_attrs: tuple[str, ...] = ("_tally_samples", "_tally_depth", "_tally_frozen")

    def state_dict(self) -> dict:
        """The strategy's mutable state as JSON-able values (a copy), for a checkpoint."""
        if not self._begun:
            raise RuntimeError(f"strategy {self.label!r}: call begin() before state_dict()")
        return {name: copy.deepcopy(getattr(self, name)) for name in self._state_attrs}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` after :meth:`begin` with the same inputs (ValueError on a mismatch)."""
        missing = [name for name in self._state_attrs if name not in state]
        if missing:
            raise ValueError(f"strategy {self.label!r}: state lacks {', '.join(missing)}")
        for name in self._state_attrs:
            setattr(self, name, copy.deepcopy(state[name]))

    # -- bookkeeping ---------------------------------------------------------------------------

    def realized_saving(self) -> float:
        """Backprop cost-saving ratio of the plans yielded so far: mean over trained samples of depth / m."""
        if self._tally_samples == 0:
            return 0.0
        return self._tally_depth / (self._tally_samples * self.num_layers)

    def realized_frozen_fraction(self) -> float:
        """Mean over trained samples of the fraction of layers not trained (counts TOP/INT/LIFT/ADT too)."""
        if self._tally_samples == 0:
            return 0.0
        return self._tally_frozen / (self._tally_samples * self.num_layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r})"


class StaticStrategy(Strategy):
    """One fixed mask for every step (full, LoRA, BOT, TOP, INT); samples shuffled each epoch."""

    def __init__(self, name: str, mask_fn: Callable[[int], list[bool]], **kwargs) -> None:
        super().__init__(name, **kwargs)
        self._mask_fn = mask_fn
        self.trainable: list[bool] = []
        self.depth = 0

    def _setup(self, eofs: list[int | None] | None) -> None:
        self.trainable = self._mask_fn(self.num_layers)
        self.depth = self.trainable.index(True)

    def _micro_batches(self, epoch: int, step_size: int, micro_size: int) -> Iterator[MicroBatch]:
        for chunk in _chunks(self._shuffled(epoch), step_size):
            yield MicroBatch(chunk, self.depth, list(self.trainable))


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
    descending (it widens), every epoch again.
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
        self.cuts_per_step = _positive_int(cuts_per_step, "cuts_per_step")
        self.cut_levels = None if cut_levels is None else _positive_int(cut_levels, "cut_levels")
        self._mask = _mask_single if mask == "single" else _mask_above
        self.needs_observe = refresh
        self.needs_losses = by_loss
        self.boundary = boundary
        self.eofs: list[int | None] | None = None
        self.losses: list[float | None] = []
        self.depths: list[int] = []
        self._stale = False

    def _setup(self, eofs: list[int | None] | None) -> None:
        self.eofs = eofs
        self.losses = [None] * self.num_samples
        self._assign()

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
    return _chunks(ordered, size)


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
            for chunk in _chunks(chosen, step_size):
                yield MicroBatch(chunk, depths[chunk[0]], self._mask(depths[chunk[0]], m))
        self.depths = depths


def _paper_quota_depths(budget: str, infill: str):
    def depths(s: SampleDepthStrategy, eofs: list[int | None] | None) -> list[int]:
        # the depths of the paper schedule are decided while it runs; before that, Algorithm 4's
        # eof-matching on the profiled eofs is what it expects
        return assign_depths(eofs or [None] * s.num_samples, budget, infill, s.num_layers, seed=s.seed)

    return depths


class AdaptiveStrategy(Strategy):
    """ADT: full training for ``warmup_steps`` steps, then freeze the ``floor(f m)`` layers whose mean
    L2 weight change since :meth:`on_train_start` is smallest (``"low"``) or largest (``"high"``).

    A layer's change is the mean over its parameter tensors that required grad at
    :meth:`on_train_start` of ``||W_now - W_start||_2`` (Frobenius); ties go to the lower layer index.
    The cut moves to the lowest layer left trainable.
    """

    # the weights at on_train_start (the warm-up's reference) are not state: a resumed run loads the same
    # initial weights and calls on_train_start before its trained weights are restored
    _state_attrs = (*Strategy._state_attrs, "frozen_layers", "trainable")

    def __init__(
        self, name: str, *, mode: str, fraction: float = 0.5, warmup_steps: int = ADT_STEPS, **kwargs
    ) -> None:
        super().__init__(name, **kwargs)
        self.mode = mode
        self.fraction = fraction
        self.warmup_steps = warmup_steps
        self.num_frozen = 0
        self.frozen_layers: list[int] | None = None
        self.trainable: list[bool] = []
        self._snapshot: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] | None = None

    def _setup(self, eofs: list[int | None] | None) -> None:
        self.num_frozen = frozen_count(self.fraction, self.num_layers, self.label)
        self.frozen_layers = None
        self.trainable = [True] * self.num_layers
        self._snapshot = None

    def on_train_start(self, layers: Sequence[nn.Module] | object) -> None:
        mods = list(_as_layers(layers))
        if len(mods) != self.num_layers:
            raise ValueError(f"{self.label}: got {len(mods)} layers, begin() was told {self.num_layers}")
        self._snapshot = [
            [(p, p.detach().clone()) for p in mod.parameters() if p.requires_grad] for mod in mods
        ]

    def reference_weights(self) -> list[list[torch.Tensor]] | None:
        """The weights of :meth:`on_train_start` per layer (None once the layers are chosen), for a
        checkpoint whose loop restores trained weights before ``on_train_start`` (the HF Trainer)."""
        if self._snapshot is None:
            return None
        return [[p0 for _p, p0 in pairs] for pairs in self._snapshot]

    def set_reference_weights(self, weights: list[list[torch.Tensor]] | None) -> None:
        """Put back :meth:`reference_weights` (after :meth:`on_train_start`)."""
        if weights is None or self._snapshot is None:
            return
        if [len(w) for w in weights] != [len(pairs) for pairs in self._snapshot]:
            raise ValueError(f"{self.label}: saved reference weights do not match the model's layers")
        self._snapshot = [[(p, w.to(p.device, p.dtype)) for (p, _old), w in zip(pairs, ws, strict=True)]
                          for pairs, ws in zip(self._snapshot, weights, strict=True)]

    def layer_weight_changes(self) -> list[float]:
        """Mean L2 weight change of every layer since :meth:`on_train_start`."""
        if self._snapshot is None:
            raise RuntimeError(f"{self.label}: call on_train_start(layers) before the first step")
        changes = []
        for pairs in self._snapshot:
            norms = [torch.linalg.vector_norm((p.detach() - p0).float()).item() for p, p0 in pairs]
            changes.append(sum(norms) / len(norms) if norms else 0.0)
        return changes

    def after_step(self, step: int, layers: Sequence[nn.Module] | object) -> None:
        if self.frozen_layers is not None or step < self.warmup_steps:
            return
        changes = self.layer_weight_changes()
        sign = 1.0 if self.mode == "low" else -1.0
        ranked = sorted(range(self.num_layers), key=lambda i: (sign * changes[i], i))
        self.frozen_layers = sorted(ranked[: self.num_frozen])
        self.trainable = [i not in self.frozen_layers for i in range(self.num_layers)]
        self._snapshot = None

    def _micro_batches(self, epoch: int, step_size: int, micro_size: int) -> Iterator[MicroBatch]:
        for chunk in _chunks(self._shuffled(epoch), step_size):
            mask = list(self.trainable)  # read when the step is planned: changes after the warm-up steps
            yield MicroBatch(chunk, mask.index(True), mask)


# ---------------------------------------------------------------------------------- factory


def _salf_depths(budget: str, infill: str, assignment: str
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


def _quota_depths(budget: str, infill: str
                  ) -> Callable[[SampleDepthStrategy, list[int | None] | None], list[int]]:
    """The budget plan's depths, one per quota slot (the time-varying schedules place them by position)."""
    def depths(s: SampleDepthStrategy, eofs: list[int | None] | None) -> list[int]:
        return fill_quotas(list(range(s.num_samples)), budget_quotas(budget, infill, s.num_layers,
                                                                      s.num_samples))

    return depths


def _lift_depths(s: SampleDepthStrategy, eofs: list[int | None] | None) -> list[int]:
    """Uniform-budget quotas, samples placed by a seeded permutation (no semantics)."""
    perm = list(range(s.num_samples))
    random.Random(s.seed).shuffle(perm)
    return fill_quotas(perm, budget_quotas("uniform", "bf", s.num_layers, s.num_samples))


def _algorithm3_depths(s: SampleDepthStrategy, eofs: list[int | None] | None) -> list[int]:
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


_FRACTION_NAME = re.compile(r"^(bot|top|int)(\d\d)?$")


def make_strategy(
    name: str,
    *,
    budget: str | None = None,
    infill: str | None = None,
    freeze_fraction: float | None = None,
    seed: int = 0,
    boundary: str = "trainable",
    lora: bool = False,
    adt_steps: int = ADT_STEPS,
    schedule: str = "per-row",
    assignment: str = "class-rank",
    cuts_per_step: int = DEFAULT_CUTS_PER_STEP,
    cut_levels: int | None = None,
    observe: bool = True,
) -> Strategy:
    """Build a strategy by name (see :data:`STRATEGIES`).

    - ``full``: depth 0, every layer trains. ``lora-full``: the same masks, ``uses_lora=True``.
    - ``lora-half``: LoRA on the top half only: depth m // 2, ``uses_lora="half"``.
    - ``lift-half``: uniform-budget quotas, samples placed at random (seeded), visited front to end
      over the depths (micro-batches of depth 0, 1, .., m-1, then again); trains only
      ``layers[depth]``. ``lift-star-half``: the same depths, trains ``layers[depth..]``.
    - ``salf``: without ``budget`` (or ``"none"``), Algorithm 3: each sample at its profiled eof. With
      ``budget`` in uniform / arith / geom, Algorithm 4's quotas
      (:func:`~salf_engine.schedule.budgets.budget_quotas`, filled ``infill`` = ``bf`` (default) or ``df``)
      filled by ``assignment``: ``class-rank`` (default; every class spread over the depths by its
      samples' eof rank inside the class, :func:`~salf_engine.schedule.budgets.assign_depths_by_class`),
      ``eof-match`` (:func:`~salf_engine.schedule.budgets.assign_depths`) or ``loss-rank`` (inside each class
      by
      the samples' last training loss, hardest deepest: random until the first epoch has seen them,
      re-placed at every later epoch; no profile). Under the ``per-row`` schedule
      (default) the samples come in the static strategies' shuffled order and every row of a forward
      runs at its own depth (at most ``cut_levels`` distinct cuts per forward when given); under
      ``mixed`` every optimizer step holds ``cuts_per_step`` micro-batches of one depth each. Either
      way the eofs seen in the training forward re-assign the depths at the next epoch.
      ``schedule="paper"`` (budget needed) runs Algorithm 4 as written instead: depth 0 first,
      ascending, eofs recomputed at the visit. ``"narrowing"`` / ``"widening"`` (budget needed) keep
      the per-row forwards but give each row the budget's depth of its position in the epoch
      (ascending / descending over the epoch); no eof is used, so nothing is profiled.
    - ``botNN``: freeze the bottom ``floor(NN% m)`` layers (depth = that count).
    - ``topNN``: freeze the top ``floor(NN% m)`` layers (depth 0).
    - ``intNN``: freeze ``floor(NN% m)`` interleaved layers, see :func:`interleaved_frozen`
      (m = 8: int25 freezes 3, 7; int50 1, 3, 5, 7; int75 all but 0 and 4).
    - ``bot`` / ``top`` / ``int`` with ``freeze_fraction``: the same at any fraction in (0, 1).
    - ``adt-low`` / ``adt-high``: full training for ``adt_steps`` (5) steps, then freeze the
      ``floor(f m)`` layers with the smallest / largest mean L2 weight change (f = ``freeze_fraction``,
      default 0.5).

    ``boundary`` ("trainable" | "frozen") decides how observed deviations become eofs; ``observe=False``
    keeps SALF's profiled eofs for the whole run (prompt/response tasks: the training forward measures no
    answer deviation). ``lora=True``
    asks for LoRA adapters under any strategy. A fraction that rounds to zero or all layers is rejected
    by :meth:`Strategy.begin` (when m is known).
    """
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}")
    if infill is not None and infill not in INFILLS:
        raise ConfigError(f"unknown infilling order {infill!r}; valid orders: {', '.join(INFILLS)}")
    if boundary not in BOUNDARIES:
        raise ConfigError(f"unknown eof boundary {boundary!r}; valid: {', '.join(BOUNDARIES)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown depth schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if assignment not in ASSIGNMENTS:
        raise ConfigError(f"unknown depth assignment {assignment!r}; valid: {', '.join(ASSIGNMENTS)}")
    _positive_int(cuts_per_step, "cuts_per_step")
    if cut_levels is not None:
        _positive_int(cut_levels, "cut_levels")
    if budget is not None and name != "salf":
        raise ConfigError(
            f"a budget plan only applies to strategy 'salf', not {name!r} (got budget={budget!r})"
        )
    if budget is not None and budget not in BUDGETS:
        raise ConfigError(f"unknown budget plan {budget!r}; valid plans: {', '.join(BUDGETS)}")
    budgeted = budget is not None and budget != "none"
    if infill is not None and not budgeted:
        raise ConfigError(
            f"infilling order {infill!r} fills a budget plan's shares; give a budget (uniform, arith, geom) "
            "or drop the infilling order"
        )
    if schedule in TIMED_SCHEDULES and not budgeted:
        raise ConfigError(f"the {schedule!r} schedule visits a budget plan's depths in order and needs a "
                          "salf budget plan (uniform, arith, geom)")
    if assignment == "loss-rank" and (not budgeted or schedule in TIMED_SCHEDULES):
        raise ConfigError("the 'loss-rank' assignment places samples in a budget plan's quotas by their "
                          "training loss: it needs a salf budget plan (uniform, arith, geom) and the per-row "
                          f"or mixed schedule (got budget={budget!r}, schedule={schedule!r})")
    if isinstance(adt_steps, bool) or not isinstance(adt_steps, int) or adt_steps < 1:
        raise ConfigError(f"adt_steps must be an integer >= 1, got {adt_steps!r}")

    fraction = _resolve_fraction(name, freeze_fraction)
    common = dict(seed=seed, uses_lora=bool(lora))

    if name in ("full", "lora-full"):
        return StaticStrategy(
            name, lambda m: [True] * m, seed=seed, uses_lora=True if name == "lora-full" else bool(lora)
        )
    if name == "lora-half":
        return StaticStrategy(name, _lora_half_mask, seed=seed, uses_lora="half")
    if name in ("lift-half", "lift-star-half"):
        mask = "single" if name == "lift-half" else "above"
        return SampleDepthStrategy(name, _lift_depths, order="rotation", cuts_per_step=cuts_per_step,
                                   mask=mask, **common)
    if name == "salf":
        s: Strategy
        if not budgeted:
            s = SampleDepthStrategy(name, _algorithm3_depths, order=schedule, cuts_per_step=cuts_per_step,
                                    cut_levels=cut_levels, refresh=observe, boundary=boundary, **common)
        elif schedule in ("narrowing", "widening"):  # no eof decides anything: no profile
            s = SampleDepthStrategy(name, _quota_depths(budget, infill or "bf"), order=schedule,
                                    cut_levels=cut_levels, **common)
            s.label = f"salf-{budget}-{infill or 'bf'}-{schedule}"
            return s
        elif schedule == "paper":
            s = PaperScheduleStrategy(name, budget=budget, infill=infill or "bf", boundary=boundary,
                                      **common)
            s.label = f"salf-{budget}-{infill or 'bf'}-paper"
        elif assignment == "loss-rank":  # no eof decides anything: no profile
            s = SampleDepthStrategy(name, _salf_depths(budget, infill or "bf", assignment), order=schedule,
                                    cuts_per_step=cuts_per_step, cut_levels=cut_levels, by_loss=True,
                                    **common)
            s.label = f"salf-{budget}-{infill or 'bf'}-loss-rank"
            return s
        else:
            s = SampleDepthStrategy(name, _salf_depths(budget, infill or "bf", assignment), order=schedule,
                                    cuts_per_step=cuts_per_step, cut_levels=cut_levels, refresh=observe,
                                    boundary=boundary, **common)
            s.label = f"salf-{budget}-{infill or 'bf'}"
        s.needs_profile = True
        return s
    if name in ("adt-low", "adt-high"):
        assert fraction is not None
        s = AdaptiveStrategy(name, mode=name[4:], fraction=fraction, warmup_steps=adt_steps, **common)
        s.label = f"{name}{round(fraction * 100)}"
        return s

    assert fraction is not None
    kind = name[:3]
    label = f"{kind}{round(fraction * 100)}" if len(name) == 3 else name

    def mask_fn(m: int) -> list[bool]:
        n = frozen_count(fraction, m, label)
        if kind == "bot":
            return [i >= n for i in range(m)]
        if kind == "top":
            return [i < m - n for i in range(m)]
        frozen = set(interleaved_frozen(fraction, m))
        return [i not in frozen for i in range(m)]

    s = StaticStrategy(name, mask_fn, **common)
    s.label = label
    return s


def _lora_half_mask(m: int) -> list[bool]:
    if m < 2:
        raise ConfigError(f"lora-half needs at least 2 layers to leave the bottom half frozen, got {m}")
    return _mask_above(m // 2, m)


def _resolve_fraction(name: str, freeze_fraction: float | None) -> float | None:
    """The freeze fraction of bot/top/int/adt strategies; ConfigError where it does not apply or clashes."""
    if freeze_fraction is not None:
        if isinstance(freeze_fraction, bool) or not isinstance(freeze_fraction, int | float):
            raise ConfigError(f"freeze_fraction must be a number in (0, 1), got {freeze_fraction!r}")
        if not 0 < freeze_fraction < 1:
            raise ConfigError(f"freeze_fraction must lie strictly between 0 and 1, got {freeze_fraction!r}")
    match = _FRACTION_NAME.match(name)
    if match:
        if match.group(2) is None:
            if freeze_fraction is None:
                raise ConfigError(
                    f"strategy {name!r} needs freeze_fraction (or use {name}25 / {name}50 / {name}75)"
                )
            return float(freeze_fraction)
        implied = int(match.group(2)) / 100
        if freeze_fraction is not None and not math.isclose(freeze_fraction, implied):
            raise ConfigError(
                f"strategy {name!r} freezes {implied:g} of the layers; freeze_fraction={freeze_fraction!r} "
                f"contradicts it (use {match.group(1)!r} with freeze_fraction instead)"
            )
        return implied
    if name in ("adt-low", "adt-high"):
        return 0.5 if freeze_fraction is None else float(freeze_fraction)
    if freeze_fraction is not None:
        raise ConfigError(f"freeze_fraction only applies to bot/top/int/adt strategies, not {name!r}")
    return None
