"""Model wrapping for a strategy: LoRA adapters or full weights, which parameters may train, per-plan masks.

:func:`wrap_model` decides once which parameters are trainable at all (a LoRA adapter, or all weights; the
head and embedding stay frozen under layer-freezing strategies); :meth:`TrainableModel.set_trainable` then
turns a plan's cut and per-layer mask into ``requires_grad`` flags among those parameters, micro-batch by
micro-batch.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from salf_engine.config import TrainConfig
from salf_engine.errors import ConfigError
from salf_engine.models.families import DecoderParts, decoder_parts

__all__ = ["TrainableModel", "apply_lora", "import_peft", "is_peft", "param_groups", "wrap_model"]

_Params = list[nn.Parameter]


def is_peft(model: nn.Module) -> bool:
    """Whether `model` is a PEFT ``PeftModel`` (its adapters are what trains)."""
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


class _No4bitKernelNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit" not in record.getMessage()


def import_peft(*, load_in_4bit: bool = False):
    """``import peft``, without bitsandbytes' import-time note when nothing runs in 4 bits.

    peft imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16, bitsandbytes then
    tries to fetch an optional CPU 4-bit matmul kernel from the Hugging Face hub (the ``kernels``
    package) and logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it cannot.
    That kernel only matters for 4-bit weights, so the note is dropped unless ``load_in_4bit``
    (docs/ARCHITECTURE.md, "Optional dependencies").
    """
    if load_in_4bit or "bitsandbytes" in sys.modules:
        import peft

        return peft
    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    note = _No4bitKernelNote()
    bnb_log.addFilter(note)
    try:
        import peft
    finally:
        bnb_log.removeFilter(note)
    return peft


def apply_lora(model, config: TrainConfig, layers: Sequence[int] | None = None):
    """Wrap `model` with a PEFT LoRA adapter on the attention + MLP projections (optionally some layers)."""
    peft = import_peft(load_in_4bit=config.load_in_4bit)
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in config.lora_target_modules if t in names]
    if not targets:
        raise ConfigError(
            f"none of the LoRA target modules {config.lora_target_modules} exist in this model"
        )
    kwargs: dict[str, Any] = {}
    if layers is not None:
        kwargs["layers_to_transform"] = sorted(int(i) for i in layers)
        kwargs["layers_pattern"] = "layers"
    lora_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM", **kwargs,
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        return get_peft_model(model, lora_config)


def param_groups(parts: DecoderParts) -> tuple[_Params, list[_Params], _Params]:
    """(embedding params, params of each layer, everything else: norm, head, a tied embedding)."""
    embed = list(parts.embed.parameters())
    layers = [list(layer.parameters()) for layer in parts.layers]
    seen = {id(p) for p in embed} | {id(p) for ps in layers for p in ps}
    rest = [p for p in parts.model.parameters() if id(p) not in seen]
    # tied head: the embedding matrix is also the head and trains through it
    head_ids = {id(p) for p in parts.lm_head.parameters()}
    rest += [p for p in embed if id(p) in head_ids]
    return embed, layers, rest


@dataclass
class TrainableModel:
    """A model ready for a strategy: what trains, grouped by decoder part."""

    model: nn.Module  # what the runner and the optimizer see (PEFT-wrapped under LoRA)
    parts: DecoderParts
    lora: bool
    full_weights: bool  # full fine-tuning: the embedding may train (at cut 0 with an all-True mask)
    trainable: _Params  # the parameters trainable at the start; the optimizer's parameters
    embed_params: _Params = field(repr=False)
    layer_params: list[_Params] = field(repr=False)
    rest_params: _Params = field(repr=False)

    @property
    def num_layers(self) -> int:
        """m, the number of decoder layers."""
        return self.parts.num_layers

    @property
    def head_trains(self) -> bool:
        """Whether the LM head is among the trainable parameters."""
        ids = {id(q) for q in self.trainable}
        return any(id(q) in ids for q in self.parts.lm_head.parameters())

    @property
    def embed_trainable(self) -> bool:
        """Whether the embedding may train (full fine-tuning with a trainable embedding)."""
        ids = {id(q) for q in self.trainable}
        return self.full_weights and any(id(q) in ids for q in self.embed_params)

    def set_trainable(self, depth: int, mask: Sequence[bool], rows: Sequence[int] | None = None) -> bool:
        """``requires_grad`` from a forward's lowest cut ``depth`` and ``mask``, among the parameters
        trainable at the start (under DDP / FSDP pass the cut every rank shares, ``MicroBatch.depth``, so
        every rank sets the same flags). Returns whether the embedding runs with autograd (the runner's
        ``train_embeddings``): when it may train (cut 0, every layer trained) and every one of this
        forward's ``rows`` (its per-row cuts; default: all at ``depth``) is cut at 0."""
        allowed: set[int] = set()
        train_embed = self.embed_trainable and depth == 0 and all(mask)
        if train_embed:
            allowed.update(id(q) for q in self.embed_params)
        for i in range(depth, self.num_layers):
            if mask[i]:
                allowed.update(id(q) for q in self.layer_params[i])
        allowed.update(id(q) for q in self.rest_params)
        for q in self.trainable:
            q.requires_grad_(id(q) in allowed)
        return train_embed and not any(rows or ())

    def refresh(self) -> None:
        """Re-read the parameters after something replaced them (FSDP2's ``fully_shard``): the groups, and
        as trainable the parameters that require grad now (call it right after sharding)."""
        self.embed_params, self.layer_params, self.rest_params = param_groups(self.parts)
        self.trainable = [q for q in self.model.parameters() if q.requires_grad]

    def restore(self) -> None:
        """Every parameter trainable at the start trainable again (after training)."""
        for q in self.trainable:
            q.requires_grad_(True)


def wrap_model(model: nn.Module, strategy: Any, config: TrainConfig) -> TrainableModel:
    """LoRA adapters (config.lora, or the strategy's own: all layers or the top half) or full weights.

    A model that is already PEFT-wrapped keeps its adapters (nothing else trains). Layer-freezing
    strategies keep the head (unless ``config.train_head``) and the embedding fixed: the frozen layers'
    input, the semantic bases and the profiled eofs stay what they were.
    """
    num_layers = decoder_parts(model).num_layers
    lora_mode = getattr(strategy, "uses_lora", False)
    already = is_peft(model)
    uses_lora = bool(config.lora or lora_mode or already)
    wrapped = model
    if uses_lora and not already:
        lora_layers = range(num_layers // 2, num_layers) if lora_mode == "half" else None
        wrapped = apply_lora(model, config, lora_layers)
    elif not uses_lora:
        for prm in model.parameters():
            prm.requires_grad_(True)
    parts = decoder_parts(wrapped)
    embed, layers, rest = param_groups(parts)
    full_weights = strategy.name == "full" and not uses_lora
    if not full_weights:
        for q in embed:
            q.requires_grad_(False)
        for q in parts.lm_head.parameters():
            q.requires_grad_(config.train_head)
    trainable = [q for q in wrapped.parameters() if q.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable parameters")
    return TrainableModel(model=wrapped, parts=parts, lora=uses_lora, full_weights=full_weights,
                          trainable=trainable, embed_params=embed, layer_params=layers, rest_params=rest)

