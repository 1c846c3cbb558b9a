"""Budget plans, infilling orders, eof-matching assignment and the paper's table-5 cost savings."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from salf_engine.errors import ConfigError
from salf_engine.schedule.budgets import (
    assign_depths,
    assign_depths_by_class,
    budget_quotas,
    cost_saving_ratio,
    fill_quotas,
    share_counts,
    share_schedule,
    share_size,
)


def saving(plan: str, order: str, m: int, n: int) -> float:
    quotas = budget_quotas(plan, order, m, n)
    return sum(k * q for k, q in enumerate(quotas)) / (n * m)


# ---------------------------------------------------------------- paper table 5 (m = 32)


def test_uniform_half_carer():
    assert round(saving("uniform", "bf", 32, 16000), 3) == 0.484
    assert round(saving("uniform", "df", 32, 16000), 3) == 0.484
    assert budget_quotas("uniform", "bf", 32, 16000) == [500] * 32


@pytest.mark.parametrize(
    ("n", "bf", "df"),
    [
        (16000, 0.374, 0.616),  # CARER
        (4076, 0.312, 0.583),
        (8544, 0.346, 0.601),
        (5452, 0.328, 0.589),
        (10060, 0.355, 0.604),
    ],
)
def test_geometric_matches_table5(n, bf, df):
    assert round(saving("geom", "bf", 32, n), 3) == bf
    assert round(saving("geom", "df", 32, n), 3) == df
    assert sum(budget_quotas("geom", "bf", 32, n)) == n
    assert sum(budget_quotas("geom", "df", 32, n)) == n


def test_arithmetic_carer():
    assert round(saving("arith", "bf", 32, 16000), 3) == 0.638
    assert round(saving("arith", "df", 32, 16000), 3) == 0.639


def test_geometric_bf_carer_quotas_literal():
    # u = 1: depth k gets 2^k samples until 2^13 - 1 = 8191 are placed; depth 13 takes the rest.
    expected = [1 << k for k in range(13)] + [16000 - 8191] + [0] * 18
    assert budget_quotas("geom", "bf", 32, 16000) == expected


def test_cost_saving_ratio_from_assigned_depths_matches_quotas():
    eofs = [(7 * i) % 33 for i in range(16000)]
    for order, expected in (("bf", 0.374), ("df", 0.616)):
        depths = assign_depths(eofs, "geom", order, 32, seed=3)
        assert round(cost_saving_ratio(depths, 32), 3) == expected


# ---------------------------------------------------------------- hand-worked m = 4 (paper figure 4)


def test_share_counts_and_size_m4():
    assert share_counts("uniform", 4) == [1, 1, 1, 1]
    assert share_counts("arith", 4) == [1, 2, 3, 4]
    assert share_counts("geom", 4) == [1, 2, 4, 8]
    assert share_size("uniform", 4, 10) == 3  # ceil(10 / 4)
    assert share_size("arith", 4, 10) == 1  # ceil(10 / 10)
    assert share_size("arith", 4, 13) == 2  # ceil(13 / 10)
    assert share_size("geom", 4, 10) == 1  # ceil(10 / 15)
    assert share_size("geom", 4, 1) == 1  # max(1, ...)


@pytest.mark.parametrize(
    ("plan", "order", "n", "expected"),
    [
        # uniform, u = 3, capacity 12 > 10: the last share (depth 3) is partial.
        ("uniform", "bf", 10, [3, 3, 3, 1]),
        ("uniform", "df", 10, [3, 3, 3, 1]),
        # arithmetic, sum g = 10, u = 1: capacity == N.
        ("arith", "bf", 10, [1, 2, 3, 4]),
        ("arith", "df", 10, [1, 2, 3, 4]),
        # arithmetic, u = 1, N = 7: bf stops inside depth 3; df after round 2 (0,1,2,3 | 1,2,3).
        ("arith", "bf", 7, [1, 2, 3, 1]),
        ("arith", "df", 7, [1, 2, 2, 2]),
        # arithmetic, u = 2, N = 13: bf 2,4,6 then a partial 1; df round 1 (8), round 2: d1 d2 then 1 at d3.
        ("arith", "bf", 13, [2, 4, 6, 1]),
        ("arith", "df", 13, [2, 4, 4, 3]),
        # geometric, u = 1, capacity 15 > 10: df rounds 0123 | 123 | 23 | 2.
        ("geom", "bf", 10, [1, 2, 4, 3]),
        ("geom", "df", 10, [1, 2, 4, 3]),
        # geometric, u = 1, N = 6: bf never reaches depth 3; df round 1 + depths 1, 2 of round 2.
        ("geom", "bf", 6, [1, 2, 3, 0]),
        ("geom", "df", 6, [1, 2, 2, 1]),
        # geometric, u = 2, capacity 30 > 16: bf 2,4,8 then 2 of 16 at depth 3; df 0123 | 123 | 2 (2 each).
        ("geom", "bf", 16, [2, 4, 8, 2]),
        ("geom", "df", 16, [2, 4, 6, 4]),
        # geometric, u = 2, N = 20: df 0123 | 123 | 23 | 2 gives the same counts as bf.
        ("geom", "bf", 20, [2, 4, 8, 6]),
        ("geom", "df", 20, [2, 4, 8, 6]),
        # a single sample always lands at depth 0.
        ("geom", "df", 1, [1, 0, 0, 0]),
    ],
)
def test_quotas_hand_worked_m4(plan, order, n, expected):
    assert budget_quotas(plan, order, 4, n) == expected


def test_share_schedule_visiting_order():
    assert share_schedule("arith", "bf", 4, 13) == [(0, 2), (1, 2), (1, 2), (2, 2), (2, 2), (2, 2), (3, 1)]
    assert share_schedule("arith", "df", 4, 13) == [(0, 2), (1, 2), (2, 2), (3, 2), (1, 2), (2, 2), (3, 1)]
    assert share_schedule("geom", "df", 4, 6) == [(0, 1), (1, 1), (2, 1), (3, 1), (1, 1), (2, 1)]
    assert share_schedule("uniform", "bf", 4, 10) == [(0, 3), (1, 3), (2, 3), (3, 1)]


def test_aliases():
    assert budget_quotas("half", "breadth-first", 4, 10) == budget_quotas("uniform", "bf", 4, 10)
    assert budget_quotas("geometric", "depth-first", 4, 16) == [2, 4, 6, 4]


def test_large_geometric_is_lazy():
    # 2^100 shares must never be enumerated.
    quotas = budget_quotas("geom", "df", 100, 500)
    assert sum(quotas) == 500 and quotas[0] == 1


# ---------------------------------------------------------------- assign_depths


def test_assign_exact_match():
    eofs = [3, 0, 1, 2, 2, 1, 0, 3]
    # uniform, u = 2: every depth's share is filled by the two samples with that eof.
    for order in ("bf", "df"):
        assert assign_depths(eofs, "uniform", order, 4, seed=5) == [3, 0, 1, 2, 2, 1, 0, 3]


def test_assign_prefers_largest_eof_not_above_depth():
    # uniform, u = 1, bf: d0 <- an eof-0 sample; d1 <- an eof-1 sample (largest eof <= 1, not the other
    # eof-0); d2 <- the other eof-1; d3 <- the remaining eof-0. Same for every seed.
    eofs = [0, 0, 1, 1]
    for seed in range(10):
        depths = assign_depths(eofs, "uniform", "bf", 4, seed=seed)
        assert sorted(depths[:2]) == [0, 3]
        assert sorted(depths[2:]) == [1, 2]


def test_assign_matching_then_random_fill():
    eofs = [2, 0, 3, 3, 3, 1, 0, 1]
    seen = set()
    for seed in range(20):
        depths = assign_depths(eofs, "uniform", "bf", 4, seed=seed)
        # matched: eof-0 samples at depth 0, eof-1 at depth 1, sample 0 (eof 2) at depth 2.
        assert [depths[i] for i in (1, 6, 5, 7, 0)] == [0, 0, 1, 1, 2]
        # the depth-2 share has one slot left and no eof <= 2 candidate: one eof-3 sample fills it at
        # random, the other two go to depth 3.
        rest = [depths[i] for i in (2, 3, 4)]
        assert sorted(rest) == [2, 3, 3]
        seen.add(tuple(rest))
    assert len(seen) > 1  # the random fill follows the seed


def test_assign_counts_equal_quotas_and_deterministic():
    gen = torch.Generator().manual_seed(1)
    eofs = torch.randint(0, 9, (1000,), generator=gen)
    for plan in ("uniform", "arith", "geom"):
        for order in ("bf", "df"):
            depths = assign_depths(eofs, plan, order, 8, seed=11)
            counts = Counter(depths)
            assert [counts.get(k, 0) for k in range(8)] == budget_quotas(plan, order, 8, 1000)
            assert assign_depths(eofs.tolist(), plan, order, 8, seed=11) == depths
            assert assign_depths(eofs, plan, order, 8, seed=12) != depths


def test_assign_no_sample_frozen_above_its_eof_while_a_matching_one_waits():
    # bf geometric: every share at depth k takes eof <= k samples while any are unused.
    gen = torch.Generator().manual_seed(2)
    eofs = torch.randint(0, 6, (300,), generator=gen).tolist()
    depths = assign_depths(eofs, "geom", "bf", 6, seed=0)
    for k in range(6):
        at_k = [i for i, d in enumerate(depths) if d == k]
        randoms = [i for i in at_k if eofs[i] > k]
        if randoms:
            # then no eof <= k sample was left for a later (deeper) share
            later = [i for i, d in enumerate(depths) if d > k and eofs[i] <= k]
            assert not later


def test_assign_plan_none_is_algorithm3():
    assert assign_depths([2, 0, 4, 1], "none", "bf", 4) == [2, 0, 4, 1]


def test_assign_unprofiled_samples_only_fill_at_random():
    # samples without an eof (None) are never matched: the depth-0 share takes the eof-0 sample
    depths = assign_depths([None, 0, None, None], "uniform", "bf", 4, seed=0)
    assert depths[1] == 0 and sorted(depths) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="missing"):
        assign_depths([None, 1], "none", "bf", 4)


@pytest.mark.parametrize(("plan", "order"),
                         [("uniform", "bf"), ("arith", "df"), ("geom", "bf"), ("geom", "df")])
@pytest.mark.parametrize("seed", [0, 1])
def test_assign_by_class_spreads_every_class_over_the_budget(plan, order, seed):
    m, n = 12, 300
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=gen).tolist()
    eofs = [min(m, 2 * y + int(torch.randint(0, 3, (1,), generator=gen))) for y in labels]  # eof ~ class
    depths = assign_depths_by_class(eofs, labels, plan, order, m, seed=seed)
    quotas = budget_quotas(plan, order, m, n)
    assert Counter(depths) == Counter({k: q for k, q in enumerate(quotas) if q})
    cumulative = [sum(quotas[: k + 1]) / n for k in range(m)]
    for y in set(labels):
        members = [i for i in range(n) if labels[i] == y]
        # each class fills the budget in proportion to its size (rank positions cut at the same points)
        for k in range(m):
            mine = sum(1 for i in members if depths[i] <= k)
            assert abs(mine - cumulative[k] * len(members)) <= 1.5, (y, k)
        # inside a class the semantic order holds: a lower eof is never frozen deeper
        for i in members:
            for j in members:
                if eofs[i] < eofs[j]:
                    assert depths[i] <= depths[j]
    # global eof-matching instead keeps each class at a few depths
    matched = assign_depths(eofs, plan, order, m, seed=seed)
    assert depths != matched
    assert assign_depths_by_class(eofs, labels, plan, order, m, seed=seed) == depths  # deterministic


def test_assign_by_class_places_unprofiled_samples_inside_their_class():
    labels = [0] * 6 + [1] * 6
    eofs = [0, 1, 2, None, None, 3] + [None] * 6
    depths = assign_depths_by_class(eofs, labels, "uniform", "bf", 6, seed=4)
    assert Counter(depths) == Counter({k: 2 for k in range(6)})
    known = [depths[i] for i in (0, 1, 2, 5)]
    assert known == sorted(known)
    with pytest.raises(ConfigError, match="got 1 labels for 2 samples"):
        assign_depths_by_class([0, 1], [0], "uniform", "bf", 4)
    with pytest.raises(ConfigError, match="unknown budget plan 'none'"):
        assign_depths_by_class([0, 1], [0, 1], "none", "bf", 4)


def test_fill_quotas_in_order():
    assert fill_quotas([3, 0, 2, 1], [2, 0, 2]) == [0, 2, 2, 0]


def test_cost_saving_ratio():
    assert cost_saving_ratio([0, 1, 2, 3], 4) == pytest.approx(6 / 16)
    assert cost_saving_ratio(torch.tensor([4, 4]), 4) == 1.0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: budget_quotas("linear", "bf", 4, 10), r"unknown budget plan 'linear'.*uniform, arith, geom"),
        (lambda: budget_quotas("geom", "zigzag", 4, 10), r"unknown infilling order 'zigzag'.*bf, df"),
        (lambda: budget_quotas("geom", "bf", 0, 10), r"num_layers must be a positive integer"),
        (lambda: budget_quotas("geom", "bf", 4, 0), r"num_samples must be a positive integer"),
        (lambda: budget_quotas("none", "bf", 4, 10), r"'none'.*no shares"),
        (lambda: assign_depths([0, 5], "geom", "bf", 4), r"eofs must lie in 0\.\.4"),
        (lambda: assign_depths([0, -1], "none", "bf", 4), r"eofs must lie in 0\.\.4"),
        (lambda: assign_depths([], "geom", "bf", 4), r"number of samples"),
        (lambda: assign_depths([0, 1], "geom", "up", 4), r"unknown infilling order"),
        (lambda: assign_depths(torch.tensor([0.5]), "geom", "bf", 4), r"integers"),
        (lambda: cost_saving_ratio([], 4), r"at least one depth"),
        (lambda: fill_quotas([0, 1, 2], [1, 1]), r"quotas hold 2 samples, the order lists 3"),
        (lambda: cost_saving_ratio([5], 4), r"depths must lie in 0\.\.4"),
    ],
)
def test_bad_input_raises_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
