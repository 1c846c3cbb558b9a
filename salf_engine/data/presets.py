"""Dataset presets: raw-format parsers for TREC, SST-5, CARER, MRPC and WebSS, and `load_task`.

Raw formats (see ``../shared/data/README.md``):

- TREC: ``COARSE:fine question text``, ISO-8859-1; the class is the coarse part.
- SST-5: ``<0-4> <sentence>``, UTF-8.
- CARER: optional header ``text;label_name``, then ``text;label`` (split at the last ``;``).
- MRPC: UTF-8 with BOM, tab-separated, header ``Quality #1 ID #2 ID #1 String #2 String``.
- WebSS: space-separated words, the last word is the class.

Every malformed line raises `DataError` naming the file and the line number; nothing is
skipped except blank lines at the very end of a file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from salf_engine.data.files import load_files
from salf_engine.data.prompts import Example, PromptTemplate, TaskData
from salf_engine.errors import DataError

__all__ = [
    "Preset",
    "PRESETS",
    "EMBEDDED_DIR",
    "parse_trec",
    "parse_sst5",
    "parse_carer",
    "parse_mrpc",
    "parse_webss",
    "load_preset",
    "load_task",
]

EMBEDDED_DIR = Path(__file__).with_name("embedded")
"""The TREC copy shipped with the package (used for ``trec`` without a data directory)."""

TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
SST5_CLASSES = ("0", "1", "2", "3", "4")
CARER_CLASSES = ("sadness", "joy", "love", "anger", "fear", "surprise")
MRPC_CLASSES = ("0", "1")
WEBSS_CLASSES = (
    "business",
    "computers",
    "culture-arts-entertainment",
    "education-science",
    "engineering",
    "health",
    "politics-society",
    "sports",
)
MRPC_HEADER = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]


def _read_lines(path: Path, encoding: str, expected: str) -> list[tuple[int, str]]:
    """(line number, line) pairs without line endings; blank lines only allowed at the end."""
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not valid {encoding} text ({exc.reason})") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{path}:{number}: empty line, expected {expected}")
    return list(enumerate(lines, start=1))


def _check_label(path: Path, number: int, label: str, classes: tuple[str, ...], what: str) -> None:
    if label not in classes:
        raise DataError(f"{path}:{number}: unknown {what} {label!r}, expected one of {', '.join(classes)}")


def _nonempty(path: Path, examples: list[Example]) -> list[Example]:
    if not examples:
        raise DataError(f"{path} holds no examples (empty split)")
    return examples


def parse_trec(path: Path) -> list[Example]:
    """TREC question classification: ``COARSE:fine question``, ISO-8859-1; class = coarse label."""
    expected = "'COARSE:fine question text'"
    examples = []
    for number, line in _read_lines(path, "iso-8859-1", expected):
        head, _, text = line.partition(" ")
        coarse, colon, fine = head.partition(":")
        if not colon or not fine or not text.strip():
            raise DataError(f"{path}:{number}: malformed line {line[:60]!r}, expected {expected}")
        _check_label(path, number, coarse, TREC_CLASSES, "TREC coarse class")
        examples.append(Example(text=text.strip(), label=coarse))
    return _nonempty(path, examples)


def parse_sst5(path: Path) -> list[Example]:
    """SST-5: ``<0-4> <sentence>`` per line, UTF-8."""
    expected = "'<0-4> <sentence>'"
    examples = []
    for number, line in _read_lines(path, "utf-8", expected):
        label, _, text = line.partition(" ")
        if not text.strip():
            raise DataError(f"{path}:{number}: malformed line {line[:60]!r}, expected {expected}")
        _check_label(path, number, label, SST5_CLASSES, "SST-5 label")
        examples.append(Example(text=text.strip(), label=label))
    return _nonempty(path, examples)


def parse_carer(path: Path) -> list[Example]:
    """CARER: header ``text;label_name`` (optional), then ``text;label``, split at the last ``;``."""
    expected = "'text;label'"
    examples = []
    for number, line in _read_lines(path, "utf-8", expected):
        if number == 1 and line.strip() == "text;label_name":
            continue
        text, semicolon, label = line.rpartition(";")
        if not semicolon or not text.strip():
            raise DataError(f"{path}:{number}: malformed line {line[:60]!r}, expected {expected}")
        _check_label(path, number, label.strip(), CARER_CLASSES, "CARER emotion")
        examples.append(Example(text=text.strip(), label=label.strip()))
    return _nonempty(path, examples)


def parse_mrpc(path: Path) -> list[Example]:
    """MRPC: BOM + tab-separated ``Quality #1 ID #2 ID #1 String #2 String``; quotes are literal."""
    lines = _read_lines(path, "utf-8-sig", "a tab-separated MRPC row")
    if not lines:
        raise DataError(f"{path} is empty, expected the MRPC header {'<TAB>'.join(MRPC_HEADER)!r}")
    # quotes are literal (csv's QUOTE_NONE), and a stray carriage return inside a field stays text
    reader = (line.split("\t") for _, line in lines)
    examples = []
    for (number, _), row in zip(lines, reader, strict=True):
        if number == 1:
            if [cell.strip() for cell in row] != MRPC_HEADER:
                raise DataError(
                    f"{path}:1: expected the MRPC header {'<TAB>'.join(MRPC_HEADER)!r}, found {row!r}"
                )
            continue
        if len(row) != len(MRPC_HEADER):
            raise DataError(
                f"{path}:{number}: expected {len(MRPC_HEADER)} tab-separated fields "
                f"(Quality, #1 ID, #2 ID, #1 String, #2 String), found {len(row)}"
            )
        quality, _, _, first, second = row
        _check_label(path, number, quality.strip(), MRPC_CLASSES, "MRPC quality")
        if not first.strip() or not second.strip():
            raise DataError(f"{path}:{number}: empty sentence in an MRPC pair")
        examples.append(Example(text=first.strip(), label=quality.strip(), text_pair=second.strip()))
    return _nonempty(path, examples)


