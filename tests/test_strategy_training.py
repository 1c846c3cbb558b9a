"""Every strategy, trained end to end through `train()`: frozen means no backward.

Backward hooks on every decoder layer and gradient hooks on every parameter record what each training
step touched; the plan the strategy yielded for that step says what it may touch. A layer below the
plan's cut must never run backward, and a layer the plan marks frozen must never receive a weight
gradient. For LoRA strategies the adapters of frozen layers must stay at their zero initialisation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_train import _prepared

from salf_engine.config import TrainConfig
from salf_engine.schedule.strategies import make_strategy
from salf_engine.training.recipe import train

M = 4  # tiny_model's default depth

CASES = [
    ("full", {}), ("lift-half", {}), ("lift-star-half", {}), ("salf", {}), ("salf", {"budget": "none"}),
    ("salf", {"budget": "uniform", "infill": "df", "schedule": "per-row"}),
    ("salf", {"budget": "arith", "infill": "bf", "schedule": "per-row"}),
    ("salf", {"budget": "geom", "infill": "df", "schedule": "per-row"}),
    ("salf", {"budget": "arith", "schedule": "paper"}),
    ("salf", {"budget": "uniform", "assignment": "eof-match", "schedule": "mixed",
              "cuts_per_step": 2}),
    ("salf", {"budget": "uniform", "infill": "df", "schedule": "per-row", "cut_levels": 2}),
    ("salf", {"budget": "uniform", "schedule": "narrowing"}),
    ("salf", {"budget": "geom", "schedule": "widening"}),
    ("salf", {"budget": "uniform", "assignment": "loss-rank"}),
    ("bot25", {}), ("bot50", {}), ("bot75", {}), ("top25", {}), ("top50", {}), ("top75", {}),
    ("int25", {}), ("int50", {}), ("int75", {}), ("adt-low", {}), ("adt-high", {}),
]


pytestmark = pytest.mark.usefixtures("one_thread")


_CONFIG_NAMES = {"schedule": "depth_schedule", "assignment": "depth_assignment"}


def _setup(name: str, options: dict, **overrides):
    cfg = TrainConfig(model="tiny", dataset="pattern", strategy=name, lr=1e-2, batch_size=4, max_steps=8,
                      warmup_ratio=0.0, zero_shot_eval=False, deviation_impl="torch",
                      **{_CONFIG_NAMES.get(k, k): v for k, v in options.items()}, **overrides).validate()
    p = _prepared("qwen2", cfg)  # untied head: an embedding gradient can only come from backward
    p.strategy = make_strategy(name, seed=0, lora=cfg.lora, **options)
    return cfg, p


def _record_micro_batches(model, strategy) -> dict:
    """``current["mb"]``: the micro-batch being trained, found by counting training-mode forwards within
    each yielded plan (profiling and probing run in eval mode)."""
    current: dict = {}
    plans = strategy.epoch_plans

    def recording(epoch, step_size, micro=None):
        for plan in plans(epoch, step_size, micro):
            current.update(plan=plan, n=-1)
            yield plan

    def on_forward(module, args):
        if module.training and "plan" in current:
            current["n"] += 1
            current["mb"] = current["plan"].micro_batches[current["n"]]

    strategy.epoch_plans = recording
    model.model.embed_tokens.register_forward_pre_hook(on_forward)
    return current


@pytest.mark.parametrize("name,options", CASES, ids=str)
def test_no_backward_and_no_grad_where_the_plan_freezes(name, options):
    cfg, p = _setup(name, options)
    model, strategy = p.model, p.strategy
    current = _record_micro_batches(model, strategy)
    violations: list[str] = []
    touched: set[int] = set()

    def on_backward(i):
        def hook(module, grad_input, grad_output):
            mb = current["mb"]
            touched.add(i)
            if i < mb.depth:
                violations.append(f"layer {i} ran backward below the cut {mb.depth}")
        return hook

    def on_grad(i, pname):
        def hook(grad):
            mb = current["mb"]
            if not mb.trainable[i]:
                violations.append(f"{pname} (layer {i}) got a gradient; micro-batch mask {mb.trainable}")
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.register_full_backward_hook(on_backward(i))
        for pname, prm in layer.named_parameters():
            prm.register_hook(on_grad(i, pname))
    embed_grads: list[int] = []
    model.model.embed_tokens.weight.register_hook(lambda g: embed_grads.append(current["mb"].depth))
    head_grads: list[int] = []
    model.lm_head.weight.register_hook(lambda g: head_grads.append(1))

    summary = train(cfg, progress=False, log=None, prepared=p)
    assert not violations, violations[:5]
    assert touched, "no layer ever ran backward"
    assert all(d == 0 for d in embed_grads), "the embedding got a gradient under a cut"
    # the head (and embedding) train in full fine-tuning only, unless asked for
    assert bool(head_grads) == (name == "full") and bool(embed_grads) == (name == "full")
    assert summary["head_trained"] == (name == "full")
    assert all(torch.isfinite(torch.tensor(summary["loss_history"])))
    assert summary["steps"] == 8 and summary["examples_trained"] == 32


@pytest.mark.parametrize("name,options", [("bot50", {}), ("salf", {"budget": "uniform"})], ids=str)
def test_train_head_option_trains_the_head(name, options):
    cfg, p = _setup(name, options, train_head=True)
    head = p.model.lm_head.weight.detach().clone()
    embed = p.model.model.embed_tokens.weight.detach().clone()
    summary = train(cfg, progress=False, log=None, prepared=p)
    assert summary["head_trained"]
    assert not torch.equal(head, p.model.lm_head.weight)
    assert torch.equal(embed, p.model.model.embed_tokens.weight)  # below every cut: still frozen


@pytest.mark.parametrize("name,trained", [("lora-full", {0, 1, 2, 3}), ("lora-half", {2, 3})])
def test_lora_adapters_move_only_where_trained(name, trained):
    cfg, p = _setup(name, {}, lora=True)
    train(cfg, progress=False, log=None, prepared=p)
    lora_b = {n: prm for n, prm in p.model.named_parameters() if "lora_B" in n}
    assert lora_b
    moved = {int(n.split(".layers.")[1].split(".")[0]) for n, prm in lora_b.items() if prm.abs().sum() > 0}
    assert moved == trained


def test_loss_rank_observes_each_sample_s_loss_at_its_label_token():
    """After one epoch at a negligible learning rate every sample's observed loss is the plain HF forward's
    cross-entropy of its label token (an independent oracle: one unpadded sequence at a time)."""
    cfg = TrainConfig(model="tiny", dataset="pattern", strategy="salf", budget="uniform",
                      depth_assignment="loss-rank", lr=1e-30, batch_size=4, epochs=1, warmup_ratio=0.0,
                      zero_shot_eval=False, deviation_impl="torch").validate()
    p = _prepared("qwen2", cfg)
    reference = copy.deepcopy(p.model).eval()
    train(cfg, progress=False, log=None, prepared=p)
    label_ids = p.verbalizer.label_token_ids
    want = []
    with torch.no_grad():
        for ids, cls in zip(p.train_split.input_ids, p.train_split.labels, strict=True):
            logits = reference(torch.tensor([ids])).logits[0, -1]
            want.append(float(torch.nn.functional.cross_entropy(logits[None], label_ids[cls][None])))
    assert p.strategy.losses == pytest.approx(want, rel=1e-4, abs=1e-6)
