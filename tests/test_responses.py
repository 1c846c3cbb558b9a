"""Prompt/response data for supervised fine-tuning: loading (GSM8K and generic files), response-only labels
with and without a chat template, truncation and dropping counted, right-padded batches, final numbers."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_tokenizer

from salf_engine.data.responses import (
    ResponseExample,
    collate_responses,
    encode_responses,
    final_number,
    load_gsm8k,
    load_responses,
)
from salf_engine.errors import DataError


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_rows_supervise_the_response_and_its_eos_only():
    tok = tiny_tokenizer()
    enc = encode_responses([ResponseExample("how many ?", "5 . 7")], tok, max_length=32)
    prompt, response = _ids(tok, "how many ?"), _ids(tok, "5 . 7")
    assert len(prompt) == 3 and len(response) == 3  # word-level: one token per word
    assert enc.input_ids == [prompt + response + [tok.eos_token_id]]
    assert enc.targets == [[-100] * 3 + response + [tok.eos_token_id]]
    assert (enc.truncated, enc.dropped, enc.source) == (0, 0, [0])


def test_chat_template_rows_put_the_turn_markup_in_the_prompt():
    tok = tiny_tokenizer()
    # a minimal template: "<s> question : {user} answer : " then "{assistant} </s>"
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}<s> question : {{ m.content }}"
                         "{% else %} answer : {{ m.content }} </s>{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %} answer :{% endif %}")
    enc = encode_responses([ResponseExample("who is it ?", "the city")], tok, max_length=32)
    assert enc.input_ids == [_ids(tok, "<s> question : who is it ? answer : the city </s>")]
    assert enc.targets[0] == [-100] * 9 + _ids(tok, "the city </s>")  # <s> question : who is it ? answer :
    plain = encode_responses([ResponseExample("who is it ?", "the city")], tok, max_length=32,
                             chat_template=False)
    assert plain.input_ids[0][:4] == _ids(tok, "who is it ?")


def test_long_rows_are_cut_and_counted_rows_without_room_are_dropped_and_counted():
    tok = tiny_tokenizer()
    examples = [ResponseExample("a b", "1 2 3 4"), ResponseExample("a b c d e f", "1"),
                ResponseExample("a", "1")]
    enc = encode_responses(examples, tok, max_length=5)
    # row 0: 2 + 5 tokens -> the first 5 (response cut); row 1: its prompt fills 5 -> dropped
    assert enc.input_ids == [_ids(tok, "a b 1 2 3"), _ids(tok, "a 1") + [tok.eos_token_id]]
    assert enc.targets[0] == [-100, -100] + _ids(tok, "1 2 3")
    assert (enc.truncated, enc.dropped, enc.source) == (1, 1, [0, 2])
    with pytest.raises(DataError, match="none of the 1 examples fits max_length=3"):
        encode_responses([ResponseExample("a b c", "1")], tok, max_length=3)


def test_collate_right_pads_and_masks_the_labels():
    tok = tiny_tokenizer()
    enc = encode_responses([ResponseExample("a", "1 2"), ResponseExample("a b c", "1")], tok, max_length=16)
    batch = collate_responses(enc, [0, 1], pad_id=0)
    assert batch["input_ids"].shape == (2, 5)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == [-100] + _ids(tok, "1 2") + [tok.eos_token_id, -100]
    assert batch["input_ids"][0, 4].item() == 0


def test_generic_files_and_gsm8k(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"q": "how many ?", "a": "2"}, {"q": "who ?", "a": "he"}]) + "\n\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"q": "what ?", "a": "it"}) + "\n")
    task = load_responses(tmp_path, prompt_column="q", response_column="a")
    assert task.splits["train"] == [ResponseExample("how many ?", "2"), ResponseExample("who ?", "he")]
    assert task.splits["test"] == [ResponseExample("what ?", "it")]
    with pytest.raises(DataError, match="has no column 'prompt'"):
        load_responses(tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"q": "how many ?", "a": ""}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl, row 1: empty 'a'"):
        load_responses(tmp_path, prompt_column="q", response_column="a")


def test_the_shared_gsm8k_reads_whole(shared_data):
    task = load_gsm8k(shared_data)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 7473, "test": 1319}
    assert task.splits["train"][0].response.endswith("#### 72")


@pytest.mark.parametrize("text,want", [
    ("so 48 + 24 = 72\n#### 72", "72"), ("#### 1,234", "1234"), ("#### -3.50", "-3.5"),
    ("the answer is 5 apples, not 6", "6"), ("#### 10.0", "10"), ("no number", None),
])
def test_final_number(text, want):
    assert final_number(text) == want


def test_collate_keeps_the_right_dtypes():
    enc = encode_responses([ResponseExample("a", "1")], tiny_tokenizer(), max_length=8)
    batch = collate_responses(enc, [0], pad_id=0)
    assert all(t.dtype == torch.long for t in batch.values())
