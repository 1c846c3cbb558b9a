"""The strategy driver: profile eofs, begin the strategy, hand out plans, feed back observations.

Everything a loop does with a :class:`~salf_engine.schedule.strategies.Strategy` besides training a
micro-batch:
the eof profile before epoch 0 (all or a fraction of the training samples), ``begin`` / ``probe`` /
``on_train_start``, per-epoch plans, the step's eofs from the training forward's deviations
(``observe``), ``after_step`` (ADT), and the eof histograms of the summary. Under torch.distributed each
rank profiles its share of the samples and the eofs are gathered; every rank's observations are gathered
before ``observe``, so all ranks keep the same strategy state and plan the same steps.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from salf_engine.data import subset_split
from salf_engine.deviation.compute import eof_layers
from salf_engine.deviation.responses import profile_response_deviations
from salf_engine.errors import ConfigError
from salf_engine.runtime.distributed import gather_objects, rank_and_world
from salf_engine.schedule.profile import profile_deviations

__all__ = ["StrategyDriver", "Observation", "ResumePoint", "histogram", "profile_subset"]


class ResumePoint(NamedTuple):
    """Where a checkpoint was taken inside an epoch: what replaying that epoch needs (the engine's own
    checkpoints and the HF Trainer's ``salf_state.json`` both hold these keys)."""

    epoch: int
    plans_done: int
    epoch_start_strategy: dict
    strategy: dict

    @classmethod
    def of(cls, state: dict[str, Any]) -> ResumePoint:
        return cls(int(state["epoch"]), int(state["plans_done"]), state["epoch_start_strategy"],
                   state["strategy"])


class Observation(NamedTuple):
    """What one trained micro-batch showed: its sample ``indices``, their ``deviations`` [B, m+1] (when the
    forward returned them) and their training ``losses`` [B] (when the loop computed them)."""

    indices: Sequence[int]
    deviations: torch.Tensor | None
    losses: torch.Tensor | None = None


def profile_subset(num_samples: int, fraction: float, seed: int) -> list[int]:
    """The training samples profiled before epoch 0: ``ceil(fraction * N)`` of them, seeded, ascending."""
    count = max(1, math.ceil(fraction * num_samples))
    if count >= num_samples:
        return list(range(num_samples))
    return sorted(random.Random(seed + 7919).sample(range(num_samples), count))


def histogram(values: Sequence[int], size: int) -> list[int]:
    """Counts of the ints 0..size-1 in `values`."""
    counts = Counter(int(v) for v in values)
    return [counts.get(k, 0) for k in range(size)]


class StrategyDriver:
    """Drives one strategy over one training split with one runner.

    Args:
        strategy: the strategy (not begun yet).
        runner: the :class:`~salf_engine.runner.truncated.TruncatedRunner` of the model being trained (with
        bases).
        train_split: the encoded training split (``labels`` per sample).
        config: the run's TrainConfig (eof boundary, profile fraction, seed, eval batch size, dtype).
        pad_id: the tokenizer's pad id.
    """

    def __init__(self, strategy: Any, runner: Any, train_split: Any, config: Any, *, pad_id: int) -> None:
        self.strategy = strategy
        self.runner = runner
        self.train_split = train_split
        self.config = config
        self.pad_id = pad_id
        self.eofs: list[int | None] | None = None
        self.profiled = 0
        self.profile_seconds = 0.0
        self.probe_examples = 0
        self.probe_seconds = 0.0
        self.last_seen_eofs: dict[int, int] = {}

    @property
    def wants_deviations(self) -> bool:
        """Whether the training forward must return deviations (Algorithm-3 observations)."""
        return bool(getattr(self.strategy, "needs_observe", False))

    @property
    def wants_observations(self) -> bool:
        """Whether :meth:`observe` needs the trained micro-batches (their deviations or their losses)."""
        return self.wants_deviations or bool(getattr(self.strategy, "needs_losses", False))

    def _eofs_of(self, indices: Sequence[int], *, progress: bool, desc: str) -> list[int]:
        if hasattr(self.train_split, "targets"):  # prompt/response rows: the answer's deviation
            dev = profile_response_deviations(self.runner.model, self.train_split.subset(list(indices)),
                                              pad_id=self.pad_id, batch_size=self.config.eval_batch_size,
                                              lens=self.runner.lens, impl=self.runner.deviation_impl)
        else:
            dev = profile_deviations(self.runner, subset_split(self.train_split, indices), self.pad_id,
                                     batch_size=self.config.eval_batch_size, dtype=self.config.dtype,
                                     progress=progress, desc=desc)
        return eof_layers(dev, boundary=self.config.eof_boundary).tolist()

    def probe(self, indices: Sequence[int]) -> list[int]:
        """eof of each given training sample under the current weights (one no-grad pass)."""
        t0 = time.perf_counter()
        eofs = self._eofs_of(indices, progress=False, desc="probe")
        self.probe_examples += len(indices)
        self.probe_seconds += time.perf_counter() - t0
        return eofs

    def profile(self, *, progress: bool = False, say: Callable[[str], None] | None = None) -> None:
        """The eof profile before epoch 0, for strategies that want one (no-op otherwise)."""
        if not self.strategy.needs_profile:
            return
        n = len(self.train_split)
        chosen = profile_subset(n, self.config.resolved_profile_fraction(), self.config.seed)
        if say is not None:
            why = (" (every row: a prompt/response task's training forward measures no answer deviation; "
                   "--profile-fraction F profiles fewer)" if self.config.profile_fraction is None
                   and self.config.generative else "")
            say(f"profiling eof-layers of {len(chosen)} of {n} training examples{why} ...")
        t0 = time.perf_counter()
        rank, world = rank_and_world()
        mine = chosen[rank::world]
        local = list(zip(mine, self._eofs_of(mine, progress=progress, desc="eof profile"), strict=True))
        eofs: list[int | None] = [None] * n
        for part in gather_objects(local):
            for i, e in part:
                eofs[i] = int(e)
        self.eofs = eofs
        self.profile_seconds = time.perf_counter() - t0
        self.profiled = len(chosen)
        seen = {e for e in eofs if e is not None}
        if say is not None and self.profiled > 1 and len(seen) == 1:
            say(f"warning: all {self.profiled} profiled examples have eof-layer {seen.pop()}, so the eof "
                "does not tell them apart: a budget places them at random depths, and --depth-schedule "
                "narrowing spends it without the profile (docs/sft.md)")

    def begin(self, layers: Any, epochs: int | None = None) -> None:
        """``strategy.begin`` with the profile, the probe hook, then ``on_train_start(layers)``; ``epochs``:
        the epochs the run trains (default the config's), which SALF's ``rising`` schedule spreads its
        depths over."""
        strategy = self.strategy
        strategy.begin(self.runner.num_layers, len(self.train_split), self.eofs, self.config.seed,
                       labels=list(self.train_split.labels),
                       epochs=self.config.epochs if epochs is None else epochs)
        strategy.probe = self.probe
        strategy.on_train_start(layers)

    def epoch_plans(self, epoch: int, step_size: int, micro_batch_size: int) -> Iterator[Any]:
        """The epoch's step plans, lazily; ConfigError when the strategy plans no step."""
        planned = 0
        for plan in self.strategy.epoch_plans(epoch, step_size, micro_batch_size):
            planned += 1
            yield plan
        if planned == 0:
            raise ConfigError(f"strategy {self.config.strategy!r} planned no step in epoch {epoch}")

    def resumable_epoch(self, epoch: int, step_size: int, micro_batch_size: int,
                        resume: ResumePoint | None = None) -> tuple[dict, list[Any], Iterator[Any]]:
        """(the strategy's state at the epoch's start, for this epoch's checkpoints; the plans replayed; the
        rest of the epoch's plans, lazily).

        Resumed in the epoch a checkpoint was taken in, the ``resume.plans_done`` plans before it are made
        again from the state at the epoch's start, so every later plan is the uninterrupted run's; then
        the checkpoint's strategy state takes over. The one home of epoch replay: the engine's loop drops
        the replayed plans, the HF Trainer skips them as batches.
        """
        if resume is not None:
            self.strategy.load_state_dict(resume.epoch_start_strategy)
        start = self.strategy.state_dict()
        plans = self.epoch_plans(epoch, step_size, micro_batch_size)
        replayed = []
        if resume is not None:
            replayed = [next(plans) for _ in range(resume.plans_done)]
            self.strategy.load_state_dict(resume.strategy)
        return start, replayed, plans

    def observe(self, seen: Sequence[Observation | tuple]) -> None:
        """The step's observations (one per trained micro-batch; a plain ``(indices, deviations[, losses])``
        tuple works too) -> eofs in one pass -> ``strategy.observe``, and the rows' losses ->
        ``strategy.observe_losses`` when the strategy ranks by loss (with every rank's observations,
        gathered, under torch.distributed)."""
        wants_eofs = self.wants_deviations
        wants_losses = bool(getattr(self.strategy, "needs_losses", False))
        if not (wants_eofs or wants_losses):
            return
        seen = [Observation(*obs) for obs in seen]
        for obs in seen:
            if (wants_eofs and obs.deviations is None) or (wants_losses and obs.losses is None):
                raise ConfigError(f"strategy {self.strategy.label!r} observes "
                                  f"{'deviations' if wants_eofs else 'losses'} of every trained micro-batch; "
                                  f"one came without (samples {list(obs.indices)[:8]})")
        indices = [int(i) for obs in seen for i in obs.indices]
        eof: list[int] = []
        losses: list[float] = []
        if seen and wants_eofs:
            dev = torch.cat([obs.deviations for obs in seen])
            eof = eof_layers(dev, boundary=self.config.eof_boundary).tolist()
        if seen and wants_losses:
            losses = torch.cat([obs.losses.float() for obs in seen]).tolist()
        if rank_and_world()[1] > 1:
            parts = gather_objects((indices, eof, losses))
            indices = [i for part in parts for i in part[0]]
            eof = [e for part in parts for e in part[1]]
            losses = [v for part in parts for v in part[2]]
        if not indices:
            return
        if wants_eofs:
            self.strategy.observe(indices, eof)
            self.last_seen_eofs.update(zip(indices, eof, strict=True))
        if wants_losses:
            self.strategy.observe_losses(indices, losses)

    def after_step(self, step: int, layers: Any) -> None:
        """``strategy.after_step`` (ADT's weight-change masks)."""
        self.strategy.after_step(step, layers)

    def state_dict(self) -> dict[str, Any]:
        """The profile and probe counters (JSON-able), for a checkpoint: a resumed run skips the profile."""
        return {"eofs": list(self.eofs) if self.eofs is not None else None, "profiled": self.profiled,
                "profile_seconds": self.profile_seconds, "probe_examples": self.probe_examples,
                "probe_seconds": self.probe_seconds,
                "last_seen_eofs": [[int(i), int(e)] for i, e in self.last_seen_eofs.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (instead of :meth:`profile`, before :meth:`begin`)."""
        self.eofs = list(state["eofs"]) if state["eofs"] is not None else None
        self.profiled = int(state["profiled"])
        self.profile_seconds = float(state["profile_seconds"])
        self.probe_examples = int(state["probe_examples"])
        self.probe_seconds = float(state["probe_seconds"])
        self.last_seen_eofs = {int(i): int(e) for i, e in state["last_seen_eofs"]}

    def eof_histograms(self) -> dict[str, list[int] | None] | None:
        """{"profile": counts per eof of the profiled samples, "last_seen": of the last observed eofs}."""
        if self.eofs is None:
            return None
        size = self.runner.num_layers + 1
        profiled = [e for e in self.eofs if e is not None]
        seen = histogram(list(self.last_seen_eofs.values()), size) if self.last_seen_eofs else None
        return {"profile": histogram(profiled, size), "last_seen": seen}
