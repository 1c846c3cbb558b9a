"""Prompts, verbalizers, encoding and collation: examples -> token ids ending in the medium token.

A task is framed as next-token prediction: an example is rendered into a prompt
whose last token (the "medium token") is followed, in training, by the first
token of ``" " + label word``. Everything here keeps that invariant: templates
must end in fixed text, truncation only shortens the text fields, and tokens a
tokenizer would append after the text (an EOS) are dropped.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from salf_engine.errors import ConfigError, DataError

__all__ = [
    "Example",
    "PromptTemplate",
    "TaskData",
    "Verbalizer",
    "EncodedSplit",
    "encode_split",
    "stratified_subset",
    "subset_split",
    "collate",
]

_FIELDS = ("text", "text_pair")


@dataclass(frozen=True)
class Example:
    """One classification example: input text (and optional second text) plus its class name."""

    text: str
    label: str
    text_pair: str | None = None


@dataclass(frozen=True)
class PromptTemplate:
    """A ``str.format`` template with the fields ``{text}`` and optionally ``{text_pair}``.

    The template must end in fixed, non-whitespace text after the last field
    (e.g. ``"...\\nAnswer:"``): its final token is the medium token.
    """

    template: str

    def __post_init__(self) -> None:
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as exc:
            raise DataError(f"prompt template {self.template!r} is not a valid format string: {exc}") from exc
        names = [name for _, name, _, _ in parsed if name is not None]
        unknown = sorted({n for n in names if n not in _FIELDS})
        if unknown:
            raise DataError(
                f"prompt template {self.template!r} has unknown field(s) {unknown}; "
                "only {text} and {text_pair} are allowed"
            )
        if "text" not in names:
            raise DataError(f"prompt template {self.template!r} has no {{text}} field")
        if any(spec or conv for _, name, spec, conv in parsed if name is not None):
            raise DataError(f"prompt template {self.template!r}: fields take no format spec or conversion")
        if self.template != self.template.rstrip():
            raise DataError(
                f"prompt template {self.template!r} ends in whitespace; it must end in the medium token"
            )
        if not self.ending.strip():
            raise DataError(
                f"prompt template {self.template!r} ends with a field; it must end in fixed text "
                "(e.g. '\\nAnswer:') whose last token is the medium token"
            )

    @property
    def fields(self) -> tuple[str, ...]:
        """The field names in order of appearance (each at most once in practice)."""
        parsed = string.Formatter().parse(self.template)
        return tuple(dict.fromkeys(name for _, name, _, _ in parsed if name is not None))

    @property
    def has_pair(self) -> bool:
        """Whether the template takes a second text."""
        return "text_pair" in self.fields

    @property
    def ending(self) -> str:
        """The fixed text after the last field; its last token is the medium token."""
        literal, name, _, _ = list(string.Formatter().parse(self.template))[-1]
        return literal if name is None else ""

    def render(self, example: Example) -> str:
        """The prompt for ``example`` (the label is not part of it)."""
        return self.template.format(**self._values(example))

    def _values(self, example: Example) -> dict[str, str]:
        if self.has_pair and example.text_pair is None:
            raise DataError(f"prompt template {self.template!r} needs a text pair, the example has none")
        if not self.has_pair and example.text_pair is not None:
            raise DataError(
                f"the example has a text pair but prompt template {self.template!r} has no {{text_pair}}"
            )
        values = {"text": example.text}
        if self.has_pair:
            values["text_pair"] = example.text_pair  # type: ignore[assignment]
        return values


@dataclass
class TaskData:
    """A loaded classification task: classes, raw splits, prompt template and verbalizer words."""

    name: str
    classes: list[str]
    splits: dict[str, list[Example]]
    template: PromptTemplate
    label_words: dict[str, str]
    # split -> {"read": rows read as examples, "skipped": blank lines / header rows left out}
    row_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self.classes)


class Verbalizer:
    """Maps classes to label tokens: the first token of ``" " + label word``.

    Raises `DataError` when a class has no label word or two classes share a first token.
    """

    def __init__(self, classes: Sequence[str], label_words: Mapping[str, str], tokenizer) -> None:
        self.classes: list[str] = list(classes)
        if not self.classes:
            raise DataError("a verbalizer needs at least one class")
        if len(set(self.classes)) != len(self.classes):
            raise DataError(f"duplicate class names in {self.classes}")
        missing = [c for c in self.classes if c not in label_words]
        if missing:
            raise DataError(f"no label word for class(es) {missing}")
        self.words: list[str] = [label_words[c] for c in self.classes]
        ids: list[int] = []
        owner: dict[int, str] = {}
        for cls, word in zip(self.classes, self.words, strict=True):
            if not word.strip():
                raise DataError(f"the label word of class {cls!r} is empty")
            tokens = tokenizer.encode(" " + word, add_special_tokens=False)
            if not tokens:
                raise DataError(f"the label word {word!r} of class {cls!r} encodes to no token")
            first = tokens[0]
            if first in owner:
                shown = tokenizer.convert_ids_to_tokens(first)
                raise DataError(
                    f"classes {owner[first]!r} and {cls!r} clash: the label words "
                    f"{label_words[owner[first]]!r} and {word!r} share the first token {shown!r} "
                    f"(id {first}); choose label words whose first tokens differ"
                )
            owner[first] = cls
            ids.append(first)
        self.label_token_ids: torch.LongTensor = torch.tensor(ids, dtype=torch.int64)  # type: ignore[assignment]
        self._index = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.classes)

    def class_index(self, label: str) -> int:
        """The index of class ``label``; `DataError` for a label the verbalizer does not know."""
        try:
            return self._index[label]
        except KeyError:
            raise DataError(f"unknown label {label!r}; known classes: {', '.join(self.classes)}") from None


@dataclass
class EncodedSplit:
    """Token ids of one split. Every row ends with the medium token.

    ``example_indices[i]`` is the position in ``task.splits[split]`` that row i came from.
    """

    input_ids: list[list[int]]
    labels: list[int]
    example_indices: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} rows of input_ids but {len(self.labels)} labels")
        if not self.example_indices:
            self.example_indices = list(range(len(self.labels)))

    def __len__(self) -> int:
        return len(self.labels)


def subset_split(encoded: EncodedSplit, rows: Sequence[int]) -> EncodedSplit:
    """The rows ``rows`` of ``encoded`` (in that order), keeping where each came from."""
    return EncodedSplit(input_ids=[encoded.input_ids[i] for i in rows],
                        labels=[encoded.labels[i] for i in rows],
                        example_indices=[encoded.example_indices[i] for i in rows])


def stratified_subset(labels: Sequence[int], limit: int, seed: int = 0) -> list[int]:
    """Indices of a class-stratified random subset of size ``min(limit, len(labels))``, in original order.

    Each class gets ``limit * n_c / n`` samples rounded by largest remainder (ties to the
    smaller class index); the members of each class are drawn with ``random.Random(seed)``,
    so the subset depends only on ``labels``, ``limit`` and ``seed``.
    """
    if limit < 1:
        raise DataError(f"limit must be a positive number of examples, got {limit}")
    n = len(labels)
    if limit >= n:
        return list(range(n))
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    classes = sorted(by_class)
    exact = {c: limit * len(by_class[c]) / n for c in classes}
    quota = {c: math.floor(exact[c]) for c in classes}
    leftover = limit - sum(quota.values())
    for c in sorted(classes, key=lambda c: (-(exact[c] - quota[c]), c))[:leftover]:
        quota[c] += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for c in classes:
        chosen.extend(rng.sample(by_class[c], quota[c]))
    return sorted(chosen)


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a text by default."""
    probe = "question"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def _cut_points(tokenizer, value: str) -> list[int]:
    """Character offsets after each unit of ``value``: tokens for fast tokenizers, else words."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(value, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ends = sorted({end for _, end in offsets if end > 0})
    else:
        ends = [m.end() for m in re.finditer(r"\S+", value)]
    return ends


def _truncated_ids(
    template: PromptTemplate, example: Example, tokenizer, budget: int, where: str
) -> list[int]:
    """Token ids of the prompt with its text fields shortened (longest first) to fit ``budget``."""
    values = template._values(example)
    cuts = {name: _cut_points(tokenizer, value) for name, value in values.items()}
    keep = {name: len(points) for name, points in cuts.items()}
    while True:
        shown = {name: (values[name][: cuts[name][keep[name] - 1]] if keep[name] else "") for name in values}
        ids = tokenizer(template.template.format(**shown), add_special_tokens=False)["input_ids"]
        excess = len(ids) - budget
        if excess <= 0:
            return ids
        if not any(keep.values()):
            raise DataError(
                f"{where}: max_length is too small; the prompt without any text already takes "
                f"{len(ids)} tokens (+ special tokens), the budget is {budget}"
            )
        for _ in range(excess):
            longest = max(keep, key=lambda name: keep[name])
            if keep[longest] == 0:
                break
            keep[longest] -= 1


def encode_split(
    task: TaskData,
    tokenizer,
    split: str,
    verbalizer: Verbalizer,
    *,
    max_length: int = 256,
    limit: int | None = None,
    seed: int = 0,
) -> EncodedSplit:
    """Render and tokenize one split of ``task``.

    Each row is ``leading special tokens (e.g. BOS) + prompt tokens``; special tokens the
    tokenizer appends (e.g. EOS) are left out so the medium token is last. Rows longer than
    ``max_length`` get their text field(s) truncated from the end (the longer field first),
    never the template. ``limit`` keeps a class-stratified random subset (`stratified_subset`).
    """
    if split not in task.splits:
        raise DataError(f"task {task.name!r} has no split {split!r}; it has {', '.join(task.splits)}")
    examples = task.splits[split]
    if not examples:
        raise DataError(f"split {split!r} of task {task.name!r} is empty")
    labels = []
    for i, ex in enumerate(examples):
        try:
            labels.append(verbalizer.class_index(ex.label))
        except DataError as exc:
            raise DataError(f"task {task.name!r}, split {split!r}, example {i}: {exc}") from None
    chosen = list(range(len(examples))) if limit is None else stratified_subset(labels, limit, seed)

    prefix, _ = _special_affixes(tokenizer)
    budget = max_length - len(prefix)
    prompts = [task.template.render(examples[i]) for i in chosen]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    rows: list[list[int]] = []
    for i, ids in zip(chosen, encoded, strict=True):
        if len(ids) > budget:
            where = f"task {task.name!r}, split {split!r}, example {i}"
            ids = _truncated_ids(task.template, examples[i], tokenizer, budget, where)
        rows.append(prefix + list(ids))
    return EncodedSplit(input_ids=rows, labels=[labels[i] for i in chosen], example_indices=chosen)


def collate(
    encoded: EncodedSplit,
    indices: Sequence[int] | torch.Tensor,
    pad_id: int,
    *,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Pad the rows ``indices`` of ``encoded`` into a batch (all tensors int64).

    Returns ``input_ids`` and ``attention_mask`` [B, T], ``last_index`` [B] (position of the
    medium token: T-1 with left padding, length-1 with right padding), ``labels`` [B] and
    ``indices`` [B] (the given row indices).
    """
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if not idx:
        raise DataError("cannot collate an empty batch")
    rows = [encoded.input_ids[i] for i in idx]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    last_index = torch.empty(len(rows), dtype=torch.int64)
    for b, row in enumerate(rows):
        if not row:
            raise DataError(f"row {idx[b]} of the encoded split is empty")
        start = width - len(row) if padding_side == "left" else 0
        input_ids[b, start : start + len(row)] = torch.tensor(row, dtype=torch.int64)
        attention_mask[b, start : start + len(row)] = 1
        last_index[b] = start + len(row) - 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "last_index": last_index,
        "labels": torch.tensor([encoded.labels[i] for i in idx], dtype=torch.int64),
        "indices": torch.tensor(idx, dtype=torch.int64),
    }
