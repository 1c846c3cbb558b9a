"""A task's evaluation report for the training loop: accuracy and macro-F1 of a classification task, answer
loss and exact match of a prompt/response task, its one-line form, and a report kept in a checkpoint."""

from __future__ import annotations

from typing import Any

from salf_engine.evaluation import classification
from salf_engine.evaluation.responses import evaluate_responses

__all__ = ["SavedReport", "evaluate_task", "format_scores"]


class SavedReport:
    """The zero-shot evaluation of an interrupted run, as its checkpoint kept it."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self.seconds = float(data["seconds"])

    @classmethod
    def of(cls, data: dict[str, Any] | None) -> SavedReport | None:
        return cls(data) if data is not None else None

    @staticmethod
    def dump(report) -> dict[str, Any] | None:
        if report is None:
            return None
        return {"summary": report.summary(), "dict": report.to_dict(), "text": report.to_text(),
                "seconds": report.seconds}

    def summary(self) -> dict[str, float]:
        return self._data["summary"]

    def to_dict(self) -> dict[str, Any]:
        return self._data["dict"]

    def to_text(self) -> str:
        return self._data["text"]


def evaluate_task(model, p, *, progress: bool, desc: str, prefix=None):
    """The evaluation split's report of ``p`` (a ``training.inputs.Prepared``): accuracy and macro-F1 of a
    classification task, answer loss and exact match of a prompt/response task. ``prefix``: the run's
    :class:`~salf_engine.training.eval_prefix.EvalPrefix` (None: the plain forward; a prompt/response task's
    greedy decode never uses it)."""
    config = p.config
    if p.verbalizer is None:
        return evaluate_responses(model, p.tokenizer, p.eval_split, batch_size=config.eval_batch_size,
                                  exact_match_rows=config.exact_match_rows,
                                  max_new_tokens=config.max_new_tokens, progress=progress, desc=desc,
                                  prefix=prefix)
    # through the module, so a test that replaces classification.evaluate reaches this call
    extra = {} if prefix is None else {"prefix": prefix}
    return classification.evaluate(model, p.tokenizer, p.eval_split, p.verbalizer,
                                   batch_size=config.eval_batch_size, dtype=config.dtype,
                                   classes=list(p.task.classes), progress=progress, desc=desc, **extra)


def format_scores(phase: str, s: dict[str, float]) -> str:
    if "answer_loss" in s:
        match = "" if s["exact_match"] is None else (f", exact match {s['exact_match']:.3f} on "
                                                     f"{s['exact_match_rows']} rows")
        return f"{phase}: answer loss {s['answer_loss']:.4f} (perplexity {s['perplexity']:.2f}){match}"
    return (f"{phase}: accuracy {s['free_accuracy']:.4f} (free) / {s['restricted_accuracy']:.4f} "
            f"(label-restricted), macro-F1 {s['free_macro_f1']:.4f} / {s['restricted_macro_f1']:.4f}")
