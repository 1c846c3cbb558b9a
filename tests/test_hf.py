"""SALF inside transformers.Trainer (and trl.SFTTrainer): same weights as the engine's own loop, no
backward below a batch's cut, the patched forward, and the clear refusals."""

from __future__ import annotations

import pytest
import torch
from test_train import _prepared
from transformers import Trainer, TrainingArguments

from salf_engine.config import TrainConfig
from salf_engine.deviation.semantics import semantic_bases
from salf_engine.errors import ConfigError
from salf_engine.integrations.hf import SalfTrainer, SalfTrainerMixin
from salf_engine.integrations.patching import is_patched, patch_model, unpatch_model
from salf_engine.training.recipe import train

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]

STEPS, MICRO, ACCUM, LR = 4, 4, 2, 1e-2


def _config(strategy: str, **kw) -> TrainConfig:
    return TrainConfig(model="tiny", dataset="pattern", strategy=strategy, lr=LR, grad_accum=ACCUM,
                       warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=None, zero_shot_eval=False,
                       deviation_impl="torch", **{"max_steps": STEPS, "batch_size": MICRO, **kw}).validate()


def hf_rows(prepared) -> list[dict]:
    """HF causal-LM rows of the engine's training split: prompt + label token, only the label supervised."""
    label_ids = prepared.verbalizer.label_token_ids
    rows = []
    for ids, cls in zip(prepared.train_split.input_ids, prepared.train_split.labels, strict=True):
        tok = int(label_ids[cls])
        rows.append({"input_ids": [*ids, tok], "labels": [-100] * len(ids) + [tok], "salf_label": int(cls)})
    return rows


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=MICRO, max_steps=STEPS,
                learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=0.0, optim="adamw_torch", report_to=[], save_strategy="no", logging_steps=1000,
                use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def _hf_run(tmp_path, strategy: str, trainer_cls=SalfTrainer, **kw):
    cfg = _config(strategy, **kw)
    p = _prepared("qwen2", cfg)
    bases = semantic_bases(p.model, p.verbalizer.label_token_ids)
    trainer = trainer_cls(model=p.model, args=_args(tmp_path), train_dataset=hf_rows(p),
                          salf_strategy=strategy, salf_config=cfg, salf_bases=bases, salf_grad_accum=ACCUM)
    # backward hooks: which layers run backward, against the cut of the micro-batch being trained
    events: list[tuple[int, int]] = []
    current = {"depth": None}
    set_trainable = trainer.salf_wrapped.set_trainable

    def tracking(depth, mask, rows=None):
        current["depth"] = depth
        return set_trainable(depth, mask, rows)

    trainer.salf_wrapped.set_trainable = tracking
    for i, layer in enumerate(trainer.salf_wrapped.parts.layers):
        layer.register_full_backward_hook(lambda mod, gi, go, i=i: events.append((current["depth"], i)))
    trainer.train()
    return p, trainer, events


@pytest.mark.parametrize("strategy,kw", [("salf", {"budget": "uniform", "depth_schedule": "per-row"}),
                                         ("full", {}), ("adt-low", {}),
                                         ("salf", {"budget": "uniform", "depth_assignment": "loss-rank"})])
def test_hf_trainer_equals_engine_loop(tmp_path, strategy, kw):
    cfg = _config(strategy, **kw)
    ref = _prepared("qwen2", cfg)
    train(cfg, progress=False, log=None, prepared=ref)
    mine, trainer, events = _hf_run(tmp_path, strategy, **kw)
    assert trainer.state.global_step == STEPS
    assert events and all(i >= depth for depth, i in events)  # no layer below the cut ran backward
    if strategy == "salf":
        assert len({d for d, _ in events}) > 1
    for (name, a), (_, b) in zip(ref.model.named_parameters(), mine.model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
    if kw.get("depth_assignment") == "loss-rank":
        # the engine's loss at the label token and the Trainer's masked next-token loss, row by row
        seen = [i for i, v in enumerate(ref.strategy.losses) if v is not None]
        assert len(seen) == STEPS * MICRO * ACCUM
        assert [trainer.salf_strategy.losses[i] for i in seen] == pytest.approx(
            [ref.strategy.losses[i] for i in seen], rel=1e-4)


def test_sft_trainer_with_the_mixin(tmp_path):
    trl = pytest.importorskip("trl")

    class SalfSFTTrainer(SalfTrainerMixin, trl.SFTTrainer):
        pass

    cfg = _config("salf", budget="uniform")
    ref = _prepared("qwen2", cfg)
    train(cfg, progress=False, log=None, prepared=ref)
    from datasets import Dataset

    mine = _prepared("qwen2", cfg)
    keep = ("output_dir", "per_device_train_batch_size", "max_steps", "learning_rate", "lr_scheduler_type",
            "warmup_steps", "weight_decay", "max_grad_norm", "optim", "report_to", "save_strategy",
            "logging_steps", "use_cpu", "seed", "disable_tqdm")
    args = trl.SFTConfig(**{k: v for k, v in _args(tmp_path).to_dict().items() if k in keep},
                         packing=False, padding_free=False, dataset_kwargs={"skip_prepare_dataset": True},
                         bf16=False, gradient_checkpointing=False,
                         remove_unused_columns=False)
    bases = semantic_bases(mine.model, mine.verbalizer.label_token_ids)
    trainer = SalfSFTTrainer(model=mine.model, args=args, train_dataset=Dataset.from_list(hf_rows(mine)),
                             processing_class=mine.tokenizer, salf_strategy="salf", salf_config=cfg,
                             salf_bases=bases, salf_grad_accum=ACCUM)
    trainer.train()
    for (name, a), (_, b) in zip(ref.model.named_parameters(), mine.model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)


def test_patched_forward_matches_model_and_keeps_signature():
    from tiny_models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(4, 60, (3, 9))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels)
    patch_model(model)
    assert is_patched(model) and patch_model(model) is model  # twice is a no-op
    import inspect

    params = inspect.signature(model.forward).parameters
    assert "labels" in params and "salf_depth" in params and "input_ids" in params
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, salf_depth=torch.full((3,), 2), num_items_in_batch=3)
        plain = model(input_ids=ids, labels=labels)  # no salf_depth: the original forward
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.logits, ref.logits)
    with torch.no_grad():  # a salf_depth column: every row at its own cut, same values
        rows = model(input_ids=ids, labels=labels, salf_depth=torch.tensor([1, 4, 0]))
    torch.testing.assert_close(rows.logits, ref.logits, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match=r"salf_depth must be an int or a \[B\] integer tensor"):
        model(input_ids=ids, salf_depth=torch.tensor([1.0, 2.0, 2.0]))
    with pytest.raises(ConfigError, match="position_ids"):
        model(input_ids=ids, salf_depth=1, position_ids=torch.arange(9)[None])
    unpatch_model(model)
    assert not is_patched(model)


