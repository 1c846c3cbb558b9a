"""Supervised fine-tuning of SmolLM2-135M on GSM8K: full, LoRA[half], BOT50, generative SALF[half] (rows
placed by their answer's eof), SALF[half] narrowing, two cached epochs of LoRA[half], and the same uniform
budget at random depths; the held-out answer loss against training wall time.

Every cell is one ``salf train`` run (seed, strategy) into ``OUTPUT/seed<S>/<strategy>``: ``--limit``
(960) training problems drawn with the seed, one epoch, steps of 8, chat template, rows cut at
``--max-length`` (384: at 320, 80 of 960 answers lose their final number; at 384, 20), evaluated on a
fixed half of the test split (``--eval-limit`` 660 problems, the same for every cell: the whole split's
1,319 took over 1.5 hours a cell at one thread) for answer loss and perplexity, and greedy final-number
exact match on the first 100 of them. The zero-shot evaluation is the same for every cell, so only
the first cell runs it. Seed 0 of every strategy runs before seed 1; the random-depth control and then
the cached two-epoch run come after both seeds of the other five. Finished cells are skipped, their
``summary.json`` and ``config.json`` kept under ``bench/results/sft/cells`` (committed) and put back
first, so a fresh checkout resumes. One thread per worker (on a GPU: ``--workers 1``).

    python bench/compare_sft.py [--limit 960] [--seeds 0,1] [--workers 1] [--start-within HOURS]
                                [--report-only] [--quiet-timing]

Cells that share the 2-core CPU give noisy times. ``--quiet-timing`` times the five strategies alone, one
after the other at one thread, on the first ``QUIET_LIMIT`` problems of seed 0 (the same batches for each,
their evaluation cut to 8 problems and not timed); the report gives those ratios beside the grid's.

On the 2-core CPU a cell takes 1.2-2.3 hours at one thread (training, then 20-25 minutes of evaluation;
``--start-within`` keeps a session from starting one it cannot finish); the 2,000-problem grid
(``--limit 2000``) needs a GPU (docs/gpu.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_utils import grid_parser, mean_spread, restore_kept, run_grid, scatter_by_dataset

from salf_engine.experiments.report import cost_seconds

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sft"
#: (label, salf train options) of every strategy; SALF[half] places rows by the eof of their answer's
#: deviation (docs/sft.md), every row profiled (the training forward measures no answer deviation).
#: ``salf-half-random`` is the control: the same uniform budget, depths drawn at random (loss rank has no
#: loss to rank in the first epoch), so it answers whether the answer's eof orders problems usefully.
_HALF = ["--strategy", "salf", "--budget", "uniform", "--infill", "df"]
#: the LoRA cells keep the dropout the grid's first LoRA cell ran with (the default then; 0 now)
_LORA = ["--strategy", "lora-half", "--lora-dropout", "0.05"]
STRATEGIES = {
    "full": ["--strategy", "full"],
    "lora-half": _LORA,
    "bot50": ["--strategy", "bot50"],
    "salf-half": [*_HALF, "--depth-schedule", "per-row", "--profile-fraction", "1"],
    "salf-half-narrowing": [*_HALF, "--depth-schedule", "narrowing"],
    "salf-half-random": [*_HALF, "--depth-schedule", "per-row", "--depth-assignment", "loss-rank"],
    # two epochs of LoRA[half] with the prefix cache (on by default where exact): its second epoch
    # skips the frozen bottom half; LoRA[half] beat BOT50 in the quick check (docs/sft.md)
    "lora-half-2ep-cached": [*_LORA, "--epochs", "2"],
}
#: run after every seed of the five strategies above them: the random-depth control, then the two-epoch
#: cached run (the costliest cell), so a stopped grid leaves the five strategies' seeds whole
LATER = ("salf-half-random", "lora-half-2ep-cached")
#: problems (steps of 8) each strategy trains in the quiet timing; the rest of its settings are the grid's
QUIET_LIMIT = 64
QUIET = [label for label in STRATEGIES if label not in LATER]
SETTINGS = ["--model", "smollm2-135m", "--dataset", "gsm8k", "--epochs", "1", "--batch-size", "8",
            "--eval-batch-size", "8", "--exact-match-rows", "100", "--max-new-tokens", "256", "--quiet",
            "--eval-limit", "660"]


def _cell(out: Path, seed: int, label: str) -> Path:
    return out / f"seed{seed}" / label


def _command(out: Path, seed: int, label: str, limit: int, data_dir: str, max_length: int,
             zero_shot: bool) -> list[str]:
    return [sys.executable, "-m", "salf_engine", "train", *SETTINGS, *STRATEGIES[label],
            "--data-dir", data_dir, "--limit", str(limit), "--seed", str(seed),
            "--max-length", str(max_length),
            *([] if zero_shot else ["--no-zero-shot"]), "--output", str(_cell(out, seed, label))]


def grid_cells(seeds: list[int]) -> list[tuple[int, str]]:
    """Seed 0 of every strategy before seed 1; the ``LATER`` ones after every seed of the others."""
    main = [(seed, label) for seed in seeds for label in STRATEGIES if label not in LATER]
    return main + [(seed, label) for label in LATER for seed in seeds]


def run(out: Path, cells: list[tuple[int, str]], limit: int, data_dir: str, workers: int,
        max_length: int, start_within: float | None = None) -> int:
    """Run the unfinished cells, ``workers`` at a time; keep each finished one; 1 if any failed."""
    def command(cell: tuple[int, str]) -> list[str]:
        return _command(out, *cell, limit, data_dir, max_length, zero_shot=cell == cells[0])

    failed = run_grid(cells, lambda cell: _cell(out, *cell), command, out, RESULTS, workers=workers,
                      after=lambda cell: report(out, cells), start_within=start_within)
    return 1 if failed else 0


def quiet_command(quiet: Path, label: str, data_dir: str, max_length: int) -> list[str]:
    """One strategy's quiet-timing run: the grid's command on ``QUIET_LIMIT`` problems, 8 evaluated."""
    return [*_command(quiet, 0, label, QUIET_LIMIT, data_dir, max_length, zero_shot=False),
            "--eval-limit", "8", "--exact-match-rows", "0"]


def run_quiet(out: Path, data_dir: str, max_length: int) -> int:
    """Time the ``QUIET`` strategies alone, one at a time, on ``QUIET_LIMIT`` problems (``out/quiet``)."""
    quiet = out / "quiet"
    failed = run_grid([(0, label) for label in QUIET], lambda cell: _cell(quiet, *cell),
                      lambda cell: quiet_command(quiet, cell[1], data_dir, max_length), quiet,
                      RESULTS / "quiet", workers=1, discard_models=True)
    return 1 if failed else 0


def _quiet_lines(out: Path) -> list[str]:
    """The quiet timing's table (empty until its ``full`` run is there)."""
    quiet = {label: json.loads((_cell(out / "quiet", 0, label) / "summary.json").read_text())
             for label in QUIET if (_cell(out / "quiet", 0, label) / "summary.json").is_file()}
    if "full" not in quiet:
        return []
    full = cost_seconds(quiet["full"])
    lines = ["", f"## Quiet timing: each strategy alone, one thread, {QUIET_LIMIT} problems of seed 0", "",
             "| strategy | training + profiling s | of which profiling | backward saving | time vs full "
             "| FLOPs vs full |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {cost_seconds(s):.0f} | {s.get('profile_seconds', 0.0):.0f} | "
              f"{s['cost_saving_ratio']:.3f} | {cost_seconds(s) / full:.3f} | {s['flops_ratio']:.3f} |"
              for label, s in quiet.items()]
    return lines


