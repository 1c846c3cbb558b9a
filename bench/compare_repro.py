"""Small-scale CPU reproduction of the paper's tables 3-5: SmolLM2-135M on TREC + CARER, every strategy.

Runs ``salf compare`` once per dataset, the two in parallel (one thread each: on a shared 2-core
machine OpenMP's 2-thread default is an order of magnitude slower under contention), first the
strategies every comparison needs, then the remaining fixed-freezing / budget variants. Every run
resumes: finished cells are skipped, so an interrupted reproduction is continued by running this
script again. Finally the tables and plots of the whole grid are rebuilt and copied to
``bench/results/compare/``.

    python bench/compare_repro.py [--output runs/compare-repro] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["CORE", "EXTRA", "LORA_LR", "SETTINGS", "main"]

ROOT = Path(__file__).resolve().parents[1]

#: Every strategy the paper compares, at least once.
CORE = ["full", "lora-full", "lora-half", "lift-half", "lift-star-half", "salf", "salf:uniform:df",
        "salf:arith:df", "salf:geom:df", "bot50", "top50", "int50", "adt-low", "adt-high"]
#: The other budget orders and freezing fractions.
EXTRA = ["salf:uniform:bf", "salf:arith:bf", "salf:geom:bf", "bot25", "bot75", "top25", "top75", "int25",
         "int75"]
#: LoRA at a LoRA-sized learning rate (1e-3), against SALF[half] with LoRA adapters at the same rate.
LORA_LR = ["lora-full", "lora-half", "salf:uniform:df:lora"]
#: Shared by every cell: one epoch over the same training subset, the same hyperparameters.
SETTINGS = ["--limit", "96", "--eval-limit", "96", "--epochs", "1", "--batch-size", "8", "--lr", "1e-4",
            "--seed", "0", "--max-length", "128", "--eval-batch-size", "32"]
DATASETS = ["trec", "carer"]


def _compare(model: str, datasets: list[str], strategies: list[str], out: Path, data_dir: str,
             extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "salf_engine", "compare", "--model", model,
            "--datasets", ",".join(datasets), "--strategies", ",".join(strategies),
            "--data-dir", data_dir, "--output", str(out), *SETTINGS, *extra]


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the grids; copy tables and plots into bench/results/compare/."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--output", default=str(ROOT / "runs" / "compare-repro"))
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "compare"))
    ap.add_argument("--datasets", default=",".join(DATASETS), help="run these (tables always cover all)")
    ap.add_argument("--core-only", action="store_true", help="skip the EXTRA strategies")
    args = ap.parse_args(argv)
    out = Path(args.output)
    lora_out = out.with_name(out.name + "-lora-lr1e-3")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    # (grid directory, strategies, settings on top of SETTINGS), in order of importance
    phases = [(out, CORE, []), (lora_out, LORA_LR, ["--lr", "1e-3"])]
    if not args.core_only:
        phases.append((out, CORE + EXTRA, []))
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    codes: dict[str, int] = {}

    def run_dataset(ds: str) -> None:
        """The phases of one dataset, one after the other, appending to runs/<name>-<ds>.log."""
        with open(out.parent / f"{out.name}-{ds}.log", "a") as log:
            for grid, strategies, extra in phases:
                cmd = _compare(args.model, [ds], strategies, grid, args.data_dir,
                               [*extra, "--quiet", "--discard-models", "--keep-going"])
                print(" ".join(cmd), flush=True)
                code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                codes[ds] = codes.get(ds, 0) | code
                print(f"{ds}: {len(strategies)} strategies in {grid.name} done after "
                      f"{time.perf_counter() - start:.0f}s (exit {code})", flush=True)

    threads = [threading.Thread(target=run_dataset, args=(ds,)) for ds in args.datasets.split(",")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = max(codes.values(), default=0)
    tables = [(out, CORE if args.core_only else CORE + EXTRA, [], Path(args.results)),
              (lora_out, LORA_LR, ["--lr", "1e-3"], Path(args.results) / "lora_lr1e-3")]
    for grid, strategies, extra, results in tables:
        if not grid.is_dir():
            continue
        cmd = _compare(args.model, DATASETS, strategies, grid, args.data_dir, [*extra, "--tables-only"])
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        results.mkdir(parents=True, exist_ok=True)
        for f in sorted(grid.iterdir()):
            if f.suffix in (".md", ".csv", ".png", ".json") and f.is_file():
                shutil.copy2(f, results / f.name)
        print(f"tables and plots of {grid.name} copied to {results}", flush=True)
    print(f"done after {time.perf_counter() - start:.0f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
