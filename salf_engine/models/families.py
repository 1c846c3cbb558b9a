"""Decoder parts of any standard transformers decoder: call the embedding, each layer, the norm and the head.

The truncated runner needs to run ``layers[0..k-1]`` and ``layers[k..m-1]`` separately, so it cannot call
``model(...)``. Everything a layer receives from its parent ``*Model.forward`` (the attention mask of its
layer type, the rotary position embeddings, the position ids) is rebuilt here exactly as that forward does
it in transformers 5.x, so a direct layer-by-layer pass reproduces ``model(ids, attention_mask).logits``.

The standard layout is ``*ForCausalLM.model.{embed_tokens, layers, norm, rotary_emb}`` + ``lm_head``, with
per-layer attention types ``full_attention`` / ``sliding_attention`` (``config.layer_types``, or one
``sliding_window`` for all layers). The per-family quirks outside the layers are handled explicitly:
Granite's embedding multiplier and logits scaling, MiniCPM3's hidden-state scaling, Cohere's logit scale,
Gemma's final logit soft-capping, Starcoder2's embedding dropout, NanoChat's embedding norm (Gemma's
sqrt(D) embedding scale lives in its embedding module). Families in :data:`SUPPORTED_FAMILIES` are
tested for exact logits; any other model with the standard layout is checked once against its own forward
on a short input before use (:func:`check_exact`).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salf_engine.errors import UnsupportedArchitectureError

__all__ = [
    "SUPPORTED_FAMILIES",
    "DecoderParts",
    "check_exact",
    "decoder_parts",
    "family_of",
    "missing_layout",
    "unwrap_peft",
]

#: Families whose layer-by-layer pass is tested for exact logits against ``model(...)`` in the suite.
SUPPORTED_FAMILIES: tuple[str, ...] = (
    "llama", "qwen2", "gemma2", "gemma3_text", "mistral",
    "qwen3", "gemma", "phi3", "olmo", "olmo2", "olmo3", "granite", "granite_swa", "starcoder2", "cohere",
    "cohere2", "glm", "glm4", "helium", "smollm3", "ministral", "ministral3", "minicpm3", "nemotron",
    "exaone4", "seed_oss", "arcee", "apertus", "ernie4_5", "vaultgemma", "nanochat", "bitnet", "cwm",
    "diffllama", "hunyuan_v1_dense", "jais2", "stablelm",
)

_FULL = "full_attention"
_SLIDING = "sliding_attention"
_DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")
_checked: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside a PEFT ``PeftModel`` (``base_model.model``); other models unchanged."""
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):
        inner = getattr(model.base_model, "model", None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def missing_layout(causal_lm: nn.Module) -> list[str]:
    """The parts of the standard decoder layout that `causal_lm` lacks (empty when it has them all)."""
    decoder = getattr(causal_lm, "model", None)
    if not isinstance(decoder, nn.Module):
        return ["model"] + [f"model.{n}" for n in _DECODER_PARTS] + (
            [] if hasattr(causal_lm, "lm_head") else ["lm_head"])
    missing = [f"model.{n}" for n in _DECODER_PARTS if not hasattr(decoder, n)]
    if not hasattr(causal_lm, "lm_head"):
        missing.append("lm_head")
    return missing


def _unsupported(model_type: Any, what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported by the truncated runner: {what}; tested families: "
        f"{', '.join(SUPPORTED_FAMILIES)} (any decoder with model.embed_tokens / layers / norm / rotary_emb "
        "and lm_head works)"
    )


def family_of(config: Any) -> str:
    """The family (``config.model_type``) if the runner can run it; UnsupportedArchitectureError otherwise.

    Tested families pass directly; any other causal LM is built on the meta device (no memory) to check
    that it has the standard layout.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_FAMILIES:
        return model_type
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure means the type is not a buildable causal LM
        raise _unsupported(model_type, f"no causal LM class builds from its config ({exc})") from None
    missing = missing_layout(skeleton)
    if missing:
        raise _unsupported(model_type, f"missing {', '.join(missing)}")
    return model_type


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


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
    decoder: nn.Module | None = field(default=None, repr=False)  # the *Model holding the layers

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Space 0: the embedding output, with the family's multiplier and (training) embedding dropout."""
        hidden = self.embed(input_ids)
        multiplier = getattr(self.decoder, "embedding_multiplier", None)
        if multiplier is not None:
            hidden = hidden * multiplier
        if self.family == "nanochat":  # NanoChat norms the embedding before the first layer
            hidden = self.norm(hidden)
        p = getattr(self.decoder, "embedding_dropout", None)
        if isinstance(p, float) and p > 0 and self.decoder is not None:
            hidden = F.dropout(hidden, p=p, training=self.decoder.training)
        return hidden

    def layer_types(self) -> list[str]:
        """The attention type of each decoder layer ("full_attention" / "sliding_attention")."""
        cfg = self.config
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            return list(types[: self.num_layers])
        window = getattr(cfg, "sliding_window", None)
        sliding = window is not None and getattr(cfg, "use_sliding_window", True)
        return [_SLIDING if sliding else _FULL] * self.num_layers

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
        kinds = set(types)
        unknown = kinds - {_FULL, _SLIDING}
        if unknown:
            raise _unsupported(self.family, f"layer types {sorted(unknown)} (only full/sliding attention)")
        masks = self._masks(hidden, attention_mask, position_ids, kinds)
        if _accepts(self.rotary_emb.forward, "layer_type"):
            rope = {t: self.rotary_emb(hidden, position_ids, layer_type=t) for t in kinds}
        else:
            shared = self.rotary_emb(hidden, position_ids)
            rope = {t: shared for t in kinds}
        per_type = {
            t: {"attention_mask": masks[t], "position_embeddings": rope[t], "position_ids": position_ids}
            for t in kinds
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
            "position_ids": position_ids,
        }
        kwargs["cache" if _accepts(create_causal_mask, "cache") else "past_key_values"] = None
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
        """LM head on final-norm states, with the family's scaling and final logit soft-capping."""
        cfg = self.config
        if self.family == "minicpm3":
            hidden = hidden / cfg.logits_scaling
        logits = self.lm_head(hidden)
        if self.family in ("granite", "granite_swa"):
            logits = logits / cfg.logits_scaling
        scale = getattr(self.model, "logit_scale", None)
        if isinstance(scale, float):
            logits = logits * scale
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def check_exact(parts: DecoderParts, *, atol: float = 1e-4) -> None:
    """Compare the layer-by-layer pass with the model's own forward on a short padded input (eval mode,
    no grad); UnsupportedArchitectureError when they differ (a forward quirk the runner does not know)."""
    param = next(parts.model.parameters(), None)
    if param is None or param.device.type == "meta":
        return
    vocab = int(getattr(parts.config, "vocab_size", 8))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab, 1), (2, 8), generator=gen).to(param.device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    was_training = parts.model.training
    parts.model.eval()
    try:
        with torch.no_grad():
            ref = parts.model(input_ids=ids, attention_mask=mask).logits.float()
            hidden = parts.embed_tokens(ids)
            kwargs = parts.layer_inputs(hidden, mask)
            for i in range(parts.num_layers):
                hidden = parts.layers[i](hidden, **kwargs[i])
            out = parts.head(parts.final_norm(hidden)).float()
    except UnsupportedArchitectureError:
        raise
    except Exception as exc:  # noqa: BLE001 - a layer that cannot run alone is a layout the runner lacks
        raise _unsupported(parts.family, f"its decoder layers cannot run one by one ({exc})") from None
    finally:
        parts.model.train(was_training)
    scale = max(1.0, float(ref.abs().max()))
    err = float((out - ref).abs().max())
    if not err <= atol * scale:
        raise _unsupported(parts.family, f"its layer-by-layer pass differs from model(...) by {err:.3g} "
                                         "(a forward step outside the standard layout)")


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Split a standard ``*ForCausalLM`` (optionally PEFT-wrapped) into its decoder parts.

    A model outside :data:`SUPPORTED_FAMILIES` is checked once with :func:`check_exact`.
    """
    causal_lm = unwrap_peft(model)
    config = getattr(causal_lm, "config", None)
    model_type = getattr(config, "model_type", None)
    missing = missing_layout(causal_lm)
    if config is None or missing:
        what = f"{type(causal_lm).__name__} is missing " + ", ".join(missing or ["config"])
        raise _unsupported(model_type, what + "; pass the *ForCausalLM model")
    decoder = causal_lm.model
    num_layers = min(len(decoder.layers), int(config.num_hidden_layers))
    parts = DecoderParts(
        family=str(model_type),
        model=causal_lm,
        embed=decoder.embed_tokens,
        layers=decoder.layers,
        norm=decoder.norm,
        lm_head=causal_lm.lm_head,
        rotary_emb=decoder.rotary_emb,
        num_layers=num_layers,
        config=config,
        decoder=decoder,
    )
    if model_type not in SUPPORTED_FAMILIES and causal_lm not in _checked:
        check_exact(parts)
        _checked.add(causal_lm)
    return parts
