"""Every cell command the bench grids start is one `salf` accepts: an option a subcommand lacks fails the
whole grid at its first second (bench/lora_dropout.py's SST-5/CARER cells once did, with --discard-models,
a `compare` option, on `train`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from salf_engine.cli.commands import parse_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare_epochs  # noqa: E402
import compare_repro  # noqa: E402
import compare_sft  # noqa: E402
import lora_dropout  # noqa: E402
import pick_floor_rule  # noqa: E402


def _salf_argv(cmd: list[str]) -> list[str]:
    assert cmd[:3] == [sys.executable, "-m", "salf_engine"], cmd[:3]
    return cmd[3:]


def _grid_commands(out: Path) -> dict[str, list[list[str]]]:
    data = str(ROOT.parent / "shared" / "data")
    return {
        "lora_dropout": [lora_dropout.cell_command(out, c, data)
                         for c in lora_dropout.grid_cells(["trec", "sst5", "carer"], [0, 1])],
        "compare_epochs": [compare_epochs.cell_command(out, c, data)
                           for c in compare_epochs.grid_cells([0, 1], list(compare_epochs.DATASETS))],
        "compare_sft": [compare_sft._command(out, seed, label, 960, data, 384, zero_shot=seed == 0)
                        for seed, label in compare_sft.grid_cells([0, 1])]
        + [compare_sft.quiet_command(out / "quiet", label, data, 384) for label in compare_sft.QUIET],
        "compare_repro": [compare_repro._command("smollm2-135m", out, *c, data)
                          for c in compare_repro.cells()],
        "pick_floor_rule": [pick_floor_rule.cell_command(out, c, data)
                            for c in pick_floor_rule.grid_cells([0, 1], ["trec", "sst5"])],
    }


@pytest.mark.parametrize("grid", ["lora_dropout", "compare_epochs", "compare_sft", "compare_repro",
                                  "pick_floor_rule"])
def test_every_cell_command_parses(grid, tmp_path, capsys):
    commands = _grid_commands(tmp_path)[grid]
    assert commands
    for cmd in commands:
        try:
            args = parse_args(_salf_argv(cmd))
        except SystemExit:
            pytest.fail(f"{grid}: salf refused {cmd[3:]}: {capsys.readouterr().err.strip()}")
        assert args.output.startswith(str(tmp_path))


def test_lora_dropout_cells_set_the_dropout_they_are_named_for(tmp_path):
    for cell in lora_dropout.grid_cells(["sst5"], [1]):
        args = parse_args(_salf_argv(lora_dropout.cell_command(tmp_path, cell, "data")))
        got = (args.dataset, args.seed, args.lora_dropout, args.prefix_cache)
        assert got == ("sst5", 1, float(cell[2]), "off")


def test_rule_pick_cells_train_their_rule_and_evaluate_on_the_training_split(tmp_path):
    """Same settings as the accuracy grid's SALF[half], the cell's rule as the schedule, 500 held out of the
    training split: never the test split."""
    grid = parse_args(_salf_argv(compare_epochs.cell_command(tmp_path, (0, "trec", "rising"), "data")))
    for cell in pick_floor_rule.grid_cells([1], ["sst5"]):
        args = parse_args(_salf_argv(pick_floor_rule.cell_command(tmp_path, cell, "data")))
        assert (args.depth_schedule, args.eval_split, args.holdout_size, args.seed) == (cell[2], "holdout",
                                                                                         500, 1)
        assert (args.budget, args.infill, args.limit, args.epochs) == (grid.budget, grid.infill, 960, 3)


def test_keep_cell_copies_the_summary_and_can_discard_the_model(tmp_path):
    from bench_utils import keep_cell, restore_kept

    out, results = tmp_path / "runs", tmp_path / "results"
    cell = out / "seed0" / "full"
    (cell / "model").mkdir(parents=True)
    (cell / "model" / "weights.bin").write_bytes(b"x")
    (cell / "summary.json").write_text('{"a": 1}')
    (cell / "config.json").write_text('{"b": 2}')
    (cell / "metrics.jsonl").write_text("")
    keep_cell(out, results, cell)
    assert (cell / "model" / "weights.bin").is_file()
    keep_cell(out, results, cell, discard_models=True)
    assert not (cell / "model").exists() and (cell / "summary.json").is_file()
    kept = results / "cells" / "seed0" / "full"
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "summary.json"]
    fresh = tmp_path / "fresh"
    restore_kept(fresh, results)
    assert (fresh / "seed0" / "full" / "summary.json").read_text() == '{"a": 1}'


def test_quiet_sft_timing_trains_the_grids_settings_on_fewer_problems(tmp_path):
    args = parse_args(_salf_argv(compare_sft.quiet_command(tmp_path, "bot50", "data", 384)))
    grid_cmd = compare_sft._command(tmp_path, 0, "bot50", 960, "data", 384, zero_shot=False)
    grid = parse_args(_salf_argv(grid_cmd))
    assert (args.limit, args.eval_limit, args.exact_match_rows) == (compare_sft.QUIET_LIMIT, 8, 0)
    assert (grid.limit, grid.eval_limit, grid.exact_match_rows) == (960, 660, 100)
    differ = {k for k in vars(args) if getattr(args, k) != getattr(grid, k)}
    assert differ == {"limit", "eval_limit", "exact_match_rows"}


def _fake_cell(code: int = 0) -> list[str]:
    """A cell command that writes what ``salf train`` leaves in a finished run (and exits with ``code``)."""
    script = ("import pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); "
              "(d / 'summary.json').write_text('{}'); (d / 'config.json').write_text('{}'); "
              f"sys.exit({code})")
    return [sys.executable, "-c", script]


def test_run_grid_resumes_restarts_and_keeps_the_finished_cells(tmp_path):
    from bench_utils import run_grid

    out, results = tmp_path / "runs", tmp_path / "results"
    (out / "a").mkdir(parents=True)
    (out / "a" / "summary.json").write_text('{"old": 1}')  # finished by an earlier run
    (out / "b").mkdir()
    (out / "b" / "partial.bin").write_bytes(b"x")  # left by a killed run
    bad = ["c"]
    seen: list[str] = []
    failed = run_grid(["a", "b", "c", "d"], lambda cell: out / cell,
                      lambda cell: [*_fake_cell(1 if cell in bad else 0), str(out / cell)], out, results,
                      workers=1, after=seen.append)
    assert failed == ["c"] and seen == ["b", "d"]
    assert (out / "a" / "summary.json").read_text() == '{"old": 1}'  # not run again
    assert not (out / "b" / "partial.bin").exists()  # restarted from nothing
    assert sorted(p.name for p in (results / "cells").iterdir()) == ["b", "d"]
    assert sorted(p.name for p in (results / "cells" / "d").iterdir()) == ["config.json", "summary.json"]


def test_run_grid_keeps_a_resumable_cells_partial_work_and_starts_nothing_past_its_hours(tmp_path):
    from bench_utils import run_grid

    out, results = tmp_path / "runs", tmp_path / "results"
    (out / "a").mkdir(parents=True)
    (out / "a" / "partial.bin").write_bytes(b"x")
    run_grid(["a"], lambda cell: out / cell, lambda cell: [*_fake_cell(), str(out / cell)], out, results,
             workers=1, restart=False)
    assert (out / "a" / "partial.bin").is_file() and (results / "cells" / "a" / "summary.json").is_file()
    assert run_grid(["b", "c"], lambda cell: out / cell, lambda cell: [*_fake_cell(), str(out / cell)], out,
                    results, workers=2, start_within=0) == []
    assert not (out / "b").exists() and not (out / "c").exists()


def test_resume_grid_restores_runs_reports_and_fails_on_a_failed_cell(tmp_path, capsys):
    """A committed cell comes back and is not rerun; ``--report-only`` runs nothing; a failed cell gives 1;
    the report is printed (and rewritten after each finished cell)."""
    import argparse

    from bench_utils import resume_grid

    out, results = tmp_path / "runs", tmp_path / "results"
    (results / "cells" / "a").mkdir(parents=True)
    for name in ("summary.json", "config.json"):
        (results / "cells" / "a" / name).write_text('{"kept": 1}')
    reports: list[int] = []

    def report() -> str:
        reports.append(1)
        return f"report: {sorted(p.name for p in out.iterdir() if (p / 'summary.json').is_file())}"

    def run(report_only, bad=()):
        args = argparse.Namespace(report_only=report_only, workers=1, start_within=None)
        return resume_grid(args, ["a", "b", "c"], lambda cell: out / cell,
                           lambda cell: [*_fake_cell(1 if cell in bad else 0), str(out / cell)], out,
                           results, report)

    assert run(report_only=True) == 0 and reports == [1]
    assert capsys.readouterr().out.strip() == "report: ['a']"
    assert (out / "a" / "summary.json").read_text() == '{"kept": 1}'
    assert run(report_only=False, bad=["c"]) == 1
    # the runner's progress lines, then the report (c wrote its summary, then failed)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "report: ['a', 'b', 'c']"
    assert len(reports) == 3 and (out / "a" / "summary.json").read_text() == '{"kept": 1}'
    assert sorted(p.name for p in (results / "cells").iterdir()) == ["a", "b"]
