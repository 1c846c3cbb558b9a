"""Reports of finished runs and grids: the paper-style comparison tables (Markdown + CSV), a run's
headline numbers, and the demo's table. (The grid's plots are in `salf_engine.experiments.plots`.)"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from salf_engine.experiments.grid import ZERO_SHOT, DatasetCell, StrategyCell, cell_dir
from salf_engine.runtime.atomic import atomic_write as _atomic_write
from salf_engine.runtime.atomic import temporary_path

__all__ = ["TABLES", "cost_seconds", "collect_results", "write_tables", "print_summary", "format_hist",
           "print_demo_table"]


def cost_seconds(summary: dict[str, Any]) -> float:
    """Training plus profiling seconds of a run's summary: what the strategy cost in wall time."""
    return summary["train_seconds"] + summary.get("profile_seconds", 0.0)


def _time_ratio(summary: dict[str, Any], full: dict[str, Any] | None) -> float | None:
    return None if full is None else cost_seconds(summary) / cost_seconds(full)


#: Table name -> (title, value getter over a cell summary and the same dataset's ``full`` cell summary
#: (None when the grid has no ``full`` row), whether the zero-shot row is shown).
TABLES: dict[str, tuple[str, Callable[[dict[str, Any], dict[str, Any] | None], float | None], bool]] = {
    "f1_free": ("Macro-F1, free decoding (argmax over the whole vocabulary; the paper's headline setting)",
                lambda s, _f: s["fine_tuned"]["free_macro_f1"], True),
    "f1_restricted": ("Macro-F1, label-restricted decoding (argmax over the label tokens)",
                      lambda s, _f: s["fine_tuned"]["restricted_macro_f1"], True),
    "accuracy_free": ("Accuracy, free decoding", lambda s, _f: s["fine_tuned"]["free_accuracy"], True),
    "accuracy_restricted": ("Accuracy, label-restricted decoding",
                            lambda s, _f: s["fine_tuned"]["restricted_accuracy"], True),
    "cost_saving": (
        "Backward cost-saving ratio (mean over trained samples of frozen depth / m; paper table 5)",
        lambda s, _f: s["cost_saving_ratio"], False),
    "flops_ratio": (
        "Estimated training FLOPs relative to full fine-tuning of the same examples, profiling included",
        lambda s, _f: s.get("flops_ratio"), False),
    "time_ratio": ("Training + profiling wall time relative to the `full` cell of this grid (same machine)",
                   _time_ratio, False),
    "train_seconds": ("Training + profiling wall time in seconds (measured; noisy on a shared CPU)",
                      lambda s, _f: cost_seconds(s), False),
}


def collect_results(output: str | Path, datasets: Sequence[DatasetCell], strategies: Sequence[StrategyCell]
                    ) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, dict[str, float]]]:
    """Read the summary.json of every finished cell and the zero-shot scores of every dataset."""
    summaries: dict[tuple[str, str], dict[str, Any]] = {}
    zero_shot: dict[str, dict[str, float]] = {}
    for d in datasets:
        zs = Path(output) / "cells" / d.label / "zero_shot.json"
        if zs.is_file():
            zero_shot[d.label] = json.loads(zs.read_text())["scores"]
        for s in strategies:
            path = cell_dir(output, d, s) / "summary.json"
            if path.is_file():
                summaries[(d.label, s.label)] = json.loads(path.read_text())
    return summaries, zero_shot


# ----------------------------------------------------------------------------- tables

def _table_rows(name: str, datasets, strategies, summaries, zero_shot
                ) -> list[tuple[str, list[float | None]]]:
    _title, getter, with_zero = TABLES[name]
    rows: list[tuple[str, list[float | None]]] = []
    if with_zero and zero_shot:
        key = {"f1_free": "free_macro_f1", "f1_restricted": "restricted_macro_f1",
               "accuracy_free": "free_accuracy", "accuracy_restricted": "restricted_accuracy"}[name]
        zs_values = [zero_shot[d.label][key] if d.label in zero_shot else None for d in datasets]
        rows.append((ZERO_SHOT, zs_values))
    for s in strategies:
        values = []
        for d in datasets:
            summary = summaries.get((d.label, s.label))
            value = None if summary is None else getter(summary, summaries.get((d.label, "full")))
            values.append(None if value is None else float(value))
        rows.append((s.label, values))
    return rows


def _average(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)  # type: ignore[misc]


