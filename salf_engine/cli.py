"""The `salf` command: train, eval, profile, demo (and subcommands other modules register).

Every `SalfError` is printed as one line ``error: <message>`` on stderr with exit status 2; so are
argument errors. Another module adds a subcommand by appending ``(name, add_parser)`` to
`SUBCOMMANDS` (or calling `register_subcommand`), or by exposing ``add_parser(subparsers)`` in a module
listed in `PLUGIN_MODULES`; ``add_parser`` builds the parser and sets ``func=callable(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError, ModelError, SalfError

__all__ = ["main", "build_parser", "register_subcommand", "print_summary", "load_for_eval", "SUBCOMMANDS",
           "PLUGIN_MODULES", "DEMO_DEFAULTS"]

AddParser = Callable[[Any], argparse.ArgumentParser]

# Modules that may define ``add_parser(subparsers)``; missing ones are skipped.
PLUGIN_MODULES: list[str] = ["salf_engine.compare"]

# The demo: SmolLM2-135M on the embedded TREC, zero-shot against SALF[half] (uniform budget, the
# default mixed schedule) and full fine-tuning of the same 960 questions (one epoch, steps of 8), every
# model evaluated on all 500 test questions. Sized to finish in well under 15 minutes on a 2-core CPU.
DEMO_DEFAULTS: dict[str, Any] = dict(
    model="smollm2-135m", dataset="trec", strategies=("salf:uniform:df", "full"), limit=960, epochs=1,
    batch_size=8, max_length=128, eval_batch_size=64, seed=0,
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one line ``error: ...`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}\n")


# ----------------------------------------------------------------------------- helpers

def _add_data_args(p: argparse.ArgumentParser, *, dataset_required: bool = True) -> None:
    p.add_argument("--dataset", required=dataset_required,
                   help="preset (trec, sst5, carer, mrpc, webss) or a local data file/directory")
    p.add_argument("--data-dir", default=None, help="directory holding the preset's raw files")
    p.add_argument("--text-column", default=None)
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--max-length", type=int, default=256)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", default="salf", help="full, salf, lora-full, lora-half, bot50 ...")
    p.add_argument("--budget", default=None, help="SALF budget plan: uniform, arith, geom (default: none)")
    p.add_argument("--infill", default=None, help="budget infilling order: bf or df (sets the quotas)")
    p.add_argument("--depth-schedule", default="mixed",
                   help="mixed (several cuts per optimizer step; default) or paper (Algorithm 4 as written)")
    p.add_argument("--depth-assignment", default="class-rank",
                   help="budgeted SALF: class-rank (default) or eof-match (Algorithm 4's matching)")
    p.add_argument("--cuts-per-step", type=int, default=4,
                   help="micro-batches of different depths per optimizer step (SALF, LIFT; default 4)")
    p.add_argument("--profile-fraction", type=float, default=1.0,
                   help="share of the training examples profiled before epoch 0 (default 1)")
    p.add_argument("--train-head", action="store_true",
                   help="train the LM head under layer-freezing strategies too (full always trains it)")
    p.add_argument("--freeze-fraction", type=float, default=None, help="for bot / top / int / adt strategies")
    p.add_argument("--metric", default="cosine", help="deviation metric: cosine, ce or rank")
    p.add_argument("--lens", default="final_norm", help="final_norm or raw")
    p.add_argument("--eof-boundary", default="trainable", help="trainable (algorithm) or frozen (figure 2)")
    p.add_argument("--loss", default="next-token", help="next-token, semantic-ce or cosine")
    p.add_argument("--deviation-impl", default="auto", help="auto, torch, triton, cpp or cuda")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward (micro-batch); default 8")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step: a step holds batch-size x grad-accum examples")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 1e-4 for full weights, 3e-3 for LoRA)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--schedule", default="linear", help="linear or constant (after warm-up)")
    p.add_argument("--limit", type=int, default=None, help="training subset size (class-stratified)")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--eval-split", default="test", help="a split name, or 'holdout' (carved from train)")
    p.add_argument("--holdout-size", type=int, default=500, help="examples held out for --eval-split holdout")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot evaluation")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT) instead of the weights")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--dtype", default="float32", help="float32 or bf16 (autocast)")
    p.add_argument("--device", default="auto")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    p.add_argument("--save-every", type=int, default=None,
                   help="write a checkpoint every N optimizer steps (resume with --resume); default: none")
    p.add_argument("--save-total-limit", type=int, default=None,
                   help="keep only the newest K checkpoints (default: all)")
    p.add_argument("--on-nonfinite", default=None,
                   help="a non-finite loss or gradient: stop (default; the last checkpoint stays) or skip "
                        "(skip the update and count it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config_from_args(args: argparse.Namespace, **fixed: Any):
    from .config import TrainConfig

    values = dict(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, text_column=args.text_column,
        text_pair_column=args.text_pair_column, label_column=args.label_column, max_length=args.max_length,
        strategy=args.strategy, budget=args.budget, infill=args.infill, freeze_fraction=args.freeze_fraction,
        depth_schedule=args.depth_schedule, depth_assignment=args.depth_assignment,
        cuts_per_step=args.cuts_per_step, profile_fraction=args.profile_fraction, train_head=args.train_head,
        holdout_size=args.holdout_size,
        metric=args.metric, lens=args.lens, eof_boundary=args.eof_boundary, loss=args.loss,
        deviation_impl=args.deviation_impl,
        max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, schedule=args.schedule,
        limit=args.limit, eval_limit=args.eval_limit, eval_batch_size=args.eval_batch_size,
        eval_split=args.eval_split, zero_shot_eval=not args.no_zero_shot, lora=args.lora, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, load_in_4bit=args.load_in_4bit,
        dtype=args.dtype, device=args.device, gradient_checkpointing=args.gradient_checkpointing,
        seed=args.seed, output=getattr(args, "output", None), overwrite=args.overwrite,
        save_every=args.save_every, save_total_limit=args.save_total_limit,
        on_nonfinite=args.on_nonfinite or "stop",
    )
    values.update(fixed)
    return TrainConfig(**values).validate()


def _is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "model").is_dir()


def _run_config(path: str | Path):
    from .config import TrainConfig

    return TrainConfig.from_json(Path(path) / "config.json")


def load_for_eval(model_or_run: str, *, device: str = "cpu"):
    """(model, tokenizer, run config or None): a model name/path, or a run dir's saved model / adapter."""
    from .models.loading import load_model

    if not _is_run_dir(model_or_run):
        model, tok = load_model(model_or_run, device=device)
        return model, tok, None
    run = Path(model_or_run)
    cfg = _run_config(run)
    saved = run / "model"
    if (saved / "adapter_config.json").is_file():
        from peft import PeftModel

        base, tok = load_model(cfg.model, device=device, load_in_4bit=cfg.load_in_4bit)
        try:
            model = PeftModel.from_pretrained(base, saved, is_trainable=False)
        except Exception as exc:  # a broken adapter is a user-facing problem
            raise ModelError(f"cannot load the LoRA adapter in {saved}: {type(exc).__name__}: {exc}") from exc
        model.eval()
        return model, tok, cfg
    model, tok = load_model(saved, device=device)
    return model, tok, cfg


