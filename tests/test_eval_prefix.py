"""The evaluation prefix cache (issue 37, item 5): a run's evaluations run the frozen bottom once per example.

Oracles: the plain HF forward (``classification.predict_medium_logits``) for the runner path's logits, the
same run without the evaluation cache for the scores, and forward hooks counting the evaluation rows each
layer runs."""

from __future__ import annotations

import pytest
import torch
from test_prefix_cache import _shorten, _varied
from test_train import _pattern_task

from salf_engine.config import TrainConfig
from salf_engine.data import collate, encode_split
from salf_engine.evaluation import classification
from salf_engine.schedule.strategies import make_strategy
from salf_engine.training import recipe
from salf_engine.training.eval_prefix import EvalPrefix, eval_floor


def _prepared(family: str = "llama", **overrides):
    """The varied pattern task, its evaluation questions also of 1 to 5 words (padding matters)."""
    cfg = TrainConfig(model="tiny", dataset="pattern", **{
        "strategy": "bot50", "lr": 1e-3, "batch_size": 4, "epochs": 3, "warmup_ratio": 0.0,
        "zero_shot_eval": True, "eval_every_epoch": True, "eval_batch_size": 5, "deviation_impl": "torch",
        **overrides}).validate()
    p = _varied(family, cfg)
    task = _pattern_task()
    _shorten(task.splits["test"], seed=2)
    p.task = task
    p.train_split = encode_split(task, p.tokenizer, "train", p.verbalizer)
    p.eval_split = encode_split(task, p.tokenizer, "test", p.verbalizer)
    return cfg, p


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_runner_path_gives_the_plain_forwards_logits(family):
    """The evaluation's forward through the runner at floor 2 (every row computed, then every row from its
    kept states) gives the plain HF forward's last-token logits exactly, left padding, float32."""
    _, p = _prepared(family)
    model = p.model.eval()
    prefix = EvalPrefix(model, len(p.eval_split))
    order = sorted(range(len(p.eval_split)), key=lambda i: len(p.eval_split.input_ids[i]))
    batches = [order[s:s + 5] for s in range(0, len(order), 5)]
    for visit in range(2):
        prefix.begin(2)
        for idx in batches:
            b = collate(p.eval_split, idx, 0, padding_side="left")
            ref = classification.predict_medium_logits(model, b["input_ids"], b["attention_mask"])
            got = prefix.logits(idx, b["input_ids"], b["attention_mask"])
            torch.testing.assert_close(got, ref, rtol=0, atol=0)  # the same kernels on the same shapes
        n = len(p.eval_split)
        assert (prefix.cache.hits, prefix.cache.misses) == ((0, n) if visit == 0 else (n, n))


