"""The strategies by name: :func:`make_strategy` and its one option check. The names it takes are defined
in ``names``; the strategy families live in ``base`` (the interface), ``static``, ``sample_depth``,
``paper`` and ``adaptive``; their names stay importable from here."""

from __future__ import annotations

import math
import re

from salf_engine.deviation.contract import BOUNDARIES
from salf_engine.errors import ConfigError, positive_int
from salf_engine.schedule.adaptive import AdaptiveStrategy
from salf_engine.schedule.base import Strategy
from salf_engine.schedule.names import (
    ADT_STEPS,
    ASSIGNMENTS,
    BUDGETS,
    DEFAULT_CUTS_PER_STEP,
    INFILLS,
    SCHEDULES,
    STRATEGIES,
    TIMED_SCHEDULES,
    strategy_defaults,
)
from salf_engine.schedule.paper import PaperScheduleStrategy
from salf_engine.schedule.plans import (
    MicroBatch,
    StepPlan,
    mask_above,
    pack_steps,
    round_to_levels,
)
from salf_engine.schedule.sample_depth import (
    ROW_ORDERS,
    RUN_ORDERS,
    SampleDepthStrategy,
    algorithm3_depths,
    lift_depths,
    quota_depths,
    salf_depths,
)
from salf_engine.schedule.static import StaticStrategy, fraction_mask, frozen_count, interleaved_frozen

__all__ = [
    "MicroBatch",
    "StepPlan",
    "Strategy",
    "StaticStrategy",
    "SampleDepthStrategy",
    "AdaptiveStrategy",
    "STRATEGIES",
    "BUDGETS",
    "INFILLS",
    "SCHEDULES",
    "ASSIGNMENTS",
    "DEFAULT_CUTS_PER_STEP",
    "ROW_ORDERS",
    "TIMED_SCHEDULES",
    "make_strategy",
    "strategy_from_config",
    "pack_steps",
    "round_to_levels",
    "frozen_count",
    "interleaved_frozen",
]

_FRACTION_NAME = re.compile(r"^(bot|top|int)(\d\d)?$")


