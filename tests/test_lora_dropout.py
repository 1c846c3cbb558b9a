"""bench/lora_dropout.py's report over hand-made cells: the paired differences and time ratios by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import lora_dropout  # noqa: E402


def test_report_pairs_each_seeds_two_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(lora_dropout, "REPORT", tmp_path / "report.md")
    out = tmp_path / "runs"
    cells = lora_dropout.grid_cells(["sst5", "carer"], [0, 1])
    assert cells[:3] == [("sst5", 0, "0.05"), ("sst5", 0, "0"), ("sst5", 1, "0.05")]
    made = {("sst5", 0, "0.05"): (0.40, 100.0), ("sst5", 0, "0"): (0.44, 90.0),
            ("sst5", 1, "0.05"): (0.50, 200.0), ("sst5", 1, "0"): (0.48, 160.0),
            ("carer", 0, "0.05"): (0.70, 100.0)}  # carer's seed 0 lacks its pair: no row
    for cell, (f1, secs) in made.items():
        d = out / cell[0] / f"seed{cell[1]}" / f"drop{cell[2]}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(
            {"train_seconds": secs, "fine_tuned": {"free_macro_f1": f1, "free_accuracy": f1 + 0.1}}))
    text = lora_dropout.report(out, cells)
    assert "| 0 | 0.400 | 0.440 | +0.040 | 0.500 / 0.540 | 100 / 90 | 0.90 |" in text
    assert "| 1 | 0.500 | 0.480 | -0.020 | 0.600 / 0.580 | 200 / 160 | 0.80 |" in text
    # +0.040 and -0.020: mean 0.010, half-range 0.030; time 0.90 and 0.80
    assert "Paired difference (dropout 0 minus 0.05): 0.010 ± 0.030 over 2 seed(s); training time without " \
           "dropout: 0.850 ± 0.050 of the default's." in text
    assert "## carer" not in text and (tmp_path / "report.md").read_text() == text


def test_report_pools_every_datasets_pairs(tmp_path, monkeypatch):
    monkeypatch.setattr(lora_dropout, "REPORT", tmp_path / "report.md")
    out = tmp_path / "runs"
    made = {("trec", 0, "0.05"): (0.80, 100.0), ("trec", 0, "0"): (0.82, 90.0),
            ("sst5", 0, "0.05"): (0.40, 100.0), ("sst5", 0, "0"): (0.36, 70.0)}
    for cell, (f1, secs) in made.items():
        d = out / cell[0] / f"seed{cell[1]}" / f"drop{cell[2]}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(
            {"train_seconds": secs, "fine_tuned": {"free_macro_f1": f1, "free_accuracy": f1}}))
    text = lora_dropout.report(out, lora_dropout.grid_cells(list(lora_dropout.DATASETS), [0, 1]))
    assert "## trec" in text and "## sst5" in text and "## carer" not in text
    # +0.020 and -0.040: mean -0.010, half-range 0.030; time 0.90 and 0.70: 0.800 ± 0.100
    assert "Paired difference over 2 (dataset, seed) pairs: -0.010 ± 0.030; training time without dropout: " \
           "0.800 ± 0.100 of the default's." in text
    one = lora_dropout.report(out, lora_dropout.grid_cells(["trec"], [0]))
    assert "## Every dataset" not in one
