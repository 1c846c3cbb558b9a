"""The single-class guard (issue 38): hand-made prediction lists, the printed warning, and a tiny run's
summary.json."""

from __future__ import annotations

import io
import json

import pytest

from salf_engine.cli import commands as cli
from salf_engine.evaluation import classification
from salf_engine.evaluation.classification import (
    SINGLE_CLASS_SHARE,
    EvalReport,
    score_predictions,
    single_class,
)
from salf_engine.experiments.report import print_summary

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fires_on_one_class_and_names_its_share():
    preds = [1] * 96 + [0] * 4  # 96 % "pos"
    assert single_class(preds, ["neg", "pos"]) == {"class": "pos", "share": pytest.approx(0.96)}
    assert single_class([2] * 20, ["a", "b", "c"]) == {"class": "c", "share": 1.0}


def test_silent_on_balanced_below_threshold_and_one_class_data():
    assert single_class([0, 1] * 50, ["neg", "pos"]) is None
    assert single_class([1] * 94 + [0] * 6, ["neg", "pos"]) is None  # 0.94 < 0.95
    assert SINGLE_CLASS_SHARE == 0.95
    assert single_class([0] * 10, ["only"]) is None  # the data has no other class
    assert single_class([], ["neg", "pos"]) is None
    # non-label predictions (-1) are no class, but count in the share's denominator
    assert single_class([-1] * 10 + [0] * 90, ["neg", "pos"]) is None
    assert single_class([-1] * 10, ["neg", "pos"]) is None


def _report(free: list[int], restricted: list[int], classes: list[str]) -> EvalReport:
    gold = [i % len(classes) for i in range(len(free))]
    return EvalReport(num_examples=len(free), classes=classes, free=score_predictions(gold, free, classes),
                      restricted=score_predictions(gold, restricted, classes), free_predictions=free,
                      restricted_predictions=restricted)


def _summary(fine: dict) -> dict:
    return {"model": "m", "dataset": "d", "strategy": "salf", "steps": 1, "examples_trained": 8,
            "num_eval_examples": 100, "fine_tuned": fine, "train_seconds": 1.0, "total_seconds": 1.0,
            "cost_saving_ratio": 0.5, "profiled_examples": 0, "flops_ratio": 0.7}


def test_report_summary_records_it_and_print_summary_warns():
    classes = ["neg", "pos"]
    collapsed = _report([0] * 97 + [-1] * 3, [0] * 100, classes).summary()
    assert collapsed["single_class"] == {"class": "neg", "share": pytest.approx(0.97), "decoding": "free"}
    # free decoding spread over non-label tokens, the label-restricted argmax still one class
    restricted = _report([0] * 50 + [-1] * 50, [1] * 99 + [0], classes).summary()
    assert restricted["single_class"] == {"class": "pos", "share": pytest.approx(0.99),
                                          "decoding": "restricted"}
    balanced = _report([0, 1] * 50, [0, 1] * 50, classes).summary()
    assert balanced["single_class"] is None

    out = io.StringIO()
    print_summary(_summary(collapsed), out=out)
    warning = [line for line in out.getvalue().splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "'neg'" in warning[0] and "97.0%" in warning[0], warning
    out = io.StringIO()
    print_summary(_summary(balanced), out=out)
    assert "WARNING" not in out.getvalue()


def test_tiny_run_records_it_in_summary_json(tiny_dir, tmp_path, capsys, monkeypatch):
    # a share of 0 makes every run "single class": what is checked is that the guard reaches the run's
    # summary.json and its printed summary
    monkeypatch.setattr(classification, "SINGLE_CLASS_SHARE", 0.0)
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dir("llama")), "--dataset", "trec", "--limit", "16", "--eval-limit",
            "12", "--max-steps", "1", "--batch-size", "8", "--strategy", "full", "--no-zero-shot", "--quiet",
            "--output", str(run)]
    assert cli.main(argv) == 0
    got = json.loads((run / "summary.json").read_text())["fine_tuned"]["single_class"]
    assert got["decoding"] in ("free", "restricted") and 0 < got["share"] <= 1
    assert got["class"] in {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    assert "WARNING: the fine-tuned model predicts one class" in capsys.readouterr().out
