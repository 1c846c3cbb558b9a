"""bench/compare_epochs.py's report: hand-made cells, the most accurate strategy at one and two epochs of full
fine-tuning's wall time worked out by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare_epochs  # noqa: E402

#: strategy -> (training seconds, macro-F1) after epochs 1, 2, 3
CURVES = {
    "full": [(100, 0.50), (200, 0.60), (300, 0.70)],
    "full-1ep": [(110, 0.58)],  # one epoch of full: the time unit (110 s), full's entry at budget 1
    "full-2ep": [(108, 0.55), (215, 0.65)],  # full's entry at budget 2 (its three-epoch run: 0.60)
    "bot50": [(45, 0.45), (70, 0.55), (95, 0.62)],  # 3 epochs within 100 s: 0.62
    "lora-half": [(50, 0.40), (80, 0.50), (110, 0.58)],  # within 100 s: epoch 2, 0.50; within 110 s: 0.58
    "narrowing": [(65, 0.48), (130, 0.58), (195, 0.66)],  # within 200 s: all three, 0.66
    "rising": [(60, 0.50), (100, 0.59), (130, 0.63)],  # within 100 s: epoch 2 (100 <= 100), 0.59
    "bot50-1ep": [(40, 0.63)],  # fits both budgets: bot50's entry at both, above its three epochs' 0.62
    "lora-half-2ep": [(60, 0.45), (120, 0.61)],  # 120 s > 110: fits two epochs of full only; above 0.58
}


def test_best_within_takes_the_last_epoch_that_fits():
    assert compare_epochs.best_within(CURVES["rising"], 100) == (2, 0.59)
    assert compare_epochs.best_within(CURVES["full"], 99) is None


def _budget_rows(text):
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "epoch" in line
            and "of full" in line}
    return rows["1 epoch of full"].split(" | ")[2:], rows["2 epochs of full"].split(" | ")[2:]


def test_report_names_the_most_accurate_at_each_budget(tmp_path, monkeypatch):
    """With the short runs: the unit is full-1ep's 110 s; full's entry at budget b is full-{b}ep's score;
    bot50-1ep (40 s) and lora-half-2ep (120 s) enter where they fit and score higher. Without them: the unit
    is full's first epoch (100 s), every entry from the three-epoch runs."""
    monkeypatch.setattr(compare_epochs, "RESULTS", tmp_path / "results")
    out = tmp_path / "runs"
    cells = compare_epochs.grid_cells([0], ["trec"])
    for seed, ds, label in cells:
        d = out / f"seed{seed}" / ds / label
        d.mkdir(parents=True)
        epochs = [{"epoch": k + 1, "train_seconds": t, "free_macro_f1": f} for k, (t, f) in
                  enumerate(CURVES[label])]
        (d / "summary.json").write_text(json.dumps({"epochs": epochs}))
    text = compare_epochs.report(out, cells)
    # † marks an entry after an earlier epoch of a three-epoch run (its schedule not complete)
    assert _budget_rows(text) == (["0.580", "0.630", "0.580", "0.480†", "0.590†", "bot50 (one seed) |"],
                                  ["0.650", "0.630", "0.610", "0.660", "0.630", "narrowing (one seed) |"])
    assert "| bot50 | 1 | 0.450 (0.41) | 0.550 (0.64) | 0.620 (0.86) |" in text
    assert "| full-1ep | 1 | 0.580 (1.00) | — | — |" in text
    assert "| bot50-1ep | 1 | 0.630 (0.36) | — | — |" in text
    assert (tmp_path / "results" / "f1_vs_time.png").is_file()
    five = [c for c in cells if c[2] not in compare_epochs.SHORT_RUNS]
    text = compare_epochs.report(out, five)
    assert _budget_rows(text) == (["0.500†", "0.620", "0.500†", "0.480†", "0.590†", "bot50 (one seed) |"],
                                  ["0.600†", "0.620", "0.580", "0.660", "0.630", "narrowing (one seed) |"])
    assert "| bot50 | 1 | 0.450 (0.45) | 0.550 (0.70) | 0.620 (0.95) |" in text