def make_strategy(
    name: str,
    *,
    budget: str | None = None,
    infill: str | None = None,
    freeze_fraction: float | None = None,
    seed: int = 0,
    boundary: str = "trainable",
    lora: bool = False,
    adt_steps: int = ADT_STEPS,
    schedule: str | None = None,
    assignment: str | None = None,
    cuts_per_step: int = DEFAULT_CUTS_PER_STEP,
    cut_levels: int | None = None,
    observe: bool = True,
    profile_fraction: float | None = None,
) -> Strategy:
    """Build a strategy by name (see :data:`STRATEGIES`).

    - ``full``: depth 0, every layer trains. ``lora-full``: the same masks, ``uses_lora=True``.
    - ``lora-half``: LoRA on the top half only: depth m // 2, ``uses_lora="half"``.
    - ``lift-half``: uniform-budget quotas, samples placed at random (seeded), visited front to end
      over the depths (micro-batches of depth 0, 1, .., m-1, then again); trains only
      ``layers[depth]``. ``lift-star-half``: the same depths, trains ``layers[depth..]``.
    - ``salf``: the default (issue 38) is the ``uniform`` budget under the ``narrowing`` schedule (label
      ``salf-uniform-bf-narrowing``; no profile). Without ``schedule``, a salf budget plan (given or the
      default uniform) runs ``narrowing`` unless ``assignment``, ``profile_fraction`` or ``cut_levels`` is
      given, which asks for ``per-row`` (:func:`~salf_engine.schedule.names.default_schedule`); a ``schedule``
      needs the budget named. ``budget="none"``: Algorithm 3, each sample at its profiled eof (``per-row``
      unless ``schedule`` says ``mixed``). With ``budget`` in uniform / arith / geom, Algorithm 4's quotas
      (:func:`~salf_engine.schedule.budgets.budget_quotas`, filled ``infill`` = ``bf`` (default) or ``df``)
      filled by ``assignment``: ``class-rank`` (default; every class spread over the depths by its samples'
      eof rank inside the class, :func:`~salf_engine.schedule.budgets.assign_depths_by_class`), ``eof-match``
      (:func:`~salf_engine.schedule.budgets.assign_depths`) or ``loss-rank`` (inside each class by the
      samples' last training loss, hardest deepest: random until the first epoch has seen them, re-placed at
      every later epoch; no profile). Under the ``per-row`` schedule the samples come in the static
      strategies' shuffled order and every row of a forward runs at its own depth (at most ``cut_levels``
      distinct cuts per forward when given); under ``mixed`` every optimizer step holds ``cuts_per_step``
      micro-batches of one depth each. Either way the eofs seen in the training forward re-assign the depths
      at the next epoch. ``schedule="paper"`` (budget needed) runs Algorithm 4 as written instead: depth 0
      first, ascending, eofs recomputed at the visit. ``"narrowing"`` / ``"widening"`` (budget needed) keep
      the per-row forwards but give each row the budget's depth of its position in the epoch (ascending /
      descending over the epoch); no eof is used, so nothing is profiled. ``"rising"`` (budget needed) is
      narrowing across the whole run (``begin`` needs the run's epochs): the depths never fall, so the frozen
      floor rises and the prefix cache keeps the rows' states below it. ``"stepped"`` gives each epoch the
      same depths as ``"rising"`` in a random order over its rows: per-row cuts above a floor that rises
      once per epoch.
    - ``botNN``: freeze the bottom ``floor(NN% m)`` layers (depth = that count).
    - ``topNN``: freeze the top ``floor(NN% m)`` layers (depth 0).
    - ``intNN``: freeze ``floor(NN% m)`` interleaved layers, see :func:`interleaved_frozen`
      (m = 8: int25 freezes 3, 7; int50 1, 3, 5, 7; int75 all but 0 and 4).
    - ``bot`` / ``top`` / ``int`` with ``freeze_fraction``: the same at any fraction in (0, 1).
    - ``adt-low`` / ``adt-high``: full training for ``adt_steps`` (5) steps, then freeze the
      ``floor(f m)`` layers with the smallest / largest mean L2 weight change (f = ``freeze_fraction``,
      default 0.5).

    ``boundary`` ("trainable" | "frozen") decides how observed deviations become eofs; ``observe=False``
    keeps SALF's profiled eofs for the whole run (prompt/response tasks: the training forward measures no
    answer deviation). ``profile_fraction``: only whether it is given matters here (see ``salf``).
    ``lora=True``
    asks for LoRA adapters under any strategy. A fraction that rounds to zero or all layers is rejected
    by :meth:`Strategy.begin` (when m is known).
    """
    _check_given(name, budget, schedule, assignment)
    budget, schedule, assignment = strategy_defaults(name, budget, schedule, assignment, profile_fraction,
                                                     cut_levels)
    _check_options(name, budget, infill, boundary, schedule, assignment, cuts_per_step, cut_levels, adt_steps)
    fraction = _resolve_fraction(name, freeze_fraction)
    common = dict(seed=seed, uses_lora=bool(lora))
    if name == "salf":
        return _salf(budget, infill or "bf", schedule, assignment, cuts_per_step, cut_levels, observe,
                     boundary, common)
    if name in ("lift-half", "lift-star-half"):
        return SampleDepthStrategy(name, lift_depths, order="rotation", cuts_per_step=cuts_per_step,
                                   mask="single" if name == "lift-half" else "above", **common)
    if name in ("adt-low", "adt-high"):
        assert fraction is not None
        s: Strategy = AdaptiveStrategy(name, mode=name[4:], fraction=fraction, warmup_steps=adt_steps,
                                       **common)
        s.label = f"{name}{round(fraction * 100)}"
        return s
    if name in ("full", "lora-full"):
        return StaticStrategy(name, lambda m: [True] * m, seed=seed,
                              uses_lora=True if name == "lora-full" else bool(lora))
    if name == "lora-half":
        return StaticStrategy(name, lora_half_mask, seed=seed, uses_lora="half")
    assert fraction is not None
    label = f"{name}{round(fraction * 100)}" if len(name) == 3 else name
    s = StaticStrategy(name, fraction_mask(name[:3], fraction, label), **common)
    s.label = label
    return s


