"""The strategy interface: which layers train, and at which runner cut, for every micro-batch of every step.

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
    cost.add_plan(plan) for every plan; cost.saving()            # mean depth / m over trained rows
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from salf_engine.errors import ConfigError, positive_int
from salf_engine.schedule.plans import MicroBatch, StepPlan, pack_steps

__all__ = ["Strategy", "as_layers"]


def as_layers(layers: object) -> Sequence[nn.Module]:
    """Accept a DecoderParts-like object (``.layers``) or a sequence of layer modules."""
    return getattr(layers, "layers", layers)  # type: ignore[return-value]


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
        self.epochs: int | None = None
        self.step_size: int | None = None
        self._begun = False

    # -- lifecycle -------------------------------------------------------------------------------

    def begin(
        self,
        num_layers: int,
        num_samples: int,
        eofs: Sequence[int | None] | torch.Tensor | None = None,
        seed: int | None = None,
        *,
        labels: Sequence[int] | torch.Tensor | None = None,
        epochs: int | None = None,
    ) -> None:
        """Fix the model depth m, the training-set size N, the profiled eof per sample (SALF; ``None``
        for a sample that was not profiled) and the class label per sample (for class-mixed steps).

        ``seed`` overrides the seed given to :func:`make_strategy`. ``epochs``: the epochs the run trains
        (the ``rising`` schedule spreads its depths over them; the others ignore it).
        """
        self.num_layers = positive_int(num_layers, "num_layers")
        self.num_samples = positive_int(num_samples, "num_samples")
        self.epochs = None if epochs is None else positive_int(epochs, "epochs")
        if seed is not None:
            self.seed = seed
        if labels is None:
            self.labels = [0] * num_samples
        else:
            self.labels = [int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
            if len(self.labels) != num_samples:
                raise ConfigError(f"got {len(self.labels)} labels for {num_samples} samples")
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
        ``paper`` schedule picks a depth's samples when training reaches that depth. Each plan carries its
        step's :meth:`floor` (``StepPlan.floor``; every epoch holds ``ceil(N / step_size)`` steps).
        """
        if not self._begun:
            raise RuntimeError(f"strategy {self.label!r}: call begin() before epoch_plans()")
        size = positive_int(step_size, "step_size (batch_size)")
        micro = size if micro_batch_size is None else positive_int(micro_batch_size, "micro_batch_size")
        micro = min(micro, size)
        self.step_size = size
        return self._with_floors(epoch, pack_steps(self._micro_batches(epoch, size, micro), size, micro))

    def _with_floors(self, epoch: int, plans: Iterator[StepPlan]) -> Iterator[StepPlan]:
        first = epoch * -(-self.num_samples // (self.step_size or 1))
        for j, plan in enumerate(plans):
            plan.floor = self.floor(first + j)
            yield plan

    def _micro_batches(self, epoch: int, step_size: int, micro_size: int) -> Iterator[MicroBatch]:
        raise NotImplementedError

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

    def floor(self, step: int) -> int:
        """The frozen floor at optimizer step ``step`` (0-based): the lowest layer that any row of this step
        or of any later step trains, so ``layers[0..floor-1]`` and the embedding never change again.
        Never falls as ``step`` grows. 0 here (nothing below it is fixed): full, LoRA on every layer,
        TOP / INT (layer 0 trains), SALF and LIFT (a row may take cut 0 in any epoch), ADT (any layer may
        train during its warm-up); static freezes and SALF's ``rising`` schedule override it
        (docs/prefix_cache.md)."""
        return 0

    def max_floor(self) -> int:
        """The highest floor the run can reach (an upper bound of every :meth:`floor`): the layers whose
        exactness the prefix cache checks. The floor itself where it never changes."""
        return self.floor(0)

    # -- checkpoints ---------------------------------------------------------------------------

    #: Whether an epoch's plans depend only on :meth:`begin`'s inputs and the epoch, never on what training
    #: observes or changes, so the next plan may be made before this step runs (the prefix cache's copy
    #: ahead on a GPU, ``training.prefix_cache.copy_ahead``).
    plans_fixed: bool = False

    #: Attributes that change after :meth:`begin` (observations, ADT's choice); together
    #: with ``begin``'s deterministic setup they are the strategy's whole state.
    _state_attrs: tuple[str, ...] = ()

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r})"