def report(out: Path, cells: list[tuple[int, str]]) -> str:
    """``bench/results/sft/report.md``: mean ± half-range over seeds per strategy."""
    found = {c: json.loads((_cell(out, *c) / "summary.json").read_text()) for c in cells
             if (_cell(out, *c) / "summary.json").is_file()}
    lines = ["# GSM8K supervised fine-tuning (SmolLM2-135M-Instruct)", "",
             f"{len(found)} of {len(cells)} cells finished. Answer loss and perplexity on a fixed "
             "660-problem half of the test split, exact match of the final number on its first 100 problems "
             "(greedy), time = training seconds relative to `full` of the same seed. "
             "`python bench/compare_sft.py` wrote this.", "",
             "| strategy | seeds | answer loss | perplexity | exact match | backward saving | FLOPs vs full "
             "| time vs full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    zero = [s["zero_shot"] for s in found.values() if s.get("zero_shot")]
    if zero:
        z = zero[0]
        lines.append(f"| zero-shot | | {z['answer_loss']:.4f} | {z['perplexity']:.3f} | "
                     f"{z['exact_match'] if z['exact_match'] is not None else ''} | | | |")

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
                     f"{mean_spread([s['cost_saving_ratio'] for _, s in mine])} | "
                     f"{mean_spread([s['flops_ratio'] for _, s in mine])} | {mean_spread(ratio)} |")
    text = "\n".join(lines + _quiet_lines(out)) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report.md").write_text(text)
    points: dict[str, list[tuple[float, float]]] = {}
    for (_, label), s in found.items():
        points.setdefault(label, []).append((cost_seconds(s), s["fine_tuned"]["answer_loss"]))
    scatter_by_dataset({"GSM8K, SmolLM2-135M-Instruct": points}, RESULTS / "loss_vs_time.png",
                       "training seconds (cells beside one another on 2 cores)",
                       ylabel="answer loss (660 held-out problems)")
    return text


def main(argv: list[str] | None = None) -> int:
    """Run (or resume) the grid, then print the report."""
    ap = grid_parser(__doc__, "sft", workers=1)
    ap.add_argument("--limit", type=int, default=960)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--quiet-timing", action="store_true", help="time each strategy alone (nothing else)")
    args = ap.parse_args(argv)
    cells = grid_cells([int(seed) for seed in args.seeds.split(",")])
    out = Path(args.output)
    restore_kept(out, RESULTS)  # the committed cells
    restore_kept(out / "quiet", RESULTS / "quiet")
    if args.quiet_timing:
        status = run_quiet(out, args.data_dir, args.max_length)
    elif args.report_only:
        status = 0
    else:
        status = run(out, cells, args.limit, args.data_dir, args.workers, args.max_length,
                     args.start_within)
    print(report(out, cells))
    return status


if __name__ == "__main__":
    sys.exit(main())
