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


# ----------------------------------------------------------------------------- prompt/response files, the CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _pairs(n: int, long_rows: tuple[int, ...] = ()) -> list[dict]:
    """Prompt/response rows of the tiny vocabulary; the rows in ``long_rows`` get a 60-token prompt."""
    return [{"prompt": "how many city ? " * 15 if i in long_rows else f"how many river {i % 10} ?",
             "response": f"the city of {i % 10} . {i % 10}"} for i in range(n)]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _salf_train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--dataset", str(data), "--output", str(out), "--quiet",
            "--batch-size", "4", "--max-new-tokens", "2", "--exact-match-rows", "2", *extra]


def _bad_jsonl(kind: str, path: Path) -> tuple[list[str], str]:
    """A prompt/response file a user could get wrong, the options given, and the message it must give."""
    good = [json.dumps(r) for r in _pairs(6)]
    response = ["--response-column", "response"]
    if kind == "not utf-8":
        raw = "\n".join(good[:2]).encode() + b'\n{"prompt": "caf\xe9 ?", "response": "1"}\n'
        path.write_bytes(raw + "\n".join(good[2:]).encode() + b"\n")
        return response, f"{path}, line 3: not UTF-8 text (byte 0xe9 at column 16)"
    if kind == "not an object":
        path.write_text("\n".join([*good[:3], "[\"how many ?\", \"3\"]", *good[3:]]) + "\n")
        return response, f"{path}, line 4: a JSON-lines row must be an object"
    if kind == "not json":
        path.write_text("\n".join([good[0], '{"prompt": "how many ?", "response": }', *good[1:]]) + "\n")
        return response, f"{path}, line 2: not valid JSON"
    if kind == "forgot --response-column":
        _jsonl(path, _pairs(6))
        return [], "has no column 'text'; available columns: prompt, response (prompt/response data: pass " \
                   "--prompt-column and --response-column)"
    if kind == "wrong response column":
        _jsonl(path, _pairs(6))
        return ["--response-column", "answer"], "has no column 'answer'; available columns: prompt, response"
    if kind == "empty response":
        _jsonl(path, [*_pairs(3), {"prompt": "how many ?", "response": " "}, *_pairs(2)])
        return response, f"{path}, row 4: empty 'response'"
    assert kind == "every prompt too long", kind
    _jsonl(path, _pairs(6, long_rows=tuple(range(6))))
    return [*response, "--max-length", "16"], "none of the 5 examples fits max_length=16"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["not utf-8", "not an object", "not json", "forgot --response-column",
                                  "wrong response column", "empty response", "every prompt too long"])
def test_cli_bad_prompt_response_files_are_one_line_errors(tmp_path, capsys, tiny_dir, kind):
    """What a user gets wrong in their own JSONL: exit status 2 and one ``error:`` line naming the file (and
    the line where there is one), no traceback and no reader noise."""
    data = tmp_path / "pairs.jsonl"
    extra, needle = _bad_jsonl(kind, data)
    code = cli.main(_salf_train(tiny_dir, data, tmp_path / "run", "--eval-fraction", "0.2", *extra))
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2, captured
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert str(data) in err[0] or kind == "every prompt too long", err


@pytest.mark.usefixtures("one_thread")
def test_cli_counts_and_names_rows_cut_or_left_out_and_a_shrunk_evaluation_set(tmp_path, capsys, tiny_dir):
    """A prompt longer than --max-length is left out, counted (log and summary.json) and named by file and
    row; the evaluation set that shrinks says so; --quiet hides transformers' and datasets' bars too."""
    data = tmp_path / "pairs"
    data.mkdir()
    _jsonl(data / "train.jsonl", _pairs(12, long_rows=(2, 7)))
    _jsonl(data / "test.jsonl", _pairs(4, long_rows=(1,)))
    out = tmp_path / "run"
    code = cli.main(_salf_train(tiny_dir, data, out, "--response-column", "response", "--max-length", "24",
                                "--strategy", "bot50"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert ("data: training: 10 rows; no response cut at --max-length 24; 2 left out: a prompt of 24 tokens "
            "or more leaves no room for the response (train.jsonl rows 3, 8)") in lines
    assert ("data: evaluation: 3 rows (the evaluation set shrinks from 4); no response cut at --max-length "
            "24; 1 left out: a prompt of 24 tokens or more leaves no room for the response (test.jsonl row 2)"
            ) in lines
    assert any(line.endswith("3 evaluated (1 left out: prompt too long for --max-length)")
               for line in lines), lines
    summary = json.loads((out / "summary.json").read_text())
    assert summary["responses"] == {"train": {"truncated": 0, "dropped": 2}, "eval": {"truncated": 0,
                                                                                      "dropped": 1}}
    assert summary["num_eval_examples"] == 3
    for bar in ("Loading weights", "Writing model shards", "Generating train split", "train:",
                "greedy decode"):
        assert bar not in captured.err, bar


def test_library_progress_bars_are_off_inside_and_restored_after():
    import datasets
    from transformers.utils import logging as hf_logging

    from salf_engine.models.loading import library_progress_bars

    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    with library_progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    with library_progress_bars(True):
        assert hf_logging.is_progress_bar_enabled()
