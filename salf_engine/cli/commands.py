"""The `salf` command: train, eval, profile, compare, demo. It parses and calls library functions.

Every option that is a `TrainConfig` field is generated from the field (`salf_engine.cli.options`): one
name, type, default and help. ``--config FILE`` (YAML or JSON, e.g. a run's ``config.json``) gives
defaults that the command line overrides. Every `SalfError` is printed as one line
``error: <message>`` on stderr with exit status 2; so are argument errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from salf_engine import __version__
from salf_engine.cli import options as opt
from salf_engine.config import TrainConfig
from salf_engine.errors import ConfigError, SalfError
from salf_engine.experiments.grid import CELL_SYNTAX, CompareSettings
from salf_engine.runtime.atomic import atomic_write
from salf_engine.schedule.names import STRATEGIES

__all__ = ["main", "build_parser"]

#: The data options every command that reads a dataset shares (TrainConfig fields).
DATA_FIELDS = ("dataset", "data_dir", "text_column", "text_pair_column", "label_column", "max_length")
#: What `salf eval` reads, and its spellings of the evaluation fields.
EVAL_FIELDS = ("model", *DATA_FIELDS, "eval_split", "eval_limit", "eval_batch_size", "dtype", "seed")
EVAL_ALIASES = {"eval_split": ["--split"], "eval_limit": ["--limit"], "eval_batch_size": ["--batch-size"]}
PROFILE_FIELDS = ("model", *DATA_FIELDS, "eval_split", "eval_limit", "eval_batch_size", "metric", "lens",
                  "eof_boundary", "deviation_impl", "seed")
#: TrainConfig fields `salf compare` sets per cell (or per grid: zero-shot), so they are not its options.
COMPARE_PER_CELL = ("dataset", "strategy", "budget", "infill", "freeze_fraction", "output", "overwrite",
                    "zero_shot_eval")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line ``error: ...`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}\n")



def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars (transformers' and datasets' "
                                                        "included)")


# ----------------------------------------------------------------------------- subcommands
# Each subcommand imports what it runs inside its function: building the parser (`salf --help`, argument
# errors) loads no torch, and main() sets OMP_WAIT_POLICY before torch is imported.

def _cmd_train(args: argparse.Namespace) -> int:
    from salf_engine.experiments.report import print_summary
    from salf_engine.runtime.distributed import rank_and_world
    from salf_engine.training.recipe import train

    config = TrainConfig(**opt.fields_from_args(args)).validate()
    summary = train(config, progress=not args.quiet, resume=args.resume is not None)
    if rank_and_world()[0] == 0:  # under torchrun every rank trains; rank 0 reports
        print_summary(summary)
        print(f"run directory: {config.output}")
    return 0


def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="fine-tune a model on a classification or prompt/response dataset",
                       description="Fine-tune a model into a run directory: on a classification dataset "
                                   "(a preset, or --text-column / --label-column), or on prompt/response "
                                   "data (gsm8k, or --response-column: supervised fine-tuning on the "
                                   "response tokens).")
    opt.add_config_file_option(p)
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the unfinished run in RUN_DIR from its newest whole checkpoint; its "
                        "config.json gives the options (those given here must match the run, except "
                        "device, checkpointing and output-side ones)")
    opt.add_config_options(p, required=("model", "output"))
    _quiet(p)
    p.set_defaults(func=_cmd_train)
    return p


def _cmd_eval(args: argparse.Namespace) -> int:
    from salf_engine.cli.eval_profile import evaluate_model_or_run

    report = evaluate_model_or_run(**opt.fields_from_args(args), progress=not args.quiet)
    print(report.to_text())
    if args.report:
        atomic_write(args.report, json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _add_eval(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="accuracy / macro-F1 of a model or a finished run")
    opt.add_config_file_option(p)
    opt.add_config_options(p, EVAL_FIELDS, aliases=EVAL_ALIASES, required=("model",),
                           defaults={"dataset": None})
    p.add_argument("--output", dest="report", default=None, help="write the report as JSON here")
    _quiet(p)
    p.set_defaults(func=_cmd_eval)
    return p


def _cmd_profile(args: argparse.Namespace) -> int:
    from salf_engine.cli.eval_profile import profile_model_or_run

    profile_model_or_run(**opt.fields_from_args(args), run=args.run, output=args.out_dir,
                         progress=not args.quiet)
    return 0


def _add_profile(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("profile", help="per-layer deviation statistics, eof histogram and violin plot")
    opt.add_config_file_option(p)
    opt.add_config_options(p, PROFILE_FIELDS, aliases=EVAL_ALIASES, defaults={"dataset": None, "model": None})
    p.add_argument("--run", default=None, help="a finished run: profile after fine-tuning as well")
    p.add_argument("--output", dest="out_dir", default=None, help="directory for the PNGs and profile.json")
    _quiet(p)
    p.set_defaults(func=_cmd_profile)
    return p


def _cmd_compare(args: argparse.Namespace) -> int:
    from salf_engine.experiments.compare import run_compare
    from salf_engine.experiments.report import collect_results, write_tables

    settings = CompareSettings(
        model=args.model, datasets=args.datasets, strategies=args.strategies, output=args.output,
        data_dir=args.data_dir, train=opt.fields_from_args(args, exclude=("model", "data_dir")),
        zero_shot=args.zero_shot, overwrite=args.overwrite, keep_going=args.keep_going,
        discard_models=args.discard_models,
    )
    if args.tables_only:
        from salf_engine.experiments.plots import write_plots

        datasets, strategies = settings.resolve()
        summaries, zero_shot = collect_results(args.output, datasets, strategies)
        Path(args.output).mkdir(parents=True, exist_ok=True)
        write_tables(args.output, datasets, strategies, summaries, zero_shot)
        write_plots(args.output, datasets, strategies, summaries, zero_shot)
        print((Path(args.output) / "f1_free.md").read_text())
        return 0
    result = run_compare(settings, progress=not args.quiet, log=print)
    print("")
    print((Path(args.output) / "f1_free.md").read_text())
    print((Path(args.output) / "cost_saving.md").read_text())
    print(f"ran {len(result.ran)} cell(s), {len(result.skipped)} already finished; tables in {args.output}")
    if result.failed:
        for ds, st, msg in result.failed:
            print(f"failed: {ds} / {st}: {msg}")
        return 1
    return 0


def _add_compare(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "compare", help="run a datasets x strategies grid and write the paper-style comparison tables",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Fine-tune one model under every strategy on every dataset (one `salf train` run per cell, in "
            "OUTPUT/cells/<dataset>/<strategy>/), resume after an interruption (finished cells, those with a "
            "summary.json, are skipped), and write tables (rows = strategies, columns = datasets + average: "
            "macro-F1 and accuracy with free and label-restricted decoding, backward cost-saving, training "
            "time) as Markdown and CSV, plus PNG plots. The training options are shared by every cell. "
            + CELL_SYNTAX.format(names=", ".join(STRATEGIES)) + ".",
            width=100, break_on_hyphens=False, break_long_words=False,
        ),
    )
    opt.add_config_file_option(p)
    p.add_argument("--datasets", action="append",
                   help="comma-separated presets (trec, sst5, carer, mrpc, webss) or local files, each "
                        "optionally LABEL=SOURCE")
    p.add_argument("--strategies", action="append",
                   help="comma-separated strategy cells NAME[:OPTION]..., e.g. "
                        "full,lora-half,salf,salf:uniform:df,salf:geom:df,bot50,adt-low")
    p.add_argument("--output", help="grid directory (cells/, tables, plots)")
    p.add_argument("--no-zero-shot", dest="zero_shot", action="store_false", help="skip the zero-shot row")
    p.add_argument("--overwrite", action="store_true", help="redo finished cells too")
    p.add_argument("--discard-models", action="store_true",
                   help="delete each cell's saved model/ and checkpoints/ once it finished (saves "
                        "disk; tables unaffected)")
    p.add_argument("--keep-going", action="store_true",
                   help="record a failing cell and go on (exit status 1 at the end)")
    p.add_argument("--tables-only", action="store_true",
                   help="only rebuild tables and plots from finished cells")
    _quiet(p)
    p.set_defaults(_salf_required=["datasets", "strategies", "output"])  # here or in --config
    opt.add_config_options(p, exclude=COMPARE_PER_CELL, required=("model",),
                           title="training options of every cell (TrainConfig fields)")
    p.set_defaults(func=_cmd_compare)
    return p


def _cmd_demo(args: argparse.Namespace) -> int:
    from salf_engine.experiments.demo import run_demo

    run_demo(args.output, model=args.model, strategy=args.strategy, limit=args.limit,
             eval_limit=args.eval_limit, seed=args.seed, progress=not args.quiet)
    return 0


def _add_demo(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo",
                       help="zero-shot vs SALF[half] (eof rank, narrowing) vs BOT50 (one epoch; three, "
                            "cached) vs full fine-tuning (SmolLM2-135M, TREC)")
    p.add_argument("--output", default="runs/demo", help="demo directory (replaced on every demo run)")
    p.add_argument("--model", default=None, help="default smollm2-135m")
    p.add_argument("--strategy", default=None,
                   help="the strategy cell set against bot50 and full (default salf:uniform:df)")
    p.add_argument("--limit", type=int, default=None, help="training questions (default 960)")
    p.add_argument("--eval-limit", type=int, default=None, help="test questions (default: all 500)")
    p.add_argument("--seed", type=int, default=None)
    _quiet(p)
    p.set_defaults(func=_cmd_demo)
    return p


_COMMANDS = {"train": _add_train, "eval": _add_eval, "profile": _add_profile, "compare": _add_compare,
             "demo": _add_demo}


def build_parser() -> argparse.ArgumentParser:
    """The full `salf` parser; ``parser.commands`` maps each subcommand name to its parser."""
    parser = _Parser(prog="salf", description="Semantic-Aware Layer-Freezing for causal LMs")
    parser.add_argument("--version", action="version", version=f"salf-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    parser.commands = {name: add(sub) for name, add in _COMMANDS.items()}  # type: ignore[attr-defined]
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a `salf` command line: ``--config FILE`` values under the options given on the line.

    ``salf train --resume RUN_DIR`` reads the run's config.json as its config file (unless ``--config``
    names another) and writes to RUN_DIR.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    command = parser.commands[args.command]  # type: ignore[attr-defined]
    resume = getattr(args, "resume", None)
    config_file = getattr(args, "config", None) or (_resume_config_file(args) if resume else None)
    if config_file:
        given = args
        opt.apply_config_file(command, config_file, command=args.command)
        args = parser.parse_args(argv)
        for action in command._actions:  # a list option given on the line replaces the file's list
            if isinstance(action, argparse._AppendAction) and getattr(given, action.dest) is not None:
                setattr(args, action.dest, getattr(given, action.dest))
    if resume:
        args.output = str(resume)
    opt.check_required(command, args)
    return args


def _resume_config_file(args: argparse.Namespace) -> str:
    """The config.json of the run ``--resume`` names (after checking that --output agrees with it)."""
    run_dir = Path(args.resume)
    if args.output is not None and Path(args.output).resolve() != run_dir.resolve():
        raise ConfigError(f"--output {args.output} and --resume {run_dir} name different run directories")
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ConfigError(f"cannot resume {run_dir}: it holds no run (no config.json)")
    return str(saved)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `salf` console script; returns the exit status."""
    # Idle OpenMP threads sleep instead of spinning: on a busy (shared) CPU spinning threads made
    # CPU training several times slower. Only effective before torch is imported (the console script).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        args = parse_args(argv)
        if not getattr(args, "quiet", False):
            return int(args.func(args) or 0)
        from salf_engine.models.loading import library_progress_bars

        with library_progress_bars(False):  # --quiet: transformers' and datasets' bars too
            return int(args.func(args) or 0)
    except SalfError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
