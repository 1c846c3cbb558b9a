"""Strategies: masks, depths, epoch schedules, LIFT rotation, ADT selection, realized savings, errors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from salf_engine.errors import ConfigError
from salf_engine.schedule.budgets import (
    assign_depths,
    assign_depths_by_class,
    assign_depths_by_class_rank,
    budget_quotas,
    cost_saving_ratio,
)
from salf_engine.schedule.strategies import (
    STRATEGIES,
    AdaptiveStrategy,
    MicroBatch,
    StepPlan,
    interleaved_frozen,
    make_strategy,
    pack_steps,
    round_to_levels,
)
from salf_engine.training.cost import CostMeter

T, F = True, False
M = 8


def eofs_for(n: int, m: int = M, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, m, (n,), generator=gen).tolist()


def started(name: str, n: int = 64, m: int = M, labels=None, **options):
    s = make_strategy(name, **options)
    s.begin(m, n, eofs_for(n, m) if s.needs_profile else None, 0, labels=labels)
    return s


def all_plans(s, epoch: int = 0, batch_size: int = 4, micro: int | None = None) -> list[StepPlan]:
    return list(s.epoch_plans(epoch, batch_size, micro))


def metered(plans: list[StepPlan], m: int = M) -> CostMeter:
    """What the training loop counts of these plans: every row at its own cut, with its forward's mask."""
    meter = CostMeter(m, lora=False)
    for plan in plans:
        meter.add_plan(plan)
    return meter


def saving(plans: list[StepPlan], m: int = M) -> float:
    return metered(plans, m).saving()


def micro_batches(s, epoch: int = 0, batch_size: int = 4) -> list[MicroBatch]:
    return [mb for p in all_plans(s, epoch, batch_size) for mb in p.micro_batches]


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
    mbs = micro_batches(started(name))
    assert {mb.depth for mb in mbs} == {depth}
    assert all(mb.trainable == mask for mb in mbs)


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
    assert micro_batches(s)[0].trainable == [F, F, F, T, T, T, T, T, T, T]
    s = started("top", freeze_fraction=0.3, m=10)
    assert micro_batches(s)[0].trainable == [T, T, T, T, T, T, T, F, F, F]
    assert started("bot25", freeze_fraction=0.25).label == "bot25"


# ---------------------------------------------------------------- packing steps


def test_pack_steps_fills_every_step_and_splits_where_needed():
    mbs = [MicroBatch([1, 2, 3], 0, [T]), MicroBatch([4], 1, [T]), MicroBatch([5, 6, 7, 8, 9], 2, [T])]
    steps = list(pack_steps(iter(mbs), 4, 2))
    assert [len(p) for p in steps] == [4, 4, 1]
    assert [[mb.indices for mb in p.micro_batches] for p in steps] == [
        [[1, 2], [3], [4]], [[5, 6], [7, 8]], [[9]]]
    assert [p.depths for p in steps] == [[0, 0, 1], [2, 2], [2]]


