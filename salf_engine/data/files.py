"""Generic local datasets: CSV / TSV / JSONL / Parquet files read through the `datasets` library.

A dataset is either one file (the "train" split) or a directory holding ``train.<ext>`` and
``test.<ext>`` and optionally ``validation.<ext>`` or ``dev.<ext>`` (read as "validation").
Classes are the label words' keys in their given order when ``label_words`` is passed,
otherwise the distinct training labels, sorted (numerically when all are integers). Each
class's default label word is its name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from salf_engine.data.prompts import Example, PromptTemplate, TaskData
from salf_engine.errors import DataError

__all__ = ["FORMATS", "GENERIC_TEMPLATE", "GENERIC_PAIR_TEMPLATE", "data_files", "read_table", "load_files"]

FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {"keep_default_na": False, "na_values": [], "skip_blank_lines": False}),
    ".tsv": ("csv", {"sep": "\t", "keep_default_na": False, "na_values": [], "skip_blank_lines": False}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
"""File suffix -> (`datasets` builder, builder options). CSV/TSV keep "NA"/"" as text; blank lines come
through as empty rows, which :func:`load_files` skips and counts (never silently)."""

GENERIC_TEMPLATE = PromptTemplate("Text: {text}\nLabel:")
GENERIC_PAIR_TEMPLATE = PromptTemplate("Text 1: {text}\nText 2: {text_pair}\nLabel:")

_SPLIT_STEMS = {"train": ("train",), "test": ("test",), "validation": ("validation", "dev")}


def read_table(path: Path) -> Any:
    """Read one CSV/TSV/JSONL/Parquet file as a `datasets.Dataset`; `DataError` if unreadable or empty."""
    import datasets

    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (no rows)")
    builder, options = FORMATS[suffix]
    if suffix != ".parquet":
        text = _utf8_text(path)
        if suffix == ".jsonl":
            _check_json_lines(path, text)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs a copy of the error raised below
    try:
        table = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **options)
    except ValueError as exc:
        if "corresponds to no data" in str(exc):
            raise DataError(f"{path} is empty (no rows)") from None
        raise DataError(f"could not read {path} as {builder}: {_root_cause(exc)}") from exc
    except Exception as exc:  # parser errors come in many types (pyarrow, pandas, datasets)
        raise DataError(f"could not read {path} as {builder}: {_root_cause(exc)}") from exc
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(table) == 0:
        raise DataError(f"{path} is empty (no rows)")
    return table


def _utf8_text(path: Path) -> str:
    """The file's text; a DataError naming the line and column of the first bytes that are not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, line_start = raw.count(b"\n", 0, exc.start) + 1, raw.rfind(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte "
                        f"0x{raw[exc.start]:02x} at column {exc.start - line_start + 1}); save the file "
                        "as UTF-8") from None


def _check_json_lines(path: Path, text: str) -> None:
    """Every non-blank line of a JSON-lines file is one JSON object, else a DataError naming the line."""
    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg} at column "
                            f"{exc.colno})") from None
        if not isinstance(row, dict):
            kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
                type(row), "a number")
            raise DataError(f"{path}, line {number}: a JSON-lines row must be an object "
                            f"{{\"column\": value, ...}}; found {kind}")


