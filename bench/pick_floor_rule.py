"""Pick the rising-floor rule (issue 37, item 6) on a validation split carved from the training data, never
the test split.

Two rules give SALF[half] a frozen floor that rises over the run, with the same depths over the run and so
the same FLOPs: ``rising`` (narrowing across the whole run: each epoch a band of the budget's depths in
ascending order) and ``stepped`` (the same bands, each epoch's depths in a random order over its rows: per-row
cuts above a floor that rises once per epoch). Every cell is ``bench/compare_epochs.py``'s run (960
examples, three epochs, steps of 8, the prefix cache on) evaluated after each epoch on 500 examples held out
of the training split (``--eval-split holdout``, the same 500 for every seed; the 960 are drawn from the
rest), into ``OUTPUT/seed<S>/<dataset>/<rule>``. Finished cells are kept under
``bench/results/epochs/rule_pick/cells`` (committed) and put back first, so a fresh checkout resumes.

    python bench/pick_floor_rule.py [--output runs/rule-pick] [--seeds 0,1] [--datasets trec,sst5]
                                    [--workers 2] [--start-within HOURS] [--report-only]

It writes ``bench/results/epochs/rule_pick.md``: validation macro-F1 after each epoch per rule, and the pick:
the rule whose paired gain after the last epoch (over every dataset and seed that both rules finished)
exceeds the gains' spread; otherwise ``rising`` stays, the rule the accuracy grid already runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_utils import grid_parser, half_range, mean_spread, resume_grid
from compare_epochs import EPOCHS, cell_dir, finished_curves
from compare_epochs import cell_command as grid_command

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "epochs" / "rule_pick"
RULES = ("rising", "stepped")
VALIDATION = ["--eval-split", "holdout", "--holdout-size", "500"]
Cell = tuple[int, str, str]  # (seed, dataset, rule)


def grid_cells(seeds: list[int], datasets: list[str]) -> list[Cell]:
    """Dataset by dataset, seed by seed, both rules."""
    return [(seed, ds, rule) for ds in datasets for seed in seeds for rule in RULES]


def cell_command(out: Path, cell: Cell, data_dir: str) -> list[str]:
    """The ``salf train`` command line of one cell: the accuracy grid's, evaluated on the validation part."""
    return grid_command(out, cell, data_dir, [*VALIDATION, "--strategy", "salf", "--budget", "uniform",
                                              "--infill", "df", "--depth-schedule", cell[2]])


def report(out: Path, cells: list[Cell]) -> str:
    """``rule_pick.md`` from the finished cells."""
    found = finished_curves(out, cells)
    lines = ["# The rising-floor rule, picked on a validation split (issue 37, item 6)", "",
             f"{len(found)} of {len(cells)} cells finished. SALF[half] on SmolLM2-135M, 960 training "
             "examples, three epochs; macro-F1 (free decoding) on 500 examples held out of the training "
             "split after each epoch, mean ± half the range over seeds. Both rules train the same depths, so "
             "the same FLOPs. `python bench/pick_floor_rule.py` wrote this.", "",
             "| dataset | rule | seeds | " + " | ".join(f"epoch {k + 1}" for k in range(EPOCHS)) + " |",
             "|---|---|---:|" + "---:|" * EPOCHS]
    last: dict[str, list[float]] = {rule: [] for rule in RULES}
    for ds in dict.fromkeys(ds for _, ds, _ in cells):
        for rule in RULES:
            runs = [found[c] for c in cells if c[1:] == (ds, rule) and c in found]
            if runs:
                lines.append(f"| {ds} | {rule} | {len(runs)} | " + " | ".join(
                    mean_spread([r[k][1] for r in runs]) for k in range(EPOCHS)) + " |")
        for seed in sorted({s for s, d, _ in cells if d == ds}):
            pair = [found.get((seed, ds, rule)) for rule in RULES]
            if all(pair):
                for rule, points in zip(RULES, pair, strict=True):
                    last[rule].append(points[-1][1])
    lines.append("")
    lines.append(_pick(last))
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS.parent / "rule_pick.md").write_text(text)
    return text


def _pick(last: dict[str, list[float]]) -> str:
    """The sentence that picks a rule from the paired last-epoch scores: the rule whose mean paired gain
    exceeds the gains' spread (half their range); within the spread, or on one pair, no rule is better and
    the grid keeps ``rising``, the rule it already runs."""
    rising, stepped = last["rising"], last["stepped"]
    if not rising:
        return "No (dataset, seed) pair has both rules finished yet: no rule is picked."
    gains = [b - a for a, b in zip(rising, stepped, strict=True)]
    mean = sum(gains) / len(gains)
    spread = half_range(gains)
    means = f"rising {sum(rising) / len(rising):.3f}, stepped {sum(stepped) / len(stepped):.3f}"
    per_pair = ", ".join(f"{g:+.3f}" for g in gains)
    text = (f"After epoch {EPOCHS}, over the {len(gains)} (dataset, seed) pair(s) both rules finished: "
            f"{means}; stepped - rising per pair {per_pair} (mean {mean:+.3f} ± {spread:.3f}). ")
    if len(gains) > 1 and abs(mean) > spread:
        return text + f"Picked: **{'stepped' if mean > 0 else 'rising'}**."
    why = "one pair has no spread" if len(gains) == 1 else "the difference is within its spread"
    return text + f"No rule is better ({why}): the grid keeps **rising**, the rule it already runs."


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the validation cells, then print the report."""
    args = grid_parser(__doc__, "rule-pick", workers=2, datasets="trec,sst5").parse_args(argv)
    out = Path(args.output)
    cells = grid_cells([int(s) for s in args.seeds.split(",")], args.datasets.split(","))
    return resume_grid(args, cells, lambda cell: cell_dir(out, cell),
                       lambda cell: cell_command(out, cell, args.data_dir), out, RESULTS,
                       lambda: report(out, cells))


if __name__ == "__main__":
    sys.exit(main())
