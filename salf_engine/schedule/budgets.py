"""Budget plans, infilling orders and eof-matching depth assignment (SALF section 3.4, Algorithm 4).

A *depth* k is the number of frozen bottom layers (``layers[0..k-1]``), k = 0..m-1.
A budget plan gives depth k a number of shares ``g_k``:

- ``"uniform"`` (the paper's "half"): ``g_k = 1``;
- ``"arith"``: ``g_k = k + 1`` (1, 2, .., m);
- ``"geom"``: ``g_k = 2**k`` (1, 2, 4, .., 2^(m-1)).

A share holds ``u = max(1, ceil(N / sum(g)))`` samples, so the capacity ``u * sum(g)`` can exceed N
(``"geom"`` always does for m > log2(N)). Shares are filled in one of two orders until the N samples
run out (the last share visited may be partial; shares after it stay empty):

- ``"bf"`` (breadth-first, depth-major): all of depth 0's shares, then depth 1's, ...;
- ``"df"`` (depth-first, share-major): round r = 1, 2, ..: one share for every depth with
  ``g_k >= r``, depths ascending.

Plan ``"none"`` is Algorithm 3: every sample at its own eof-layer (no quotas).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import get_args

import torch

from salf_engine.errors import ConfigError, positive_int
from salf_engine.schedule.names import Budget

__all__ = [
    "PLANS",
    "ORDERS",
    "share_counts",
    "share_size",
    "share_schedule",
    "budget_quotas",
    "assign_depths",
    "assign_depths_by_class",
    "assign_depths_by_class_rank",
    "fill_quotas",
    "cost_saving_ratio",
]

#: Budget plans with quotas, plus ``"none"`` (Algorithm 3, each sample at its own eof).
PLANS: tuple[str, ...] = get_args(Budget)
#: Infilling orders.
ORDERS = ("bf", "df")

_PLAN_ALIASES = {"half": "uniform", "arithmetic": "arith", "geometric": "geom"}
_ORDER_ALIASES = {"breadth-first": "bf", "depth-first": "df"}


def _check_plan(plan: str, *, allow_none: bool = True) -> str:
    name = _PLAN_ALIASES.get(plan, plan) if isinstance(plan, str) else plan
    valid = PLANS if allow_none else PLANS[:-1]
    if name not in valid:
        raise ConfigError(f"unknown budget plan {plan!r}; valid plans: {', '.join(valid)}")
    return name


def _check_order(order: str) -> str:
    name = _ORDER_ALIASES.get(order, order) if isinstance(order, str) else order
    if name not in ORDERS:
        raise ConfigError(f"unknown infilling order {order!r}; valid orders: {', '.join(ORDERS)}")
    return name


def share_counts(plan: str, num_layers: int) -> list[int]:
    """Shares ``g_k`` per depth k = 0..m-1 for a quota plan (``"uniform"``, ``"arith"``, ``"geom"``)."""
    name = _check_plan(plan)
    if name == "none":
        raise ConfigError("budget plan 'none' (Algorithm 3) has no shares: depths follow the eof-layers")
    m = positive_int(num_layers, "num_layers")
    if name == "uniform":
        return [1] * m
    if name == "arith":
        return [k + 1 for k in range(m)]
    return [1 << k for k in range(m)]


def share_size(plan: str, num_layers: int, num_samples: int) -> int:
    """Samples per share: ``u = max(1, ceil(N / sum(g)))``."""
    g = share_counts(plan, num_layers)
    n = positive_int(num_samples, "num_samples")
    return max(1, -(-n // sum(g)))


def _visit(g: list[int], order: str) -> Iterator[int]:
    """Depth of every share in visiting order (lazy: geometric plans have 2^m shares)."""
    if order == "bf":
        for k, count in enumerate(g):
            for _ in range(count):
                yield k
    else:
        rounds = max(g)
        r = 1
        while r <= rounds:
            for k, count in enumerate(g):
                if count >= r:
                    yield k
            r += 1


def share_schedule(plan: str, order: str, num_layers: int, num_samples: int) -> list[tuple[int, int]]:
    """``(depth, size)`` of each non-empty share in visiting order.

    Sizes sum to N; only the last share may be partial.
    """
    g = share_counts(plan, num_layers)
    o = _check_order(order)
    n = positive_int(num_samples, "num_samples")
    u = max(1, -(-n // sum(g)))
    schedule: list[tuple[int, int]] = []
    left = n
    for k in _visit(g, o):
        if left == 0:
            break
        size = min(u, left)
        schedule.append((k, size))
        left -= size
    return schedule


def budget_quotas(plan: str, order: str, num_layers: int, num_samples: int) -> list[int]:
    """Samples per depth k = 0..m-1 after infilling N samples; the list sums to N.

    >>> budget_quotas("arith", "bf", 4, 10)
    [1, 2, 3, 4]
    >>> budget_quotas("geom", "df", 4, 16)
    [2, 4, 6, 4]
    """
    quotas = [0] * positive_int(num_layers, "num_layers")
    for k, size in share_schedule(plan, order, num_layers, num_samples):
        quotas[k] += size
    return quotas


def _as_int_list(values: Sequence[int] | torch.Tensor, what: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ConfigError(f"{what} must be one-dimensional, got shape {tuple(values.shape)}")
        if values.is_floating_point() or values.is_complex():
            raise ConfigError(f"{what} must hold integers, got dtype {values.dtype}")
        return [int(v) for v in values.tolist()]
    out = []
    for v in values:
        if isinstance(v, bool) or int(v) != v:
            raise ConfigError(f"{what} must hold integers, got {v!r}")
        out.append(int(v))
    return out


def _check_depth_values(values: list[int], num_layers: int, what: str) -> None:
    bad = [v for v in values if not 0 <= v <= num_layers]
    if bad:
        raise ConfigError(f"{what} must lie in 0..{num_layers} (num_layers), got {bad[0]}")


def _eof_list(eofs: Sequence[int | None] | torch.Tensor, num_layers: int) -> list[int | None]:
    """Checked eofs; ``None`` marks a sample that was not profiled (it is only ever placed at random)."""
    if isinstance(eofs, torch.Tensor):
        return _eof_list(_as_int_list(eofs, "eofs"), num_layers)
    values = list(eofs)
    known = _as_int_list([v for v in values if v is not None], "eofs")
    _check_depth_values(known, num_layers, "eofs")
    it = iter(known)
    return [None if v is None else next(it) for v in values]


def assign_depths(
    eofs: Sequence[int | None] | torch.Tensor, plan: str, order: str, num_layers: int, *, seed: int = 0
) -> list[int]:
    """Freeze depth per sample under a budget plan (Algorithm 4), or each sample's own eof for ``"none"``.

    Shares are visited in ``order`` (see :func:`share_schedule`). A depth-k share is filled

    1. with unused samples whose own eof is ``<= k``, largest eof first (the sample whose semantics
       sit closest to k is frozen at k, so the over-freezing ``k - eof`` stays smallest);
    2. then, once none is left, with random unused samples (all of which have eof > k, or no eof).

    Ties (equal eof) and the random fill both follow one permutation of the sample indices drawn
    from ``random.Random(seed)``: the result depends only on ``eofs``, the plan and ``seed``.
    The per-depth counts always equal :func:`budget_quotas`.
    """
    m = positive_int(num_layers, "num_layers")
    eof_list = _eof_list(eofs, m)
    n = positive_int(len(eof_list), "the number of samples (len(eofs))")
    name = _check_plan(plan)
    if name == "none":
        _check_order(order)
        if None in eof_list:
            raise ConfigError("budget plan 'none' puts every sample at its own eof; some eofs are missing")
        return [int(e) for e in eof_list if e is not None]
    schedule = share_schedule(name, order, m, n)

    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    # buckets[e]: samples with eof e in permutation order; heads[e]: next candidate position.
    buckets: list[list[int]] = [[] for _ in range(m + 1)]
    for i in perm:
        e = eof_list[i]
        if e is not None:
            buckets[e].append(i)
    heads = [0] * (m + 1)
    used = [False] * n
    depths = [-1] * n
    rand_pos = 0

    def take_from(e: int) -> int | None:
        bucket, h = buckets[e], heads[e]
        while h < len(bucket) and used[bucket[h]]:
            h += 1
        heads[e] = h
        return bucket[h] if h < len(bucket) else None

    for k, size in schedule:
        filled = 0
        e = k
        while filled < size and e >= 0:
            i = take_from(e)
            if i is None:
                e -= 1
                continue
            used[i] = True
            depths[i] = k
            filled += 1
        while filled < size:
            while used[perm[rand_pos]]:
                rand_pos += 1
            i = perm[rand_pos]
            used[i] = True
            depths[i] = k
            filled += 1
    return depths


def assign_depths_by_class(
    eofs: Sequence[int | None] | torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    plan: str,
    order: str,
    num_layers: int,
    *,
    seed: int = 0,
) -> list[int]:
    """Freeze depth per sample under a budget plan, every class spread over the depths by eof rank.

    The per-depth counts are :func:`budget_quotas` (the same cost as :func:`assign_depths`), but instead
    of matching eofs across the whole set, each sample gets its eof *rank inside its class*: the members
    of a class are sorted by eof (ties and unprofiled samples, ``None``, at random positions), the j-th of
    a class of n_c gets the position ``(j + 1/2) / n_c``, and the quotas are filled in depth order by
    ascending position. Every class thus covers every part of the budget in proportion to its size, and
    inside a class the sample whose semantics settle lowest is frozen least. (With a fixed prompt
    template the eof-layer largely follows the class, so global eof-matching would give each depth
    nearly one class.) Deterministic in ``(eofs, labels, plan, order, seed)``.
    """
    m = positive_int(num_layers, "num_layers")
    return assign_depths_by_class_rank(_eof_list(eofs, m), labels, plan, order, m, seed=seed)


def assign_depths_by_class_rank(
    keys: Sequence[float | None],
    labels: Sequence[int] | torch.Tensor,
    plan: str,
    order: str,
    num_layers: int,
    *,
    seed: int = 0,
) -> list[int]:
    """Freeze depth per sample under a budget plan: inside each class the samples are ranked by ``keys``
    (ascending; ties and ``None`` at random positions, drawn independently of the training order) and
    every class is spread over the depths by that rank, the lowest key at the lowest depth.
    :func:`assign_depths_by_class` ranks by eof; SALF's ``loss-rank`` assignment by minus the sample's
    last training loss (the hardest trains the most layers).
    """
    m = positive_int(num_layers, "num_layers")
    key_list = list(keys)
    label_list = _as_int_list(labels, "labels")
    n = positive_int(len(key_list), "the number of samples")
    if len(label_list) != n:
        raise ConfigError(f"got {len(label_list)} labels for {n} samples")
    quotas = budget_quotas(_check_plan(plan, allow_none=False), order, m, n)
    # a stream of its own: seeded with the bare seed, the shuffle of a single class (every SFT row)
    # would repeat the epoch-0 training order, and tied keys would give narrowing, not random depths
    rng = random.Random(f"depth-rank-{seed}")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(label_list):
        by_class.setdefault(y, []).append(i)
    position = [0.0] * n
    for members in by_class.values():
        rng.shuffle(members)
        ranked = sorted((i for i in members if key_list[i] is not None), key=lambda i: key_list[i])
        for i in (i for i in members if key_list[i] is None):
            ranked.insert(rng.randint(0, len(ranked)), i)
        for j, i in enumerate(ranked):
            position[i] = (j + 0.5) / len(ranked)
    tie = list(range(n))
    rng.shuffle(tie)
    return fill_quotas(sorted(range(n), key=lambda i: (position[i], tie[i])), quotas)


def fill_quotas(order: Sequence[int], quotas: Sequence[int]) -> list[int]:
    """Depth per sample when the samples, taken in ``order``, fill depth 0's quota, then depth 1's, ...

    ``order`` lists every sample index once; ``quotas`` (samples per depth) sum to its length.
    """
    if sum(quotas) != len(order):
        raise ConfigError(f"the quotas hold {sum(quotas)} samples, the order lists {len(order)}")
    depths = [0] * len(order)
    start = 0
    for k, q in enumerate(quotas):
        for i in order[start : start + q]:
            depths[i] = k
        start += q
    return depths


def cost_saving_ratio(depths: Sequence[int] | torch.Tensor, num_layers: int) -> float:
    """Backprop cost-saving ratio: the mean of ``depth / m`` over the trained samples (paper table 5)."""
    m = positive_int(num_layers, "num_layers")
    values = _as_int_list(depths, "depths")
    if not values:
        raise ConfigError("cost_saving_ratio needs at least one depth")
    _check_depth_values(values, m, "depths")
    return math.fsum(values) / (len(values) * m)
