"""Evaluation of a generative (prompt/response) task: held-out answer loss and perplexity, and greedy
exact match of the final number (GSM8K's ``#### <number>``) on a fixed subset.

The answer loss is the training loss on held-out rows (mean cross-entropy per response token, the head
applied chunk by chunk); perplexity is its exponential. Exact match decodes greedily from each prompt (the
same tokens the row was trained with, chat template included) and compares
:func:`~salf_engine.data.responses.final_number` of the decoded text with the reference's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from salf_engine.data.responses import IGNORE, EncodedResponses, collate_responses, final_number
from salf_engine.runner.response_loss import response_loss
from salf_engine.runner.truncated import TruncatedRunner

__all__ = ["AnswerLoss", "answer_loss", "ExactMatch", "exact_match", "ResponseReport", "evaluate_responses"]


@dataclass
class AnswerLoss:
    """Mean loss per response token over ``tokens`` tokens of ``rows`` rows, and its perplexity."""

    loss: float
    tokens: int
    rows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def answer_loss(model: Any, split: EncodedResponses, *, batch_size: int = 8, pad_id: int = 0,
                prefix: Any = None) -> AnswerLoss:
    """The held-out answer loss of ``model`` on every row of ``split`` (no gradient, eval mode). Rows are
    batched by length (a sum over rows does not depend on their order), so little of a batch is padding.
    ``prefix``: an :class:`~salf_engine.training.eval_prefix.EvalPrefix` of ``model`` (begun at this
    evaluation's floor); above floor 0 a row enters at the floor where its states are kept."""
    runner = TruncatedRunner(model)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    by_length = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
    try:
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                rows = by_length[start:start + batch_size]
                batch = collate_responses(split, rows, pad_id)
                out = (prefix.response_loss(rows, batch) if prefix is not None and prefix.floor > 0
                       else response_loss(runner, batch, 0))
                total += float(out.total)
                tokens += out.tokens
    finally:
        model.train(was_training)
    return AnswerLoss(loss=total / max(tokens, 1), tokens=tokens, rows=len(split))


@dataclass
class ExactMatch:
    """Final-number exact match: ``correct`` of ``total`` rows; ``samples``: (reference, decoded) texts of
    the first rows, for the report."""

    correct: int
    total: int
    samples: list[tuple[str, str]]

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


def exact_match(model: Any, tokenizer: Any, split: EncodedResponses, references: list[str], *,
                rows: int | None = None, max_new_tokens: int = 256, batch_size: int = 8,
                keep_samples: int = 3, progress: bool = False, desc: str = "greedy decode") -> ExactMatch:
    """Greedy-decode the first ``rows`` rows of ``split`` (all by default) from their prompts and compare
    final numbers with ``references`` (the reference response of each row, by row); ``progress`` shows a
    bar over the rows decoded."""
    if len(references) != len(split):
        raise ValueError(f"{len(references)} references for {len(split)} rows")
    count = len(split) if rows is None else min(rows, len(split))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    correct, samples = 0, []
    bar = tqdm(total=count, desc=desc, unit="row", disable=not progress, leave=False)
    try:
        for start in range(0, count, batch_size):
            chosen = range(start, min(start + batch_size, count))
            prompts = [[t for t, y in zip(split.input_ids[i], split.targets[i], strict=True) if y == IGNORE]
                       for i in chosen]
            width = max(map(len, prompts))
            ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(prompts):  # left padding: every row continues at the same position
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            device = next(model.parameters()).device
            with torch.no_grad():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
            for r, i in enumerate(chosen):
                text = tokenizer.decode(out[r, width:], skip_special_tokens=True)
                want = final_number(references[i])
                correct += want is not None and final_number(text) == want
                if len(samples) < keep_samples:
                    samples.append((references[i], text))
            bar.update(len(chosen))
    finally:
        bar.close()
        model.train(was_training)
    return ExactMatch(correct=correct, total=count, samples=samples)


@dataclass
class ResponseReport:
    """The evaluation of a prompt/response task: answer loss (and perplexity) on every evaluation row, exact
    match on the first rows (None when not asked), and the seconds both took."""

    answer: AnswerLoss
    match: ExactMatch | None
    seconds: float

    def summary(self) -> dict[str, Any]:
        """The headline numbers (what ``summary.json`` and the logs carry)."""
        return {"answer_loss": self.answer.loss, "perplexity": self.answer.perplexity,
                "answer_tokens": self.answer.tokens, "rows": self.answer.rows,
                "exact_match": self.match.accuracy if self.match else None,
                "exact_match_rows": self.match.total if self.match else 0}

    def to_dict(self) -> dict[str, Any]:
        """The summary plus the first decoded answers (reference, decoded)."""
        samples = self.match.samples if self.match else []
        return {**self.summary(), "seconds": self.seconds,
                "samples": [{"reference": r, "decoded": d} for r, d in samples]}

    def to_text(self) -> str:
        """A short human-readable report."""
        lines = [f"answer loss {self.answer.loss:.4f} (perplexity {self.answer.perplexity:.2f}) over "
                 f"{self.answer.tokens} response tokens of {self.answer.rows} rows"]
        if self.match:
            lines.append(f"final-number exact match {self.match.correct}/{self.match.total} "
                         f"({self.match.accuracy:.3f}), greedy decoding")
            lines += [f"  reference: {r!r}\n  decoded:   {d!r}" for r, d in self.match.samples]
        return "\n".join(lines)


def evaluate_responses(model: Any, tokenizer: Any, split: EncodedResponses, *, batch_size: int = 8,
                       exact_match_rows: int = 100, max_new_tokens: int = 256, progress: bool = False,
                       desc: str = "eval", prefix: Any = None) -> ResponseReport:
    """Answer loss over ``split`` (through ``prefix``, an evaluation prefix cache, when given) and, with
    ``exact_match_rows`` > 0, greedy exact match on its first rows (with a progress bar over the decoded
    rows when ``progress``; the plain ``generate``)."""
    t0 = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    answer = answer_loss(model, split, batch_size=batch_size, pad_id=pad_id, prefix=prefix)
    match = None
    if exact_match_rows > 0:
        match = exact_match(model, tokenizer, split, split.responses, rows=exact_match_rows,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                            desc=f"{desc}: greedy decode")
    return ResponseReport(answer=answer, match=match, seconds=time.perf_counter() - t0)