def test_most_accurate_names_what_it_does_not_beat_beyond_the_spread():
    """Two seeds: bot50's mean (0.640) is highest. Over full it gains +0.05 on both seeds (beyond the
    spread, 0); over lora-half +0.02 and -0.01 (mean +0.005, within the spread 0.015); narrowing shares
    one seed, so no spread is known; rising fits no budget."""
    hits = {"full": {0: (True, 0.58), 1: (True, 0.60)}, "bot50": {0: (True, 0.63), 1: (True, 0.65)},
            "lora-half": {0: (True, 0.61), 1: (True, 0.66)}, "narrowing": {0: (False, 0.50)}, "rising": {}}
    assert compare_epochs._most_accurate(hits) == "bot50; within the spread: lora-half, narrowing"
    hits["lora-half"] = {0: (True, 0.60), 1: (True, 0.64)}  # gains +0.03, +0.01: mean 0.02 > 0.01
    hits["narrowing"] = {0: (True, float("nan"))}  # fits no budget on its seed
    assert compare_epochs._most_accurate(hits) == "bot50"
    assert compare_epochs._most_accurate({"full": {1: (True, 0.5)}, "bot50": {}}) == "full (one seed)"


def test_driver_report_keeps_the_datasets_it_does_not_run(tmp_path, monkeypatch):
    """A driver run on SST-5 alone (--report-only) still reports TREC's committed cells: the hand-made TREC
    curves of CURVES give bot50's row as in the test above."""
    results = tmp_path / "results"
    monkeypatch.setattr(compare_epochs, "RESULTS", results)
    for label, curve in CURVES.items():
        d = results / "cells" / "seed0" / "trec" / label
        d.mkdir(parents=True)
        epochs = [{"epoch": k + 1, "train_seconds": t, "free_macro_f1": f} for k, (t, f) in enumerate(curve)]
        (d / "summary.json").write_text(json.dumps({"epochs": epochs}))
        (d / "config.json").write_text("{}")
    assert compare_epochs.main(["--output", str(tmp_path / "runs"), "--datasets", "sst5", "--seeds", "0",
                                "--report-only"]) == 0
    text = (results / "report.md").read_text()
    assert "## trec" in text and "| bot50 | 1 | 0.450 (0.41) | 0.550 (0.64) | 0.620 (0.86) |" in text


def _validation_cells(out, last):
    """One cell per (seed, dataset, rule) whose macro-F1 climbs by 0.1 an epoch to ``last``."""
    for (seed, ds, rule), f1 in last.items():
        d = out / f"seed{seed}" / ds / rule
        d.mkdir(parents=True)
        epochs = [{"train_seconds": 10 * (k + 1), "free_macro_f1": f1 - 0.1 * (2 - k)} for k in range(3)]
        (d / "summary.json").write_text(json.dumps({"epochs": epochs}))


def test_rule_pick_needs_a_paired_gain_beyond_its_spread(tmp_path, monkeypatch):
    """Hand-made validation cells, trec seeds 0 and 1 both rules, sst5 seed 0 only ``rising`` (left out of
    the pick). Last-epoch gains of stepped over rising: +0.06 and -0.02, mean +0.02 ± 0.04: within the
    spread, so rising stays although stepped's mean is higher. With +0.03 and +0.01 (mean +0.02 ± 0.01)
    stepped is picked; one pair alone picks nothing."""
    import pick_floor_rule

    monkeypatch.setattr(pick_floor_rule, "RESULTS", tmp_path / "results" / "rule_pick")
    out = tmp_path / "runs"
    _validation_cells(out, {(0, "trec", "rising"): 0.60, (1, "trec", "rising"): 0.70,
                            (0, "trec", "stepped"): 0.66, (1, "trec", "stepped"): 0.68,
                            (0, "sst5", "rising"): 0.90})
    cells = pick_floor_rule.grid_cells([0, 1], ["trec", "sst5"])
    text = pick_floor_rule.report(out, cells)
    assert "5 of 8 cells finished" in text
    assert "over the 2 (dataset, seed) pair(s) both rules finished: rising 0.650, stepped 0.670; stepped - " \
           "rising per pair +0.060, -0.020 (mean +0.020 ± 0.040). No rule is better (the difference is " \
           "within its spread): the grid keeps **rising**" in text
    assert "| trec | stepped | 2 | 0.470 ± 0.010 | 0.570 ± 0.010 | 0.670 ± 0.010 |" in text
    assert (tmp_path / "results" / "rule_pick.md").read_text() == text
    assert "no rule is picked" in pick_floor_rule.report(out, pick_floor_rule.grid_cells([0], ["sst5"]))

    out = tmp_path / "clear"
    _validation_cells(out, {(0, "trec", "rising"): 0.60, (1, "trec", "rising"): 0.70,
                            (0, "trec", "stepped"): 0.63, (1, "trec", "stepped"): 0.71})
    assert "(mean +0.020 ± 0.010). Picked: **stepped**." in pick_floor_rule.report(out, cells)
    one = pick_floor_rule.report(out, pick_floor_rule.grid_cells([0], ["trec"]))
    assert "(mean +0.030 ± 0.000). No rule is better (one pair has no spread)" in one
