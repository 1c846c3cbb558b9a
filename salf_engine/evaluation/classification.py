"""Accuracy and macro-F1 of next-token label prediction, free and label-restricted.

A model classifies a prompt by the token it predicts at the medium token (the
prompt's last token). Two decodings are scored:

- free: argmax over the whole vocabulary (the paper's setting). A prediction
  that is no label token counts as wrong. For macro-F1 it is a false negative
  of the true class and a false positive of no class (it lands in an extra
  "other" column of the confusion matrix that belongs to no class).
- restricted: argmax over the K label tokens only; every prediction is a class.

Macro-F1 is the unweighted mean of the per-class F1 over the classes that
occur in the gold labels or in the predictions (as scikit-learn does with
``labels=None``); a class with precision + recall = 0 has F1 = 0, and
precision of a class never predicted is 0.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from salf_engine.data import collate
from salf_engine.runtime.device import autocast_context

__all__ = [
    "ClassScores",
    "DecodingScores",
    "EvalReport",
    "confusion_matrix",
    "score_predictions",
    "predict_medium_logits",
    "evaluate",
    "SINGLE_CLASS_SHARE",
    "single_class",
]

#: A run whose predictions put at least this share of the evaluation examples in one class, on data with
#: more classes, is reported as predicting a single class (issue 38).
SINGLE_CLASS_SHARE = 0.95


def single_class(predictions: Sequence[int], classes: Sequence[str],
                 threshold: float | None = None) -> dict[str, Any] | None:
    """``{"class", "share"}`` of the most predicted class when it takes at least ``threshold`` (default
    :data:`SINGLE_CLASS_SHARE`) of the predictions (class indices; -1, a non-label token, is no class)
    and there are two classes or more; else None."""
    threshold = SINGLE_CLASS_SHARE if threshold is None else threshold
    counts = Counter(p for p in predictions if p >= 0)
    if len(classes) < 2 or not counts:
        return None
    top, count = counts.most_common(1)[0]
    share = count / len(predictions)
    return {"class": classes[top], "share": share} if share >= threshold else None


@dataclass
class ClassScores:
    """Precision, recall, F1 and support of one class."""

    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class DecodingScores:
    """Scores of one decoding (free or restricted)."""

    accuracy: float
    macro_f1: float
    per_class: list[ClassScores]
    non_label: int = 0  # predictions that are no label token (free decoding only)


@dataclass
class EvalReport:
    """Evaluation of one model on one split."""

    num_examples: int
    classes: list[str]
    free: DecodingScores
    restricted: DecodingScores
    non_label_top: list[tuple[str, int]] = field(default_factory=list)
    seconds: float = 0.0
    free_predictions: list[int] = field(default_factory=list, repr=False)  # class idx, -1 = non-label
    restricted_predictions: list[int] = field(default_factory=list, repr=False)

    def to_dict(self, *, with_predictions: bool = False) -> dict[str, Any]:
        """A JSON-able dict (predictions only when asked)."""
        out = asdict(self)
        out["non_label_top"] = [list(x) for x in self.non_label_top]
        if not with_predictions:
            out.pop("free_predictions")
            out.pop("restricted_predictions")
        return out

    def summary(self) -> dict[str, Any]:
        """The four headline numbers, and ``single_class``: :func:`single_class` of the free predictions
        (else of the label-restricted ones) with its ``decoding``, or None."""
        collapsed = None
        for decoding, preds in (("free", self.free_predictions), ("restricted", self.restricted_predictions)):
            found = single_class(preds, self.classes)
            if found is not None:
                collapsed = {**found, "decoding": decoding}
                break
        return {
            "free_accuracy": self.free.accuracy,
            "free_macro_f1": self.free.macro_f1,
            "restricted_accuracy": self.restricted.accuracy,
            "restricted_macro_f1": self.restricted.macro_f1,
            "single_class": collapsed,
        }

    def to_text(self) -> str:
        """A readable per-class table for both decodings."""
        lines = [f"examples: {self.num_examples}   time: {self.seconds:.1f}s"]
        for title, scores in (("free decoding (whole vocabulary)", self.free),
                              ("label-restricted decoding", self.restricted)):
            lines.append("")
            lines.append(f"{title}: accuracy {scores.accuracy:.4f}   macro-F1 {scores.macro_f1:.4f}")
            width = max([len(c.name) for c in scores.per_class] + [5])
            lines.append(f"  {'class':<{width}}  precision  recall      f1  support")
            for c in scores.per_class:
                lines.append(
                    f"  {c.name:<{width}}  {c.precision:9.4f}  {c.recall:6.4f}  {c.f1:6.4f}  {c.support:7d}"
                )
            if scores is self.free:
                lines.append(f"  non-label predictions: {scores.non_label}")
        if self.non_label_top:
            tops = ", ".join(f"{tok!r} x{n}" for tok, n in self.non_label_top)
            lines.append(f"most frequent non-label predictions: {tops}")
        return "\n".join(lines)


def confusion_matrix(gold: Sequence[int], pred: Sequence[int], num_classes: int) -> torch.Tensor:
    """int64 [K, K+1]: rows = gold class, columns = predicted class; column K = no class (pred < 0)."""
    if len(gold) != len(pred):
        raise ValueError(f"gold and predictions differ in length: {len(gold)} vs {len(pred)}")
    g = torch.as_tensor(list(gold), dtype=torch.int64)
    p = torch.as_tensor(list(pred), dtype=torch.int64)
    p = torch.where((p < 0) | (p >= num_classes), torch.full_like(p, num_classes), p)
    flat = g * (num_classes + 1) + p
    counts = torch.bincount(flat, minlength=num_classes * (num_classes + 1))
    return counts.view(num_classes, num_classes + 1)


def score_predictions(gold: Sequence[int], pred: Sequence[int], classes: Sequence[str]) -> DecodingScores:
    """Accuracy, macro-F1 and per-class scores; pred < 0 means "no label predicted"."""
    k = len(classes)
    cm = confusion_matrix(gold, pred, k).double()
    n = int(cm.sum().item())
    tp = cm.diagonal()  # [K] (diagonal of the K x K block)
    support = cm.sum(dim=1)  # includes the "other" column: a non-label prediction is a false negative
    predicted = cm[:, :k].sum(dim=0)  # only label columns: a non-label prediction is nobody's false positive
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
    present = (support > 0) | (predicted > 0)
    macro = float(f1[present].mean().item()) if bool(present.any()) else 0.0
    per_class = [
        ClassScores(str(classes[i]), float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
        for i in range(k)
    ]
    return DecodingScores(
        accuracy=float(tp.sum().item() / n) if n else 0.0,
        macro_f1=macro,
        per_class=per_class,
        non_label=int(cm[:, k].sum().item()),
    )


@torch.no_grad()
def predict_medium_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """float32 [B, V] logits at the last position of a LEFT-padded batch (head on that position only)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=1,
        use_cache=False,
    )
    return out.logits[:, -1, :].float()


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def evaluate(
    model,
    tokenizer,
    encoded,
    verbalizer,
    *,
    batch_size: int = 32,
    dtype: str = "float32",
    classes: Sequence[str] | None = None,
    progress: bool = True,
    desc: str = "eval",
    prefix=None,
) -> EvalReport:
    """Score `model` on an EncodedSplit: one no-grad forward per batch, logits at the medium token only.

    Batches are formed from length-sorted examples (less padding) and padded on
    the left, so the medium token is the last position of every row. ``prefix``: an
    :class:`~salf_engine.training.eval_prefix.EvalPrefix` of `model` (begun at this evaluation's floor);
    above floor 0 the forward goes through it and enters at the floor where a row's states are kept.
    """
    classes = list(classes if classes is not None else getattr(verbalizer, "classes", None) or [])
    label_ids = torch.as_tensor(verbalizer.label_token_ids, dtype=torch.long)
    if not classes:
        classes = [str(i) for i in range(len(label_ids))]
    n = len(encoded)
    gold = [int(y) for y in encoded.labels]
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # token id -> class index (first class wins if two classes share a token; Verbalizer forbids that)
    token_to_class = {int(t): i for i, t in reversed(list(enumerate(label_ids.tolist())))}

    order = sorted(range(n), key=lambda i: len(encoded.input_ids[i]))
    free_pred = [-1] * n
    restricted_pred = [-1] * n
    non_label_tokens: Counter[int] = Counter()
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="ex", disable=not progress, leave=False)
    try:
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            batch = collate(encoded, idx, pad_id, padding_side="left")
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            with autocast_context(dtype, device):
                if prefix is not None and prefix.floor > 0:
                    logits = prefix.logits(idx, ids, mask)
                else:
                    logits = predict_medium_logits(model, ids, mask)
            top = logits.argmax(dim=-1).cpu()
            restricted = logits[:, label_ids.to(logits.device)].argmax(dim=-1).cpu()
            for j, i in enumerate(idx):
                tok = int(top[j])
                cls = token_to_class.get(tok, -1)
                free_pred[i] = cls
                if cls < 0:
                    non_label_tokens[tok] += 1
                restricted_pred[i] = int(restricted[j])
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    top_tokens = [(tokenizer.decode([tok]), cnt) for tok, cnt in non_label_tokens.most_common(5)]
    return EvalReport(
        num_examples=n,
        classes=classes,
        free=score_predictions(gold, free_pred, classes),
        restricted=score_predictions(gold, restricted_pred, classes),
        non_label_top=top_tokens,
        seconds=seconds,
        free_predictions=free_pred,
        restricted_predictions=restricted_pred,
    )
