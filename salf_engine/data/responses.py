"""Prompt/response data for supervised fine-tuning: GSM8K and generic files -> token ids whose labels
supervise the response only.

A row is the prompt's tokens followed by the response's; its labels are ``-100`` on the prompt and the
response's own ids on the response (the causal LM's loss shifts them by one), so the loss is taken on
the response tokens alone. With a chat template (the tokenizer's, e.g. SmolLM2-Instruct's ChatML) the
prompt is the user turn plus the assistant header and the response is the assistant's message with its
end-of-turn token; without one, the prompt ends in a newline and the response in the EOS token. Rows are
never packed together. A row longer than ``max_length`` keeps its first ``max_length`` tokens (its
response cut, counted in ``truncated``); a row whose prompt alone fills ``max_length`` has no response
token left and is left out, counted in ``dropped``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salf_engine.data.files import _blank, _column, data_files, read_table
from salf_engine.errors import DataError

__all__ = ["ResponseExample", "ResponseTask", "EncodedResponses", "load_responses", "load_gsm8k",
           "encode_responses", "collate_responses", "final_number"]

IGNORE = -100


@dataclass(frozen=True)
class ResponseExample:
    """One supervised fine-tuning example: the prompt and the response the model should produce (and, when
    read from a file, where: the file's name and the row, counted from 1, that messages name)."""

    prompt: str
    response: str
    file: str | None = field(default=None, compare=False)
    row: int | None = field(default=None, compare=False)


@dataclass
class ResponseTask:
    """A prompt/response dataset: its splits and, per split, rows read and skipped (blank)."""

    name: str
    splits: dict[str, list[ResponseExample]]
    row_counts: dict[str, dict[str, int]] = field(default_factory=dict)


def _responses(path: Path, prompt_column: str, response_column: str, counts: dict[str, int]
               ) -> list[ResponseExample]:
    table = read_table(path)
    prompts, responses = _column(table, prompt_column, path), _column(table, response_column, path)
    examples, skipped = [], 0
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True), start=1):
        if _blank(prompt) and _blank(response):
            skipped += 1
            continue
        for value, column in ((prompt, prompt_column), (response, response_column)):
            if _blank(value):
                raise DataError(f"{path}, row {row}: empty {column!r}")
        examples.append(ResponseExample(str(prompt), str(response), path.name, row))
    counts.update(read=len(examples), skipped=skipped)
    return examples


def load_responses(path: str | Path, *, prompt_column: str = "prompt",
                   response_column: str = "response") -> ResponseTask:
    """A CSV / TSV / JSONL / Parquet file (the "train" split) or a directory of ``train.<ext>`` and
    ``test.<ext>`` (optionally ``validation.<ext>``) with a prompt and a response column."""
    path = Path(path)
    files = data_files(path)
    counts: dict[str, dict[str, int]] = {split: {} for split in files}
    splits = {split: _responses(file, prompt_column, response_column, counts[split])
              for split, file in files.items()}
    return ResponseTask(path.stem if path.is_file() else path.name, splits, counts)


def load_gsm8k(data_dir: str | Path) -> ResponseTask:
    """GSM8K from ``data_dir/gsm8k`` (or ``data_dir`` itself): ``question`` -> ``answer`` (its reasoning,
    ending in ``#### <number>``)."""
    root = Path(data_dir)
    folder = root / "gsm8k" if (root / "gsm8k").is_dir() else root
    task = load_responses(folder, prompt_column="question", response_column="answer")
    task.name = "gsm8k"
    return task


_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def final_number(text: str) -> str | None:
    """The answer's final number, normalized (no thousands separators, no trailing ``.0``): the number after
    GSM8K's ``####`` when there is one, else the last number of the text; ``None`` without any."""
    found = _FINAL.findall(text) or _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value or "0"


