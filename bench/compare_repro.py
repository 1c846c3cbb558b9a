"""Real-scale CPU reproduction of the paper's tables 3-5: SmolLM2-135M on TREC, SST-5 and CARER.

Every cell is one ``salf compare`` run of one (seed, dataset, strategy, evaluation split) into
``OUTPUT/seed<S>-<group>[-holdout]/``: 960 class-stratified training examples (seeded), one epoch,
steps of 8 examples, evaluated on the full test split, or, for choosing the schedule, on 500 examples
held out of the training split. Strategies that train the weights run at the full-weights learning
rate, LoRA strategies at the LoRA one (both from ``bench/results/lr_sweep.md``; a group is one
learning rate, so a resumed grid can never mix them). Two workers (one thread each) take the cells in
order of importance:

1. TREC, seed 0, held-out split: SALF[half] under the default schedule and its alternatives
   (``eof-match`` assignment, one or two cuts per step, the ``paper`` schedule), LIFT*[half]; then the
   ablations (:data:`ABLATIONS`): a quarter of the examples profiled, no profile at all (random depths
   inside each class), steps of 32 examples, twice the learning rate, a second seed; and no profile on
   SST-5 and CARER (test split);
2. TREC, seed 0, then seed 1, test split: the five key strategies; then SALF[half] and LIFT*[half] on
   LoRA adapters (seed 0);
3. SST-5 and CARER, seed 0, then seed 1: the key strategies;
4. the other strategies of the paper's tables 3 and 4, seed 0.

A cell with a *variant* passes the variant's extra options (:data:`VARIANTS`) and has its own output
directory. The script resumes: finished cells are skipped (``salf compare`` checks their settings). Once the
workers stop, or with ``--report-only``, it writes ``bench/results/repro/report.md`` (mean and spread
over seeds of macro-F1 with free decoding, backward saving, FLOPs and wall time relative to ``full``
of the same dataset and seed) plus ``cells.csv`` and ``f1_vs_flops.png``.

    python bench/compare_repro.py [--output runs/repro] [--data-dir ../shared/data] [--ablations]
                                  [--per-row | --study | --regimes] [--workers 2] [--report-only]

``--per-row`` reruns only :data:`PER_ROW` (two seeds, every dataset) under the current default step, into
their own directories (``runs/repro-per-row``, ``bench/results/repro-per-row``). Every finished cell's
``summary.json`` and ``config.json`` are kept under the results' ``cells/`` (committed), and a run puts
them back first, so a fresh checkout resumes the grid where the last one stopped. ``--study`` does the same
for issue 19's study of per-sample depth (:data:`STUDY_CELLS`: ``runs/study``, ``bench/results/study``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from bench_utils import add_grid_options, mean_spread, restore_kept, run_grid, scatter_by_dataset

from salf_engine.experiments.report import cost_seconds

__all__ = ["KEY", "ALTERNATIVES", "ABLATIONS", "VARIANTS", "LORA_VARIANTS", "OTHERS", "SETTINGS", "LR",
           "PER_ROW", "LEVERS", "STUDY_CELLS", "cells", "report", "main"]

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ["trec", "sst5", "carer"]
#: The strategies the issue's claims are about (two seeds each).
KEY = ["full", "salf:uniform:df", "lift-star-half", "lora-half", "salf:arith:df"]
#: SALF[half] under the default schedule and its variants, compared on held-out TREC data (seed 0).
ALTERNATIVES = ["salf:uniform:df", "salf:uniform:df:eof-match", "salf:uniform:df:cuts1",
                "salf:uniform:df:cuts2", "salf:uniform:df:paper", "lift-star-half"]
Cell = tuple[int, str, str, str, str]  # (seed, dataset, strategy, split, variant)
#: The regimes' cells run for hours: a checkpoint every 480 examples (the newest kept, deleted once the cell
#: finished) lets a grid killed mid-cell go on inside the cell; its time excludes the writes and adds up.
CHECKPOINTS = ["--save-every", "60", "--save-total-limit", "1"]
#: Extra options of a cell, by variant name ("" = none). A profile of 1 example in 960 leaves the class-rank
#: assignment without semantics: every class spread over the depths at random (the ablation of the eof).
VARIANTS = {"": [], "profile25": ["--profile-fraction", "0.25"],
            "random-in-class": ["--profile-fraction", "0.001"], "steps32": ["--grad-accum", "4"],
            "lr2e-4": ["--lr", "2e-4"], "head": ["--train-head"], "epochs2": ["--epochs", "2", *CHECKPOINTS],
            "data4x": ["--limit", "3840", *CHECKPOINTS]}
#: Ablations of SALF[half] (seed, dataset, strategy, split, variant), with their `full` references: on
#: held-out TREC data, then without a profile on the test splits of SST-5 and CARER.
ABLATIONS = [(seed, "trec", strategy, "holdout", variant) for seed, strategy, variant in [
    (0, "full", ""), (0, "salf:uniform:df", "random-in-class"), (0, "salf:uniform:df", "profile25"),
    (1, "salf:uniform:df", ""), (1, "salf:uniform:df", "random-in-class"), (1, "full", ""),
    (0, "full", "steps32"), (0, "salf:uniform:df", "steps32")]]
ABLATIONS += [(0, ds, "salf:uniform:df", "test", "random-in-class") for ds in ("sst5", "carer")]
ABLATIONS += [(0, "trec", "salf:uniform:df", "holdout", "lr2e-4")]
#: SALF[half] and LIFT*[half] on LoRA adapters (the paper's own setup: appendix A.1), at the LoRA lr.
LORA_VARIANTS = ["salf:uniform:df:lora", "lift-star-half:lora"]
#: The rest of the paper's tables 3 and 4 (``salf:none``: Algorithm 3, the grid's bare ``salf`` before
#: issue 38; its cells kept before then are under ``salf/``).
OTHERS = ["lora-full", "lift-half", "salf:none", "salf:geom:df", "salf:arith:bf", "salf:geom:bf", "bot50",
          "top50", "int50", "adt-low", "adt-high"]
#: The strategies a user chooses between (issue 18's rerun under the per-row step): two seeds, every dataset.
PER_ROW = ["full", "salf:uniform:df", "bot50", "lora-half", "lift-star-half"]
#: SALF[half] and the two it must beat first, both seeds; then LoRA[half] and LIFT*[half].
PER_ROW_CELLS: list[Cell] = [(seed, ds, s, "test", "") for group in (PER_ROW[:3], PER_ROW[3:])
                             for seed in (0, 1) for ds in DATASETS for s in group]
#: Issue 19's levers for per-sample depth, screened on held-out CARER (the dataset with the widest gap
#: between full fine-tuning and BOT50) against BOT50 at the same backward saving, seed 0 of every lever
#: first: SALF[half]'s eof rank, its time-varying depths (the trained scope narrowing from every layer
#: to the top one over the epoch, Algorithm 4's order, and its reverse) and training the head.
LEVERS = [("bot50", ""), ("salf:uniform:df", ""), ("salf:uniform:df:narrowing", ""),
          ("salf:uniform:df:widening", ""), ("bot50", "head"), ("salf:uniform:df", "head")]
STUDY_SCREEN: list[Cell] = [(0, "carer", "full", "holdout", "")] + [
    (seed, "carer", s, "holdout", v) for seed in (0, 1) for s, v in LEVERS]
STUDY_SCREEN.append((1, "carer", "full", "holdout", ""))
#: The levers that survived the screen, confirmed on the test splits (two seeds, every dataset), beside the
#: per-row rerun's cells (restored into the study's directory and reported with it: its `full` gives their
#: time ratios).
STUDY_CONFIRM: list[Cell] = [(seed, ds, "salf:uniform:df:narrowing", "test", "") for seed in (0, 1)
                             for ds in DATASETS]
#: The loss lever needs a second epoch (the first one's training losses place the second one's depths):
#: SALF[half] by loss rank against BOT50, two epochs, held-out CARER.
STUDY_EPOCHS2: list[Cell] = [(seed, "carer", s, "holdout", "epochs2") for seed in (0, 1)
                             for s in ("bot50", "salf:uniform:df:loss-rank")]
STUDY_CELLS = STUDY_SCREEN + STUDY_CONFIRM + STUDY_EPOCHS2
#: Issue 19's regimes closer to real use: 4x the data (3,840 examples) and two epochs at 960, every dataset,
#: two seeds, the strategies a user chooses between plus the best budget plan of the first grid (geom-bf).
#: 72 cells of 2-4x a 960-example cell each: days on the 2-core CPU (``--regimes``).
REGIME_STRATEGIES = ["full", "bot50", "lora-half", "salf:uniform:df", "salf:uniform:df:narrowing",
                     "salf:geom:bf"]
#: Cheapest regime first, and each (regime, dataset) with both seeds before the next, so that a grid
#: stopped part-way leaves whole answers: two seeds of every strategy on the datasets it reached.
REGIME_CELLS: list[Cell] = [(seed, ds, s, "test", regime) for regime in ("epochs2", "data4x")
                            for ds in DATASETS for seed in (0, 1) for s in REGIME_STRATEGIES]
#: Learning rate per group: the weights themselves, or LoRA adapters.
LR = {"weights": "1e-4", "lora": "3e-3"}
#: Shared by every cell (``--lora-dropout 0.05``: the default when these grids ran; it is 0 now).
SETTINGS = ["--limit", "960", "--epochs", "1", "--batch-size", "8", "--max-length", "128",
            "--eval-batch-size", "64", "--no-zero-shot", "--discard-models", "--quiet",
            "--lora-dropout", "0.05"]


def group_of(strategy: str) -> str:
    """Which learning-rate group a strategy cell belongs to."""
    return "lora" if strategy.startswith("lora") or strategy.endswith(":lora") else "weights"


def cells() -> list[Cell]:
    """(seed, dataset, strategy, split, variant) of every cell, in the order the workers take them."""
    order = [(0, "trec", s, "holdout", "") for s in ALTERNATIVES]
    order += ABLATIONS
    order += [(seed, "trec", s, "test", "") for seed in (0, 1) for s in KEY]
    order += [(0, "trec", s, "test", "") for s in LORA_VARIANTS]
    order += [(seed, ds, s, "test", "") for seed in (0, 1) for ds in ("sst5", "carer") for s in KEY]
    order += [(0, ds, s, "test", "") for ds in DATASETS for s in OTHERS]
    order += [c for c in PER_ROW_CELLS if c not in order]  # BOT50's second seed
    return order


def _grid(out: Path, seed: int, strategy: str, split: str, variant: str) -> Path:
    suffix = ("-holdout" if split == "holdout" else "") + (f"-{variant}" if variant else "")
    return out / f"seed{seed}-{group_of(strategy)}{suffix}"


def _cell_dir(out: Path, seed: int, dataset: str, strategy: str, split: str, variant: str) -> Path:
    return _grid(out, seed, strategy, split, variant) / "cells" / dataset / strategy.replace(":", "_")


def _command(model: str, out: Path, seed: int, dataset: str, strategy: str, split: str, variant: str,
             data_dir: str) -> list[str]:
    return [sys.executable, "-m", "salf_engine", "compare", "--model", model, "--datasets", dataset,
            "--strategies", strategy, "--data-dir", data_dir,
            "--output", str(_grid(out, seed, strategy, split, variant)), "--seed", str(seed),
            "--lr", LR[group_of(strategy)], "--eval-split", split, *SETTINGS, *VARIANTS[variant]]


def run(model: str, out: Path, data_dir: str, workers: int = 2, only: list[Cell] | None = None,
        results: Path = ROOT / "bench" / "results" / "repro", grid: list[Cell] | None = None,
        start_within: float | None = None) -> int:
    """Run every unfinished cell (of ``only``, if given), ``workers`` at a time, rewriting the report of
    ``grid`` (default: ``only``) in ``results`` after each; returns 1 if any failed. A cell is a ``salf
    compare`` grid, which resumes itself: an interrupted one goes on where it stopped."""
    restore_kept(out, results)
    failed = run_grid(cells() if only is None else only, lambda cell: _cell_dir(out, *cell),
                      lambda cell: _command(model, out, *cell, data_dir), out, results, workers=workers,
                      after=lambda cell: report(out, results, grid or only), restart=False,
                      start_within=start_within)
    return 1 if failed else 0


def _load(out: Path, grid: list[Cell]) -> dict[Cell, dict]:
    found = {}
    for cell in grid:
        path = _cell_dir(out, *cell) / "summary.json"
        if path.is_file():
            found[cell] = json.loads(path.read_text())
    return found


def report(out: Path, results: Path = ROOT / "bench" / "results" / "repro", grid: list[Cell] | None = None
           ) -> Path:
    """Write report.md, cells.csv and f1_vs_flops.png from the finished cells of ``grid`` (default: the
    whole reproduction); returns report.md."""
    grid = cells() if grid is None else grid
    found = _load(out, grid)
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    order = sorted(found.items(), key=lambda kv: (kv[0][3], kv[0][1], kv[0][4], kv[0][2], kv[0][0]))
    for (seed, ds, strat, split, variant), s in order:
        full = found.get((seed, ds, "full", split, variant)) or found.get((seed, ds, "full", split, ""))
        rows.append(dict(dataset=ds, split=split, strategy=f"{strat} [{variant}]" if variant else strat,
                         seed=seed, lr=s.get("lr"),
                         free_macro_f1=s["fine_tuned"]["free_macro_f1"],
                         free_accuracy=s["fine_tuned"]["free_accuracy"],
                         backward_saving=s["cost_saving_ratio"], flops_ratio=s.get("flops_ratio"),
                         time_ratio=cost_seconds(s) / cost_seconds(full) if full else None,
                         train_profile_seconds=round(cost_seconds(s), 1), steps=s["steps"],
                         examples_trained=s["examples_trained"], num_eval_examples=s["num_eval_examples"]))
    with open(results / "cells.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["dataset"])
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Real-scale reproduction (SmolLM2-135M-Instruct, CPU)", "",
             f"{len(found)} of {len(grid)} cells finished. 960 training examples per dataset, one "
             "epoch, steps of 8 examples, the full test split (TREC 500, SST-5 2,210, CARER 2,000), "
             f"lr {LR['weights']} (weights) / {LR['lora']} (LoRA). Values are mean ± half the range over "
             "the seeds run (one value = one seed). F1 = macro-F1, free decoding. Time = training + "
             "profiling seconds relative to `full` of the same dataset and seed (same run of this "
             "script, two cells at a time on a 2-core CPU; a variant's `full` where it has one). "
             "Variants: [random-in-class] profiles 1 example (depths random inside each class), "
             "[profile25] a quarter of the examples, [steps32] takes steps of 32 examples (grad-accum 4), "
             "[lr2e-4] twice the learning rate, [head] trains the LM head (and so the tied embedding), "
             "[epochs2] two epochs, [data4x] 3,840 training examples.",
             ""]
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    for split, ds in [(split, ds) for split in ("holdout", "test") for ds in DATASETS]:
        mine = [r for r in rows if r["dataset"] == ds and r["split"] == split]
        if not mine:
            continue
        title = f"{ds}, test split" if split == "test" else f"{ds}, 500 held-out training examples"
        lines += [f"## {title}", "", "| strategy | seeds | F1 | accuracy | backward saving | FLOPs vs full | "
                  "time vs full |", "|---|---:|---:|---:|---:|---:|---:|"]
        for strat in strategies:
            rs = [r for r in mine if r["strategy"] == strat]
            if not rs:
                continue

            def col(key: str, rs=rs) -> str:
                return mean_spread([r[key] for r in rs if r[key] is not None])

            lines.append(f"| {strat} | {len(rs)} | {col('free_macro_f1')} | {col('free_accuracy')} | "
                         f"{col('backward_saving')} | {col('flops_ratio')} | {col('time_ratio')} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    (results / "report.md").write_text(text)
    _plot(rows, results / "f1_vs_flops.png")
    return results / "report.md"


def _plot(rows: list[dict], path: Path) -> None:
    points: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in rows:
        if r["split"] == "test":
            points.setdefault(r["dataset"], {}).setdefault(r["strategy"], []).append(
                (r["flops_ratio"], r["free_macro_f1"]))
    ordered = {ds: points[ds] for ds in DATASETS if ds in points}
    scatter_by_dataset(ordered, path, "training FLOPs / full fine-tuning (profiling included)")


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the grid, then write the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--output", default=None, help="cell directories (default runs/repro)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    add_grid_options(ap, workers=2)
    ap.add_argument("--ablations", action="store_true", help="only run the ablation cells")
    ap.add_argument("--per-row", action="store_true",
                    help="only the cells of PER_ROW (two seeds, every dataset), into runs/repro-per-row and "
                         "bench/results/repro-per-row unless --output / --results say otherwise")
    ap.add_argument("--study", action="store_true",
                    help="only issue 19's study (STUDY_CELLS), into runs/study and bench/results/study")
    ap.add_argument("--regimes", action="store_true",
                    help="only issue 19's regimes (REGIME_CELLS: 4x the data, two epochs), into runs/regimes "
                         "and bench/results/regimes")
    ap.add_argument("--results", default=None, help="where the report goes (default bench/results/repro)")
    args = ap.parse_args(argv)
    name = ("repro-per-row" if args.per_row else "study" if args.study else "regimes" if args.regimes
            else "repro")
    out = Path(args.output or ROOT / "runs" / name)
    results = Path(args.results or ROOT / "bench" / "results" / name)
    only = (PER_ROW_CELLS if args.per_row else STUDY_CELLS if args.study else REGIME_CELLS if args.regimes
            else ABLATIONS if args.ablations else None)
    grid = only
    if args.study:  # the per-row rerun's cells: the strategies the study's variants are compared with
        restore_kept(out, ROOT / "bench" / "results" / "repro-per-row")
        grid = STUDY_CELLS + PER_ROW_CELLS
    status = 0 if args.report_only else run(args.model, out, args.data_dir, args.workers, only, results, grid,
                                             args.start_within)
    print(report(out, results, grid).read_text())
    return status


if __name__ == "__main__":
    sys.exit(main())
