"""Per-family decoder parts: call the embedding, each decoder layer, the final norm and the head directly.

The truncated runner needs to run ``layers[0..k-1]`` and ``layers[k..m-1]`` separately, so it cannot call
``model(...)``. Everything a layer receives from its parent ``*Model.forward`` (the attention mask of its
layer type, the rotary position embeddings, the position ids) is rebuilt here exactly as that forward does
it in transformers 5.x, so a direct layer-by-layer pass reproduces ``model(ids, attention_mask).logits``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedArchitectureError

__all__ = ["SUPPORTED_FAMILIES", "DecoderParts", "decoder_parts", "family_of", "unwrap_peft"]

SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "gemma2", "gemma3_text", "mistral")

_FULL = "full_attention"
_SLIDING = "sliding_attention"


def family_of(config: Any) -> str:
    """The family (``config.model_type``) if supported; UnsupportedArchitectureError otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by the truncated runner; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return model_type


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside a PEFT ``PeftModel`` (``base_model.model``); other models unchanged."""
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):
        inner = getattr(model.base_model, "model", None)
        if isinstance(inner, nn.Module):
            return inner
    return model


@dataclass
class DecoderParts:
    """The pieces of a decoder-only causal LM, with helpers that mirror its own forward."""

    family: str
    model: nn.Module  # the *ForCausalLM, unwrapped from PEFT
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rotary_emb: nn.Module
    num_layers: int
    config: Any = field(repr=False)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Space 0: the embedding output (Gemma's sqrt(D) scaling lives inside its embedding module)."""
        return self.embed(input_ids)

    def layer_types(self) -> list[str]:
        """The attention type of each decoder layer ("full_attention" / "sliding_attention")."""
        cfg = self.config
        if self.family in ("llama",):
            return [_FULL] * self.num_layers
        if self.family == "mistral":
            kind = _FULL if getattr(cfg, "sliding_window", None) is None else _SLIDING
            return [kind] * self.num_layers
        types = getattr(cfg, "layer_types", None)
        if types is None:
            return [_FULL] * self.num_layers
        return list(types[: self.num_layers])

    def layer_inputs(
        self, hidden: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None
    ) -> list[dict[str, Any]]:
        """Keyword arguments for each decoder layer ``i`` (list index ``i``), as ``*Model.forward`` builds.

        ``hidden`` is the embedding output ([B, T, D]); ``attention_mask`` the [B, T] padding mask (1 = token)
        or None; ``position_ids`` default to ``arange(T)`` like the model's own forward (so padded rows match
        ``model(input_ids, attention_mask=...)`` exactly). Masks come from transformers.masking_utils per
        layer type; a mask may be None where the attention backend needs none (sdpa with ``is_causal``).
        """
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        types = self.layer_types()
        masks = self._masks(hidden, attention_mask, position_ids, set(types))
        if self.family == "gemma3_text":
            rope = {t: self.rotary_emb(hidden, position_ids, t) for t in set(types)}
        else:
            shared = self.rotary_emb(hidden, position_ids)
            rope = {t: shared for t in set(types)}
        per_type = {
            t: {"attention_mask": masks[t], "position_embeddings": rope[t], "position_ids": position_ids}
            for t in set(types)
        }
        return [per_type[t] for t in types]

    def _masks(
        self, hidden: Tensor, attention_mask: Tensor | None, position_ids: Tensor, types: set[str]
    ) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs: dict[str, Any] = {
            "config": self.config,
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "past_key_values": None,
            "position_ids": position_ids,
        }
        if self.family == "llama":
            return {_FULL: create_causal_mask(**kwargs)}
        if self.family == "mistral":
            fn: Callable[..., Any] = (
                create_causal_mask if getattr(self.config, "sliding_window", None) is None
                else create_sliding_window_causal_mask
            )
            return {t: fn(**kwargs) for t in types}
        sliding_kwargs = dict(kwargs)
        if self.family == "gemma3_text" and getattr(self.config, "use_bidirectional_attention", False):
            from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay

            kwargs["or_mask_function"] = lambda *args: torch.tensor(True, dtype=torch.bool)
            sliding_kwargs["or_mask_function"] = _bidirectional_window_overlay(self.config.sliding_window)
        masks: dict[str, Any] = {}
        if _FULL in types:
            masks[_FULL] = create_causal_mask(**kwargs)
        if _SLIDING in types:
            masks[_SLIDING] = create_sliding_window_causal_mask(**sliding_kwargs)
        return masks

    def final_norm(self, hidden: Tensor) -> Tensor:
        """The model's final norm (space m = ``final_norm(output of layers[m-1])``)."""
        return self.norm(hidden)

    def head(self, hidden: Tensor) -> Tensor:
        """LM head on final-norm states, with the final logit soft-capping of Gemma2/Gemma3."""
        logits = self.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Split a supported ``*ForCausalLM`` (optionally PEFT-wrapped) into its decoder parts."""
    causal_lm = unwrap_peft(model)
    config = getattr(causal_lm, "config", None)
    family = family_of(config)
    decoder = getattr(causal_lm, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, n) for n in needed) or not hasattr(causal_lm, "lm_head"):
        raise UnsupportedArchitectureError(
            f"{type(causal_lm).__name__} (model_type {family!r}) does not have the expected "
            "model.embed_tokens / model.layers / model.norm / model.rotary_emb / lm_head layout; "
            "pass the *ForCausalLM model"
        )
    num_layers = min(len(decoder.layers), int(config.num_hidden_layers))
    return DecoderParts(
        family=family,
        model=causal_lm,
        embed=decoder.embed_tokens,
        layers=decoder.layers,
        norm=decoder.norm,
        lm_head=causal_lm.lm_head,
        rotary_emb=decoder.rotary_emb,
        num_layers=num_layers,
        config=config,
    )
