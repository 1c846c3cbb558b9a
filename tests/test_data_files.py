"""Generic local datasets (CSV / TSV / JSONL / Parquet) through the `datasets` library."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tiny_models import tiny_tokenizer

from salf_engine.data import Example, Verbalizer, encode_split, load_task
from salf_engine.errors import DataError

ROWS = [
    {"sentence": 'a "quoted", comma text', "other": "second one", "label": "pos"},
    {"sentence": "tab\tinside and ünïcödé", "other": "NA", "label": "neg"},
    {"sentence": "NA", "other": "third", "label": "pos"},
    {"sentence": "line\nbreak", "other": "", "label": "neutral"},
]
EXPECTED = [Example(r["sentence"], r["label"], r["other"]) for r in ROWS]


def write(frame: pd.DataFrame, path, fmt: str):
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_single_file_round_trip(tmp_path, fmt):
    path = write(pd.DataFrame(ROWS), tmp_path / f"data.{fmt}", fmt)
    task = load_task(str(path), text_column="sentence", text_pair_column="other")
    assert list(task.splits) == ["train"]
    assert task.splits["train"] == EXPECTED
    assert task.classes == ["neg", "neutral", "pos"]
    assert task.label_words == {"neg": "neg", "neutral": "neutral", "pos": "pos"}
    assert task.template.has_pair
    assert task.name == "data"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_directory_with_splits_and_integer_labels(tmp_path, fmt):
    train = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [10, 2, 1, 2]})
    write(train, tmp_path / f"train.{fmt}", fmt)
    write(pd.DataFrame({"text": ["e"], "label": [1]}), tmp_path / f"test.{fmt}", fmt)
    write(pd.DataFrame({"text": ["f", "g"], "label": [10, 2]}), tmp_path / f"dev.{fmt}", fmt)
    task = load_task(str(tmp_path))
    assert {s: len(v) for s, v in task.splits.items()} == {"train": 4, "test": 1, "validation": 2}
    assert task.classes == ["1", "2", "10"]  # numeric order, not string order
    assert task.splits["train"][0] == Example("a", "10")
    assert task.splits["validation"] == [Example("f", "10"), Example("g", "2")]
    assert not task.template.has_pair
    assert task.template.render(task.splits["test"][0]) == "Text: e\nLabel:"


def test_relative_path_under_data_dir(tmp_path):
    write(pd.DataFrame({"text": ["x"], "label": ["y"]}), tmp_path / "mine.csv", "csv")
    assert load_task("mine.csv", tmp_path).splits["train"] == [Example("x", "y")]


def test_label_words_fix_class_order_and_encode(tmp_path):
    path = write(
        pd.DataFrame({"text": ["good movie", "bad film", "the film"], "label": ["p", "n", "p"]}),
        tmp_path / "d.jsonl",
        "jsonl",
    )
    task = load_task(str(path), label_words={"p": "good", "n": "bad"})
    assert task.classes == ["p", "n"]
    tok = tiny_tokenizer()
    verbalizer = Verbalizer(task.classes, task.label_words, tok)
    encoded = encode_split(task, tok, "train", verbalizer)
    assert encoded.labels == [0, 1, 0]
    assert encoded.input_ids[1] == tok("Text: bad film\nLabel:", add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match=r"row 2: label 'n' is not a known class \(classes from the given"):
        load_task(str(path), label_words={"p": "good"})


def test_generic_labels_clash_with_tiny_tokenizer(tmp_path):
    path = write(pd.DataFrame({"text": ["a", "b"], "label": ["spam", "ham"]}), tmp_path / "d.csv", "csv")
    task = load_task(str(path))
    with pytest.raises(DataError, match="classes 'ham' and 'spam' clash"):
        Verbalizer(task.classes, task.label_words, tiny_tokenizer())


# ---------------------------------------------------------------- bad input


def test_missing_column_lists_available(tmp_path):
    path = write(pd.DataFrame(ROWS), tmp_path / "d.csv", "csv")
    with pytest.raises(
        DataError, match=r"d.csv has no column 'text'; available columns: sentence, other, label"
    ):
        load_task(str(path))
    with pytest.raises(DataError, match=r"has no column 'pair'"):
        load_task(str(path), text_column="sentence", text_pair_column="pair")
    with pytest.raises(DataError, match=r"has no column 'y'"):
        load_task(str(path), text_column="sentence", label_column="y")


def test_missing_path_and_bad_extension(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset .*nope.csv.*not a preset \(trec, sst5"):
        load_task(str(tmp_path / "nope.csv"))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.xlsx'; expected one of .csv, .tsv"):
        load_task(str(tmp_path / "d.xlsx"))


def test_directory_without_test_split(tmp_path):
    write(pd.DataFrame({"text": ["x"], "label": ["y"]}), tmp_path / "train.csv", "csv")
    with pytest.raises(DataError, match=r"no test file; a dataset directory must hold train.<csv|.*test.<"):
        load_task(str(tmp_path))
    write(pd.DataFrame({"text": ["x"], "label": ["y"]}), tmp_path / "test.csv", "csv")
    write(pd.DataFrame({"text": ["x"], "label": ["y"]}), tmp_path / "test.jsonl", "jsonl")
    with pytest.raises(DataError, match="several files for the test split: test.csv, test.jsonl"):
        load_task(str(tmp_path))


@pytest.mark.parametrize(("name", "content"), [("e.csv", "text,label\n"), ("e.jsonl", ""), ("e.tsv", "")])
def test_empty_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{name} is empty \(no rows\)"):
        load_task(str(tmp_path / name))


def test_missing_values_name_the_row(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": "x"}, {"text": None, "label": "x"}, {"text": "c", "label": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl, row 2: missing text in column 'text'"):
        load_task(str(path))
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\na,x\nb,\n")
    with pytest.raises(DataError, match=r"d.csv, row 2: missing label in column 'label'"):
        load_task(str(csv_path))


def test_label_outside_training_classes(tmp_path):
    write(pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}), tmp_path / "train.csv", "csv")
    write(pd.DataFrame({"text": ["c", "d"], "label": ["x", "z"]}), tmp_path / "test.csv", "csv")
    with pytest.raises(DataError, match=r"test.csv, row 2: label 'z' is not a known class.*train.csv: x, y"):
        load_task(str(tmp_path))


def test_unreadable_file(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match="could not read .*d.parquet as parquet"):
        load_task(str(path))
