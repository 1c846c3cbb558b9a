"""Strategies: masks, depths, epoch schedules, LIFT rotation, ADT selection, realized savings, errors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from salf_engine.budgets import assign_depths, budget_quotas, cost_saving_ratio
from salf_engine.errors import ConfigError
from salf_engine.strategies import (
    STRATEGIES,
    AdaptiveStrategy,
    StepPlan,
    interleaved_frozen,
    make_strategy,
)

T, F = True, False
M = 8


def eofs_for(n: int, m: int = M, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, m, (n,), generator=gen).tolist()


def started(name: str, n: int = 64, m: int = M, **options):
    s = make_strategy(name, **options)
    s.begin(m, n, eofs_for(n, m) if s.needs_profile else None, 0)
    return s


def all_plans(s, epoch: int = 0, batch_size: int = 4) -> list[StepPlan]:
    return list(s.epoch_plans(epoch, batch_size))


# ---------------------------------------------------------------- fixed masks, m = 8

STATIC_MASKS = {
    "full": (0, [T, T, T, T, T, T, T, T]),
    "lora-full": (0, [T, T, T, T, T, T, T, T]),
    "lora-half": (4, [F, F, F, F, T, T, T, T]),
    "bot25": (2, [F, F, T, T, T, T, T, T]),
    "bot50": (4, [F, F, F, F, T, T, T, T]),
    "bot75": (6, [F, F, F, F, F, F, T, T]),
    "top25": (0, [T, T, T, T, T, T, F, F]),
    "top50": (0, [T, T, T, T, F, F, F, F]),
    "top75": (0, [T, T, F, F, F, F, F, F]),
    "int25": (0, [T, T, T, F, T, T, T, F]),
    "int50": (0, [T, F, T, F, T, F, T, F]),
    "int75": (0, [T, F, F, F, T, F, F, F]),
    "adt-low": (0, [T, T, T, T, T, T, T, T]),  # before the warm-up steps end
    "adt-high": (0, [T, T, T, T, T, T, T, T]),
}


@pytest.mark.parametrize("name", list(STATIC_MASKS))
def test_static_masks_m8(name):
    depth, mask = STATIC_MASKS[name]
    plans = all_plans(started(name))
    assert {p.depth for p in plans} == {depth}
    assert all(p.trainable == mask for p in plans)


def test_uses_lora_flags():
    assert make_strategy("full").uses_lora is False
    assert make_strategy("lora-full").uses_lora is True
    assert make_strategy("lora-half").uses_lora == "half"
    assert make_strategy("salf", budget="geom", lora=True).uses_lora is True


def test_interleaved_layers_documented():
    assert interleaved_frozen(0.25, 8) == [3, 7]
    assert interleaved_frozen(0.5, 8) == [1, 3, 5, 7]
    assert interleaved_frozen(0.75, 8) == [1, 2, 3, 5, 6, 7]
    assert interleaved_frozen(0.25, 32) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert len(interleaved_frozen(0.25, 30)) == 7  # floor(7.5)


def test_generic_fraction_names():
    s = started("bot", freeze_fraction=0.3, m=10)
    assert all_plans(s)[0].trainable == [F, F, F, T, T, T, T, T, T, T]
    s = started("top", freeze_fraction=0.3, m=10)
    assert all_plans(s)[0].trainable == [T, T, T, T, T, T, T, F, F, F]
    assert started("bot25", freeze_fraction=0.25).label == "bot25"


# ---------------------------------------------------------------- per-sample depths


@pytest.mark.parametrize("name", ["lift-half", "lift-star-half"])
def test_lift_rotation_and_masks(name):
    s = started(name, n=64)  # uniform quotas: u = 8 samples per depth, 2 batches of 4 each
    plans = all_plans(s, batch_size=4)
    assert [p.depth for p in plans] == list(range(8)) * 2  # front-to-end, twice
    for p in plans:
        if name == "lift-half":
            assert p.trainable == [i == p.depth for i in range(8)]
        else:
            assert p.trainable == [i >= p.depth for i in range(8)]
    assert Counter(s.depths) == Counter({k: 8 for k in range(8)})
    assert not s.needs_profile


def test_lift_uses_uniform_quotas_with_partial_share():
    s = started("lift-half", n=10, m=4)  # u = 3: quotas [3, 3, 3, 1]
    assert [Counter(s.depths)[k] for k in range(4)] == budget_quotas("uniform", "bf", 4, 10) == [3, 3, 3, 1]
    plans = all_plans(s, batch_size=2)
    assert [p.depth for p in plans] == [0, 1, 2, 3, 0, 1, 2]
    assert [len(p.indices) for p in plans] == [2, 2, 2, 1, 1, 1, 1]


@pytest.mark.parametrize(
    ("budget", "infill"), [(b, o) for b in ("uniform", "arith", "geom") for o in ("bf", "df")]
)
def test_budgeted_salf_depths_and_order(budget, infill):
    n = 200
    eofs = eofs_for(n)
    s = make_strategy("salf", budget=budget, infill=infill, seed=3)
    assert s.needs_profile and not s.needs_observe
    s.begin(M, n, eofs, 3)
    assert s.depths == assign_depths(eofs, budget, infill, M, seed=3)
    plans = all_plans(s, batch_size=8)
    depths = [p.depth for p in plans]
    if infill == "bf":
        assert depths == sorted(depths)
    else:  # rounds of ascending depths, each round a subset of the previous one
        rounds, current = [], []
        for d in depths:
            if current and d <= current[-1]:
                rounds.append(current)
                current = []
            current.append(d)
        rounds.append(current)
        assert all(set(b) <= set(a) for a, b in zip(rounds, rounds[1:], strict=False))
    for p in plans:
        assert p.trainable == [i >= p.depth for i in range(M)]
        assert all(s.depths[i] == p.depth for i in p.indices)
    assert round(s.realized_saving(), 6) == round(cost_saving_ratio(s.depths, M), 6)


def test_algorithm3_salf_uses_eofs_and_observe_refreshes_next_epoch():
    n = 40
    eofs = eofs_for(n)
    eofs[0] = M  # eof m (frozen boundary) clamps to m-1
    s = make_strategy("salf")
    assert s.needs_profile and s.needs_observe
    s.begin(M, n, eofs, 0)
    assert s.depths == [min(e, M - 1) for e in eofs]
    plans = iter(s.epoch_plans(0, 4))
    first = next(plans)
    # deviations with the biggest drop across layers[5] -> eof 5
    dev = torch.ones(len(first.indices), M + 1)
    dev[:, 6:] = 0.2
    s.observe(first.indices, dev)
    rest = list(plans)  # the running epoch keeps its snapshot
    assert all(p.depth == eofs[p.indices[0]] or eofs[p.indices[0]] == M for p in rest)
    assert all(s.depths[i] == 5 for i in first.indices)
    s.observe(torch.tensor([1, 2]), torch.tensor([0, 7]))
    assert s.depths[1] == 0 and s.depths[2] == 7
    nxt = [p for p in all_plans(s, epoch=1) if 1 in p.indices or first.indices[0] in p.indices]
    assert {p.depth for p in nxt if 1 in p.indices} == {0}


def test_observe_frozen_boundary():
    s = make_strategy("salf", boundary="frozen")
    s.begin(4, 2, [0, 0], 0)
    dev = torch.tensor([[1.0, 0.9, 0.2, 0.1, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    s.observe([0, 1], dev)
    assert s.depths == [2, 3]  # argmax gain 1 -> 2; argmax gain 3 -> 4, clamped to m-1


@pytest.mark.parametrize(
    "options",
    [
        dict(name="full"),
        dict(name="lora-half"),
        dict(name="lift-half"),
        dict(name="lift-star-half"),
        dict(name="salf"),
        dict(name="salf", budget="geom", infill="df"),
        dict(name="int75"),
        dict(name="adt-high"),
    ],
)
def test_every_sample_once_per_epoch_and_one_depth_per_plan(options):
    n = 37
    s = make_strategy(**options)
    s.begin(M, n, eofs_for(n) if s.needs_profile else None, 1)
    for epoch in range(2):
        plans = all_plans(s, epoch=epoch, batch_size=5)
        seen = [i for p in plans for i in p.indices]
        assert sorted(seen) == list(range(n))
        for p in plans:
            assert 1 <= len(p.indices) <= 5
            assert p.trainable is not None and len(p.trainable) == M
            assert p.trainable[p.depth] and not any(p.trainable[: p.depth])
            if hasattr(s, "depths"):
                assert {s.depths[i] for i in p.indices} == {p.depth}
    # shuffled differently each epoch, identical for the same seed
    again = make_strategy(**options)
    again.begin(M, n, eofs_for(n) if again.needs_profile else None, 1)
    assert [p.indices for p in all_plans(again, 1, 5)] == [p.indices for p in all_plans(s, 1, 5)]
    assert [p.indices for p in all_plans(s, 0, 5)] != [p.indices for p in all_plans(s, 1, 5)]


def test_realized_saving():
    assert started("full").realized_saving() == 0.0  # nothing yielded yet
    s = started("bot75")
    all_plans(s)
    assert s.realized_saving() == pytest.approx(6 / 8)
    s = started("top50")
    all_plans(s)
    assert s.realized_saving() == 0.0 and s.realized_frozen_fraction() == pytest.approx(0.5)
    s = started("lift-half", n=64)
    all_plans(s)
    assert s.realized_saving() == pytest.approx(3.5 / 8)
    assert s.realized_frozen_fraction() == pytest.approx(7 / 8)
    s = started("salf", n=16000, m=32, budget="geom", infill="df")
    all_plans(s, batch_size=64)
    assert round(s.realized_saving(), 3) == 0.616
    s.begin(32, 16000, eofs_for(16000, 32), 0)
    assert s.realized_saving() == 0.0  # begin resets the tally


# ---------------------------------------------------------------- ADT


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(4, 4))
        self.b = nn.Parameter(torch.zeros(4))


@pytest.mark.parametrize(("mode", "expected"), [("low", [0, 2, 5, 7]), ("high", [1, 3, 4, 6])])
def test_adt_freezes_layers_by_weight_change(mode, expected):
    layers = nn.ModuleList(Layer() for _ in range(M))
    s = make_strategy(f"adt-{mode}")
    assert isinstance(s, AdaptiveStrategy)
    s.begin(M, 32, None, 0)
    s.on_train_start(layers)
    # layer i: ||delta a||_2 = 4 * c_i (all 16 entries c_i), ||delta b|| = 2 * c_i -> mean 3 c_i
    change = [0.1, 5.0, 0.3, 2.0, 4.0, 0.2, 3.0, 0.05]
    with torch.no_grad():
        for layer, c in zip(layers, change, strict=True):
            layer.a.add_(c)
            layer.b.sub_(c)
    assert s.layer_weight_changes() == pytest.approx([3 * c for c in change])
    plans = iter(s.epoch_plans(0, 4))
    for step in range(1, 5):
        assert next(plans).trainable == [T] * M
        s.after_step(step, layers)
        assert s.frozen_layers is None
    s.after_step(5, layers)
    assert s.frozen_layers == expected
    mask = [i not in expected for i in range(M)]
    later = list(plans)
    assert all(p.trainable == mask for p in later)
    assert {p.depth for p in later} == {mask.index(True)}
    s.after_step(6, layers)  # decided once
    assert s.frozen_layers == expected


def test_adt_only_counts_trainable_params_and_needs_snapshot():
    layers = nn.ModuleList(Layer() for _ in range(4))
    s = make_strategy("adt-low", freeze_fraction=0.25, adt_steps=1)
    s.begin(4, 8, None, 0)
    with pytest.raises(RuntimeError, match="on_train_start"):
        s.after_step(1, layers)
    for layer in layers:
        layer.b.requires_grad_(False)
    s.on_train_start(layers)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.a.add_([1.0, 0.5, 2.0, 3.0][i])
            layer.b.add_(100.0)  # frozen parameter: ignored
    s.after_step(1, layers)
    assert s.frozen_layers == [1]


# ---------------------------------------------------------------- masks on a real model forward/backward


@pytest.fixture(scope="module")
def llama8():
    """The tiny 8-layer llama; one intra-op thread (tiny matmuls crawl when a busy CPU is oversubscribed)."""
    from tiny_models import tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model("llama", num_layers=M)
    torch.set_num_threads(threads)


def _apply(model, mask: list[bool]) -> None:
    model.requires_grad_(False)
    for layer, flag in zip(model.model.layers, mask, strict=True):
        layer.requires_grad_(flag)


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in ("bot", "top", "int")])
def test_masks_give_grads_to_exactly_the_trainable_layers(name, llama8):
    model = llama8
    s = started(name, n=32)
    s.on_train_start(model.model.layers)
    plans = all_plans(s, batch_size=4)
    chosen = {p.depth: p for p in plans}  # one plan per distinct depth
    for plan in chosen.values():
        _apply(model, plan.trainable)
        model.zero_grad(set_to_none=True)
        ids = torch.randint(4, 60, (2, 6))
        model(input_ids=ids).logits[:, -1].sum().backward()
        for i, layer in enumerate(model.model.layers):
            grads = [p.grad for p in layer.parameters()]
            if plan.trainable[i]:
                assert all(g is not None and g.abs().sum() > 0 for g in grads), (name, i)
            else:
                assert all(g is None for g in grads), (name, i)


def test_lora_half_mask_selects_adapter_layers(llama8):
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_model

    s = started("lora-half", n=8)
    plan = all_plans(s)[0]
    wanted = [i for i, t in enumerate(plan.trainable) if t]
    assert wanted == [4, 5, 6, 7]
    model = get_peft_model(
        tiny_model("llama", num_layers=M),
        LoraConfig(
            r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=wanted, init_lora_weights=False
        ),
    )
    model(input_ids=torch.randint(4, 60, (2, 6))).logits[:, -1].sum().backward()
    with_grad = sorted(
        {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.grad is not None}
    )
    assert with_grad == wanted


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_strategy("sallf"), r"unknown strategy 'sallf'; valid strategies: full, lora-full"),
        (lambda: make_strategy("full", budget="geom"), r"budget plan only applies to strategy 'salf'"),
        (lambda: make_strategy("lift-half", budget="uniform"), r"only applies to strategy 'salf'"),
        (
            lambda: make_strategy("salf", budget="linear"),
            r"unknown budget plan 'linear'.*uniform, arith, geom",
        ),
        (lambda: make_strategy("salf", budget="geom", infill="zz"), r"unknown infilling order 'zz'.*bf, df"),
        (lambda: make_strategy("salf", boundary="middle"), r"unknown eof boundary"),
        (lambda: make_strategy("bot"), r"needs freeze_fraction"),
        (lambda: make_strategy("bot25", freeze_fraction=0.5), r"contradicts"),
        (lambda: make_strategy("full", freeze_fraction=0.5), r"only applies to bot/top/int/adt"),
        (lambda: make_strategy("top", freeze_fraction=1.0), r"strictly between 0 and 1"),
        (lambda: make_strategy("adt-low", adt_steps=0), r"adt_steps"),
        (lambda: started("bot25", m=2), r"bot25 freezes floor\(0.25 \* 2\) = 0 of the model's 2 layers"),
        (lambda: started("int25", m=3), r"= 0 of the model's 3 layers"),
        (lambda: started("adt-high", freeze_fraction=0.25, m=3), r"freezes floor"),
        (lambda: started("lora-half", m=1), r"at least 2 layers"),
        (lambda: make_strategy("salf").begin(8, 4, None, 0), r"needs per-sample eofs"),
        (lambda: make_strategy("salf").begin(8, 4, [0, 1], 0), r"got 2 eofs for 4 samples"),
        (lambda: make_strategy("salf").begin(8, 2, [0, 9], 0), r"eofs must lie in 0\.\.8"),
        (lambda: make_strategy("full").begin(0, 4), r"num_layers must be"),
        (lambda: make_strategy("full").begin(8, 0), r"num_samples must be"),
        (lambda: started("full").epoch_plans(0, 0), r"batch_size must be an integer >= 1"),
    ],
)
def test_bad_settings_raise_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_fractions_round_down_and_may_leave_one_layer():
    assert all_plans(started("bot75", m=2))[0].trainable == [F, T]
    assert all_plans(started("top", freeze_fraction=0.99, m=8))[0].trainable == [T, F, F, F, F, F, F, F]


def test_epoch_plans_before_begin():
    with pytest.raises(RuntimeError, match="begin"):
        make_strategy("full").epoch_plans(0, 4)
