"""ADT: layers frozen by their weight change after a few steps of full training (the selective-freezing
paper's adaptive strategy)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from salf_engine.schedule.base import Strategy, as_layers
from salf_engine.schedule.names import ADT_STEPS
from salf_engine.schedule.plans import MicroBatch, chunks
from salf_engine.schedule.static import frozen_count

__all__ = ["ADT_STEPS", "AdaptiveStrategy"]


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
        mods = list(as_layers(layers))
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
        for chunk in chunks(self._shuffled(epoch), step_size):
            mask = list(self.trainable)  # read when the step is planned: changes after the warm-up steps
            yield MicroBatch(chunk, mask.index(True), mask)
