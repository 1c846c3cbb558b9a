"""A plain ``accelerate`` loop built from the engine's pieces (works on one device or under
``accelerate launch`` / ``torchrun``: every rank trains its share of each micro-batch at the same cut).

    accelerate launch examples/accelerate_loop.py --model smollm2-135m --dataset trec --max-steps 60

Each micro-batch trains through the engine's one step (``micro_batch_step`` with the patched model's
forward) and each step ends in ``finish_step`` (clipping, the non-finite policy, the update), as in the
engine's own loop and ``SalfTrainer``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

sys.path.insert(0, str(Path(__file__).parent))
from common import evaluate_model, load, parser  # noqa: E402

from salf_engine.config import TrainConfig  # noqa: E402
from salf_engine.integrations.hf import classification_rows, left_pad_collate  # noqa: E402
from salf_engine.integrations.patching import patch_model, runner_of  # noqa: E402
from salf_engine.schedule.driver import StrategyDriver  # noqa: E402
from salf_engine.schedule.sampling import rank_slice  # noqa: E402
from salf_engine.schedule.strategies import strategy_from_config  # noqa: E402
from salf_engine.training.cost import CostMeter  # noqa: E402
from salf_engine.training.step import (  # noqa: E402
    build_optimizer,
    build_scheduler,
    finish_step,
    micro_batch_step,
    patched_forward,
)
from salf_engine.training.wrapping import wrap_model  # noqa: E402


def train_loop(accelerator: Accelerator, model: Any, strategy: Any, cfg: TrainConfig, train_split: Any,
               label_token_ids: Any, bases: torch.Tensor | None, *, lr: float, max_steps: int,
               pad_id: int = 0) -> tuple[Any, CostMeter]:
    """Train ``model`` for ``max_steps`` steps of ``cfg.batch_size`` x ``cfg.grad_accum`` examples per rank;
    returns (the prepared module, the cost meter)."""
    wrapped = wrap_model(model.to(accelerator.device), strategy, cfg)
    patch_model(wrapped.model, bases=bases, lens=cfg.lens, metric=cfg.metric,  # before accelerate wraps it
                deviation_impl=cfg.deviation_impl, gradient_checkpointing=cfg.gradient_checkpointing)
    optimizer = build_optimizer(wrapped.trainable, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, max_steps)
    module, optimizer = accelerator.prepare(wrapped.model, optimizer)
    rows = classification_rows(train_split, label_token_ids)
    driver = StrategyDriver(strategy, runner_of(wrapped.model), train_split, cfg, pad_id=pad_id)
    driver.profile()
    step_size = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    driver.begin(wrapped.parts.layers, epochs=math.ceil(max_steps / math.ceil(len(train_split) / step_size)))
    cost = CostMeter(wrapped.parts.num_layers, lora=wrapped.lora)
    forward = patched_forward(module, row_losses=bool(getattr(strategy, "needs_losses", False)))
    world, rank = accelerator.num_processes, accelerator.process_index
    step, epoch = 0, 0
    micro = cfg.batch_size * world  # a plan's micro-batch: batch-size examples on every rank
    module.train()
    while step < max_steps:
        for plan in driver.epoch_plans(epoch, micro * cfg.grad_accum, micro):
            local, seen = rank_slice(plan, rank, world), []
            loss = torch.zeros((), device=accelerator.device)
            for k, mb in enumerate(local):
                batch = {key: t.to(accelerator.device)
                         for key, t in left_pad_collate([rows[i] for i in mb.indices], pad_id).items()}
                batch["salf_label"] = torch.tensor([rows[i]["salf_label"] for i in mb.indices],
                                                   device=accelerator.device)
                sync = None if k == len(local) - 1 else accelerator.no_sync(module)
                res = micro_batch_step(forward, wrapped, mb, batch, observe=driver.wants_observations,
                                       backward=accelerator.backward, sync=sync)
                loss += res.loss * mb.weight
                if res.observation is not None:
                    seen.append(res.observation)
            cost.add_plan(plan)
            end = finish_step(optimizer, scheduler, wrapped.trainable, loss=float(loss),
                              max_grad_norm=cfg.max_grad_norm, on_nonfinite=cfg.on_nonfinite,
                              where=f"at step {step + 1} (depths {plan.depths})")
            step += 1
            if end.skipped is None:
                driver.observe(seen)
            driver.after_step(step, wrapped.parts.layers)
            if step >= max_steps:
                break
        epoch += 1
    wrapped.restore()
    return module, cost


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    # the set of trained layers changes every micro-batch: DDP must look for unused parameters
    accelerator = Accelerator(cpu=args.cpu,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    run = load(args)
    cfg = run["config"]
    module, cost = train_loop(accelerator, run["model"], strategy_from_config(cfg), cfg, run["train_split"],
                              run["verbalizer"].label_token_ids, run["bases"], lr=args.lr,
                              max_steps=args.max_steps, pad_id=run["tokenizer"].pad_token_id or 0)
    scores = evaluate_model(accelerator.unwrap_model(module), run)
    accelerator.print(f"accelerate_loop: {scores}; backprop cost-saving ratio {cost.saving():.3f}")
    return scores


if __name__ == "__main__":
    main()
