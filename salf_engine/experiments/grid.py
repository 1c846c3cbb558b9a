"""The comparison grid as data: strategy cells, dataset cells, the grid's settings and its directories.

Strategy cells are written ``NAME[:OPTION]...`` (shell-safe, no quoting needed), NAME one of
:data:`salf_engine.schedule.names.STRATEGIES`, OPTIONs among: a budget plan (``uniform`` -- alias
``half`` --, ``arith``, ``geom``, ``none``; salf only), an infilling order (``bf``, ``df``; with a
budget), a freeze fraction in (0, 1) (``bot``/``top``/``int``/``adt-*``), ``lora`` (LoRA adapters
under that strategy). A cell with a budget plan and no schedule runs ``per-row`` unless the shared settings
name one (bare ``salf`` runs the CLI's default). Examples: ``salf`` (the default: uniform plan,
narrowing), ``salf:none`` (Algorithm 3), ``salf:uniform:df`` (SALF[half] by eof rank, per-row),
``salf:geom:bf``, ``bot:0.3``, ``adt-high:0.25``, ``bot50:lora``.
Datasets are preset names or local files, optionally labelled ``LABEL=SOURCE``. Every cell runs in
``OUTPUT/cells/<dataset>/<strategy>/`` (:func:`cell_dir`); the runner is `salf_engine.experiments.compare`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salf_engine.config import TrainConfig, is_generative_preset
from salf_engine.errors import ConfigError
from salf_engine.schedule.names import INFILLS, STRATEGIES, TIMED_SCHEDULES

__all__ = [
    "StrategyCell",
    "DatasetCell",
    "CompareSettings",
    "CELL_SYNTAX",
    "ZERO_SHOT",
    "parse_strategy",
    "parse_dataset",
    "parse_list",
    "cell_dir",
    "is_finished",
]

CELL_SYNTAX = (
    "strategy cells: NAME[:OPTION]... with NAME one of {names}; OPTIONs: a budget plan "
    "(uniform = half, arith, geom, none; salf only), an infilling order (bf, df; with a budget), a freeze "
    "fraction in (0, 1) (bot/top/int/adt), 'lora' (LoRA adapters), 'paper' (Algorithm 4's schedule), "
    "'narrowing' / 'widening' (time-varying per-row depths), 'rising' (narrowing across the run), 'stepped' "
    "(rising's depths of each epoch in a random order), "
    "'eof-match', 'class-rank' or 'loss-rank' "
    "(budgeted SALF's depth assignment), cutsN (N cuts per optimizer step), epN (N epochs for this cell). "
    "A budget plan without a schedule runs per-row. Examples: salf (the default: uniform plan, narrowing), "
    "salf:none (Algorithm 3), salf:uniform:df (SALF[half] by eof rank, per-row), salf:arith:df:paper, "
    "salf:geom:bf, "
    "bot50, bot:0.3, adt-high:0.25, bot50:lora, lift-star-half:cuts1, bot50:ep3"
)

_BUDGET_ALIASES = {"uniform": "uniform", "half": "uniform", "arith": "arith", "geom": "geom", "none": "none"}
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ZERO_SHOT = "zero-shot"
# ----------------------------------------------------------------------------- cell specs

@dataclass(frozen=True)
class StrategyCell:
    """One strategy row of the grid: a strategy name plus its options."""

    strategy: str
    budget: str | None = None
    infill: str | None = None
    freeze_fraction: float | None = None
    lora: bool = False
    schedule: str | None = None       # one of TIMED_SCHEDULES; None = the config's
    assignment: str | None = None     # "eof-match" / "class-rank" / "loss-rank"; None = the config's
    cuts_per_step: int | None = None  # None = the config's; given, the cell runs the mixed schedule
    epochs: int | None = None         # None = the shared settings' epochs

    @property
    def label(self) -> str:
        """Canonical spelling, e.g. ``salf:uniform:df``; the row name in the tables."""
        parts = [self.strategy]
        if self.budget == "none":
            parts.append("none")
        elif self.budget is not None:
            parts += [self.budget, self.infill or "bf"]
        if self.freeze_fraction is not None:
            parts.append(f"{self.freeze_fraction:g}")
        parts += [x for x in (self.schedule, self.assignment) if x is not None]
        if self.cuts_per_step is not None:
            parts.append(f"cuts{self.cuts_per_step}")
        if self.lora:
            parts.append("lora")
        if self.epochs is not None:
            parts.append(f"ep{self.epochs}")
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
                           ("cuts_per_step", self.cuts_per_step), ("epochs", self.epochs)):
            if value is not None:
                fields[key] = value
        if self.cuts_per_step is not None and self.schedule is None:
            fields["depth_schedule"] = "mixed"  # cuts per step are micro-batches: the mixed schedule's
        return fields

    @property
    def default_schedule(self) -> str | None:
        """The depth schedule of a cell when neither it nor the shared settings name one: ``per-row`` for a
        budget plan (SALF by eof rank, as the cell syntax always meant), else the config's default."""
        return "per-row" if self.budget not in (None, "none") else None


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
    # imported here, not at the top: the strategies import torch, and `salf compare --help` reads this module
    from salf_engine.schedule.strategies import make_strategy

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
    epochs: int | None = None

    def once(kind: str, current: object) -> None:
        if current is not None and current is not False:
            raise ConfigError(f"cell {text!r} gives more than one {kind}")

    for opt in options:
        key = opt.lower()
        if key in _BUDGET_ALIASES:
            once("budget plan", budget)
            budget = _BUDGET_ALIASES[key]
        elif key in INFILLS:
            once("infilling order", infill)
            infill = key
        elif key == "lora":
            once("'lora'", lora)
            lora = True
        elif key in TIMED_SCHEDULES:
            once("schedule", schedule)
            schedule = key
        elif key in ("eof-match", "class-rank", "loss-rank"):
            once("depth assignment", assignment)
            assignment = key
        elif re.fullmatch(r"cuts[1-9][0-9]*", key):
            once("cuts per step", cuts)
            cuts = int(key[4:])
        elif re.fullmatch(r"ep[1-9][0-9]*", key):
            once("epoch count", epochs)
            epochs = int(key[2:])
        else:
            try:
                value = float(key)
            except ValueError:
                raise ConfigError(
                    f"unknown option {opt!r} in strategy cell {text!r}; options: budget plans "
                    f"{', '.join(_BUDGET_ALIASES)}, infilling orders {', '.join(INFILLS)}, "
                    f"a freeze fraction in (0, 1), lora, {', '.join(TIMED_SCHEDULES)}, eof-match, "
                    "class-rank, loss-rank, cutsN, epN"
                ) from None
            once("freeze fraction", fraction)
            if not (math.isfinite(value) and 0 < value < 1):
                raise ConfigError(f"freeze fraction in cell {text!r} must lie strictly between 0 and 1")
            fraction = value
    if infill is not None and budget in (None, "none"):
        raise ConfigError(f"cell {text!r}: an infilling order needs a budget plan (uniform, arith, geom)")
    if budget not in (None, "none") and infill is None:
        infill = "bf"
    cell = StrategyCell(name, budget, infill, fraction, lora, schedule, assignment, cuts, epochs)
    # make_strategy checks the combination (a budget on a non-salf strategy, a fraction that clashes ...)
    make_strategy(name, budget=budget, infill=infill, freeze_fraction=fraction, lora=lora,
                  schedule=schedule or ("mixed" if cuts else cell.default_schedule), assignment=assignment,
                  **({"cuts_per_step": cuts} if cuts else {}))
    return cell


