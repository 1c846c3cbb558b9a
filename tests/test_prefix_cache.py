"""The prefix cache (issue 37): the floor of every strategy, the runner entering at the floor, and cached
training against the recomputed run.

Oracles: hand floors per strategy; the same runner forward recomputing the prefix (no cache) for logits and
gradients; the recomputed run (``--prefix-cache off``, or the same loop without a cache) for weights; a hand
count of hits and misses per epoch; forward hooks on the layers below the floor.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_train import _pattern_task, _prepared
from tiny_models import tiny_model

from salf_engine.config import TrainConfig
from salf_engine.data import collate
from salf_engine.errors import ConfigError
from salf_engine.runner.prefix import FloorRows, mask_positions
from salf_engine.runner.truncated import TruncatedRunner
from salf_engine.schedule.strategies import make_strategy
from salf_engine.training.prefix_cache import FileRows, PrefixCache, plan_prefix_cache, why_not_exact

pytestmark = pytest.mark.usefixtures("one_thread")

# gemma3_text: sliding-window and full layers, its own rotary per layer type. sdpa attention: in float64
# transformers' eager softmax (run in float32) turns a left-padded row's fully masked padding into NaN.
FAMILIES = ("llama", "qwen2", "gemma3_text")
#: weights after three AdamW epochs, cached against recomputed (float32, lr 1e-3): the runs differ only by
#: reassociation, but AdamW divides by the root of the squared gradients, so an element whose gradients sit
#: near zero can move by far more than its gradient's rounding. On an AVX-512 host one element of one tensor
#: differed by 1.5e-5 (every other below 1e-6); a stale or wrong cached state moves weights by ~lr a step.
WEIGHTS_ATOL = 5e-5


# ---------------------------------------------------------------------------------------------- the floor

@pytest.mark.parametrize(("name", "kw", "m", "floor"), [
    ("bot25", {}, 8, 2), ("bot50", {}, 8, 4), ("bot75", {}, 8, 6), ("bot50", {}, 5, 2),
    ("bot", {"freeze_fraction": 0.3}, 10, 3), ("bot50", {"lora": True}, 8, 4),
    ("lora-half", {}, 8, 4), ("lora-half", {}, 5, 2),
    ("top50", {}, 8, 0), ("int50", {}, 8, 0), ("int75", {}, 8, 0), ("full", {}, 8, 0),
    ("lora-full", {}, 8, 0),
    ("salf", {"budget": "uniform", "depth_schedule": "narrowing"}, 8, 0), ("lift-half", {}, 8, 0),
    ("adt-low", {}, 8, 0),
])
def test_floor_of_every_strategy(name, kw, m, floor):
    schedule = kw.pop("depth_schedule", "per-row")
    s = make_strategy(name, schedule=schedule, **kw)
    s.begin(m, 12)
    assert [s.floor(step) for step in range(5)] == [floor] * 5
    # no row of any step trains below the floor, and it never falls
    floors, lowest = [], []
    step = 0
    for epoch in range(2):
        for plan in s.epoch_plans(epoch, 4, 2):
            floors.append(s.floor(step))
            lowest.append(min(d for mb in plan.micro_batches for d in mb.depths))
            step += 1
    assert floors == sorted(floors)
    assert all(f <= min(lowest[i:]) for i, f in enumerate(floors))


def test_floor_needs_begin():
    with pytest.raises(RuntimeError, match="begin"):
        make_strategy("bot50").floor(0)


# ---------------------------------------------------------------------------------------------- the runner

def _rows(padding_side: str, lengths=(9, 5, 12, 3), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        start = width - n if padding_side == "left" else 0
        ids[r, start:start + n] = torch.randint(4, 60, (n,), generator=g)
        mask[r, start:start + n] = 1
    return ids, mask


def test_mask_positions_hand_values():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert mask_positions(mask, mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 1, 1], [0, 1, 2, 3, 4]]


def _forward(runner, model, ids, mask, depth, cached, floor=2, layers=None):
    model.zero_grad(set_to_none=True)
    rows = FloorRows(floor, cached, layers=layers)
    out = runner(ids, mask, depth=depth, prefix=rows)
    F.cross_entropy(out.logits, torch.arange(ids.shape[0]) + 7, reduction="sum").backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, rows.written


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_rows_give_the_recomputed_result(family, padding_side):
    """All rows computed, all cached, half cached, and each row alone without padding: the same floor states,
    logits and gradients (float64)."""
    model = tiny_model(family, attn="sdpa").double()
    runner = TruncatedRunner(model)
    ids, mask = _rows(padding_side)
    for depth in (2, [3, 2, 4, 2]):
        ref_logits, ref_grads, written = _forward(runner, model, ids, mask, depth, [None] * 4)
        assert [w.shape for w in written] == [(int(n), 64) for n in mask.sum(1)]
        # each row alone (no padding at all) gives the same floor states
        for r in range(4):
            keep = mask[r].bool()
            alone = FloorRows(2, [None])
            runner(ids[r:r + 1, keep], None, depth=2, prefix=alone)
            torch.testing.assert_close(alone.written[0], written[r], rtol=0, atol=1e-10)
        for cached in (written, [written[0], None, written[2], None], [None, written[1], None, written[3]]):
            logits, grads, again = _forward(runner, model, ids, mask, depth, cached)
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
            assert grads.keys() == ref_grads.keys()
            for name in grads:
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-10, msg=name)
            assert [w is None for w in again] == [c is not None for c in cached]
    # the plain runner (no prefix) places a left-padded row's tokens at p, p+1, .. after its p pads: the same
    # relative positions, which a rotary family sees alike up to its float32 rotary tables
    with torch.no_grad():
        plain = runner(ids, mask, depth=2).logits
    torch.testing.assert_close(ref_logits, plain, rtol=0, atol=1e-10 if padding_side == "right" else 1e-6)


def test_cached_rows_never_run_a_layer_below_the_floor():
    model = tiny_model("llama")
    runner = TruncatedRunner(model)
    ids, mask = _rows("left")
    calls = {i: [] for i in range(4)}
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: calls[i].append(args[0].shape[0]))
             for i, layer in enumerate(model.model.layers)]
    try:
        rows = FloorRows(2, [None] * 4)
        runner(ids, mask, depth=2, prefix=rows)
        assert calls == {0: [4], 1: [4], 2: [4], 3: [4]}
        for c in calls.values():
            c.clear()
        runner(ids, mask, depth=2, prefix=FloorRows(2, rows.written))
        assert calls == {0: [], 1: [], 2: [4], 3: [4]}  # every row cached: nothing below the floor runs
        for c in calls.values():
            c.clear()
        runner(ids, mask, depth=2, prefix=FloorRows(2, [rows.written[0], None, None, rows.written[3]]))
        assert calls == {0: [2], 1: [2], 2: [4], 3: [4]}  # only the two uncached rows
    finally:
        for h in hooks:
            h.remove()


def test_runner_refuses_a_prefix_it_cannot_take():
    model = tiny_model("llama")
    runner = TruncatedRunner(model, bases=torch.randn(3, 64))
    ids, mask = _rows("left")
    with pytest.raises(ConfigError, match="below the prefix floor"):
        runner(ids, mask, depth=[2, 1, 2, 2], prefix=FloorRows(2, [None] * 4))
    with pytest.raises(ConfigError, match="floor must be in 1..4"):
        runner(ids, mask, depth=2, prefix=FloorRows(0, [None] * 4))
    with pytest.raises(ConfigError, match="3 rows for a batch of 4"):
        runner(ids, mask, depth=2, prefix=FloorRows(2, [None] * 3))
    with pytest.raises(ConfigError, match="deviations need every space"):
        runner(ids, mask, depth=2, labels=torch.zeros(4, dtype=torch.long), prefix=FloorRows(2, [None] * 4))


# ---------------------------------------------------------------------------------------------- training

def _shorten(examples: list, seed: int) -> None:
    """Cut each example (in place) to its first 1 to 5 words, drawn with ``seed``: rows of one batch differ
    in length, so padding matters."""
    g = torch.Generator().manual_seed(seed)
    for i, ex in enumerate(examples):
        words = ex.text.split()
        examples[i] = type(ex)(text=" ".join(words[: 1 + int(torch.randint(0, 5, (1,), generator=g))]),
                               label=ex.label)


def _varied(family: str, config: TrainConfig, *, attn: str = "eager", dtype=torch.float32):
    """``test_train._prepared`` over the pattern task with 1 to 5 words per question (rows of one batch
    differ in length, so padding matters) and the model in ``attn`` / ``dtype``."""
    task = _pattern_task()
    _shorten(task.splits["train"], seed=1)
    p = _prepared(family, config)
    from salf_engine.data import encode_split

    p.task = task
    p.train_split = encode_split(task, p.tokenizer, "train", p.verbalizer)
    p.model = tiny_model(family, attn=attn).to(dtype)
    return p


class _Recompute(PrefixCache):
    """A cache that keeps nothing: every forward recomputes the prefix (the same forward, positions from the
    mask, without the cache)."""

    def keep(self, indices, keys, rows) -> None:
        pass


def _loop(family, padding_side, cached, *, epochs=3, dtype=torch.float64, strategy=None, on_plan=None):
    """Three epochs of BOT50 (or the config fields ``strategy``) through the engine's one step
    (runner_forward at each plan's floor + micro_batch_step) over a fixed batch order, ``cached`` True (a
    cache), "recompute" (:class:`_Recompute`) or False (no prefix at all); ``on_plan(plan)`` before each
    step. Returns the weights, the cache and the hits / misses after each epoch."""
    from salf_engine.training.step import micro_batch_step, runner_forward
    from salf_engine.training.wrapping import wrap_model

    cfg = TrainConfig(model="tiny", dataset="pattern", lr=1e-2, batch_size=4, deviation_impl="torch",
                      **(strategy or {"strategy": "bot50"})).validate()
    p = _varied(family, cfg, attn="sdpa", dtype=dtype)
    assert len(set(map(len, p.train_split.input_ids))) > 3
    p.model.train()
    wrapped = wrap_model(p.model, p.strategy, cfg)
    p.strategy.begin(4, len(p.train_split), epochs=epochs)
    runner = TruncatedRunner(wrapped.model)
    kind = {True: PrefixCache, "recompute": _Recompute, False: None}[cached]
    cache = kind(p.strategy.floor(0), len(p.train_split), 0) if kind else None
    label_ids = torch.as_tensor(p.verbalizer.label_token_ids)
    optimizer = torch.optim.AdamW(wrapped.trainable, lr=1e-2)
    counts = []
    for epoch in range(epochs):
        for plan in p.strategy.epoch_plans(epoch, 6, 6):
            if on_plan is not None:
                on_plan(plan)
            forward = runner_forward(runner, label_token_ids=label_ids, config=cfg, prefix_cache=cache,
                                     floor=plan.floor if cache is not None else None)
            for mb in plan.micro_batches:
                batch = collate(p.train_split, mb.indices, 0, padding_side=padding_side)
                micro_batch_step(forward, wrapped, mb, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cache is not None:
            counts.append((cache.hits, cache.misses))
    return dict(wrapped.model.named_parameters()), cache, counts


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_training_equals_recomputed_training(family, padding_side):
    """Float64: the weights equal the recomputed run's; right-padded, also the run without any prefix (the
    same positions); left-padded, that run places tokens after the pads (see the done-means test)."""
    ref, _, _ = _loop(family, padding_side, cached="recompute")
    got, cache, counts = _loop(family, padding_side, cached=True)
    n = 48  # the pattern task's training examples
    # hand count: epoch 1 all misses, every later epoch all hits
    assert counts == [(0, n), (n, n), (2 * n, n)]
    assert cache.nbytes == _tokens() * 64 * 8
    moved = 0
    for name, q in got.items():
        torch.testing.assert_close(q, ref[name], rtol=0, atol=1e-10, msg=name)
        moved += not name.startswith(("model.layers.0.", "model.layers.1."))
    assert moved
    if padding_side == "right":
        plain, _, _ = _loop(family, padding_side, cached=False)
        for name, q in got.items():
            torch.testing.assert_close(q, plain[name], rtol=0, atol=1e-10, msg=name)


def _tokens() -> int:
    """The tokens of the varied task's training split."""
    return sum(map(len, _varied("llama", TrainConfig(model="t", dataset="p")).train_split.input_ids))


