"""LoRA[half] with and without its adapter dropout (issue 37: where LoRA[half]'s step time goes), scored on
examples held out of the training split, never the test split.

Every cell is one ``salf train`` run (dataset, seed, dropout) of SmolLM2-135M into
``OUTPUT/<dataset>/seed<S>/drop<P>``: LoRA[half], 960 training examples, one epoch, steps of 8,
``--max-length`` 128, evaluated on 500 examples held out of the training split (``--eval-split holdout
--holdout-size 500``), the prefix cache off (one epoch has nothing to reuse). A seed's two dropout
settings run side by side (``--workers 2``, one thread each), so their time ratio shares the machine's
load. Finished cells are skipped; their ``summary.json`` and ``config.json`` are kept under
``bench/results/lora_dropout/cells`` (committed) and put back first, so a fresh checkout resumes.

    python bench/lora_dropout.py [--datasets trec,sst5,carer] [--seeds 0,1] [--workers 2] [--report-only]

It writes ``bench/results/lora_dropout.md``: macro-F1 of both settings per seed, the paired difference
(dropout 0 minus the default 0.05) and the training-time ratio.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_utils import grid_parser, markdown_table, mean_spread, resume_grid

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "lora_dropout"
REPORT = ROOT / "bench" / "results" / "lora_dropout.md"
DROPOUTS = ("0.05", "0")  # the default, then none
DATASETS = ("trec", "sst5", "carer")
SETTINGS = ["--model", "smollm2-135m", "--strategy", "lora-half", "--limit", "960", "--epochs", "1",
            "--batch-size", "8", "--max-length", "128", "--eval-batch-size", "64", "--eval-split", "holdout",
            "--holdout-size", "500", "--no-zero-shot", "--prefix-cache", "off", "--quiet"]
Cell = tuple[str, int, str]  # (dataset, seed, dropout)


def grid_cells(datasets: list[str], seeds: list[int]) -> list[Cell]:
    """Dataset by dataset, seed by seed, the two dropout settings of a seed next to each other."""
    return [(ds, seed, p) for ds in datasets for seed in seeds for p in DROPOUTS]


def _cell(out: Path, cell: Cell) -> Path:
    ds, seed, p = cell
    return out / ds / f"seed{seed}" / f"drop{p}"


def cell_command(out: Path, cell: Cell, data_dir: str) -> list[str]:
    """The ``salf train`` command line of one cell."""
    ds, seed, p = cell
    return [sys.executable, "-m", "salf_engine", "train", *SETTINGS, "--dataset", ds, "--data-dir", data_dir,
            "--seed", str(seed), "--lora-dropout", p, "--output", str(_cell(out, cell))]


def report(out: Path, cells: list[Cell]) -> str:
    """``lora_dropout.md`` from the finished cells: a table per dataset, a row per seed with both settings."""
    found = {c: json.loads((_cell(out, c) / "summary.json").read_text()) for c in cells
             if (_cell(out, c) / "summary.json").is_file()}
    lines = ["# LoRA[half] with and without its dropout (issue 37)", "",
             "SmolLM2-135M, LoRA[half] (lr 3e-3), 960 training examples, one epoch, steps of 8, "
             "`--max-length 128`, macro-F1 (free decoding) on 500 examples held out of the training split "
             "(never the test split), `--prefix-cache off`, one thread per run (TREC's: a seed's two "
             "settings side by side; SST-5's and CARER's: one after the other, beside one other job). "
             "`python bench/lora_dropout.py` wrote this.", ""]
    all_diffs, all_ratios = [], []
    for ds in dict.fromkeys(c[0] for c in cells):
        rows, diffs, ratios = [], [], []
        for seed in dict.fromkeys(c[1] for c in cells if c[0] == ds):
            pair = [found.get((ds, seed, p)) for p in DROPOUTS]
            if None in pair:
                continue
            f1 = [s["fine_tuned"]["free_macro_f1"] for s in pair]
            acc = [s["fine_tuned"]["free_accuracy"] for s in pair]
            secs = [s["train_seconds"] for s in pair]
            diffs.append(f1[1] - f1[0])
            ratios.append(secs[1] / secs[0])
            rows.append([seed, f"{f1[0]:.3f}", f"{f1[1]:.3f}", f"{f1[1] - f1[0]:+.3f}",
                         f"{acc[0]:.3f} / {acc[1]:.3f}",
                         f"{secs[0]:.0f} / {secs[1]:.0f}", f"{ratios[-1]:.2f}"])
        if not rows:
            continue
        lines += [f"## {ds}", "", *markdown_table(
            ["seed", "macro-F1, dropout 0.05 (default)", "macro-F1, dropout 0", "difference",
             "accuracy 0.05 / 0", "training s 0.05 / 0", "time ratio"], rows, align="rrrrrrr"), "",
            f"Paired difference (dropout 0 minus 0.05): {mean_spread(diffs)} over {len(diffs)} seed(s); "
            f"training time without dropout: {mean_spread(ratios)} of the default's.", ""]
        all_diffs += diffs
        all_ratios += ratios
    if len({ds for ds, _, _ in found}) > 1 and all_diffs:
        lines += ["## Every dataset", "", f"Paired difference over {len(all_diffs)} (dataset, seed) pairs: "
                  f"{mean_spread(all_diffs)}; "
                  f"training time without dropout: {mean_spread(all_ratios)} of the default's.", ""]
    text = "\n".join(lines)
    REPORT.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the cells, then print the report."""
    args = grid_parser(__doc__, "lora_dropout", workers=2, datasets=",".join(DATASETS),
                       datasets_help="the datasets to run (the report has all)").parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = grid_cells(args.datasets.split(","), seeds)
    every = grid_cells(list(DATASETS), seeds)  # the report's: cells of datasets not run now included
    out = Path(args.output)
    return resume_grid(args, cells, lambda cell: _cell(out, cell),
                       lambda cell: cell_command(out, cell, args.data_dir), out, RESULTS,
                       lambda: report(out, every))


if __name__ == "__main__":
    sys.exit(main())
