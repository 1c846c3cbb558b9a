"""Looking at a model or a finished run without training: ``salf eval`` and ``salf profile``.

:func:`evaluate_model_or_run` scores a model (name or path) or a run directory's saved model / adapter
on a split; :func:`profile_model_or_run` measures the per-space deviations of every example, their
eof-layer histogram and violin plot, before and (for a run) after fine-tuning. Both take the data
options of `TrainConfig` by their field names; a run directory supplies its own model and dataset.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from salf_engine.config import TrainConfig as _C  # the defaults of the options these functions take
from salf_engine.config import is_generative_preset
from salf_engine.data import Verbalizer, encode_split, load_task
from salf_engine.deviation.compute import eof_layers
from salf_engine.deviation.semantics import semantic_bases
from salf_engine.errors import ConfigError
from salf_engine.evaluation.classification import evaluate
from salf_engine.evaluation.plots import (
    deviation_stats,
    deviation_violins_png,
    eof_histogram_png,
    format_deviation_stats,
)
from salf_engine.experiments.report import format_hist
from salf_engine.models.loading import load_model
from salf_engine.runner.truncated import TruncatedRunner
from salf_engine.runtime.atomic import atomic_write
from salf_engine.schedule.profile import profile_deviations
from salf_engine.training.rundir import is_run_dir, load_for_eval, read_run_config

__all__ = ["evaluate_model_or_run", "profile_model_or_run"]


def _task_and_source(model_or_run: str | None, run: str | None, dataset: str | None, data_dir: str | None,
                     columns: dict[str, Any]):
    run_cfg = read_run_config(run) if run else None
    dataset = dataset or (run_cfg.dataset if run_cfg else None)
    if dataset is None:
        raise ConfigError("--dataset is required unless --model is a run directory")
    if is_generative_preset(dataset) or (run_cfg is not None and run_cfg.generative):
        raise ConfigError(f"salf eval / profile score classification tasks; {dataset} is a prompt/response "
                          "task: its run directory's eval.json holds the answer loss and exact match "
                          "(salf train measures them, docs/sft.md)")
    if data_dir is None and run_cfg is not None and dataset == run_cfg.dataset:
        data_dir = run_cfg.data_dir
    return dataset, load_task(dataset, data_dir, **columns), run_cfg


def _encoded_split(task, tok, *, eval_split: str, max_length: int, eval_limit: int | None, seed: int):
    verbalizer = Verbalizer(task.classes, task.label_words, tok)
    split = encode_split(task, tok, eval_split, verbalizer, max_length=max_length, limit=eval_limit,
                         seed=seed)
    return verbalizer, split


def evaluate_model_or_run(model: str, *, dataset: str | None = None, data_dir: str | None = None,
                          text_column: str | None = None, text_pair_column: str | None = None,
                          label_column: str | None = None, eval_split: str = _C.eval_split,
                          max_length: int = _C.max_length, eval_limit: int | None = None,
                          eval_batch_size: int = _C.eval_batch_size, dtype: str = _C.dtype,
                          seed: int = _C.seed, progress: bool = True):
    """The `EvalReport` of a model name/path, or of a run directory's saved model on its own dataset."""
    columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    run = model if is_run_dir(model) else None
    _name, task, _cfg = _task_and_source(model, run, dataset, data_dir, columns)
    loaded, tok, _ = load_for_eval(model)
    verbalizer, split = _encoded_split(task, tok, eval_split=eval_split, max_length=max_length,
                                       eval_limit=eval_limit, seed=seed)
    return evaluate(loaded, tok, split, verbalizer, batch_size=eval_batch_size, dtype=dtype,
                    classes=task.classes, progress=progress)


def _deviations_of(model, tok, task, *, eval_split, max_length, eval_limit, seed, lens, metric,
                   deviation_impl, eval_batch_size, progress):
    verbalizer, split = _encoded_split(task, tok, eval_split=eval_split, max_length=max_length,
                                       eval_limit=eval_limit, seed=seed)
    bases = semantic_bases(model, verbalizer.label_token_ids)
    runner = TruncatedRunner(model, bases=bases, lens=lens, metric=metric, deviation_impl=deviation_impl)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.no_grad():
        dev = profile_deviations(runner, split, pad, batch_size=eval_batch_size, progress=progress)
    return dev, runner.num_layers


def profile_model_or_run(model: str | None = None, *, run: str | None = None, dataset: str | None = None,
                         data_dir: str | None = None, text_column: str | None = None,
                         text_pair_column: str | None = None, label_column: str | None = None,
                         eval_split: str = _C.eval_split, max_length: int = _C.max_length,
                         eval_limit: int | None = None, metric: str = _C.metric, lens: str = _C.lens,
                         eof_boundary: str = _C.eof_boundary, deviation_impl: str = _C.deviation_impl,
                         eval_batch_size: int = _C.eval_batch_size, seed: int = _C.seed,
                         output: str | Path | None = None, progress: bool = True,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Deviation statistics, eof-layer histograms and plots of a model, or of a run before and after.

    Writes ``profile.json``, ``profile_violins.png`` and ``profile_eof_<phase>.png`` into ``output``
    (default: the run directory, or ``salf-profile``) and returns the report (what profile.json holds).
    """
    if run and not is_run_dir(run):
        raise ConfigError(f"{run} is not a run directory (no config.json and model/)")
    run_cfg = read_run_config(run) if run else None
    model_name = model or (run_cfg.model if run_cfg else None)
    if model_name is None:
        raise ConfigError("--model is required unless --run is given")
    columns = dict(text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    if dataset is None and run_cfg is None:
        raise ConfigError("--dataset is required unless --run is given")
    dataset, task, _ = _task_and_source(model_name, run, dataset, data_dir, columns)
    opts = dict(eval_split=eval_split, max_length=max_length, eval_limit=eval_limit, seed=seed, lens=lens,
                metric=metric, deviation_impl=deviation_impl, eval_batch_size=eval_batch_size,
                progress=progress)
    loaded, tok = load_model(model_name)
    phases: dict[str, Any] = {}
    dev_before, m = _deviations_of(loaded, tok, task, **opts)
    phases["before" if run else "deviations"] = dev_before
    del loaded
    if run:
        tuned, tok2, _ = load_for_eval(run)
        phases["after"], _ = _deviations_of(tuned, tok2, task, **opts)
    out_dir = Path(output) if output else (Path(run) if run else Path("salf-profile"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {name: deviation_stats(dev) for name, dev in phases.items()}
    report: dict[str, Any] = {"model": model_name, "dataset": dataset, "split": eval_split,
                              "metric": metric, "num_layers": m, "stats": stats, "eof_histogram": {}}
    log(f"per-space deviations ({metric}) of {dev_before.shape[0]} {eval_split} examples, m = {m}")
    log(format_deviation_stats(stats))
    for name, dev in phases.items():
        eofs = eof_layers(dev, boundary=eof_boundary)
        counts = [int((eofs == k).sum()) for k in range(m + 1)]
        report["eof_histogram"][name] = counts
        log(f"eof-layer histogram ({name}):")
        log(format_hist(counts))
        eof_histogram_png(eofs, m, out_dir / f"profile_eof_{name}.png", title=f"eof-layers ({name})")
    deviation_violins_png(dev_before, out_dir / "profile_violins.png", after=phases.get("after"),
                          metric=metric, title=f"{model_name} on {dataset} ({eval_split})")
    atomic_write(out_dir / "profile.json", json.dumps(report, indent=2) + "\n")
    log(f"wrote {out_dir / 'profile_violins.png'} and {out_dir / 'profile.json'}")
    return report
