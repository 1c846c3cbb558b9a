"""Generated bad (and good) input for the data readers and the CLI (Hypothesis, bounded).

Every case ends in a one-line `DataError` / `SalfError` naming the file, or in a parse that keeps every
row: the examples equal the generated ones, and the rows read plus the rows skipped (blank lines,
headers) account for every line.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from salf_engine.cli import commands as cli  # noqa: E402
from salf_engine.data import Example, load_task  # noqa: E402
from salf_engine.data.presets import (  # noqa: E402
    CARER_CLASSES,
    MRPC_CLASSES,
    SST5_CLASSES,
    TREC_CLASSES,
    WEBSS_CLASSES,
    parse_carer,
    parse_mrpc,
    parse_sst5,
    parse_trec,
    parse_webss,
)
from salf_engine.errors import DataError  # noqa: E402

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=12)  # the `datasets` readers: ~10 ms a file

PARSERS = {"trec": parse_trec, "sst5": parse_sst5, "carer": parse_carer, "mrpc": parse_mrpc,
           "webss": parse_webss}
_counter = itertools.count()


def _fresh(tmp_path: Path, suffix: str) -> Path:
    """A new file name per example (the `datasets` cache keys on the path)."""
    return tmp_path / f"case{next(_counter)}{suffix}"


def _one_line(exc: BaseException, path: Path | None = None) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    if path is not None:
        assert str(path) in msg, msg


def _lines(raw: bytes) -> int:
    return raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)


# ----------------------------------------------------------------------------- raw preset formats

# bytes that stress the parsers: separators of every format, line ends, a BOM, invalid UTF-8
NASTY = st.lists(st.sampled_from([b"\n", b"\r\n", b"\r", b"\t", b" ", b":", b";", b"\xef\xbb\xbf", b"\xff",
                                  b"\xc3\x28", b"HUM:ind", b"joy", b"3", b"1", b"sports", b'"', b"\x00",
                                  b"Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", b"text;label_name",
                                  b"x" * 5000]), max_size=30).map(b"".join)


@pytest.mark.parametrize("name", list(PARSERS))
@FAST
@given(raw=st.one_of(st.binary(max_size=300), NASTY))
def test_presets_on_random_bytes(tmp_path, name, raw):
    path = _fresh(tmp_path, ".txt")
    path.write_bytes(raw)
    try:
        examples = PARSERS[name](path)
    except DataError as exc:
        _one_line(exc, path)
        return
    # a parse: no line lost -- every line is an example, a header, or a blank line at the end
    text_lines = _lines(raw)
    assert 0 < len(examples) <= text_lines
    assert all(isinstance(e, Example) and e.text.strip() for e in examples)


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), min_size=1,
               max_size=40).filter(lambda t: t.strip() and "\x85" not in t)
LATIN1 = TEXT.filter(lambda t: all(ord(c) < 256 for c in t))


def _format(name: str, text: str, label: str, pair: str) -> str:
    if name == "trec":
        return f"{label}:fine {text}"
    if name == "sst5":
        return f"{label} {text}"
    if name == "carer":
        return f"{text};{label}"
    if name == "webss":
        return f"{text} {label}"
    return f"{label}\t1\t2\t{text}\t{pair}"


CLASSES = {"trec": TREC_CLASSES, "sst5": SST5_CLASSES, "carer": CARER_CLASSES, "webss": WEBSS_CLASSES,
           "mrpc": MRPC_CLASSES}


@pytest.mark.parametrize("name", list(PARSERS))
@FAST
@given(data=st.data(), ending=st.sampled_from(["", "\n", "\n\n\n", "\r\n"]), header=st.booleans())
def test_presets_round_trip_generated_rows(tmp_path, name, data, ending, header):
    """Labels and texts with separators inside, unicode, a missing last newline: every row comes back."""
    text = LATIN1 if name == "trec" else TEXT
    if name == "mrpc":
        text = text.filter(lambda t: "\t" not in t)
    rows = data.draw(st.lists(st.tuples(text, st.sampled_from(CLASSES[name]), text), min_size=1,
                              max_size=8))
    lines = [_format(name, t, y, p) for t, y, p in rows]
    if name == "mrpc":
        lines.insert(0, "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String")
    elif name == "carer" and header:
        lines.insert(0, "text;label_name")
    sep = "\r\n" if ending == "\r\n" else "\n"
    raw = (sep.join(lines) + ending).encode("iso-8859-1" if name == "trec" else "utf-8")
    path = _fresh(tmp_path, ".txt")
    path.write_bytes(raw)
    got = PARSERS[name](path)
    if name == "webss":  # the label is the last whitespace-separated word: text keeps its inner spaces
        want = [Example(t.strip(), y) for t, y, _ in rows]
    elif name == "mrpc":
        want = [Example(t.strip(), y, p.strip()) for t, y, p in rows]
    else:
        want = [Example(t.strip(), y) for t, y, _ in rows]
    assert got == want


# ----------------------------------------------------------------------------- CSV / TSV / JSONL files

CELL = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"), max_size=30)
LABEL = st.text(st.characters(whitelist_categories=("L", "N", "P")), min_size=1, max_size=8).filter(
    lambda t: t.strip() == t and t.lower() not in ("nan", "null", "none", "na", "n/a", "true", "false")
    and not _numeric(t))


def _numeric(t: str) -> bool:
    try:
        float(t)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
@SLOW
@given(raw=st.one_of(st.binary(max_size=200), NASTY))
def test_files_on_random_bytes(tmp_path, suffix, raw):
    path = _fresh(tmp_path, suffix)
    path.write_bytes(raw)
    try:
        task = load_task(str(path))
    except DataError as exc:
        _one_line(exc)
        return
    counts = task.row_counts["train"]
    assert counts["read"] == len(task.splits["train"]) > 0


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
@SLOW
@given(rows=st.lists(st.tuples(CELL.filter(lambda t: t.strip()), LABEL), min_size=1, max_size=6),
       blanks=st.integers(0, 2))
def test_files_round_trip_with_separators_and_blank_lines(tmp_path, suffix, rows, blanks):
    """Commas, tabs, quotes, newlines and unicode in the text survive; blank lines are counted."""
    import csv

    path = _fresh(tmp_path, suffix)
    if suffix == ".jsonl":
        body = "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" + "\n" * blanks
                       for t, y in rows)
        path.write_text(body, encoding="utf-8")
    else:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, delimiter="," if suffix == ".csv" else "\t", lineterminator="\n",
                           quoting=csv.QUOTE_ALL)
            w.writerow(["text", "label"])
            for t, y in rows:
                w.writerow([t, y])
                fh.write("\n" * blanks)
    task = load_task(str(path))
    assert [(e.text, e.label) for e in task.splits["train"]] == rows
    assert task.row_counts["train"] == {"read": len(rows), "skipped": blanks * len(rows)}


def test_files_missing_column_huge_line_and_cut_off_end(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("sentence,label\nhello,a\n")
    with pytest.raises(DataError, match="no column 'text'") as err:
        load_task(str(path))
    _one_line(err.value, path)
    huge = "word " * 200_000
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"text": huge, "label": "x"}) + "\n" + json.dumps({"text": "t", "label": "y"}))
    task = load_task(str(path))  # a 1 MB line, and a last line without its newline
    assert [len(e.text) for e in task.splits["train"]] == [len(huge), 1]
    path = tmp_path / "c.csv"
    path.write_text('text,label\nfine,a\n"cut off in the mid')
    with pytest.raises(DataError) as err:
        load_task(str(path))
    _one_line(err.value)


# ----------------------------------------------------------------------------- the CLI


OPTION_VALUES = st.sampled_from(["--batch-size", "--lr", "--max-steps", "--strategy", "--budget", "--epochs",
                                 "--save-every", "--on-nonfinite", "--eval-split", "--dtype"])


@SLOW
@given(option=OPTION_VALUES, value=st.text(st.characters(blacklist_categories=("Cs",),
                                                          blacklist_characters="\x00"), max_size=12),
       raw=st.binary(max_size=120))
def test_cli_bad_values_and_files_are_one_line_errors(tmp_path, capsys, option, value, raw):
    """Random option values and a random data file: exit status 2 and one ``error:`` line."""
    data = _fresh(tmp_path, ".csv")
    data.write_bytes(raw)
    out = _fresh(tmp_path, "")
    try:
        code = cli.main(["train", "--model", "no-such-model", "--dataset", str(data), "--output", str(out),
                         "--quiet", f"{option}={value}"])
    except SystemExit as exc:  # argparse's own errors: one line and status 2 too
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ") and not any("Traceback" in line for line in err), err
    assert not out.exists()


def test_cli_resume_errors_are_one_line(tmp_path, capsys):
    for argv, needle in ((["train", "--resume", str(tmp_path / "nothing")], "no config.json"),
                         (["train", "--dataset", "trec"], "--model, --output"),
                         (["train", "--resume", str(tmp_path), "--output", str(tmp_path / "x")],
                          "different")):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
