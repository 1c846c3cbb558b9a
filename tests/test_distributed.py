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

    cfg = _config("salf", budget="uniform", max_steps=STEPS)
    p = _prepared("qwen2", cfg)
    torch.manual_seed(0)
    bases = semantic_bases(p.model, p.verbalizer.label_token_ids)
    rows = hf_rows(p)
    wrapped = wrap_model(p.model, p.strategy, cfg)
    patch_model(wrapped.model, bases=bases, deviation_impl="torch")
    module = wrapped.model
    if world > 1 and fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in wrapped.parts.layers:
            fully_shard(layer)
        fully_shard(wrapped.model)
        wrapped.refresh()
    elif world > 1:
        module = torch.nn.parallel.DistributedDataParallel(wrapped.model, find_unused_parameters=True)
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
            torch.testing.assert_close(ranks[r]["weights"][name], ref, rtol=1e-4, atol=1e-5, msg=name)


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

    return _config("salf", budget="uniform", batch_size=micro, max_steps=STEPS)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_engine_train_under_two_ranks_equals_one_process(tmp_path):
    """train() under torchrun's environment (2 ranks, gloo): same weights and step losses as one process
    whose micro-batches are twice as large; both ranks log the same cuts."""
    import socket

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
            torch.testing.assert_close(ranks[r]["weights"][name], q.detach(), rtol=1e-3, atol=1e-4, msg=name)
