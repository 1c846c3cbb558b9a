"""Accuracy at equal wall time (issue 37): three epochs of full fine-tuning against the strategies a freezing
engine makes cheaper from the second epoch on, scored after every epoch.

Every cell is one ``salf train`` run (seed, dataset, strategy) of SmolLM2-135M into
``OUTPUT/seed<S>/<dataset>/<strategy>``: 960 class-stratified training examples (seeded), three epochs,
steps of 8, ``--eval-every-epoch`` on the full test split (macro-F1 with free decoding after each epoch,
off the training clock), CLI defaults otherwise: the prefix cache is on where it is exact (BOT50,
LoRA[half], the rising floor), learning rates are the CLI's (the weights' and LoRA's, from
``bench/results/lr_sweep.md``). Strategies (:data:`STRATEGIES`): full, BOT50, LoRA[half], SALF[half]
narrowing (the default ``salf``: its floor returns to 0 every epoch, so nothing is cached), the rising
floor (narrowing across the whole run, cached); and shorter runs with complete learning-rate schedules
(:data:`SHORT_RUNS`: full for one and two epochs, BOT50 for one, LoRA[half] for two), each strategy's
entry at the budgets they fit, where a three-epoch run's first epochs end at a high learning rate. TREC first,
seed 0 then seed 1 of every strategy, then SST-5, then CARER, so a grid stopped part-way leaves whole
answers. Finished cells are skipped, their ``summary.json`` and ``config.json`` kept under
``bench/results/epochs/cells`` (committed) and put back first, so a fresh checkout resumes. One thread
per worker: two workers share the 2-core CPU, so their times are ratios of cells that ran beside each
other (``bench/results/prefix_cache_speed.md`` times the cache on an idle machine).

    python bench/compare_epochs.py [--output runs/epochs] [--seeds 0,1] [--datasets trec,sst5,carer]
                                   [--workers 2] [--start-within HOURS] [--report-only]

It writes ``bench/results/epochs/report.md`` (macro-F1 and training time after each epoch, and the most
accurate strategy at the wall time of one and of two epochs of full fine-tuning) and ``f1_vs_time.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_utils import grid_parser, half_range, mean_spread, resume_grid, scatter_by_dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "epochs"
DATASETS = ["trec", "sst5", "carer"]
#: label -> salf train options of every strategy compared
STRATEGIES = {
    "full": ["--strategy", "full"],
    "full-1ep": ["--strategy", "full", "--epochs", "1"],
    "full-2ep": ["--strategy", "full", "--epochs", "2"],
    "bot50": ["--strategy", "bot50"],
    "lora-half": ["--strategy", "lora-half"],
    "narrowing": ["--strategy", "salf", "--budget", "uniform", "--infill", "df", "--depth-schedule",
                  "narrowing"],
    "rising": ["--strategy", "salf", "--budget", "uniform", "--infill", "df", "--depth-schedule", "rising"],
    "bot50-1ep": ["--strategy", "bot50", "--epochs", "1"],
    "lora-half-2ep": ["--strategy", "lora-half", "--epochs", "2"],
}
EPOCHS = 3
#: runs shorter than three epochs, their learning-rate schedules complete -> the strategy whose entry they
#: are at every budget they fit (k epochs of full fit a budget of k by definition; the others by their time)
SHORT_RUNS = {"full-1ep": "full", "full-2ep": "full", "bot50-1ep": "bot50", "lora-half-2ep": "lora-half"}
SETTINGS = ["--model", "smollm2-135m", "--limit", "960", "--epochs", str(EPOCHS), "--batch-size", "8",
            "--max-length", "128", "--eval-batch-size", "64", "--eval-every-epoch", "--no-zero-shot",
            "--quiet"]
Cell = tuple[int, str, str]  # (seed, dataset, strategy)


def grid_cells(seeds: list[int], datasets: list[str]) -> list[Cell]:
    """Dataset by dataset, seed by seed, every strategy."""
    return [(seed, ds, label) for ds in datasets for seed in seeds for label in STRATEGIES]


def cell_dir(out: Path, cell: Cell) -> Path:
    """Where a cell's run writes: ``OUTPUT/seed<S>/<dataset>/<label>``."""
    seed, ds, label = cell
    return out / f"seed{seed}" / ds / label


