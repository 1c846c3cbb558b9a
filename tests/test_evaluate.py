"""Accuracy / macro-F1 against hand-computed confusion matrices, and evaluate() on a tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from salf_engine.evaluation.classification import confusion_matrix, evaluate, score_predictions

pytestmark = pytest.mark.usefixtures("one_thread")


def test_confusion_matrix_other_column():
    cm = confusion_matrix([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, -1, 2], 3)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]


def test_scores_with_non_label_prediction():
    # gold A A A B B C; free decoding predicted A A B B <other> C
    # A: tp 2, predicted 2 -> P 1, R 2/3, F1 0.8
    # B: tp 1, predicted 2 -> P 0.5, R 0.5, F1 0.5  (the <other> is a false negative of B)
    # C: tp 1, predicted 1 -> P 1, R 1, F1 1        (the <other> is nobody's false positive)
    s = score_predictions([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, -1, 2], ["A", "B", "C"])
    assert s.accuracy == pytest.approx(4 / 6)
    assert [c.precision for c in s.per_class] == pytest.approx([1.0, 0.5, 1.0])
    assert [c.recall for c in s.per_class] == pytest.approx([2 / 3, 0.5, 1.0])
    assert [c.f1 for c in s.per_class] == pytest.approx([0.8, 0.5, 1.0])
    assert [c.support for c in s.per_class] == [3, 2, 1]
    assert s.macro_f1 == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert s.non_label == 1


def test_scores_all_correct_and_all_wrong():
    s = score_predictions([0, 1, 2, 1], [0, 1, 2, 1], ["a", "b", "c"])
    assert s.accuracy == 1.0 and s.macro_f1 == 1.0
    s = score_predictions([0, 1], [-1, -1], ["a", "b"])
    assert s.accuracy == 0.0 and s.macro_f1 == 0.0 and s.non_label == 2


def test_macro_f1_absent_and_unsupported_classes():
    # gold A A, predicted A B; class C never occurs -> left out of the mean.
    # A: P 1, R 0.5, F1 2/3; B: predicted once with no support -> P 0, R 0, F1 0.
    s = score_predictions([0, 0], [0, 1], ["A", "B", "C"])
    assert s.per_class[0].f1 == pytest.approx(2 / 3)
    assert s.per_class[1].f1 == 0.0 and s.per_class[1].support == 0
    assert s.macro_f1 == pytest.approx(1 / 3)


def test_macro_f1_imbalanced_hand_example():
    # 3 classes, confusion rows (gold) x cols (pred):
    #   [[5, 1, 0], [2, 3, 1], [0, 0, 4]]
    gold = [0] * 6 + [1] * 6 + [2] * 4
    pred = [0] * 5 + [1] + [0] * 2 + [1] * 3 + [2] + [2] * 4
    s = score_predictions(gold, pred, ["x", "y", "z"])
    p = [5 / 7, 3 / 4, 4 / 5]
    r = [5 / 6, 3 / 6, 4 / 4]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, r, strict=True)]
    assert [c.f1 for c in s.per_class] == pytest.approx(f1)
    assert s.macro_f1 == pytest.approx(sum(f1) / 3)
    assert s.accuracy == pytest.approx(12 / 16)


def _tiny_split(tok, n=12, seed=0):
    from salf_engine.data import EncodedSplit

    g = torch.Generator().manual_seed(seed)
    words = ["what", "who", "where", "city", "name", "year", "the", "is", "river", "many"]
    ids, labels = [], []
    for _ in range(n):
        length = int(torch.randint(2, 9, (1,), generator=g))
        toks = [words[int(i)] for i in torch.randint(0, len(words), (length,), generator=g)]
        ids.append(tok.convert_tokens_to_ids(toks + ["answer", ":"]))
        labels.append(int(torch.randint(0, 3, (1,), generator=g)))
    return EncodedSplit(input_ids=ids, labels=labels)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_evaluate_matches_independent_argmax(family):
    from tiny_models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(family, seed=3)
    split = _tiny_split(tok)
    classes = ["human", "location", "number"]
    label_ids = torch.tensor(tok.convert_tokens_to_ids(classes))
    # A random model rarely predicts a label token: make one label the favourite of some prompts by
    # checking the real top tokens and declaring them labels, so both decodings are exercised.
    with torch.no_grad():
        tops = [int(model(torch.tensor([x])).logits[0, -1].argmax()) for x in split.input_ids]
    label_ids[0] = tops[0]
    verb = SimpleNamespace(label_token_ids=label_ids, classes=classes)

    report = evaluate(model, tok, split, verb, batch_size=5, progress=False)

    free, restricted = [], []
    with torch.no_grad():
        for x in split.input_ids:
            logits = model(torch.tensor([x])).logits[0, -1]
            t = int(logits.argmax())
            free.append(label_ids.tolist().index(t) if t in label_ids.tolist() else -1)
            restricted.append(int(logits[label_ids].argmax()))
    assert report.free_predictions == free
    assert report.restricted_predictions == restricted
    assert any(p >= 0 for p in free) and any(p < 0 for p in free)
    assert report.free.accuracy == pytest.approx(
        sum(p == y for p, y in zip(free, split.labels, strict=True)) / len(free))
    assert report.restricted.accuracy == pytest.approx(
        sum(p == y for p, y in zip(restricted, split.labels, strict=True)) / len(free))
    d = report.to_dict()
    assert set(d["free"]) >= {"accuracy", "macro_f1", "per_class"}
    assert "label-restricted" in report.to_text()
