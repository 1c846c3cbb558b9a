"""Supervised fine-tuning on prompt/response rows: the response-only loss of one forward at per-row cuts.

:func:`response_loss` runs a right-padded batch of :func:`~salf_engine.data.responses.collate_responses`
through the :class:`~salf_engine.runner.truncated.TruncatedRunner` (each row's bottom ``depth`` layers without
autograd), takes the final-norm states without the head, and applies the head and the cross-entropy over
the supervised (response) positions a chunk at a time
(:func:`~salf_engine.runner.chunked_loss.head_cross_entropy`),
so the [B, T, V] logits never exist. The loss is the causal LM's: the state at position t predicts the
label at t + 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from salf_engine.errors import ConfigError
from salf_engine.runner.chunked_loss import DEFAULT_CHUNK, head_cross_entropy
from salf_engine.runner.prefix import FloorRows

__all__ = ["ResponseLoss", "response_loss"]


@dataclass
class ResponseLoss:
    """``total``: the sum of the token losses (with autograd); ``tokens``: supervised tokens in the batch;
    ``rows``: each row's mean token loss (detached; 0 for a row without a supervised token)."""

    total: Tensor
    tokens: int
    rows: Tensor

    @property
    def mean(self) -> Tensor:
        """The mean loss per supervised token (the training loss of the batch alone)."""
        return self.total / max(self.tokens, 1)


def response_loss(runner: Any, batch: dict[str, Tensor], depth: int | list[int] | Tensor, *,
                  chunk_size: int = DEFAULT_CHUNK, gradient_checkpointing: bool = False,
                  train_embeddings: bool = False, prefix: FloorRows | None = None) -> ResponseLoss:
    """The response-only next-token loss of ``batch`` (``input_ids``, ``attention_mask``, ``labels``: [B, T],
    ``-100`` where nothing is supervised), each row frozen below its ``depth`` (an int, or one per row);
    ``prefix``: enter at its floor (the runner's ``prefix``; docs/prefix_cache.md)."""
    missing = [key for key in ("input_ids", "attention_mask", "labels") if key not in batch]
    if missing:
        raise ConfigError(f"an SFT batch needs input_ids, attention_mask and labels; missing {missing}")
    device = next(runner.parts.model.parameters()).device
    labels = batch["labels"].to(device)
    out = runner(batch["input_ids"].to(device), batch["attention_mask"].to(device), depth=depth,
                 logits="none", gradient_checkpointing=gradient_checkpointing,
                 train_embeddings=train_embeddings, prefix=prefix)
    targets = labels[:, 1:]
    head = runner.parts.head
    vocab = runner.parts.lm_head.weight.shape[0]
    per_token = head_cross_entropy(out.hidden[:, :-1], head, targets, vocab_size=vocab, reduction="none",
                                   chunk_size=chunk_size)
    counts = (targets != -100).sum(dim=1)
    rows = per_token.detach().sum(dim=1) / counts.clamp(min=1)
    return ResponseLoss(total=per_token.sum(), tokens=int(counts.sum()), rows=rows)

