"""Every CLI option that is a TrainConfig field is generated from it; ``--config`` files round-trip."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from salf_engine.cli import commands as cli
from salf_engine.cli.options import config_fields, field_option, fields_from_args
from salf_engine.config import TrainConfig, field_choices
from salf_engine.errors import ConfigError

# Defaults a command sets on purpose (documented in cli.py): eval / profile read the dataset (and profile
# the model) from a run directory when they are not given; required fields have no default.
COMMAND_DEFAULTS = {"eval": {"dataset": None}, "profile": {"dataset": None, "model": None}}


def _field_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    generated = set(parser.get_default("_salf_fields") or ())
    return {a.dest: a for a in parser._actions if a.dest in generated}


@pytest.mark.parametrize("command", ["train", "eval", "profile", "compare"])
def test_each_option_matches_its_config_field(command):
    parser = cli.build_parser().commands[command]
    actions = _field_actions(parser)
    assert actions, command
    fields = config_fields()
    required = set(parser.get_default("_salf_required") or ())
    choices = field_choices()
    for name, action in actions.items():
        f = fields[name]
        spec = field_option(name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        expected_default = None if name in required else COMMAND_DEFAULTS.get(command, {}).get(name, default)
        assert action.default == expected_default, (command, name)
        canonical = f.metadata.get("flag") or "--" + name.replace("_", "-")
        assert canonical in action.option_strings, (command, name)
        assert f.metadata.get("help"), f"{name} has no help text"
        if spec["kind"] == "bool":
            kind = argparse._StoreFalseAction if default else argparse._StoreTrueAction
            assert isinstance(action, kind), (command, name)
            continue
        assert action.type is spec["type"], (command, name)
        assert tuple(action.choices or ()) == (choices[name][0] if name in choices else ()), (command, name)
        assert (action.nargs == "+") == (spec["kind"] == "list"), (command, name)
        own = f.metadata["help"].lower()  # a help that says what its default does gets no second one
        assert str(expected_default if expected_default is not None else "none") in action.help or \
            "default" in own or name in required or spec["kind"] == "list", (command, name, action.help)
        assert action.help.lower().count("default") <= 1, (command, name, action.help)


def test_train_takes_every_field_and_compare_all_but_the_per_cell_ones():
    parser = cli.build_parser()
    assert set(_field_actions(parser.commands["train"])) == set(config_fields())
    assert set(_field_actions(parser.commands["compare"])) == set(config_fields()) - set(cli.COMPARE_PER_CELL)


def test_existing_spellings_still_parse():
    args = cli.parse_args(["train", "--model", "m", "--output", "o", "--no-zero-shot", "--lora-alpha", "32",
                           "--lora-target-modules", "q_proj", "v_proj", "--lr", "1e-3", "--limit", "5"])
    cfg = TrainConfig(**fields_from_args(args)).validate()
    assert (cfg.zero_shot_eval, cfg.lora_alpha, cfg.lora_target_modules, cfg.lr, cfg.limit) == (
        False, 32, ["q_proj", "v_proj"], 1e-3, 5)
    assert isinstance(cfg.lora_alpha, int)
    args = cli.parse_args(["eval", "--model", "m", "--split", "validation", "--limit", "7",
                           "--batch-size", "4"])
    assert (args.eval_split, args.eval_limit, args.eval_batch_size) == ("validation", 7, 4)


def _custom() -> TrainConfig:
    return TrainConfig(model="tiny", dataset="sst5", strategy="bot50", budget=None, metric="ce", lr=2e-4,
                       limit=40, lora=True, lora_alpha=8, lora_target_modules=["q_proj"],
                       zero_shot_eval=False, max_grad_norm=None, eval_fraction=0.2, output="runs/x",
                       seed=3).validate()


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_round_trip(tmp_path, suffix):
    cfg = _custom()
    path = tmp_path / f"config{suffix}"
    if suffix == ".json":
        cfg.to_json(path)  # what a run directory's config.json holds
    else:
        path.write_text(yaml.safe_dump(cfg.to_dict()))
    args = cli.parse_args(["train", "--config", str(path)])
    assert TrainConfig(**fields_from_args(args)).validate() == cfg


def test_command_line_overrides_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\noutput: runs/y\nlr: 1e-4\nseed: 5\nmetric: rank\n")
    args = cli.parse_args(["train", "--config", str(path), "--seed", "9", "--metric", "cosine"])
    cfg = TrainConfig(**fields_from_args(args)).validate()
    assert (cfg.model, cfg.output, cfg.seed, cfg.metric) == ("tiny", "runs/y", 9, "cosine")
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)  # YAML reads 1e-4 as text; the field type decides


def test_compare_takes_the_shared_fields_of_a_run_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    _custom().to_json(path)
    args = cli.parse_args(["compare", "--config", str(path), "--datasets", "trec", "--strategies", "full",
                           "--output", str(tmp_path / "grid")])
    assert args.model == "tiny" and args.metric == "ce" and args.output == str(tmp_path / "grid")
    assert "dataset" not in fields_from_args(args)
    assert "not used by this command" in capsys.readouterr().err


@pytest.mark.parametrize("text, needle", [("{\"no_such_option\": 1}", "no_such_option"),
                                          ("[1, 2]", "mapping"), ("{bad json", "not valid JSON")])
def test_bad_config_file_is_one_line(tmp_path, capsys, text, needle):
    path = tmp_path / "c.json"
    path.write_text(text)
    assert cli.main(["train", "--config", str(path), "--model", "m", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1]


def test_required_field_missing_everywhere_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--model", "m"])
    assert exc.value.code == 2
    assert "--output" in capsys.readouterr().err


@pytest.mark.parametrize("first", ["api", "module"])
def test_public_functions_do_not_shadow_submodules(first):
    """`salf_engine.train` (the function) and `salf_engine.training` (the package) resolve in any order."""
    steps = ["assert callable(salf_engine.train) and "
             "salf_engine.train.__module__ == 'salf_engine.training.recipe'",
             "import salf_engine.training as t, salf_engine.evaluation as e; "
             "import salf_engine.training.recipe as r, salf_engine.evaluation.classification as c; "
             "assert t.__name__ == 'salf_engine.training' and e.__name__ == 'salf_engine.evaluation'; "
             "assert r.train is salf_engine.train and c.evaluate is salf_engine.evaluate"]
    if first == "module":
        steps.reverse()
    code = "import salf_engine; " + "; ".join(steps) + "; assert callable(salf_engine.evaluate)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_no_public_name_is_a_submodule_name():
    import pkgutil

    import salf_engine

    modules = {m.name for m in pkgutil.iter_modules(salf_engine.__path__)}
    assert not modules & set(salf_engine.__all__)


def test_train_help_shows_defaults():
    text = cli.build_parser().commands["train"].format_help()
    for needle in ("(default: 8)", "(default: cosine)", "{cosine,ce,rank}", "--config FILE", "(required)",
                   "for LoRA)", "(none: all)"):
        assert needle in text, needle
    flat = " ".join(text.split())
    for twice in ("(default: none) (default: none)", "for LoRA) (default", "(none: all) (default"):
        assert twice not in flat, twice


@pytest.mark.parametrize(("line", "label"), [
    ([], "salf-uniform-bf-narrowing"),                                    # the default (issue 38)
    (["--budget", "uniform"], "salf-uniform-bf-narrowing"),
    (["--budget", "none"], "salf"),                                       # Algorithm 3
    (["--budget", "uniform", "--depth-schedule", "per-row"], "salf-uniform-bf"),  # SALF[half] by eof rank
    (["--profile-fraction", "1"], "salf-uniform-bf"),
    (["--depth-assignment", "eof-match"], "salf-uniform-bf"),
    (["--budget", "geom", "--cut-levels", "2"], "salf-geom-bf"),
    (["--budget", "uniform", "--depth-schedule", "narrowing", "--cut-levels", "2"],
     "salf-uniform-bf-narrowing"),
], ids=str)
def test_cli_strategy_salf_resolves_to_the_default(line, label):
    from salf_engine.schedule.strategies import strategy_from_config

    args = cli.parse_args(["train", "--model", "m", "--output", "o", "--strategy", "salf", *line])
    assert strategy_from_config(TrainConfig(**fields_from_args(args)).validate()).label == label
    flat = " ".join(cli.build_parser().commands["train"].format_help().split())
    assert "SALF budget plan (default: uniform, SALF[half]; none: Algorithm 3" in flat
    assert "default: narrowing for salf, per-row with --budget none" in flat


def test_a_run_saved_before_the_default_changed_does_not_resume_as_another_strategy(tmp_path):
    """A config.json with no budget and the per-row schedule ran Algorithm 3: --resume refuses it until
    --budget none says so, and the new default differs from it by name."""
    from salf_engine.training.inputs import check_resume

    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(model="tiny", output=str(run)).to_dict()
    saved.update(budget=None, depth_schedule="per-row", depth_assignment="class-rank")  # as written before
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="needs the budget plan named: --budget none for Algorithm 3"):
        TrainConfig(**fields_from_args(cli.parse_args(["train", "--resume", str(run)]))).validate()
    args = cli.parse_args(["train", "--resume", str(run), "--budget", "none"])
    check_resume(TrainConfig(**fields_from_args(args)).validate())  # the same run: no difference
    with pytest.raises(ConfigError, match="budget: 'none' -> 'uniform'; .*depth_schedule: 'per-row' -> "
                                          "'narrowing'"):
        check_resume(TrainConfig(model="tiny", output=str(run)).validate())


def test_run_directory_config_round_trips(tmp_path):
    """A config.json as `train` writes it resolves, through --config, to the same TrainConfig."""
    cfg = _custom()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    args = cli.parse_args(["train", "--config", str(Path(run) / "config.json")])
    assert TrainConfig(**fields_from_args(args)) == TrainConfig.from_json(run / "config.json")


def test_compare_grid_from_a_config_file(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("model: tiny\ndatasets: [trec, sst5]\nstrategies: full,salf\noutput: g\nlimit: 96\n")
    args = cli.parse_args(["compare", "--config", str(path)])
    assert (args.datasets, args.strategies, args.output) == (["trec", "sst5"], "full,salf", "g")
    assert args.limit == 96
    args = cli.parse_args(["compare", "--config", str(path), "--datasets", "carer", "--limit", "8"])
    assert args.datasets == ["carer"] and args.limit == 8  # the command line replaces the file's list


def test_compare_without_a_grid_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--model", "m", "--output", "g"])
    assert "--datasets" in capsys.readouterr().err


def test_a_run_config_never_sets_where_eval_and_profile_write(tmp_path):
    path = tmp_path / "config.json"
    _custom().to_json(path)  # holds output: runs/x, the run directory
    args = cli.parse_args(["eval", "--config", str(path)])
    assert args.model == "tiny" and args.dataset == "sst5" and args.report is None
    args = cli.parse_args(["profile", "--config", str(path)])
    assert args.metric == "ce" and args.out_dir is None


@pytest.mark.parametrize(("fields", "needle"), [
    (dict(strategy="salf", cuts_per_step=2), "cuts_per_step counts the micro-batches of the 'mixed'"),
    (dict(strategy="bot50", cut_levels=2), "cut_levels rounds the per-row schedule's depths"),
    (dict(strategy="salf", budget="none", depth_schedule="mixed", cut_levels=2),
     "cut_levels rounds the per-row"),
    (dict(strategy="salf", cut_levels=0), "cut_levels must be a positive integer"),
])
def test_step_layout_options_that_would_do_nothing_are_refused(fields, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        TrainConfig(**fields).validate()
    # what each of them means, spelled so, is valid
    TrainConfig(strategy="salf", budget="none", depth_schedule="mixed", cuts_per_step=2).validate()
    TrainConfig(strategy="salf", cut_levels=2).validate()
    TrainConfig(strategy="lift-star-half", cuts_per_step=2).validate()  # LIFT's rotation has micro-batches


def test_adt_steps_is_a_config_field_that_reaches_the_strategy():
    from salf_engine.schedule.strategies import strategy_from_config

    assert strategy_from_config(TrainConfig(strategy="adt-high", adt_steps=3)).warmup_steps == 3
    assert strategy_from_config(TrainConfig(strategy="adt-low")).warmup_steps == 5  # the paper's 5
    with pytest.raises(ConfigError, match="adt_steps must be a positive integer, got 0"):
        TrainConfig(strategy="adt-low", adt_steps=0).validate()


def test_lens_names_one_vocabulary():
    """The lens is "final_norm" or "none" everywhere; "raw", the 0.1 spelling of "none", still reads."""
    assert TrainConfig(lens="raw").lens == "none"
    assert TrainConfig.from_dict({"model": "m", "dataset": "trec", "lens": "raw"}).lens == "none"
    assert field_choices()["lens"] == (("final_norm", "none"), False)
    with pytest.raises(ConfigError, match="unknown lens 'final'"):
        TrainConfig(lens="final").validate()
