"""`salf compare`: grid tables equal the cells' summaries, resume, pristine weights per cell, bad input."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from salf_engine.cli.commands import main
from salf_engine.errors import ConfigError
from salf_engine.experiments.compare import CompareSettings, parse_strategy, run_compare

STRATEGIES = "bot50,full,salf:uniform:df"
CELL_DIRS = {"bot50": "bot50", "full": "full", "salf:uniform:df": "salf_uniform_df"}
SHARED = ["--limit", "12", "--eval-limit", "8", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3",
          "--eval-batch-size", "8", "--max-length", "64", "--quiet"]


def _emotion_dir(tmp_path: Path) -> Path:
    """A generic CSV dataset (train.csv + test.csv) whose label words are in the tiny vocabulary."""
    root = tmp_path / "emo"
    root.mkdir()
    rows = {"joy": "i feel happy", "sadness": "i am sad", "anger": "they are angry"}
    for split, n in (("train", 6), ("test", 4)):
        with open(root / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            for i in range(n):
                for label, text in rows.items():
                    w.writerow([f"{text} {'very ' * (i % 3)}today", label])
    return root


def _grid_args(model: Path, emo: Path, out: Path, strategies: str = STRATEGIES) -> list[str]:
    return ["compare", "--model", str(model), "--datasets", f"trec,{emo}", "--strategies", strategies,
            "--output", str(out), *SHARED]


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _summary(out: Path, dataset: str, strategy: str) -> dict:
    return json.loads((out / "cells" / dataset / CELL_DIRS[strategy] / "summary.json").read_text())


class _CountingTrain:
    """Wraps the real `train`: records (dataset dir, strategy dir) per call; optionally fails one cell."""

    def __init__(self, real, fail: tuple[str, str] | None = None) -> None:
        self.real, self.fail, self.calls = real, fail, []

    def __call__(self, config, **kwargs):
        path = Path(config.output)
        key = (path.parent.name, path.name)
        self.calls.append(key)
        if key == self.fail:
            # a partial run directory, as an interrupted training leaves it
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.json").write_text("{}")
            (path / "metrics.jsonl").write_text('{"step": 1}\n')
            raise RuntimeError("simulated interruption")
        return self.real(config, **kwargs)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_dir):
    """One finished 2-dataset x 3-strategy grid on a tiny llama (shared by the read-only tests)."""
    tmp = tmp_path_factory.mktemp("grid")
    model, emo, out = tiny_dir("llama"), _emotion_dir(tmp), tmp / "out"
    assert main(_grid_args(model, emo, out) + ["--discard-models"]) == 0
    return model, emo, out


def test_tables_match_cell_summaries(grid):
    _model, _emo, out = grid
    datasets, strategies = ["trec", "emo"], ["bot50", "full", "salf:uniform:df"]
    keys = {"f1_free": "free_macro_f1", "f1_restricted": "restricted_macro_f1",
            "accuracy_free": "free_accuracy", "accuracy_restricted": "restricted_accuracy"}
    for table, key in keys.items():
        rows = _read_csv(out / f"{table}.csv")
        assert rows[0] == ["strategy", *datasets, "average"]
        assert [r[0] for r in rows[1:]] == ["zero-shot", *strategies]
        for row in rows[2:]:
            values = [float(v) for v in row[1:]]
            expected = [_summary(out, d, row[0])["fine_tuned"][key] for d in datasets]
            assert values[:2] == expected
            assert values[2] == pytest.approx(sum(expected) / 2)
        zs = [json.loads((out / "cells" / d / "zero_shot.json").read_text())["scores"][key] for d in datasets]
        assert [float(v) for v in rows[1][1:3]] == zs
        md = (out / f"{table}.md").read_text().splitlines()
        body = [line for line in md if line.startswith("| ") and not line.startswith("| strategy")]
        assert [line.split(" | ")[0][2:] for line in body] == ["zero-shot", *strategies]
        assert f"{float(rows[2][1]):.4f}" in body[1]

    cost = _read_csv(out / "cost_saving.csv")
    assert cost[0] == ["strategy", *datasets, "average"]
    assert [r[0] for r in cost[1:]] == strategies            # no zero-shot row in the cost table
    by_name = {r[0]: [float(v) for v in r[1:]] for r in cost[1:]}
    assert by_name["full"] == [0.0, 0.0, 0.0]
    assert by_name["bot50"] == [0.5, 0.5, 0.5]               # 2 of the tiny model's 4 layers frozen
    for s in strategies:
        assert by_name[s][:2] == [_summary(out, d, s)["cost_saving_ratio"] for d in datasets]
    # honest cost: FLOPs estimate and wall time against the same dataset's full cell
    flops = {r[0]: [float(v) for v in r[1:]] for r in _read_csv(out / "flops_ratio.csv")[1:]}
    assert flops["full"][:2] == [1.0, 1.0]
    assert flops["bot50"][:2] == [pytest.approx((4 + 2 * 2) / 12)] * 2   # forward 4 + backward of 2 layers
    times = {r[0]: [float(v) for v in r[1:]] for r in _read_csv(out / "time_ratio.csv")[1:]}
    assert times["full"][:2] == [1.0, 1.0]
    for d, got in zip(datasets, times["salf:uniform:df"], strict=False):
        mine, full = _summary(out, d, "salf:uniform:df"), _summary(out, d, "full")
        seconds = [s["train_seconds"] + s["profile_seconds"] for s in (mine, full)]
        assert got == pytest.approx(seconds[0] / seconds[1])
    assert len(_read_csv(out / "cells.csv")) == 1 + 6
    for png in ("f1_vs_cost.png", "f1_bars.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "6 of 6 cells finished" in (out / "tables.md").read_text()
    assert not (out / "cells" / "trec" / "full" / "model").exists()      # --discard-models


def test_every_cell_starts_from_pristine_weights(grid, tmp_path):
    """`full` ran after `bot50` trained a copy of the same model: a fresh single-cell grid matches it."""
    model, emo, out = grid
    alone = tmp_path / "alone"
    assert main(_grid_args(model, emo, alone, strategies="full") + ["--no-zero-shot"]) == 0
    for d in ("trec", "emo"):
        a, b = _summary(out, d, "full"), _summary(alone, d, "full")
        assert a["loss_history"] == b["loss_history"]
        assert a["fine_tuned"] == b["fine_tuned"]


def test_resume_runs_only_missing_cells(tiny_dir, tmp_path, monkeypatch):
    import salf_engine.training.recipe as train_module

    model, emo, out = tiny_dir("llama"), _emotion_dir(tmp_path), tmp_path / "out"
    real = train_module.train
    first = _CountingTrain(real, fail=("emo", "full"))
    monkeypatch.setattr(train_module, "train", first)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        main(_grid_args(model, emo, out))
    # datasets outer, strategies inner: the grid stopped at the failing cell
    assert first.calls == [("trec", "bot50"), ("trec", "full"), ("trec", "salf_uniform_df"), ("emo", "bot50"),
                           ("emo", "full")]
    rows = _read_csv(out / "f1_free.csv")      # the tables of the finished cells were still written
    assert rows[3][0] == "full" and rows[3][1] != "" and rows[3][2] == ""
    zs_mtime = (out / "cells" / "emo" / "zero_shot.json").stat().st_mtime_ns
    kept = _summary(out, "trec", "bot50")

    (out / "cells" / "trec" / "full" / "summary.json").unlink()
    second = _CountingTrain(real)
    monkeypatch.setattr(train_module, "train", second)
    assert main(_grid_args(model, emo, out)) == 0
    assert second.calls == [("trec", "full"), ("emo", "full"), ("emo", "salf_uniform_df")]
    assert _summary(out, "trec", "bot50") == kept
    assert (out / "cells" / "emo" / "zero_shot.json").stat().st_mtime_ns == zs_mtime
    redone = out / "cells" / "emo" / "full"
    assert json.loads((redone / "config.json").read_text())["strategy"] == "full"   # partial dir replaced
    assert all(r[1] and r[2] for r in _read_csv(out / "f1_free.csv")[1:])

    third = _CountingTrain(real)
    monkeypatch.setattr(train_module, "train", third)
    assert main(_grid_args(model, emo, out)) == 0
    assert third.calls == []
    # finished cells with other settings are not silently mixed into the tables
    with pytest.raises(ConfigError, match="max_steps"):
        run_compare(CompareSettings(model=str(model), datasets=["trec"], strategies=["full"], output=str(out),
                                    train={"limit": 12, "eval_limit": 8, "max_steps": 3, "batch_size": 4,
                                           "lr": 1e-3, "eval_batch_size": 8, "max_length": 64}),
                    progress=False, log=None)
    assert third.calls == []


@pytest.mark.parametrize(
    ("datasets", "strategies", "message"),
    [
        ("trec", "full,salf-magic", "unknown strategy 'salf-magic'.*valid strategies: full, lora-full"),
        ("trec,imdb", "full", "unknown dataset 'imdb'.*valid presets: trec, sst5, carer"),
        ("trec", " , ", "list of strategies is empty"),
        (",", "full", "list of datasets is empty"),
        ("trec", "salf:fast", "unknown option 'fast'"),
        ("trec", "bot50:uniform", "budget plan only applies to strategy 'salf'"),
        ("trec", "salf:df", "infilling order needs a budget plan"),
        ("trec", "bot50:0.3", "contradicts"),
        ("trec", "full,salf:half:df,salf:uniform:df", "strategy listed twice: salf:uniform:df"),
    ],
)
def test_bad_input_fails_before_anything_runs(tmp_path, monkeypatch, capsys, datasets, strategies, message):
    import salf_engine.experiments.compare as compare_module
    import salf_engine.training.recipe as train_module

    def boom(*_a, **_k):
        raise AssertionError("nothing may run for a bad grid")

    monkeypatch.setattr(train_module, "train", boom)
    monkeypatch.setattr(compare_module, "load_model", boom)
    out = tmp_path / "out"
    rc = main(["compare", "--model", "tiny", "--datasets", datasets, "--strategies", strategies,
               "--output", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    import re

    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize(("text", "shared", "label", "schedule"), [
    ("salf", {}, "salf-uniform-bf-narrowing", None),               # the default (issue 38)
    ("salf:none", {}, "salf", None),                               # Algorithm 3
    ("salf:uniform:df", {}, "salf-uniform-df", "per-row"),         # SALF[half] by eof rank, as always
    ("salf:geom:bf", {}, "salf-geom-bf", "per-row"),
    ("salf:uniform:df:narrowing", {}, "salf-uniform-df-narrowing", "narrowing"),
    ("salf:uniform:df", {"depth_schedule": "mixed"}, "salf-uniform-df", "mixed"),  # the shared one wins
    ("bot50", {}, "bot50", None),
])
def test_cell_strategies_after_the_default_changed(text, shared, label, schedule):
    from salf_engine.experiments.grid import DatasetCell
    from salf_engine.schedule.strategies import strategy_from_config

    settings = CompareSettings(model="m", datasets=["trec"], strategies=[text], output="out",
                               train={"depth_schedule": None, **shared})
    cfg = settings.cell_config(DatasetCell("trec", "trec"), parse_strategy(text))
    strategy = strategy_from_config(cfg)
    assert (strategy.label, cfg.depth_schedule) == (label, schedule)
    assert strategy.needs_profile == (label in ("salf", "salf-uniform-df", "salf-geom-bf"))


def test_cell_syntax():
    assert parse_strategy("salf").label == "salf"
    assert parse_strategy("salf:half:df").label == "salf:uniform:df"
    assert parse_strategy("salf:geom").label == "salf:geom:bf"
    assert parse_strategy("salf:none").label == "salf:none"
    cell = parse_strategy("bot:0.3:lora")
    got = (cell.strategy, cell.freeze_fraction, cell.lora, cell.dirname)
    assert got == ("bot", 0.3, True, "bot_0.3_lora")
    with pytest.raises(ConfigError, match="more than one budget"):
        parse_strategy("salf:uniform:geom")
    cell = parse_strategy("salf:arith:df:paper")
    assert cell.config_fields()["depth_schedule"] == "paper" and cell.label == "salf:arith:df:paper"
    cell = parse_strategy("salf:uniform:eof-match:cuts2")
    assert (cell.assignment, cell.cuts_per_step) == ("eof-match", 2)
    assert cell.label == "salf:uniform:bf:eof-match:cuts2"
    # cuts per step are micro-batches of one cut each: the cell runs the mixed schedule
    assert cell.config_fields()["depth_schedule"] == "mixed" and cell.config_fields()["cuts_per_step"] == 2
    assert "depth_schedule" not in parse_strategy("salf:uniform:df").config_fields()  # per-row default
    with pytest.raises(ConfigError, match="depth schedule 'paper' needs the budget plan named"):
        parse_strategy("salf:paper")
    cell = parse_strategy("salf:uniform:df:narrowing")
    assert cell.config_fields()["depth_schedule"] == "narrowing"
    assert cell.dirname == "salf_uniform_df_narrowing"
    assert parse_strategy("salf:geom:widening").label == "salf:geom:bf:widening"
    assert parse_strategy("salf:uniform:loss-rank").config_fields()["depth_assignment"] == "loss-rank"
    with pytest.raises(ConfigError, match="'loss-rank' assignment"):
        parse_strategy("salf:uniform:narrowing:loss-rank")
    with pytest.raises(ConfigError, match="unknown option 'cuts0'"):
        parse_strategy("salf:uniform:cuts0")
    cell = parse_strategy("bot50:ep3")
    assert (cell.label, cell.dirname, cell.config_fields()["epochs"]) == ("bot50:ep3", "bot50_ep3", 3)
    assert "epochs" not in parse_strategy("bot50").config_fields()
    assert parse_strategy("salf:uniform:df:rising:ep2").label == "salf:uniform:df:rising:ep2"
    with pytest.raises(ConfigError, match="unknown option 'ep0'"):
        parse_strategy("bot50:ep0")
    with pytest.raises(ConfigError, match="more than one epoch count"):
        parse_strategy("bot50:ep2:ep3")


def test_a_cell_with_its_own_epochs():
    from salf_engine.experiments.grid import DatasetCell

    settings = CompareSettings(model="m", datasets=["trec"], strategies=["bot50:ep3", "full"], output="out",
                               train={"epochs": 1})
    trec = DatasetCell("trec", "trec")
    assert settings.cell_config(trec, parse_strategy("bot50:ep3")).epochs == 3
    assert settings.cell_config(trec, parse_strategy("full")).epochs == 1
    fixed = CompareSettings(model="m", datasets=["trec"], strategies=["bot50:ep3"], output="out",
                            train={"max_steps": 4})
    with pytest.raises(ConfigError, match=r"^cell 'bot50:ep3' sets its epochs, but --max-steps"):
        fixed.cell_config(trec, parse_strategy("bot50:ep3"))


def test_help_documents_the_cell_syntax(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "salf:uniform:df" in text and "NAME[:OPTION]" in text and "lift-star-half" in text


def _settings(model: Path, out: Path) -> CompareSettings:
    train = {"limit": 12, "eval_limit": 8, "max_steps": 6, "batch_size": 4, "lr": 1e-3, "eval_batch_size": 8,
             "max_length": 64, "save_every": 2}
    return CompareSettings(model=str(model), datasets=["trec"], strategies=["salf:uniform:df"],
                           output=str(out), zero_shot=False, train=train)


@pytest.mark.usefixtures("one_thread")
def test_interrupted_cell_resumes_from_its_checkpoint(tiny_dir, tmp_path, monkeypatch, interrupt_after):
    """A cell killed mid-training goes on from its checkpoint on the next run (not from step 0)."""
    import salf_engine.experiments.compare as compare_module
    import salf_engine.training.recipe as train_module

    monkeypatch.setattr(compare_module, "_finish", lambda *_a: None)  # no tables / plots: not under test
    model, out = tiny_dir("llama"), tmp_path / "out"
    with interrupt_after(train_module, "optimizer_step", 3):  # interrupted in step 4
        run_compare(_settings(model, out), progress=False, log=None)
    cell = out / "cells" / "trec" / CELL_DIRS["salf:uniform:df"]
    assert (cell / "checkpoints" / "step-00000002").is_dir() and not (cell / "summary.json").exists()
    before = [json.loads(line)["loss"] for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert len(before) == 3

    seen = []
    real_train = train_module.train
    monkeypatch.setattr(train_module, "train",
                        lambda cfg, **kw: seen.append(kw["resume"]) or real_train(cfg, **kw))
    run_compare(replace(_settings(model, out), discard_models=True), progress=False, log=None)
    assert seen == [True]
    assert not (cell / "checkpoints").exists() and not (cell / "model").exists()  # finished: discarded
    got = _summary(out, "trec", "salf:uniform:df")
    assert got["steps"] == 6 and got["loss_history"][:3] == before  # steps 1-2 restored, 3 redone alike
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
