"""Where the per-row step's time goes (issue 37, item 7): SALF[half]'s rows at their own cuts against one cut
at m/2, at one and at two threads.

The batch of ``bench_step.py`` (SmolLM2-135M, B = 8, T = 64 random tokens, the loss at the last position):
``one_cut`` runs it through the runner at depth m/2, ``per_row`` at SALF[half]'s per-row depths (spread
evenly over 0..m-1, ``bench_utils.salf_half_depths``), ``cached`` at m/2 entering from the prefix cache (an
epoch after the first). Each step is forward, loss, backward and an AdamW update; steps are timed
round-robin after warm-up rounds, at each thread count, and the ratios compare medians of the same run.
Then one ``torch.profiler`` pass of a few steps of ``one_cut`` and ``per_row`` at each thread count splits
their self CPU time by kind of operator, with the number of operator calls a step makes: what the per-row
step pays beyond the one-cut step, and what does not split over two threads.

    python bench/profile_rows.py [--steps 8] [--warmup 2] [--profiled 3]

Writes ``bench/results/rows_time.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_utils import cached_forward, cpu_name, git_commit, markdown_table, salf_half_depths, utc_now

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "rows_time.md"
#: operator name prefix (leading underscores and ``aten::`` dropped) -> kind, first match wins
KINDS = [
    ("matrix products", ("mm", "addmm", "bmm", "matmul", "linear")),
    ("attention", ("scaled_dot_product", "softmax")),
    ("copies, gathers and cats", ("cat", "index", "gather", "copy", "clone", "contiguous", "slice", "select",
                                  "stack", "narrow", "split", "to_copy", "empty")),
    ("optimizer", ("foreach", "fused_adam", "adam", "lerp", "addcdiv", "addcmul")),
]
REST = "elementwise, norms and the rest"


def kind_of(name: str) -> str:
    """The kind of a profiled operator (``KINDS``), else ``REST``."""
    bare = name.removeprefix("aten::").lstrip("_").lower()
    return next((kind for kind, prefixes in KINDS if bare.startswith(prefixes)), REST)


def by_kind(events) -> tuple[dict[str, float], int]:
    """Self CPU seconds by kind, and the number of operator calls, of a profile's ``aten::`` events."""
    seconds = {kind: 0.0 for kind, _ in KINDS} | {REST: 0.0}
    calls = 0
    for e in events:
        if not e.key.startswith("aten::"):
            continue
        seconds[kind_of(e.key)] += e.self_cpu_time_total / 1e6
        calls += e.count
    return seconds, calls


def _load() -> torch.nn.Module:
    from salf_engine.models.loading import load_model

    model, _ = load_model("smollm2-135m")
    return model.float().train()


def _step(forward: Callable[[], torch.Tensor], targets: torch.Tensor,
          optimizer: torch.optim.Optimizer) -> float:
    """One training step (forward, loss, backward, AdamW); its seconds."""
    t0 = time.perf_counter()
    torch.nn.functional.cross_entropy(forward().float(), targets).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per configuration and thread count")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--profiled", type=int, default=3, help="steps in each profile")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)

    from salf_engine.runner.truncated import TruncatedRunner

    model = _load()
    m = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    targets = torch.randint(1000, 1006, (args.batch,), generator=gen)
    runner = TruncatedRunner(model)
    depths = salf_half_depths(args.batch, m)
    forwards = {"one_cut": lambda: runner(ids, mask, depth=m // 2).logits,
                "per_row": lambda: runner(ids, mask, depth=depths).logits,
                "cached": cached_forward(runner, ids, mask, m // 2)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-7)

    seconds: dict[tuple[str, int], list[float]] = {}
    kinds: dict[tuple[str, int], tuple[dict[str, float], int]] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rnd in range(args.warmup + args.steps):
            for name, forward in forwards.items():
                t = _step(forward, targets, optimizer)
                if rnd >= args.warmup:
                    seconds.setdefault((name, threads), []).append(t)
        for name in ("one_cut", "per_row"):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(args.profiled):
                    _step(forwards[name], targets, optimizer)
            share, calls = by_kind(prof.key_averages())
            per_step = {k: v / args.profiled for k, v in share.items()}
            kinds[(name, threads)] = (per_step, calls // args.profiled)

    med = {key: statistics.median(v) for key, v in seconds.items()}
    rows = [[name, f"{med[(name, 1)] * 1e3:.0f}", f"{med[(name, 1)] / med[('one_cut', 1)]:.2f}",
             f"{med[(name, 2)] * 1e3:.0f}", f"{med[(name, 2)] / med[('one_cut', 2)]:.2f}",
             f"{med[(name, 1)] / med[(name, 2)]:.2f}"] for name in forwards]
    kind_rows = []
    for kind in kinds[("one_cut", 1)][0]:
        cells = [kind]
        for threads in (1, 2):
            one, per = kinds[("one_cut", threads)][0][kind], kinds[("per_row", threads)][0][kind]
            cells += [f"{one * 1e3:.0f}", f"{per * 1e3:.0f}", f"{(per - one) * 1e3:+.0f}"]
        kind_rows.append(cells)
    calls = ", ".join(f"{name} {kinds[(name, th)][1]} at {th} thread(s)"
                      for th in (1, 2) for name in ("one_cut", "per_row"))
    lines = ["# The per-row step against one cut, at one and two threads (issue 37, item 7)", "",
             f"{utc_now()}, commit {git_commit()}, {cpu_name()}, torch {torch.__version__}. SmolLM2-135M, "
             f"B = {args.batch}, T = {args.seq} random tokens, loss at the last position; forward, backward "
             f"and AdamW; per-row depths {depths}; median of {args.steps} steps per configuration after "
             f"{args.warmup} warm-up rounds, round-robin. `python bench/profile_rows.py` wrote this.", "",
             *markdown_table(["step", "1 thread (ms)", "vs one cut", "2 threads (ms)", "vs one cut",
                              "2-thread speed-up"], rows, align="lrrrrr"), "",
             f"Self CPU time a step spends by kind of operator ({args.profiled} profiled steps each, ms; the "
             "profiler's own overhead included alike):", "",
             *markdown_table(["kind", "1 thread: one cut", "per row", "difference", "2 threads: one cut",
                              "per row", "difference"], kind_rows, align="lrrrrrr"), "",
             f"Operator calls a step: {calls}.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