def curve(summary: dict) -> list[tuple[float, float]]:
    """(training seconds, macro-F1 with free decoding) after each epoch of a cell."""
    return [(e["train_seconds"], e["free_macro_f1"]) for e in summary["epochs"]]


def best_within(points: list[tuple[float, float]], seconds: float) -> tuple[int, float] | None:
    """(epochs, macro-F1) of the last epoch finished within ``seconds`` of training; None when none is."""
    done = [(k + 1, f1) for k, (t, f1) in enumerate(points) if t <= seconds]
    return done[-1] if done else None


def cell_command(out: Path, cell: Cell, data_dir: str, options: list[str] | None = None) -> list[str]:
    """The ``salf train`` command line of one cell: the grid's settings, then ``options`` (default: the
    cell's strategy)."""
    seed, ds, label = cell
    return [sys.executable, "-m", "salf_engine", "train", *SETTINGS,
            *(STRATEGIES[label] if options is None else options), "--dataset", ds, "--data-dir", data_dir,
            "--seed", str(seed), "--output", str(cell_dir(out, cell))]


def finished_curves(out: Path, cells: list[Cell]) -> dict[Cell, list[tuple[float, float]]]:
    """The :func:`curve` of every finished cell (one with a ``summary.json``)."""
    return {c: curve(json.loads((cell_dir(out, c) / "summary.json").read_text())) for c in cells
            if (cell_dir(out, c) / "summary.json").is_file()}


def report(out: Path, cells: list[Cell]) -> str:
    """``report.md`` and ``f1_vs_time.png`` from the finished cells."""
    found = finished_curves(out, cells)
    lines = ["# Accuracy at equal wall time (issue 37): SmolLM2-135M, 960 examples, three epochs", "",
             f"{len(found)} of {len(cells)} cells finished. Macro-F1 (free decoding, full test split) after "
             "each epoch; time = training seconds so far relative to one epoch of full fine-tuning "
             "(`full-1ep`'s run, or full's first epoch where that has not run; same dataset and seed); "
             "mean ± half the range over seeds. `full-1ep`, `full-2ep`, `bot50-1ep` and `lora-half-2ep` "
             "train one or two epochs, their learning-rate schedules run to the end: what a user with that "
             "budget would run, where a three-epoch run's first epochs stop at a high learning rate. "
             "`python bench/compare_epochs.py` wrote this.", ""]
    datasets = list(dict.fromkeys(ds for _, ds, _ in cells))
    seeds = sorted({s for s, _, _ in cells})
    compared = [label for label in STRATEGIES if label not in SHORT_RUNS]
    budgets: dict[int, dict[str, dict[int, tuple[bool, float]]]] = {1: {}, 2: {}}
    plot: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for ds in datasets:
        rows = []
        for label in STRATEGIES:
            per_epoch: list[list[tuple[float, float]]] = [[] for _ in range(EPOCHS)]
            for seed in seeds:
                mine, unit = found.get((seed, ds, label)), _unit(found, seed, ds)
                if mine is None or unit is None:
                    continue
                for k, (t, f1) in enumerate(mine):
                    per_epoch[k].append((t / unit, f1))
                for b in budgets:
                    if label not in SHORT_RUNS:
                        budgets[b].setdefault(f"{ds}|{label}", {})[seed] = _entry(
                            found, seed, ds, label, b * unit, b)
            if not per_epoch[0]:
                continue
            rows.append(f"| {label} | {len(per_epoch[0])} | " + " | ".join(
                f"{mean_spread([f for _, f in e])} ({sum(t for t, _ in e) / len(e):.2f})" if e else "—"
                for e in per_epoch) + " |")
            plot.setdefault(ds, {})[label] = [(sum(t for t, _ in e) / len(e), sum(f for _, f in e) / len(e))
                                              for e in per_epoch if e]
        if rows:
            lines += [f"## {ds}", "", "| strategy | seeds | " + " | ".join(
                f"epoch {k + 1}: macro-F1 (time)" for k in range(EPOCHS)) + " |",
                "|---|---:|" + "---:|" * EPOCHS, *rows, ""]
    lines += ["## The most accurate strategy at the wall time of one and of two epochs of full "
              "fine-tuning", "",
              "Per dataset and seed, each strategy's most accurate run within the budget (—: none fits), "
              "then the mean over seeds: its three-epoch run after the last epoch finished within the "
              "budget, or a shorter run of it that fits (k epochs of full fit a budget of k epochs of full "
              "by definition). The most accurate is named alone where its paired gain over each other "
              "strategy (per seed) exceeds the gains' spread (half their range); strategies it does not "
              "beat beyond the spread follow it, and with one seed no spread is known.", "",
              "| budget | dataset | " + " | ".join(compared) + " | most accurate |",
              "|---|---|" + "---:|" * len(compared) + "---|"]
    for b, scores in budgets.items():
        for ds in datasets:
            hits = {label: scores.get(f"{ds}|{label}", {}) for label in compared}
            means = {label: _mean([f for _, f in h.values()]) for label, h in hits.items()}
            if all(v != v for v in means.values()):
                continue
            lines.append(f"| {b} epoch{'s' if b > 1 else ''} of full | {ds} | " + " | ".join(
                "—" if v != v else f"{v:.3f}" + ("" if all(c for c, _ in hits[label].values()) else "†")
                for label, v in means.items()) + f" | {_most_accurate(hits)} |")
    lines += ["", "†: after an earlier epoch of the three-epoch run (for at least one seed), its learning "
              "rate not yet decayed: a lower bound on what a run of that many epochs would score."]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report.md").write_text(text)
    scatter_by_dataset(plot, RESULTS / "f1_vs_time.png", "training time (one epoch of full fine-tuning = 1)",
                       lines=True)
    return text


