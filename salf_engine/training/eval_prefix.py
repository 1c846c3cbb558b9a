"""The evaluation prefix cache (issue 37, item 5): the evaluation examples' hidden states at the layer below
which the model does not change between one evaluation and the next, so a run's later evaluations (after
each epoch, the final one) enter there instead of running its frozen bottom again.

Each evaluation names its floor (:func:`eval_floor`: the floor of the next training step, the lowest layer
that can change after it). A row's states at that floor are written as a by-product of the evaluation's
own forward (the runner path, :class:`~salf_engine.runner.truncated.TruncatedRunner` with a
:class:`~salf_engine.runner.prefix.FloorRows`), keyed by the row's index in the evaluation split and its
tokens like the training cache (:class:`~salf_engine.training.prefix_cache.PrefixCache`). A later
evaluation at a floor as high or higher enters at the kept layer and runs the layers from there up. The
weights below each kept layer are fingerprinted when kept and checked before every later evaluation: a
change drops every kept row (a recompute, never a stale state). docs/prefix_cache.md, "Evaluation".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from salf_engine.runner.response_loss import ResponseLoss, response_loss
from salf_engine.runner.truncated import TruncatedRunner
from salf_engine.training.prefix_cache import PrefixCache, floor_rows, planned_bytes, why_not_exact

__all__ = ["EvalPrefix", "eval_floor", "plan_eval_prefix"]


def eval_floor(strategy: Any, step: int, total_steps: int) -> int:
    """The floor of an evaluation after ``step`` optimizer steps of ``total_steps``: the floor of the next
    step (the last step's after training); ``layers[0..floor-1]`` do not change from this evaluation on."""
    return strategy.floor(min(step, total_steps - 1))


def _digest(module: nn.Module) -> bytes:
    """An exact fingerprint of ``module``'s parameter values (their bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for q in module.parameters():
        h.update(q.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.digest()


class EvalPrefix:
    """The evaluation rows' states at the floor, kept from one evaluation of a run to the next (in memory).
    :meth:`begin` names each evaluation's floor; :meth:`logits` (a classification task's) and
    :meth:`response_loss` (a prompt/response task's answer loss) are its forward for a batch (floor > 0)."""

    def __init__(self, model: nn.Module, num_rows: int,
                 say: Callable[[str], None] = lambda _msg: None) -> None:
        self.runner = TruncatedRunner(model)
        self.parts, self.num_rows, self.say = self.runner.parts, num_rows, say
        self.cache = PrefixCache(0, num_rows, 0)
        self.floor = 0
        self._digests: dict[int, bytes] = {}  # -1: the embedding; i: layer i (weights the kept rows saw)

    def _part(self, k: int) -> nn.Module:
        return self.parts.embed if k < 0 else self.parts.layers[k]

    def begin(self, floor: int) -> None:
        """Before an evaluation whose weights below ``floor`` stay as they are until the next one: every kept
        row goes if a part below it changed since it was kept; the parts below ``floor`` are fingerprinted."""
        changed = [k for k, d in self._digests.items() if _digest(self._part(k)) != d]
        if changed:
            where = "the embedding" if min(changed) < 0 else f"layer {min(changed)}"
            self.say(f"eval prefix cache: {where} changed since the kept states were computed; recomputing")
            hits, misses = self.cache.hits, self.cache.misses
            self.cache = PrefixCache(0, self.num_rows, 0)
            self.cache.hits, self.cache.misses = hits, misses
            self._digests = {}
        self.floor = floor
        for k in range(-1, floor):
            if k not in self._digests:
                self._digests[k] = _digest(self._part(k))

    @torch.no_grad()
    def logits(self, indices: Sequence[int], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """float32 [B, V] logits at each row's last token (rows ``indices`` of the evaluation split; floor
        > 0), entering at the floor where the row's states are kept; keeps the states the forward computed."""
        with floor_rows(self.cache, indices, input_ids, attention_mask, self.floor) as rows:
            if rows is None:
                raise ValueError("an evaluation enters at the floor only above layer 0")
            out = self.runner(input_ids, attention_mask, depth=self.runner.num_layers, prefix=rows)
        assert out.logits is not None
        return out.logits.float()

    @torch.no_grad()
    def response_loss(self, indices: Sequence[int], batch: dict[str, Tensor]) -> ResponseLoss:
        """The answer loss of a :func:`~salf_engine.data.responses.collate_responses` batch (rows ``indices``
        of the evaluation split; floor > 0), entering at the floor where the row's states (all its real
        tokens) are kept; keeps the states the forward computed."""
        with floor_rows(self.cache, indices, batch["input_ids"], batch["attention_mask"], self.floor) as rows:
            if rows is None:
                raise ValueError("an evaluation enters at the floor only above layer 0")
            out = response_loss(self.runner, batch, self.runner.num_layers, prefix=rows)
        return out

    def summary(self) -> dict[str, Any]:
        """``summary.json``'s ``eval_prefix_cache``: bytes kept, the last evaluation's floor, hits (rows that
        entered at a kept layer) and misses (rows that ran every layer below the floor)."""
        return {"where": "memory", "bytes": self.cache.nbytes, "floor": self.floor, "hits": self.cache.hits,
                "misses": self.cache.misses}


def plan_eval_prefix(where: str, strategy: Any, wrapped: Any, lengths: Sequence[int], *, world: int,
                     evaluations: int, say: Callable[[str], None]) -> EvalPrefix | None:
    """The run's evaluation cache for evaluation examples of ``lengths`` tokens, or None: with fewer than
    two evaluations in this process (nothing to reuse; nothing said), ``--prefix-cache off``, several
    processes, or where the training cache could not be exact (:func:`why_not_exact`; dropout aside). Says
    in one line what it keeps and how many bytes, or why there is none."""
    if evaluations < 2:
        return None
    if where == "off":
        say("eval prefix cache: off (--prefix-cache off)")
        return None
    reason = ("the evaluation prefix cache is not built for several processes (DDP / FSDP2) yet" if world > 1
              else why_not_exact(strategy, wrapped, world=world, wants_deviations=False, dropout=False))
    if reason is not None:
        say(f"eval prefix cache: off ({reason})")
        return None
    parts = wrapped.parts
    top, m = strategy.max_floor(), parts.num_layers
    nbytes = planned_bytes(lengths, int(parts.config.hidden_size), next(parts.embed.parameters()).dtype)
    at = (f"at layer {top} (of {m})" if strategy.floor(0) == top else
          f"at each evaluation's floor (at most {top} of {m})")
    say(f"eval prefix cache: in memory, the hidden states {at} of {len(lengths)} evaluation examples, "
        f"{nbytes} bytes ({nbytes / 2**20:.1f} MiB); the layers below it run once per example, not again in "
        "later evaluations")
    return EvalPrefix(wrapped.model, len(lengths), say)
