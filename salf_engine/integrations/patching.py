"""Patch a causal LM so that its ordinary ``forward(**batch)`` runs through the truncated runner.

A batch that carries ``salf_depth`` (one cut for the whole batch as an int, or one per row as a [B]
tensor or list: a ``salf_depth`` column collates to that) runs each row's ``layers[0..depth-1]``
without autograd and returns the usual HF output (``loss`` from the model's own loss function over
``labels``, with ``num_items_in_batch`` when given, and ``logits``) plus the batch's per-sample
``deviations`` when the patch has semantic bases and the batch carries ``salf_label`` (class
indices); ``salf_train_embeddings`` (default: every cut 0 and a trainable embedding) runs the
embedding with autograd; ``salf_logits="last"`` returns only the medium token's [B, V] logits (no
loss: eof profiles); ``salf_prefix`` (a :class:`~salf_engine.runner.prefix.FloorRows`) enters at the
frozen floor (docs/prefix_cache.md). A batch without ``salf_depth`` (evaluation, generation) runs the original
forward unchanged. Patch before a trainer wraps the model (DDP, FSDP, accelerate).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from salf_engine.errors import ConfigError
from salf_engine.models.families import unwrap_peft
from salf_engine.runner.truncated import PATCH_ATTR as _MARK
from salf_engine.runner.truncated import TruncatedRunner, is_patched, last_token_index, plain_depth

__all__ = [
    "SALF_KEYS", "SalfCausalLMOutput", "is_patched", "medium_index", "patch_model", "runner_of",
    "unpatch_model",
]

#: The batch keys the patched forward consumes besides the model's own arguments.
SALF_KEYS = ("salf_depth", "salf_label", "salf_train_embeddings", "salf_logits", "salf_prefix")


@dataclass
class SalfCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the batch's deviations ([B, m+1] float32, detached) when computed."""

    deviations: Tensor | None = None


def medium_index(labels: Tensor | None, attention_mask: Tensor | None, input_ids: Tensor) -> Tensor:
    """Per row, the position that predicts the first supervised label (the medium token); rows with no
    supervised label (or no labels) use their last non-padding position."""
    fallback = last_token_index(attention_mask, input_ids)
    if labels is None:
        return fallback
    supervised = labels != -100
    first = torch.argmax(supervised.int(), dim=-1)
    return torch.where(supervised.any(dim=-1) & (first > 0), first - 1, fallback)


def _foreign_patch(causal_lm: nn.Module) -> str | None:
    """What replaced the model's forward, if anything other than transformers' own class method did."""
    own = causal_lm.__dict__.get("forward")
    if own is not None:
        return getattr(own, "__module__", None) or repr(own)
    module = getattr(type(causal_lm).forward, "__module__", "") or ""
    if not module.startswith("transformers."):
        return module
    return None


def patch_model(model: nn.Module, *, bases: Tensor | None = None, lens: str = "final_norm",
                metric: str = "cosine", deviation_impl: str = "auto",
                gradient_checkpointing: bool = False) -> nn.Module:
    """Patch `model` (plain or PEFT-wrapped causal LM) in place so batches with ``salf_depth`` run through
    the truncated runner; returns `model`. Patching twice is a no-op; a forward already replaced by
    something else (Liger's fused linear cross entropy, a chunked-loss patch) is refused."""
    causal_lm = unwrap_peft(model)
    if hasattr(causal_lm, _MARK):
        return model
    foreign = _foreign_patch(causal_lm)
    if foreign is not None:
        raise ConfigError(f"{type(causal_lm).__name__}.forward is already patched by {foreign}; "
                          "SALF needs the model's own forward (turn off fused / chunked loss patches)")
    runner = TruncatedRunner(causal_lm, bases=bases, lens=lens, metric=metric, deviation_impl=deviation_impl)
    original = causal_lm.forward  # the bound class method

    @functools.wraps(original)
    def forward(*args: Any, salf_depth: Any = None, salf_label: Tensor | None = None,
                salf_train_embeddings: bool | None = None, salf_logits: str = "all", salf_prefix: Any = None,
                **kwargs: Any):
        if salf_depth is None:
            return original(*args, **kwargs)
        if args:
            raise ConfigError("the SALF-patched forward takes keyword arguments only (forward(**batch))")
        depth = plain_depth(salf_depth, "salf_depth")
        if salf_train_embeddings is None:
            embed = runner.parts.embed.parameters()
            rows = depth if isinstance(depth, list) else [depth]
            salf_train_embeddings = not any(rows) and any(q.requires_grad for q in embed)
        return _truncated_forward(causal_lm, runner, depth, salf_label, bool(salf_train_embeddings),
                                  gradient_checkpointing, salf_logits, salf_prefix, **kwargs)

    sig = inspect.signature(original)
    params = list(sig.parameters.values())
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in SALF_KEYS]
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    forward.__signature__ = sig.replace(parameters=head + extra + tail)  # type: ignore[attr-defined]
    causal_lm.forward = forward
    setattr(causal_lm, _MARK, runner)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model` (the class forward is used again); returns `model`."""
    causal_lm = unwrap_peft(model)
    if hasattr(causal_lm, _MARK):
        del causal_lm.forward
        delattr(causal_lm, _MARK)
    return model


def runner_of(model: nn.Module) -> TruncatedRunner:
    """The truncated runner a patched model runs through (ConfigError when `model` is not patched)."""
    runner = getattr(unwrap_peft(model), _MARK, None)
    if runner is None:
        raise ConfigError("the model is not SALF-patched; call "
                          "salf_engine.integrations.patching.patch_model(model) first")
    return runner



def _truncated_forward(causal_lm: nn.Module, runner: TruncatedRunner, depth: int, salf_label: Tensor | None,
                       train_embeddings: bool, gradient_checkpointing: bool, logits: str, prefix: Any, *,
                       input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                       labels: Tensor | None = None,
                       num_items_in_batch: Any = None, position_ids: Tensor | None = None,
                       inputs_embeds: Tensor | None = None, **ignored: Any) -> SalfCausalLMOutput:
    if input_ids is None or inputs_embeds is not None:
        raise ConfigError("a SALF batch needs input_ids (inputs_embeds cannot be cut below the embedding)")
    if position_ids is not None:
        raise ConfigError("a SALF batch cannot carry position_ids: packed / padding-free rows mix samples "
                          "that may need different cuts; pad the rows instead")
    if ignored.get("past_key_values") is not None or ignored.get("cache") is not None:
        raise ConfigError("a SALF batch cannot use a KV cache")
    index = medium_index(labels, attention_mask, input_ids)
    out = runner(input_ids, attention_mask, depth=depth, last_index=index, labels=salf_label, logits=logits,
                 gradient_checkpointing=gradient_checkpointing, train_embeddings=train_embeddings,
                 prefix=prefix)
    loss = None
    if labels is not None and logits == "all":
        loss = causal_lm.loss_function(logits=out.logits, labels=labels, vocab_size=out.logits.shape[-1],
                                       num_items_in_batch=num_items_in_batch)
    return SalfCausalLMOutput(loss=loss, logits=out.logits, deviations=out.deviations)