def strategy_from_config(config) -> Strategy:
    """The strategy a :class:`~salf_engine.config.TrainConfig` asks for (ConfigError for a bad
    combination)."""
    return make_strategy(config.strategy, budget=config.budget, infill=config.infill,
                         freeze_fraction=config.freeze_fraction, seed=config.seed,
                         boundary=config.eof_boundary, lora=config.lora, adt_steps=config.adt_steps,
                         schedule=config.depth_schedule, assignment=config.depth_assignment,
                         cuts_per_step=config.cuts_per_step, cut_levels=config.cut_levels,
                         observe=not config.generative, profile_fraction=config.profile_fraction)


def _check_given(name, budget, schedule, assignment) -> None:
    """What the options as given (before the defaults) may not combine: a salf schedule without a budget
    (a config saved before issue 38 meant Algorithm 3 by it), eof-match on an eof-free schedule."""
    if name == "salf" and budget is None and schedule in SCHEDULES:
        raise ConfigError(f"depth schedule {schedule!r} needs the budget plan named: --budget none for "
                          "Algorithm 3 (what a config saved without a budget ran before issue 38), or "
                          "uniform, arith, geom")
    if assignment == "eof-match" and schedule in set(TIMED_SCHEDULES) - {"paper"}:
        raise ConfigError(f"the {schedule!r} schedule places rows by their position in the epoch, not by "
                          "eof: drop the 'eof-match' assignment or use depth_schedule 'per-row'")


def _check_options(name, budget, infill, boundary, schedule, assignment, cuts_per_step, cut_levels,
                   adt_steps) -> None:
    """The one check of a strategy's options and of how they combine (``TrainConfig.validate`` calls it
    through :func:`strategy_from_config`)."""
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}")
    for what, value, valid in (("infilling order", infill, INFILLS), ("eof boundary", boundary, BOUNDARIES),
                               ("depth schedule", schedule, SCHEDULES),
                               ("depth assignment", assignment, ASSIGNMENTS),
                               ("budget plan", budget, BUDGETS)):
        if value is not None and value not in valid:
            raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    positive_int(cuts_per_step, "cuts_per_step")
    positive_int(adt_steps, "adt_steps")
    if cut_levels is not None:
        positive_int(cut_levels, "cut_levels")
    if budget is not None and name != "salf":
        raise ConfigError(f"a budget plan only applies to strategy 'salf', not {name!r} "
                          f"(got budget={budget!r})")
    budgeted = budget is not None and budget != "none"
    if infill is not None and not budgeted:
        raise ConfigError(f"infilling order {infill!r} fills a budget plan's shares; give a budget (uniform, "
                          "arith, geom) or drop the infilling order")
    if schedule in TIMED_SCHEDULES and not budgeted:
        raise ConfigError(f"the {schedule!r} schedule visits a budget plan's depths in order and needs a "
                          "salf budget plan (uniform, arith, geom)")
    if assignment == "loss-rank" and (not budgeted or schedule in TIMED_SCHEDULES):
        raise ConfigError("the 'loss-rank' assignment places samples in a budget plan's quotas by their "
                          "training loss: it needs a salf budget plan (uniform, arith, geom) and the per-row "
                          f"or mixed schedule (got budget={budget!r}, schedule={schedule!r})")
    per_row_salf = name == "salf" and schedule in ROW_ORDERS
    if cut_levels is not None and not per_row_salf:
        raise ConfigError("cut_levels rounds the per-row schedule's depths: it needs strategy 'salf' with "
                          f"a per-row depth_schedule ({', '.join(ROW_ORDERS)}; got {name!r}, {schedule!r})")
    if per_row_salf and cuts_per_step != DEFAULT_CUTS_PER_STEP:
        raise ConfigError("cuts_per_step counts the micro-batches of the 'mixed' schedule; the per-row "
                          "schedule has none: add depth_schedule 'mixed' (or use cut_levels)")


