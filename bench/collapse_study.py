"""Issue 38: when and why SALF's CLI default collapses to one class, on binary SST (SST-5 without its
neutral class, the two negatives and the two positives merged).

Every cell is one ``salf train`` run (examples, seed, variant) of SmolLM2-135M, one epoch, CLI defaults
otherwise, into ``OUTPUT/n<N>/seed<S>/<variant>``. The training pool is SST-5's training split without
neutral sentences; 600 of them (class-stratified, fixed) are held out as the validation split every
cell is evaluated on (``--split val``); ``--split test`` evaluates on SST-5's test split instead (the
final read). ``--limit`` training examples are drawn from the rest with the cell's seed. With
``--trace`` every trained micro-batch's rows (sample, cut, class, loss) go to
``OUTPUT/traces/...jsonl`` (the snapshot used for the study logs them under ``SALF_TRACE``; other
checkouts ignore it). Finished cells are skipped, their ``summary.json`` and ``config.json`` kept under
``bench/results/collapse/cells`` and put back first, so the grid resumes. One thread, one cell at a
time.

    python bench/collapse_study.py [--output runs/collapse] [--split val] [--trace] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from bench_utils import add_grid_options, mean_spread, restore_kept, run_grid

from salf_engine.experiments.report import cost_seconds

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "collapse"
SST5 = ROOT.parent / "shared" / "data" / "sst5"
#: label -> salf train options. ``default`` is ``--strategy salf`` as the CLI gave it before issue 38
#: (no budget: Algorithm 3, each sample at its eof, 5 % profiled, unprofiled samples at their class's
#: median eof), now spelled ``--budget none``. ``narrowing`` is what ``--strategy salf`` gives since
#: (SALF[half] narrowing), spelled out so that it means the same in every checkout.
_HALF = ["--strategy", "salf", "--budget", "uniform"]
_ALG3 = ["--strategy", "salf", "--budget", "none"]
VARIANTS = {
    "default": _ALG3,
    "default-pf1": [*_ALG3, "--profile-fraction", "1"],
    "default-mixed": [*_ALG3, "--depth-schedule", "mixed"],
    "narrowing": [*_HALF, "--depth-schedule", "narrowing"],
    "half": [*_HALF, "--depth-schedule", "per-row"],
    "bot50": ["--strategy", "bot50"],
    "full": ["--strategy", "full"],
    "default-mixed-pf1": [*_ALG3, "--depth-schedule", "mixed", "--profile-fraction", "1"],
    "half-pf1": [*_HALF, "--profile-fraction", "1"],
    "half-random": [*_HALF, "--depth-assignment", "loss-rank"],
}
SETTINGS = ["--model", "smollm2-135m", "--epochs", "1", "--no-zero-shot", "--quiet"]
#: share of the evaluation predictions in one class at or above which a cell counts as collapsed
COLLAPSE = 0.95
VAL_SIZE = 600


def write_data(out: Path) -> dict[str, Path]:
    """Binary SST as local JSONL directories: ``val`` (train = pool, test = 600 held out) and ``test``
    (train = the same pool, test = SST-5's test split without neutral)."""
    def read(name: str) -> list[dict]:
        rows = []
        for line in (SST5 / name).read_text(encoding="utf-8").splitlines():
            label, text = line.split(" ", 1)
            if label != "2":
                rows.append({"text": text, "label": "negative" if label in "01" else "positive"})
        return rows

    train, test = read("sentiment-train"), read("sentiment-test")
    rng = random.Random(38)
    by = {c: [i for i, r in enumerate(train) if r["label"] == c] for c in ("negative", "positive")}
    held = set()
    for members in by.values():
        held |= set(rng.sample(members, round(VAL_SIZE * len(members) / len(train))))
    pool = [r for i, r in enumerate(train) if i not in held]
    dirs = {"val": (pool, [r for i, r in enumerate(train) if i in held]), "test": (pool, test)}
    paths = {}
    for split, (tr, te) in dirs.items():
        d = out / "data" / split
        d.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", tr), ("test", te)):
            (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[split] = d
    return paths


def grid_cells(seeds: list[int]) -> list[tuple[int, int, str]]:
    """The most informative first (a cell takes 12-15 minutes on the shared 2-core CPU): 480 examples,
    the old CLI default against SALF[half] by eof rank and narrowing (the new default), seed by seed;
    then the old and the new default's collapse rates over every seed, at 480 and 960 examples; then the
    old default's separated changes (full profile, mixed micro-batches) and the references."""
    first = ("default", "narrowing", "half")
    second = ("default-pf1", "default-mixed", "bot50", "full", "default-mixed-pf1", "half-random")
    cells = [(480, s, v) for s in seeds[:1] for v in first]
    cells += [(480, s, "default") for s in seeds[1:3]]  # the default's collapse rate, early
    cells += [(480, s, v) for s in seeds[1:2] for v in first[1:]]
    cells += [(480, s, v) for s in seeds for v in ("default", "narrowing")]  # the old and new default
    cells += [(960, s, v) for s in seeds for v in ("narrowing", "default")]
    cells += [(480, s, v) for s in seeds[2:] for v in first[1:]]
    cells += [(480, s, v) for s in seeds for v in second]
    cells += [(960, s, v) for s in seeds for v in ("narrowing", "half", "bot50")]
    cells += [(480, s, v) for s in seeds for v in ("half-pf1",)]
    return list(dict.fromkeys(cells))  # each cell once, at its first place


def _cell(out: Path, cell: tuple[int, int, str]) -> Path:
    n, seed, variant = cell
    return out / f"n{n}" / f"seed{seed}" / variant


def preds_share(summary: dict, cell: Path) -> float:
    """Share of the evaluation predictions in the most predicted class, counted from the cell's
    ``eval.json`` (label-restricted decoding: predicted = tp / precision per class; the copy kept under
    ``RESULTS/cells`` when the run directory is gone), else the run's own single-class guard."""
    for path in (cell / "eval.json", RESULTS / "cells" / cell.relative_to(cell.parents[2]) / "eval.json"):
        if path.is_file():
            per_class = json.loads(path.read_text())["fine_tuned"]["restricted"]["per_class"]
            predicted = [round(c["recall"] * c["support"] / c["precision"]) if c["precision"] else 0
                         for c in per_class]
            return max(predicted) / sum(c["support"] for c in per_class)
    guard = summary["fine_tuned"].get("single_class")
    return guard["share"] if guard else float("nan")


def report(out: Path, cells: list) -> str:
    """``report.md``: per (examples, variant) collapse rate over seeds, macro-F1 mean ± half-range, time."""
    found = {c: json.loads((_cell(out, c) / "summary.json").read_text()) for c in cells
             if (_cell(out, c) / "summary.json").is_file()}
    lines = ["# Issue 38: collapse of SALF's default on binary SST (SmolLM2-135M, one epoch)", "",
             f"{len(found)} of {len(cells)} cells finished. Evaluated on {VAL_SIZE} examples held out of "
             "the training split. collapsed = the most predicted class takes >= "
             f"{COLLAPSE:.0%} of the predictions. time = training + profiling seconds (one thread). "
             "`python bench/collapse_study.py` wrote this.", "",
             "| examples | variant | seeds | collapsed | macro-F1 | per seed | majority share per seed | "
             "backward saving | time (s) |", "|---:|---|---:|---:|---:|---|---|---:|---:|"]
    for n in sorted({c[0] for c in cells}):
        for variant in VARIANTS:
            mine = sorted((c[1], s) for c, s in found.items() if c[0] == n and c[2] == variant)
            if not mine:
                continue
            f1 = [s["fine_tuned"]["free_macro_f1"] for _, s in mine]
            shares = [preds_share(s, _cell(out, (n, seed, variant))) for seed, s in mine]
            collapsed = sum(x >= COLLAPSE for x in shares)
            lines.append(
                f"| {n} | {variant} | {len(mine)} | {collapsed}/{len(mine)} | {mean_spread(f1)} | "
                + ", ".join(f"{v:.3f}" for v in f1) + " | " + ", ".join(f"{v:.2f}" for v in shares)
                + f" | {mean_spread([s.get('cost_saving_ratio') or 0.0 for _, s in mine])} | "
                f"{sum(cost_seconds(s) for _, s in mine) / len(mine):.0f} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report.md").write_text(text)
    return text


def placement(out: Path, quarters: int = 4) -> str:
    """``placement.md`` from the traces: per cell and class, the cuts and the mean training loss in each
    quarter of the epoch (rows in training order), and the share of the class trained at cut >= m/2."""
    lines = ["# Where each class trains (issue 38): cuts and training loss by quarter of the epoch", "",
             "Per traced cell and class: mean cut / share of rows cut at >= 15 of 30 layers / mean "
             "label-token loss, in each quarter of the epoch. `python bench/collapse_study.py "
             "--report-only` wrote this.", "",
             "| cell | class | rows | " + " | ".join(f"Q{q + 1} cut / deep / loss" for q in range(quarters))
             + " | distinct cuts |", "|---|---|---:|" + "---|" * quarters + "---:|"]
    names = {0: "negative", 1: "positive"}
    for path in sorted((out / "traces").glob("*.jsonl")):
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        rows = [r for rec in recs for r in zip(rec["d"], rec["y"], rec["loss"], strict=True)]
        if not rows:
            continue
        size = -(-len(rows) // quarters)
        for y in sorted({r[1] for r in rows}):
            cells = []
            for q in range(quarters):
                part = [r for r in rows[q * size:(q + 1) * size] if r[1] == y]
                if not part:
                    cells.append("—")
                    continue
                cut = sum(r[0] for r in part) / len(part)
                deep = sum(r[0] >= 15 for r in part) / len(part)
                loss = sum(r[2] for r in part) / len(part)
                cells.append(f"{cut:.1f} / {deep:.2f} / {loss:.2f}")
            mine = [r for r in rows if r[1] == y]
            lines.append(f"| {path.stem} | {names.get(y, y)} | {len(mine)} | " + " | ".join(cells)
                         + f" | {len({r[0] for r in mine})} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / "placement.md").write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(ROOT / "runs" / "collapse"))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--trace", action="store_true", help="log every trained row (the study's snapshot)")
    ap.add_argument("--only", default=None, help="comma-separated variants to run (default: the grid)")
    add_grid_options(ap, workers=1)
    args = ap.parse_args()
    out = Path(args.output)
    cells = grid_cells([int(s) for s in args.seeds.split(",")])
    if args.only:
        cells = [c for c in cells if c[2] in args.only.split(",")]
    if args.report_only:
        print(report(out, cells))
        print(placement(out))
        return 0
    data = write_data(out)[args.split]
    restore_kept(out, RESULTS)

    def command(cell) -> list[str]:
        n, seed, variant = cell
        trace = []
        if args.trace:
            path = out / "traces" / f"n{n}_seed{seed}_{variant}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            trace = ["env", f"SALF_TRACE={path}"]
        return [*trace, sys.executable, "-m", "salf_engine", "train", *SETTINGS, *VARIANTS[variant],
                "--dataset", str(data), "--limit", str(n), "--seed", str(seed),
                "--output", str(_cell(out, cell))]

    def after(cell) -> None:
        shutil.copy2(_cell(out, cell) / "eval.json", RESULTS / "cells" / _cell(out, cell).relative_to(out))
        report(out, cells)
        placement(out)

    failed = run_grid(cells, lambda cell: _cell(out, cell), command, out, RESULTS, workers=args.workers,
                      after=after, start_within=args.start_within)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