def test_patch_refuses_a_foreign_forward():
    from tiny_models import tiny_model

    model = tiny_model("llama")
    model.forward = lambda *a, **k: None  # e.g. a fused-loss patch
    with pytest.raises(ConfigError, match="already patched"):
        patch_model(model)


@pytest.mark.parametrize("bad,match", [(dict(gradient_accumulation_steps=2), "salf_grad_accum"),
                                       (dict(ddp_static_graph=True), "static_graph")])
def test_trainer_refuses_arguments_that_cannot_work(tmp_path, bad, match):
    cfg = _config("salf", budget="uniform")
    p = _prepared("qwen2", cfg)
    with pytest.raises(ConfigError, match=match):
        SalfTrainer(model=p.model, args=_args(tmp_path, **bad), train_dataset=hf_rows(p), salf_config=cfg)


def test_trainer_refuses_deepspeed_and_packing():
    from salf_engine.integrations.hf import _check_args

    class Args:
        deepspeed = "ds.json"
        gradient_accumulation_steps = 1

    with pytest.raises(ConfigError, match="DeepSpeed"):
        _check_args(Args())
    Args.deepspeed, Args.packing = None, True
    with pytest.raises(ConfigError, match="packing"):
        _check_args(Args())
    assert issubclass(SalfTrainer, Trainer)


def test_trainer_strategy_given_once(tmp_path):
    from tiny_models import tiny_model

    with pytest.raises(ConfigError, match=r"salf_strategy='bot50' contradicts salf_config.strategy='salf'"):
        SalfTrainer(model=tiny_model("llama"), args=_args(tmp_path), salf_strategy="bot50",
                    salf_config=TrainConfig(lr=1e-3))
    trainer = SalfTrainer(model=tiny_model("llama"), args=_args(tmp_path),
                          salf_config=TrainConfig(strategy="bot50", lr=1e-3))
    assert trainer.salf_strategy.label == "bot50"  # the config's strategy, not the default "salf"


@pytest.mark.parametrize("strategy,kw", [("salf", {"budget": "uniform", "depth_schedule": "per-row"}),
                                         ("adt-low", {})])
def test_trainer_resume_restores_the_engine_state(tmp_path, strategy, kw):
    """Trainer checkpoints hold salf_state.json; resuming from one ends with the uninterrupted weights."""
    import json

    from salf_engine.training.checkpoint import TRAINER_STATE as SALF_STATE

    def run(out, resume=None):
        cfg = _config(strategy, max_steps=8, batch_size=2, **kw)
        p = _prepared("qwen2", cfg)
        bases = semantic_bases(p.model, p.verbalizer.label_token_ids)
        args = _args(tmp_path, output_dir=str(out), max_steps=8, per_device_train_batch_size=2,
                     save_strategy="steps", save_steps=3, save_only_model=False)
        trainer = SalfTrainer(model=p.model, args=args, train_dataset=hf_rows(p)[:24], salf_strategy=strategy,
                              salf_config=cfg, salf_bases=bases, salf_grad_accum=ACCUM)
        trainer.train(resume_from_checkpoint=resume)
        return p, trainer

    ref, ref_trainer = run(tmp_path / "a")  # 6 steps an epoch: checkpoints 3 (mid-epoch 0), 6 (epoch end)
    saved = json.loads((tmp_path / "a" / "checkpoint-3" / SALF_STATE).read_text())
    assert saved["global_step"] == 3 and saved["epoch"] == 0 and saved["plans_done"] == 3
    for step in (3, 6):
        got, trainer = run(tmp_path / "a", resume=str(tmp_path / "a" / f"checkpoint-{step}"))
        assert trainer.state.global_step == 8
        if strategy == "adt-low":
            assert trainer.salf_strategy.frozen_layers == ref_trainer.salf_strategy.frozen_layers
        for (name, a), (_, b) in zip(ref.model.named_parameters(), got.model.named_parameters(), strict=True):
            assert torch.equal(a, b), (step, name)


def test_trainer_resume_needs_salf_state(tmp_path):
    cfg = _config("full")
    p = _prepared("qwen2", cfg)
    trainer = SalfTrainer(model=p.model, args=_args(tmp_path), train_dataset=hf_rows(p), salf_strategy="full",
                          salf_config=cfg)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConfigError, match="salf_state.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "ckpt"))
