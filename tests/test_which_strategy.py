"""bench/which_strategy.py's picks: hand-made cells, the expected pick worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from which_strategy import picks, table  # noqa: E402


def _row(f1: float, time: float, flops: float) -> dict:
    return {"free_macro_f1": str(f1), "time_ratio": str(time), "flops_ratio": str(flops)}


def _cells(group: dict[str, dict[int, dict]]) -> dict:
    return {("data4x", "sst5", name): seeds for name, seeds in group.items()}


def test_accuracy_pick_is_the_fastest_within_tolerance_and_speed_pick_the_best_under_budget():
    group = {
        "full": {0: _row(0.52, 1.0, 1.0), 1: _row(0.50, 1.0, 1.0)},  # mean 0.510, best
        "BOT50": {0: _row(0.49, 0.6, 0.67), 1: _row(0.47, 0.6, 0.67)},  # 0.480 at 0.60
        "LoRA[half]": {0: _row(0.51, 0.7, 0.5), 1: _row(0.50, 0.7, 0.5)},  # 0.505: within 0.01, faster
        "SALF[half]": {0: _row(0.49, 0.5, 0.69), 1: _row(0.48, 0.5, 0.69)},  # 0.485 at 0.50: best under 0.65
    }
    assert picks(group) == ("LoRA[half]", "SALF[half]")


def test_a_strategy_missing_a_seed_is_not_picked_and_is_marked_pending():
    group = {
        "full": {0: _row(0.52, 1.0, 1.0), 1: _row(0.50, 1.0, 1.0)},
        "BOT50": {0: _row(0.49, 0.6, 0.67), 1: _row(0.47, 0.6, 0.67)},
        # One lucky seed: 0.525 would be best and under the time budget, so it would take both picks.
        "SALF[half], narrowing": {0: _row(0.525, 0.6, 0.68)},
    }
    assert picks(group) == ("full", "BOT50")
    lines = {line.split(" | ")[2]: line for line in table(_cells(group)).splitlines()[2:]}
    assert lines["SALF[half], narrowing"].endswith("| seeds pending |")
    assert lines["full"].endswith("| **accuracy** |")
    assert lines["BOT50"].endswith("| **speed** |")


def test_no_speed_pick_when_nothing_fits_the_time_budget():
    group = {"full": {0: _row(0.5, 1.0, 1.0)}, "BOT50": {0: _row(0.45, 0.7, 0.67)}}
    assert picks(group) == ("full", None)


def test_no_pick_while_every_strategy_misses_a_seed():
    group = {"full": {0: _row(0.5, 1.0, 1.0)}, "BOT50": {1: _row(0.45, 0.6, 0.67)}}
    assert picks(group) == (None, None)
    lines = {line.split(" | ")[2]: line for line in table(_cells(group)).splitlines()[2:]}
    assert all(line.endswith("| seeds pending |") for line in lines.values())
