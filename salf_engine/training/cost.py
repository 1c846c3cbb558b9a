"""Training cost accounting in decoder-layer forward units: the one home of a run's realized backward
saving, frozen fraction and FLOPs estimate (``budgets.cost_saving_ratio`` is the formula, for a planned
assignment)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from salf_engine.schedule.budgets import cost_saving_ratio

__all__ = ["CostMeter"]


class CostMeter:
    """What a run's training cost, in units of one decoder layer's forward over one example.

    Per trained example: m units of forward; in backward, 2 units for every layer whose weights train
    (input and weight gradients) and 1 for every layer above the cut that only passes the gradient down
    (a masked layer, or a LoRA-wrapped one: its adapter's gradient is negligible). Full fine-tuning
    costs 3m per example; a profiled example costs m (forward only). The head and embedding are
    left out: at the medium token only, the head is a small part of a step.
    """

    def __init__(self, num_layers: int, *, lora: bool) -> None:
        self.m = num_layers
        self.lora = lora
        self.examples = 0
        self._frozen: int | None = 0  # None: resumed from a checkpoint that did not count it
        self._units = 0
        self._depths: Counter[int] = Counter()

    def add(self, n: int, depth: int, trainable: Sequence[bool]) -> None:
        """Count ``n`` examples trained at cut ``depth`` with the per-layer ``trainable`` mask."""
        above = self.m - depth
        weights = 0 if self.lora else sum(trainable[depth:])
        self.examples += n
        if self._frozen is not None:
            self._frozen += n * (self.m - sum(trainable[depth:]))  # a row trains nothing below its own cut
        self._units += n * (self.m + above + weights)
        self._depths[depth] += n

    def add_plan(self, plan: Any) -> None:
        """Count every row of a step plan at its own cut (``MicroBatch.depths``) with its forward's mask."""
        for mb in plan.micro_batches:
            for depth, n in Counter(mb.depths).items():
                self.add(n, depth, mb.trainable)

    def state_dict(self) -> dict:
        """The counts so far (JSON-able), for a checkpoint."""
        return {"examples": self.examples, "frozen": self._frozen, "units": self._units,
                "depths": [[int(k), int(v)] for k, v in sorted(self._depths.items())]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.examples = int(state["examples"])
        self._frozen = state.get("frozen")  # checkpoints of 0.1 did not count it: unknown from here on
        self._units = int(state["units"])
        self._depths = Counter({int(k): int(v) for k, v in state["depths"]})

    def saving(self) -> float:
        """The paper's backward cost-saving ratio of the rows trained: mean of depth / m."""
        if not self.examples:
            return 0.0
        return cost_saving_ratio([d for d, n in sorted(self._depths.items()) for _ in range(n)], self.m)

    def frozen_fraction(self) -> float | None:
        """Mean over trained rows of the share of layers not trained (TOP / INT / LIFT / ADT masks too);
        None after resuming from a checkpoint that did not count it."""
        if self._frozen is None:
            return None
        return self._frozen / (self.examples * self.m) if self.examples else 0.0

    def flops_ratio(self, profiled: int = 0, skipped: int = 0) -> float:
        """Estimated training FLOPs (``profiled`` forward-only examples included, ``skipped`` layer forwards
        the prefix cache saved taken out) relative to full fine-tuning of the same examples."""
        if not self.examples:
            return 0.0
        return (self._units - skipped + profiled * self.m) / (3 * self.m * self.examples)

    def depth_histogram(self) -> list[int]:
        """Trained examples per cut depth 0..m."""
        return [self._depths.get(k, 0) for k in range(self.m + 1)]
