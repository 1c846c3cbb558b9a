"""A forward that enters at the frozen floor: some rows bring their hidden states there, the others compute
them and hand them back.

:class:`FloorRows` is what the runner takes as ``prefix=``: the floor (a layer index no row of the call
trains below) and, per row, its cached states (``[n, D]``: its real tokens only, in order) or None, at the
floor or, where the floor rose since they were kept, at a lower layer (``FloorRows.layers``). The runner
runs ``layers[0..floor-1]`` under ``no_grad`` for the uncached rows, ``layers[l..floor-1]`` for a row cached
at layer l, places every row's floor states at its real positions, and continues from layer ``floor`` as
usual; the floor states it computed come back in ``FloorRows.written``. Position ids are rebuilt from the
attention mask (:func:`mask_positions`), so a row's positions never depend on its batch's padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FloorRows", "mask_positions"]


class FloorRows:
    """The rows of one forward at the floor: ``cached[r]`` (row r's ``[n_r, D]`` states, or None) in, the
    input of layer ``layers[r]`` (at most the floor; ``layers`` None: every cached row at the floor); the
    runner fills ``written[r]`` (detached ``[n_r, D]``, at the floor) for every row it computed, None for
    the others. Not a dataclass: FSDP2's and DDP's input casts rebuild dataclasses on the way into the
    model, and ``written`` must reach the caller's object."""

    def __init__(self, floor: int, cached: list[Tensor | None], written: list[Tensor | None] | None = None,
                 layers: list[int] | None = None) -> None:
        self.floor, self.cached, self.layers = floor, cached, layers
        self.written: list[Tensor | None] = [] if written is None else written

    def __repr__(self) -> str:
        return f"FloorRows(floor={self.floor}, rows={len(self.cached)}, layers={self.layers})"

    @property
    def starts(self) -> list[int]:
        """The layer each row enters at: 0 without cached states, else the layer its states are at."""
        return [0 if c is None else self.floor if self.layers is None else self.layers[r]
                for r, c in enumerate(self.cached)]

    @property
    def computed(self) -> list[int]:
        """The rows that run layers below the floor: those without cached states, and those cached below
        it."""
        return [r for r, s in enumerate(self.starts) if s < self.floor]


def mask_positions(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor:
    """Position ids from the padding mask: a row's real tokens at 0, 1, .. whatever its padding (left or
    right), padding at 1 (as transformers' ``generate`` builds them); ``arange(T)`` without a mask."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