def _train(family="llama", resume=False, device="cpu", **overrides):
    from salf_engine.training.recipe import train

    cfg = TrainConfig(model="tiny", dataset="pattern", **{
        "strategy": "bot50", "lr": 1e-3, "batch_size": 4, "epochs": 3, "warmup_ratio": 0.0,
        "zero_shot_eval": False, "deviation_impl": "torch", **overrides}).validate()
    p = _varied(family, cfg)
    p.device = torch.device(device)
    p.model.to(p.device)
    lines: list[str] = []
    summary = train(cfg, progress=False, log=lines.append, prepared=p, resume=resume)
    return summary, dict(p.model.named_parameters()), lines


def test_done_means_bot50_three_epochs_memory_equals_off(tmp_path):
    """The issue's check: BOT50, three epochs on a tiny model, --prefix-cache memory against off: the same
    weights to WEIGHTS_ATOL (float32), hits above 0 in summary.json."""
    off, ref, off_log = _train(prefix_cache="off")
    got_summary, got, log = _train(prefix_cache="memory", output=str(tmp_path / "run"))
    for name, q in got.items():
        torch.testing.assert_close(q, ref[name], rtol=0, atol=WEIGHTS_ATOL, msg=name)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())["prefix_cache"]
    tokens = _tokens()
    # each hit skips the 2 layers below the floor: 96 x 2 layer forwards
    assert saved == {"where": "memory", "bytes": tokens * 64 * 4, "floor": 2, "hits": 96, "misses": 48,
                     "skipped_layer_forwards": 192}
    assert off["prefix_cache"] == {"where": "off", "bytes": 0, "floor": None, "hits": 0, "misses": 0,
                                   "skipped_layer_forwards": 0}
    # FLOPs by hand (m = 4, in layer forwards per example): BOT50 costs 4 forward + 2 x 2 backward = 8 of
    # full's 12; 144 examples trained, less the 192 forwards the cache saved: (1152 - 192) / 1728 = 5 / 9
    assert off["flops_ratio"] == pytest.approx(8 / 12)
    assert got_summary["flops_ratio"] == pytest.approx(5 / 9)
    assert "prefix cache: off (--prefix-cache off)" in off_log
    said = [line for line in log if line.startswith("prefix cache:")]
    assert said == [f"prefix cache: in memory, the hidden states at layer 2 (of 4) of 48 training examples, "
                    f"{tokens * 256} bytes ({tokens * 256 / 2**20:.1f} MiB); the layers below it run once "
                    "per example"]


