"""The response-only SFT loss through the runner: equal to the plain HF loss and its gradients, each row cut
at its own depth (oracle: the row alone through HF with its cut's output detached), backward hooks that
see exactly the rows trained at each layer, and the logits never materialized whole."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_runner_rows import _detach_output
from tiny_models import tiny_model, tiny_tokenizer

from salf_engine.data.responses import ResponseExample, collate_responses, encode_responses
from salf_engine.errors import ConfigError
from salf_engine.evaluation.responses import answer_loss, exact_match
from salf_engine.runner.response_loss import response_loss
from salf_engine.runner.truncated import TruncatedRunner

EXAMPLES = [ResponseExample("how many city ?", "5 . 7 and 8"), ResponseExample("who is it ?", "he"),
            ResponseExample("where is the river ?", "in the city of the mountain")]


def _batch():
    enc = encode_responses(EXAMPLES, tiny_tokenizer(), max_length=32)
    return collate_responses(enc, [0, 1, 2], pad_id=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_full_depth_equals_the_plain_hf_loss_and_gradients(family):
    model = tiny_model(family, attn="eager")
    batch = _batch()
    model.zero_grad(set_to_none=True)
    want = model(**batch).loss  # HF's causal-LM loss: shifted, -100 ignored, mean over tokens
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = response_loss(TruncatedRunner(model), batch, 0, chunk_size=5, train_embeddings=True)
    got.mean.backward()
    assert got.tokens == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(got.mean.detach(), want.detach(), atol=1e-6, rtol=1e-5)
    assert set(_grads(model)) == set(want_grads)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want_grads[name], atol=2e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("depths", [[2, 0, 1], [4, 1, 3]])
def test_per_row_cuts_equal_each_row_alone_cut_by_a_detach_hook(depths):
    model = tiny_model("llama", attn="eager")
    batch = _batch()
    model.zero_grad(set_to_none=True)
    want_rows = []
    for r, depth in enumerate(depths):
        where = model.model.embed_tokens if depth == 0 else model.model.layers[depth - 1]
        hook = where.register_forward_hook(_detach_output)
        n = int(batch["attention_mask"][r].sum())
        try:
            logits = model(batch["input_ids"][r:r + 1, :n]).logits[0, :-1]
        finally:
            hook.remove()
        total = F.cross_entropy(logits, batch["labels"][r, 1:n], reduction="sum")
        total.backward()
        want_rows.append(total.item() / int((batch["labels"][r, 1:n] != -100).sum()))
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = response_loss(TruncatedRunner(model), batch, torch.tensor(depths), chunk_size=4)
    got.total.backward()
    assert got.rows.tolist() == pytest.approx(want_rows, rel=1e-5)
    assert set(_grads(model)) == set(want_grads)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, want_grads[name], atol=2e-6, rtol=1e-4, msg=name)


def test_backward_hooks_see_exactly_the_rows_trained_at_each_layer():
    model = tiny_model("qwen2")
    depths = [3, 0, 1]
    seen = [0] * 4
    for i, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(
            lambda mod, gi, go, i=i: seen.__setitem__(i, seen[i] + go[0].shape[0]))
    response_loss(TruncatedRunner(model), _batch(), depths).total.backward()
    assert seen == [sum(d <= i for d in depths) for i in range(4)]  # [1, 2, 2, 3]


def test_missing_batch_keys_are_named():
    batch = _batch()
    del batch["labels"]
    with pytest.raises(ConfigError, match=r"missing \['labels'\]"):
        response_loss(TruncatedRunner(tiny_model("llama")), batch, 0)


# ------------------------------------------------------------------------------------ evaluation


def test_answer_loss_is_the_token_weighted_hf_loss_over_all_rows():
    model = tiny_model("qwen2").train()
    enc = encode_responses(EXAMPLES, tiny_tokenizer(), max_length=32)
    got = answer_loss(model, enc, batch_size=2)  # batches of 2 and 1 rows
    with torch.no_grad():
        model.eval()
        want = model(**collate_responses(enc, [0, 1, 2], pad_id=0)).loss.item()  # one batch, mean over tokens
        model.train()
    assert got.loss == pytest.approx(want, rel=1e-5)
    assert got.tokens == sum(sum(y != -100 for y in row[1:]) for row in enc.targets) and got.rows == 3
    assert got.perplexity == pytest.approx(math.exp(want), rel=1e-5)
    assert model.training  # evaluated in eval mode, then restored


class _ScriptedLM(torch.nn.Module):
    """Stands in for ``generate``: records the prompts it is given and appends a scripted answer per row."""

    def __init__(self, answers):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers, self.calls = answers, []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids.clone(), attention_mask.clone(), kwargs))
        start = sum(len(c[0]) for c in self.calls[:-1])
        tails = [self.answers[start + r] for r in range(len(input_ids))]
        width = max(map(len, tails))
        tails = torch.tensor([t + [0] * (width - len(t)) for t in tails])
        return torch.cat([input_ids, tails], dim=1)


def test_exact_match_decodes_after_the_left_padded_prompt_and_compares_final_numbers():
    tok = tiny_tokenizer()
    examples = [ResponseExample("how many ?", "3 . 5"), ResponseExample("how many city ?", "7"),
                ResponseExample("how ?", "2")]
    enc = encode_responses(examples, tok, max_length=32)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    lm = _ScriptedLM([ids("it is 5"), ids("8"), ids("2 .")])
    got = exact_match(lm, tok, enc, [e.response for e in examples], batch_size=2)
    assert (got.correct, got.total) == (2, 3)  # 5 == 5, 8 != 7, 2 == 2
    first_ids, first_mask, kwargs = lm.calls[0]
    # the first batch: the prompts of rows 0 and 1, left-padded to the longer one
    assert first_ids[1].tolist() == ids("how many city ?") + ids("\n")
    assert first_mask[0].tolist() == [0] + [1] * len(ids("how many ?"))
    assert kwargs["do_sample"] is False and len(lm.calls) == 2
    assert got.samples[0] == ("3 . 5", "it is 5")
    fresh = _ScriptedLM([ids("5")])
    assert exact_match(fresh, tok, enc, [e.response for e in examples], rows=1).total == 1


def test_exact_match_shows_a_bar_over_the_decoded_rows(capsys):
    tok = tiny_tokenizer()
    enc = encode_responses(EXAMPLES, tok, max_length=32)
    exact_match(tiny_model("llama"), tok, enc, enc.responses, max_new_tokens=2, batch_size=2, progress=True,
                desc="zero-shot eval: greedy decode")
    err = capsys.readouterr().err
    assert "zero-shot eval: greedy decode" in err and "/3 [" in err, err  # a bar over the 3 rows
    exact_match(tiny_model("llama"), tok, enc, enc.responses, max_new_tokens=2)
    assert "greedy decode" not in capsys.readouterr().err