def _fmt(value: float | None, name: str) -> str:
    if value is None:
        return "—"
    return f"{value:.1f}" if name == "train_seconds" else f"{value:.4f}"


def write_tables(output: str | Path, datasets: Sequence[DatasetCell], strategies: Sequence[StrategyCell],
                 summaries: dict[tuple[str, str], dict[str, Any]], zero_shot: dict[str, dict[str, float]]
                 ) -> list[Path]:
    """Write every table of :data:`TABLES` as Markdown + CSV, ``tables.md`` and ``cells.csv``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    header = [d.label for d in datasets] + ["average"]
    written: list[Path] = []
    sections = []
    for name, (title, _getter, _z) in TABLES.items():
        rows = _table_rows(name, datasets, strategies, summaries, zero_shot)
        md = [f"### {title}", "", "| strategy | " + " | ".join(header) + " |",
              "|---|" + "---:|" * len(header)]
        csv_rows = [["strategy", *header]]
        for label, values in rows:
            cells = [*values, _average(values)]
            md.append(f"| {label} | " + " | ".join(_fmt(v, name) for v in cells) + " |")
            csv_rows.append([label, *("" if v is None else repr(float(v)) for v in cells)])
        text = "\n".join(md) + "\n"
        sections.append(text)
        _atomic_write(out / f"{name}.md", text)
        written.append(out / f"{name}.md")
        written.append(_write_csv(out / f"{name}.csv", csv_rows))
    done = len(summaries)
    total = len(datasets) * len(strategies)
    intro = (f"# Comparison grid: {len(datasets)} dataset(s) x {len(strategies)} strategies "
             f"({done} of {total} cells finished)\n\n"
             "Rows: strategies; columns: datasets and their average (— = cell not finished).\n")
    _atomic_write(out / "tables.md", intro + "\n" + "\n".join(sections))
    written.append(out / "tables.md")

    fields = ["dataset", "strategy", "free_macro_f1", "restricted_macro_f1", "free_accuracy",
              "restricted_accuracy", "cost_saving_ratio", "flops_ratio", "time_ratio", "frozen_fraction",
              "steps", "examples_trained", "num_eval_examples", "trainable_parameters", "lr", "train_seconds",
              "profile_seconds", "final_loss"]
    long_rows: list[list[Any]] = [fields]
    for d in datasets:
        for s in strategies:
            summary = summaries.get((d.label, s.label))
            if summary is None:
                continue
            fine = summary["fine_tuned"]
            long_rows.append([d.label, s.label, fine["free_macro_f1"], fine["restricted_macro_f1"],
                              fine["free_accuracy"], fine["restricted_accuracy"],
                              summary["cost_saving_ratio"], summary.get("flops_ratio"),
                              _time_ratio(summary, summaries.get((d.label, "full"))),
                              summary.get("frozen_fraction"), summary["steps"], summary["examples_trained"],
                              summary["num_eval_examples"], summary.get("trainable_parameters"),
                              summary.get("lr"), summary["train_seconds"], summary.get("profile_seconds"),
                              summary.get("final_loss")])
    written.append(_write_csv(out / "cells.csv", long_rows))
    return written


def _write_csv(path: Path, rows: list[list[Any]]) -> Path:
    with temporary_path(path) as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


# ----------------------------------------------------------------------------- one run, the demo

def _print_scores_table(rows: list[tuple[str, dict[str, float]]], out) -> None:
    if "answer_loss" in rows[-1][1]:  # a prompt/response task
        print(f"{'':12s} {'answer loss':>12s} {'perplexity':>11s} {'exact match':>12s}", file=out)
        for name, s in rows:
            match = "-" if s["exact_match"] is None else f"{s['exact_match']:.3f} / {s['exact_match_rows']}"
            print(f"{name:12s} {s['answer_loss']:12.4f} {s['perplexity']:11.2f} {match:>12s}", file=out)
        return
    print(f"{'':12s} {'accuracy':>10s} {'macro-F1':>10s} {'accuracy':>10s} {'macro-F1':>10s}", file=out)
    print(f"{'':12s} {'(free)':>10s} {'(free)':>10s} {'(labels)':>10s} {'(labels)':>10s}", file=out)
    for name, s in rows:
        print(f"{name:12s} {s['free_accuracy']:10.4f} {s['free_macro_f1']:10.4f} "
              f"{s['restricted_accuracy']:10.4f} {s['restricted_macro_f1']:10.4f}", file=out)


def format_hist(counts: list[int] | None) -> str:
    """A text histogram of eof-layer counts, one line per non-empty layer."""
    if not counts:
        return "(none)"
    top = max(counts) or 1
    lines = []
    for k, c in enumerate(counts):
        if c:
            lines.append(f"  layer {k:3d}: {c:5d} {'#' * max(1, round(40 * c / top))}")
    return "\n".join(lines)


def print_summary(summary: dict[str, Any], out=None) -> None:
    """The headline numbers of a finished run (to `out`, default stdout)."""
    out = out if out is not None else sys.stdout
    rows = []
    if summary.get("zero_shot"):
        rows.append(("zero-shot", summary["zero_shot"]))
    rows.append(("fine-tuned", summary["fine_tuned"]))
    left_out = ((summary.get("responses") or {}).get("eval") or {}).get("dropped", 0)
    print("", file=out)
    print(f"model {summary['model']} on {summary['dataset']}, strategy {summary['strategy']}: "
          f"{summary['steps']} steps, {summary['examples_trained']} examples trained, "
          f"{summary['num_eval_examples']} evaluated"
          + (f" ({left_out} left out: prompt too long for --max-length)" if left_out else ""),
          file=out)
    _print_scores_table(rows, out)
    eps = summary.get("examples_per_second") or 0.0
    profile = f", eof profile {summary['profile_seconds']:.1f}s" if summary.get("profile_seconds") else ""
    print(f"training time {summary['train_seconds']:.1f}s ({eps:.2f} examples/s){profile}; "
          f"total {summary['total_seconds']:.1f}s", file=out)
    losses = summary.get("loss_history") or []
    if summary.get("final_loss") is not None and losses:  # final_loss: TrainState.final_loss, last 10 steps
        print(f"training loss {summary['first_loss']:.4f} at the first step, {summary['final_loss']:.4f} "
              f"averaged over the last {min(10, len(losses))} steps (summary.json: first_loss, final_loss)",
              file=out)
    profiled = summary["profiled_examples"]
    print(f"realized backprop cost-saving ratio (mean frozen depth / m): {summary['cost_saving_ratio']:.3f}; "
          f"estimated FLOPs vs full fine-tuning"
          + (f" (profiling of {profiled} examples included)" if profiled else "")
          + f": {summary['flops_ratio']:.3f}", file=out)
    if summary.get("eof_histogram"):
        print("eof-layer histogram (profile before training):", file=out)
        print(format_hist(summary["eof_histogram"]["profile"]), file=out)
    collapsed = summary["fine_tuned"].get("single_class")
    if collapsed:
        print(f"WARNING: the fine-tuned model predicts one class, {collapsed['class']!r}, for "
              f"{collapsed['share']:.1%} of the {summary['num_eval_examples']} evaluation examples "
              f"({collapsed['decoding']} decoding): it has collapsed to a single class (docs/schedule.md)",
              file=out)


def print_demo_table(zero: dict[str, float], runs: list[tuple[str, dict[str, Any]]], out=None) -> None:
    """The demo's table: zero-shot, then each run (the last one is ``full``) with its cost against full's run
    (FLOPs too: a run of more epochs costs more than full's one)."""
    out = out if out is not None else sys.stdout
    full = runs[-1][1]
    w = max(18, *(len(label) for label, _ in runs))
    print("", file=out)
    print(f"{'':{w}s} {'accuracy':>9s} {'macro-F1':>9s} {'train+profile':>14s} {'backward':>9s} "
          f"{'FLOPs':>7s}", file=out)
    print(f"{'':{w}s} {'(free)':>9s} {'(free)':>9s} {'seconds':>14s} {'saving':>9s} {'/ full':>7s}", file=out)
    print(f"{'zero-shot':{w}s} {zero['free_accuracy']:9.4f} {zero['free_macro_f1']:9.4f}", file=out)
    for label, s in runs:
        seconds = cost_seconds(s)
        print(f"{label:{w}s} {s['fine_tuned']['free_accuracy']:9.4f} {s['fine_tuned']['free_macro_f1']:9.4f} "
              f"{seconds:8.1f} ({seconds / cost_seconds(full):.2f}x) "
              f"{s['cost_saving_ratio']:9.3f} "
              f"{s['flops_ratio'] * s['examples_trained'] / full['examples_trained']:7.2f}", file=out)