def test_disk_cache_equals_off_and_leaves_no_file(tmp_path):
    """--prefix-cache disk: a memory-mapped file in the run directory, the same weights as off, the file gone
    when training ends; a leftover file from an earlier run is overwritten, never read."""
    off, ref, _ = _train(prefix_cache="off")
    run = tmp_path / "run"
    run.mkdir()
    (run / "prefix_cache.bin").write_bytes(b"stale" * 1000)
    got, got_w, log = _train(prefix_cache="disk", output=str(run))
    for name, q in got_w.items():
        torch.testing.assert_close(q, ref[name], rtol=0, atol=WEIGHTS_ATOL, msg=name)
    assert got["prefix_cache"] == {"where": "disk", "bytes": _tokens() * 256, "floor": 2, "hits": 96,
                                   "misses": 48, "skipped_layer_forwards": 192}
    assert [line for line in log if line.startswith("prefix cache: on disk in ")]
    assert not (run / "prefix_cache.bin").exists()


# ---------------------------------------------------------------------------------------------- the option

def _decide(name, where="auto", *, model=None, run_dir=None, world=1, epochs=None, **kw):
    from salf_engine.training.wrapping import wrap_model

    cfg = TrainConfig(model="tiny", dataset="pattern", strategy=name, **kw).validate()
    p = _prepared("llama", cfg)
    if model is not None:
        p.model = model
    wrapped = wrap_model(p.model, p.strategy, cfg)
    p.strategy.begin(4, len(p.train_split), [1] * len(p.train_split) if p.strategy.needs_profile else None,
                     epochs=3)
    lines: list[str] = []
    lengths = [len(ids) for ids in p.train_split.input_ids]
    cache, off = plan_prefix_cache(where, p.strategy, wrapped, lengths, device=torch.device("cpu"),
                                   run_dir=run_dir, world=world,
                                   wants_deviations=p.strategy.needs_observe, say=lines.append,
                                   epochs=epochs)
    return cache, off, lines


@pytest.mark.parametrize(("name", "kw", "model", "reason"), [
    ("full", {}, None, "has floor 0"),
    ("top50", {}, None, "has floor 0"),
    ("salf", {"budget": "uniform"}, None, "has floor 0"),
    ("bot50", {"lora": True, "lora_dropout": 0.0}, None, "layer 0 lies below the floor (layer 2) and has "
                                                          "trainable LoRA adapters"),
    ("bot50", {"train_head": True}, None, "the embedding lies below the floor (layer 2) and trains through "
                                          "the head tied to it"),
    ("bot50", {}, tiny_model("llama", attention_dropout=0.1), "dropout is active in layer 0"),
])
def test_auto_turns_off_and_memory_refuses_where_not_exact(name, kw, model, reason):
    cache, off, lines = _decide(name, model=model, **kw)
    assert cache is None and len(lines) == 1 and lines[0] == f"prefix cache: off ({off['reason']})"
    assert off["where"] == "off" and reason in off["reason"]
    for where in ("memory", "disk"):
        with pytest.raises(ConfigError, match=rf"^--prefix-cache {where} cannot be exact here: .*"
                                              + reason.split("(")[0]):
            _decide(name, where, model=model, **kw)


def test_lora_half_is_cached_at_its_lowest_adapter():
    cache, _, lines = _decide("lora-half")
    assert cache is not None and cache.floor == 2 and "at layer 2 (of 4)" in lines[0]


def test_auto_keeps_nothing_for_a_run_of_one_epoch():
    cache, off, lines = _decide("bot50", epochs=1)
    assert cache is None and off["where"] == "off" and off["hits"] == 0
    assert lines == ["prefix cache: off (the run trains one epoch: no example's states would be read back)"]
    assert _decide("bot50", epochs=2)[0].where == "memory"
    assert _decide("bot50", "memory", epochs=1)[0].where == "memory"  # asked for: kept anyway


def test_auto_goes_to_disk_when_memory_is_short(monkeypatch, tmp_path):
    from salf_engine.training import prefix_cache

    monkeypatch.setattr(prefix_cache, "free_memory", lambda: 1000)
    cache, off, lines = _decide("bot50")  # no run directory: off
    assert cache is None and off["floor"] == 2
    assert lines == ["prefix cache: off (" + off["reason"] + ", and no run directory (--output) holds a disk "
                     "cache)"] and "would exceed 0.25 of the 0.0 MiB free memory" in off["reason"]
    cache, _, lines = _decide("bot50", run_dir=tmp_path)
    assert cache.where == "disk" and cache.file.path == tmp_path / "prefix_cache.bin"
    assert lines[0].startswith(f"prefix cache: on disk in {tmp_path / 'prefix_cache.bin'} (")
    cache.close()
    assert not (tmp_path / "prefix_cache.bin").exists()
    assert _decide("bot50", "memory")[0].where == "memory"  # asked for: kept in memory anyway
    with pytest.raises(ConfigError, match="^--prefix-cache disk keeps its file in the run directory"):
        _decide("bot50", "disk")