def parse_dataset(text: str, data_dir: str | None = None) -> DatasetCell:
    """``SOURCE`` or ``LABEL=SOURCE``; SOURCE a preset name or an existing file/directory."""
    from salf_engine.data.presets import PRESETS  # here, not at the top: the data package imports torch

    label, sep, source = text.partition("=")
    if not sep:
        label, source = "", text
    label, source = label.strip(), source.strip()
    if not source:
        raise ConfigError(f"dataset {text!r} names no source")
    if is_generative_preset(source):
        raise ConfigError(f"salf compare tables classification scores; {source.lower()} is a prompt/response "
                          "task: run its cells with salf train (answer loss, exact match)")
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
    discard_models: bool = False   # delete finished cells' model/ and checkpoints/ (tables need summary.json)

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
        reserved = {"model", "dataset", "data_dir", "output", "overwrite", "zero_shot_eval",
                    "strategy", "budget", "infill", "freeze_fraction"}
        clash = sorted(reserved & set(self.train))
        if clash:
            raise ConfigError(
                f"compare sets {', '.join(clash)} per cell; remove them from the shared settings")
        if strategy.epochs is not None and self.train.get("max_steps") is not None:
            raise ConfigError(f"cell {strategy.label!r} sets its epochs, but --max-steps fixes every cell's "
                              "steps; drop one")
        fields = dict(self.train)
        fields.update(strategy.config_fields())
        if fields.get("depth_schedule") is None:
            fields["depth_schedule"] = strategy.default_schedule
        fields["lora"] = bool(strategy.lora or self.train.get("lora", False))
        return TrainConfig(model=self.model, dataset=dataset.source, data_dir=self.data_dir,
                           output=str(cell_dir(self.output, dataset, strategy)), overwrite=True,
                           zero_shot_eval=False, **fields).validate()
