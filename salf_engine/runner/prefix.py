"""A forward that enters at the frozen floor: some rows bring their hidden states there, the others compute
them and hand them back.

:class:`FloorRows` is what the runner takes as ``prefix=``: the floor (a layer index no row of the call
trains below) and, per row, its cached states at the floor (``[n, D]``: its real tokens only, in order) or
None. The runner runs ``layers[0..floor-1]`` under ``no_grad`` for the uncached rows only, places every
row's floor states at its real positions, and continues from layer ``floor`` as usual; the states it
computed come back in ``FloorRows.written``. Position ids are rebuilt from the attention mask
(:func:`mask_positions`), so a row's positions never depend on its batch's padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["FloorRows", "mask_positions"]


@dataclass
class FloorRows:
    """The rows of one forward at the floor: ``cached[r]`` (row r's ``[n_r, D]`` states, or None) in; the
    runner fills ``written[r]`` (detached ``[n_r, D]``) for every row it computed, None for the others."""

    floor: int
    cached: list[Tensor | None]
    written: list[Tensor | None] = field(default_factory=list)

    @property
    def computed(self) -> list[int]:
        """The rows that run the layers below the floor (those without cached states)."""
        return [r for r, c in enumerate(self.cached) if c is None]


def mask_positions(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor:
    """Position ids from the padding mask: a row's real tokens at 0, 1, .. whatever its padding (left or
    right), padding at 1 (as transformers' ``generate`` builds them); ``arange(T)`` without a mask."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
