"""train() against a plain torch loop over the HF forward; the trainable-layer masks; the run directory."""

from __future__ import annotations

import pytest
import torch
from test_train import _prepared

from salf_engine.config import TrainConfig
from salf_engine.schedule.driver import StrategyDriver
from salf_engine.training.recipe import train
from salf_engine.training.rundir import RunDirectory
from salf_engine.training.wrapping import wrap_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(strategy: str, **kw) -> TrainConfig:
    return TrainConfig(model="tiny", dataset="pattern", strategy=strategy, lr=1e-2, batch_size=4,
                       grad_accum=2,
                       max_steps=5, warmup_ratio=0.0, zero_shot_eval=False, deviation_impl="torch",
                       **kw).validate()


def _plain_loop(p, plans) -> None:
    """The oracle: plain torch over the plain HF model, no engine piece. Each row of a step runs alone
    through the model's own forward, a hook detaching the output of the layer below its cut (so backward
    never reaches the layers under it); the loss is the full-vocabulary cross-entropy of the label token at
    the last prompt token, averaged over the step; plain AdamW (decay on matrices), linear decay, gradient
    clipping at 1. The embedding and the (tied) head train under ``full`` only."""
    cfg, model = p.config, p.model
    full = cfg.strategy == "full"
    layers = model.model.layers
    for name, q in model.named_parameters():
        q.requires_grad_(full or "embed_tokens" not in name and "lm_head" not in name)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [q for q in params if q.ndim >= 2], "weight_decay": 0.01},
                                   {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, foreach=False)
    label_ids = p.verbalizer.label_token_ids
    model.train()
    for step, (indices, depths) in enumerate(plans):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * (cfg.max_steps - step) / cfg.max_steps
        for i, depth in zip(indices, depths, strict=True):
            ids = torch.tensor([p.train_split.input_ids[i]])
            hook = None
            if depth > 0:
                def detach(_module, _args, out):
                    return (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach()
                hook = layers[depth - 1].register_forward_hook(detach)
            try:
                logits = model(input_ids=ids).logits[0, -1].float()
            finally:
                if hook is not None:
                    hook.remove()
            target = torch.tensor(label_ids[p.train_split.labels[i]])
            (torch.nn.functional.cross_entropy(logits, target) / len(indices)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("strategy,kw", [("full", {}), ("bot50", {}),
                                         ("salf", {"budget": "uniform", "depth_schedule": "per-row"})])
def test_train_equals_a_plain_torch_loop(strategy, kw, monkeypatch):
    """train()'s weights after 5 steps equal those of a plain torch loop over the HF forward that trains the
    same rows at the same cuts (the plans the run made, recorded as it made them)."""
    cfg = _config(strategy, **kw)
    plans = []
    real = StrategyDriver.epoch_plans

    def recorded(self, *args, **kwargs):
        for plan in real(self, *args, **kwargs):
            plans.append((plan.indices, [d for mb in plan.micro_batches for d in mb.depths]))
            yield plan

    monkeypatch.setattr(StrategyDriver, "epoch_plans", recorded)
    engine = _prepared("qwen2", cfg)
    train(cfg, progress=False, log=None, prepared=engine)
    plans = plans[:cfg.max_steps]
    if strategy == "salf":
        assert len({d for _, depths in plans for d in depths}) > 1  # several cuts really trained
    plain = _prepared("qwen2", cfg)
    _plain_loop(plain, plans)
    pairs = zip(engine.model.named_parameters(), plain.model.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=name)


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
    RunDirectory(tmp_path / "run").close()  # a new run over it drops the finished marker first
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize(("dropout", "kind"), [(None, torch.nn.Identity), (0.05, torch.nn.Dropout)])
def test_lora_half_runs_without_dropout_unless_asked(dropout, kind):
    """The default LoRA[half] has no dropout module (bench/results/lora_dropout.md); --lora-dropout 0.05
    brings PEFT's back."""
    cfg = _config("lora-half", **({} if dropout is None else {"lora_dropout": dropout}))
    p = _prepared("qwen2", cfg)
    wrapped = wrap_model(p.model, p.strategy, cfg)
    drops = [m.lora_dropout["default"] for m in wrapped.model.modules() if hasattr(m, "lora_dropout")]
    assert drops and all(type(d) is kind for d in drops)
    if dropout is not None:
        assert all(d.p == dropout for d in drops)
