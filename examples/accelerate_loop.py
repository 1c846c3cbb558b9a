"""A plain ``accelerate`` loop built from the engine's pieces (works on one device or under
``accelerate launch`` / ``torchrun``: every rank trains its share of each micro-batch at the same cut).

    accelerate launch examples/accelerate_loop.py --model smollm2-135m --dataset trec --max-steps 60
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

sys.path.insert(0, str(Path(__file__).parent))
from common import evaluate_model, load, parser  # noqa: E402

from salf_engine.integrations.hf import classification_rows, left_pad_collate  # noqa: E402
from salf_engine.integrations.patching import patch_model, runner_of  # noqa: E402
from salf_engine.schedule.driver import StrategyDriver  # noqa: E402
from salf_engine.schedule.sampling import rank_slice  # noqa: E402
from salf_engine.schedule.strategies import strategy_from_config  # noqa: E402
from salf_engine.training.step import build_optimizer, build_scheduler  # noqa: E402
from salf_engine.training.wrapping import wrap_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    # the set of trained layers changes every micro-batch: DDP must look for unused parameters
    accelerator = Accelerator(cpu=args.cpu,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    run = load(args)
    cfg = run["config"]
    strategy = strategy_from_config(cfg)
    wrapped = wrap_model(run["model"].to(accelerator.device), strategy, cfg)
    patch_model(wrapped.model, bases=run["bases"])  # before accelerate wraps the model
    optimizer = build_optimizer(wrapped.trainable, cfg, args.lr)
    scheduler = build_scheduler(optimizer, cfg, args.max_steps)
    module, optimizer = accelerator.prepare(wrapped.model, optimizer)
    rows = classification_rows(run["train_split"], run["verbalizer"].label_token_ids)
    pad_id = run["tokenizer"].pad_token_id or 0
    driver = StrategyDriver(strategy, runner_of(wrapped.model), run["train_split"], cfg, pad_id=pad_id)
    driver.profile()
    driver.begin(wrapped.parts.layers)
    world, rank = accelerator.num_processes, accelerator.process_index
    step, epoch = 0, 0
    micro = args.batch_size * world  # a plan's micro-batch: batch-size examples on every rank
    module.train()
    while step < args.max_steps:
        for plan in driver.epoch_plans(epoch, micro * args.grad_accum, micro):
            local, seen = rank_slice(plan, rank, world), []
            for k, mb in enumerate(local):
                batch = {key: t.to(accelerator.device)
                         for key, t in left_pad_collate([rows[i] for i in mb.indices], pad_id).items()}
                labels = torch.tensor([rows[i]["salf_label"] for i in mb.indices], device=accelerator.device)
                embed = wrapped.set_trainable(mb.depth, mb.trainable, mb.depths)
                last = k == len(local) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(module):
                    out = module(**batch, salf_depth=mb.runner_depth, salf_label=labels,
                                 salf_train_embeddings=embed)
                    accelerator.backward(out.loss * mb.weight)
                if mb.weight > 0 and out.deviations is not None:
                    seen.append((mb.indices, out.deviations))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            driver.observe(seen)
            driver.after_step(step, wrapped.parts.layers)
            if step >= args.max_steps:
                break
        epoch += 1
    wrapped.restore()
    scores = evaluate_model(accelerator.unwrap_model(module), run)
    accelerator.print(f"accelerate_loop: {scores}")
    return scores


if __name__ == "__main__":
    main()
