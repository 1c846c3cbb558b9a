"""Cross-entropy of a linear head without the whole [N, V] logits: chunk by chunk, recomputed in backward.

A supervised fine-tuning batch of B x T tokens with a 49,152-token vocabulary has B * T * V logits
(8 x 512 x 49,152 float32 = 805 MB), and the plain loss keeps them, their log-softmax and their gradient
alive at once. :func:`linear_cross_entropy` computes the head and the loss over ``chunk_size`` supervised
positions at a time, each chunk under non-reentrant activation checkpointing: the forward keeps only the
chunk's per-position losses, and the backward recomputes one chunk's logits at a time, so the peak grows
with ``chunk_size * V``, not with ``B * T * V``. Positions whose target is ``ignore_index`` (prompt,
padding) never reach the head at all.

Liger-Kernel's and Apple's cut-cross-entropy fused kernels do the same on GPUs but are Triton-only; this
one is plain torch (CPU and GPU), and its numerics are ``F.linear`` + ``F.cross_entropy``'s own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from salf_engine.errors import ConfigError, positive_int

__all__ = ["linear_cross_entropy", "head_cross_entropy", "DEFAULT_CHUNK"]

#: Supervised positions per chunk (one chunk's float32 logits: 512 x 49,152 x 4 B = 100 MB).
DEFAULT_CHUNK = 512
_REDUCTIONS = ("mean", "sum", "none")


def _chunk_losses(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor) -> Tensor:
    logits = head(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax in float32, as transformers' loss does
    return F.cross_entropy(logits, targets, reduction="none")


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=..., reduction=...)`` (logits
    of half types in float32) without materializing more than ``chunk_size`` rows of logits, forward or
    backward. ``weight``: [V, D]; ``bias``: [V] or None; the rest as :func:`head_cross_entropy`."""
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ConfigError(f"weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    return head_cross_entropy(hidden, lambda h: F.linear(h, weight, bias), targets,
                              vocab_size=weight.shape[0], ignore_index=ignore_index, reduction=reduction,
                              chunk_size=chunk_size)


def head_cross_entropy(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, *, vocab_size: int,
                       ignore_index: int = -100, reduction: str = "mean",
                       chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Cross-entropy of ``head(hidden)`` (any map from [N, D] states to [N, V] logits: a linear head with
    its family's scaling or soft-capping) against ``targets``, ``chunk_size`` supervised positions at a time.

    Args:
        hidden: [..., D] states (the final norm's output).
        targets: [...] token ids in ``0..vocab_size-1``, ``ignore_index`` where no loss is taken.
        reduction: "mean" (over the supervised positions; 0 when there is none), "sum", or "none"
            (a loss per position, 0 at ignored ones, shaped like ``targets``).
    """
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    positive_int(chunk_size, "chunk_size")
    if hidden.shape[:-1] != targets.shape:
        raise ConfigError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: "
                          "hidden must be [..., D] over the targets' positions")
    flat_t = targets.reshape(-1)
    kept = (flat_t != ignore_index).nonzero().squeeze(1)
    chosen = flat_t[kept]
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= vocab_size):
        raise ConfigError(f"targets must be token ids in 0..{vocab_size - 1} (or {ignore_index}), "
                          f"got {int(chosen.min()) if int(chosen.min()) < 0 else int(chosen.max())}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    parts = [checkpoint(_chunk_losses, flat_h[rows], head, flat_t[rows], use_reentrant=False)
             for rows in kept.split(chunk_size)]
    # no supervised position: an empty chunk keeps the graph (zero gradients of the right shapes)
    losses = torch.cat(parts) if parts else _chunk_losses(flat_h[:0], head, flat_t[:0])
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / max(kept.numel(), 1)
    out = torch.zeros(flat_t.shape, dtype=losses.dtype, device=losses.device)
    return out.index_put((kept,), losses).reshape(targets.shape)
