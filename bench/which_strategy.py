"""The README's "which strategy should I use" table, from the committed reproduction cells.

For each dataset (SmolLM2-135M, 960 training examples, one epoch, the full test split), every strategy a
user chooses between: macro-F1 (mean over the seeds run) and training + profiling time relative to full
fine-tuning of the same seed, from these grids:

- ``bench/results/repro-per-row/cells.csv``: full, BOT50, SALF[half] (the per-row step), LoRA[half] and
  LIFT*[half] (seed 0);
- ``bench/results/repro/cells.csv``: LoRA[half] and LIFT*[half] seed 1 (their code path did not change
  with the per-row step; the seed-0 cells of both grids agree to six digits);
- ``bench/results/study/cells.csv``: the variants of issue 19's study confirmed on the test splits.

Two picks per dataset: for accuracy, the fastest strategy whose macro-F1 is within 0.01 of the best one's;
for speed, the most accurate one at no more than 0.65 of full fine-tuning's time. Writes
``bench/results/which_strategy.md`` and ``bench/results/f1_vs_time.png`` (macro-F1 against wall time, one
point per strategy and seed).

    python bench/which_strategy.py
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

from bench_utils import scatter_by_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATASETS = ["trec", "sst5", "carer"]
#: The grids read (later grids add seeds and strategies, never replace a cell of an earlier one).
SOURCES = [("repro-per-row", None), ("repro", {"lora-half", "lift-star-half"}), ("study", None)]
NAMES = {"salf:uniform:df": "SALF[half]", "lora-half": "LoRA[half]", "lift-star-half": "LIFT*[half]",
         "bot50": "BOT50", "full": "full", "salf:uniform:df:narrowing": "SALF[half], narrowing",
         "salf:uniform:df:widening": "SALF[half], widening", "bot50 [head]": "BOT50 + head",
         "salf:uniform:df [head]": "SALF[half] + head"}
#: How far below the best macro-F1 a faster strategy may stay and still be the accuracy pick.
TOLERANCE = 0.01
#: The time budget of the speed pick, relative to full fine-tuning.
FAST = 0.65


def load() -> dict[tuple[str, str], dict[int, dict]]:
    """(dataset, strategy) -> seed -> row of the test-split cells."""
    cells: dict[tuple[str, str], dict[int, dict]] = {}
    for grid, only in SOURCES:
        path = RESULTS / grid / "cells.csv"
        if not path.is_file():
            continue
        with open(path) as fh:
            for row in csv.DictReader(fh):
                if row["split"] != "test" or (only is not None and row["strategy"] not in only):
                    continue
                cells.setdefault((row["dataset"], row["strategy"]), {}).setdefault(int(row["seed"]), row)
    return cells


def table(cells: dict[tuple[str, str], dict[int, dict]]) -> str:
    """The Markdown table: one row per dataset and strategy, the pick in bold."""
    lines = ["| dataset | strategy | seeds | macro-F1 | time vs full | FLOPs vs full | pick for |",
             "|---|---|---:|---:|---:|---:|---|"]
    for ds in DATASETS:
        rows = []
        for (d, strategy), seeds in cells.items():
            if d != ds:
                continue
            f1 = [float(r["free_macro_f1"]) for r in seeds.values()]
            time = [float(r["time_ratio"]) for r in seeds.values() if r["time_ratio"]]
            rows.append((NAMES.get(strategy, strategy), len(f1), statistics.fmean(f1),
                         (max(f1) - min(f1)) / 2, statistics.fmean(time) if time else float("nan"),
                         float(next(iter(seeds.values()))["flops_ratio"])))
        if not rows:
            continue
        best = max(r[2] for r in rows)
        accurate = min((r for r in rows if r[2] >= best - TOLERANCE), key=lambda r: r[4])[0]
        fast = max((r for r in rows if r[4] <= FAST), key=lambda r: r[2], default=(None,))[0]
        for name, n, f1, spread, time, flops in sorted(rows, key=lambda r: -r[2]):
            picks = (("accuracy", accurate), ("speed", fast))
            mark = " and ".join(what for what, chosen in picks if name == chosen)
            lines.append(f"| {ds} | {name} | {n} | {f1:.3f} ± {spread:.3f} | {time:.2f} | {flops:.2f} | "
                         f"{f'**{mark}**' if mark else ''} |")
    return "\n".join(lines) + "\n"


def plot(cells: dict[tuple[str, str], dict[int, dict]], path: Path) -> None:
    """macro-F1 against training + profiling time relative to full, one point per strategy and seed."""
    points = {ds: {NAMES.get(strategy, strategy): [(float(r["time_ratio"]), float(r["free_macro_f1"]))
                                                   for r in seeds.values() if r["time_ratio"]]
                   for (d, strategy), seeds in sorted(cells.items()) if d == ds}
              for ds in DATASETS}
    scatter_by_dataset(points, path, "training + profiling time / full fine-tuning (same grid and seed)")


def main() -> int:
    cells = load()
    plot(cells, RESULTS / "f1_vs_time.png")
    text = table(cells)
    (RESULTS / "which_strategy.md").write_text(
        "# Which strategy to use (SmolLM2-135M, 960 examples, one epoch, test splits)\n\n"
        "Written by `python bench/which_strategy.py` from the committed cells. Accuracy pick: the fastest "
        f"strategy within {TOLERANCE} macro-F1 of the best; speed pick: the most accurate at no more than "
        f"{FAST} of full fine-tuning's time. Time ratios come from grids that ran two cells at a time on a "
        "2-core CPU: noisy, ±0.1 between seeds is common.\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