def _salf(budget, infill, schedule, assignment, cuts_per_step, cut_levels, observe, boundary,
          common) -> Strategy:
    """SALF with its budget, schedule and assignment (checked by :func:`_check_options`)."""
    rows = dict(order=schedule, cut_levels=cut_levels, **common)
    if budget == "none":  # Algorithm 3: each sample at its eof
        s: Strategy = SampleDepthStrategy("salf", algorithm3_depths, cuts_per_step=cuts_per_step,
                                          refresh=observe, boundary=boundary, **rows)
    elif schedule in ("narrowing", "widening", *RUN_ORDERS):  # no eof decides anything: no profile
        s = SampleDepthStrategy("salf", quota_depths(budget, infill), **rows)
        s.label = f"salf-{budget}-{infill}-{schedule}"
        return s
    elif schedule == "paper":
        s = PaperScheduleStrategy("salf", budget=budget, infill=infill, boundary=boundary, **common)
        s.label = f"salf-{budget}-{infill}-paper"
    elif assignment == "loss-rank":  # no eof decides anything: no profile
        s = SampleDepthStrategy("salf", salf_depths(budget, infill, assignment),
                                cuts_per_step=cuts_per_step, by_loss=True, **rows)
        s.label = f"salf-{budget}-{infill}-loss-rank"
        return s
    else:
        s = SampleDepthStrategy("salf", salf_depths(budget, infill, assignment),
                                cuts_per_step=cuts_per_step, refresh=observe, boundary=boundary, **rows)
        s.label = f"salf-{budget}-{infill}"
    s.needs_profile = True
    return s


def lora_half_mask(m: int) -> list[bool]:
    if m < 2:
        raise ConfigError(f"lora-half needs at least 2 layers to leave the bottom half frozen, got {m}")
    return mask_above(m // 2, m)


def _resolve_fraction(name: str, freeze_fraction: float | None) -> float | None:
    """The freeze fraction of bot/top/int/adt strategies; ConfigError where it does not apply or clashes."""
    if freeze_fraction is not None:
        if isinstance(freeze_fraction, bool) or not isinstance(freeze_fraction, int | float):
            raise ConfigError(f"freeze_fraction must be a number in (0, 1), got {freeze_fraction!r}")
        if not 0 < freeze_fraction < 1:
            raise ConfigError(f"freeze_fraction must lie strictly between 0 and 1, got {freeze_fraction!r}")
    match = _FRACTION_NAME.match(name)
    if match:
        if match.group(2) is None:
            if freeze_fraction is None:
                raise ConfigError(
                    f"strategy {name!r} needs freeze_fraction (or use {name}25 / {name}50 / {name}75)"
                )
            return float(freeze_fraction)
        implied = int(match.group(2)) / 100
        if freeze_fraction is not None and not math.isclose(freeze_fraction, implied):
            raise ConfigError(
                f"strategy {name!r} freezes {implied:g} of the layers; freeze_fraction={freeze_fraction!r} "
                f"contradicts it (use {match.group(1)!r} with freeze_fraction instead)"
            )
        return implied
    if name in ("adt-low", "adt-high"):
        return 0.5 if freeze_fraction is None else float(freeze_fraction)
    if freeze_fraction is not None:
        raise ConfigError(f"freeze_fraction only applies to bot/top/int/adt strategies, not {name!r}")
    return None
