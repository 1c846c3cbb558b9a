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

from salf_engine.deviation.compute import deviations
from salf_engine.deviation.contract import LENS_ALIASES
from salf_engine.deviation.contract import LENSES as _LENSES
from salf_engine.deviation.contract import METRICS as _METRICS
from salf_engine.errors import ConfigError
from salf_engine.models.families import DecoderParts, decoder_parts, unwrap_peft
from salf_engine.runner.prefix import FloorRows, mask_positions

__all__ = ["PATCH_ATTR", "RunnerOutput", "TruncatedRunner", "is_patched", "last_token_index"]

_LOGITS = ("last", "all", "none")
#: The attribute under which a causal LM patched by :func:`salf_engine.integrations.patching.patch_model`
#: carries the runner its forward runs through.
PATCH_ATTR = "_salf_runner"


def is_patched(model: nn.Module) -> bool:
    """Whether `model` (or the causal LM inside its PEFT wrapper) carries the SALF patch."""
    return hasattr(unwrap_peft(model), PATCH_ATTR)


@dataclass
class RunnerOutput:
    """What one truncated forward returns."""

    logits: Tensor | None  # [B, V] at last_index ("last"), [B, T, V] ("all"), None ("none")
    deviations: Tensor | None  # [B, m+1] float32 from this same forward (needs bases + labels), detached
    last_hidden: Tensor  # [B, D] final-norm state at last_index (with autograd)
    hidden: Tensor | None = None  # [B, T, D] final-norm states ("all", "none"; with autograd)


