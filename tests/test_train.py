"""The training loop on tiny models: loss falls, reproducible, accumulation, bf16, LoRA, run dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from salf_engine.config import TrainConfig
from salf_engine.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _pattern_task(n_train: int = 48, n_test: int = 24):
    """A learnable task: the class is the first word (who -> human, where -> location, how -> number)."""
    from salf_engine.data import Example, PromptTemplate, TaskData

    g = torch.Generator().manual_seed(0)
    cue = {"human": "who", "location": "where", "number": "how"}
    filler = ["the", "a", "city", "river", "name", "year", "big", "small", "of", "is"]
    classes = list(cue)

    def make(n):
        out = []
        for i in range(n):
            cls = classes[i % 3]
            words = [filler[int(j)] for j in torch.randint(0, len(filler), (4,), generator=g)]
            out.append(Example(text=" ".join([cue[cls], *words]), label=cls))
        return out

    return TaskData(name="pattern", classes=classes, splits={"train": make(n_train), "test": make(n_test)},
                    template=PromptTemplate("question : {text} answer :"),
                    label_words={c: c for c in classes})


def _prepared(family: str, config: TrainConfig, *, seed: int = 0):
    """Everything `train` needs, built from a tiny in-memory model + the pattern task (no files)."""
    from tiny_models import tiny_model, tiny_tokenizer

    from salf_engine.data import Verbalizer, encode_split
    from salf_engine.schedule.strategies import strategy_from_config
    from salf_engine.training.inputs import Prepared

    tok = tiny_tokenizer()
    model = tiny_model(family, seed=seed)
    task = _pattern_task()
    verb = Verbalizer(task.classes, task.label_words, tok)
    return Prepared(
        config=config, strategy=strategy_from_config(config),
        device=torch.device("cpu"), task=task, model=model, tokenizer=tok, verbalizer=verb,
        train_split=encode_split(task, tok, "train", verb), eval_split=encode_split(task, tok, "test", verb),
        load_seconds=0.0, out_dir=Path(config.output) if config.output else None,
    )


def _run(family="llama", **overrides):
    from salf_engine.training.recipe import train

    cfg = TrainConfig(model="tiny", dataset="pattern", **{
        "strategy": "full", "lr": 1e-3, "batch_size": 4, "max_steps": 12, "warmup_ratio": 0.0,
        "weight_decay": 0.0, "zero_shot_eval": False, "deviation_impl": "torch", **overrides}).validate()
    return train(cfg, progress=False, log=None, prepared=_prepared(family, cfg))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_loss_falls(family):
    s = _run(family, max_steps=24)
    losses = s["loss_history"]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    # the cue word decides the class: well above chance (1/3) after training
    assert s["fine_tuned"]["restricted_accuracy"] >= 0.6


def test_same_seed_same_losses():
    a = _run(max_steps=6)["loss_history"]
    b = _run(max_steps=6)["loss_history"]
    c = _run(max_steps=6, seed=1)["loss_history"]
    assert a == b
    assert a != c


def test_grad_accum_matches_bigger_batch():
    # 2 micro-batches of 2 == one batch of 4 on the first step (same 4 samples: full strategy, seed 0)
    big = _run(max_steps=2, batch_size=4, grad_accum=1, max_grad_norm=None)
    acc = _run(max_steps=1, batch_size=2, grad_accum=2, max_grad_norm=None)
    assert acc["examples_trained"] == 4
    assert acc["loss_history"][0] == pytest.approx(big["loss_history"][0], rel=1e-5)


def test_grad_accum_updates_like_bigger_batch():
    """The weights after one accumulated step equal the weights after one step on the whole batch."""
    from salf_engine.training.recipe import train

    weights = []
    for bs, acc in ((4, 1), (2, 2)):
        cfg = TrainConfig(model="tiny", dataset="pattern", strategy="full", lr=1e-2, batch_size=bs,
                          grad_accum=acc, max_steps=1, warmup_ratio=0.0, zero_shot_eval=False,
                          max_grad_norm=None).validate()
        p = _prepared("llama", cfg)
        train(cfg, progress=False, log=None, prepared=p)
        weights.append(p.model.model.layers[0].mlp.down_proj.weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_every_step_learns_and_steps_count_examples(tmp_path):
    """Step 1 has lr > 0 (warm-up (s+1)/(w+1)); every strategy gets ceil(N / step) steps of `step`."""
    from salf_engine.training.step import lr_factor

    assert [lr_factor(s, 3, 10) for s in range(10)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7])
    assert [lr_factor(s, 2, 5, "constant") for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    for strategy, extra in [("full", {}), ("salf", {"budget": "arith", "infill": "df"}), ("bot50", {})]:
        out = tmp_path / strategy
        s = _run(strategy=strategy, max_steps=None, epochs=1, batch_size=5, warmup_ratio=0.2, lr=1e-3,
                 output=str(out), **extra)
        assert s["steps"] == 10 and s["examples_trained"] == 48  # 48 examples: 9 steps of 5, one of 3
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "step" in r and "loss" in r]
        assert steps[0]["lr"] == pytest.approx(1e-3 / 3) and all(r["lr"] > 0 for r in steps)
        assert [r["batch_size"] for r in steps] == [5] * 9 + [3]


def test_cost_meter_reference_values():
    from salf_engine.training.cost import CostMeter

    full = CostMeter(4, lora=False)
    full.add(10, 0, [True] * 4)
    assert full.flops_ratio() == 1.0 and full.saving() == 0.0
    half = CostMeter(4, lora=False)
    half.add(10, 2, [False, False, True, True])
    assert half.flops_ratio() == pytest.approx((4 + 2 * 2) / 12) and half.saving() == 0.5
    assert half.flops_ratio(profiled=10) == pytest.approx((4 + 4 + 4) / 12)
    top = CostMeter(4, lora=False)
    top.add(1, 0, [True, True, False, False])  # top layers pass gradients down without weight grads
    assert top.flops_ratio() == pytest.approx((4 + 4 + 2) / 12)
    lora = CostMeter(4, lora=True)
    lora.add(1, 2, [False, False, True, True])
    assert lora.flops_ratio() == pytest.approx((4 + 2) / 12)
    assert half.depth_histogram() == [0, 0, 10, 0, 0]


def test_holdout_split_is_carved_from_train_and_disjoint():
    from tiny_models import tiny_tokenizer

    from salf_engine.training.inputs import encode_task

    task = _pattern_task(n_train=60)
    cfg = TrainConfig(eval_split="holdout", holdout_size=12, limit=30, seed=3).validate()
    _, tr, ev = encode_task(task, tiny_tokenizer(), cfg)
    assert len(ev) == 12 and len(tr) == 30
    assert not set(tr.example_indices) & set(ev.example_indices)
    other_seed = TrainConfig(eval_split="holdout", holdout_size=12, seed=4)
    _, tr2, ev2 = encode_task(task, tiny_tokenizer(), other_seed)
    assert ev2.example_indices == ev.example_indices and len(tr2) == 48  # same holdout for every seed
    with pytest.raises(ConfigError, match="holdout_size 60 leaves no training example"):
        encode_task(task, tiny_tokenizer(), TrainConfig(eval_split="holdout", holdout_size=60))


def test_eval_limit_scores_every_seed_on_the_same_rows():
    from tiny_models import tiny_tokenizer

    from salf_engine.data.responses import ResponseExample, ResponseTask
    from salf_engine.training.inputs import encode_response_task, encode_task

    task = _pattern_task(n_train=60, n_test=30)
    runs = [encode_task(task, tiny_tokenizer(), TrainConfig(limit=12, eval_limit=9, seed=s).validate())
            for s in (0, 1)]
    assert len(runs[0][2]) == 9 and runs[0][2].example_indices == runs[1][2].example_indices
    assert runs[0][1].example_indices != runs[1][1].example_indices  # the training subset follows the seed
    rows = [ResponseExample(f"question {i} ?", f"answer {i}") for i in range(40)]
    gen = ResponseTask("qa", {"train": rows, "test": rows[:20]})
    runs = [encode_response_task(gen, tiny_tokenizer(), TrainConfig(limit=10, eval_limit=6, seed=s))
            for s in (0, 1)]
    assert len(runs[0][1]) == 6 and runs[0][1].responses == runs[1][1].responses
    assert runs[0][0].responses != runs[1][0].responses


def test_eval_every_epoch_scores_each_epoch_and_trains_the_same(tmp_path):
    from tiny_models import tiny_model

    from salf_engine.evaluation import classification
    from salf_engine.training import checkpoint as ckpt_mod

    run = dict(max_steps=None, epochs=3, strategy="bot50")  # 48 examples in steps of 4: 12 steps an epoch
    plain = _run(**run)
    s = _run(**run, eval_every_epoch=True, save_every=12, output=str(tmp_path / "run"))
    assert plain["epochs"] is None
    assert s["loss_history"] == plain["loss_history"]  # evaluating between epochs changes no step
    assert [(e["epoch"], e["step"]) for e in s["epochs"]] == [(1, 12), (2, 24), (3, 36)]
    assert s["epochs"][-1]["free_macro_f1"] == s["fine_tuned"]["free_macro_f1"]
    seconds = [e["train_seconds"] for e in s["epochs"]]
    assert 0 < seconds[0] < seconds[1] < seconds[2]
    # epoch 1's scores are those of the step-12 checkpoint's weights, evaluated on their own
    weights = ckpt_mod.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000012").state["weights"]
    model = tiny_model("llama", seed=0)
    loaded = model.load_state_dict(weights, strict=False)  # the trained layers; the rest stays initial
    assert weights and not loaded.unexpected_keys
    p = _prepared("llama", TrainConfig(model="tiny", dataset="pattern"))
    want = classification.evaluate(model.eval(), p.tokenizer, p.eval_split, p.verbalizer,
                                   classes=list(p.task.classes)).summary()
    assert s["epochs"][0]["free_macro_f1"] == pytest.approx(want["free_macro_f1"], abs=1e-12)
    assert s["epochs"][0]["restricted_accuracy"] == pytest.approx(want["restricted_accuracy"], abs=1e-12)


def test_profile_fraction_profiles_a_subset():
    s = _run(max_steps=4, strategy="salf", budget="uniform", profile_fraction=0.25)
    assert s["profiled_examples"] == 12 and sum(s["eof_histogram"]["profile"]) == 12
    full = _run(max_steps=4, strategy="salf", budget="uniform", profile_fraction=1.0)
    assert full["profiled_examples"] == 48 and full["flops_ratio"] > s["flops_ratio"]
    default = _run(max_steps=4, strategy="salf", budget="uniform", depth_schedule="per-row")
    assert default["profiled_examples"] == 3  # ceil(0.05 * 48): the default profiles a small fraction


def test_default_lr_per_training_mode():
    from salf_engine.config import DEFAULT_LORA_LR, DEFAULT_LR

    assert _run(max_steps=1, lr=None)["lr"] == DEFAULT_LR
    assert _run(max_steps=1, lr=None, lora=True)["lr"] == DEFAULT_LORA_LR
    assert TrainConfig(lr=2e-4).resolved_lr(True) == 2e-4


def test_bf16_autocast_trains_in_bf16():
    """dtype=bf16 really autocasts (the first loss moves off the fp32 run's by bf16 rounding) and still
    trains the same thing (within bf16's precision, and the loss falls as in fp32)."""
    fp32, bf16 = _run(max_steps=4), _run(max_steps=4, dtype="bf16")
    first32, first16 = fp32["loss_history"][0], bf16["loss_history"][0]
    assert first16 != first32 and first16 == pytest.approx(first32, rel=0.02)
    assert bf16["loss_history"][-1] < first16 and fp32["loss_history"][-1] < first32


def test_salf_strategy_reports_eofs_and_saving():
    s = _run(max_steps=6, strategy="salf", budget="none", profile_fraction=1.0)
    assert s["eof_histogram"] is not None and sum(s["eof_histogram"]["profile"]) == 48
    # the saving is the mean cut over the trained rows: hand-computed from the depth histogram
    hist, m = s["depth_histogram"], s["num_layers"]
    assert sum(hist) == s["examples_trained"] == 6 * 4  # 6 steps of 4
    assert s["cost_saving_ratio"] == pytest.approx(sum(d * n for d, n in enumerate(hist)) / (sum(hist) * m))
    assert s["cost_saving_ratio"] > 0  # Algorithm 3 froze some rows below their eof


def test_frozen_prefix_is_not_updated():
    """bot50 on a 4-layer model: layers 0-1 and the embedding keep their weights, layer 3 moves."""
    from salf_engine.training.recipe import train

    cfg = TrainConfig(model="tiny", dataset="pattern", strategy="bot50", lr=1e-2, batch_size=4, max_steps=3,
                      zero_shot_eval=False).validate()
    p = _prepared("qwen2", cfg)
    before = {k: v.detach().clone() for k, v in p.model.state_dict().items()}
    s = train(cfg, progress=False, log=None, prepared=p)
    after = p.model.state_dict()
    assert s["cost_saving_ratio"] == pytest.approx(0.5)
    for frozen in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                   "model.embed_tokens.weight"):
        assert torch.equal(before[frozen], after[frozen]), frozen
    trained = "model.layers.3.mlp.up_proj.weight"
    assert not torch.equal(before[trained], after[trained])


def test_lora_trains_only_adapters(tmp_path):
    from salf_engine.training.recipe import train

    cfg = TrainConfig(model="tiny", dataset="pattern", strategy="full", lora=True, lr=5e-3, batch_size=4,
                      max_steps=4, zero_shot_eval=False, output=str(tmp_path / "run")).validate()
    p = _prepared("llama", cfg)
    p.out_dir = tmp_path / "run"
    base = {k: v.detach().clone() for k, v in p.model.state_dict().items()}
    s = train(cfg, progress=False, log=None, prepared=p)
    assert s["lora"] and s["trainable_parameters"] < 0.2 * sum(v.numel() for v in base.values())
    saved = tmp_path / "run" / "model"
    assert (saved / "adapter_config.json").is_file()
    assert not (saved / "model.safetensors").exists()
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 8


def test_lora_half_restricts_layers():
    from tiny_models import tiny_model

    from salf_engine.training.wrapping import apply_lora

    cfg = TrainConfig()
    model = apply_lora(tiny_model("llama"), cfg, range(2, 4))
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert names and all(".layers.2." in n or ".layers.3." in n for n in names)


def test_config_validation_and_json(tmp_path):
    cfg = TrainConfig(lr=3e-4, limit=10, lora_target_modules=["q_proj"])
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert TrainConfig.from_json(path) == cfg
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="dtype"):
        TrainConfig(dtype="fp8").validate()
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1).validate()
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="load_in_4bit needs lora"):
        TrainConfig(load_in_4bit=True).validate()


