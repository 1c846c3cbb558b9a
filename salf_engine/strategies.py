"""Training strategies: which layers train, and at which runner cut, for every batch.

A :class:`Strategy` turns ``(num_layers, num_samples, eofs)`` into a stream of :class:`StepPlan` s, one
per optimizer step. Each plan is one bucket of samples that share one runner cut ``depth`` (the index
of the lowest trainable layer: ``layers[0..depth-1]`` run without autograd and never see backward)
and a per-layer ``trainable`` mask; layers at or above the cut whose mask is False (TOP, INT, LIFT,
ADT) get ``requires_grad=False`` but still run in the forward and pass gradients through.

The trainer drives a strategy like this (see :class:`Strategy` for each hook)::

    strategy = make_strategy("salf", budget="geom", infill="df")
    eofs = profile(...) if strategy.needs_profile else None      # one no-grad pass before epoch 0
    strategy.begin(num_layers, num_samples, eofs, seed)
    strategy.on_train_start(parts.layers)                         # after LoRA / requires_grad setup
    step = 0
    for epoch in range(epochs):
        for plan in strategy.epoch_plans(epoch, batch_size):      # consume lazily, one plan per step
            set requires_grad of layers[i] (or its LoRA adapters) to plan.trainable[i]
            out = runner(batch(plan.indices), depth=plan.depth, ...)
            loss.backward(); optimizer.step(); step += 1
            if strategy.needs_observe:
                strategy.observe(plan.indices, out.deviations)
            strategy.after_step(step, parts.layers)
    strategy.realized_saving()                                    # mean depth / m over trained samples
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from .budgets import assign_depths, budget_quotas
from .deviation import eof_layers
from .errors import ConfigError
from .sampling import DepthBucketSampler

__all__ = [
    "StepPlan",
    "Strategy",
    "StaticStrategy",
    "SampleDepthStrategy",
    "AdaptiveStrategy",
    "STRATEGIES",
    "BUDGETS",
    "INFILLS",
    "make_strategy",
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
#: Infilling orders of budgeted ``salf``.
INFILLS = ("bf", "df")
BOUNDARIES = ("trainable", "frozen")
#: Optimizer steps of full training before ADT picks its frozen layers.
ADT_STEPS = 5


@dataclass
class StepPlan:
    """One optimizer step: a bucket of samples sharing one runner cut.

    ``indices``: sample indices of the batch; ``depth``: the runner cut (index of the lowest trainable
    layer, nothing below it runs backward); ``trainable``: per-layer mask of length m, always False
    below ``depth`` and True at ``depth`` (``None`` would mean all of ``layers[depth..]``; strategies
    here always fill it).
    """

    indices: list[int]
    depth: int
    trainable: list[bool] | None = None


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


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def _as_layers(layers: object) -> Sequence[nn.Module]:
    """Accept a DecoderParts-like object (``.layers``) or a sequence of layer modules."""
    return getattr(layers, "layers", layers)  # type: ignore[return-value]


class Strategy:
    """Base class: per-step depth + trainable-layer mask, and the hooks the trainer calls.

    Attributes: ``name`` (canonical strategy name), ``label`` (name plus options, for logs),
    ``needs_profile`` (wants one no-grad eof pass before epoch 0, passed as ``eofs`` to :meth:`begin`),
    ``needs_observe`` (wants :meth:`observe` after every step), ``uses_lora`` (False, True = LoRA on
    every layer, or ``"half"`` = LoRA on the top half only; the masks say which layers' adapters train).
    """

    name: str = ""
    needs_profile: bool = False
    needs_observe: bool = False

    def __init__(self, name: str, *, seed: int = 0, uses_lora: bool | str = False) -> None:
        self.name = name
        self.label = name
        self.seed = seed
        self.uses_lora = uses_lora
        self.num_layers = 0
        self.num_samples = 0
        self._begun = False
        self._tally_samples = 0
        self._tally_depth = 0
        self._tally_frozen = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def begin(
        self,
        num_layers: int,
        num_samples: int,
        eofs: Sequence[int] | torch.Tensor | None = None,
        seed: int | None = None,
    ) -> None:
        """Fix the model depth m, the training-set size N and (for SALF) the profiled eof per sample.

        ``seed`` overrides the seed given to :func:`make_strategy`. Resets the realized-saving tally.
        """
        for value, what in ((num_layers, "num_layers"), (num_samples, "num_samples")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
        self.num_layers = num_layers
        self.num_samples = num_samples
        if seed is not None:
            self.seed = seed
        self._tally_samples = self._tally_depth = self._tally_frozen = 0
        self._setup(self._check_eofs(eofs))
        self._begun = True

    def _check_eofs(self, eofs: Sequence[int] | torch.Tensor | None) -> list[int] | None:
        if eofs is None:
            if self.needs_profile:
                raise ConfigError(f"strategy {self.label!r} needs per-sample eofs from a profiling pass")
            return None
        values = [int(v) for v in (eofs.tolist() if isinstance(eofs, torch.Tensor) else eofs)]
        if len(values) != self.num_samples:
            raise ConfigError(f"got {len(values)} eofs for {self.num_samples} samples")
        bad = [v for v in values if not 0 <= v <= self.num_layers]
        if bad:
            raise ConfigError(f"eofs must lie in 0..{self.num_layers} (num_layers), got {bad[0]}")
        return values

    def _setup(self, eofs: list[int] | None) -> None:
        """Subclass hook run by :meth:`begin`."""

    def on_train_start(self, layers: Sequence[nn.Module] | object) -> None:
        """Called once before the first step, after LoRA / requires_grad setup (ADT snapshots weights)."""

    def epoch_plans(self, epoch: int, batch_size: int) -> Iterator[StepPlan]:
        """The plans of one epoch: every sample exactly once, each plan one depth.

        Consume lazily (one plan per optimizer step): ADT's masks change after its warm-up steps.
        """
        if not self._begun:
            raise RuntimeError(f"strategy {self.label!r}: call begin() before epoch_plans()")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        return self._tallied(self._plans(epoch, batch_size))

    def _plans(self, epoch: int, batch_size: int) -> Iterator[StepPlan]:
        raise NotImplementedError

    def _tallied(self, plans: Iterator[StepPlan]) -> Iterator[StepPlan]:
        m = self.num_layers
        for plan in plans:
            n = len(plan.indices)
            trainable = plan.trainable if plan.trainable is not None else _mask_above(plan.depth, m)
            self._tally_samples += n
            self._tally_depth += n * plan.depth
            self._tally_frozen += n * (m - sum(trainable))
            yield plan

    def _epoch_rng(self, epoch: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + epoch)

    def observe(self, indices: Sequence[int] | torch.Tensor, values: torch.Tensor | Sequence[int]) -> None:
        """Per-sample refresh from the training forward (only Algorithm-3 ``salf`` uses it).

        ``values``: deviations ``[B, m+1]`` of the batch, or eof-layers ``[B]``.
        """

    def after_step(self, step: int, layers: Sequence[nn.Module] | object) -> None:
        """Called after every optimizer step; ``step`` = steps completed so far (1 after the first)."""

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
    """One fixed mask for every step (full, LoRA, BOT, TOP, INT); batches shuffled each epoch."""

    def __init__(self, name: str, mask_fn: Callable[[int], list[bool]], **kwargs) -> None:
        super().__init__(name, **kwargs)
        self._mask_fn = mask_fn
        self.trainable: list[bool] = []
        self.depth = 0

    def _setup(self, eofs: list[int] | None) -> None:
        self.trainable = self._mask_fn(self.num_layers)
        self.depth = self.trainable.index(True)

    def _plans(self, epoch: int, batch_size: int) -> Iterator[StepPlan]:
        order = list(range(self.num_samples))
        self._epoch_rng(epoch).shuffle(order)
        for batch in _batches(order, batch_size):
            yield StepPlan(batch, self.depth, list(self.trainable))


class SampleDepthStrategy(Strategy):
    """A depth per sample (SALF, LIFT); the epoch visits depth buckets in a fixed pattern.

    ``schedule``: ``"shuffle"`` (all buckets shuffled, Algorithm 3), ``"bf"`` (depth 0's batches, then
    depth 1's, ...), ``"df"`` (rounds: one batch of every depth with batches left, depths ascending;
    this is also LIFT's front-to-end rotation). ``mask``: ``"above"`` trains ``layers[depth..]``,
    ``"single"`` only ``layers[depth]``. Depths above m-1 (eof m under the "frozen" boundary) are
    clamped to m-1 so that every sample trains at least one layer.
    """

    def __init__(
        self,
        name: str,
        depth_fn: Callable[[SampleDepthStrategy, list[int] | None], list[int]],
        *,
        schedule: str,
        mask: str = "above",
        refresh: bool = False,
        boundary: str = "trainable",
        **kwargs,
    ) -> None:
        super().__init__(name, **kwargs)
        self._depth_fn = depth_fn
        self.schedule = schedule
        self._mask = _mask_single if mask == "single" else _mask_above
        self.needs_observe = refresh
        self.boundary = boundary
        self.depths: list[int] = []

    def _setup(self, eofs: list[int] | None) -> None:
        top = self.num_layers - 1
        self.depths = [min(d, top) for d in self._depth_fn(self, eofs)]

    def _plans(self, epoch: int, batch_size: int) -> Iterator[StepPlan]:
        m = self.num_layers
        depths = list(self.depths)  # a snapshot: observe() refreshes take effect next epoch
        if self.schedule == "shuffle":
            sampler = DepthBucketSampler(depths, batch_size, seed=self.seed)
            sampler.set_epoch(epoch)
            for batch in sampler:
                yield StepPlan(batch, depths[batch[0]], self._mask(depths[batch[0]], m))
            return
        rng = self._epoch_rng(epoch)
        by_depth: list[list[int]] = [[] for _ in range(m)]
        for i, d in enumerate(depths):
            by_depth[d].append(i)
        per_depth = []
        for members in by_depth:
            rng.shuffle(members)
            per_depth.append(_batches(members, batch_size))
        if self.schedule == "bf":
            order = [(d, b) for d, batches in enumerate(per_depth) for b in batches]
        else:
            rounds = max(len(batches) for batches in per_depth)
            order = [(d, per_depth[d][r]) for r in range(rounds) for d in range(m) if r < len(per_depth[d])]
        for depth, batch in order:
            yield StepPlan(batch, depth, self._mask(depth, m))

    def observe(self, indices: Sequence[int] | torch.Tensor, values: torch.Tensor | Sequence[int]) -> None:
        """Refresh the eof (hence the next epoch's depth) of the given samples (Algorithm 3 only)."""
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
        top = self.num_layers - 1
        for i, e in zip(idx, eof.tolist(), strict=True):
            if not 0 <= e <= self.num_layers:
                raise ValueError(f"eof {e} outside 0..{self.num_layers}")
            self.depths[i] = min(e, top)


class AdaptiveStrategy(Strategy):
    """ADT: full training for ``warmup_steps`` steps, then freeze the ``floor(f m)`` layers whose mean
    L2 weight change since :meth:`on_train_start` is smallest (``"low"``) or largest (``"high"``).

    A layer's change is the mean over its parameter tensors that required grad at
    :meth:`on_train_start` of ``||W_now - W_start||_2`` (Frobenius); ties go to the lower layer index.
    The cut moves to the lowest layer left trainable.
    """

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

    def _setup(self, eofs: list[int] | None) -> None:
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

    def _plans(self, epoch: int, batch_size: int) -> Iterator[StepPlan]:
        order = list(range(self.num_samples))
        self._epoch_rng(epoch).shuffle(order)
        for batch in _batches(order, batch_size):
            mask = list(self.trainable)  # read at yield time: changes after the warm-up steps
            yield StepPlan(batch, mask.index(True), mask)


# ---------------------------------------------------------------------------------- factory


def _salf_depths(budget: str, infill: str) -> Callable[[SampleDepthStrategy, list[int] | None], list[int]]:
    def depths(s: SampleDepthStrategy, eofs: list[int] | None) -> list[int]:
        assert eofs is not None
        return assign_depths(eofs, budget, infill, s.num_layers, seed=s.seed)

    return depths


def _lift_depths(s: SampleDepthStrategy, eofs: list[int] | None) -> list[int]:
    """Uniform-budget quotas, samples placed by a seeded permutation (no semantics)."""
    quotas = budget_quotas("uniform", "bf", s.num_layers, s.num_samples)
    perm = list(range(s.num_samples))
    random.Random(s.seed).shuffle(perm)
    depths = [0] * s.num_samples
    pos = 0
    for k, q in enumerate(quotas):
        for i in perm[pos : pos + q]:
            depths[i] = k
        pos += q
    return depths


def _algorithm3_depths(s: SampleDepthStrategy, eofs: list[int] | None) -> list[int]:
    assert eofs is not None
    return list(eofs)


_FRACTION_NAME = re.compile(r"^(bot|top|int)(\d\d)?$")


def make_strategy(
    name: str,
    *,
    budget: str | None = None,
    infill: str = "bf",
    freeze_fraction: float | None = None,
    seed: int = 0,
    boundary: str = "trainable",
    lora: bool = False,
    adt_steps: int = ADT_STEPS,
) -> Strategy:
    """Build a strategy by name (see :data:`STRATEGIES`).

    - ``full``: depth 0, every layer trains. ``lora-full``: the same masks, ``uses_lora=True``.
    - ``lora-half``: LoRA on the top half only: depth m // 2, ``uses_lora="half"``.
    - ``lift-half``: uniform-budget quotas, samples placed at random (seeded), the epoch rotates
      front to end over depths (one batch of depth 0, 1, .., m-1, then again); trains only
      ``layers[depth]``. ``lift-star-half``: the same depths, trains ``layers[depth..]``.
    - ``salf``: without ``budget`` (or ``"none"``), Algorithm 3: each sample at its profiled eof,
      refreshed by :meth:`Strategy.observe`, buckets shuffled. With ``budget`` in uniform / arith /
      geom, Algorithm 4: depths from :func:`~salf_engine.budgets.assign_depths` once at begin,
      batches visited in the ``infill`` order (``bf``: depth-major; ``df``: round-robin over depths).
    - ``botNN``: freeze the bottom ``floor(NN% m)`` layers (depth = that count).
    - ``topNN``: freeze the top ``floor(NN% m)`` layers (depth 0).
    - ``intNN``: freeze ``floor(NN% m)`` interleaved layers, see :func:`interleaved_frozen`
      (m = 8: int25 freezes 3, 7; int50 1, 3, 5, 7; int75 all but 0 and 4).
    - ``bot`` / ``top`` / ``int`` with ``freeze_fraction``: the same at any fraction in (0, 1).
    - ``adt-low`` / ``adt-high``: full training for ``adt_steps`` (5) steps, then freeze the
      ``floor(f m)`` layers with the smallest / largest mean L2 weight change (f = ``freeze_fraction``,
      default 0.5).

    ``boundary`` ("trainable" | "frozen") only matters when Algorithm-3 ``salf`` observes raw
    deviations. ``lora=True`` asks for LoRA adapters under any strategy. A fraction that rounds to
    zero or all layers is rejected by :meth:`Strategy.begin` (when m is known).
    """
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}")
    if infill not in INFILLS:
        raise ConfigError(f"unknown infilling order {infill!r}; valid orders: {', '.join(INFILLS)}")
    if boundary not in BOUNDARIES:
        raise ConfigError(f"unknown eof boundary {boundary!r}; valid: {', '.join(BOUNDARIES)}")
    if budget is not None and name != "salf":
        raise ConfigError(
            f"a budget plan only applies to strategy 'salf', not {name!r} (got budget={budget!r})"
        )
    if budget is not None and budget not in BUDGETS:
        raise ConfigError(f"unknown budget plan {budget!r}; valid plans: {', '.join(BUDGETS)}")
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
        return SampleDepthStrategy(name, _lift_depths, schedule="df", mask=mask, **common)
    if name == "salf":
        if budget is None or budget == "none":
            s = SampleDepthStrategy(
                name, _algorithm3_depths, schedule="shuffle", refresh=True, boundary=boundary, **common
            )
        else:
            s = SampleDepthStrategy(name, _salf_depths(budget, infill), schedule=infill, **common)
            s.label = f"salf-{budget}-{infill}"
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