def test_step_size_counts_examples_for_every_strategy():
    """Every strategy's epoch has ceil(N / step) steps of exactly `step` examples (the last aside)."""
    n, step = 101, 8
    for name, opts in [("full", {}), ("bot50", {}), ("lift-star-half", {}), ("salf", {}),
                       ("salf", dict(budget="none")), ("salf", dict(budget="arith", infill="df")),
                       ("salf", dict(budget="geom")),
                       ("adt-low", {}), ("salf", dict(budget="uniform", schedule="paper"))]:
        s = started(name, n=n, **opts)
        sizes = [len(p) for p in all_plans(s, batch_size=step)]
        assert sizes == [step] * (n // step) + [n % step], (name, opts)


# ---------------------------------------------------------------- per-sample depths


@pytest.mark.parametrize("name", ["lift-half", "lift-star-half"])
def test_lift_rotation_and_masks(name):
    s = started(name, n=64, cuts_per_step=1)  # uniform quotas: 8 samples per depth, 2 micro-batches of 4
    mbs = micro_batches(s, batch_size=4)
    assert [mb.depth for mb in mbs] == list(range(8)) * 2  # front-to-end, twice
    for mb in mbs:
        if name == "lift-half":
            assert mb.trainable == [i == mb.depth for i in range(8)]
        else:
            assert mb.trainable == [i >= mb.depth for i in range(8)]
    assert Counter(s.depths) == Counter({k: 8 for k in range(8)})
    assert not s.needs_profile


def test_lift_uses_uniform_quotas_with_partial_share():
    s = started("lift-half", n=10, m=4, cuts_per_step=1)  # u = 3: quotas [3, 3, 3, 1]
    assert [Counter(s.depths)[k] for k in range(4)] == budget_quotas("uniform", "bf", 4, 10) == [3, 3, 3, 1]
    mbs = micro_batches(s, batch_size=2)
    assert all(s.depths[i] >= mb.depth for mb in mbs for i in mb.indices)  # never frozen deeper
    assert sum(len(mb.indices) for mb in mbs) == 10


def classes_for(n: int, k: int = 4, seed: int = 1) -> list[int]:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(
    ("budget", "infill"), [(b, o) for b in ("uniform", "arith", "geom") for o in ("bf", "df")]
)
def test_budgeted_salf_depths_cost_and_mixed_steps(budget, infill):
    n = 200
    eofs, labels = eofs_for(n), classes_for(n)
    s = make_strategy("salf", budget=budget, infill=infill, seed=3, schedule="mixed")
    assert s.needs_profile and s.needs_observe
    s.begin(M, n, eofs, 3, labels=labels)
    assert s.depths == assign_depths_by_class(eofs, labels, budget, infill, M, seed=3)
    plans = all_plans(s, batch_size=8)
    for p in plans:
        assert len(p.micro_batches) <= 4 and all(len(mb.indices) <= 2 for mb in p.micro_batches)
        for mb in p.micro_batches:
            assert mb.trainable == [i >= mb.depth for i in range(M)]
            assert all(s.depths[i] >= mb.depth for i in mb.indices)  # a run's cut is its lowest depth
    # the cost is the budget's, up to the runs that straddle two depths
    assert saving(plans) <= cost_saving_ratio(s.depths, M) + 1e-9
    assert saving(plans) == pytest.approx(cost_saving_ratio(s.depths, M), abs=0.02)


def test_eof_match_assignment_option():
    n = 120
    eofs, labels = eofs_for(n), classes_for(n)
    s = make_strategy("salf", budget="arith", infill="df", assignment="eof-match", seed=2)
    s.begin(M, n, eofs, 2, labels=labels)
    assert s.depths == assign_depths(eofs, "arith", "df", M, seed=2)


def test_every_salf_step_mixes_classes():
    """The eof follows the class: even so, every optimizer step holds several classes."""
    n, m = 480, 30
    labels = [i % 6 for i in range(n)]
    eofs = [min(m, 3 * y + (i % 3)) for i, y in enumerate(labels)]  # each class its own few eofs
    for options in [dict(budget="uniform", infill="df", schedule="per-row"),
                    dict(budget="arith", infill="df", schedule="per-row"),
                    dict(budget="geom", infill="bf", schedule="per-row"), dict(budget="none")]:
        s = make_strategy("salf", **options)
        s.begin(m, n, eofs, 0, labels=labels)
        plans = all_plans(s, batch_size=8)
        assert all(len(p) == 8 for p in plans)
        for p in plans:
            assert len({labels[i] for i in p.indices}) > 1, options
        if options["budget"] != "none":  # budgeted: every class trains at most of the budget's depths
            used = set(s.depths)
            for y in range(6):
                mine = {s.depths[i] for i in range(n) if labels[i] == y}
                assert len(mine) >= len(used) / 2, (options, y, sorted(mine), sorted(used))


def test_bf_df_change_quotas_not_the_visit_order():
    n = 300
    eofs, labels = eofs_for(n), classes_for(n)
    plans = {}
    for infill in ("bf", "df"):
        s = make_strategy("salf", budget="geom", infill=infill, schedule="per-row")
        s.begin(M, n, eofs, 0, labels=labels)
        plans[infill] = s
        assert Counter(s.depths) == Counter(
            {k: q for k, q in enumerate(budget_quotas("geom", infill, M, n)) if q})
    assert Counter(plans["bf"].depths) != Counter(plans["df"].depths)
    # the same visit pattern: micro-batches shuffled over the whole epoch in both
    for s in plans.values():
        depths = [mb.depth for mb in micro_batches(s, batch_size=8)]
        assert depths != sorted(depths)
    for infill in ("bf", "df"):  # and the paper schedule ascends under both
        s = make_strategy("salf", budget="geom", infill=infill, schedule="paper")
        s.begin(M, n, eofs, 0, labels=labels)
        depths = [mb.depth for mb in micro_batches(s, batch_size=8)]
        assert depths == sorted(depths)


def test_paper_schedule_follows_algorithm4():
    """Depth 0 first, ascending; a depth-k quota takes unused samples whose eof, recomputed at the visit
    through `probe`, is <= k first (the cached eofs say whom to recompute), then random unused ones."""
    n, m = 40, 4
    eofs = [i % 4 for i in range(n)]  # 10 per eof: every quota (10) can be met by matching alone
    s = make_strategy("salf", budget="uniform", infill="bf", schedule="paper")
    s.begin(m, n, eofs, 0)
    fresh = list(eofs)
    fresh[0] = fresh[4] = 1  # the model moved on: these two settle one layer higher now
    asked: list[int] = []

    def probe(indices):
        asked.extend(indices)
        return [fresh[i] for i in indices]

    s.probe = probe
    mbs = micro_batches(s, batch_size=5)
    depths = [mb.depth for mb in mbs]
    assert depths == sorted(depths) and set(depths) == {0, 1, 2, 3}
    trained_at = {i: mb.depth for mb in mbs for i in mb.indices}
    assert sorted(trained_at) == list(range(n))
    assert Counter(trained_at.values()) == Counter(dict(enumerate(budget_quotas("uniform", "bf", m, n))))
    # depth 0: the 8 samples still at eof 0, plus 2 random unused ones (not 0 or 4 unless drawn at random)
    assert {i for i in range(8, n, 4)} <= {i for i, d in trained_at.items() if d == 0}
    assert all(eofs[i] <= trained_at[i] or trained_at[i] == 0 for i in asked)
    assert s.eofs[0] == 1 and s.eofs[4] == 1 and s.probed == len(asked) >= n // 2


def test_algorithm3_salf_uses_eofs_and_observe_refreshes_next_epoch():
    n = 40
    eofs = eofs_for(n)
    eofs[0] = M  # eof m (frozen boundary) clamps to m-1
    s = make_strategy("salf", budget="none")
    assert s.needs_profile and s.needs_observe
    s.begin(M, n, eofs, 0)
    assert s.depths == [min(e, M - 1) for e in eofs]
    plans = iter(s.epoch_plans(0, 4))
    first = next(plans).micro_batches[0]
    # deviations with the biggest drop across layers[5] -> eof 5
    dev = torch.ones(len(first.indices), M + 1)
    dev[:, 6:] = 0.2
    s.observe(first.indices, dev)
    rest = [mb for p in plans for mb in p.micro_batches]  # the running epoch keeps its depths
    assert all(mb.depth == min(min(eofs[i], M - 1) for i in mb.indices) for mb in rest)
    s.observe(torch.tensor([1, 2]), torch.tensor([0, 7]))
    micro_batches(s, epoch=1)
    assert all(s.depths[i] == 5 for i in first.indices if i not in (1, 2))
    assert s.depths[1] == 0 and s.depths[2] == 7


def test_unprofiled_samples_get_depths():
    n = 30
    eofs = [None if i % 3 else e for i, e in enumerate(eofs_for(n))]
    labels = classes_for(n, 3)
    for options in [dict(budget="none"), dict(budget="uniform", schedule="per-row"),
                    dict(budget="arith", assignment="eof-match")]:
        s = make_strategy("salf", **options)
        s.begin(M, n, eofs, 0, labels=labels)
        assert len(s.depths) == n and all(0 <= d < M for d in s.depths)
    with pytest.raises(ConfigError, match="no profiled eof"):
        make_strategy("salf", budget="none").begin(M, 3, [None] * 3, 0)


def test_observe_frozen_boundary():
    s = make_strategy("salf", budget="none", boundary="frozen")
    s.begin(4, 2, [0, 0], 0)
    dev = torch.tensor([[1.0, 0.9, 0.2, 0.1, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0]])
    s.observe([0, 1], dev)
    micro_batches(s, epoch=1)
    assert s.depths == [2, 3]  # argmax gain 1 -> 2; argmax gain 3 -> 4, clamped to m-1


@pytest.mark.parametrize(
    "options",
    [
        dict(name="full"),
        dict(name="lora-half"),
        dict(name="lift-half"),
        dict(name="lift-star-half"),
        dict(name="salf", budget="none"),
        dict(name="salf", budget="geom", infill="df", schedule="per-row"),
        dict(name="salf", budget="arith", schedule="paper"),
        dict(name="int75"),
        dict(name="adt-high"),
    ],
)
def test_every_sample_once_per_epoch_and_one_cut_per_micro_batch(options):
    n = 37
    s = make_strategy(**options)
    s.begin(M, n, eofs_for(n) if s.needs_profile else None, 1, labels=classes_for(n))
    for epoch in range(2):
        plans = all_plans(s, epoch=epoch, batch_size=5)
        seen = [i for p in plans for i in p.indices]
        assert sorted(seen) == list(range(n))
        for p in plans:
            assert 1 <= len(p) <= 5
            for mb in p.micro_batches:
                assert len(mb.trainable) == M
                assert mb.trainable[mb.depth] and not any(mb.trainable[: mb.depth])
                if hasattr(s, "depths"):
                    assert all(s.depths[i] >= mb.depth for i in mb.indices)
    # shuffled differently each epoch, identical for the same seed
    again = make_strategy(**options)
    again.begin(M, n, eofs_for(n) if again.needs_profile else None, 1, labels=classes_for(n))
    assert [p.indices for p in all_plans(again, 1, 5)] == [p.indices for p in all_plans(s, 1, 5)]
    assert [p.indices for p in all_plans(s, 0, 5)] != [p.indices for p in all_plans(s, 1, 5)]


def test_realized_saving_and_frozen_fraction_of_the_plans():
    assert CostMeter(M, lora=False).saving() == 0.0  # nothing trained yet
    assert saving(all_plans(started("bot75"))) == pytest.approx(6 / 8)
    top = metered(all_plans(started("top50")))
    assert top.saving() == 0.0 and top.frozen_fraction() == pytest.approx(0.5)
    lift = metered(all_plans(started("lift-half", n=64)))
    assert lift.saving() == pytest.approx(3.5 / 8)  # depths 0..7, 8 samples each
    assert lift.frozen_fraction() == pytest.approx(7 / 8)  # one layer trains
    s = started("salf", n=16000, m=32, budget="geom", infill="df", cuts_per_step=1, schedule="mixed")
    # runs of 64 straddling two depths cost a little of geom-df's 0.616
    assert 0.612 < saving(all_plans(s, batch_size=64), m=32) <= 0.616


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
        assert next(plans).micro_batches[0].trainable == [T] * M
        s.after_step(step, layers)
        assert s.frozen_layers is None
    s.after_step(5, layers)
    assert s.frozen_layers == expected
    mask = [i not in expected for i in range(M)]
    later = [mb for p in plans for mb in p.micro_batches]
    assert all(mb.trainable == mask for mb in later)
    assert {mb.depth for mb in later} == {mask.index(True)}
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
    chosen = {mb.depth: mb for mb in micro_batches(s, batch_size=4)}  # one per distinct depth
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
    plan = micro_batches(s)[0]
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
        (lambda: make_strategy("salf", budget="none", infill="df"),
         r"infilling order 'df' fills a budget plan's shares"),
        (lambda: make_strategy("salf", schedule="fast"), r"unknown depth schedule 'fast'"),
        (lambda: make_strategy("salf", assignment="x"), r"unknown depth assignment 'x'"),
        (lambda: make_strategy("salf", cuts_per_step=0), r"cuts_per_step must be a positive integer"),
        (lambda: make_strategy("bot"), r"needs freeze_fraction"),
        (lambda: make_strategy("bot25", freeze_fraction=0.5), r"contradicts"),
        (lambda: make_strategy("full", freeze_fraction=0.5), r"only applies to bot/top/int/adt"),
        (lambda: make_strategy("top", freeze_fraction=1.0), r"strictly between 0 and 1"),
        (lambda: make_strategy("adt-low", adt_steps=0), r"adt_steps"),
        (lambda: started("bot25", m=2), r"bot25 freezes floor\(0.25 \* 2\) = 0 of the model's 2 layers"),
        (lambda: started("int25", m=3), r"= 0 of the model's 3 layers"),
        (lambda: started("adt-high", freeze_fraction=0.25, m=3), r"freezes floor"),
        (lambda: started("lora-half", m=1), r"at least 2 layers"),
        (lambda: make_strategy("salf", budget="none").begin(8, 4, None, 0), r"needs per-sample eofs"),
        (lambda: make_strategy("salf", budget="none").begin(8, 4, [0, 1], 0), r"got 2 eofs for 4 samples"),
        (lambda: make_strategy("salf", budget="none").begin(8, 2, [0, 9], 0), r"eofs must lie in 0\.\.8"),
        (lambda: make_strategy("full").begin(0, 4), r"num_layers must be"),
        (lambda: make_strategy("full").begin(8, 0), r"num_samples must be"),
        (lambda: started("full").epoch_plans(0, 0), r"step_size \(batch_size\) must be a positive integer"),
        (lambda: make_strategy("full").begin(8, 2, labels=[0]), r"got 1 labels for 2 samples"),
    ],
)
def test_bad_settings_raise_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_fractions_round_down_and_may_leave_one_layer():
    assert micro_batches(started("bot75", m=2))[0].trainable == [F, T]
    assert micro_batches(started("top", freeze_fraction=0.99, m=8))[0].trainable == [T, F, F, F, F, F, F, F]


