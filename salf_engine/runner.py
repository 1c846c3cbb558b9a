"""Truncated-autograd runner: freeze the bottom ``depth`` layers by never building their graph.

``layers[0..depth-1]`` (and the embedding) run under ``torch.no_grad()``; the state at the cut is detached;
``layers[depth..m-1]`` + final norm + head run with autograd. Backward therefore never reaches a frozen
block and no activation of a frozen block is kept, whatever ``requires_grad`` flags, PEFT or
``enable_input_require_grads`` hooks say. The medium-token state of every latent space is gathered on the
way, so the per-sample deviations come out of the training forward itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .deviation_contract import LENSES as _LENSES
from .deviation_contract import METRICS as _METRICS
from .errors import ConfigError
from .models.families import DecoderParts, decoder_parts

__all__ = ["RunnerOutput", "TruncatedRunner", "last_token_index"]

_LOGITS = ("last", "all")


@dataclass
class RunnerOutput:
    """What one truncated forward returns."""

    logits: Tensor  # [B, V] at last_index ("last") or [B, T, V] ("all")
    deviations: Tensor | None  # [B, m+1] float32 from this same forward (needs bases + labels), detached
    last_hidden: Tensor  # [B, D] final-norm state at last_index (with autograd)


def last_token_index(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor:
    """Index of the last non-padding position of each row (left or right padding); T-1 without a mask."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(length, device=attention_mask.device)
    return (attention_mask.to(torch.bool) * positions).amax(dim=-1).long()


def _call_layer(layer: nn.Module, hidden: Tensor, **kwargs: Any) -> Tensor:
    """Call a decoder layer with transformers' own per-layer checkpointing switched off for the call.

    The runner checkpoints trained layers itself (non-reentrant, and also in the backward recomputation,
    which runs this same function); HF's wrapper would also wrap the frozen prefix, and its reentrant variant
    drops the parameter grads of a layer whose input does not require grad (the detached cut).
    """
    flag = getattr(layer, "gradient_checkpointing", None)
    if not flag:
        return layer(hidden, **kwargs)
    layer.gradient_checkpointing = False
    try:
        return layer(hidden, **kwargs)
    finally:
        layer.gradient_checkpointing = flag


def _hf_checkpointing_on(layers: list[nn.Module]) -> bool:
    """Whether transformers' gradient checkpointing is enabled (and active: training mode) on any layer."""
    return any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in layers)