def last_token_index(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor:
    """Index of the last non-padding position of each row (left or right padding); T-1 without a mask."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(length, device=attention_mask.device)
    return (attention_mask.to(torch.bool) * positions).amax(dim=-1).long()


def plain_depth(depth: Any, name: str = "depth") -> int | list[int]:
    """A cut as plain Python: one int, or one int per row (a list; a [B] tensor becomes one); ConfigError
    for anything else. The one normalization of a depth argument (the runner, the patched HF forward)."""
    if isinstance(depth, Tensor):
        if depth.dim() > 1 or depth.numel() == 0 or depth.dtype.is_floating_point \
                or depth.dtype == torch.bool:
            raise ConfigError(f"{name} must be an int or a [B] integer tensor, got {depth.dtype} "
                              f"of shape {tuple(depth.shape)}")
        return int(depth.item()) if depth.dim() == 0 else depth.tolist()
    if isinstance(depth, int) and not isinstance(depth, bool):
        return depth
    if isinstance(depth, list | tuple) and all(isinstance(d, int) and not isinstance(d, bool) for d in depth):
        return list(depth)
    raise ConfigError(f"{name} must be an int or one such int per row, got {depth!r}")


def row_depths(depth: Any, batch: int, num_layers: int) -> list[int]:
    """``depth`` (see :func:`plain_depth`) as B ints in 0..m."""
    plain = plain_depth(depth)
    depths = [plain] * batch if isinstance(plain, int) else plain
    if len(depths) != batch:
        raise ConfigError(f"depth has {len(depths)} entries for a batch of {batch} rows")
    bad = [d for d in depths if not 0 <= d <= num_layers]
    if bad:
        raise ConfigError(f"depth {bad[0]} is out of range: the model has {num_layers} decoder layers, "
                          f"so depth must be in 0..{num_layers}")
    return depths


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


class _RowSlices:
    """Layer keyword arguments restricted to rows ``[start, stop)`` of a batch of ``batch`` rows.

    Tensors (and tuples of them) whose first dimension is the batch are sliced; those broadcast over it
    (rotary tables of shape [1, T, d], position ids [1, T]) and None pass as they are. Each slice is made
    once per forward (layers of one attention type share their arguments)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self._cache: dict[tuple[int, int, int], dict[str, Any]] = {}

    def __call__(self, kwargs: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
        if start == 0 and stop == self.batch:
            return kwargs
        key = (id(kwargs), start, stop)
        if key not in self._cache:
            self._cache[key] = {name: self._slice(value, start, stop) for name, value in kwargs.items()}
        return self._cache[key]

    def _slice(self, value: Any, start: int, stop: int) -> Any:
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(self._slice(v, start, stop) for v in value)
        if isinstance(value, Tensor):
            return value[start:stop] if value.dim() and value.shape[0] == self.batch else value
        raise ConfigError(f"per-row depths cannot split a layer argument of type {type(value).__name__} "
                          "by rows; use an eager or sdpa attention implementation")


def _fsdp_sharded(layers: list[nn.Module]) -> bool:
    """Whether the decoder layers are FSDP2 modules (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return any(isinstance(layer, FSDPModule) for layer in layers)


def _hf_checkpointing_on(layers: list[nn.Module]) -> bool:
    """Whether transformers' gradient checkpointing is enabled (and active: training mode) on any layer."""
    return any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in layers)


def _with_ghosts(x: Tensor | None) -> Tensor | None:
    """``x`` with two copies of its row 0 appended (FSDP2's ghost rows)."""
    if x is None:
        return None
    return torch.cat([x, x[:1].expand(2, *x.shape[1:])])


def _input_rows(normed: Tensor, last_hidden: Tensor, states: Tensor | None, perm: Tensor | None,
                batch: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The outputs back in the input's row order, without ghost rows (the trained ghost joins the loss with
    weight 0, so every rank runs backward through it)."""
    if perm is not None:
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        normed, last_hidden = normed[inverse], last_hidden[inverse]
        states = states[:, inverse] if states is not None else None
    if normed.shape[0] > batch:
        zero = 0.0 * normed[batch:].sum()
        normed, last_hidden = normed[:batch] + zero, last_hidden[:batch] + zero
        states = states[:, :batch] if states is not None else None
    return normed, last_hidden, states


class TruncatedRunner:
    """Run a causal LM with its bottom ``depth`` decoder layers outside autograd.

    Args:
        model: a standard-layout ``*ForCausalLM`` (see ``models.families``), PEFT-wrapped or not.
        bases: float32 [K, D] semantic bases of the K label tokens (``semantics.semantic_bases``); with
            ``labels`` at call time the runner returns per-sample deviations of all m+1 spaces.
        lens: "final_norm" (apply the model's final norm to spaces 0..m-1, logit-lens view) or "none".
        metric: deviation metric, "cosine" | "ce" | "rank".
        deviation_impl: ``impl`` passed to ``salf_engine.deviation.compute.deviations``.
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
        lens = LENS_ALIASES.get(lens, lens)
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

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        *,
        depth: int | Tensor | list[int],
        last_index: Tensor | None = None,
        labels: Tensor | None = None,
        logits: str = "last",
        gradient_checkpointing: bool = False,
        train_embeddings: bool = False,
        prefix: FloorRows | None = None,
    ) -> RunnerOutput:
        """One forward in which each row's bottom ``depth`` layers are frozen (no graph), the rest trainable.

        Args:
            input_ids / attention_mask: [B, T] (left or right padding; mask 1 = token).
            depth: number of frozen bottom layers, 0..m (m = all layers frozen, only norm + head train):
                one int for the whole batch, or one per row (a list or a [B] tensor). Rows are sorted
                deepest first, so at layer i the rows still frozen there are a prefix: it runs under
                ``no_grad``, the rest with autograd (at most two calls per layer), and a row joins the
                trained rows, detached, at its own cut. Outputs come back in the input's row order.
            last_index: [B] medium-token position per row; default the last non-padding position.
            labels: [B] class indices into ``bases`` (deviations are computed only with bases and labels).
            logits: "last" (head on the [B, D] medium-token states only), "all" ([B, T, V]) or "none"
                (no head: the [B, T, D] final-norm states come back as ``hidden``, for a loss that
                applies the head itself, chunk by chunk: :mod:`~salf_engine.runner.chunked_loss`).
            gradient_checkpointing: recompute each trained layer call in backward (the frozen rows are
                never checkpointed). Also on when the model had transformers' gradient checkpointing enabled.
            train_embeddings: with every depth 0, run the embedding with autograd as well (full fine-tuning).
            prefix: enter at ``prefix.floor`` (every depth at or above it): rows with cached floor states
                skip ``layers[0..floor-1]``, rows cached at a lower layer l skip ``layers[0..l-1]``, the
                others run them all; all without autograd, and the floor states of the rows that ran a layer
                come back in ``prefix.written`` (:mod:`~salf_engine.runner.prefix`); position ids then come
                from the mask. No deviations (the spaces below the floor are not there for cached rows).
        """
        batch = input_ids.shape[0]
        depths, last_index, per_row = self._check_call(input_ids, attention_mask, depth, last_index, logits,
                                                       train_embeddings)
        want_dev = self.bases is not None and labels is not None
        positions, entry, start = None, None, 0
        if prefix is not None:
            self._check_prefix(prefix, depths, batch, want_dev, train_embeddings)
            positions = mask_positions(attention_mask, input_ids)
            entry, start = self._enter_at_floor(input_ids, attention_mask, positions, prefix), prefix.floor
        # FSDP2 gathers a layer's weights at every call and reduces its gradients after its backward, so every
        # rank must make the same calls although its rows sit at other cuts: two ghost copies of row 0, one
        # frozen everywhere and one trained everywhere, give every layer both calls on every rank. One int
        # depth is one cut for every rank (as the planners hand it out): no ghost is needed there.
        if per_row and _fsdp_sharded(list(self.parts.layers)):
            input_ids, attention_mask, last_index = (_with_ghosts(x) for x in (input_ids, attention_mask,
                                                                                last_index))
            depths = [*depths, self.num_layers, 0]
            if entry is not None:  # the ghosts enter at the floor with row 0
                entry = _with_ghosts(entry)
                positions = _with_ghosts(positions) if positions.shape[0] == batch else positions
        # deepest first (stable): the rows frozen at layer i are rows [0, frozen_at[i])
        order = sorted(range(len(depths)), key=lambda r: -depths[r])
        perm = torch.tensor(order, device=input_ids.device) if order != sorted(order) else None
        if perm is not None:
            input_ids, last_index = input_ids[perm], last_index[perm]
            attention_mask = attention_mask[perm] if attention_mask is not None else None
            if entry is not None:
                entry = entry[perm]
                positions = positions[perm] if attention_mask is not None else positions
        frozen_at = [sum(d > i for d in depths) for i in range(self.num_layers + 1)]
        hidden, states = self._layers(input_ids, attention_mask, last_index, frozen_at, want_dev=want_dev,
                                      gradient_checkpointing=gradient_checkpointing,
                                      train_embeddings=train_embeddings, entry=entry, start=start,
                                      positions=positions)
        rows = torch.arange(len(depths), device=input_ids.device)
        if logits == "last":
            normed = last_hidden = self.parts.final_norm(hidden[rows, last_index])
        else:
            normed = self.parts.final_norm(hidden)
            last_hidden = normed[rows, last_index]
        if states is not None:
            states[self.num_layers] = last_hidden.detach()
        normed, last_hidden, states = _input_rows(normed, last_hidden, states, perm, batch)
        dev = None
        if states is not None:
            with torch.no_grad():
                dev = self._deviations(states, labels)
        return RunnerOutput(logits=None if logits == "none" else self.parts.head(normed), deviations=dev,
                            last_hidden=last_hidden, hidden=None if logits == "last" else normed)

    def _check_call(self, input_ids: Tensor, attention_mask: Tensor | None, depth: Any,
                    last_index: Tensor | None, logits: str, train_embeddings: bool
                    ) -> tuple[list[int], Tensor, bool]:
        """The call's arguments checked: (each row's depth, each row's medium-token position, whether the
        depth was given per row). A depth tensor is read to the host once, here."""
        if logits not in _LOGITS:
            raise ConfigError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
        if input_ids.dim() != 2:
            raise ConfigError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        batch = input_ids.shape[0]
        plain = plain_depth(depth)
        depths = row_depths(plain, batch, self.num_layers)
        per_row = not isinstance(plain, int)
        if train_embeddings and any(depths):
            raise ConfigError("train_embeddings needs depth 0 (the embedding is below every frozen layer)")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ConfigError(f"attention_mask shape {tuple(attention_mask.shape)} != "
                              f"input_ids shape {tuple(input_ids.shape)}")
        if last_index is None:
            return depths, last_token_index(attention_mask, input_ids), per_row
        last_index = torch.as_tensor(last_index, device=input_ids.device).long().reshape(-1)
        if last_index.numel() != batch:
            raise ConfigError(f"last_index must have one entry per row ({batch}), got {last_index.numel()}")
        return depths, last_index, per_row

    def _check_prefix(self, prefix: FloorRows, depths: list[int], batch: int, want_dev: bool,
                      train_embeddings: bool) -> None:
        """ConfigError where a forward cannot enter at ``prefix.floor``."""
        if not 1 <= prefix.floor <= self.num_layers:
            raise ConfigError(f"a prefix floor must be in 1..{self.num_layers}, got {prefix.floor}")
        if len(prefix.cached) != batch or (prefix.layers is not None and len(prefix.layers) != batch):
            raise ConfigError(f"prefix has {len(prefix.cached)} rows for a batch of {batch}")
        above = [s for s in prefix.starts if not 0 <= s <= prefix.floor]
        if above:
            raise ConfigError(f"cached states at layer {above[0]} lie outside 0..{prefix.floor} (the floor)")
        if min(depths) < prefix.floor or train_embeddings:
            raise ConfigError(f"a row trains below the prefix floor {prefix.floor} (depths {depths})")
        if want_dev:
            raise ConfigError("deviations need every space; a forward entering at the floor has none "
                              "below it")

    def _enter_at_floor(self, input_ids: Tensor, attention_mask: Tensor | None, positions: Tensor,
                        prefix: FloorRows) -> Tensor:
        """The [B, T, D] states at the floor, in input order: the cached rows' states go to their real
        positions (their padding keeps the embedding's finite values, which no real token attends to), then
        each row runs the layers from its entry (0 without cached states, else its states' layer) to the
        floor (no autograd, their own masks: the rows entering at or below a layer run it together); fills
        ``prefix.written``."""
        real = (attention_mask.bool() if attention_mask is not None
                else torch.ones_like(input_ids, dtype=torch.bool))
        starts = prefix.starts
        with torch.no_grad():
            hidden = self.parts.embed_tokens(input_ids)
            for r, states in enumerate(prefix.cached):
                if states is not None:
                    hidden[r, real[r]] = states.to(hidden.dtype)
            # FSDP2 gathers a layer's shards at every call, so every rank calls each layer below the floor
            # once, whatever its rows keep: row 0 runs from layer 0 as a ghost (its result unused) where no
            # row of this rank needs the layers there
            ghost = {0} if _fsdp_sharded(list(self.parts.layers)) else set()
            entries = sorted({s for s in starts if s < prefix.floor} | ghost)
            for k, lo in enumerate(entries):
                hi = entries[k + 1] if k + 1 < len(entries) else prefix.floor
                rows = [r for r, s in enumerate(starts) if s <= lo]
                idx = torch.tensor(rows or [0], device=input_ids.device)
                sub = hidden[idx]
                sub_mask = attention_mask[idx] if attention_mask is not None else None
                kwargs = self.parts.layer_inputs(sub, sub_mask, positions[idx] if sub_mask is not None
                                                 else positions)
                for i in range(lo, hi):
                    sub = _call_layer(self.parts.layers[i], sub, **kwargs[i])
                if rows:
                    hidden = hidden.to(sub.dtype)
                    hidden[idx] = sub
            done = set(prefix.computed)
            prefix.written = [hidden[r, real[r]].clone() if r in done else None for r in range(len(real))]
        return hidden

    def _layers(self, input_ids: Tensor, attention_mask: Tensor | None, last_index: Tensor,
                frozen_at: list[int], *, want_dev: bool, gradient_checkpointing: bool,
                train_embeddings: bool, entry: Tensor | None = None, start: int = 0,
                positions: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The decoder stack over rows sorted deepest first: at layer i rows ``[0, frozen_at[i])`` run
        without autograd, the others with it; with ``entry`` (the states at layer ``start``, see
        :meth:`_enter_at_floor`) from layer ``start`` on. Returns the last layer's [B, T, D] output (rows
        in the sorted order) and, with ``want_dev``, the medium-token states of spaces 0..m-1
        ([m+1, B, D])."""
        parts = self.parts
        m = self.num_layers
        batch = input_ids.shape[0]
        layers = [parts.layers[i] for i in range(m)]
        rows = torch.arange(batch, device=input_ids.device)
        grad_on = torch.is_grad_enabled()
        use_ckpt = (gradient_checkpointing or _hf_checkpointing_on(layers)) and grad_on
        if entry is None:
            with torch.set_grad_enabled(grad_on and train_embeddings):
                embedded = parts.embed_tokens(input_ids)
        else:
            embedded = entry
        with torch.no_grad():
            layer_kwargs = parts.layer_inputs(embedded, attention_mask, positions)
        sliced = _RowSlices(batch)
        states: Tensor | None = None
        if want_dev:
            # medium-token rows of spaces 0..m, one buffer: states[k] = h_k at last_index, [B, D]
            states = embedded.new_empty((m + 1, batch, embedded.shape[-1]))
            states[0] = embedded.detach()[rows, last_index]

        frozen, trained = embedded, None  # rows [0, k) and [k, B) of the sorted batch
        k = batch
        for i in range(start, m + 1):
            cut = frozen_at[i]
            if cut < k:  # rows [cut, k) reach their own cut here: they join the trained rows, detached
                joining = frozen[cut:] if train_embeddings else frozen[cut:].detach()
                trained = joining if trained is None else torch.cat([joining, trained])
                frozen, k = frozen[:cut], cut
            if i == m:
                break
            if k:
                with torch.no_grad():
                    frozen = _call_layer(layers[i], frozen, **sliced(layer_kwargs[i], 0, k))
            if trained is not None:
                kwargs = sliced(layer_kwargs[i], k, batch)
                if use_ckpt:
                    trained = checkpoint(_call_layer, layers[i], trained, use_reentrant=False, **kwargs)
                else:
                    trained = _call_layer(layers[i], trained, **kwargs)
            if states is not None and i < m - 1:
                with torch.no_grad():
                    if k:
                        states[i + 1, :k] = frozen[rows[:k], last_index[:k]]
                    if k < batch:
                        states[i + 1, k:] = trained[rows[: batch - k], last_index[k:]]
        assert trained is not None
        return trained, states

    def _deviations(self, states: Tensor, labels: Tensor) -> Tensor:
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
