"""Two CPU processes (gloo) with DDP or FSDP2 train the same weights as one process with the doubled batch,
each rank's rows at their own cuts (so the ranks' cuts differ); eof profiles and observations are gathered
across ranks."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from salf_engine.schedule.sampling import rank_slice

STEPS, MICRO, ACCUM, LR = 3, 4, 2, 1e-2
#: Weights of runs that differ only in where float32 sums are taken (two ranks or one) agree to this
#: fraction of the learning rate (test_hf's LR, 1e-2, in both tests that use it). AdamW divides each
#: gradient by its running RMS, so an entry whose gradient is near 0 turns that reassociation noise into a
#: step of a good part of lr: one entry of 8,192 moved 1.4e-4 (the engine test) and one 1.3e-5 (the loop
#: test), every other entry under 3.2e-5. A rank's rows lost or counted twice moves whole tensors by ~lr.
ADAM_NOISE = 0.05


def _distribute(wrapped, world: int, fsdp: bool):
    """The module a rank drives: FSDP2 per decoder layer, then the root (in place), DDP, or the model."""
    if world > 1 and fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in wrapped.parts.layers:
            fully_shard(layer)
        fully_shard(wrapped.model)
        wrapped.refresh()
        return wrapped.model
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(wrapped.model, find_unused_parameters=True)
    return wrapped.model


def _loop(rank: int, world: int, fsdp: bool = False) -> dict:
    """SALF (profile + Algorithm-3 observations) through the patched forward; DDP (or FSDP2 per decoder
    layer, then the root) when world > 1."""
    from test_hf import _config, hf_rows
    from test_train import _prepared

    from salf_engine.deviation.semantics import semantic_bases
    from salf_engine.integrations.hf import left_pad_collate
    from salf_engine.integrations.patching import patch_model, runner_of
    from salf_engine.schedule.driver import StrategyDriver
    from salf_engine.training.step import build_optimizer, build_scheduler, optimizer_step
    from salf_engine.training.wrapping import wrap_model

    cfg = _config("salf", budget="uniform", depth_schedule="per-row", max_steps=STEPS)
    p = _prepared("qwen2", cfg)
    torch.manual_seed(0)
    bases = semantic_bases(p.model, p.verbalizer.label_token_ids)
    rows = hf_rows(p)
    wrapped = wrap_model(p.model, p.strategy, cfg)
    patch_model(wrapped.model, bases=bases, deviation_impl="torch")
    module = _distribute(wrapped, world, fsdp)
    driver = StrategyDriver(p.strategy, runner_of(wrapped.model), p.train_split, cfg, pad_id=0)
    driver.profile()
    driver.begin(wrapped.parts.layers)
    optimizer = build_optimizer(wrapped.trainable, cfg, LR)
    scheduler = build_scheduler(optimizer, cfg, STEPS)
    wrapped.model.train()
    depths, step = [], 0
    for plan in driver.epoch_plans(0, MICRO * ACCUM, MICRO):
        local = rank_slice(plan, rank, world)
        depths.append([mb.depths for mb in local])
        seen = []
        for k, mb in enumerate(local):
            batch = left_pad_collate([rows[i] for i in mb.indices], 0)
            labels = torch.tensor([rows[i]["salf_label"] for i in mb.indices])
            embed = wrapped.set_trainable(mb.depth, mb.trainable, mb.depths)
            last = k == len(local) - 1
            sync = module.no_sync() if world > 1 and not fsdp and not last else contextlib.nullcontext()
            if fsdp and world > 1:
                module.set_requires_gradient_sync(last)
            with sync:
                out = module(**batch, salf_depth=torch.tensor(mb.depths), salf_label=labels,
                             salf_train_embeddings=embed)
                (out.loss * mb.weight).backward()
            if mb.weight > 0:
                seen.append((mb.indices, out.deviations))
        optimizer_step(optimizer, scheduler, wrapped.trainable, None)
        step += 1
        driver.observe(seen)
        driver.after_step(step, wrapped.parts.layers)
        if step == STEPS:
            break
    weights = {n: (q.full_tensor() if hasattr(q, "full_tensor") else q).detach().clone()
               for n, q in wrapped.model.named_parameters()}
    return {"depths": depths, "eofs": driver.eofs, "weights": weights}


def _worker(rank: int, world: int, init_file: str, out_dir: str, fsdp: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_loop(rank, world, fsdp), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rank_slice_weights_and_cuts():
    from salf_engine.schedule.strategies import MicroBatch, StepPlan

    plan = StepPlan([MicroBatch([0, 1, 2], 1, [False, True]), MicroBatch([3], 0, [True, True])])
    parts = [rank_slice(plan, r, 2) for r in range(2)]
    assert [[mb.depth for mb in p] for p in parts] == [[1, 0], [1, 0]]
    assert parts[0][0].indices == [0, 2] and parts[1][0].indices == [1]
    assert parts[1][1].indices == [3] and parts[1][1].weight == 0  # filler: same cuts, no contribution
    # DDP averages over the 2 ranks: the weights of a step add up to one mean over its examples
    assert sum(mb.weight for p in parts for mb in p) / 2 == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_process_ddp_equals_one_process(tmp_path, fsdp):
    from test_hf import LR as HF_LR

    ctx = mp.get_context("spawn")
    args = (str(tmp_path / "init"), str(tmp_path), fsdp)
    procs = [ctx.Process(target=_worker, args=(r, 2, *args)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _loop(0, 1)
    # each rank holds every other row of a forward, each row at its own cut: the ranks' cuts differ
    for step0, step1, step in zip(ranks[0]["depths"], ranks[1]["depths"], single["depths"], strict=True):
        for rows0, rows1, rows in zip(step0, step1, step, strict=True):
            assert rows0 == rows[0::2] and rows1 == rows[1::2]
    assert any(r0 != r1 for s0, s1 in zip(ranks[0]["depths"], ranks[1]["depths"], strict=True)
               for r0, r1 in zip(s0, s1, strict=True))
    assert ranks[0]["eofs"] == ranks[1]["eofs"] == single["eofs"]  # the gathered profile
    for name, ref in single["weights"].items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["weights"][name], ref, rtol=1e-4, atol=ADAM_NOISE * HF_LR,
                                       msg=name)


def _engine_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    from test_train import _prepared

    from salf_engine.training.recipe import train

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        cfg = _engine_config(MICRO // world)
        p = _prepared("qwen2", cfg)
        summary = train(cfg, progress=False, log=None, prepared=p)
        weights = {n: q.detach().clone() for n, q in p.model.named_parameters()}
        torch.save({"summary": summary, "weights": weights}, Path(out_dir) / f"engine{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _engine_config(micro: int):
    from test_hf import _config

    return _config("salf", budget="uniform", depth_schedule="per-row", batch_size=micro, max_steps=STEPS)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_engine_train_under_two_ranks_equals_one_process(tmp_path):
    """train() under torchrun's environment (2 ranks, gloo): same weights and step losses as one process
    whose micro-batches are twice as large; both ranks log the same cuts."""
    import socket

    from test_hf import LR as HF_LR
    from test_train import _prepared

    from salf_engine.training.recipe import train

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_engine_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    ranks = [torch.load(tmp_path / f"engine{r}.pt") for r in range(2)]
    cfg = _engine_config(MICRO)
    p = _prepared("qwen2", cfg)
    single = train(cfg, progress=False, log=None, prepared=p)
    for r in range(2):
        got = ranks[r]["summary"]
        assert got["depth_histogram"] == single["depth_histogram"]
        assert got["loss_history"] == pytest.approx(single["loss_history"], rel=1e-4)
        for name, q in p.model.named_parameters():
            torch.testing.assert_close(ranks[r]["weights"][name], q.detach(), rtol=1e-3,
                                       atol=ADAM_NOISE * HF_LR, msg=name)


# ------------------------------------------------------------------------ the prefix cache under two ranks

def _spawn(target, tmp_path, *args, timeout: float = 240) -> list[dict]:
    """``target(rank, 2, *args)`` in two spawned processes; what each saved in ``tmp_path/out{rank}.pt``. A
    process still running after ``timeout`` seconds is killed (a test never hangs)."""
    import time

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, 2, *args)) for r in range(2)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]


def _torchrun_env(rank: int, world: int, port: int) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bot50_run(where: str, batch_size: int, output: str | None = None):
    """train(): BOT50 for three epochs over 48 rows of 1 to 5 words (test_prefix_cache's), at lr 5e-4 (the
    uncached run's left-padded rows see float32 rotary tables at positions that depend on their batch's
    padding, which moves its weights by about 1e-5 between batchings at lr 1e-3; docs/prefix_cache.md);
    (summary, weights, the log's prefix cache lines)."""
    from test_prefix_cache import _varied

    from salf_engine.config import TrainConfig
    from salf_engine.training.recipe import train

    cfg = TrainConfig(model="tiny", dataset="pattern", strategy="bot50", lr=5e-4, batch_size=batch_size,
                      epochs=3, warmup_ratio=0.0, zero_shot_eval=False, deviation_impl="torch",
                      prefix_cache=where, output=output).validate()
    p = _varied("llama", cfg)
    lines: list[str] = []
    summary = train(cfg, progress=False, log=lines.append, prepared=p)
    return (summary, {n: q.detach().clone() for n, q in p.model.named_parameters()},
            [line for line in lines if line.startswith("prefix cache")])


def _cache_engine_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """train() under torchrun's environment: BOT50 for three epochs with --prefix-cache off, then disk (the
    ranks share the file); then how the cache is planned under two ranks."""
    import socket

    from test_prefix_cache import _decide

    from salf_engine.errors import ConfigError

    _torchrun_env(rank, world, port)
    try:
        out: dict = {}
        for where in ("off", "disk"):
            summary, weights, lines = _bot50_run(where, MICRO // world, str(Path(out_dir) / where))
            out[where] = {"summary": summary, "weights": weights, "lines": lines}
        out["auto, no run directory"] = _decide("bot50", world=world)[1]
        try:
            _decide("bot50", "memory", world=world)
        except ConfigError as e:
            out["memory"] = str(e)
        name = socket.gethostname
        socket.gethostname = lambda: f"node{rank}"  # as if each rank ran on its own node
        try:
            out["two nodes"] = _decide("bot50", run_dir=Path(out_dir), world=world)[1]
        finally:
            socket.gethostname = name
        torch.save(out, Path(out_dir) / f"out{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_engine_prefix_cache_under_two_ranks(tmp_path):
    """BOT50, three epochs, 48 rows, through train() under two ranks: the cache (one file the ranks share, so
    a row kept by one rank in an epoch is served to the other in the next) gives off's weights (to
    WEIGHTS_ATOL) and one process's with the doubled batch; the hand count over both ranks: every row misses
    in epoch 1 and hits in epochs 2 and 3 (96 hits, 48 misses), which rank-local caches could not reach (rows
    change ranks between epochs). ``memory`` is refused, ``auto`` without a run directory or across nodes is
    off."""
    from test_prefix_cache import WEIGHTS_ATOL, _tokens

    ranks = _spawn(_cache_engine_worker, tmp_path, _free_port(), str(tmp_path))
    single, single_w, _ = _bot50_run("memory", MICRO)
    tokens = _tokens()
    for got in ranks:
        kept = {"where": "disk", "bytes": tokens * 64 * 4, "floor": 2, "hits": 96, "misses": 48,
                "skipped_layer_forwards": 192}
        assert got["disk"]["summary"]["prefix_cache"] == kept
        assert single["prefix_cache"]["hits"] == 96 and single["prefix_cache"]["misses"] == 48
        for name, q in single_w.items():
            torch.testing.assert_close(got["disk"]["weights"][name], got["off"]["weights"][name], rtol=0,
                                       atol=WEIGHTS_ATOL, msg=name)
            torch.testing.assert_close(got["disk"]["weights"][name], q.detach(), rtol=0, atol=WEIGHTS_ATOL,
                                       msg=name)
        assert got["memory"] == ("--prefix-cache memory keeps one process's rows, but the 2 ranks share one "
                                 "file in the run directory: use --prefix-cache disk or auto")
        assert got["auto, no run directory"]["reason"] == ("the 2 ranks share the cache through a file in "
                                                           "the run directory: give --output")
        assert got["two nodes"]["reason"] == "the ranks run on 2 nodes, which cannot share the cache's file"
    said, file = ranks[0]["disk"]["lines"], tmp_path / "disk" / "prefix_cache.bin"
    assert len(said) == 1 and said[0].startswith(f"prefix cache: on disk in {file} (shared by the 2 ranks), "
                                                 "the hidden states at layer 2")
    assert not file.exists()
    # rows do change ranks between epochs: a cache of each rank's own rows would hit fewer
    stays = _rank_local_hits(48, 3, MICRO, 2)
    assert stays < 96


def _rank_local_hits(n: int, epochs: int, micro: int, world: int) -> int:
    """The hits a cache of each rank's own rows would have over BOT50's plans: a row is a hit only when it
    comes back to the rank that kept it."""
    from salf_engine.schedule.strategies import make_strategy

    s = make_strategy("bot50")
    s.begin(4, n, epochs=epochs)
    kept_on: dict[int, int] = {}
    hits = 0
    for epoch in range(epochs):
        for plan in s.epoch_plans(epoch, micro, micro):
            for r in range(world):
                for mb in rank_slice(plan, r, world):
                    for i in mb.indices:
                        hits += kept_on.get(i) == r
                        kept_on[i] = r
    return hits


def _patched_cached_loop(rank: int, world: int, fsdp: bool, where: str, run_dir: str, strategy: dict) -> dict:
    """Two epochs of ``strategy`` (config fields) through the patched forward (SalfTrainer's path) with the
    prefix cache ``where`` (under two ranks a file they share), FSDP2 per decoder layer then the root (or
    DDP) when world > 1; the weights, the cache's summary and the step plans."""
    from test_prefix_cache import _varied

    from salf_engine.config import TrainConfig
    from salf_engine.integrations.hf import left_pad_collate
    from salf_engine.integrations.patching import patch_model, runner_of
    from salf_engine.schedule.driver import StrategyDriver
    from salf_engine.training.prefix_cache import plan_prefix_cache
    from salf_engine.training.step import (
        build_optimizer,
        build_scheduler,
        micro_batch_step,
        optimizer_step,
        patched_forward,
    )
    from salf_engine.training.wrapping import wrap_model

    epochs = 2
    cfg = TrainConfig(model="tiny", dataset="pattern", lr=5e-4, batch_size=MICRO, grad_accum=ACCUM,
                      epochs=epochs, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=None,
                      zero_shot_eval=False, deviation_impl="torch", **strategy).validate()
    p = _varied("qwen2", cfg)
    label_ids = p.verbalizer.label_token_ids
    rows = [{"input_ids": [*ids, int(label_ids[c])], "labels": [-100] * len(ids) + [int(label_ids[c])]}
            for ids, c in zip(p.train_split.input_ids, p.train_split.labels, strict=True)]
    wrapped = wrap_model(p.model, p.strategy, cfg)
    patch_model(wrapped.model, deviation_impl="torch")
    module = _distribute(wrapped, world, fsdp)
    driver = StrategyDriver(p.strategy, runner_of(wrapped.model), p.train_split, cfg, pad_id=0)
    driver.begin(wrapped.parts.layers, epochs=epochs)
    lengths = [len(r["input_ids"]) for r in rows]
    cache, _ = plan_prefix_cache(where, p.strategy, wrapped, lengths, device=torch.device("cpu"),
                                 run_dir=Path(run_dir), world=world, wants_deviations=False,
                                 say=lambda _msg: None)
    optimizer = build_optimizer(wrapped.trainable, cfg, cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, epochs * len(rows) // (MICRO * ACCUM))
    wrapped.model.train()
    step, plans = 0, []
    for epoch in range(epochs):
        for plan in driver.epoch_plans(epoch, MICRO * ACCUM, MICRO):
            plans.append(plan)
            forward = patched_forward(module, prefix_cache=cache, floor=plan.floor)
            local = rank_slice(plan, rank, world)
            for k, mb in enumerate(local):
                batch = left_pad_collate([rows[i] for i in mb.indices], 0)
                batch["salf_index"] = torch.tensor(mb.indices)
                last = k == len(local) - 1
                sync = module.no_sync() if world > 1 and not fsdp and not last else None
                if fsdp and world > 1:
                    module.set_requires_gradient_sync(last)
                micro_batch_step(forward, wrapped, mb, batch, sync=sync)
            optimizer_step(optimizer, scheduler, wrapped.trainable, None)
            step += 1
            driver.after_step(step, wrapped.parts.layers)
    summary = None
    if cache is not None:
        cache.close()
        summary = cache.summary()
    weights = {n: (q.full_tensor() if hasattr(q, "full_tensor") else q).detach().clone()
               for n, q in wrapped.model.named_parameters()}
    return {"weights": weights, "cache": summary, "plans": plans}


def _patched_worker(rank: int, world: int, init_file: str, out_dir: str, fsdp: bool, strategy: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {where: _patched_cached_loop(rank, world, fsdp, where, out_dir, strategy)
               for where in ("off", "disk")}
        for run in out.values():
            del run["plans"]  # the main process plans the same steps
        torch.save(out, Path(out_dir) / f"out{rank}.pt")
    finally:
        dist.destroy_process_group()


RISING = {"strategy": "salf", "budget": "uniform", "depth_schedule": "rising"}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp2_prefix_cache_with_a_rising_floor(tmp_path):
    """The patched forward (SalfTrainer's path) under FSDP2, SALF's rising floor for two epochs with the cache
    the ranks share: the 24 rows kept at layer 1 in epoch 1 re-enter there in epoch 2, the others at 0, so a
    rank's rows enter at other layers than the other rank's. Every rank still calls each layer below the
    floor once (a ghost row where none of its rows needs it): the layers' all-gathers stay in step and
    nothing hangs (without the ghost, this run hangs). The weights equal the uncached run's and one
    process's with the doubled batch, with the hand count (24 hits, 48 misses) over both ranks."""
    from test_prefix_cache import WEIGHTS_ATOL, _rising_count

    fsdp, strategy = True, RISING
    ranks = _spawn(_patched_worker, tmp_path, str(tmp_path / "init"), str(tmp_path), fsdp, strategy)
    single = _patched_cached_loop(0, 1, False, "memory", str(tmp_path), strategy)
    hand = _rising_count(single["plans"])[:2]
    assert hand == (24, 48)
    assert (single["cache"]["hits"], single["cache"]["misses"]) == hand
    for got in ranks:
        assert got["off"]["cache"] is None and got["disk"]["cache"]["where"] == "disk"
        assert (got["disk"]["cache"]["hits"], got["disk"]["cache"]["misses"]) == hand
        for name, q in single["weights"].items():
            torch.testing.assert_close(got["disk"]["weights"][name], got["off"]["weights"][name], rtol=0,
                                       atol=WEIGHTS_ATOL, msg=name)
            torch.testing.assert_close(got["disk"]["weights"][name], q, rtol=0, atol=WEIGHTS_ATOL, msg=name)
