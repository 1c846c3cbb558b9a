"""`salf demo`: SmolLM2-135M on the embedded TREC, zero-shot against SALF[half], BOT50, LoRA[half] and full.

SALF[half] (uniform budget, every row at its own cut, placed by its eof rank), the same budget with the
trained scope narrowing over the epoch (no profile: the fastest SALF variant of issue 19's study), the
static freeze of the bottom half they must beat (BOT50) and full fine-tuning of the same 960 questions
(one epoch, steps of 8, the same shuffled order), and LoRA[half] for two epochs with the prefix cache (its
frozen half runs once per question: the engine's edge, and on TREC the most accurate run that fits one
epoch of full fine-tuning's time, docs/reproduction.md), every model evaluated on all 500 test questions:
a five-cell `salf compare` grid.
"""

from __future__ import annotations

import time
from typing import Any

from salf_engine.errors import SalfError
from salf_engine.experiments.compare import run_compare
from salf_engine.experiments.grid import CompareSettings
from salf_engine.experiments.report import print_demo_table

__all__ = ["DEMO_DEFAULTS", "run_demo"]

DEMO_DEFAULTS: dict[str, Any] = dict(
    model="smollm2-135m", dataset="trec",
    strategies=("salf:uniform:df", "salf:uniform:df:narrowing", "bot50", "lora-half:ep2", "full"),
    limit=960, epochs=1, batch_size=8, max_length=128, eval_batch_size=64, seed=0,
)


def run_demo(output: str, *, model: str | None = None, strategy: str | None = None, limit: int | None = None,
             eval_limit: int | None = None, seed: int | None = None, progress: bool = True) -> None:
    """Run the demo grid into ``output`` (replaced) and print its table."""
    d = DEMO_DEFAULTS
    strategies = [strategy or d["strategies"][0], *d["strategies"][1:]]
    limit = limit or d["limit"]
    train_fields = dict(limit=limit, epochs=d["epochs"], batch_size=d["batch_size"],
                        max_length=d["max_length"], eval_batch_size=d["eval_batch_size"],
                        seed=d["seed"] if seed is None else seed, eval_limit=eval_limit)
    settings = CompareSettings(model=model or d["model"], datasets=[d["dataset"]], strategies=strategies,
                               output=output, train=train_fields, zero_shot=True, overwrite=True)
    print(f"salf demo: {settings.model} on the embedded TREC, {limit} training questions, one epoch in steps "
          f"of {d['batch_size']} (lora-half:ep2: two, its frozen half cached): zero-shot vs "
          f"{' vs '.join(strategies)}, each evaluated on the {'500' if eval_limit is None else eval_limit} "
          "test questions")
    start = time.perf_counter()
    result = run_compare(settings, progress=progress, log=print if progress else None)
    wall = time.perf_counter() - start
    if result.failed:
        raise SalfError(f"the demo's {result.failed[0][1]} run failed: {result.failed[0][2]}")
    print_demo_table(result.zero_shot[d["dataset"]],
                     [(label, result.summaries[(d["dataset"], label)]) for label in strategies])
    print(f"demo wall time: {wall:.1f}s; runs in {output}/cells/{d['dataset']}/")