def test_epoch_plans_before_begin():
    with pytest.raises(RuntimeError, match="begin"):
        make_strategy("full").epoch_plans(0, 4)


# ------------------------------------------------------------------------------ per-row schedule


def test_per_row_steps_take_the_static_order_with_each_row_at_its_depth():
    n = 40
    eofs, labels = eofs_for(n), classes_for(n)
    salf = make_strategy("salf", budget="uniform", schedule="per-row", seed=5)
    salf.begin(M, n, eofs, 5, labels=labels)
    bot = make_strategy("bot50", seed=5)
    bot.begin(M, n, None, 5, labels=labels)
    plans, static = all_plans(salf, batch_size=8, micro=4), all_plans(bot, batch_size=8, micro=4)
    # the same examples in the same steps and forwards as the static freeze of the same seed
    assert [mb.indices for p in plans for mb in p.micro_batches] == \
        [mb.indices for p in static for mb in p.micro_batches]
    for p in plans:
        assert len(p) == 8 and [len(mb.indices) for mb in p.micro_batches] == [4, 4]
        for mb in p.micro_batches:
            assert mb.row_depths == [salf.depths[i] for i in mb.indices]
            assert mb.depth == min(mb.row_depths) and mb.trainable == [i >= mb.depth for i in range(M)]
    # one epoch trains every sample once at its own depth: the saving is the budget's, exactly
    assert saving(plans) == pytest.approx(cost_saving_ratio(salf.depths, M), abs=1e-12)


