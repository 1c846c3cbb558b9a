"""Where LoRA[half]'s training step spends its time (issue 37), against BOT50 and full fine-tuning.

SmolLM2-135M on TREC, steps of 8 questions, through the engine's own step (``StepRunner`` then
``finish_step``: forward, backward, clipping, AdamW), prefix cache off (every forward runs the whole
model, as in a first epoch). Variants: ``full``, ``bot50``, ``lora-half`` (the CLI default: rank 8, no
dropout, the seven projections of the top 15 layers) and ``lora-half-dropout`` (the same with
``--lora-dropout 0.05``, the default before ``bench/results/lora_dropout.md``). Each is timed at one and
at two threads, round-robin (one step of each variant per round after warm-up rounds), so load changes
hit all alike; times are medians, ratios are against ``full`` at the same thread count. Then one profile
(``torch.profiler``) of a few default LoRA[half] steps at two threads splits its self CPU time into the
base model's matrix products, the adapters' small products (an operand with the LoRA rank as a
dimension), dropout, the optimizer and the rest.

    python bench/profile_lora.py [--steps 10] [--warmup 3]

Writes ``bench/results/lora_time.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_utils import cpu_name, git_commit, markdown_table, utc_now

from salf_engine.config import TrainConfig
from salf_engine.training.cost import CostMeter
from salf_engine.training.inputs import prepare
from salf_engine.training.recipe import TrainingRecipe
from salf_engine.training.step import finish_step

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "lora_time.md"
VARIANTS = {"full": {"strategy": "full"}, "bot50": {"strategy": "bot50"},
            "lora-half": {"strategy": "lora-half"},
            "lora-half-dropout": {"strategy": "lora-half", "lora_dropout": 0.05}}


class Stepper:
    """One variant's engine step on its own copy of the model, cycling over an epoch's plans."""

    def __init__(self, options: dict, data_dir: str) -> None:
        config = TrainConfig(model="smollm2-135m", dataset="trec", data_dir=data_dir, limit=480, batch_size=8,
                             prefix_cache="off", zero_shot_eval=False, **options).validate()
        r = TrainingRecipe(config, prepared=prepare(config), progress=False, log=None)
        r.setup()
        r.open_run()  # no output: a run directory that writes nothing
        r.wrapped, r.runner = r.make_model()
        r.driver = r.make_strategy(None)
        r.optimizer, r.scheduler = r.make_optimizer()
        r.cost = CostMeter(r.runner.num_layers, lora=r.wrapped.lora)
        r.run_step = r.make_step()
        r.wrapped.model.train()
        self.r, self.config = r, config
        self.plans = list(r.driver.resumable_epoch(0, r.step_size, r.micro_size)[2])
        self.k = 0

    def step(self) -> float:
        """One optimizer step; its seconds."""
        r, plan = self.r, self.plans[self.k % len(self.plans)]
        self.k += 1
        t0 = time.perf_counter()
        loss, _ = r.run_step(plan)
        finish_step(r.optimizer, r.scheduler, r.wrapped.trainable, loss=loss,
                    max_grad_norm=self.config.max_grad_norm)
        return time.perf_counter() - t0


def categories(prof, rank: int) -> dict[str, float]:
    """Self CPU seconds of the profile by category."""
    out = {"base matrix products": 0.0, "adapter matrix products": 0.0, "dropout": 0.0, "optimizer": 0.0,
           "rest": 0.0}
    for e in prof.key_averages(group_by_input_shape=True):
        t = e.self_cpu_time_total / 1e6
        name, shapes = e.key, e.input_shapes or []
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
            small = any(rank in (s or []) for s in shapes)
            out["adapter matrix products" if small else "base matrix products"] += t
        elif "dropout" in name or name in ("aten::bernoulli_", "aten::native_dropout_backward"):
            out["dropout"] += t
        elif "adam" in name.lower() or "foreach" in name or name.startswith("Optimizer"):
            out["optimizer"] += t
        else:
            out["rest"] += t
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args(argv)
    steppers = {label: Stepper(opts, args.data_dir) for label, opts in VARIANTS.items()}
    seconds: dict[tuple[str, int], list[float]] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rnd in range(args.warmup + args.steps):
            for label, s in steppers.items():
                t = s.step()
                if rnd >= args.warmup:
                    seconds.setdefault((label, threads), []).append(t)
    torch.set_num_threads(2)
    lora = steppers["lora-half"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps // 2 or 1):
            lora.step()
    share = categories(prof, lora.config.lora_r)
    total = sum(share.values())

    rows = []
    for label in VARIANTS:
        med = {th: statistics.median(seconds[(label, th)]) for th in (1, 2)}
        full = {th: statistics.median(seconds[("full", th)]) for th in (1, 2)}
        rows.append([label, f"{med[1]:.3f}", f"{med[1] / full[1]:.2f}", f"{med[2]:.3f}",
                     f"{med[2] / full[2]:.2f}", f"{med[1] / med[2]:.2f}"])
    lines = ["# Where LoRA[half]'s step time goes (issue 37)", "",
             f"{utc_now()}, commit {git_commit()}, {cpu_name()}, torch {torch.__version__}. "
             f"SmolLM2-135M, TREC, steps of 8 questions, the engine's step (forward, backward, clipping, "
             f"AdamW), prefix cache off; median of {args.steps} steps per variant after {args.warmup} "
             "warm-up rounds, round-robin. `python bench/profile_lora.py` wrote this.", "",
             *markdown_table(["variant", "1 thread (s)", "vs full", "2 threads (s)", "vs full",
                              "2-thread speed-up"], rows, align="lrrrrr"), "",
             f"LoRA[half] at 2 threads, self CPU time by category ({args.steps // 2 or 1} profiled "
             "steps):", "",
             *markdown_table(["category", "share"], [[k, f"{v / total:.1%}"] for k, v in share.items()],
                             align="lr"), ""]
    RESULT.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
