"""Depth-bucket batch sampler: coverage, homogeneity, determinism, refreshed depths, DataLoader use."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from salf_engine.errors import ConfigError
from salf_engine.schedule.sampling import DepthBucketSampler


def _depths(n: int = 103, m: int = 6, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(m) for _ in range(n)]


def _expected_len(depths, batch_size, drop_last):
    counts = [depths.count(d) for d in set(depths)]
    if drop_last:
        return sum(c // batch_size for c in counts)
    return sum(math.ceil(c / batch_size) for c in counts)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("batch_size", [1, 4, 7, 200])
def test_every_index_once_and_one_depth_per_batch(batch_size, shuffle):
    depths = _depths()
    sampler = DepthBucketSampler(depths, batch_size, shuffle=shuffle, seed=3)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(depths)))
    assert len(batches) == len(sampler) == _expected_len(depths, batch_size, False)
    for b in batches:
        assert 1 <= len(b) <= batch_size
        assert len({depths[i] for i in b}) == 1
        assert sampler.depth_of(b) == depths[b[0]]


def test_drop_last_drops_only_short_batches():
    depths = _depths()
    sampler = DepthBucketSampler(depths, 4, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == _expected_len(depths, 4, True)
    assert all(len(b) == 4 for b in batches)
    assert len({i for b in batches for i in b}) == sum(depths.count(d) // 4 * 4 for d in set(depths))


def test_unshuffled_order_is_depth_ascending():
    depths = [2, 0, 1, 0, 2, 0]
    batches = list(DepthBucketSampler(depths, 2, shuffle=False))
    assert batches == [[1, 3], [5], [2], [0, 4]]


def test_deterministic_for_seed_and_epoch():
    depths = _depths()
    a = DepthBucketSampler(depths, 5, seed=11)
    b = DepthBucketSampler(depths, 5, seed=11)
    epoch0 = list(a)
    assert epoch0 == list(b) == list(a)  # same (seed, epoch) -> same batches, however often iterated
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != epoch0
    b.set_epoch(0)
    assert list(b) == epoch0
    assert list(DepthBucketSampler(depths, 5, seed=12)) != epoch0


def test_depth_buckets_are_interleaved_when_shuffled():
    depths = [i % 3 for i in range(60)]
    order = [depths[b[0]] for b in DepthBucketSampler(depths, 4, seed=0)]
    assert order != sorted(order)
    assert sorted(order) == [0] * 5 + [1] * 5 + [2] * 5


def test_set_depths_takes_effect_next_epoch():
    depths = [0] * 10 + [1] * 10
    sampler = DepthBucketSampler(depths, 4, seed=1)
    it = iter(sampler)
    first = next(it)
    new = [3] * 7 + [5] * 13
    sampler.set_depths(new)
    assert len(sampler) == 2 + 4  # the next epoch: 7 samples -> 2 batches, 13 -> 4
    rest = list(it)  # the running epoch keeps its plan and its depths
    for b in [first, *rest]:
        assert len({depths[i] for i in b}) == 1
        assert sampler.depth_of(b) in (0, 1)
    assert sorted(i for b in [first, *rest] for i in b) == list(range(20))
    sampler.set_epoch(1)
    nxt = list(sampler)
    assert len(nxt) == 2 + 4
    for b in nxt:
        assert len({new[i] for i in b}) == 1
        assert sampler.depth_of(b) == new[b[0]]
    assert sampler.depths == new


def test_len_tracks_pending_depths():
    sampler = DepthBucketSampler([0] * 8, 4)
    assert len(sampler) == 2
    sampler.set_depths(list(range(8)))
    assert len(sampler) == 8
    assert len(list(sampler)) == 8


def test_validation():
    with pytest.raises(ConfigError, match="batch_size"):
        DepthBucketSampler([0, 1], 0)
    with pytest.raises(ConfigError, match="depth"):
        DepthBucketSampler([0, -1], 2)
    with pytest.raises(ConfigError, match="depth"):
        DepthBucketSampler([0, 1.5], 2)
    sampler = DepthBucketSampler([0, 1], 2)
    with pytest.raises(ConfigError, match="3 depths for 2 samples"):
        sampler.set_depths([0, 1, 2])


def test_accepts_tensor_depths():
    sampler = DepthBucketSampler(torch.tensor([1, 0, 1, 0]), 2, shuffle=False)
    assert list(sampler) == [[1, 3], [0, 2]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_batch_sampler(num_workers):
    depths = _depths(50, 4)
    data = TensorDataset(torch.arange(50), torch.tensor(depths))
    sampler = DepthBucketSampler(depths, 6, seed=2)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=num_workers)
    assert len(loader) == len(sampler)
    seen = []
    for indices, batch_depths in loader:
        assert batch_depths.unique().numel() == 1
        seen.extend(indices.tolist())
    assert sorted(seen) == list(range(50))
    sampler.set_epoch(1)
    assert [b.tolist() for b, _ in loader] == list(sampler)
