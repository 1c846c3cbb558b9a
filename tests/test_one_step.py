"""One step for every loop: the engine's loop, SalfTrainer and examples/accelerate_loop.py train through
`micro_batch_step` / `finish_step`, and all three give the weights of a plain torch loop (the oracle, written
here: one row at a time through the unpatched model, the hidden state detached at the row's cut, gradients
only for the mask's layers, torch's own AdamW) on the same step plans, in float64."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from test_hf import ACCUM, LR, MICRO, STEPS, _args, _config, hf_rows
from test_train import _prepared

from salf_engine.deviation.semantics import semantic_bases
from salf_engine.schedule.driver import StrategyDriver
from salf_engine.training.wrapping import wrap_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def recorded_plans(monkeypatch):
    """Every step plan any driver hands out, in order (what the loop under test trains on)."""
    plans: list = []
    real = StrategyDriver.epoch_plans

    def recording(self, *args, **kwargs):
        for plan in real(self, *args, **kwargs):
            plans.append(copy.deepcopy(plan))
            yield plan

    monkeypatch.setattr(StrategyDriver, "epoch_plans", recording)
    return plans


def _setup(cfg):
    p = _prepared("qwen2", cfg)
    p.model.double()
    return p, semantic_bases(p.model, p.verbalizer.label_token_ids)


def _engine(cfg, tmp_path):
    from salf_engine.training.recipe import train

    p, _ = _setup(cfg)
    summary = train(cfg, progress=False, log=None, prepared=p)
    return p.model, summary


def _trainer(cfg, tmp_path):
    from salf_engine.integrations.hf import SalfTrainer

    p, bases = _setup(cfg)
    trainer = SalfTrainer(model=p.model, args=_args(tmp_path), train_dataset=hf_rows(p), salf_config=cfg,
                          salf_bases=bases, salf_grad_accum=ACCUM)
    trainer.train()
    return p.model, trainer.salf_cost


def _accelerate(cfg, tmp_path):
    from accelerate import Accelerator

    spec = importlib.util.spec_from_file_location("example_accelerate_loop", EXAMPLES / "accelerate_loop.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    p, bases = _setup(cfg)
    _, cost = example.train_loop(Accelerator(cpu=True), p.model, p.strategy, cfg, p.train_split,
                                 p.verbalizer.label_token_ids, bases, lr=LR, max_steps=STEPS)
    return p.model, cost


def _oracle(cfg, plans) -> torch.nn.Module:
    """A plain torch loop over ``plans``: each row alone through the model's ordinary forward, its hidden
    state detached at its cut, its next-token loss / (examples in the step) backward into the layers its
    micro-batch's mask trains (and the parameters outside the layers); AdamW, linear decay, no clipping."""
    p, _ = _setup(cfg)
    model = p.model
    trainable = {n for n, q in wrap_model(copy.deepcopy(model), p.strategy, cfg).model.named_parameters()
                 if q.requires_grad}
    layers = model.model.layers
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([params[n] for n in sorted(trainable)], lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, foreach=False)
    label_ids = p.verbalizer.label_token_ids
    model.train()

    def layer_of(name: str) -> int | None:
        parts = name.split(".")
        return int(parts[parts.index("layers") + 1]) if "layers" in parts else None

    for step, plan in enumerate(plans):
        grads: dict[str, torch.Tensor] = {}
        for mb in plan.micro_batches:
            for i, cut in zip(mb.indices, mb.depths, strict=True):
                allowed = [n for n in sorted(trainable)
                           if (layer_of(n) is None and "embed" not in n)
                           or (layer_of(n) is not None and layer_of(n) >= cut and mb.trainable[layer_of(n)])]
                hook = None
                if cut > 0:
                    hook = layers[cut - 1].register_forward_hook(
                        lambda _m, _a, out: (out[0].detach(), *out[1:]) if isinstance(out, tuple)
                        else out.detach())
                try:
                    ids = torch.tensor([p.train_split.input_ids[i]])
                    logits = model(input_ids=ids).logits[0, -1]
                finally:
                    if hook is not None:
                        hook.remove()
                target = torch.tensor(int(label_ids[p.train_split.labels[i]]))
                loss = torch.nn.functional.cross_entropy(logits.float()[None], target[None]) / len(plan)
                got = torch.autograd.grad(loss, [params[n] for n in allowed], allow_unused=True)
                for n, g in zip(allowed, got, strict=True):
                    if g is not None:
                        grads[n] = grads[n] + g if n in grads else g
        for n in trainable:
            params[n].grad = grads.get(n)
        for group in optimizer.param_groups:
            group["lr"] = LR * (STEPS - step) / STEPS
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("strategy,kw", [("salf", {"budget": "uniform", "depth_schedule": "per-row"}),
                                         ("int50", {})])
def test_three_loops_equal_a_plain_torch_loop(tmp_path, recorded_plans, strategy, kw):
    cfg = _config(strategy, **kw)
    got = {}
    plans = {}
    for name, loop in (("engine", _engine), ("trainer", _trainer), ("accelerate", _accelerate)):
        recorded_plans.clear()
        got[name] = loop(cfg, tmp_path / name)
        plans[name] = recorded_plans[:STEPS]
    assert plans["engine"] == plans["trainer"] == plans["accelerate"]
    assert len(plans["engine"]) == STEPS and all(len(plan) == MICRO * ACCUM for plan in plans["engine"])
    if strategy == "salf":  # rows at several cuts
        assert len({c for plan in plans["engine"] for mb in plan.micro_batches for c in mb.depths}) > 1
    oracle = dict(_oracle(cfg, plans["engine"]).named_parameters())
    start = dict(_setup(cfg)[0].model.named_parameters())
    assert max(float((oracle[n] - start[n]).abs().max()) for n in oracle) > 1e-3  # the oracle trained
    for name, (model, _) in got.items():
        for n, q in model.named_parameters():
            torch.testing.assert_close(q.detach(), oracle[n].detach(), rtol=1e-6, atol=1e-9,
                                       msg=f"{name}: {n}")
    # every loop counts the same plans in its cost meter
    engine_summary = got["engine"][1]
    for name in ("trainer", "accelerate"):
        cost = got[name][1]
        assert cost.depth_histogram() == engine_summary["depth_histogram"]
        assert cost.saving() == engine_summary["cost_saving_ratio"]


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_trainer_follows_the_nonfinite_policy(tmp_path, recorded_plans, policy):
    """SalfTrainer ends its steps in finish_step: a step holding a NaN row stops the run naming the step, or
    is skipped (counted, its loss left out, no weight turns NaN)."""
    from test_checkpoint import _poisoned

    from salf_engine.errors import TrainingError
    from salf_engine.integrations.hf import SalfTrainer

    victim = 5
    cfg = _config("full", on_nonfinite=policy)
    p = _poisoned(cfg, victim)
    trainer = SalfTrainer(model=p.model, args=_args(tmp_path), train_dataset=hf_rows(p), salf_config=cfg,
                          salf_grad_accum=ACCUM)
    if policy == "stop":
        with pytest.raises(TrainingError, match=r"non-finite loss at step \d+ \(depths"):
            trainer.train()
        return
    trainer.train()
    bad = [k for k, plan in enumerate(recorded_plans[:STEPS]) if victim in plan.indices]
    assert len(bad) == 1 and trainer.state.global_step == STEPS
    state = trainer.salf_train_state
    assert state.skipped == 1 and len(state.losses) == STEPS - 1
    for name, q in p.model.named_parameters():
        if "embed" not in name:
            assert torch.isfinite(q).all(), name