@dataclass
class EncodedResponses:
    """Token ids of one split: ``input_ids`` per row and ``targets`` per token (``-100`` on the prompt),
    ``source[i]`` = the example row i came from, ``responses[i]`` its reference response; ``truncated``
    rows lost the end of their response, ``dropped`` examples had no room for any response token (left
    out; ``dropped_at`` says where each came from: ``file row N``, or ``example K`` without a file)."""

    input_ids: list[list[int]]
    targets: list[list[int]]
    source: list[int]
    truncated: int = 0
    dropped: int = 0
    responses: list[str] = field(default_factory=list)  # each row's reference response (the text)
    dropped_at: list[tuple[str | None, int]] = field(default_factory=list)  # (file, row) or (None, example)

    def describe(self, what: str, max_length: int) -> str:
        """One line on this split (``what``: "training" or "evaluation"): its rows, the responses that
        ``max_length`` cut and the rows it left out, named (an evaluation set that shrank says so)."""
        head = f"{what}: {len(self)} rows"
        if self.dropped and what == "evaluation":
            head += f" (the evaluation set shrinks from {len(self) + self.dropped})"
        parts = [f"{self.truncated} with the response cut at --max-length {max_length}" if self.truncated
                 else f"no response cut at --max-length {max_length}"]
        if self.dropped:
            parts.append(f"{self.dropped} left out: a prompt of {max_length} tokens or more leaves no room "
                         f"for the response ({_where(self.dropped_at)})")
        return "; ".join([head, *parts])

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def labels(self) -> list[int]:
        """The class of every row, as strategies read it from any split: one class (a generative task has
        none)."""
        return [0] * len(self.input_ids)

    def subset(self, rows: list[int]) -> EncodedResponses:
        """The given rows (in that order); the counts stay the whole split's."""
        return EncodedResponses([self.input_ids[i] for i in rows], [self.targets[i] for i in rows],
                                [self.source[i] for i in rows], self.truncated, self.dropped,
                                [self.responses[i] for i in rows], self.dropped_at)

    def supervised(self, rows: list[int]) -> int:
        """Supervised tokens of the given rows (the targets the shifted loss sees: all but the first)."""
        return sum(sum(t != IGNORE for t in self.targets[i][1:]) for i in rows)


def _where(places: list[tuple[str | None, int]], most: int = 5) -> str:
    """``a.jsonl rows 3, 9; examples 4`` for (file, row) / (None, example index) pairs, ``...`` past ``most``
    of them."""
    groups: dict[str | None, list[int]] = {}
    for file, row in places[:most]:
        groups.setdefault(file, []).append(row)
    text = "; ".join(f"{file + ' row' if file else 'example'}{'s' if len(rows) > 1 else ''} "
                     f"{', '.join(map(str, rows))}" for file, rows in groups.items())
    return text + (", ..." if len(places) > most else "")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_pair(tokenizer: Any, example: ResponseExample) -> tuple[list[int], list[int]]:
    user = [{"role": "user", "content": example.prompt}]
    prompt = _ids(tokenizer, tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False))
    whole = _ids(tokenizer, tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": example.response}], tokenize=False))
    if whole[:len(prompt)] != prompt:
        raise DataError("the tokenizer's chat template does not render the prompt as a prefix of the "
                        "conversation; pass chat_template=False")
    return prompt, whole[len(prompt):]


def _plain_pair(tokenizer: Any, example: ResponseExample) -> tuple[list[int], list[int]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return _ids(tokenizer, example.prompt + "\n"), _ids(tokenizer, example.response) + eos


def encode_responses(examples: list[ResponseExample], tokenizer: Any, *, max_length: int,
                     chat_template: bool | None = None) -> EncodedResponses:
    """Tokenize prompt/response pairs (see the module doc); ``chat_template=None`` uses the tokenizer's
    chat template when it has one. DataError when no example keeps a response token."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else chat_template
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise DataError("chat_template=True, but the tokenizer has no chat template")
    pair = _chat_pair if use_chat else _plain_pair
    out = EncodedResponses([], [], [])
    for k, example in enumerate(examples):
        prompt, response = pair(tokenizer, example)
        if not response:
            raise DataError(f"example {k}: the response {example.response[:40]!r} has no tokens")
        if len(prompt) >= max_length:
            out.dropped += 1
            out.dropped_at.append((example.file, example.row) if example.file else (None, k))
            continue
        ids = (prompt + response)[:max_length]
        out.truncated += len(prompt) + len(response) > max_length
        out.input_ids.append(ids)
        out.targets.append([IGNORE] * len(prompt) + ids[len(prompt):])
        out.source.append(k)
        out.responses.append(example.response)
    if not out.input_ids:
        raise DataError(f"none of the {len(examples)} examples fits max_length={max_length} with a response "
                        "token; raise max_length")
    return out


def collate_responses(split: EncodedResponses, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch of the given rows: ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on
    padding), [B, T] each."""
    width = max(len(split.input_ids[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        n = len(split.input_ids[i])
        ids[r, :n] = torch.tensor(split.input_ids[i])
        labels[r, :n] = torch.tensor(split.targets[i])
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