def test_round_to_levels_hand_computed():
    depths = [0, 1, 2, 7, 7, 3]
    assert round_to_levels(depths, None) == depths
    assert round_to_levels(depths, 5) == depths  # five distinct values fit five levels
    # two levels: {0, 7} keeps 14 (= 7 + 7) of the depth, {0, 3} keeps 9, {0, 2} keeps 8
    assert round_to_levels(depths, 2) == [0, 0, 0, 7, 7, 0]
    # three: {0, 2, 7} keeps 18 (2 + 2 + 14), {0, 3, 7} 17, {0, 1, 7} 17
    assert round_to_levels(depths, 3) == [0, 0, 2, 7, 7, 2]
    assert round_to_levels([4, 4, 1], 1) == [1, 1, 1]


def test_cut_levels_bound_the_distinct_cuts_of_every_forward():
    n = 64
    s = started("salf", n=n, budget="geom", infill="df", schedule="per-row", cut_levels=2)
    plans = all_plans(s, batch_size=16, micro=8)
    for p in plans:
        for mb in p.micro_batches:
            assert len(set(mb.row_depths)) <= 2
            assert all(r <= s.depths[i] for r, i in zip(mb.row_depths, mb.indices, strict=True))
    # the rounding is counted: the realized saving falls below the budget's
    assert saving(plans) < cost_saving_ratio(s.depths, M)