def _print_scores_table(rows: list[tuple[str, dict[str, float]]], out) -> None:
    print(f"{'':12s} {'accuracy':>10s} {'macro-F1':>10s} {'accuracy':>10s} {'macro-F1':>10s}", file=out)
    print(f"{'':12s} {'(free)':>10s} {'(free)':>10s} {'(labels)':>10s} {'(labels)':>10s}", file=out)
    for name, s in rows:
        print(f"{name:12s} {s['free_accuracy']:10.4f} {s['free_macro_f1']:10.4f} "
              f"{s['restricted_accuracy']:10.4f} {s['restricted_macro_f1']:10.4f}", file=out)


def _format_hist(counts: list[int] | None) -> str:
    if not counts:
        return "(none)"
    top = max(counts) or 1
    lines = []
    for k, c in enumerate(counts):
        if c:
            lines.append(f"  layer {k:3d}: {c:5d} {'#' * max(1, round(40 * c / top))}")
    return "\n".join(lines)


def print_summary(summary: dict[str, Any], out=None) -> None:
    """The headline numbers of a finished run (to `out`, default stdout)."""
    out = out if out is not None else sys.stdout
    rows = []
    if summary.get("zero_shot"):
        rows.append(("zero-shot", summary["zero_shot"]))
    rows.append(("fine-tuned", summary["fine_tuned"]))
    print("", file=out)
    print(f"model {summary['model']} on {summary['dataset']}, strategy {summary['strategy']}: "
          f"{summary['steps']} steps, {summary['examples_trained']} examples trained, "
          f"{summary['num_eval_examples']} evaluated", file=out)
    _print_scores_table(rows, out)
    eps = summary.get("examples_per_second") or 0.0
    print(f"training time {summary['train_seconds']:.1f}s ({eps:.2f} examples/s); "
          f"total {summary['total_seconds']:.1f}s", file=out)
    print(f"realized backprop cost-saving ratio (mean frozen depth / m): {summary['cost_saving_ratio']:.3f}; "
          f"estimated FLOPs vs full fine-tuning (profiling of {summary['profiled_examples']} examples "
          f"included): {summary['flops_ratio']:.3f}", file=out)
    if summary.get("eof_histogram"):
        print("eof-layer histogram (profile before training):", file=out)
        print(_format_hist(summary["eof_histogram"]["profile"]), file=out)


