"""The README's "which strategy should I use" table, from the committed reproduction cells.

For each regime and dataset (SmolLM2-135M, the full test split), every strategy a user chooses between:
macro-F1 (mean over the seeds run) and training + profiling time relative to full fine-tuning of the
same regime and seed. The regimes and the grids they come from:

- 960 examples, one epoch: ``bench/results/repro-per-row/cells.csv`` (full, BOT50, SALF[half] with the
  per-row step, LoRA[half] and LIFT*[half] seed 0), ``bench/results/repro/cells.csv`` (LoRA[half] and
  LIFT*[half] seed 1: their code path did not change with the per-row step, and the seed-0 cells of both
  grids agree to six digits) and ``bench/results/study/cells.csv`` (the variants of issue 19's study
  confirmed on the test splits);
- 960 examples, two epochs, and 3,840 examples, one epoch: ``bench/results/regimes/cells.csv``
  (``python bench/compare_repro.py --regimes``), cells named ``<strategy> [epochs2]`` and
  ``<strategy> [data4x]``.

Two picks per regime and dataset: for accuracy, the fastest strategy whose macro-F1 is within 0.01 of the
best one's; for speed, the most accurate one at no more than 0.65 of full fine-tuning's time. Only
strategies that ran on every seed of their regime and dataset compete ("seeds pending" otherwise). A second
table gives each strategy's mean over the three datasets, where all three have run, and a third each
strategy's difference to BOT50 on the same seed. Writes
``bench/results/which_strategy.md`` and one ``bench/results/f1_vs_time[_<regime>].png`` per regime
(macro-F1 against wall time, one point per strategy and seed).

    python bench/which_strategy.py
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

from bench_utils import half_range, scatter_by_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATASETS = ["trec", "sst5", "carer"]
#: Regime tag in a cell's strategy name ("" for none) -> what it means.
REGIMES = {"": "960 examples, 1 epoch", "epochs2": "960 examples, 2 epochs",
           "data4x": "3,840 examples, 1 epoch"}
#: The grids read (later grids add seeds and strategies, never replace a cell of an earlier one).
SOURCES = [("repro-per-row", None), ("repro", {"lora-half", "lift-star-half"}), ("study", None),
           ("regimes", None)]
NAMES = {"salf:uniform:df": "SALF[half]", "lora-half": "LoRA[half]", "lift-star-half": "LIFT*[half]",
         "bot50": "BOT50", "full": "full", "salf:uniform:df:narrowing": "SALF[half], narrowing",
         "salf:uniform:df:widening": "SALF[half], widening", "bot50 [head]": "BOT50 + head",
         "salf:uniform:df [head]": "SALF[half] + head", "salf:geom:bf": "SALF geom-bf"}
#: How far below the best macro-F1 a faster strategy may stay and still be the accuracy pick.
TOLERANCE = 0.01
#: The time budget of the speed pick, relative to full fine-tuning.
FAST = 0.65

Cells = dict[tuple[str, str, str], dict[int, dict]]


def _regime_and_name(strategy: str) -> tuple[str, str]:
    """("epochs2", "BOT50") for "bot50 [epochs2]"; a tag that is not a regime stays in the name."""
    base, _, tag = strategy.partition(" [")
    tag = tag.rstrip("]")
    if tag in REGIMES:
        return tag, NAMES.get(base, base)
    return "", NAMES.get(strategy, strategy)


def load() -> Cells:
    """(regime, dataset, strategy name) -> seed -> row of the test-split cells."""
    cells: Cells = {}
    for grid, only in SOURCES:
        path = RESULTS / grid / "cells.csv"
        if not path.is_file():
            continue
        with open(path) as fh:
            for row in csv.DictReader(fh):
                if row["split"] != "test" or (only is not None and row["strategy"] not in only):
                    continue
                regime, name = _regime_and_name(row["strategy"])
                cells.setdefault((regime, row["dataset"], name), {}).setdefault(int(row["seed"]), row)
    return cells


def _summary(seeds: dict[int, dict]) -> tuple[int, float, float, float, float]:
    """(seeds, mean macro-F1, half its range, mean time vs full, FLOPs vs full) of one strategy."""
    f1 = [float(r["free_macro_f1"]) for r in seeds.values()]
    time = [float(r["time_ratio"]) for r in seeds.values() if r["time_ratio"]]
    flops = float(next(iter(seeds.values()))["flops_ratio"])
    return (len(f1), statistics.fmean(f1), half_range(f1),
            statistics.fmean(time) if time else float("nan"), flops)


def picks(group: dict[str, dict[int, dict]]) -> tuple[str | None, str | None]:
    """(accuracy pick, speed pick) among one regime and dataset's strategies (name -> seed -> row).

    Only strategies that ran on every seed of the group compete, so a strategy with one lucky seed
    is never picked over the mean of two."""
    every_seed = set().union(*group.values())
    rows = [(name, *_summary(seeds)) for name, seeds in group.items() if set(seeds) == every_seed]
    if not rows:  # every strategy still misses a seed that another has run
        return None, None
    best = max(r[2] for r in rows)
    accurate = min((r for r in rows if r[2] >= best - TOLERANCE), key=lambda r: r[4])[0]
    fast = max((r for r in rows if r[4] <= FAST), key=lambda r: r[2], default=(None,))[0]
    return accurate, fast


def table(cells: Cells) -> str:
    """The Markdown table: one row per regime, dataset and strategy, the picks in bold."""
    lines = ["| regime | dataset | strategy | seeds | macro-F1 | time vs full | FLOPs vs full | pick for |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for regime, label in REGIMES.items():
        for ds in DATASETS:
            group = {name: seeds for (r, d, name), seeds in cells.items() if (r, d) == (regime, ds)}
            if not group:
                continue
            rows = [(name, *_summary(seeds)) for name, seeds in group.items()]
            accurate, fast = picks(group)
            every_seed = set().union(*group.values())
            for name, n, f1, spread, time, flops in sorted(rows, key=lambda r: -r[2]):
                chosen = " and ".join(what for what, pick in (("accuracy", accurate), ("speed", fast))
                                      if name == pick)
                pending = set(group[name]) != every_seed
                mark = f"**{chosen}**" if chosen else "seeds pending" if pending else ""
                lines.append(f"| {label} | {ds} | {name} | {n} | {f1:.3f} ± {spread:.3f} | {time:.2f} | "
                             f"{flops:.2f} | {mark} |")
    return "\n".join(lines) + "\n"


def means(cells: Cells) -> str:
    """Each strategy's macro-F1 and time averaged over the three datasets (only where all three ran)."""
    lines = ["| regime | strategy | seeds | mean macro-F1 | mean time vs full | FLOPs vs full |",
             "|---|---|---:|---:|---:|---:|"]
    for regime, label in REGIMES.items():
        names = {name for (r, _, name) in cells if r == regime}
        rows = []
        for name in names:
            per_dataset = [cells.get((regime, ds, name)) for ds in DATASETS]
            if not all(per_dataset):
                continue
            stats = [_summary(seeds) for seeds in per_dataset]
            rows.append((name, min(s[0] for s in stats), statistics.fmean(s[1] for s in stats),
                         statistics.fmean(s[3] for s in stats), statistics.fmean(s[4] for s in stats)))
        for name, n, f1, time, flops in sorted(rows, key=lambda r: -r[2]):
            lines.append(f"| {label} | {name} | {n} | {f1:.3f} | {time:.2f} | {flops:.2f} |")
    return "\n".join(lines) + "\n"