# ------------------------------------------------------------------------- time-varying depth (issue 19)


@pytest.mark.parametrize("schedule", ["narrowing", "widening"])
def test_time_varying_depth_follows_the_position_in_the_epoch(schedule):
    # m = 4, N = 8, uniform budget: two slots at each depth 0..3 (hand-computed quotas [2, 2, 2, 2])
    s = make_strategy("salf", budget="uniform", schedule=schedule, seed=0)
    assert not s.needs_profile and not s.needs_observe
    s.begin(4, 8, None, 0, labels=[0, 1] * 4)
    bot = make_strategy("bot50", seed=0)
    bot.begin(4, 8, None, 0, labels=[0, 1] * 4)
    trained = []
    for epoch in (0, 1):
        plans = list(s.epoch_plans(epoch, 4, 2))
        trained += plans
        # the same samples in the same steps as the static freeze of the same seed ...
        assert [mb.indices for p in plans for mb in p.micro_batches] == \
            [mb.indices for p in bot.epoch_plans(epoch, 4, 2) for mb in p.micro_batches]
        # ... and the forward k of the epoch (2 rows) at depth k (narrowing) or 3 - k (widening), every epoch
        want = [0, 1, 2, 3] if schedule == "narrowing" else [3, 2, 1, 0]
        got = [(mb.depth, mb.row_depths) for p in plans for mb in p.micro_batches]
        assert got == [(d, [d, d]) for d in want]
        masks = [mb.trainable for p in plans for mb in p.micro_batches]
        assert masks[want.index(1)] == [F, T, T, T]
    assert saving(trained, m=4) == pytest.approx((0 + 1 + 2 + 3) / 4 / 4)


