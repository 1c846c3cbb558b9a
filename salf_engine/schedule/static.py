"""Strategies with one layer mask for the whole run: full, LoRA, BOT / TOP / INT (the selective-freezing
paper's static freezes)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from fractions import Fraction

from salf_engine.errors import ConfigError
from salf_engine.schedule.base import Strategy
from salf_engine.schedule.plans import MicroBatch, chunks

__all__ = ["StaticStrategy", "fraction_mask", "frozen_count", "interleaved_frozen"]


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


class StaticStrategy(Strategy):
    """One fixed mask for every step (full, LoRA, BOT, TOP, INT); samples shuffled each epoch."""

    plans_fixed = True  # the mask and each epoch's shuffle are set before training

    def __init__(self, name: str, mask_fn: Callable[[int], list[bool]], **kwargs) -> None:
        super().__init__(name, **kwargs)
        self._mask_fn = mask_fn
        self.trainable: list[bool] = []
        self.depth = 0

    def _setup(self, eofs: list[int | None] | None) -> None:
        self.trainable = self._mask_fn(self.num_layers)
        self.depth = self.trainable.index(True)

    def floor(self, step: int) -> int:
        """The first trained layer of the one mask, at every step: BOT-k's k, LoRA[half]'s m // 2 (its lowest
        adapter; the embedding never trains), 0 for full, LoRA on every layer, TOP and INT."""
        if not self._begun:
            raise RuntimeError(f"strategy {self.label!r}: call begin() before floor()")
        return self.depth

    def _micro_batches(self, epoch: int, step_size: int, micro_size: int) -> Iterator[MicroBatch]:
        for chunk in chunks(self._shuffled(epoch), step_size):
            yield MicroBatch(chunk, self.depth, list(self.trainable))


def fraction_mask(kind: str, fraction: float, label: str) -> Callable[[int], list[bool]]:
    """The layer mask of ``bot`` / ``top`` / ``int`` at ``fraction`` for m layers (``label`` names it in
    errors)."""

    def mask(m: int) -> list[bool]:
        n = frozen_count(fraction, m, label)
        if kind == "bot":
            return [i >= n for i in range(m)]
        if kind == "top":
            return [i < m - n for i in range(m)]
        frozen = set(interleaved_frozen(fraction, m))
        return [i not in frozen for i in range(m)]

    return mask