def parse_webss(path: Path) -> list[Example]:
    """WebSS web snippets: space-separated words, the last word is the class."""
    expected = "'snippet words ... label'"
    examples = []
    for number, line in _read_lines(path, "utf-8", expected):
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{path}:{number}: malformed line {line[:60]!r}, expected {expected}")
        text, label = parts
        _check_label(path, number, label, WEBSS_CLASSES, "WebSS label")
        examples.append(Example(text=text.strip(), label=label))
    return _nonempty(path, examples)


@dataclass(frozen=True)
class Preset:
    """A known dataset: its classes (canonical order), label words, prompt and raw files."""

    name: str
    title: str
    classes: tuple[str, ...]
    label_words: Mapping[str, str]
    template: PromptTemplate
    files: Mapping[str, str]  # split -> file name
    parse: Callable[[Path], list[Example]]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="trec",
            title="TREC question classification (Voorhees & Tice 2000)",
            classes=TREC_CLASSES,
            label_words={
                "ABBR": "abbreviation",
                "DESC": "description",
                "ENTY": "entity",
                "HUM": "human",
                "LOC": "location",
                "NUM": "number",
            },
            template=PromptTemplate(
                "Question: {text}\nWhat type of answer does the question expect?\nAnswer:"
            ),
            files={"train": "train_5500.label", "test": "TREC_10.label"},
            parse=parse_trec,
        ),
        Preset(
            name="sst5",
            title="SST-5 fine-grained sentiment (Socher et al. 2013)",
            classes=SST5_CLASSES,
            label_words={"0": "terrible", "1": "bad", "2": "neutral", "3": "good", "4": "great"},
            template=PromptTemplate("Review: {text}\nWhat is the sentiment of the review?\nAnswer:"),
            files={"train": "sentiment-train", "validation": "sentiment-dev", "test": "sentiment-test"},
            parse=parse_sst5,
        ),
        Preset(
            name="carer",
            title="CARER emotion (Saravia et al. 2018)",
            classes=CARER_CLASSES,
            label_words={c: c for c in CARER_CLASSES},
            template=PromptTemplate("Text: {text}\nWhich emotion does the text express?\nAnswer:"),
            files={"train": "train.txt", "validation": "val.txt", "test": "test.txt"},
            parse=parse_carer,
        ),
        Preset(
            name="mrpc",
            title="MRPC paraphrase pairs (Dolan & Brockett 2005)",
            classes=MRPC_CLASSES,
            label_words={"0": "no", "1": "yes"},
            template=PromptTemplate(
                "Sentence 1: {text}\nSentence 2: {text_pair}\n"
                "Do the two sentences mean the same thing?\nAnswer:"
            ),
            files={"train": "msr_paraphrase_train.txt", "test": "msr_paraphrase_test.txt"},
            parse=parse_mrpc,
        ),
        Preset(
            name="webss",
            title="WebSS web snippets (Phan et al. 2008)",
            classes=WEBSS_CLASSES,
            label_words={
                "business": "business",
                "computers": "computers",
                "culture-arts-entertainment": "culture",
                "education-science": "education",
                "engineering": "engineering",
                "health": "health",
                "politics-society": "politics",
                "sports": "sports",
            },
            template=PromptTemplate("Snippet: {text}\nWhat is the topic of the snippet?\nAnswer:"),
            files={"train": "train.txt", "test": "test.txt"},
            parse=parse_webss,
        ),
    )
}