def test_time_varying_depth_splits_a_forward_at_the_position_boundary():
    # m = 4, N = 6, arith bf quotas for 6 samples, in depth order: the forwards of 4 rows straddle depths
    s = make_strategy("salf", budget="arith", schedule="narrowing", seed=1)
    s.begin(4, 6, None, 1)
    quotas = budget_quotas("arith", "bf", 4, 6)
    ascending = [d for d, q in enumerate(quotas) for _ in range(q)]
    rows = [mb.row_depths for p in s.epoch_plans(0, 4, 4) for mb in p.micro_batches]
    assert rows == [ascending[:4], ascending[4:]]


@pytest.mark.parametrize("schedule", ["narrowing", "widening", "paper"])
def test_time_varying_schedules_need_a_budget(schedule):
    with pytest.raises(ConfigError, match=f"'{schedule}' schedule .* needs a salf budget plan"):
        make_strategy("salf", budget="none", schedule=schedule)


# ------------------------------------------------------------------------ loss-ranked depth (issue 19)


def test_class_rank_by_key_hand_computed():
    # m = 2, uniform: quotas [2, 2]; inside each class the lower key takes the lower depth
    labels, keys = [0, 0, 1, 1], [0.5, 0.1, 0.9, 0.2]
    assert assign_depths_by_class_rank(keys, labels, "uniform", "bf", 2) == [1, 0, 1, 0]
    # ranking by eof is the same function over the eofs
    assert assign_depths_by_class([2, 0, 2, 1], labels, "uniform", "bf", 2) == [1, 0, 1, 0]


