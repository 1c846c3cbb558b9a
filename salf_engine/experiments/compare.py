"""`salf compare`'s runner: a grid of fine-tuning runs (datasets x strategies), resumable.

Every cell of the grid (`salf_engine.experiments.grid`) is one :func:`salf_engine.training.recipe.train` run
into
``OUTPUT/cells/<dataset>/<strategy>/``. A cell is finished iff its ``summary.json``
exists (the trainer writes it last); a rerun skips finished cells and redoes unfinished
ones from scratch, so an interrupted grid resumes where it stopped. The model is loaded
once; every cell starts from a deep copy of the pristine pretrained weights (``train``
mutates the model it is given; with 4-bit loading the model is reloaded per cell).
The zero-shot scores are measured once per dataset (``OUTPUT/cells/<dataset>/zero_shot.json``).

Outputs in ``OUTPUT/`` (rows = strategies, columns = datasets + average, the shape of the
paper's tables 3-5; written by `salf_engine.experiments.report` and `salf_engine.experiments.plots`):
``f1_free``,
``f1_restricted``, ``accuracy_free``, ``accuracy_restricted``, ``cost_saving`` (realized backward
cost-saving ratio: mean frozen depth / m over trained samples), ``train_seconds`` as ``.md`` and
``.csv``; ``tables.md`` (all of them), ``cells.csv`` (one row per cell, every number),
``f1_vs_cost.png`` and ``f1_bars.png``.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from salf_engine.data import load_task
from salf_engine.errors import ConfigError
from salf_engine.evaluation.classification import evaluate
from salf_engine.experiments.grid import (
    CompareSettings,
    DatasetCell,
    StrategyCell,
    cell_dir,
    is_finished,
    parse_strategy,
)
from salf_engine.experiments.plots import write_plots
from salf_engine.experiments.report import collect_results, cost_seconds, write_tables
from salf_engine.models.loading import load_model
from salf_engine.runtime.atomic import atomic_write as _atomic_write
from salf_engine.runtime.device import resolve_device
from salf_engine.schedule.strategies import strategy_from_config
from salf_engine.training import recipe  # called as recipe.train, so a test's monkeypatch reaches it
from salf_engine.training.checkpoint import config_differences, list_checkpoints
from salf_engine.training.inputs import Prepared, check_resume, encode_task, held_out_count

__all__ = ["GridResult", "run_compare", "CompareSettings", "parse_strategy", "cost_seconds"]

@dataclass
class GridResult:
    """What a compare run did and found."""

    datasets: list[DatasetCell]
    strategies: list[StrategyCell]
    summaries: dict[tuple[str, str], dict[str, Any]]      # (dataset label, strategy label) -> summary.json
    zero_shot: dict[str, dict[str, float]]                 # dataset label -> zero-shot scores
    ran: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _config_mismatch(path: Path, expected: dict[str, Any]) -> list[str]:
    """How a finished cell's config.json differs from the grid's (fields a resume may change aside)."""
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ["config.json missing or unreadable"]
    return config_differences(saved, expected)


def _zero_shot_settings(cfg) -> dict[str, Any]:
    keys = ("model", "dataset", "data_dir", "eval_split", "eval_limit", "max_length", "seed", "load_in_4bit",
            "dtype", "text_column", "text_pair_column", "label_column")
    extra = {"eval_fraction": cfg.eval_fraction} if cfg.eval_fraction is not None else {}
    return {**{k: getattr(cfg, k) for k in keys}, **extra}


def _check_eval_splits(tasks, configs) -> None:
    """Every cell's evaluation split exists (or can be held out) before the model loads."""
    for (label, _strategy), cfg in configs.items():
        held_out_count(tasks[label], cfg)


# ----------------------------------------------------------------------------- the grid