def _root_cause(exc: BaseException, limit: int = 200) -> str:
    """The innermost cause of a library error, as one short line (``datasets`` wraps the parser's)."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""


def _label_str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


#: Appended to a missing default column's error: a prompt/response file read as classification data.
PROMPT_RESPONSE_HINT = " (prompt/response data: pass --prompt-column and --response-column)"


def _column(table: Any, name: str, path: Path, hint: str = "") -> list[Any]:
    if name not in table.column_names:
        raise DataError(f"{path} has no column {name!r}; available columns: "
                        f"{', '.join(table.column_names)}{hint}")
    values = list(table[name])
    feature = table.features[name]
    if hasattr(feature, "int2str") and hasattr(feature, "names"):  # ClassLabel: use the class names
        values = [None if v is None or v < 0 else feature.int2str(v) for v in values]
    return values


def _examples(path: Path, text_column: str, text_pair_column: str | None, label_column: str,
              counts: dict[str, int] | None = None, hint: str = "") -> list[Example]:
    """The examples of one file; ``counts`` gets ``read`` and ``skipped`` (blank rows / lines); ``hint`` is
    added to the error of a missing text or label column."""
    table = read_table(path)
    texts = _column(table, text_column, path, hint)
    pairs = _column(table, text_pair_column, path) if text_pair_column else [None] * len(texts)
    labels = _column(table, label_column, path, hint)
    examples = []
    skipped = _blank_json_lines(path) if path.suffix.lower() in (".jsonl", ".json") else 0
    columns = [list(table[c]) for c in table.column_names]
    for row, (text, pair, label) in enumerate(zip(texts, pairs, labels, strict=True), start=1):
        if all(_blank(col[row - 1]) for col in columns):
            skipped += 1  # a blank line of a CSV / TSV
            continue
        name = _label_str(label)
        if name is None:
            raise DataError(f"{path}, row {row}: missing label in column {label_column!r}")
        if text is None:
            raise DataError(f"{path}, row {row}: missing text in column {text_column!r}")
        if text_pair_column and pair is None:
            raise DataError(f"{path}, row {row}: missing text in column {text_pair_column!r}")
        examples.append(Example(text=str(text), label=name, text_pair=None if pair is None else str(pair)))
    if not examples:
        raise DataError(f"{path} holds no examples ({skipped} blank rows)")
    if counts is not None:
        counts.update(read=len(examples), skipped=skipped)
    return examples


def _blank_json_lines(path: Path) -> int:
    """Blank lines of a JSON-lines file (the reader passes over them; they are counted as skipped)."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return sum(1 for line in lines if not line.strip())


def _split_files(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, stems in _SPLIT_STEMS.items():
        matches = [directory / f"{stem}{ext}" for stem in stems for ext in FORMATS]
        matches = [m for m in matches if m.is_file()]
        if len(matches) > 1:
            names = ", ".join(m.name for m in matches)
            raise DataError(f"{directory}: several files for the {split} split: {names}")
        if matches:
            found[split] = matches[0]
    exts = "|".join(e.lstrip(".") for e in FORMATS)
    missing = [s for s in ("train", "test") if s not in found]
    if missing:
        raise DataError(
            f"{directory}: no {' or '.join(missing)} file; a dataset directory must hold "
            f"train.<{exts}> and test.<{exts}> (optionally validation.<ext> or dev.<ext>)"
        )
    return found


def data_files(path: Path) -> dict[str, Path]:
    """Split name -> file of a dataset: one file (the "train" split) or a directory of split files."""
    if path.is_dir():
        return _split_files(path)
    if path.is_file():
        return {"train": path}
    raise DataError(f"{path} does not exist (expected a data file or a directory of split files)")


def _sort_classes(labels: set[str]) -> list[str]:
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def load_files(
    path: str | Path,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    label_words: Mapping[str, str] | None = None,
) -> TaskData:
    """Load a generic dataset from one file or a directory of split files.

    Columns default to ``text`` and ``label``; ``text_pair_column`` (no default) adds a
    second text. Every label of every split must be a known class, else `DataError`.
    """
    path = Path(path)
    hint = "" if text_column and label_column else PROMPT_RESPONSE_HINT  # a default column is missing
    text_column = text_column or "text"
    label_column = label_column or "label"
    files = data_files(path)
    row_counts: dict[str, dict[str, int]] = {split: {} for split in files}
    splits = {
        split: _examples(file, text_column, text_pair_column, label_column, row_counts[split], hint)
        for split, file in files.items()
    }

    if label_words:
        words = {str(k): str(v) for k, v in label_words.items()}
        classes = list(words)
        origin = "the given label words"
    else:
        classes = _sort_classes({ex.label for ex in splits["train"]})
        words = {c: c for c in classes}
        origin = f"the training split {files['train']}"
    known = set(classes)
    for split, examples in splits.items():
        for row, ex in enumerate(examples, start=1):
            if ex.label not in known:
                raise DataError(
                    f"{files[split]}, row {row}: label {ex.label!r} is not a known class "
                    f"(classes from {origin}: {', '.join(classes)})"
                )
    return TaskData(
        name=path.stem if path.is_file() else path.name,
        classes=classes,
        splits=splits,
        template=GENERIC_PAIR_TEMPLATE if text_pair_column else GENERIC_TEMPLATE,
        label_words=words,
        row_counts=row_counts,
    )
