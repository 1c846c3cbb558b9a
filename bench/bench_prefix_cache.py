"""Training time with and without the prefix cache (issue 37's speed target), in one run.

SmolLM2-135M on ``--limit`` (480) TREC questions for ``--epochs`` (3) epochs, CLI defaults otherwise, at
``--threads`` (2, the CLI's default here): full fine-tuning, BOT50 and LoRA[half] with the cache (the
default ``--prefix-cache auto``), and BOT50 and LoRA[half] recomputing their frozen prefix
(``--prefix-cache off``). One cell at a time on an otherwise idle machine; each cell's training seconds
(``train_seconds`` of its summary, per epoch from its metrics), macro-F1 and cache counts go to
``bench/results/prefix_cache_speed.md``.

    python bench/bench_prefix_cache.py [--limit 480] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_utils import cpu_name, git_commit, markdown_table, utc_now

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "prefix_cache_speed.md"
CELLS = {
    "full": ["--strategy", "full"],
    "bot50 cached": ["--strategy", "bot50"],
    "bot50 recomputed": ["--strategy", "bot50", "--prefix-cache", "off"],
    "lora-half cached": ["--strategy", "lora-half"],
    "lora-half recomputed": ["--strategy", "lora-half", "--prefix-cache", "off"],
}


def _cell(out: Path, label: str) -> Path:
    return out / label.replace(" ", "-")


def run_cell(label: str, out: Path, args: argparse.Namespace) -> dict:
    """One ``salf train`` run; its summary."""
    cell = _cell(out, label)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-m", "salf_engine", "train", "--model", "smollm2-135m",
                    "--dataset", "trec", "--limit", str(args.limit), "--epochs", str(args.epochs),
                    "--seed", "0", "--no-zero-shot", "--quiet", "--overwrite", "--output", str(cell),
                    *CELLS[label]], check=True, env=env, cwd=ROOT)
    return json.loads((cell / "summary.json").read_text())


def epoch_seconds(cell: Path) -> list[float]:
    """Training seconds of each epoch, summed from the run's per-step metrics."""
    per: dict[int, float] = {}
    for line in (cell / "metrics.jsonl").read_text().splitlines():
        step = json.loads(line)
        if "event" not in step:  # a step's line (evaluations log an event)
            per[step["epoch"]] = per.get(step["epoch"], 0.0) + step["seconds"]
    return [per[e] for e in sorted(per)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=480)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=str(ROOT / "runs" / "prefix_cache_speed"))
    ap.add_argument("--report-only", action="store_true", help="tabulate the cells already run")
    args = ap.parse_args(argv)
    out = Path(args.output)
    summaries = {label: (json.loads((_cell(out, label) / "summary.json").read_text()) if args.report_only
                         else run_cell(label, out, args)) for label in CELLS}
    full = summaries["full"]["train_seconds"]
    full_epochs = epoch_seconds(_cell(out, "full"))
    rows = []
    for label, s in summaries.items():
        cache = s.get("prefix_cache") or {}
        epochs = epoch_seconds(_cell(out, label))
        later = sum(epochs[1:]) / sum(full_epochs[1:]) if len(epochs) > 1 else None
        rows.append([label, f"{s['train_seconds']:.0f}", f"{s['train_seconds'] / full:.2f}",
                     f"{epochs[0] / full_epochs[0]:.2f}", "" if later is None else f"{later:.2f}",
                     f"{s['fine_tuned']['free_macro_f1']:.3f}", cache.get("where", "off"),
                     cache.get("hits", 0), cache.get("misses", 0),
                     f"{cache['bytes'] / 2**20:.0f}" if cache.get("bytes") else ""])
    text = "\n".join([
        "# Training time with and without the prefix cache", "",
        f"SmolLM2-135M, {args.limit} TREC questions, {args.epochs} epochs, seed 0, CLI defaults, "
        f"{args.threads} threads, one cell at a time; {cpu_name()}; commit {git_commit()}; {utc_now()}. "
        "time = training seconds (no evaluation); ratios against full fine-tuning in the same run, per epoch "
        "from the steps' own seconds. "
        "`python bench/bench_prefix_cache.py` wrote this.", "",
        *markdown_table(["strategy", "train s", "vs full", "epoch 1 vs full", "later epochs vs full",
                         "macro-F1", "cache", "hits", "misses", "MiB"], rows, align="lrrrrrlrrr"), ""])
    RESULT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