def run_compare(settings: CompareSettings, *, progress: bool = True,
                log: Callable[[str], None] | None = print) -> GridResult:
    """Run (or resume) the grid, then write the tables and plots; returns what happened.

    Raises ConfigError / DataError before any cell runs for bad names, settings or a finished cell
    whose saved config differs from this grid's (pass ``overwrite`` to redo it). A cell whose training
    raises stops the grid (after writing the tables of the finished cells) unless ``keep_going``.
    """
    say = log or (lambda _msg: None)
    datasets, strategies = settings.resolve()
    configs = {(d.label, s.label): settings.cell_config(d, s) for d in datasets for s in strategies}

    tasks = {d.label: load_task(d.source, settings.data_dir) for d in datasets}
    _check_eval_splits(tasks, configs)
    out = Path(settings.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")

    pending: list[tuple[DatasetCell, StrategyCell]] = []
    skipped: list[tuple[str, str]] = []
    for d in datasets:
        for s in strategies:
            key = (d.label, s.label)
            path = cell_dir(out, d, s)
            if is_finished(path) and not settings.overwrite:
                diffs = _config_mismatch(path, configs[key].to_dict())
                if diffs:
                    raise ConfigError(
                        f"cell {d.label}/{s.label} in {path} was run with other settings "
                        f"({'; '.join(diffs)}); use another --output or pass --overwrite to redo it"
                    )
                skipped.append(key)
            else:
                pending.append((d, s))
    zs_pending = []
    if settings.zero_shot:
        for d in datasets:
            zs_path = out / "cells" / d.label / "zero_shot.json"
            first = configs[(d.label, strategies[0].label)]
            if zs_path.is_file() and not settings.overwrite:
                saved = json.loads(zs_path.read_text()).get("settings")
                if saved != json.loads(json.dumps(_zero_shot_settings(first))):
                    raise ConfigError(f"{zs_path} was measured with other settings; use another --output or "
                                      "pass --overwrite")
            else:
                zs_pending.append(d)

    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "compare.json", json.dumps({
        "model": settings.model, "data_dir": settings.data_dir,
        "datasets": [{"label": d.label, "source": d.source} for d in datasets],
        "strategies": [s.label for s in strategies], "train": settings.train, "zero_shot": settings.zero_shot,
    }, indent=2) + "\n")
    total = len(datasets) * len(strategies)
    say(f"compare: {len(datasets)} dataset(s) x {len(strategies)} strategies = {total} cells; "
        f"{len(skipped)} finished, {len(pending)} to run")

    result = GridResult(datasets, strategies, {}, {}, skipped=skipped)
    try:
        if pending or zs_pending:
            _run_pending(settings, pending, zs_pending, configs, tasks, result, progress=progress, say=say)
    finally:
        # the tables of whatever finished, also when a cell failed or the run was interrupted
        try:
            _finish(out, result)
        except Exception as exc:  # noqa: BLE001 - never mask the original error
            say(f"could not write the tables: {type(exc).__name__}: {exc}")
    return result


def _finish(out: Path, result: GridResult) -> None:
    summaries, zero_shot = collect_results(out, result.datasets, result.strategies)
    result.summaries, result.zero_shot = summaries, zero_shot
    result.files = write_tables(out, result.datasets, result.strategies, summaries, zero_shot)
    result.files += write_plots(out, result.datasets, result.strategies, summaries, zero_shot)