def _most_accurate(hits: dict[str, dict[int, tuple[bool, float]]]) -> str:
    """The strategy of the highest mean over its seeds' scores (``hits``: label -> seed -> (complete,
    macro-F1)), then those it does not beat beyond the spread of its paired gains (per seed, half their
    range; one pair has no spread), or "(one seed)"."""
    means = {label: _mean([f for _, f in h.values()]) for label, h in hits.items()}
    fitted = {label: v for label, v in means.items() if v == v}
    winner = max(fitted, key=fitted.__getitem__)
    if len(hits[winner]) < 2:
        return f"{winner} (one seed)"
    ties = []
    for label in fitted:
        seeds = hits[winner].keys() & hits[label].keys()
        gains = [hits[winner][s][1] - hits[label][s][1] for s in seeds]
        if label != winner and (len(gains) < 2 or sum(gains) / len(gains) <= half_range(gains)):
            ties.append(label)
    return winner + (f"; within the spread: {', '.join(ties)}" if ties else "")


def _entry(found: dict[Cell, list[tuple[float, float]]], seed: int, ds: str, label: str, seconds: float,
           epochs_of_full: int) -> tuple[bool, float]:
    """(schedule complete, macro-F1) of the most accurate run of ``label`` within the budget: its three-epoch
    run's last epoch within ``seconds``, or a short run (:data:`SHORT_RUNS`) that fits; (True, nan) when
    none does."""
    options = []
    mine = found.get((seed, ds, label))
    hit = best_within(mine, seconds) if mine else None
    if hit:
        options.append((hit[1], hit[0] == len(mine)))
    for short, of in SHORT_RUNS.items():
        run = found.get((seed, ds, short))
        if of == label and run and (len(run) <= epochs_of_full if of == "full" else run[-1][0] <= seconds):
            options.append((run[-1][1], True))
    f1, complete = max(options) if options else (float("nan"), True)
    return complete, f1


def _unit(found: dict[Cell, list[tuple[float, float]]], seed: int, ds: str) -> float | None:
    """Training seconds of one epoch of full fine-tuning: ``full-1ep``'s run, else full's first epoch."""
    one = found.get((seed, ds, "full-1ep")) or found.get((seed, ds, "full"))
    return one[0][0] if one else None


def _mean(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return sum(kept) / len(kept) if kept and len(kept) == len(values) else float("nan")


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the grid, then print the report."""
    args = grid_parser(__doc__, "epochs", workers=2, datasets=",".join(DATASETS)).parse_args(argv)
    out = Path(args.output)
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = grid_cells(seeds, args.datasets.split(","))
    every = grid_cells(seeds, DATASETS)  # the report's: the committed cells of datasets not run now included
    return resume_grid(args, cells, lambda cell: cell_dir(out, cell),
                       lambda cell: cell_command(out, cell, args.data_dir), out, RESULTS,
                       lambda: report(out, every))


if __name__ == "__main__":
    sys.exit(main())
