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
    "bot50": [(45, 0.45), (70, 0.55), (95, 0.62)],  # 3 epochs within 100 s: 0.62
    "lora-half": [(50, 0.40), (80, 0.50), (110, 0.58)],  # within 100 s: epoch 2, 0.50
    "narrowing": [(65, 0.48), (130, 0.58), (195, 0.66)],  # within 200 s: all three, 0.66
    "rising": [(60, 0.50), (100, 0.59), (130, 0.63)],  # within 100 s: epoch 2 (100 <= 100), 0.59
}


def test_best_within_takes_the_last_epoch_that_fits():
    assert compare_epochs.best_within(CURVES["rising"], 100) == (2, 0.59)
    assert compare_epochs.best_within(CURVES["full"], 99) is None


def test_report_names_the_most_accurate_at_each_budget(tmp_path, monkeypatch):
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
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "epoch" in line
            and "of full" in line}
    one, two = rows["1 epoch of full"], rows["2 epochs of full"]
    assert one.split(" | ")[2:] == ["0.500", "0.620", "0.500", "0.480", "0.590", "bot50 |"]
    assert two.split(" | ")[2:] == ["0.600", "0.620", "0.580", "0.660", "0.630", "narrowing |"]
    assert "| bot50 | 1 | 0.450 (0.45) | 0.550 (0.70) | 0.620 (0.95) |" in text
    assert (tmp_path / "results" / "f1_vs_time.png").is_file()