def _run_pending(settings: CompareSettings, pending, zs_pending, configs, tasks, result: GridResult, *,
                 progress: bool, say: Callable[[str], None]) -> None:
    any_cfg = next(iter(configs.values()))
    device = resolve_device(any_cfg.device)

    t0 = time.perf_counter()
    pristine, tokenizer = load_model(settings.model, dtype=torch.float32, load_in_4bit=any_cfg.load_in_4bit,
                                     device=str(device))
    load_seconds = time.perf_counter() - t0
    say(f"loaded {settings.model} in {load_seconds:.1f}s")
    big_model = sum(q.numel() for q in pristine.parameters()) > 10_000_000

    def fresh_model():
        if any_cfg.load_in_4bit:  # quantized weights do not deep-copy reliably: reload
            return load_model(settings.model, dtype=torch.float32, load_in_4bit=True, device=str(device))[0]
        return copy.deepcopy(pristine)

    by_dataset: dict[str, list[StrategyCell]] = {}
    for d, s in pending:
        by_dataset.setdefault(d.label, []).append(s)
    n_done = 0
    n_total = len(pending)
    for d in result.datasets:
        cells = by_dataset.get(d.label, [])
        if not cells and d not in zs_pending:
            continue
        task = tasks[d.label]
        first = configs[(d.label, result.strategies[0].label)]
        verbalizer, train_split, eval_split = encode_task(task, tokenizer, first)
        if d in zs_pending:
            _zero_shot_cell(settings, d, task, pristine, tokenizer, first, verbalizer, eval_split,
                            progress=progress, say=say)
        for s in cells:
            n_done += 1
            cfg = configs[(d.label, s.label)]
            say(f"[{n_done}/{n_total}] {d.label} / {s.label} -> {cfg.output}")
            t_copy = time.perf_counter()
            model = fresh_model()
            strategy = strategy_from_config(cfg)
            prepared = Prepared(
                config=cfg, strategy=strategy, device=device, task=task, model=model, tokenizer=tokenizer,
                verbalizer=verbalizer, train_split=train_split, eval_split=eval_split,
                load_seconds=time.perf_counter() - t_copy, out_dir=Path(cfg.output))
            resume = _resumable(cfg)  # an unfinished cell with a checkpoint goes on from it
            if resume:
                say(f"  resuming the unfinished cell {d.label} / {s.label} from its checkpoint")
            try:
                summary = recipe.train(cfg, progress=progress, log=say, prepared=prepared,
                                             resume=resume)
            except Exception as exc:
                if not settings.keep_going:
                    raise
                message = f"{type(exc).__name__}: {exc}"
                say(f"cell {d.label}/{s.label} failed: {message}")
                result.failed.append((d.label, s.label, message))
            else:
                result.ran.append((d.label, s.label))
                if settings.discard_models:  # a finished cell is never resumed: its checkpoints go too
                    for kept in ("model", "checkpoints"):
                        shutil.rmtree(Path(cfg.output) / kept, ignore_errors=True)
                fine = summary["fine_tuned"]
                say(f"  {d.label} / {s.label}: macro-F1 {fine['free_macro_f1']:.4f} (free) / "
                    f"{fine['restricted_macro_f1']:.4f} (labels), "
                    f"cost-saving {summary['cost_saving_ratio']:.3f}, train {summary['train_seconds']:.1f}s")
            finally:
                del model, prepared
                if big_model:  # free the last copy's cycles before the next deep copy
                    gc.collect()


def _zero_shot_cell(settings: CompareSettings, d, task, model, tokenizer, first, verbalizer, eval_split, *,
                    progress: bool, say: Callable[[str], None]) -> None:
    """The dataset's zero-shot scores, once per grid, into ``cells/<dataset>/zero_shot.json``."""
    say(f"[{d.label}] zero-shot evaluation on {len(eval_split)} examples")
    report = evaluate(model, tokenizer, eval_split, verbalizer, batch_size=first.eval_batch_size,
                      dtype=first.dtype, classes=list(task.classes), progress=progress,
                      desc=f"zero-shot {d.label}")
    zs_path = Path(settings.output) / "cells" / d.label / "zero_shot.json"
    zs_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"settings": _zero_shot_settings(first), "scores": report.summary(),
              "num_eval_examples": len(eval_split), "seconds": round(report.seconds, 3)}
    _atomic_write(zs_path, json.dumps(record, indent=2) + "\n")


def _resumable(cfg) -> bool:
    """Whether an unfinished cell holds a checkpoint of the same config (else it starts from scratch)."""
    if not list_checkpoints(cfg.output):
        return False
    try:
        check_resume(cfg)
    except ConfigError:
        return False
    return True