def test_semantic_losses_run():
    for loss in ("semantic-ce", "cosine"):
        s = _run(max_steps=3, loss=loss)
        assert all(torch.isfinite(torch.tensor(s["loss_history"])))


def test_qlora_4bit_with_a_freezing_strategy(tiny_dir):
    """4-bit (bitsandbytes NF4) base + LoRA + bot50 through the runner: only the top half's adapters move."""
    pytest.importorskip("bitsandbytes")
    from salf_engine.models import load_model
    from salf_engine.training.recipe import train

    cfg = TrainConfig(model="tiny", dataset="pattern", strategy="bot50", lora=True, load_in_4bit=True,
                      lr=1e-2, batch_size=4, max_steps=3, zero_shot_eval=False).validate()
    p = _prepared("llama", cfg)
    p.model, p.tokenizer = load_model(tiny_dir("llama"), load_in_4bit=True)
    model = p.model
    s = train(cfg, progress=False, log=None, prepared=p)
    assert s["cost_saving_ratio"] == pytest.approx(0.5)
    assert all(torch.isfinite(torch.tensor(s["loss_history"])))
    lora_b = {n: prm for n, prm in model.named_parameters() if "lora_B" in n}
    assert lora_b, "LoRA adapters were not attached to the 4-bit model"
    # LoRA B starts at zero: it moves only where backward reached (layers 2-3 of 4)
    for name, prm in lora_b.items():
        moved = bool(prm.detach().abs().sum() > 0)
        assert moved == (".layers.2." in name or ".layers.3." in name), name