def test_loss_rank_trains_the_hardest_sample_of_each_class_deepest_from_the_next_epoch():
    s = make_strategy("salf", budget="uniform", assignment="loss-rank", seed=0)
    assert s.needs_losses and not s.needs_profile and not s.needs_observe
    s.begin(2, 4, None, 0, labels=[0, 0, 1, 1])
    # epoch 0: no loss seen yet, each class spread over both depths (random inside the class)
    first = [Counter(s.depths[i] for i in (0, 1)), Counter(s.depths[i] for i in (2, 3))]
    assert first == [Counter({0: 1, 1: 1})] * 2
    list(s.epoch_plans(0, 4))
    before = list(s.depths)
    s.observe_losses([0, 1, 2, 3], [2.0, 0.5, 0.1, 3.0])
    assert s.depths == before  # nothing moves mid-epoch
    rows = {i: d for p in s.epoch_plans(1, 4) for mb in p.micro_batches
            for i, d in zip(mb.indices, mb.row_depths, strict=True)}
    # class 0: sample 0 (loss 2.0) trains from layer 0, sample 1 (0.5) from 1; class 1: sample 3, then 2
    assert rows == {0: 0, 1: 1, 2: 1, 3: 0}
    # a non-finite loss counts as unseen; the state survives a checkpoint
    s.observe_losses([1], [float("nan")])
    assert s.losses == [2.0, None, 0.1, 3.0]
    copy = make_strategy("salf", budget="uniform", assignment="loss-rank", seed=0)
    copy.begin(2, 4, None, 0, labels=[0, 0, 1, 1])
    copy.load_state_dict(s.state_dict())
    assert copy.losses == s.losses and copy.depths == s.depths
    older = {k: v for k, v in s.state_dict().items() if k != "losses"}  # a checkpoint from before loss rank
    copy.load_state_dict(older)
    assert copy.losses == [None] * 4 and copy.depths == s.depths


@pytest.mark.parametrize("options", [{"budget": "none"}, {"budget": "uniform", "schedule": "narrowing"},
                                     {"budget": "uniform", "schedule": "paper"}], ids=str)
def test_loss_rank_needs_a_budget_and_a_per_row_or_mixed_schedule(options):
    with pytest.raises(ConfigError, match="'loss-rank' assignment .* needs a salf budget plan"):
        make_strategy("salf", assignment="loss-rank", **options)


def test_cost_meter_state_round_trip_and_an_old_checkpoint():
    """The meter's counts survive a checkpoint; one from before the frozen share was counted leaves it
    unknown (None), never silently wrong."""
    meter = metered(all_plans(started("top50")))
    again = CostMeter(M, lora=False)
    again.load_state_dict(meter.state_dict())
    assert again.frozen_fraction() == meter.frozen_fraction() == pytest.approx(0.5)
    assert again.saving() == meter.saving() and again.flops_ratio() == meter.flops_ratio()
    old = {k: v for k, v in meter.state_dict().items() if k != "frozen"}
    again.load_state_dict(old)
    again.add_plan(all_plans(started("top50"))[0])
    assert again.frozen_fraction() is None and again.saving() == 0.0


# ------------------------------------------------------------------ what bare ``salf`` means (issue 38)


