"""`salf compare`: a grid of fine-tuning runs (datasets x strategies) and the paper's comparison tables.

Every cell of the grid is one :func:`salf_engine.train.train` run into
``OUTPUT/cells/<dataset>/<strategy>/``. A cell is finished iff its ``summary.json``
exists (the trainer writes it last); a rerun skips finished cells and redoes unfinished
ones from scratch, so an interrupted grid resumes where it stopped. The model is loaded
once; every cell starts from a deep copy of the pristine pretrained weights (``train``
mutates the model it is given; with 4-bit loading the model is reloaded per cell).
The zero-shot scores are measured once per dataset (``OUTPUT/cells/<dataset>/zero_shot.json``).

Strategy cells are written ``NAME[:OPTION]...`` (shell-safe, no quoting needed), NAME one of
:data:`salf_engine.strategies.STRATEGIES`, OPTIONs among: a budget plan (``uniform`` -- alias
``half`` --, ``arith``, ``geom``, ``none``; salf only), an infilling order (``bf``, ``df``; with a
budget), a freeze fraction in (0, 1) (``bot``/``top``/``int``/``adt-*``), ``lora`` (LoRA adapters
under that strategy). Examples: ``salf`` (Algorithm 3), ``salf:uniform:df`` (SALF[half]),
``salf:geom:bf``, ``bot:0.3``, ``adt-high:0.25``, ``bot50:lora``.
Datasets are preset names or local files, optionally labelled ``LABEL=SOURCE``.

Outputs in ``OUTPUT/`` (rows = strategies, columns = datasets + average, the shape of the
paper's tables 3-5): ``f1_free``, ``f1_restricted``, ``accuracy_free``, ``accuracy_restricted``,
``cost_saving`` (realized backward cost-saving ratio: mean frozen depth / m over trained
samples), ``train_seconds`` as ``.md`` and ``.csv``; ``tables.md`` (all of them), ``cells.csv``
(one row per cell, every number), ``f1_vs_cost.png`` and ``f1_bars.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import importlib
import json
import math
import os
import re
import shutil
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "StrategyCell",
    "DatasetCell",
    "CompareSettings",
    "GridResult",
    "CELL_SYNTAX",
    "parse_strategy",
    "parse_dataset",
    "parse_list",
    "cell_dir",
    "is_finished",
    "run_compare",
    "collect_results",
    "write_tables",
    "write_plots",
    "TABLES",
    "cost_seconds",
    "add_parser",
]

CELL_SYNTAX = (
    "strategy cells: NAME[:OPTION]... with NAME one of {names}; OPTIONs: a budget plan "
    "(uniform = half, arith, geom, none; salf only), an infilling order (bf, df; with a budget), a freeze "
    "fraction in (0, 1) (bot/top/int/adt), 'lora' (LoRA adapters), 'paper' (Algorithm 4's schedule), "
    "'eof-match' or 'class-rank' (budgeted SALF's depth assignment), cutsN (N cuts per optimizer step). "
    "Examples: salf (Algorithm 3), salf:uniform:df (SALF[half]), salf:arith:df:paper, salf:geom:bf, "
    "bot50, bot:0.3, adt-high:0.25, bot50:lora, lift-star-half:cuts1"
)

_BUDGET_ALIASES = {"uniform": "uniform", "half": "uniform", "arith": "arith", "geom": "geom", "none": "none"}
_INFILLS = ("bf", "df")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ZERO_SHOT = "zero-shot"

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


# ----------------------------------------------------------------------------- cell specs

@dataclass(frozen=True)
class StrategyCell:
    """One strategy row of the grid: a strategy name plus its options."""

    strategy: str
    budget: str | None = None
    infill: str | None = None
    freeze_fraction: float | None = None
    lora: bool = False
    schedule: str | None = None       # "paper" (Algorithm 4 as written); None = the config's
    assignment: str | None = None     # "eof-match" / "class-rank"; None = the config's
    cuts_per_step: int | None = None  # None = the config's

    @property
    def label(self) -> str:
        """Canonical spelling, e.g. ``salf:uniform:df``; the row name in the tables."""
        parts = [self.strategy]
        if self.budget is not None:
            parts += [self.budget, self.infill or "bf"]
        if self.freeze_fraction is not None:
            parts.append(f"{self.freeze_fraction:g}")
        parts += [x for x in (self.schedule, self.assignment) if x is not None]
        if self.cuts_per_step is not None:
            parts.append(f"cuts{self.cuts_per_step}")
        if self.lora:
            parts.append("lora")
        return ":".join(parts)

    @property
    def dirname(self) -> str:
        """Directory name of the cell (``:`` replaced by ``_``)."""
        return self.label.replace(":", "_")

    def config_fields(self) -> dict[str, Any]:
        """The TrainConfig fields this cell fixes."""
        fields = {"strategy": self.strategy, "budget": self.budget, "infill": self.infill,
                  "freeze_fraction": self.freeze_fraction, "lora": self.lora}
        for key, value in (("depth_schedule", self.schedule), ("depth_assignment", self.assignment),
                           ("cuts_per_step", self.cuts_per_step)):
            if value is not None:
                fields[key] = value
        return fields


@dataclass(frozen=True)
class DatasetCell:
    """One dataset column: a table label and what `load_task` reads (preset name or path)."""

    label: str
    source: str


def parse_list(text: str | Sequence[str], what: str) -> list[str]:
    """Split a comma-separated list (or join several); ConfigError when it is empty."""
    items = [text] if isinstance(text, str) else list(text)
    out = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not out:
        raise ConfigError(f"the list of {what} is empty")
    return out


def parse_strategy(text: str) -> StrategyCell:
    """Parse ``NAME[:OPTION]...`` (see :data:`CELL_SYNTAX`); ConfigError naming the valid choices."""
    from .strategies import STRATEGIES, make_strategy

    name, *options = [p.strip() for p in text.strip().split(":")]
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r} in cell {text!r}; valid strategies: "
                          f"{', '.join(STRATEGIES)} ({CELL_SYNTAX.format(names='the above')})")
    budget: str | None = None
    infill: str | None = None
    fraction: float | None = None
    lora = False
    schedule: str | None = None
    assignment: str | None = None
    cuts: int | None = None

    def once(kind: str, current: object) -> None:
        if current is not None and current is not False:
            raise ConfigError(f"cell {text!r} gives more than one {kind}")

    for opt in options:
        key = opt.lower()
        if key in _BUDGET_ALIASES:
            once("budget plan", budget)
            budget = _BUDGET_ALIASES[key]
        elif key in _INFILLS:
            once("infilling order", infill)
            infill = key
        elif key == "lora":
            once("'lora'", lora)
            lora = True
        elif key == "paper":
            once("schedule", schedule)
            schedule = key
        elif key in ("eof-match", "class-rank"):
            once("depth assignment", assignment)
            assignment = key
        elif re.fullmatch(r"cuts[1-9][0-9]*", key):
            once("cuts per step", cuts)
            cuts = int(key[4:])
        else:
            try:
                value = float(key)
            except ValueError:
                raise ConfigError(
                    f"unknown option {opt!r} in strategy cell {text!r}; options: budget plans "
                    f"{', '.join(_BUDGET_ALIASES)}, infilling orders {', '.join(_INFILLS)}, "
                    "a freeze fraction in (0, 1), lora, paper, eof-match, class-rank, cutsN"
                ) from None
            once("freeze fraction", fraction)
            if not (math.isfinite(value) and 0 < value < 1):
                raise ConfigError(f"freeze fraction in cell {text!r} must lie strictly between 0 and 1")
            fraction = value
    if budget == "none":
        if infill is not None:
            raise ConfigError(f"cell {text!r}: an infilling order needs a budget plan (uniform, arith, geom)")
        budget = None
    if infill is not None and budget is None:
        raise ConfigError(f"cell {text!r}: an infilling order needs a budget plan (uniform, arith, geom)")
    if budget is not None and infill is None:
        infill = "bf"
    # make_strategy checks the combination (a budget on a non-salf strategy, a fraction that clashes ...)
    make_strategy(name, budget=budget, infill=infill, freeze_fraction=fraction, lora=lora,
                  schedule=schedule or "mixed", assignment=assignment or "class-rank",
                  cuts_per_step=cuts or 1)
    return StrategyCell(name, budget, infill, fraction, lora, schedule, assignment, cuts)


def parse_dataset(text: str, data_dir: str | None = None) -> DatasetCell:
    """``SOURCE`` or ``LABEL=SOURCE``; SOURCE a preset name or an existing file/directory."""
    from .data.presets import PRESETS

    label, sep, source = text.partition("=")
    if not sep:
        label, source = "", text
    label, source = label.strip(), source.strip()
    if not source:
        raise ConfigError(f"dataset {text!r} names no source")
    if source.lower() in PRESETS:
        source = source.lower()
        label = label or source
    else:
        candidates = [Path(source)]
        if data_dir is not None and not Path(source).is_absolute():
            candidates.append(Path(data_dir) / source)
        if not any(c.exists() for c in candidates):
            raise ConfigError(
                f"unknown dataset {source!r}: not a preset (valid presets: {', '.join(PRESETS)}) and no file "
                f"or directory {' or '.join(str(c) for c in candidates)}"
            )
        label = label or Path(source).stem
    if not _LABEL_RE.match(label):
        raise ConfigError(
            f"dataset label {label!r} must be letters, digits, '.', '_' or '-' (use LABEL=SOURCE)")
    return DatasetCell(label, source)


def cell_dir(output: str | Path, dataset: DatasetCell | str, strategy: StrategyCell | str) -> Path:
    """``OUTPUT/cells/<dataset label>/<strategy dirname>``."""
    ds = dataset.label if isinstance(dataset, DatasetCell) else dataset
    st = strategy.dirname if isinstance(strategy, StrategyCell) else parse_strategy(strategy).dirname
    return Path(output) / "cells" / ds / st


def is_finished(path: str | Path) -> bool:
    """A cell is finished iff its summary.json exists."""
    return (Path(path) / "summary.json").is_file()


# ----------------------------------------------------------------------------- settings

@dataclass
class CompareSettings:
    """A grid: the model, datasets x strategies, and the TrainConfig fields shared by every cell."""

    model: str
    datasets: list[str]
    strategies: list[str]
    output: str
    data_dir: str | None = None
    train: dict[str, Any] = field(default_factory=dict)   # extra TrainConfig fields (limit, max_steps, lr ..)
    zero_shot: bool = True
    overwrite: bool = False
    keep_going: bool = False
    discard_models: bool = False   # delete each finished cell's model/ (the tables need only summary.json)

    def resolve(self) -> tuple[list[DatasetCell], list[StrategyCell]]:
        """Parse and check every name; ConfigError before anything runs."""
        datasets = [parse_dataset(d, self.data_dir) for d in parse_list(self.datasets, "datasets")]
        strategies = [parse_strategy(s) for s in parse_list(self.strategies, "strategies")]
        named = (("dataset", [d.label for d in datasets]), ("strategy", [s.label for s in strategies]))
        for what, labels in named:
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ConfigError(f"{what} listed twice: {', '.join(dup)}")
        if ZERO_SHOT in {d.label for d in datasets}:
            raise ConfigError(f"{ZERO_SHOT!r} is reserved; choose another dataset label")
        return datasets, strategies

    def cell_config(self, dataset: DatasetCell, strategy: StrategyCell):
        """The validated TrainConfig of one cell."""
        from .config import TrainConfig

        reserved = {"model", "dataset", "data_dir", "output", "overwrite", "zero_shot_eval",
                    "strategy", "budget", "infill", "freeze_fraction"}
        clash = sorted(reserved & set(self.train))
        if clash:
            raise ConfigError(
                f"compare sets {', '.join(clash)} per cell; remove them from the shared settings")
        fields = dict(self.train)
        fields.update(strategy.config_fields())
        fields["lora"] = bool(strategy.lora or self.train.get("lora", False))
        return TrainConfig(model=self.model, dataset=dataset.source, data_dir=self.data_dir,
                           output=str(cell_dir(self.output, dataset, strategy)), overwrite=True,
                           zero_shot_eval=False, **fields).validate()


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


# where a cell ran and how it saved checkpoints do not change its result
_IGNORED_FIELDS = ("output", "overwrite", "save_every", "save_total_limit", "on_nonfinite")


def _config_mismatch(path: Path, expected: dict[str, Any]) -> list[str]:
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ["config.json missing or unreadable"]
    diffs = []
    for key in sorted(set(saved) | set(expected)):
        if key in _IGNORED_FIELDS:
            continue
        if saved.get(key) != expected.get(key):
            diffs.append(f"{key}: {saved.get(key)!r} != {expected.get(key)!r}")
    return diffs


def _zero_shot_settings(cfg) -> dict[str, Any]:
    keys = ("model", "dataset", "data_dir", "eval_split", "eval_limit", "max_length", "seed", "load_in_4bit",
            "dtype", "text_column", "text_pair_column", "label_column")
    return {k: getattr(cfg, k) for k in keys}


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

    from .data import load_task

    tasks = {d.label: load_task(d.source, settings.data_dir) for d in datasets}
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
    import torch

    from .evaluate import evaluate
    from .models.loading import load_model
    from .train import encode_task

    train_module = importlib.import_module("salf_engine.train")
    any_cfg = next(iter(configs.values()))
    device = train_module.resolve_device(any_cfg.device)

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
            say(f"[{d.label}] zero-shot evaluation on {len(eval_split)} examples")
            report = evaluate(pristine, tokenizer, eval_split, verbalizer, batch_size=first.eval_batch_size,
                              dtype=first.dtype, classes=list(task.classes), progress=progress,
                              desc=f"zero-shot {d.label}")
            zs_path = Path(settings.output) / "cells" / d.label / "zero_shot.json"
            zs_path.parent.mkdir(parents=True, exist_ok=True)
            record = {"settings": _zero_shot_settings(first), "scores": report.summary(),
                      "num_eval_examples": len(eval_split), "seconds": round(report.seconds, 3)}
            _atomic_write(zs_path, json.dumps(record, indent=2) + "\n")
        for s in cells:
            n_done += 1
            cfg = configs[(d.label, s.label)]
            say(f"[{n_done}/{n_total}] {d.label} / {s.label} -> {cfg.output}")
            t_copy = time.perf_counter()
            model = fresh_model()
            strategy = train_module.strategy_from_config(cfg)
            prepared = train_module.Prepared(
                config=cfg, strategy=strategy, device=device, task=task, model=model, tokenizer=tokenizer,
                verbalizer=verbalizer, train_split=train_split, eval_split=eval_split,
                load_seconds=time.perf_counter() - t_copy, out_dir=Path(cfg.output))
            resume = _resumable(cfg)  # an unfinished cell with a checkpoint goes on from it
            if resume:
                say(f"  resuming the unfinished cell {d.label} / {s.label} from its checkpoint")
            try:
                summary = train_module.train(cfg, progress=progress, log=say, prepared=prepared,
                                             resume=resume)
            except Exception as exc:
                if not settings.keep_going:
                    raise
                message = f"{type(exc).__name__}: {exc}"
                say(f"cell {d.label}/{s.label} failed: {message}")
                result.failed.append((d.label, s.label, message))
            else:
                result.ran.append((d.label, s.label))
                if settings.discard_models:
                    shutil.rmtree(Path(cfg.output) / "model", ignore_errors=True)
                fine = summary["fine_tuned"]
                say(f"  {d.label} / {s.label}: macro-F1 {fine['free_macro_f1']:.4f} (free) / "
                    f"{fine['restricted_macro_f1']:.4f} (labels), "
                    f"cost-saving {summary['cost_saving_ratio']:.3f}, train {summary['train_seconds']:.1f}s")
            finally:
                del model, prepared
                if big_model:  # free the last copy's cycles before the next deep copy
                    gc.collect()


def _resumable(cfg) -> bool:
    """Whether an unfinished cell holds a checkpoint of the same config (else it starts from scratch)."""
    from .checkpoint import list_checkpoints
    from .train import check_resume

    if not list_checkpoints(cfg.output):
        return False
    try:
        check_resume(cfg)
    except ConfigError:
        return False
    return True


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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    tmp.replace(path)
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------- plots

def _family(label: str) -> str:
    name = label.split(":", 1)[0]
    for prefix in ("lora", "lift", "salf", "bot", "top", "int", "adt", "full"):
        if name.startswith(prefix):
            return prefix
    return "other"


_FAMILY_COLORS = {"full": "#222222", "lora": "#4477aa", "lift": "#66ccee", "salf": "#ee6677",
                  "bot": "#228833", "top": "#ccbb44", "int": "#aa3377", "adt": "#bbbbbb", "other": "#777777"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def write_plots(output: str | Path, datasets: Sequence[DatasetCell], strategies: Sequence[StrategyCell],
                summaries: dict[tuple[str, str], dict[str, Any]], zero_shot: dict[str, dict[str, float]]
                ) -> list[Path]:
    """``f1_vs_cost.png`` (free macro-F1 against cost-saving, one marker per cell) and ``f1_bars.png``."""
    if not summaries:
        return []
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    out = Path(output)
    written = []
    fig, ax = plt.subplots(figsize=(9, 6))
    for j, d in enumerate(datasets):
        marker = _MARKERS[j % len(_MARKERS)]
        for s in strategies:
            summary = summaries.get((d.label, s.label))
            if summary is None:
                continue
            x, y = summary["cost_saving_ratio"], summary["fine_tuned"]["free_macro_f1"]
            ax.scatter([x], [y], marker=marker, s=55, color=_FAMILY_COLORS[_family(s.label)],
                       edgecolor="black", linewidth=0.5, zorder=3)
            ax.annotate(s.label, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6.5)
        if d.label in zero_shot:
            ax.axhline(zero_shot[d.label]["free_macro_f1"], linestyle=":", linewidth=0.8, color="gray")
            ax.annotate(f"zero-shot {d.label}", (0.0, zero_shot[d.label]["free_macro_f1"]), xytext=(2, 2),
                        textcoords="offset points", fontsize=6.5, color="gray")
    handles = [Line2D([], [], marker=_MARKERS[j % len(_MARKERS)], linestyle="", color="white",
                      markeredgecolor="black", label=d.label) for j, d in enumerate(datasets)]
    families = dict.fromkeys(_family(s.label) for s in strategies)
    handles += [Line2D([], [], marker="o", linestyle="", color=_FAMILY_COLORS[f], label=f) for f in families]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_xlabel("backward cost-saving ratio (mean frozen depth / m)")
    ax.set_ylabel("macro-F1 (free decoding)")
    ax.set_title("F1 against backward cost-saving, one marker per strategy x dataset")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "f1_vs_cost.png", dpi=120)
    plt.close(fig)
    written.append(out / "f1_vs_cost.png")

    labels = ([ZERO_SHOT] if zero_shot else []) + [s.label for s in strategies]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets) + 1.5, 0.28 * len(labels) + 1.6),
                             sharey=True, squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        values, colors = [], []
        for label in labels:
            if label == ZERO_SHOT:
                values.append(zero_shot.get(d.label, {}).get("free_macro_f1", float("nan")))
                colors.append("#dddddd")
            else:
                summary = summaries.get((d.label, label))
                values.append(float("nan") if summary is None else summary["fine_tuned"]["free_macro_f1"])
                colors.append(_FAMILY_COLORS[_family(label)])
        ypos = list(range(len(labels)))
        ax.barh(ypos, [0.0 if math.isnan(v) else v for v in values], color=colors, edgecolor="black",
                linewidth=0.4)
        for y, v in zip(ypos, values, strict=True):
            ax.text((0 if math.isnan(v) else v) + 0.01, y, "—" if math.isnan(v) else f"{v:.3f}", va="center",
                    fontsize=6.5)
        ax.set_title(d.label)
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("macro-F1 (free)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)))
    axes[0][0].set_yticklabels(labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("macro-F1 (free decoding) per strategy, grouped by dataset", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "f1_bars.png", dpi=120)
    plt.close(fig)
    written.append(out / "f1_bars.png")
    return written


# ----------------------------------------------------------------------------- CLI

def _shared_train_fields(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields from the compare options, on top of the `salf train` defaults."""
    from .cli import _add_data_args, _add_train_args

    defaults_parser = argparse.ArgumentParser(add_help=False)
    _add_data_args(defaults_parser, dataset_required=False)
    _add_train_args(defaults_parser)
    base = vars(defaults_parser.parse_args([]))
    own = ("limit", "eval_limit", "max_steps", "epochs", "batch_size", "grad_accum", "lr", "seed", "lora",
           "lora_r", "load_in_4bit", "max_length", "eval_batch_size", "dtype", "device", "eval_split",
           "holdout_size", "cuts_per_step", "profile_fraction", "train_head", "save_every",
           "save_total_limit")
    mine = {k: getattr(args, k) for k in own}
    base.update(mine)
    return dict(
        max_length=base["max_length"], metric=base["metric"], lens=base["lens"],
        eof_boundary=base["eof_boundary"],
        loss=base["loss"], max_steps=base["max_steps"], epochs=base["epochs"], batch_size=base["batch_size"],
        grad_accum=base["grad_accum"], lr=base["lr"], weight_decay=base["weight_decay"],
        warmup_ratio=base["warmup_ratio"], schedule=base["schedule"], limit=base["limit"],
        eval_limit=base["eval_limit"], eval_batch_size=base["eval_batch_size"], eval_split=base["eval_split"],
        lora=base["lora"], lora_r=base["lora_r"], lora_alpha=base["lora_alpha"],
        lora_dropout=base["lora_dropout"],
        load_in_4bit=base["load_in_4bit"], dtype=base["dtype"], device=base["device"],
        gradient_checkpointing=base["gradient_checkpointing"], seed=base["seed"],
        holdout_size=base["holdout_size"], cuts_per_step=base["cuts_per_step"],
        profile_fraction=base["profile_fraction"], train_head=base["train_head"],
        save_every=base["save_every"], save_total_limit=base["save_total_limit"],
    )