# ----------------------------------------------------------------------------- subcommands

def _resume_config(args: argparse.Namespace):
    """The config of ``--resume RUN_DIR``: the run's own config.json (and the checkpointing options given
    on the command line), or, when --model is given, the whole command line (it must match the run)."""
    from .config import TrainConfig

    run_dir = args.resume
    if args.output is not None and Path(args.output).resolve() != Path(run_dir).resolve():
        raise ConfigError(f"--output {args.output} and --resume {run_dir} name different run directories")
    if args.model is not None:
        if args.dataset is None:
            raise ConfigError("--dataset is required with --model")
        return _config_from_args(args, output=str(run_dir))
    saved = Path(run_dir) / "config.json"
    if not saved.is_file():
        raise ConfigError(f"cannot resume {run_dir}: it holds no run (no config.json)")
    config = TrainConfig.from_json(saved)
    config.output = str(run_dir)
    for name in ("save_every", "save_total_limit", "on_nonfinite"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return config.validate()


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    if args.resume is not None:
        config = _resume_config(args)
        summary = train(config, progress=not args.quiet, resume=True)
    else:
        missing = [f"--{n}" for n in ("model", "dataset", "output") if getattr(args, n) is None]
        if missing:  # as argparse reports a missing required argument: one line, status 2
            print(f"error: salf train: the following arguments are required: {', '.join(missing)} "
                  "(or --resume RUN_DIR)", file=sys.stderr)
            raise SystemExit(2)
        config = _config_from_args(args)
        summary = train(config, progress=not args.quiet)
    print_summary(summary)
    print(f"run directory: {config.output}")
    return 0


def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="fine-tune a model on a classification dataset")
    p.add_argument("--model", default=None, help="short name (smollm2-135m), HF directory or .gguf file")
    _add_data_args(p, dataset_required=False)
    _add_train_args(p)
    p.add_argument("--output", default=None, help="run directory")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the unfinished run in RUN_DIR from its newest whole checkpoint (its "
                        "config.json unless --model etc. are given; they must match the run)")
    p.set_defaults(func=_cmd_train)
    return p


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import Verbalizer, encode_split, load_task
    from .evaluate import evaluate

    run_cfg = _run_config(args.model) if _is_run_dir(args.model) else None
    dataset = args.dataset or (run_cfg.dataset if run_cfg else None)
    if dataset is None:
        raise ConfigError("--dataset is required unless --model is a run directory")
    data_dir = args.data_dir or (run_cfg.data_dir if run_cfg and dataset == run_cfg.dataset else None)
    task = load_task(dataset, data_dir, text_column=args.text_column, text_pair_column=args.text_pair_column,
                     label_column=args.label_column)
    model, tok, _ = load_for_eval(args.model)
    verbalizer = Verbalizer(task.classes, task.label_words, tok)
    split = encode_split(task, tok, args.split, verbalizer, max_length=args.max_length, limit=args.limit,
                         seed=args.seed)
    report = evaluate(model, tok, split, verbalizer, batch_size=args.batch_size, dtype=args.dtype,
                      classes=task.classes, progress=not args.quiet)
    print(report.to_text())
    if args.output:
        Path(args.output).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _add_eval(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="accuracy / macro-F1 of a model or a finished run")
    p.add_argument("--model", required=True, help="model name/path, or a run directory (its saved model)")
    _add_data_args(p, dataset_required=False)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the report as JSON here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_eval)
    return p


