"""Ranks and the little communication SALF needs: every rank plans the same steps on its own, and only
eof observations (and profiled eofs) are gathered so every rank keeps the same strategy state."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_grads", "all_reduce_sum", "gather_objects", "init_from_env", "rank_and_world",
]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (``[obj]`` on one process)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over the ranks; a no-op on one process.

    Under per-row cuts the ranks' rows differ, so a layer may have a gradient on one rank and none on
    another. One small all-reduce first agrees on which parameters any rank has a gradient for; those
    are reduced everywhere (a rank without one contributes zeros), the others stay None on every rank,
    so the optimizer skips them as on one process.
    """
    _, world = rank_and_world()
    if world == 1:
        return
    device = next((q.grad.device for q in params if q.grad is not None),
                  params[0].device if params else torch.device("cpu"))
    has = torch.tensor([q.grad is not None for q in params], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    for q, anyone in zip(params, has.tolist(), strict=True):
        if not anyone:
            continue
        if q.grad is None:
            q.grad = torch.zeros_like(q)
        dist.all_reduce(q.grad, op=dist.ReduceOp.SUM)
        q.grad.div_(world)


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment) unless one is
    already initialized: nccl on CUDA, gloo on CPU. A no-op outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over the ranks (a copy; `value` itself on one process)."""
    if rank_and_world()[1] == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out