def _cmd_compare(args: argparse.Namespace) -> int:
    settings = CompareSettings(
        model=args.model, datasets=args.datasets, strategies=args.strategies, output=args.output,
        data_dir=args.data_dir, train=_shared_train_fields(args), zero_shot=not args.no_zero_shot,
        overwrite=args.overwrite, keep_going=args.keep_going, discard_models=args.discard_models,
    )
    if args.tables_only:
        datasets, strategies = settings.resolve()
        summaries, zero_shot = collect_results(args.output, datasets, strategies)
        Path(args.output).mkdir(parents=True, exist_ok=True)
        write_tables(args.output, datasets, strategies, summaries, zero_shot)
        write_plots(args.output, datasets, strategies, summaries, zero_shot)
        print((Path(args.output) / "f1_free.md").read_text())
        return 0
    result = run_compare(settings, progress=not args.quiet, log=print)
    print("")
    print((Path(args.output) / "f1_free.md").read_text())
    print((Path(args.output) / "cost_saving.md").read_text())
    print(f"ran {len(result.ran)} cell(s), {len(result.skipped)} already finished; tables in {args.output}")
    if result.failed:
        for ds, st, msg in result.failed:
            print(f"failed: {ds} / {st}: {msg}")
        return 1
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``salf compare``."""
    from .strategies import STRATEGIES

    p = sub.add_parser(
        "compare", help="run a datasets x strategies grid and write the paper-style comparison tables",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Fine-tune one model under every strategy on every dataset (one `salf train` run per cell, in "
            "OUTPUT/cells/<dataset>/<strategy>/), resume after an interruption (finished cells, those with a "
            "summary.json, are skipped), and write tables (rows = strategies, columns = datasets + average: "
            "macro-F1 and accuracy with free and label-restricted decoding, backward cost-saving, training "
            "time) as Markdown and CSV, plus PNG plots. "
            + CELL_SYNTAX.format(names=", ".join(STRATEGIES)) + ".",
            width=100, break_on_hyphens=False, break_long_words=False,
        ),
    )
    p.add_argument("--model", required=True, help="short name (smollm2-135m), HF directory or .gguf file")
    p.add_argument("--datasets", required=True, action="append",
                   help="comma-separated presets (trec, sst5, carer, mrpc, webss) or local files, each "
                        "optionally LABEL=SOURCE")
    p.add_argument("--strategies", required=True, action="append",
                   help="comma-separated strategy cells NAME[:OPTION]..., e.g. "
                        "full,lora-half,salf,salf:uniform:df,salf:geom:df,bot50,adt-low")
    p.add_argument("--data-dir", default=None, help="directory holding the presets' raw files")
    p.add_argument("--output", required=True, help="grid directory (cells/, tables, plots)")
    p.add_argument("--limit", type=int, default=None,
                   help="training subset size per dataset (class-stratified)")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluation subset size per dataset")
    p.add_argument("--eval-split", default="test", help="a split name, or 'holdout' (carved from train)")
    p.add_argument("--holdout-size", type=int, default=500, help="examples held out for --eval-split holdout")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: per training mode, full weights or LoRA; see README)")
    p.add_argument("--cuts-per-step", type=int, default=4,
                   help="micro-batches of different depths per optimizer step (SALF, LIFT)")
    p.add_argument("--profile-fraction", type=float, default=1.0,
                   help="share of the training examples profiled before epoch 0")
    p.add_argument("--train-head", action="store_true", help="train the LM head under layer freezing too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", action="store_true", help="LoRA adapters under every strategy")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", help="float32 or bf16 (autocast)")
    p.add_argument("--device", default="auto")
    p.add_argument("--save-every", type=int, default=None,
                   help="checkpoint every N steps: an interrupted cell resumes from its checkpoint")
    p.add_argument("--save-total-limit", type=int, default=None,
                   help="keep the newest K checkpoints per cell")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot row")
    p.add_argument("--overwrite", action="store_true", help="redo finished cells too")
    p.add_argument("--discard-models", action="store_true",
                   help="delete each cell's saved model/ once it finished (saves disk; tables unaffected)")
    p.add_argument("--keep-going", action="store_true",
                   help="record a failing cell and go on (exit status 1 at the end)")
    p.add_argument("--tables-only", action="store_true",
                   help="only rebuild tables and plots from finished cells")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_compare)
    return p