class TruncatedRunner:
    """Run a causal LM with its bottom ``depth`` decoder layers outside autograd.

    Args:
        model: a standard-layout ``*ForCausalLM`` (see ``models.families``), PEFT-wrapped or not.
        bases: float32 [K, D] semantic bases of the K label tokens (``semantics.semantic_bases``); with
            ``labels`` at call time the runner returns per-sample deviations of all m+1 spaces.
        lens: "final_norm" (apply the model's final norm to spaces 0..m-1, logit-lens view) or "raw".
        metric: deviation metric, "cosine" | "ce" | "rank".
        deviation_impl: ``impl`` passed to ``salf_engine.deviation.deviations``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        bases: Tensor | None = None,
        lens: str = "final_norm",
        metric: str = "cosine",
        deviation_impl: str = "auto",
    ) -> None:
        if lens not in _LENSES:
            raise ConfigError(f"unknown lens {lens!r}; expected one of {', '.join(_LENSES)}")
        if metric not in _METRICS:
            raise ConfigError(f"unknown deviation metric {metric!r}; expected one of {', '.join(_METRICS)}")
        self.model = model
        self.parts: DecoderParts = decoder_parts(model)
        self.num_layers: int = self.parts.num_layers
        self.lens = lens
        self.metric = metric
        self.deviation_impl = deviation_impl
        self.bases = bases
        if bases is not None and (bases.dim() != 2 or bases.shape[1] != self._hidden_size()):
            raise ConfigError(
                f"bases must be [K, {self._hidden_size()}] (one row per label token), "
                f"got {tuple(bases.shape)}"
            )

    def _hidden_size(self) -> int:
        return int(self.parts.config.hidden_size)

    def set_bases(self, bases: Tensor | None) -> None:
        """Replace the semantic bases (e.g. after the head changed)."""
        if bases is not None and (bases.dim() != 2 or bases.shape[1] != self._hidden_size()):
            raise ConfigError(f"bases must be [K, {self._hidden_size()}], got {tuple(bases.shape)}")
        self.bases = bases

    def _check_depth(self, depth: Any) -> int:
        if isinstance(depth, Tensor) and depth.numel() == 1:
            depth = int(depth.item())
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise ConfigError(f"depth must be an int in 0..{self.num_layers}, got {depth!r}")
        if not 0 <= depth <= self.num_layers:
            raise ConfigError(
                f"depth {depth} is out of range: the model has {self.num_layers} decoder layers, "
                f"so depth must be in 0..{self.num_layers}"
            )
        return depth

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        *,
        depth: int,
        last_index: Tensor | None = None,
        labels: Tensor | None = None,
        logits: str = "last",
        gradient_checkpointing: bool = False,
        train_embeddings: bool = False,
    ) -> RunnerOutput:
        """One forward with ``layers[0..depth-1]`` frozen (no graph) and the rest trainable.

        Args:
            input_ids / attention_mask: [B, T] (left or right padding; mask 1 = token).
            depth: number of frozen bottom layers, 0..m (m = all layers frozen, only norm + head train).
            last_index: [B] medium-token position per row; default the last non-padding position.
            labels: [B] class indices into ``bases`` (deviations are computed only with bases and labels).
            logits: "last" (head on the [B, D] medium-token states only) or "all" ([B, T, V]).
            gradient_checkpointing: recompute each trained layer in backward (the frozen prefix is never
                checkpointed). Also on when the model had transformers' gradient checkpointing enabled.
            train_embeddings: at depth 0, run the embedding with autograd as well (full fine-tuning).
        """
        depth = self._check_depth(depth)
        if logits not in _LOGITS:
            raise ConfigError(f"logits must be 'last' or 'all', got {logits!r}")
        if train_embeddings and depth != 0:
            raise ConfigError("train_embeddings needs depth 0 (the embedding is below every frozen layer)")
        if input_ids.dim() != 2:
            raise ConfigError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        batch = input_ids.shape[0]
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ConfigError(
                f"attention_mask shape {tuple(attention_mask.shape)} != "
                f"input_ids shape {tuple(input_ids.shape)}"
            )
        if last_index is None:
            last_index = last_token_index(attention_mask, input_ids)
        else:
            last_index = torch.as_tensor(last_index, device=input_ids.device).long().reshape(-1)
            if last_index.numel() != batch:
                raise ConfigError(
                    f"last_index must have one entry per row ({batch}), got {last_index.numel()}"
                )
        want_dev = self.bases is not None and labels is not None

        parts = self.parts
        m = self.num_layers
        layers = [parts.layers[i] for i in range(m)]
        rows = torch.arange(batch, device=input_ids.device)
        grad_on = torch.is_grad_enabled()

        use_ckpt = (gradient_checkpointing or _hf_checkpointing_on(layers)) and grad_on
        states: Tensor | None = None
        with torch.set_grad_enabled(grad_on and train_embeddings):
            hidden = parts.embed_tokens(input_ids)
        with torch.no_grad():
            layer_kwargs = parts.layer_inputs(hidden, attention_mask, None)
            if want_dev:
                # medium-token rows of spaces 0..m, one buffer: states[k] = h_k at last_index, [B, D]
                states = hidden.new_empty((m + 1, batch, hidden.shape[-1]))
                states[0] = hidden[rows, last_index]
            for i in range(depth):
                hidden = _call_layer(layers[i], hidden, **layer_kwargs[i])
                if states is not None and i < m - 1:
                    states[i + 1] = hidden[rows, last_index]
        if not train_embeddings:
            # The cut: nothing below this point can ever receive a gradient, whatever hooks set.
            hidden = hidden.detach()
        for i in range(depth, m):
            if use_ckpt:
                hidden = checkpoint(_call_layer, layers[i], hidden, use_reentrant=False, **layer_kwargs[i])
            else:
                hidden = _call_layer(layers[i], hidden, **layer_kwargs[i])
            if states is not None and i < m - 1:
                with torch.no_grad():
                    states[i + 1] = hidden[rows, last_index]

        if logits == "last":
            last_hidden = parts.final_norm(hidden[rows, last_index])
            out_logits = parts.head(last_hidden)
        else:
            normed = parts.final_norm(hidden)
            last_hidden = normed[rows, last_index]
            out_logits = parts.head(normed)

        dev = None
        if want_dev:
            assert states is not None and labels is not None
            with torch.no_grad():
                states[m] = last_hidden
                dev = self._deviations(states, labels)
        return RunnerOutput(logits=out_logits, deviations=dev, last_hidden=last_hidden)

    def _deviations(self, states: Tensor, labels: Tensor) -> Tensor:
        from .deviation import deviations

        bases = self.bases
        assert bases is not None
        device = states.device
        if bases.device != device:
            bases = bases.to(device)
            self.bases = bases
        batch = states.shape[1]
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.numel() != batch:
            raise ConfigError(f"labels must have one entry per row ({batch}), got {labels.numel()}")
        # (a data-dependent check would break a torch.compile graph: skipped while compiling)
        on_host = labels.device.type == "cpu" and labels.numel() > 0 and not torch.compiler.is_compiling()
        if on_host and not 0 <= int(labels.min()) <= int(labels.max()) < len(bases):
            raise ConfigError(f"labels must index the {len(bases)} label bases, got {labels.tolist()}")
        labels = labels.to(device)
        # each space as a [B, 1, D] view of the buffer; the medium token sits at position 0
        hidden_states = [states[k].unsqueeze(1) for k in range(states.shape[0])]
        zero = torch.zeros(batch, dtype=torch.long, device=device)
        lens = self.parts.norm if self.lens == "final_norm" else None
        # the indices are the runner's own (zero) and checked above where that costs no device sync
        return deviations(
            hidden_states, zero, labels, bases, lens=lens, metric=self.metric, impl=self.deviation_impl,
            check_ranges=False,
        )