def test_disk_cache_bad_paths_are_one_line_errors(tmp_path, monkeypatch):
    from salf_engine.training import checkpoint
    from salf_engine.training.prefix_cache import FileRows

    with pytest.raises(ConfigError, match=r"^cannot write the prefix cache file .*missing"):
        FileRows(tmp_path / "missing" / "c.bin", [3, 2], 8, torch.float32)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: type("U", (), {"free": 10})())
    with pytest.raises(ConfigError, match=r"^not enough free space in .* for the prefix cache: 0.0 MiB free"):
        FileRows(tmp_path / "c.bin", [3, 2], 8, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_file_rows_read_only_what_this_process_wrote(tmp_path, dtype):
    path = tmp_path / "c.bin"
    path.write_bytes(b"x" * 999)  # a partial file of an earlier run
    rows = FileRows(path, [3, 2, 4], 8, dtype)
    assert [rows[i] for i in range(3)] == [None, None, None]
    assert path.stat().st_size == 8 * (3 * 3 + 3) + 9 * 8 * rows.data.element_size()  # the row table first
    a = torch.randn(2, 8).to(dtype)
    rows[1] = a
    rows[2] = torch.randn(3, 8).to(dtype)  # not row 2's length: not kept
    assert torch.equal(rows[1], a) and rows[0] is None and rows[2] is None
    assert rows.nbytes == 2 * 8 * a.element_size()
    rows[1] = torch.randn(3, 8).to(dtype)  # row 1's tokens changed length: what it held is not served
    assert rows[1] is None and rows.nbytes == 0


def test_file_rows_shared_by_two_ranks(tmp_path):
    """Two ranks of one node map one file (no process group here: each rank's agreement is its own): a row
    rank 0 keeps is served to rank 1 with its layer, a changed row is not; the summary's hits and misses add
    up over the ranks; only rank 0 removes the file."""
    path = tmp_path / "c.bin"
    zero = PrefixCache(2, 2, 0, file=FileRows(path, [3, 2], 8, torch.float32, rank=0, world=2))
    one = PrefixCache(2, 2, 0, file=FileRows(path, [3, 2], 8, torch.float32, rank=1, world=2))
    ids, mask = _rows("left", lengths=(3, 2))
    rows, keys = zero.lookup([0, 1], ids, mask)
    rows.written = [torch.ones(3, 8), torch.full((2, 8), 2.0)]
    zero.keep([0, 1], keys, rows)
    changed = ids.clone()
    changed[0, -1] += 1
    got, _ = one.lookup([1, 0], changed.flip(0), mask.flip(0))
    assert got.cached[0] is not None and torch.equal(got.cached[0], torch.full((2, 8), 2.0))
    assert got.cached[1] is None and got.layers == [2, 0]
    assert (one.hits, one.misses) == (1, 1) and (zero.hits, zero.misses) == (0, 2)
    assert one.summary() == zero.summary() == {"where": "disk", "bytes": 5 * 8 * 4, "floor": 2, "hits": 1,
                                               "misses": 3, "skipped_layer_forwards": 2}
    one.close()
    assert path.exists() and one.summary()["hits"] == 1
    zero.close()
    assert not path.exists()


def test_other_reasons():
    class S:
        label = "bot50"

        def floor(self, step):
            return 2

        def max_floor(self):
            return 2

    assert "deviation" in why_not_exact(S(), None, world=1, wants_deviations=True)


def test_a_row_whose_tokens_changed_is_a_miss():
    cache = PrefixCache(2, 3, 0)
    ids, mask = _rows("left", lengths=(4, 3))
    rows, keys = cache.lookup([0, 2], ids, mask)
    rows.written = [torch.ones(4, 8), torch.ones(3, 8)]
    cache.keep([0, 2], keys, rows)
    again, _ = cache.lookup([0, 2], ids, mask)
    assert [c is not None for c in again.cached] == [True, True] and (cache.hits, cache.misses) == (2, 2)
    changed = ids.clone()
    changed[1, -1] += 1
    again, _ = cache.lookup([0, 2], changed, mask)
    assert [c is not None for c in again.cached] == [True, False] and (cache.hits, cache.misses) == (3, 3)
    assert cache.nbytes == 7 * 8 * 4 and math.isfinite(cache.planned_bytes)


def test_resume_rebuilds_the_cache_lazily(tmp_path, interrupt_after):
    """Killed after 18 of 36 steps (checkpoint at 16, in epoch 2), the resumed run starts with an empty cache:
    the 8 steps left of epoch 2 miss (32 rows); epoch 3 hits those 32 and misses the 16 rows epoch 2 trained
    before the kill. The weights equal the uninterrupted cached run's."""
    import salf_engine.training.recipe as recipe

    ref, ref_w, _ = _train(prefix_cache="memory", output=str(tmp_path / "ref"), save_every=4)
    assert (ref["prefix_cache"]["hits"], ref["prefix_cache"]["misses"]) == (96, 48)
    with interrupt_after(recipe, "optimizer_step", 18):
        _train(prefix_cache="memory", output=str(tmp_path / "run"), save_every=4)
    got, got_w, log = _train(prefix_cache="memory", output=str(tmp_path / "run"), save_every=4, resume=True)
    assert any("resuming from" in line and "step-00000016" in line for line in log)
    assert (got["prefix_cache"]["hits"], got["prefix_cache"]["misses"]) == (32, 32 + 16)
    for name, q in got_w.items():
        torch.testing.assert_close(q, ref_w[name], rtol=0, atol=WEIGHTS_ATOL, msg=name)


@pytest.mark.parametrize(("fields", "floor", "hits"), [
    ({"strategy": "bot50"}, 2, 96),
    ({"strategy": "salf", "budget": "uniform", "depth_schedule": "rising"}, 3, 60),  # hand count: below
])
def test_salf_trainer_cached_equals_off(tmp_path, fields, floor, hits):
    """SalfTrainer (HF Trainer), BOT50 and SALF's rising schedule (the Trainer's steps give it the run's
    epochs, each plan its floor) for three epochs of 48 rows of several lengths (left-padded), lr 1e-3 as in
    the done-means check: salf_config.prefix_cache memory against off gives the same weights to 1e-5, with
    the hand count."""
    from test_hf import _args, hf_rows

    from salf_engine.integrations.hf import SalfTrainer

    weights, caches = {}, {}
    for where in ("off", "memory"):
        cfg = TrainConfig(model="tiny", dataset="pattern", prefix_cache=where, **fields).validate()
        p = _varied("llama", cfg)
        trainer = SalfTrainer(model=p.model, args=_args(tmp_path / where, max_steps=-1, num_train_epochs=3,
                                                                  learning_rate=1e-3),
                              train_dataset=hf_rows(p), salf_strategy=fields["strategy"], salf_config=cfg)
        trainer.train()
        assert trainer.state.global_step == 36
        weights[where] = dict(p.model.named_parameters())
        caches[where] = trainer.salf_prefix_summary
    for name, q in weights["memory"].items():
        torch.testing.assert_close(q, weights["off"][name], rtol=0, atol=WEIGHTS_ATOL, msg=name)
    assert caches["off"]["where"] == "off"
    assert {k: caches["memory"][k] for k in ("where", "floor", "hits", "misses")} == {
        "where": "memory", "floor": floor, "hits": hits, "misses": 48}


def test_resume_may_change_where_the_cache_lives():
    from salf_engine.training.checkpoint import config_differences

    saved = TrainConfig(model="m", dataset="d", strategy="bot50", prefix_cache="memory").to_dict()
    given = TrainConfig(model="m", dataset="d", strategy="bot50", prefix_cache="off").to_dict()
    assert config_differences(saved, given) == []
    assert config_differences({k: v for k, v in saved.items() if k != "prefix_cache"}, given) == []


# ---------------------------------------------------------------------------------------------- rising floor

RISING = {"strategy": "salf", "budget": "uniform", "depth_schedule": "rising"}


def _rising(m=4, n=48, epochs=3, step=4, micro=4, schedule="rising", **kw):
    """A begun ``rising`` (or ``stepped``) strategy and its plans over ``epochs`` epochs."""
    s = make_strategy("salf", budget=kw.pop("budget", "uniform"), schedule=schedule, **kw)
    s.begin(m, n, epochs=epochs)
    return s, [plan for e in range(epochs) for plan in s.epoch_plans(e, step, micro)]


def _rising_count(plans, start=0):
    """The hand count of a cached run over ``plans`` from step ``start`` on (an empty cache there): a row seen
    at a floor f >= 1 is a hit when an earlier step at a floor >= 1 kept it, and runs the layers from the one
    it was kept at (0 when not kept) to f. Returns (hits, misses, per step {layer: rows run below the
    floor})."""
    kept: dict[int, int] = {}
    hits = misses = 0
    runs = []
    for plan in plans[start:]:
        ran: dict[int, int] = {}
        if plan.floor:
            for i in plan.indices:
                hits += i in kept
                misses += i not in kept
                for layer in range(kept.get(i, 0), plan.floor):
                    ran[layer] = ran.get(layer, 0) + 1
                kept[i] = plan.floor
        runs.append(ran)
    return hits, misses, runs


def test_rising_depths_hand_values():
    """m = 4, N = 6, E = 2, uniform budget (quotas 2, 2, 2, 0: depths 0 0 1 1 2 2): row t of the run's 12
    takes depth sorted[t // 2], in the static strategies' shuffled order; steps of 4 rows in forwards of 2;
    after the E epochs every row stays at the top depth."""
    s, plans = _rising(m=4, n=6, epochs=2, step=4, micro=2)
    assert s.label == "salf-uniform-bf-rising" and not s.needs_profile
    assert [[mb.depths for mb in plan.micro_batches] for plan in plans] == [
        [[0, 0], [0, 0]], [[1, 1]], [[1, 1], [2, 2]], [[2, 2]]]
    assert [plan.floor for plan in plans] == [0, 1, 1, 2] == [s.floor(k) for k in range(4)]
    assert s.max_floor() == 2
    assert [[mb.depths for mb in plan.micro_batches] for plan in s.epoch_plans(2, 4, 2)] == [
        [[2, 2], [2, 2]], [[2, 2]]]
    static = make_strategy("full")
    static.begin(4, 6)
    for e in range(3):
        assert [plan.indices for plan in s.epoch_plans(e, 4, 2)] == [
            plan.indices for plan in static.epoch_plans(e, 4, 2)]


@pytest.mark.parametrize(("budget", "m", "n", "epochs", "step", "micro", "kw"), [
    ("uniform", 4, 48, 3, 4, 4, {}), ("arith", 5, 23, 3, 5, 2, {"infill": "df"}),
    ("geom", 6, 30, 2, 8, 3, {"cut_levels": 2}), ("uniform", 8, 13, 4, 3, 3, {"cut_levels": 1}),
])
def test_rising_depths_never_fall(budget, m, n, epochs, step, micro, kw):
    """The run's depths never fall (also rounded to cut levels); without rounding each depth takes E times its
    budget quota; every epoch trains every row once; a step's floor is the lowest depth of it and every later
    step, at most ``max_floor``."""
    from collections import Counter

    from salf_engine.schedule.budgets import budget_quotas

    s, plans = _rising(m, n, epochs, step, micro, budget=budget, **kw)
    rows = [d for plan in plans for mb in plan.micro_batches for d in mb.depths]
    assert rows == sorted(rows)
    if "cut_levels" not in kw:
        quotas = budget_quotas(budget, kw.get("infill", "bf"), m, n)
        assert Counter(rows) == {k: epochs * q for k, q in enumerate(quotas) if q}
    per_epoch = -(-n // step)
    for e in range(epochs):
        assert sorted(i for plan in plans[e * per_epoch:(e + 1) * per_epoch] for i in plan.indices) == list(
            range(n))
    lowest = [min(mb.depth for mb in plan.micro_batches) for plan in plans]
    floors = [plan.floor for plan in plans]
    assert floors == [min(lowest[k:]) for k in range(len(plans))]
    assert floors == [s.floor(k) for k in range(len(plans))]
    assert floors[-1] <= s.max_floor() == max(s.depths)


def test_stepped_depths_hand_values():
    """m = 4, N = 6, E = 2, uniform budget (depths 0 0 1 1 2 2, each twice over the run): epoch 1 takes
    rising's first six (0 0 0 0 1 1), epoch 2 its last six (1 1 2 2 2 2), each in a random order over the
    static strategies' rows; the floor is the epoch's lowest depth (0, then 1), then the top depth."""
    s, plans = _rising(m=4, n=6, epochs=2, step=4, micro=2, schedule="stepped")
    assert s.label == "salf-uniform-bf-stepped" and not s.needs_profile
    epochs = [[d for plan in plans[e * 2:(e + 1) * 2] for mb in plan.micro_batches for d in mb.depths]
              for e in range(2)]
    assert sorted(epochs[0]) == [0, 0, 0, 0, 1, 1] and sorted(epochs[1]) == [1, 1, 2, 2, 2, 2]
    assert [plan.floor for plan in plans] == [0, 0, 1, 1] == [s.floor(k) for k in range(4)]
    assert s.max_floor() == 2 and s.floor(4) == 2
    static = make_strategy("full")
    static.begin(4, 6)
    for e in range(3):
        assert [plan.indices for plan in s.epoch_plans(e, 4, 2)] == [
            plan.indices for plan in static.epoch_plans(e, 4, 2)]


def test_stepped_orders_its_depths_apart_from_the_training_order():
    """Each epoch's depths are a permutation of rising's band, not rising's ascending order (which follows
    the training order): over 96 rows of 8 layers the stepped epoch is not sorted, the same seed gives the
    same depths, another seed others; every epoch trains every row once; the floor is the epoch's lowest
    depth, never above a depth trained at or after its step, and never falls."""
    from collections import Counter

    def rows(seed):
        s, plans = _rising(m=8, n=96, epochs=3, step=8, micro=8, schedule="stepped", seed=seed)
        return s, plans, [[d for plan in plans[e * 12:(e + 1) * 12] for mb in plan.micro_batches
                           for d in mb.depths] for e in range(3)]

    s, plans, got = rows(0)
    ranked = _rising(m=8, n=96, epochs=3, step=8, micro=8)[1]
    ascending = [[d for plan in ranked[e * 12:(e + 1) * 12] for mb in plan.micro_batches for d in mb.depths]
                 for e in range(3)]
    for e in range(3):
        assert Counter(got[e]) == Counter(ascending[e]) and got[e] != ascending[e]
        assert sorted(i for plan in plans[e * 12:(e + 1) * 12] for i in plan.indices) == list(range(96))
    assert rows(0)[2] == got and rows(1)[2] != got
    by_sample = dict(zip([i for plan in plans[:12] for i in plan.indices], got[0], strict=True))
    assert [by_sample[i] for i in range(96)] != sorted(got[0])  # nor placed along the sample index
    floors = [plan.floor for plan in plans]
    assert floors == sorted(floors) == [min(ascending[k // 12]) for k in range(36)] == [
        s.floor(k) for k in range(36)]
    assert len(set(floors)) == 3
    lowest = [min(mb.depth for plan in plans[k:] for mb in plan.micro_batches) for k in range(36)]
    assert all(f <= low for f, low in zip(floors, lowest, strict=True))
    assert [floors[k] for k in (0, 12, 24)] == [lowest[k] for k in (0, 12, 24)]


def test_rising_needs_a_budget_and_the_run_epochs():
    from salf_engine.experiments.compare import parse_strategy

    cell = parse_strategy("salf:uniform:df:rising")
    assert (cell.label, cell.schedule, cell.infill) == ("salf:uniform:df:rising", "rising", "df")
    for schedule in ("rising", "stepped"):
        with pytest.raises(ConfigError, match=f"'{schedule}' schedule .* needs a salf budget plan"):
            make_strategy("salf", budget="none", schedule=schedule)
    assert parse_strategy("salf:uniform:stepped").schedule == "stepped"
    with pytest.raises(ConfigError, match=r"over the whole run: begin\(\) needs the run's epochs"):
        make_strategy("salf", budget="uniform", schedule="stepped").begin(4, 12)
    s = make_strategy("salf", budget="uniform", schedule="rising")
    with pytest.raises(ConfigError, match=r"over the whole run: begin\(\) needs the run's epochs"):
        s.begin(4, 12)
    s.begin(4, 12, epochs=2)
    assert s.floor(0) == 0  # the first row's depth: no step size needed
    with pytest.raises(RuntimeError, match="call epoch_plans"):
        s.floor(1)


def test_rows_cached_below_the_floor_run_only_the_layers_up_to_it():
    """Floor 3 of 4 layers: a row kept at layer 1 runs layers 1-2, one kept at 2 runs layer 2, one kept at the
    floor none, an uncached one 0-2, all under no_grad (forward hooks); the floor states, logits and
    gradients equal those of the forward computing every row (float64)."""
    model = tiny_model("llama", attn="sdpa").double()
    runner = TruncatedRunner(model)
    ids, mask = _rows("left")
    kept = {}
    for f in (1, 2, 3):
        rows = FloorRows(f, [None] * 4)
        with torch.no_grad():
            runner(ids, mask, depth=3, prefix=rows)
        kept[f] = rows.written
    ref_logits, ref_grads, ref_written = _forward(runner, model, ids, mask, 3, [None] * 4, floor=3)
    calls = []
    hooks = [layer.register_forward_hook(
        lambda mod, args, out, i=i: calls.append((i, args[0].shape[0], torch.is_grad_enabled())))
        for i, layer in enumerate(model.model.layers)]
    try:
        cached = [kept[1][0], None, kept[3][2], kept[2][3]]
        logits, grads, written = _forward(runner, model, ids, mask, 3, cached, floor=3, layers=[1, 0, 3, 2])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [(0, 1, False), (1, 2, False), (2, 3, False), (3, 4, True)]
    assert written[2] is None
    for r in (0, 1, 3):
        torch.testing.assert_close(written[r], ref_written[r], rtol=0, atol=1e-10)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-10, msg=name)
    with pytest.raises(ConfigError, match="cached states at layer 3 lie outside 0..2"):
        runner(ids, mask, depth=3, prefix=FloorRows(2, [kept[3][0], None, None, None], layers=[3, 0, 0, 0]))


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_cache_keeps_each_rows_layer(where, tmp_path):
    """At floor 0 the cache is not used (counted neither way); a row kept at layer 1 is served at floor 3 with
    its layer, and kept again at 3; a lookup at a lower floor never serves it; a row whose tokens changed
    is a miss."""
    ids, mask = _rows("left", lengths=(4, 3))
    file = FileRows(tmp_path / "c.bin", [4, 5, 3], 8, torch.float32) if where == "disk" else None
    cache = PrefixCache(0, 3, 0, file=file)
    assert cache.lookup([0, 2], ids, mask) == (None, []) and (cache.hits, cache.misses) == (0, 0)
    rows, keys = cache.lookup([0, 2], ids, mask, 1)
    assert rows.cached == [None, None] and rows.layers == [0, 0] and (cache.hits, cache.misses) == (0, 2)
    rows.written = [torch.ones(4, 8), torch.full((3, 8), 2.0)]
    cache.keep([0, 2], keys, rows)
    rows, keys = cache.lookup([0, 2], ids, mask, 3)
    assert rows.layers == [1, 1] and rows.computed == [0, 1] and (cache.hits, cache.misses) == (2, 2)
    assert torch.equal(rows.cached[1], torch.full((3, 8), 2.0))
    rows.written = [torch.full((4, 8), 3.0), None]
    cache.keep([0, 2], keys, rows)
    rows, _ = cache.lookup([0, 2], ids, mask, 3)
    assert rows.layers == [3, 1] and rows.computed == [1]
    assert torch.equal(rows.cached[0], torch.full((4, 8), 3.0))
    rows, _ = cache.lookup([0, 2], ids, mask, 2)  # never happens in a run (the floor never falls): not served
    assert rows.cached[0] is None and rows.layers == [0, 1]
    changed = ids.clone()
    changed[1, -1] += 1
    rows, _ = cache.lookup([0, 2], changed, mask, 3)
    assert rows.cached[1] is None and cache.summary()["floor"] == 3
    if file is not None:
        file.close()


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rising_cached_training_equals_recomputed_training(family, padding_side):
    """SALF's rising schedule, float64, three epochs of 8 steps of 6 (the floor is step // 6: 0, 1, 2, 3): the
    weights equal the recomputed run's to 1e-10 (right-padded also the run without any prefix), with the
    hand count: epoch 1 keeps the 12 rows of its steps at floor 1 (12 misses), epoch 2 meets them again (12
    hits, 36 misses), epoch 3 hits all 48."""
    ref, _, _ = _loop(family, padding_side, "recompute", strategy=RISING)
    got, cache, counts = _loop(family, padding_side, True, strategy=RISING)
    assert counts == [(0, 12), (12, 48), (60, 48)]
    _, plans = _rising(step=6, micro=6)
    assert [plan.floor for plan in plans] == [k // 6 for k in range(24)]
    assert _rising_count(plans)[:2] == (60, 48)
    assert cache.floor == 3 and cache.nbytes == _tokens() * 64 * 8
    for name, q in got.items():
        torch.testing.assert_close(q, ref[name], rtol=0, atol=1e-10, msg=name)
    if padding_side == "right":
        plain, _, _ = _loop(family, padding_side, False, strategy=RISING)
        for name, q in got.items():
            torch.testing.assert_close(q, plain[name], rtol=0, atol=1e-10, msg=name)


def test_rising_rows_run_only_the_layers_above_where_they_were_kept():
    """Forward hooks on every decoder layer through the rising loop: below a step's floor only no_grad calls
    run, and at each step layer i runs exactly the rows the hand count says (those kept below i + 1, or not
    kept): a cached row never runs a layer below the one it was kept at."""
    _, plans = _rising(step=6, micro=6)
    expected = _rising_count(plans)[2]
    seen: list[dict[int, int]] = []
    floor = [0]
    grads = set()

    def on_plan(plan):
        floor[0] = plan.floor
        seen.append({})

    def hook(module, args, out):
        i = getattr(getattr(module, "self_attn", None), "layer_idx", None)
        if i is not None and type(module).__name__.endswith("DecoderLayer") and i < floor[0]:
            seen[-1][i] = seen[-1].get(i, 0) + args[0].shape[0]
            grads.add(torch.is_grad_enabled())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        _loop("llama", "left", True, strategy=RISING, on_plan=on_plan)
    finally:
        handle.remove()
    assert seen == expected and grads == {False}
    assert sum(ran.get(0, 0) for ran in expected) == 48  # each miss runs layer 0 once, a hit never
    assert any(ran and min(ran) > 0 for ran in expected)  # steps whose rows all enter above layer 0


def test_rising_floor_cached_equals_off(tmp_path):
    """Issue 37 items 2 and 6 through train(), float32, left padding: SALF's rising schedule for three epochs
    (48 rows, steps of 4: the floor is step // 9) with --prefix-cache memory and disk gives off's weights to
    1e-5; 60 hits (12 in epoch 2: the rows epoch 1 kept at floor 1; 48 in epoch 3) and 48 misses (12 + 36),
    the hand count from the plans."""
    off, ref, _ = _train(prefix_cache="off", **RISING)
    assert off["prefix_cache"]["where"] == "off"
    _, plans = _rising()
    assert [plan.floor for plan in plans] == [k // 9 for k in range(36)]
    assert _rising_count(plans)[:2] == (60, 48)
    tokens = _tokens()
    for where in ("memory", "disk"):
        run = tmp_path / where
        got, got_w, log = _train(prefix_cache=where, output=str(run), **RISING)
        for name, q in got_w.items():
            torch.testing.assert_close(q, ref[name], rtol=0, atol=WEIGHTS_ATOL, msg=name)
        saved = json.loads((run / "summary.json").read_text())["prefix_cache"]
        # skipped, by hand: epoch 2 serves the 12 rows kept at layer 1 (12); epoch 3 serves the 24 rows
        # epoch 2 kept at floor 1 and the 24 it kept at floor 2 (24 + 48)
        assert saved == {"where": where, "bytes": tokens * 256, "floor": 3, "hits": 60, "misses": 48,
                         "skipped_layer_forwards": 84}
        said = [line for line in log if line.startswith("prefix cache:")]
        assert len(said) == 1
        assert ("the hidden states at the rising floor (layer 0 at the start, at most 3 of 4) of 48 training "
                "examples") in said[0]
        assert not (run / "prefix_cache.bin").exists()


def test_stepped_floor_cached_equals_off():
    """The stepped schedule through train() (48 rows, steps of 4, three epochs: floor 0, 1, 2 by epoch) with
    --prefix-cache memory gives off's weights to 1e-5; hits and misses are the hand count from its plans
    (epoch 2 keeps every row at floor 1, all misses; epoch 3 serves all 48)."""
    stepped = {**RISING, "depth_schedule": "stepped"}
    _, ref, _ = _train(prefix_cache="off", **stepped)
    _, plans = _rising(schedule="stepped")
    assert [plan.floor for plan in plans] == [k // 12 for k in range(36)]
    assert _rising_count(plans)[:2] == (48, 48)
    got, got_w, _ = _train(prefix_cache="memory", **stepped)
    assert (got["prefix_cache"]["hits"], got["prefix_cache"]["misses"]) == (48, 48)
    for name, q in got_w.items():
        torch.testing.assert_close(q, ref[name], rtol=0, atol=WEIGHTS_ATOL, msg=name)


def test_rising_resume_gives_the_uninterrupted_weights(tmp_path, interrupt_after):
    """Killed after 18 of 36 steps (checkpoint at 16, in epoch 2 at floor 1), the resumed rising run starts
    with an empty cache: its 8 steps left of epoch 2 miss (32 rows), epoch 3 hits those 32 and misses the 16
    rows epoch 2 trained before the kill (the hand count from step 16). The weights equal the uninterrupted
    cached run's."""
    import salf_engine.training.recipe as recipe

    ref, ref_w, _ = _train(prefix_cache="memory", output=str(tmp_path / "ref"), save_every=4, **RISING)
    assert (ref["prefix_cache"]["hits"], ref["prefix_cache"]["misses"]) == (60, 48)
    with interrupt_after(recipe, "optimizer_step", 18):
        _train(prefix_cache="memory", output=str(tmp_path / "run"), save_every=4, **RISING)
    got, got_w, log = _train(prefix_cache="memory", output=str(tmp_path / "run"), save_every=4, resume=True,
                             **RISING)
    assert any("resuming from" in line and "step-00000016" in line for line in log)
    assert _rising_count(_rising()[1], start=16)[:2] == (32, 48)
    assert (got["prefix_cache"]["hits"], got["prefix_cache"]["misses"]) == (32, 48)
    for name, q in got_w.items():
        torch.testing.assert_close(q, ref_w[name], rtol=0, atol=WEIGHTS_ATOL, msg=name)


def test_auto_checks_below_the_highest_floor_a_rising_run_reaches():
    """why_not_exact looks below the run's top floor (3), not floor(0) = 0: dropout there turns auto off."""
    cache, _, lines = _decide("salf", budget="uniform", depth_schedule="rising")
    assert cache is not None and cache.floor == 0 and "rising floor" in lines[0]
    model = tiny_model("llama", attention_dropout=0.1)
    cache, off, _ = _decide("salf", model=model, budget="uniform", depth_schedule="rising")
    assert cache is None and "dropout is active in layer 0, below the floor (layer 3)" in off["reason"]


# ---------------------------------------------------------------------------- the GPU path's pinned rows

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pinned_rows_keep_what_was_written_and_drop_stale_copies(dtype):
    """On a CPU the pinned store's calls copy in place: a row reads back what was written, an unwritten row or
    one whose length changed reads None, and a copy taken ahead before a new write is never served."""
    from salf_engine.training.prefix_cache import PinnedRows

    rows = PinnedRows([3, 2, 4], 8, dtype, torch.device("cpu"))
    assert [rows[i] for i in range(3)] == [None, None, None]
    a, b = torch.randn(2, 8).to(dtype), torch.randn(2, 8).to(dtype)
    rows[1] = a
    a.zero_()  # the store holds a copy, not the caller's tensor
    assert rows[1] is not None and not torch.equal(rows[1], a)
    rows[1] = b
    rows.prefetch([0, 1])  # row 0 is not written: nothing to copy
    assert set(rows.ahead) == {1}
    c = torch.randn(2, 8).to(dtype)
    rows[1] = c  # after the prefetch: its copy is stale
    assert rows.ahead == {} and torch.equal(rows[1], c) and rows.served_ahead == 0
    rows.prefetch([1])
    assert torch.equal(rows[1], c) and rows.served_ahead == 1 and rows.ahead == {}
    rows[2] = torch.randn(3, 8).to(dtype)  # not row 2's length
    assert rows[2] is None
    assert rows.nbytes == 2 * 8 * c.element_size()


def test_copy_ahead_makes_the_next_plan_first_only_where_plans_are_fixed():
    """The order of events, by hand: with a pinned cache and fixed plans, plan k+1 is made and its rows
    prefetched before plan k is handed out; otherwise each plan is made when it is asked for."""
    from types import SimpleNamespace

    from salf_engine.training.prefix_cache import copy_ahead

    events: list[str] = []

    def plans():
        for k in range(3):
            events.append(f"make {k}")
            yield SimpleNamespace(indices=[2 * k, 2 * k + 1])

    cache = SimpleNamespace(pinned=object(), prefetch=lambda idx: events.append(f"prefetch {list(idx)}"))
    for plan in copy_ahead(plans(), cache, fixed=True):
        events.append(f"step {plan.indices[0] // 2}")
    assert events == ["make 0", "make 1", "prefetch [2, 3]", "step 0", "make 2", "prefetch [4, 5]", "step 1",
                      "step 2"]
    for kw in ({"cache": cache, "fixed": False}, {"cache": SimpleNamespace(pinned=None), "fixed": True},
               {"cache": None, "fixed": True}):
        events.clear()
        for plan in copy_ahead(plans(), kw["cache"], fixed=kw["fixed"]):
            events.append(f"step {plan.indices[0] // 2}")
        assert events == ["make 0", "step 0", "make 1", "step 1", "make 2", "step 2"]


def test_plans_fixed_only_for_static_strategies():
    made = [make_strategy(name, **kw) for name, kw in [
        ("bot50", {}), ("lora-half", {}), ("full", {}), ("adt-low", {}), ("lift-half", {}),
        ("salf", {"budget": "uniform", "schedule": "rising"}), ("salf", {})]]
    assert [s.plans_fixed for s in made] == [True, True, True, False, False, False, False]


def _pinned_rows_made(monkeypatch) -> list:
    """Every :class:`PinnedRows` the cache plans from now on (on a CPU too)."""
    from salf_engine.training import prefix_cache

    monkeypatch.setattr(prefix_cache, "PINNED_ON", ("cuda", "cpu"))
    made, real = [], prefix_cache.PinnedRows

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(prefix_cache, "PinnedRows", spy)
    return made


def _check_pinned_run(monkeypatch, tmp_path, device: str, atol: float) -> list:
    """BOT50, three epochs with the pinned store against --prefix-cache off on ``device``: the same weights,
    96 hits, and the hand count of rows served from a copy ahead: every hit but those of each later epoch's
    first step (48 examples, steps of 4: 2 epochs x 11 steps x 4 rows)."""
    _, ref, _ = _train(prefix_cache="off", device=device)
    made = _pinned_rows_made(monkeypatch)
    summary, got, log = _train(prefix_cache="memory", output=str(tmp_path / "run"), device=device)
    for name, q in got.items():
        torch.testing.assert_close(q, ref[name], rtol=0, atol=atol, msg=name)
    assert summary["prefix_cache"]["hits"] == 96 and summary["prefix_cache"]["where"] == "memory"
    assert made[0].served_ahead == 2 * 11 * 4
    assert any(line.startswith("prefix cache: in pinned host memory,") for line in log)
    return made


def test_pinned_cache_training_equals_off(monkeypatch, tmp_path):
    """The GPU path's store and copy ahead, run on the CPU (copies in place)."""
    _check_pinned_run(monkeypatch, tmp_path, "cpu", WEIGHTS_ATOL)


@pytest.mark.cuda
def test_pinned_cache_on_a_gpu_equals_off(monkeypatch, tmp_path):
    """On a GPU: the cache in pinned host memory, written and copied ahead on a side stream."""
    made = _check_pinned_run(monkeypatch, tmp_path, "cuda", 1e-4)
    assert made[0].data.is_pinned() and made[0].stream is not None