def _profile_model(model, tok, task, args) -> tuple[Any, int]:
    import torch

    from .data import Verbalizer, encode_split
    from .runner import TruncatedRunner
    from .semantics import semantic_bases
    from .train import profile_deviations

    verbalizer = Verbalizer(task.classes, task.label_words, tok)
    split = encode_split(task, tok, args.split, verbalizer, max_length=args.max_length, limit=args.limit,
                         seed=args.seed)
    bases = semantic_bases(model, verbalizer.label_token_ids)
    runner = TruncatedRunner(model, bases=bases, lens=args.lens, metric=args.metric,
                             deviation_impl=args.deviation_impl)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.no_grad():
        dev = profile_deviations(runner, split, pad, batch_size=args.batch_size, progress=not args.quiet)
    return dev, runner.num_layers


def _cmd_profile(args: argparse.Namespace) -> int:
    from .data import load_task
    from .deviation import eof_layers
    from .plots import deviation_stats, deviation_violins_png, eof_histogram_png, format_deviation_stats

    run_cfg = _run_config(args.run) if args.run else None
    if args.run and not _is_run_dir(args.run):
        raise ConfigError(f"{args.run} is not a run directory (no config.json and model/)")
    model_name = args.model or (run_cfg.model if run_cfg else None)
    if model_name is None:
        raise ConfigError("--model is required unless --run is given")
    dataset = args.dataset or (run_cfg.dataset if run_cfg else None)
    if dataset is None:
        raise ConfigError("--dataset is required unless --run is given")
    data_dir = args.data_dir or (run_cfg.data_dir if run_cfg else None)
    task = load_task(dataset, data_dir)
    from .models.loading import load_model

    model, tok = load_model(model_name)
    phases: dict[str, Any] = {}
    dev_before, m = _profile_model(model, tok, task, args)
    phases["before" if args.run else "deviations"] = dev_before
    del model
    if args.run:
        tuned, tok2, _ = load_for_eval(args.run)
        phases["after"], _ = _profile_model(tuned, tok2, task, args)
    out_dir = Path(args.output) if args.output else (Path(args.run) if args.run else Path("salf-profile"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {name: deviation_stats(dev) for name, dev in phases.items()}
    report: dict[str, Any] = {"model": model_name, "dataset": dataset, "split": args.split,
                              "metric": args.metric, "num_layers": m, "stats": stats, "eof_histogram": {}}
    print(f"per-space deviations ({args.metric}) of {dev_before.shape[0]} {args.split} examples, m = {m}")
    print(format_deviation_stats(stats))
    for name, dev in phases.items():
        eofs = eof_layers(dev, boundary=args.eof_boundary)
        counts = [int((eofs == k).sum()) for k in range(m + 1)]
        report["eof_histogram"][name] = counts
        print(f"eof-layer histogram ({name}):")
        print(_format_hist(counts))
        eof_histogram_png(eofs, m, out_dir / f"profile_eof_{name}.png", title=f"eof-layers ({name})")
    after = phases.get("after")
    deviation_violins_png(dev_before, out_dir / "profile_violins.png", after=after, metric=args.metric,
                          title=f"{model_name} on {dataset} ({args.split})")
    (out_dir / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_dir / 'profile_violins.png'} and {out_dir / 'profile.json'}")
    return 0


def _add_profile(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("profile", help="per-layer deviation statistics, eof histogram and violin plot")
    p.add_argument("--model", default=None, help="model name/path (default: the --run's base model)")
    _add_data_args(p, dataset_required=False)
    p.add_argument("--split", default="test")
    p.add_argument("--run", default=None, help="a finished run: profile after fine-tuning as well")
    p.add_argument("--output", default=None, help="directory for the PNGs and profile.json")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--metric", default="cosine")
    p.add_argument("--lens", default="final_norm")
    p.add_argument("--eof-boundary", default="trainable")
    p.add_argument("--deviation-impl", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_profile)
    return p


def _cmd_demo(args: argparse.Namespace) -> int:
    from .compare import CompareSettings, cost_seconds, run_compare

    d = DEMO_DEFAULTS
    strategies = [args.strategy or d["strategies"][0], "full"]
    limit = args.limit or d["limit"]
    train_fields = dict(limit=limit, epochs=d["epochs"], batch_size=d["batch_size"],
                        max_length=d["max_length"], eval_batch_size=d["eval_batch_size"],
                        seed=d["seed"] if args.seed is None else args.seed, eval_limit=args.eval_limit)
    settings = CompareSettings(model=args.model or d["model"], datasets=[d["dataset"]], strategies=strategies,
                               output=args.output, train=train_fields, zero_shot=True, overwrite=True)
    print(f"salf demo: {settings.model} on the embedded TREC, {limit} training questions, one epoch in steps "
          f"of {d['batch_size']}: zero-shot vs {strategies[0]} vs full fine-tuning, each evaluated on the "
          f"{'500' if args.eval_limit is None else args.eval_limit} test questions")
    start = time.perf_counter()
    result = run_compare(settings, progress=not args.quiet, log=None if args.quiet else print)
    wall = time.perf_counter() - start
    if result.failed:
        raise SalfError(f"the demo's {result.failed[0][1]} run failed: {result.failed[0][2]}")
    zero = result.zero_shot[d["dataset"]]
    runs = [(label, result.summaries[(d["dataset"], label)]) for label in strategies]
    full = runs[-1][1]
    print("")
    print(f"{'':18s} {'accuracy':>9s} {'macro-F1':>9s} {'train+profile':>14s} {'backward':>9s} {'FLOPs':>7s}")
    print(f"{'':18s} {'(free)':>9s} {'(free)':>9s} {'seconds':>14s} {'saving':>9s} {'/ full':>7s}")
    print(f"{'zero-shot':18s} {zero['free_accuracy']:9.4f} {zero['free_macro_f1']:9.4f}")
    for label, s in runs:
        seconds = cost_seconds(s)
        print(f"{label:18s} {s['fine_tuned']['free_accuracy']:9.4f} {s['fine_tuned']['free_macro_f1']:9.4f} "
              f"{seconds:8.1f} ({seconds / cost_seconds(full):.2f}x) "
              f"{s['cost_saving_ratio']:9.3f} {s['flops_ratio']:7.2f}")
    print(f"demo wall time: {wall:.1f}s; runs in {args.output}/cells/{d['dataset']}/")
    return 0


def _add_demo(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="zero-shot vs SALF[half] vs full fine-tuning (SmolLM2-135M, TREC)")
    p.add_argument("--output", default="runs/demo", help="demo directory (replaced on every demo run)")
    p.add_argument("--model", default=None, help="default smollm2-135m")
    p.add_argument("--strategy", default=None,
                   help="the strategy cell set against full (default salf:uniform:df)")
    p.add_argument("--limit", type=int, default=None, help="training questions (default 960)")
    p.add_argument("--eval-limit", type=int, default=None, help="test questions (default: all 500)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)
    return p


SUBCOMMANDS: list[tuple[str, AddParser]] = [
    ("train", _add_train),
    ("eval", _add_eval),
    ("profile", _add_profile),
    ("demo", _add_demo),
]


def register_subcommand(name: str, add_parser: AddParser) -> None:
    """Add a subcommand: ``add_parser(subparsers)`` builds it and sets ``func(args) -> int``."""
    if any(n == name for n, _ in SUBCOMMANDS):
        raise ValueError(f"subcommand {name!r} is already registered")
    SUBCOMMANDS.append((name, add_parser))


def build_parser() -> argparse.ArgumentParser:
    """The full `salf` parser (built-ins, registered subcommands, plugin modules)."""
    parser = _Parser(prog="salf", description="Semantic-Aware Layer-Freezing for causal LMs")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"salf-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    names = set()
    for name, add in SUBCOMMANDS:
        add(sub)
        names.add(name)
    for module_name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        add = getattr(module, "add_parser", None)
        if callable(add) and module_name.rsplit(".", 1)[-1] not in names:
            add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `salf` console script; returns the exit status."""
    # Idle OpenMP threads sleep instead of spinning: on a busy (shared) CPU spinning threads made
    # CPU training several times slower. Only effective before torch is imported (the console script).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
