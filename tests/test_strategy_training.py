"""Every strategy, trained end to end through `train()`: frozen means no backward.

Backward hooks on every decoder layer and gradient hooks on every parameter record what each training
step touched; the plan the strategy yielded for that step says what it may touch. A layer below the
plan's cut must never run backward, and a layer the plan marks frozen must never receive a weight
gradient. For LoRA strategies the adapters of frozen layers must stay at their zero initialisation.
"""

from __future__ import annotations

import pytest
import torch
from test_train import _prepared

from salf_engine.config import TrainConfig
from salf_engine.strategies import make_strategy
from salf_engine.train import train

M = 4  # tiny_model's default depth

CASES = [
    ("full", {}), ("lift-half", {}), ("lift-star-half", {}), ("salf", {}),
    ("salf", {"budget": "uniform", "infill": "df"}), ("salf", {"budget": "arith", "infill": "bf"}),
    ("salf", {"budget": "geom", "infill": "df"}),
    ("bot25", {}), ("bot50", {}), ("bot75", {}), ("top25", {}), ("top50", {}), ("top75", {}),
    ("int25", {}), ("int50", {}), ("int75", {}), ("adt-low", {}), ("adt-high", {}),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(name: str, options: dict, **overrides):
    cfg = TrainConfig(model="tiny", dataset="pattern", strategy=name, lr=1e-2, batch_size=4, max_steps=8,
                      warmup_ratio=0.0, zero_shot_eval=False, deviation_impl="torch",
                      **{k: v for k, v in options.items()}, **overrides).validate()
    p = _prepared("qwen2", cfg)  # untied head: an embedding gradient can only come from backward
    p["strategy"] = make_strategy(name, seed=0, lora=cfg.lora, **options)
    return cfg, p


@pytest.mark.parametrize("name,options", CASES, ids=str)
def test_no_backward_and_no_grad_where_the_plan_freezes(name, options):
    cfg, p = _setup(name, options)
    model, strategy = p["model"], p["strategy"]
    current: dict = {}
    violations: list[str] = []
    touched: set[int] = set()

    plans = strategy.epoch_plans

    def recording(epoch, batch_size):
        for plan in plans(epoch, batch_size):
            current["plan"] = plan
            yield plan

    strategy.epoch_plans = recording

    def on_backward(i):
        def hook(module, grad_input, grad_output):
            plan = current["plan"]
            touched.add(i)
            if i < plan.depth:
                violations.append(f"layer {i} ran backward below the cut {plan.depth}")
        return hook

    def on_grad(i, pname):
        def hook(grad):
            plan = current["plan"]
            if not plan.trainable[i]:
                violations.append(f"{pname} (layer {i}) got a gradient; plan mask {plan.trainable}")
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(on_backward(i))
        for pname, prm in layer.named_parameters():
            prm.register_hook(on_grad(i, pname))
    embed_grads: list[int] = []
    model.model.embed_tokens.weight.register_hook(lambda g: embed_grads.append(current["plan"].depth))

    summary = train(cfg, progress=False, log=None, prepared=p)
    assert not violations, violations[:5]
    assert touched, "no layer ever ran backward"
    assert all(d == 0 for d in embed_grads), "the embedding got a gradient under a cut"
    assert all(torch.isfinite(torch.tensor(summary["loss_history"])))


@pytest.mark.parametrize("name,trained", [("lora-full", {0, 1, 2, 3}), ("lora-half", {2, 3})])
def test_lora_adapters_move_only_where_trained(name, trained):
    cfg, p = _setup(name, {}, lora=True)
    train(cfg, progress=False, log=None, prepared=p)
    lora_b = {n: prm for n, prm in p["model"].named_parameters() if "lora_B" in n}
    assert lora_b
    moved = {int(n.split(".layers.")[1].split(".")[0]) for n, prm in lora_b.items() if prm.abs().sum() > 0}
    assert moved == trained
