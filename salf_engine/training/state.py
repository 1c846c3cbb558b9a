"""Where a training run stands: the one engine state of the engine's loop and the HF Trainer path, and
what their checkpoints hold of it (``meta.json`` of the loop's checkpoints, ``salf_state.json`` of the
Trainer's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from salf_engine.schedule.driver import ResumePoint

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Optimizer steps taken (``step``; a skipped step counts), the ``epoch`` and the plans done in it, the
    ``skipped`` steps, the step ``losses`` (of the steps that updated), the training and checkpoint-writing
    wall time of every process of the run so far, the steps it was resumed at, the strategy's state at the
    epoch's start (``epoch_start``: what replaying the epoch needs) and, on a resumed run until its epoch
    is replayed, the ``resume`` point; ``epoch_evals``: the evaluations after each epoch
    (``--eval-every-epoch``)."""

    step: int = 0
    epoch: int = 0
    plans_done: int = 0
    skipped: int = 0
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    resumed_at: list[int] = field(default_factory=list)
    epoch_start: dict[str, Any] | None = None
    resume: ResumePoint | None = None
    epoch_evals: list[dict[str, Any]] = field(default_factory=list)

    def record(self, loss: float | None) -> None:
        """One more optimizer step (and plan) done: its loss, or None for a skipped step."""
        self.step += 1
        self.plans_done += 1
        if loss is None:
            self.skipped += 1
        else:
            self.losses.append(loss)

    def start_epoch(self, epoch_start: dict[str, Any], replayed: int) -> None:
        """An epoch begins (``replayed``: the plans a resumed epoch made again up to its checkpoint)."""
        self.epoch_start, self.plans_done = epoch_start, replayed

    def final_loss(self, last: int = 10) -> float | None:
        """The mean loss of the last ``last`` updating steps (None before any)."""
        tail = self.losses[-last:]
        return sum(tail) / len(tail) if tail else None

    def state_dict(self) -> dict[str, Any]:
        """The state as JSON-able keys (those of the checkpoints' meta.json; ``ResumePoint.of`` reads them,
        with the strategy's state the caller adds)."""
        return {"step": self.step, "epoch": self.epoch, "plans_done": self.plans_done,
                "skipped_steps": self.skipped, "losses": list(self.losses),
                "epoch_start_strategy": self.epoch_start, "train_seconds": self.train_seconds,
                "checkpoint_seconds": self.checkpoint_seconds, "resumed_at_steps": list(self.resumed_at),
                "epoch_evals": [dict(e) for e in self.epoch_evals]}

    def load_state_dict(self, state: dict[str, Any], *, total_steps: int | None = None) -> None:
        """Resume from :meth:`state_dict` (plus the strategy's ``"strategy"`` state): the epoch is replayed up
        to the checkpoint (``resume``), unless it was taken at the run's last step (``total_steps``): then
        that epoch is over. A state without wall-time counters (older checkpoints) counts from zero."""
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.plans_done = int(state["plans_done"])
        self.skipped = int(state.get("skipped_steps", 0))
        self.losses = list(state.get("losses", []))
        self.epoch_start = state.get("epoch_start_strategy")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.checkpoint_seconds = float(state.get("checkpoint_seconds", 0.0))
        self.resumed_at = [*state.get("resumed_at_steps", []), self.step]
        self.epoch_evals = [dict(e) for e in state.get("epoch_evals", [])]
        if total_steps is not None and self.step >= total_steps:
            self.epoch += 1
            self.resume = None
        else:
            self.resume = ResumePoint.of(state)

    def take_resume(self) -> ResumePoint | None:
        """The resume point, once: the first epoch after a resume replays up to it, later ones start
        afresh."""
        resume, self.resume = self.resume, None
        return resume