def _preset_file(preset: Preset, split: str, data_dir: Path) -> Path:
    fname = preset.files[split]
    candidates = [data_dir / preset.name / fname, data_dir / fname]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{preset.name}: the {split} file {fname!r} was not found; looked for "
        f"{candidates[0]} and {candidates[1]}"
    )


def _merge_label_words(preset: Preset, overrides: Mapping[str, str] | None) -> dict[str, str]:
    words = dict(preset.label_words)
    for cls, word in (overrides or {}).items():
        if cls not in preset.classes:
            raise DataError(
                f"label word given for unknown {preset.name} class {cls!r}; "
                f"classes are {', '.join(preset.classes)}"
            )
        words[cls] = word
    return words


def load_preset(
    name: str, data_dir: str | Path | None = None, *, label_words: Mapping[str, str] | None = None
) -> TaskData:
    """Load preset ``name`` from ``data_dir`` (files in DIR/name/ first, then DIR).

    ``trec`` without a data directory reads the embedded copy. ``label_words`` overrides
    the preset's words for the classes it names.
    """
    key = name.lower()
    if key not in PRESETS:
        raise DataError(f"unknown dataset preset {name!r}; valid presets: {', '.join(PRESETS)}")
    preset = PRESETS[key]
    if data_dir is None:
        if key != "trec":
            files = ", ".join(f"{key}/{f}" for f in preset.files.values())
            raise DataError(f"dataset {key!r} needs a data directory (--data-dir) holding {files}")
        root = EMBEDDED_DIR
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"data directory {root} does not exist (expected a directory holding {key}/)")
    splits = {}
    row_counts = {}
    for split in preset.files:
        path = EMBEDDED_DIR / preset.files[split] if data_dir is None else _preset_file(preset, split, root)
        splits[split] = preset.parse(path)
        # every line the parser did not turn into an example is a header or a trailing blank line
        row_counts[split] = {"read": len(splits[split]), "skipped": _line_count(path) - len(splits[split])}
    return TaskData(
        name=key,
        classes=list(preset.classes),
        splits=splits,
        template=preset.template,
        label_words=_merge_label_words(preset, label_words),
        row_counts=row_counts,
    )


def _line_count(path: Path) -> int:
    """Physical lines of a file (a last line without its newline counts)."""
    raw = path.read_bytes()
    return raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)


def load_task(
    dataset: str,
    data_dir: str | Path | None = None,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    label_words: Mapping[str, str] | None = None,
) -> TaskData:
    """Load a task: a preset name (trec, sst5, carer, mrpc, webss) or a local data file/directory.

    Preset names win over same-named paths. A path is tried as given, then under ``data_dir``;
    see `salf_engine.data.files.load_files` for the generic formats and column options.
    """
    if dataset.lower() in PRESETS:
        given = {
            "text_column": text_column,
            "text_pair_column": text_pair_column,
            "label_column": label_column,
        }
        used = [k for k, v in given.items() if v is not None]
        if used:
            raise DataError(f"{', '.join(used)} only apply to local data files, not to preset {dataset!r}")
        return load_preset(dataset, data_dir, label_words=label_words)
    candidates = [Path(dataset)]
    if data_dir is not None and not Path(dataset).is_absolute():
        candidates.append(Path(data_dir) / dataset)
    for path in candidates:
        if path.exists():
            return load_files(
                path,
                text_column=text_column,
                text_pair_column=text_pair_column,
                label_column=label_column,
                label_words=label_words,
            )
    tried = " or ".join(str(p) for p in candidates)
    raise DataError(
        f"unknown dataset {dataset!r}: not a preset ({', '.join(PRESETS)}) and no file or directory {tried}"
    )
