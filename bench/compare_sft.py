"""Supervised fine-tuning of SmolLM2-135M on GSM8K: full, LoRA[half], BOT50, LIFT*[half] and generative
SALF[half], the held-out answer loss against training wall time (issue 20's measurement).

Every cell is one ``salf train`` run (seed, strategy) into ``OUTPUT/seed<S>/<strategy>``: the first
``--limit`` (2,000) training problems drawn with the seed, one epoch, steps of 8, chat template, rows cut
at 384 tokens (the count is reported), evaluated on the whole test split (answer loss and perplexity)
and greedy final-number exact match on its first 100 problems. Finished cells are skipped, their
``summary.json`` and ``config.json`` kept under ``bench/results/sft/cells`` (committed) and put back
first, so a fresh checkout resumes. Two workers, one thread each (on a GPU: ``--workers 1``).

    python bench/compare_sft.py [--limit 2000] [--seeds 0,1] [--workers 2] [--report-only]

On the 2-core CPU one cell takes hours (about 1.5 TFLOP per step of 8 problems); run it where a GPU is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench_utils import keep_cell, mean_spread, restore_kept, run_cells

from salf_engine.experiments.report import cost_seconds

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sft"
#: (label, salf train options) of every strategy; SALF[half] places rows by the eof of their answer's
#: deviation (docs/sft.md), every row profiled (the training forward measures no answer deviation).
STRATEGIES = {
    "full": ["--strategy", "full"],
    "lora-half": ["--strategy", "lora-half"],
    "bot50": ["--strategy", "bot50"],
    "lift-star-half": ["--strategy", "lift-star-half"],
    "salf-half": ["--strategy", "salf", "--budget", "uniform", "--infill", "df", "--profile-fraction", "1"],
}
SETTINGS = ["--model", "smollm2-135m", "--dataset", "gsm8k", "--epochs", "1", "--batch-size", "8",
            "--max-length", "384", "--eval-batch-size", "8", "--exact-match-rows", "100",
            "--max-new-tokens", "256", "--quiet"]


def _cell(out: Path, seed: int, label: str) -> Path:
    return out / f"seed{seed}" / label


def _command(out: Path, seed: int, label: str, limit: int, data_dir: str) -> list[str]:
    return [sys.executable, "-m", "salf_engine", "train", *SETTINGS, *STRATEGIES[label],
            "--data-dir", data_dir, "--limit", str(limit), "--seed", str(seed),
            "--output", str(_cell(out, seed, label))]


def run(out: Path, cells: list[tuple[int, str]], limit: int, data_dir: str, workers: int) -> int:
    """Run the unfinished cells, ``workers`` at a time; keep each finished one; 1 if any failed."""
    restore_kept(out, RESULTS)  # the committed cells
    todo = [c for c in cells if not (_cell(out, *c) / "summary.json").is_file()]

    def command(cell: tuple[int, str]) -> list[str]:
        if _cell(out, *cell).exists():
            shutil.rmtree(_cell(out, *cell))  # an interrupted cell starts again
        return _command(out, *cell, limit, data_dir)

    def done(cell: tuple[int, str]) -> None:
        keep_cell(out, RESULTS, _cell(out, *cell))
        report(out, cells)

    return 1 if run_cells(todo, command, out, workers=workers, done=done, cwd=ROOT) else 0


def report(out: Path, cells: list[tuple[int, str]]) -> str:
    """``bench/results/sft/report.md``: mean ± half-range over seeds per strategy."""
    found = {c: json.loads((_cell(out, *c) / "summary.json").read_text()) for c in cells
             if (_cell(out, *c) / "summary.json").is_file()}
    lines = ["# GSM8K supervised fine-tuning (SmolLM2-135M-Instruct)", "",
             f"{len(found)} of {len(cells)} cells finished. Answer loss and perplexity on the test split, "
             "exact match of the final number on its first 100 problems (greedy), time = training seconds "
             "relative to `full` of the same seed. `python bench/compare_sft.py` wrote this.", "",
             "| strategy | seeds | answer loss | perplexity | exact match | backward saving | time vs full |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    for label in STRATEGIES:
        mine = [(seed, s) for (seed, lab), s in found.items() if lab == label]
        if not mine:
            continue
        ratio = [cost_seconds(s) / cost_seconds(found[(seed, "full")]) for seed, s in mine
                 if (seed, "full") in found]
        fine = [s["fine_tuned"] for _, s in mine]
        lines.append(f"| {label} | {len(mine)} | {mean_spread([f['answer_loss'] for f in fine])} | "
                     f"{mean_spread([f['perplexity'] for f in fine])} | "
                     f"{mean_spread([f['exact_match'] for f in fine if f['exact_match'] is not None])} | "
                     f"{mean_spread([s['cost_saving_ratio'] for _, s in mine])} | {mean_spread(ratio)} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the grid, then print the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(ROOT / "runs" / "sft"))
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    cells = [(int(seed), label) for seed in args.seeds.split(",") for label in STRATEGIES]
    out = Path(args.output)
    status = 0 if args.report_only else run(out, cells, args.limit, args.data_dir, args.workers)
    print(report(out, cells))
    return status


if __name__ == "__main__":
    sys.exit(main())
