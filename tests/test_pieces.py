"""The loop pieces (wrap_model, StrategyDriver, micro_batch_step, optimizer_step) make train()'s loop."""

from __future__ import annotations

import pytest
import torch
from test_train import _prepared

from salf_engine.config import TrainConfig
from salf_engine.data import collate
from salf_engine.deviation.semantics import semantic_bases
from salf_engine.runner.truncated import TruncatedRunner
from salf_engine.schedule.driver import StrategyDriver
from salf_engine.training.recipe import train
from salf_engine.training.rundir import RUN_FILES, RunDirectory
from salf_engine.training.step import build_optimizer, build_scheduler, micro_batch_step, optimizer_step
from salf_engine.training.wrapping import wrap_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(strategy: str, **kw) -> TrainConfig:
    return TrainConfig(model="tiny", dataset="pattern", strategy=strategy, lr=1e-2, batch_size=4,
                       grad_accum=2,
                       max_steps=5, warmup_ratio=0.0, zero_shot_eval=False, deviation_impl="torch",
                       **kw).validate()


def _hand_loop(p) -> list[int]:
    """A minimal loop from the pieces; returns the depths it trained."""
    cfg = p.config
    torch.manual_seed(cfg.seed)
    label_ids = torch.as_tensor(p.verbalizer.label_token_ids)
    bases = semantic_bases(p.model, p.verbalizer.label_token_ids)
    wrapped = wrap_model(p.model, p.strategy, cfg)
    runner = TruncatedRunner(wrapped.model, bases=bases, deviation_impl="torch")
    driver = StrategyDriver(p.strategy, runner, p.train_split, cfg, pad_id=0)
    driver.profile()
    driver.begin(wrapped.parts.layers)
    optimizer = build_optimizer(wrapped.trainable, cfg, cfg.resolved_lr(wrapped.lora))
    scheduler = build_scheduler(optimizer, cfg, cfg.max_steps)
    wrapped.model.train()
    depths, step = [], 0
    for plan in driver.epoch_plans(0, cfg.batch_size * cfg.grad_accum, cfg.batch_size):
        seen = []
        for mb in plan.micro_batches:
            batch = collate(p.train_split, mb.indices, 0, padding_side="left")
            res = micro_batch_step(runner, wrapped, batch, mb.runner_depth, mb.trainable,
                                   weight=len(mb.indices) / len(plan), label_token_ids=label_ids, bases=bases,
                                   config=cfg, want_deviations=driver.wants_deviations)
            depths += mb.depths
            if res.deviations is not None:
                seen.append((mb.indices, res.deviations))
        optimizer_step(optimizer, scheduler, wrapped.trainable, cfg.max_grad_norm)
        step += 1
        driver.observe(seen)
        driver.after_step(step, wrapped.parts.layers)
        if step == cfg.max_steps:
            break
    return depths


@pytest.mark.parametrize("strategy,kw", [("full", {}), ("salf", {"budget": "uniform"}), ("lora-half", {}),
                                         ("adt-low", {})])
def test_pieces_loop_equals_train(strategy, kw):
    cfg = _config(strategy, **kw)
    ref = _prepared("qwen2", cfg)
    train(cfg, progress=False, log=None, prepared=ref)
    mine = _prepared("qwen2", cfg)
    depths = _hand_loop(mine)
    if strategy == "salf":
        assert len(set(depths)) > 1  # several cuts really trained
    for (name, a), (_, b) in zip(ref.model.named_parameters(), mine.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_wrap_model_masks_follow_the_plan():
    cfg = _config("salf", budget="uniform")
    p = _prepared("qwen2", cfg)
    wrapped = wrap_model(p.model, p.strategy, cfg)
    assert not wrapped.head_trains and not wrapped.embed_trainable and not wrapped.lora
    assert wrapped.set_trainable(2, [True] * 4) is False
    assert not any(q.requires_grad for i in range(2) for q in wrapped.layer_params[i])
    assert all(q.requires_grad for q in wrapped.layer_params[3])
    wrapped.restore()
    assert all(q.requires_grad for q in wrapped.trainable)


def test_run_directory_writes_and_clears(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.log({"step": 1})
    run.write_json("summary.json", {"finished": True})
    run.close()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert "summary.json" in RUN_FILES
    RunDirectory(tmp_path / "run").close()  # a new run over it drops the finished marker first
    assert not (tmp_path / "run" / "summary.json").exists()
