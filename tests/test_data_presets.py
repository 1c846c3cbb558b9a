"""Dataset presets: raw parsers on the shared data and on MRPC/WebSS fixtures, lookup rules, bad input."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from salf_engine.data import PRESETS, Example, load_task
from salf_engine.data.presets import parse_carer, parse_mrpc, parse_sst5, parse_trec, parse_webss
from salf_engine.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
MRPC_HEAD = b"\xef\xbb\xbfQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"


def counts(task) -> dict[str, int]:
    return {split: len(examples) for split, examples in task.splits.items()}


# ---------------------------------------------------------------- shared data (README counts)


def test_trec_counts_and_classes(shared_data):
    task = load_task("trec", shared_data)
    assert counts(task) == {"train": 5452, "test": 500}
    assert task.classes == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert {ex.label for ex in task.splits["train"]} == set(task.classes)
    assert task.splits["train"][0] == Example("How did serfdom develop in and then leave Russia ?", "DESC")
    assert task.splits["test"][2] == Example("Who was Galileo ?", "HUM")
    # line 66 holds the byte 0xF0, which ISO-8859-1 reads as U+00F0
    assert (
        task.splits["train"][65].text
        == "Which city has the oldest relationship as a sister\u00f0city with Los Angeles ?"
    )


def test_sst5_counts_and_classes(shared_data):
    task = load_task("sst5", shared_data)
    assert counts(task) == {"train": 8544, "validation": 1101, "test": 2210}
    assert task.classes == ["0", "1", "2", "3", "4"]
    assert Counter(ex.label for ex in task.splits["train"]) == {
        "0": 1092,
        "1": 2218,
        "2": 1624,
        "3": 2322,
        "4": 1288,
    }
    assert task.splits["validation"][1] == Example("one long string of cliches .", "1")
    assert task.label_words == {"0": "terrible", "1": "bad", "2": "neutral", "3": "good", "4": "great"}


def test_carer_counts_and_classes(shared_data):
    task = load_task("carer", shared_data)
    assert counts(task) == {"train": 16000, "validation": 2000, "test": 2000}
    assert task.classes == ["sadness", "joy", "love", "anger", "fear", "surprise"]
    assert Counter(ex.label for ex in task.splits["train"]) == {
        "joy": 5362,
        "sadness": 4666,
        "anger": 2159,
        "fear": 1937,
        "love": 1304,
        "surprise": 572,
    }
    assert task.splits["train"][0] == Example("i didnt feel humiliated", "sadness")
    assert task.label_words == {c: c for c in task.classes}


def test_embedded_trec_equals_shared(shared_data):
    embedded = load_task("trec")
    shared = load_task("trec", shared_data)
    assert embedded.splits == shared.splits
    assert embedded.classes == shared.classes


def test_embedded_trec_without_data_dir():
    task = load_task("TREC")  # preset names are case-insensitive
    assert counts(task) == {"train": 5452, "test": 500}


def test_lookup_in_subdir_first_then_dir_itself(shared_data, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("train_5500.label", "TREC_10.label"):
        shutil.copy(shared_data / "trec" / name, flat / name)
    assert counts(load_task("trec", flat)) == {"train": 5452, "test": 500}
    # DIR/trec/ wins over DIR/
    (flat / "trec").mkdir()
    (flat / "trec" / "train_5500.label").write_text("NUM:count How many ?\n", encoding="latin-1")
    (flat / "trec" / "TREC_10.label").write_text("HUM:ind Who ?\nLOC:city Where ?\n", encoding="latin-1")
    assert counts(load_task("trec", str(flat))) == {"train": 1, "test": 2}


# ---------------------------------------------------------------- MRPC / WebSS fixtures


def test_mrpc_fixture():
    task = load_task("mrpc", FIXTURES)
    assert counts(task) == {"train": 5, "test": 2}
    assert task.classes == ["0", "1"]
    assert task.label_words == {"0": "no", "1": "yes"}
    first = task.splits["train"][0]
    assert first.label == "1"
    assert first.text == (
        'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting '
        "his evidence ."
    )
    assert first.text_pair == (
        'Referring to him as only " the witness " , Amrozi accused his brother of deliberately distorting '
        "his evidence ."
    )
    # an unbalanced quote stays literal and does not swallow the next field or line
    third = task.splits["train"][2]
    assert third == Example(
        'The spokesman said " we will not comment on rumours .',
        "1",
        'A spokesman declined to comment on what he called " rumours "',
    )
    # a string starting with a quote is not a quoted csv field
    assert task.splits["train"][4] == Example(
        '" We will not stop , " the minister said .', "1", 'The minister said they would " not stop " .'
    )
    assert [ex.label for ex in task.splits["train"]] == ["1", "0", "1", "0", "1"]
    assert [ex.label for ex in task.splits["test"]] == ["1", "0"]
    assert not any("\r" in ex.text_pair or "\ufeff" in ex.text for ex in task.splits["train"])
    assert task.template.has_pair


def test_webss_fixture():
    task = load_task("webss", FIXTURES)
    assert counts(task) == {"train": 9, "test": 3}
    assert set(task.classes) == {ex.label for ex in task.splits["train"]}
    assert len(task.classes) == 8
    assert task.splits["train"][1] == Example(
        "java sun developers tutorials source code download", "computers"
    )
    assert task.splits["train"][2].label == "culture-arts-entertainment"
    assert task.label_words["culture-arts-entertainment"] == "culture"
    assert task.label_words["politics-society"] == "politics"
    assert [ex.label for ex in task.splits["test"]] == ["computers", "sports", "health"]


def test_label_words_override():
    task = load_task("webss", FIXTURES, label_words={"health": "medicine"})
    assert task.label_words["health"] == "medicine"
    assert task.label_words["sports"] == "sports"
    with pytest.raises(DataError, match="unknown webss class 'medicine'.*business"):
        load_task("webss", FIXTURES, label_words={"medicine": "health"})


def test_every_preset_is_complete():
    assert set(PRESETS) == {"trec", "sst5", "carer", "mrpc", "webss"}
    for preset in PRESETS.values():
        assert set(preset.label_words) == set(preset.classes)
        assert preset.template.template.endswith("\nAnswer:")
        assert "train" in preset.files and "test" in preset.files


# ---------------------------------------------------------------- bad input


def test_unknown_dataset_lists_presets():
    with pytest.raises(DataError, match=r"unknown dataset 'imdb'.*trec, sst5, carer, mrpc, webss"):
        load_task("imdb")


def test_preset_needs_data_dir():
    with pytest.raises(DataError, match=r"'sst5' needs a data directory.*sst5/sentiment-train"):
        load_task("sst5")


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"data directory .*nope does not exist"):
        load_task("carer", tmp_path / "nope")


def test_missing_file_names_paths(tmp_path):
    (tmp_path / "webss").mkdir()
    (tmp_path / "webss" / "train.txt").write_text("a b sports\n")
    with pytest.raises(DataError, match=r"test file 'test.txt' was not found.*webss/test.txt.*test.txt"):
        load_task("webss", tmp_path)


def test_columns_rejected_for_presets():
    with pytest.raises(DataError, match="text_column only apply to local data files"):
        load_task("trec", text_column="question")


def write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("parser", "content", "pattern"),
    [
        (parse_trec, b"", r"holds no examples \(empty split\)"),
        (parse_trec, b"NUM:count How many ?\nLOC no colon here\n", r":2: malformed line 'LOC no colon here'"),
        (parse_trec, b"NUM:count\n", r":1: malformed line"),
        (parse_trec, b"NUM:count How many ?\nXYZ:abc What ?\n", r":2: unknown TREC coarse class 'XYZ'.*ABBR"),
        (
            parse_sst5,
            b"3 fine .\n7 too good .\n",
            r":2: unknown SST-5 label '7', expected one of 0, 1, 2, 3, 4",
        ),
        (parse_sst5, b"3 fine .\n4\n", r":2: malformed line '4'"),
        (parse_sst5, b"3 fine .\n\n2 ok .\n", r":2: empty line"),
        (parse_sst5, b"3 fine .\n2 caf\xe9 .\n", r":2: not valid utf-8"),
        (parse_carer, b"text;label_name\n", r"holds no examples"),
        (
            parse_carer,
            b"text;label_name\ni feel fine;joy\ni am bored;boredom\n",
            r":3: unknown CARER emotion 'boredom'",
        ),
        (parse_carer, b"text;label_name\nno separator here\n", r":2: malformed line 'no separator here'"),
        (parse_webss, b"a b sports\nlonely\n", r":2: malformed line 'lonely'"),
        (parse_webss, b"a b sports\nc d gardening\n", r":2: unknown WebSS label 'gardening'.*business"),
        (parse_mrpc, b"", r"is empty, expected the MRPC header"),
        (parse_mrpc, b"\xef\xbb\xbfQuality\tA\tB\n", r":1: expected the MRPC header"),
        (
            parse_mrpc,
            MRPC_HEAD + b"1\t1\t2\tonly one sentence\n",
            r":2: expected 5 tab-separated fields.*found 4",
        ),
        (
            parse_mrpc,
            MRPC_HEAD + b"1\t1\t2\ta .\tb .\n2\t3\t4\tc .\td .\n",
            r":3: unknown MRPC quality '2', expected one of 0, 1",
        ),
        (
            parse_mrpc,
            MRPC_HEAD,
            r"holds no examples",
        ),
    ],
)
def test_malformed_raw_files(tmp_path, parser, content, pattern):
    path = write(tmp_path / "raw.txt", content)
    with pytest.raises(DataError, match=pattern) as info:
        parser(path)
    assert str(path) in str(info.value)


def test_trailing_blank_lines_are_not_rows(tmp_path):
    path = write(tmp_path / "raw.txt", "3 fine .\r\n1 bad .\r\n\r\n\n")
    assert parse_sst5(path) == [Example("fine .", "3"), Example("bad .", "1")]


def test_carer_header_is_optional_and_last_semicolon_splits(tmp_path):
    path = write(tmp_path / "raw.txt", "i feel; well, torn;love\n")
    assert parse_carer(path) == [Example("i feel; well, torn", "love")]