def paired(cells: Cells, against: str = "BOT50") -> str:
    """Each strategy's macro-F1 minus ``against``'s on the same seed (same examples and order): the mean
    over the seeds and half its range, per regime and dataset, where both ran on at least two seeds."""
    lines = [f"| regime | dataset | strategy | seeds | macro-F1 minus {against}'s, same seed |",
             "|---|---|---|---:|---:|"]
    for regime, label in REGIMES.items():
        for ds in DATASETS:
            base = cells.get((regime, ds, against), {})
            for (r, d, name), seeds in sorted(cells.items()):
                common = sorted(set(seeds) & set(base))
                if (r, d) != (regime, ds) or name == against or len(common) < 2:
                    continue
                diff = [float(seeds[s]["free_macro_f1"]) - float(base[s]["free_macro_f1"]) for s in common]
                lines.append(f"| {label} | {ds} | {name} | {len(diff)} | {statistics.fmean(diff):+.3f} ± "
                             f"{half_range(diff):.3f} |")
    return "\n".join(lines) + "\n"


def plot(cells: Cells, regime: str, path: Path) -> None:
    """macro-F1 against training + profiling time relative to full, one point per strategy and seed."""
    points = {ds: {name: [(float(r["time_ratio"]), float(r["free_macro_f1"]))
                          for r in seeds.values() if r["time_ratio"]]
                   for (g, d, name), seeds in sorted(cells.items()) if (g, d) == (regime, ds)}
              for ds in DATASETS}
    points = {ds: series for ds, series in points.items() if series}
    scatter_by_dataset(points, path, f"training + profiling time / full fine-tuning ({REGIMES[regime]})")


def main() -> int:
    cells = load()
    for regime in REGIMES:
        plot(cells, regime, RESULTS / (f"f1_vs_time_{regime}.png" if regime else "f1_vs_time.png"))
    text = (table(cells) + "\n## Mean over TREC, SST-5 and CARER\n\n" + means(cells)
            + "\n## Against the static freeze, seed by seed\n\n" + paired(cells))
    (RESULTS / "which_strategy.md").write_text(
        "# Which strategy to use (SmolLM2-135M, test splits)\n\n"
        "Written by `python bench/which_strategy.py` from the committed cells. Accuracy pick: the fastest "
        f"strategy within {TOLERANCE} macro-F1 of the best; speed pick: the most accurate at no more than "
        f"{FAST} of full fine-tuning's time (of the same regime); only strategies run on every seed of their "
        "regime and dataset compete (marked \"seeds pending\" otherwise). Time ratios come from grids "
        "that ran two cells at a time on a 2-core CPU: noisy, ±0.1 between seeds is common; the FLOPs ratio "
        "is exact.\n\n"
        + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
