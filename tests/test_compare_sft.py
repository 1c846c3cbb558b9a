"""bench/compare_sft.py: the order the grid runs its cells in, and its report over hand-made cells (means,
half-ranges and time ratios worked out by hand)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare_sft  # noqa: E402


def test_the_five_strategies_two_seeds_come_first():
    five = ["full", "lora-half", "bot50", "salf-half", "salf-half-narrowing"]
    assert compare_sft.grid_cells([0, 1]) == [
        *[(0, s) for s in five], *[(1, s) for s in five],
        (0, "salf-half-random"), (1, "salf-half-random"),
        (0, "lora-half-2ep-cached"), (1, "lora-half-2ep-cached")]


def _summary(train_s: float, loss: float, ppl: float, em: float | None, zero: bool = False) -> dict:
    fine = {"answer_loss": loss, "perplexity": ppl, "exact_match": em}
    return {"train_seconds": train_s, "cost_saving_ratio": 0.0, "flops_ratio": 1.0, "fine_tuned": fine,
            "zero_shot": {"answer_loss": 1.5, "perplexity": 4.4817, "exact_match": 0.02} if zero else None}


def test_report_over_hand_made_cells(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_sft, "RESULTS", tmp_path / "results")
    out = tmp_path / "runs"
    cells = {(0, "full"): _summary(100.0, 0.90, 2.46, 0.10, zero=True),
             (1, "full"): _summary(200.0, 0.80, 2.23, 0.20),
             (0, "bot50"): _summary(60.0, 0.95, 2.59, 0.05), (1, "bot50"): _summary(100.0, 0.85, 2.34, 0.15)}
    for (seed, label), s in cells.items():
        (out / f"seed{seed}" / label).mkdir(parents=True)
        (out / f"seed{seed}" / label / "summary.json").write_text(json.dumps(s))
    text = compare_sft.report(out, compare_sft.grid_cells([0, 1]))
    assert "4 of 14 cells finished" in text
    assert "| zero-shot | | 1.5000 | 4.482 | 0.02 | | | |" in text
    assert "| full | 2 | 0.850 ± 0.050 | 2.345 ± 0.115 | 0.150 ± 0.050 | 0.000 ± 0.000 | 1.000 ± 0.000 | " \
           "1.000 ± 0.000 |" in text
    # time vs full per seed: 60 / 100 = 0.6 and 100 / 200 = 0.5
    assert "| bot50 | 2 | 0.900 ± 0.050 | 2.465 ± 0.125 | 0.100 ± 0.050 | 0.000 ± 0.000 | 1.000 ± 0.000 | " \
           "0.550 ± 0.050 |" in text
    assert "lora-half" not in text.split("| zero-shot")[1]  # no row without a cell
    assert (tmp_path / "results" / "loss_vs_time.png").is_file()


def test_report_adds_the_quiet_timing_once_full_is_timed(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_sft, "RESULTS", tmp_path / "results")
    out = tmp_path / "runs"
    quiet = {"full": {"train_seconds": 200.0, "flops_ratio": 1.0, "cost_saving_ratio": 0.0},
             "lora-half": {"train_seconds": 130.0, "flops_ratio": 0.5, "cost_saving_ratio": 0.5},
             "salf-half": {"train_seconds": 100.0, "profile_seconds": 20.0, "flops_ratio": 0.62,
                           "cost_saving_ratio": 0.34}}
    cells = compare_sft.grid_cells([0])
    assert "Quiet timing" not in compare_sft.report(out, cells)  # nothing timed yet
    for label, s in quiet.items():
        if label == "full":
            continue
        (out / "quiet" / "seed0" / label).mkdir(parents=True)
        (out / "quiet" / "seed0" / label / "summary.json").write_text(json.dumps(s))
    assert "Quiet timing" not in compare_sft.report(out, cells)  # no full to compare with
    (out / "quiet" / "seed0" / "full").mkdir(parents=True)
    (out / "quiet" / "seed0" / "full" / "summary.json").write_text(json.dumps(quiet["full"]))
    text = compare_sft.report(out, cells)
    assert f"## Quiet timing: each strategy alone, one thread, {compare_sft.QUIET_LIMIT} problems" in text
    # 130 / 200; (100 + 20 profiling) / 200
    assert ("| full | 200 | 0 | 0.000 | 1.000 | 1.000 |\n| lora-half | 130 | 0 | 0.500 | 0.650 | 0.500 |\n"
            "| salf-half | 120 | 20 | 0.340 | 0.600 | 0.620 |") in text