def test_default_salf_is_the_uniform_plan_narrowing():
    # m = 4, N = 12, uniform quotas [3, 3, 3, 3] (hand-computed): the rows at positions 0-2 of the epoch train
    # from layer 0, 3-5 from 1, 6-8 from 2, 9-11 from 3; forwards of 4 rows
    for options in ({}, dict(budget="uniform"), dict(budget="uniform", infill="df")):
        s = make_strategy("salf", seed=0, **options)
        assert s.label == f"salf-uniform-{options.get('infill', 'bf')}-narrowing"
        assert not s.needs_profile and not s.needs_observe
        s.begin(4, 12, None, 0, labels=[0, 1, 2] * 4)
        rows = [mb.row_depths for p in s.epoch_plans(0, 4, 4) for mb in p.micro_batches]
        assert rows == [[0, 0, 0, 1], [1, 1, 2, 2], [2, 3, 3, 3]], options


def test_budget_none_is_algorithm3_and_a_given_schedule_or_eof_option_keeps_the_eof_rank():
    alg3 = make_strategy("salf", budget="none")
    assert alg3.label == "salf" and alg3.needs_profile and alg3.needs_observe
    alg3.begin(M, 5, [0, 3, 7, 8, 2], 0)
    assert alg3.depths == [0, 3, 7, 7, 2]  # each sample at its own eof (m clamps to m-1)
    assert make_strategy("salf", budget="none", schedule="mixed").label == "salf"
    # SALF[half] by eof rank: a per-row schedule named, or an option that places rows by eof
    for options in (dict(budget="uniform", schedule="per-row"), dict(assignment="class-rank"),
                    dict(budget="uniform", profile_fraction=0.5), dict(assignment="eof-match"),
                    dict(cut_levels=2)):
        s = make_strategy("salf", **options)
        assert s.label == "salf-uniform-bf" and s.needs_profile, options


@pytest.mark.parametrize(("options", "needle"), [
    (dict(schedule="per-row"), "depth schedule 'per-row' needs the budget plan named: --budget none"),
    (dict(schedule="mixed"), "depth schedule 'mixed' needs the budget plan named"),
    (dict(budget="uniform", schedule="narrowing", assignment="eof-match"),
     "the 'narrowing' schedule places rows by their position in the epoch, not by eof"),
], ids=str)
def test_a_schedule_without_a_budget_or_eof_match_on_narrowing_is_refused(options, needle):
    with pytest.raises(ConfigError, match=needle):
        make_strategy("salf", **options)


def test_tied_eofs_of_one_class_are_placed_at_random_not_in_the_training_order():
    # A prompt/response task has one "class", and on GSM8K every SmolLM2 answer profiles at the same eof
    # (docs/sft.md): the eof rank ties everywhere. Its depths must then be random within the budget. Had
    # they risen with the position in the epoch, the run would be narrowing paid for with a profile (the
    # tie-break's shuffle once repeated the epoch-0 order at seed 0).
    n = 64
    for seed in (0, 1, 2):
        s = make_strategy("salf", budget="uniform", infill="df", schedule="per-row", seed=seed)
        s.begin(M, n, [M - 1] * n, seed, labels=[0] * n)
        depths = [d for mb in micro_batches(s, batch_size=8) for d in mb.row_depths]
        assert Counter(depths) == Counter(s.depths) and len(set(depths)) > 1
        assert depths != sorted(depths), seed


def test_a_profile_whose_eofs_all_tie_says_the_eof_cannot_order_the_rows(monkeypatch):
    from salf_engine.config import TrainConfig
    from salf_engine.schedule.driver import StrategyDriver

    s = make_strategy("salf", budget="uniform", infill="df", schedule="per-row")
    cfg = TrainConfig(profile_fraction=1.0)
    driver = StrategyDriver(s, None, [0] * 6, cfg, pad_id=0)
    said: list[str] = []
    for eofs, warned in (([5] * 6, True), ([5, 5, 5, 5, 5, 4], False)):
        monkeypatch.setattr(driver, "_eofs_of", lambda idx, eofs=eofs, **kw: [eofs[i] for i in idx])
        said.clear()
        driver.profile(say=said.append)
        assert driver.eofs == eofs
        tied = [line for line in said if line.startswith("warning: all 6 profiled examples have eof-layer 5")]
        assert bool(tied) is warned, said
