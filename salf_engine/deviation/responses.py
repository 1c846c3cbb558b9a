"""SALF's deviation for a generated answer: an extension of the paper (docs/sft.md), not a claim of it.

The paper measures, at the last prompt token, how far each layer's state is from the semantic basis of
the label token. An answer of many tokens has no single label token, so here every response position
counts: the state at position t (through the same lens) is compared with the output basis of the token
that follows it, ``y_{t+1}``, and the row's deviation in space l is the mean over its supervised
positions P:

    dev[l] = 1/|P| * sum_{t in P} (1 - cos(lens(h_l[t]), b_{y_{t+1}})),    b_y = (W_o^T W_o)^{-1} w_y

(the cosine metric; the last space is the final norm's output, as in the paper). Gains and the eof-layer
follow from these deviations exactly as for classification
(:func:`~salf_engine.deviation.compute.eof_layers`).

All supervised positions of a batch go through :func:`~salf_engine.deviation.compute.deviations` in one call,
so every backend (torch, the C++ op, the Triton kernel) computes all positions of all rows in one launch:
each space is seen, without a copy, as N rows over its flattened [B * T] positions (batch stride 0, the
position's index ``row * T + t``), which the kernels read through their strides like any other layout.
The per-row mean is a scatter-add.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from salf_engine.data.responses import IGNORE, collate_responses
from salf_engine.deviation.compute import deviations
from salf_engine.deviation.semantics import semantic_bases
from salf_engine.errors import ConfigError
from salf_engine.models.families import decoder_parts

__all__ = ["response_deviations", "profile_response_deviations"]


def response_deviations(hidden_states: Sequence[Tensor], targets: Tensor, model: nn.Module | Tensor, *,
                        lens: object = None, impl: str = "auto") -> Tensor:
    """float32 [B, m+1]: each row's mean deviation over its response positions (see the module doc).

    Args:
        hidden_states: m+1 tensors [B, T, D] (spaces 0..m; the last one already normed).
        targets: [B, T] token ids, ``-100`` where nothing is supervised (the rows' labels: position t is
            compared with ``targets[t + 1]``).
        model: the causal LM (or its [V, D] head weight) whose output bases are used.
        lens: the final norm module or a LensSpec for spaces 0..m-1 (None: raw states).
        impl: the deviation backend (``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"``).
    """
    if targets.dim() != 2 or any(h.shape[:2] != targets.shape for h in hidden_states):
        raise ConfigError(f"targets {tuple(targets.shape)} must be [B, T] like every hidden state "
                          f"({[tuple(h.shape) for h in hidden_states][:2]} ...)")
    batch, length = targets.shape
    device = hidden_states[0].device
    following = torch.full_like(targets, IGNORE)
    following[:, :-1] = targets[:, 1:]
    following = following.to(device)
    supervised = following != IGNORE
    counts = supervised.sum(dim=1)
    if bool((counts == 0).any()):
        rows = (counts == 0).nonzero().flatten().tolist()
        raise ConfigError(f"rows {rows[:8]} have no supervised response token: their deviation is undefined")
    rows, positions = supervised.nonzero(as_tuple=True)
    tokens, index = torch.unique(following[rows, positions], return_inverse=True)
    bases = semantic_bases(model, tokens).to(device)
    spaces, where = _positions_in_place(hidden_states, rows, positions)
    per_position = deviations(spaces, where, index, bases, lens=lens, metric="cosine", impl=impl)  # [N, m+1]
    total = torch.zeros(batch, per_position.shape[1], dtype=torch.float32, device=device)
    total.index_add_(0, rows, per_position)
    return total / counts[:, None].to(torch.float32)


def _positions_in_place(hidden_states: Sequence[Tensor], rows: Tensor, positions: Tensor
                        ) -> tuple[list[Tensor], Tensor]:
    """Every supervised position of the batch as one "row" of the deviation call, read where it lies: each
    [B, T, D] space seen as N rows of one flattened [B * T] time axis (batch stride 0, no copy), and
    position n at index ``rows[n] * T + positions[n]``. A space whose rows are not evenly spaced in memory
    has its N states gathered instead ([N, 1, D], the only copy)."""
    n = rows.numel()
    flat = rows * hidden_states[0].shape[1] + positions
    spaces = []
    for h in hidden_states:
        h = h.detach()
        batch, length, dim = h.shape
        if h.stride(0) == length * h.stride(1):
            spaces.append(h.as_strided((n, batch * length, dim), (0, h.stride(1), h.stride(2))))
        else:
            return [s.detach()[rows, positions].unsqueeze(1) for s in hidden_states], torch.zeros_like(rows)
    return spaces, flat


def profile_response_deviations(model: nn.Module, split, *, pad_id: int, batch_size: int = 8,
                                lens: str = "final_norm", impl: str = "auto") -> Tensor:
    """float32 [N, m+1]: :func:`response_deviations` of every row of an encoded prompt/response split, one
    batched no-grad pass (the model's own forward with its hidden states)."""
    parts = decoder_parts(model)
    norm = parts.norm if lens == "final_norm" else None
    device = next(model.parameters()).device
    out = torch.empty(len(split), len(parts.layers) + 1, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                rows = list(range(start, min(start + batch_size, len(split))))
                batch = collate_responses(split, rows, pad_id)
                hidden = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device),
                               output_hidden_states=True).hidden_states
                out[rows] = response_deviations(hidden, batch["labels"], model, lens=norm, impl=impl).cpu()
    finally:
        model.train(was_training)
    return out
