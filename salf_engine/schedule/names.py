"""The names the strategies take, defined once as ``Literal`` types (the tuples are read off them), and the
defaults of their counts.

This module imports nothing, so `salf_engine.config` types its fields with these names (and the CLI lists
them) without loading the strategies or torch.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["ADT_STEPS", "ASSIGNMENTS", "BUDGETS", "DEFAULT_ASSIGNMENT", "DEFAULT_BUDGET",
           "DEFAULT_CUTS_PER_STEP", "INFILLS", "SCHEDULES", "STRATEGIES", "TIMED_SCHEDULES", "Budget",
           "DepthAssignment", "DepthSchedule", "Infill", "StrategyName", "default_schedule",
           "strategy_defaults"]

#: Every strategy name (``bot`` / ``top`` / ``int`` take ``freeze_fraction``).
StrategyName = Literal["full", "lora-full", "lora-half", "lift-half", "lift-star-half", "salf", "bot25",
                       "bot50", "bot75", "top25", "top50", "top75", "int25", "int50", "int75", "bot", "top",
                       "int", "adt-low", "adt-high"]
#: SALF budget plans ("none" = Algorithm 3, each sample at its eof).
Budget = Literal["uniform", "arith", "geom", "none"]
#: Infilling orders of budgeted SALF: they decide the per-depth quotas, never the visit order.
Infill = Literal["bf", "df"]
#: How a depth-varying strategy visits its depths: ``per-row`` (every row of a forward at its own cut),
#: ``mixed`` (micro-batches of one cut each, several per optimizer step), ``paper`` (Algorithm 4 as written:
#: depth 0 first, ascending, each sample's eof recomputed when its depth is visited), ``narrowing`` /
#: ``widening`` (per-row, the budget's depths ascending / descending over each epoch; no profile), ``rising``
#: (per-row, narrowing across the whole run: the depths never fall, so the frozen floor rises; no profile),
#: ``stepped`` (per-row, each epoch a band of rising's depths in a random order: the floor rises per epoch).
DepthSchedule = Literal["per-row", "mixed", "paper", "narrowing", "widening", "rising", "stepped"]
#: How budgeted SALF fills the quotas: ``class-rank`` (each class spread over the depths by its samples'
#: eof rank inside the class), ``eof-match`` (Algorithm 4's global eof-matching) or ``loss-rank`` (by the
#: samples' last training loss inside each class, the hardest deepest; random until a loss is seen).
DepthAssignment = Literal["class-rank", "eof-match", "loss-rank"]

#: Every strategy name :func:`~salf_engine.schedule.strategies.make_strategy` accepts.
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
#: Budget plans a ``salf`` strategy accepts (``"none"`` = Algorithm 3, each sample at its eof; ``None`` =
#: :data:`DEFAULT_BUDGET`).
BUDGETS: tuple[str, ...] = get_args(Budget)
INFILLS: tuple[str, ...] = get_args(Infill)
SCHEDULES: tuple[str, ...] = get_args(DepthSchedule)
ASSIGNMENTS: tuple[str, ...] = get_args(DepthAssignment)
#: Schedules that visit a budget plan's depths in an order of time (they need a budget plan).
TIMED_SCHEDULES = ("paper", "narrowing", "widening", "rising", "stepped")
#: adt-low / adt-high: optimizer steps of full training before the frozen layers are chosen (the paper's 5).
ADT_STEPS = 5
#: Micro-batches of different depths per optimizer step (SALF's mixed schedule, LIFT).
DEFAULT_CUTS_PER_STEP = 4
#: The budget plan ``salf`` runs when none is given (issue 38; ``"none"`` asks for Algorithm 3).
DEFAULT_BUDGET = "uniform"
#: How budgeted SALF fills its quotas when no assignment is given.
DEFAULT_ASSIGNMENT = "class-rank"


def default_schedule(name: str, budget: str | None, assignment: str | None, profile_fraction: float | None,
                     cut_levels: int | None) -> str:
    """The depth schedule when none is given: ``narrowing`` for ``salf`` on a budget plan (given or the
    default) unless a depth assignment, a profile fraction or cut levels are given (options of placing every
    row by its eof or loss), else ``per-row``."""
    eof_options = (assignment, profile_fraction, cut_levels)
    if name == "salf" and budget != "none" and eof_options == (None, None, None):
        return "narrowing"
    return "per-row"


def strategy_defaults(name: str, budget: str | None, schedule: str | None, assignment: str | None,
                      profile_fraction: float | None, cut_levels: int | None) -> tuple[str | None, str, str]:
    """(budget, schedule, assignment) with the defaults filled in where not given: ``salf``'s budget plan
    :data:`DEFAULT_BUDGET`, the schedule :func:`default_schedule`, the assignment :data:`DEFAULT_ASSIGNMENT`.
    The one home of those defaults, for ``make_strategy`` and for comparing saved configs."""
    if name == "salf" and budget is None:
        budget = DEFAULT_BUDGET
    schedule = schedule or default_schedule(name, budget, assignment, profile_fraction, cut_levels)
    return budget, schedule, assignment or DEFAULT_ASSIGNMENT