def test_a_changed_bottom_drops_the_kept_rows():
    """A weight below the kept layer that changed between two evaluations: every kept row goes (one line
    says so), the rows run the bottom again and give the changed model's logits."""
    _, p = _prepared()
    model = p.model.eval()
    said: list[str] = []
    prefix = EvalPrefix(model, len(p.eval_split), said.append)
    idx = list(range(6))
    b = collate(p.eval_split, idx, 0, padding_side="left")
    prefix.begin(2)
    prefix.logits(idx, b["input_ids"], b["attention_mask"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    prefix.begin(2)
    got = prefix.logits(idx, b["input_ids"], b["attention_mask"])
    assert said == ["eval prefix cache: layer 1 changed since the kept states were computed; recomputing"]
    assert (prefix.cache.hits, prefix.cache.misses) == (0, 12)
    ref = classification.predict_medium_logits(model, b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    prefix.begin(2)  # unchanged since: the rows stay
    prefix.logits(idx, b["input_ids"], b["attention_mask"])
    assert (prefix.cache.hits, prefix.cache.misses) == (6, 12)


def test_eval_floor_is_the_next_steps():
    """A static freeze's floor at every evaluation; full fine-tuning's 0; the final evaluation (after the
    last step) takes the last step's."""
    bot = make_strategy("bot50")
    bot.begin(4, 12)
    full = make_strategy("full")
    full.begin(4, 12)
    assert [eval_floor(bot, s, 9) for s in (0, 3, 9)] == [2, 2, 2]
    assert [eval_floor(full, s, 9) for s in (0, 3, 9)] == [0, 0, 0]


def _run(monkeypatch, *, eval_cache: bool, **overrides):
    """A run of the varied task with forward hooks counting, per layer, the evaluation rows it ran (eval
    mode), and every evaluation's logits (its batches in order); ``eval_cache=False``: the same run without
    the evaluation cache (the training cache as configured)."""
    cfg, p = _prepared(**overrides)
    if not eval_cache:
        monkeypatch.setattr(recipe, "plan_eval_prefix", lambda *a, **k: None)
    rows = [0] * 4
    for i, layer in enumerate(p.model.model.layers):
        def hook(module, args, kwargs, i=i):
            if not module.training:
                rows[i] += args[0].shape[0] if args else kwargs["hidden_states"].shape[0]
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    logits: list[list[torch.Tensor]] = []
    plain, through = classification.predict_medium_logits, EvalPrefix.logits
    evaluate = classification.evaluate

    def counting_evaluate(*a, **k):
        logits.append([])
        return evaluate(*a, **k)

    def record(out):
        logits[-1].append(out)
        return out

    monkeypatch.setattr(classification, "evaluate", counting_evaluate)
    monkeypatch.setattr(classification, "predict_medium_logits",
                        lambda model, ids, mask: record(plain(model, ids, mask)))
    monkeypatch.setattr(EvalPrefix, "logits",
                        lambda self, idx, ids, mask: record(through(self, idx, ids, mask)))
    lines: list[str] = []
    summary = recipe.train(cfg, progress=False, log=lines.append, prepared=p)
    monkeypatch.undo()
    return summary, rows, logits, lines


def test_bot50_evaluations_equal_without_the_cache_and_run_the_bottom_once(monkeypatch):
    """BOT50, zero-shot + after each epoch + final: the scores equal those of the same run without the
    evaluation cache (float32), and the layers below the floor (2) run each evaluation row once over the
    four evaluations; the layers above run it four times."""
    got, rows, logits, lines = _run(monkeypatch, eval_cache=True)
    ref, ref_rows, ref_logits, _ = _run(monkeypatch, eval_cache=False)
    n = 24
    assert (got["zero_shot"], got["fine_tuned"]) == (ref["zero_shot"], ref["fine_tuned"])
    untimed = [[{k: v for k, v in e.items() if k != "train_seconds"} for e in s["epochs"]]
               for s in (got, ref)]
    assert untimed[0] == untimed[1]
    assert len(got["epochs"]) == 3 and len(logits) == len(ref_logits) == 4
    for mine, theirs in zip(logits, ref_logits, strict=True):  # the same batches in the same order
        torch.testing.assert_close(torch.cat(mine), torch.cat(theirs), rtol=0, atol=1e-6)
    assert ref_rows == [4 * n] * 4
    assert rows == [n, n, 4 * n, 4 * n]
    assert got["eval_prefix_cache"] == {"where": "memory", "bytes": got["eval_prefix_cache"]["bytes"],
                                        "floor": 2, "hits": 3 * n, "misses": n}
    tokens = sum(map(len, _prepared()[1].eval_split.input_ids))
    assert got["eval_prefix_cache"]["bytes"] == tokens * 64 * 4
    said = [line for line in lines if line.startswith("eval prefix cache:")]
    assert said == [f"eval prefix cache: in memory, the hidden states at layer 2 (of 4) of {n} evaluation "
                    f"examples, {tokens * 256} bytes ({tokens * 256 / 2**20:.1f} MiB); the layers below it "
                    "run once per example, not again in later evaluations"]


@pytest.mark.parametrize("overrides, reason", [
    ({"strategy": "full"}, "strategy 'full' has floor 0"),
    ({"prefix_cache": "off"}, "--prefix-cache off"),
])
def test_where_it_must_be_off_the_bottom_runs_every_time(monkeypatch, overrides, reason):
    """Full fine-tuning (floor 0) and ``--prefix-cache off``: no evaluation cache (one line says why), every
    layer runs every evaluation row at each of the four evaluations."""
    summary, rows, _, lines = _run(monkeypatch, eval_cache=True, **overrides)
    assert rows == [4 * 24] * 4
    assert summary["eval_prefix_cache"] is None
    said = [line for line in lines if line.startswith("eval prefix cache:")]
    assert len(said) == 1 and said[0].startswith("eval prefix cache: off (") and reason in said[0]


def test_one_evaluation_keeps_nothing(monkeypatch):
    """Only the final evaluation: nothing to reuse, no cache and nothing said."""
    summary, rows, _, lines = _run(monkeypatch, eval_cache=True, zero_shot_eval=False, eval_every_epoch=False)
    assert rows == [24] * 4 and summary["eval_prefix_cache"] is None
    assert not [line for line in lines if line.startswith("eval prefix cache:")]


def test_lora_half_evaluations_equal_without_the_cache(monkeypatch):
    """LoRA[half] (adapters from layer 2; the final evaluation with every parameter trainable again): the
    scores and logits of the run without the evaluation cache, the bottom run once per evaluation row."""
    got, rows, logits, _ = _run(monkeypatch, eval_cache=True, strategy="lora-half")
    ref, ref_rows, ref_logits, _ = _run(monkeypatch, eval_cache=False, strategy="lora-half")
    assert (got["zero_shot"], got["fine_tuned"]) == (ref["zero_shot"], ref["fine_tuned"])
    for mine, theirs in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(torch.cat(mine), torch.cat(theirs), rtol=0, atol=1e-6)
    assert (rows, ref_rows) == ([24, 24, 96, 96], [96] * 4)
    assert (got["eval_prefix_cache"]["hits"], got["eval_prefix_cache"]["misses"]) == (72, 24)


def test_rising_floor_evaluations_follow_the_floor(monkeypatch):
    """SALF's rising schedule (the floor is step // 9 of 36 steps): the zero-shot evaluation at floor 0 keeps
    nothing; after epoch 1 (floor 1) every row runs layer 0 and is kept at 1; after epoch 2 (floor 2) it
    runs layer 1 only; the final evaluation (floor 3) runs layer 2 only. The logits equal the run's without
    the evaluation cache."""
    rising = {"strategy": "salf", "budget": "uniform", "depth_schedule": "rising"}
    got, rows, logits, lines = _run(monkeypatch, eval_cache=True, **rising)
    ref, _, ref_logits, _ = _run(monkeypatch, eval_cache=False, **rising)
    assert (got["zero_shot"], got["fine_tuned"]) == (ref["zero_shot"], ref["fine_tuned"])
    for mine, theirs in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(torch.cat(mine), torch.cat(theirs), rtol=0, atol=1e-6)
    assert rows == [48, 72, 96, 96]
    assert got["eval_prefix_cache"] == {"where": "memory", "bytes": got["eval_prefix_cache"]["bytes"],
                                        "floor": 3, "hits": 48, "misses": 24}
    said = [line for line in lines if line.startswith("eval prefix cache:")]
    assert len(said) == 1 and "at each evaluation's floor (at most 3 of 4)" in said[0]
