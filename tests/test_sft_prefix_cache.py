"""The prefix cache on prompt/response (SFT) tasks: the training forward and the answer loss of a run's
evaluations enter at the frozen floor with every real token (prompt and response) kept there.

Oracles: the same forward without a prefix (float64, logits-free loss and gradients); the recomputed run
(``--prefix-cache off``) for the weights; the same run without the evaluation cache for the answer losses;
a hand count of hits and misses; forward hooks counting the rows each layer runs.
"""

from __future__ import annotations

import pytest
import torch
from test_sft_training import _config, _prepared

from salf_engine.data.responses import collate_responses
from salf_engine.runner.prefix import FloorRows
from salf_engine.runner.response_loss import response_loss
from salf_engine.runner.truncated import TruncatedRunner
from salf_engine.training import recipe
from salf_engine.training.eval_prefix import EvalPrefix

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, N_EVAL = 24, 6  # test_sft_training's tiny task: 24 training and 6 evaluation problems


def _left(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows padded on the left (each row's real tokens moved to the end)."""
    out = {k: v.clone() for k, v in batch.items()}
    for r, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        for k, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            out[k][r] = pad
            out[k][r, -n:] = batch[k][r, :n]
    return out


def _loss_and_grads(runner, model, batch, prefix):
    model.zero_grad()
    out = response_loss(runner, batch, 2, prefix=prefix)
    out.total.backward()
    return out.total.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_cached_rows_give_the_recomputed_loss_and_gradients(family, padding_side):
    """One SFT forward at cut 2, float64: rows computed, all cached, half cached give the same loss and
    gradients to 1e-10; right-padded, also those of the forward without any prefix (the engine's collate)."""
    p = _prepared(_config("bot50"), family=family)
    model = p.model.double()
    for i, layer in enumerate(model.model.layers):
        layer.requires_grad_(i >= 2)
    model.model.embed_tokens.requires_grad_(False)
    runner = TruncatedRunner(model)
    batch = collate_responses(p.train_split, [0, 5, 9, 13], pad_id=0)
    if padding_side == "left":
        batch = _left(batch)
    computed = FloorRows(2, [None] * 4)
    ref_loss, ref_grads = _loss_and_grads(runner, model, batch, computed)
    assert all(w is not None for w in computed.written)
    n = batch["attention_mask"].sum(1).tolist()
    assert [w.shape[0] for w in computed.written] == n  # every real token, prompt and response
    for cached in (computed.written, [computed.written[0], None, computed.written[2], None]):
        loss, grads = _loss_and_grads(runner, model, batch, FloorRows(2, list(cached)))
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-10)
        assert grads.keys() == ref_grads.keys() and grads
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-10, msg=name)
    if padding_side == "right":
        plain_loss, plain_grads = _loss_and_grads(runner, model, batch, None)
        torch.testing.assert_close(plain_loss, ref_loss, rtol=0, atol=1e-10)
        for name, g in plain_grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-10, msg=name)


def _run(monkeypatch, strategy: str, where: str, *, eval_cache: bool = True, family: str = "llama",
         dtype=torch.float32, **kw):
    """Three epochs of ``strategy`` on the tiny prompt/response task (zero-shot, after each epoch and final
    evaluations, answer loss only), with forward hooks counting the rows each layer runs in training mode
    and in eval mode; ``eval_cache=False``: the same run without the evaluation cache."""
    cfg = _config(strategy, epochs=3, lr=1e-3, prefix_cache=where, zero_shot_eval=True, eval_every_epoch=True,
                  exact_match_rows=0, eval_batch_size=4, **kw)
    p = _prepared(cfg, family=family)
    p.model.to(dtype)
    if not eval_cache:
        monkeypatch.setattr(recipe, "plan_eval_prefix", lambda *a, **k: None)
    rows = {"train": [0] * 4, "eval": [0] * 4}
    for i, layer in enumerate(p.model.model.layers):
        def hook(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows["train" if module.training else "eval"][i] += hidden.shape[0]
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    lines: list[str] = []
    summary = recipe.train(cfg, progress=False, log=lines.append, prepared=p)
    monkeypatch.undo()
    return summary, {n: q.detach().clone() for n, q in p.model.named_parameters()}, rows, lines, p


def _answer_losses(summary) -> list[float]:
    """Zero-shot, after epochs 1 and 2, final (the last entry of ``epochs``)."""
    losses = [summary["zero_shot"]["answer_loss"]] + [e["answer_loss"] for e in summary["epochs"]]
    assert len(losses) == 4 and losses[-1] == summary["fine_tuned"]["answer_loss"]
    return losses


@pytest.mark.parametrize(("strategy", "kw"), [("bot50", {}), ("lora-half", {"lora_dropout": 0.0})])
def test_sft_cached_training_equals_off(monkeypatch, strategy, kw):
    """The issue's check on a prompt/response task: BOT50 and LoRA[half], three epochs, --prefix-cache memory
    against off: the same weights to 1e-5 (float32); 24 misses in epoch 1, then 48 hits (the hand count);
    the kept bytes are every real token's; hooks show the layers below the floor (2) run each training row
    once (24 rows), against three times (72) without the cache, the layers above 72 rows either way."""
    off, ref, off_rows, off_lines, _ = _run(monkeypatch, strategy, "off", **kw)
    got, weights, rows, lines, p = _run(monkeypatch, strategy, "memory", **kw)
    for name, q in weights.items():
        torch.testing.assert_close(q, ref[name], rtol=0, atol=1e-5, msg=name)
    tokens = sum(map(len, p.train_split.input_ids))
    assert got["prefix_cache"] == {"where": "memory", "bytes": tokens * 64 * 4, "floor": 2, "hits": 48,
                                   "misses": 24, "skipped_layer_forwards": 96}
    assert off["prefix_cache"]["where"] == "off" and "prefix cache: off (--prefix-cache off)" in off_lines
    assert [line for line in lines if line.startswith("prefix cache:")] == [
        f"prefix cache: in memory, the hidden states at layer 2 (of 4) of {N_TRAIN} training examples, "
        f"{tokens * 256} bytes ({tokens * 256 / 2**20:.1f} MiB); the layers below it run once per example"]
    assert off_rows["train"] == [3 * N_TRAIN] * 4
    assert rows["train"] == [N_TRAIN, N_TRAIN, 3 * N_TRAIN, 3 * N_TRAIN]
    # the evaluations: the answer losses within float32 of the recomputed run's
    assert _answer_losses(got) == pytest.approx(_answer_losses(off), rel=1e-5)


def test_sft_cached_training_equals_off_in_float64(monkeypatch):
    """BOT50 in float64 through train(): the cached run's weights equal the recomputed run's to 1e-10 (right
    padding: the same positions either way), with the hand count."""
    _, ref, _, _, _ = _run(monkeypatch, "bot50", "off", dtype=torch.float64)
    got, weights, _, _, _ = _run(monkeypatch, "bot50", "memory", dtype=torch.float64)
    for name, q in weights.items():
        assert q.dtype == torch.float64
        torch.testing.assert_close(q, ref[name], rtol=0, atol=1e-10, msg=name)
    assert (got["prefix_cache"]["hits"], got["prefix_cache"]["misses"]) == (48, 24)


@pytest.mark.parametrize(("strategy", "kw"), [("bot50", {}), ("lora-half", {"lora_dropout": 0.0})])
def test_sft_answer_losses_equal_without_the_eval_cache(monkeypatch, strategy, kw):
    """Four evaluations (zero-shot, after each epoch, final): each answer loss is identical to that of the
    same run without the evaluation cache; the layers below the floor run each evaluation row once (6), the
    layers above at every evaluation (24); 18 hits and 6 misses."""
    got, _, rows, lines, p = _run(monkeypatch, strategy, "memory", **kw)
    ref, _, ref_rows, _, _ = _run(monkeypatch, strategy, "memory", eval_cache=False, **kw)
    assert _answer_losses(got) == _answer_losses(ref)  # right padding: the same kernels on the same rows
    assert [got["zero_shot"]["answer_tokens"], got["fine_tuned"]["answer_tokens"]] == \
        [ref["zero_shot"]["answer_tokens"], ref["fine_tuned"]["answer_tokens"]]
    assert ref_rows["eval"] == [4 * N_EVAL] * 4
    assert rows["eval"] == [N_EVAL, N_EVAL, 4 * N_EVAL, 4 * N_EVAL]
    tokens = sum(map(len, p.eval_split.input_ids))
    assert got["eval_prefix_cache"] == {"where": "memory", "bytes": tokens * 64 * 4, "floor": 2,
                                        "hits": 3 * N_EVAL, "misses": N_EVAL}
    assert [line for line in lines if line.startswith("eval prefix cache: in memory")]


def test_eval_prefix_answer_loss_equals_the_plain_one():
    """EvalPrefix.response_loss at floor 2: first every row computed, then every row from its kept states,
    gives the plain answer loss (depth 0, no prefix) per batch, float32."""
    p = _prepared(_config("bot50"))
    model = p.model.eval()
    prefix = EvalPrefix(model, len(p.train_split))
    runner = TruncatedRunner(model)
    batches = [[0, 3, 7, 11], [1, 2, 20], [5, 23]]
    for visit in range(2):
        prefix.begin(2)
        for idx in batches:
            b = collate_responses(p.train_split, idx, pad_id=0)
            with torch.no_grad():
                want = response_loss(runner, b, 0)
            got = prefix.response_loss(idx, b)
            assert got.tokens == want.tokens
            torch.testing.assert_close(got.total, want.total, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got.rows, want.rows, rtol=1e-6, atol=1e-6)
        assert (prefix.cache.hits, prefix.cache.misses) == ((0, 9) if visit == 0 else (9, 9))


def test_salf_trainer_prompt_response_rows_cached_equals_off(tmp_path):
    """SalfTrainer takes prompt/response rows as HF causal-LM rows (the prompt's labels -100) through the same
    patched forward as any other: BOT50, three epochs of the 24 tiny problems, salf_config.prefix_cache memory
    against off gives the same weights to 1e-5 (float32), 48 hits and 24 misses."""
    from test_hf import _args

    from salf_engine.integrations.hf import SalfTrainer

    weights, caches = {}, {}
    for where in ("off", "memory"):
        cfg = _config("bot50", prefix_cache=where, lr=1e-3)
        p = _prepared(cfg, family="llama")
        rows = [{"input_ids": list(ids), "labels": list(y)}
                for ids, y in zip(p.train_split.input_ids, p.train_split.targets, strict=True)]
        trainer = SalfTrainer(model=p.model, args=_args(tmp_path / where, max_steps=-1, num_train_epochs=3,
                                                       learning_rate=1e-3),
                              train_dataset=rows, salf_strategy="bot50", salf_config=cfg)
        trainer.train()
        weights[where] = {n: q.detach().clone() for n, q in p.model.named_parameters()}
        caches[where] = trainer.salf_prefix_summary
    for name, q in weights["memory"].items():
        torch.testing.assert_close(q, weights["off"][name], rtol=0, atol=1e-5, msg=name)
    assert caches["off"]["where"] == "off"
    assert {k: caches["memory"][k] for k in ("where", "floor", "hits", "misses")} == {
        "where": "memory", "floor": 2, "hits": 48, "misses": 24}


def test_sft_rising_floor_cached_equals_off(monkeypatch):
    """SALF's rising schedule on the tiny prompt/response task: 18 steps of 4, the floor 4s // 18 at step s
    (0 for steps 0-4). Hand count: epoch 1 keeps the 4 rows of step 5 (4 misses); epoch 2 meets them again
    (4 hits) and misses the other 20; epoch 3 hits all 24: 28 hits, 24 misses. Layer 0 runs 20 rows at
    floor 0, then each miss once: 44. The weights and the answer losses equal the recomputed run's."""
    rising = {"budget": "uniform", "depth_schedule": "rising"}
    off, ref, off_rows, _, _ = _run(monkeypatch, "salf", "off", **rising)
    got, weights, rows, _, _ = _run(monkeypatch, "salf", "memory", **rising)
    for name, q in weights.items():
        torch.testing.assert_close(q, ref[name], rtol=0, atol=1e-5, msg=name)
    assert {k: got["prefix_cache"][k] for k in ("floor", "hits", "misses")} == {"floor": 3, "hits": 28,
                                                                               "misses": 24}
    assert (rows["train"][0], off_rows["train"][0]) == (44, 72)
    assert _answer_losses(got) == pytest.approx(_answer_losses(off), rel=1e-5)
