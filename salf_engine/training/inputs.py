"""A run's inputs, checked and loaded before anything is written: :func:`prepare` -> :class:`Prepared`.

Validates the config, the output directory (or the run a resume continues) and the data (a missing
evaluation split fails before the model loads), picks the device and the strategy, loads the task and
the model, and encodes the training and evaluation splits (:func:`encode_task`, with examples held out
of the training split for ``eval_split="holdout"`` or ``eval_fraction``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salf_engine.config import TrainConfig, is_generative_preset
from salf_engine.data import Verbalizer, encode_split, load_task, stratified_subset, subset_split
from salf_engine.data.responses import encode_responses, load_gsm8k, load_responses
from salf_engine.errors import ConfigError, DataError
from salf_engine.models.loading import load_model
from salf_engine.runtime.device import resolve_device
from salf_engine.schedule.strategies import strategy_from_config
from salf_engine.training.checkpoint import check_writable, config_differences, list_checkpoints

__all__ = ["HOLDOUT", "HOLDOUT_SEED", "Prepared", "check_resume", "encode_response_task", "encode_task",
           "held_out_count", "load_response_task", "prepare"]

#: ``eval_split`` value that evaluates on examples held out of the training split.
HOLDOUT = "holdout"
#: Seed of the held-out draw: the same validation examples for every run seed.
HOLDOUT_SEED = 20240617


@dataclass
class Prepared:
    """Everything :func:`train` needs, validated and loaded by :func:`prepare` (nothing written yet)."""

    config: TrainConfig
    strategy: Any
    device: torch.device
    task: Any
    model: Any
    tokenizer: Any
    verbalizer: Any  # None for a prompt/response task
    train_split: Any
    eval_split: Any
    load_seconds: float = 0.0
    out_dir: Path | None = None


def held_out_count(task, config: TrainConfig) -> int | None:
    """How many training examples are held out for evaluation (None: the eval split is a split of its own).

    ``eval_split="holdout"`` holds out ``holdout_size``; ``eval_fraction`` holds out that share of the
    training split (at least one example). Raises before anything is loaded when the evaluation split
    does not exist or nothing would be left to train on.
    """
    if "train" not in task.splits:
        raise DataError(f"{config.dataset} has no training split; it has {', '.join(task.splits)}")
    n = len(task.splits["train"])
    if config.eval_split == HOLDOUT:
        held, what = config.holdout_size, f"holdout_size {config.holdout_size}"
    elif config.eval_fraction is not None:
        held, what = max(1, round(config.eval_fraction * n)), f"eval_fraction {config.eval_fraction:g}"
    else:
        if config.eval_split not in task.splits:
            raise DataError(f"{config.dataset} has no split {config.eval_split!r} (it has "
                            f"{', '.join(task.splits)}); pass --eval-fraction F to hold out a share of the "
                            "training split, or --eval-split with one of those")
        return None
    if held >= n:
        raise ConfigError(f"{what} leaves no training example out of the {n} of {config.dataset}'s "
                          "training split")
    return held


def encode_task(task, tokenizer, config: TrainConfig):
    """(verbalizer, train split, eval split) of `task`, encoded as `config` says (length, limits, seed).

    With ``eval_split="holdout"`` (``holdout_size`` examples) or ``eval_fraction`` (that share) the
    evaluation examples are class-stratified examples carved out of the training split (the same ones
    for every run seed, :data:`HOLDOUT_SEED`), and the training subset is drawn from the rest: a
    validation part for choosing hyperparameters that never touches the test split, or the evaluation
    part of a local file that has only a training split.
    """
    verbalizer = Verbalizer(task.classes, task.label_words, tokenizer)
    held_count = held_out_count(task, config)
    if held_count is not None:
        full = encode_split(task, tokenizer, "train", verbalizer, max_length=config.max_length)
        held = stratified_subset(full.labels, held_count, seed=HOLDOUT_SEED)
        held_set = set(held)
        rest = [i for i in range(len(full)) if i not in held_set]
        if config.limit is not None:
            rest = [rest[j] for j in stratified_subset([full.labels[i] for i in rest], config.limit,
                                                       seed=config.seed)]
        if config.eval_limit is not None and config.eval_split != HOLDOUT:
            held = [held[j] for j in stratified_subset([full.labels[i] for i in held], config.eval_limit,
                                                       seed=HOLDOUT_SEED)]
        train_split, eval_split = subset_split(full, rest), subset_split(full, held)
    else:
        train_split = encode_split(task, tokenizer, "train", verbalizer, max_length=config.max_length,
                                   limit=config.limit, seed=config.seed)
        eval_split = encode_split(task, tokenizer, config.eval_split, verbalizer,
                                  max_length=config.max_length, limit=config.eval_limit, seed=HOLDOUT_SEED)
    if len(train_split) == 0:
        raise ConfigError(f"the training split of {config.dataset} is empty")
    return verbalizer, train_split, eval_split


def load_response_task(config: TrainConfig):
    """The prompt/response task of a generative config: the gsm8k preset (from ``data_dir``) or a local file
    or directory with ``prompt_column`` / ``response_column``."""
    if is_generative_preset(config.dataset):
        if config.data_dir is None:
            raise ConfigError("the gsm8k preset is read from --data-dir (the folder holding gsm8k/)")
        return load_gsm8k(config.data_dir)
    return load_responses(config.dataset, prompt_column=config.prompt_column or "prompt",
                          response_column=config.response_column or "response")


def encode_response_task(task, tokenizer, config: TrainConfig):
    """(train split, eval split) of a prompt/response task, encoded (:func:`~salf_engine.data.responses.
    encode_responses`) after drawing the subsets as :func:`encode_task` does, without classes: held-out rows
    (the same for every seed), then ``limit`` training rows drawn with the run's seed and ``eval_limit``
    evaluation rows drawn with :data:`HOLDOUT_SEED` (the same for every seed)."""
    import random


    def draw(rows: list[int], count: int | None, seed: int) -> list[int]:
        if count is None or count >= len(rows):
            return rows
        return sorted(random.Random(seed).sample(rows, count))

    held_count = held_out_count(task, config)
    train_rows = list(range(len(task.splits["train"])))
    if held_count is not None:
        held = draw(train_rows, held_count, HOLDOUT_SEED)
        held_set = set(held)
        train_rows = [i for i in train_rows if i not in held_set]
        eval_examples = [task.splits["train"][i] for i in held]
    else:
        eval_examples = task.splits[config.eval_split]
    eval_examples = [eval_examples[i] for i in draw(list(range(len(eval_examples))), config.eval_limit,
                                                     HOLDOUT_SEED)]
    train_examples = [task.splits["train"][i] for i in draw(train_rows, config.limit, config.seed)]
    return (encode_responses(train_examples, tokenizer, max_length=config.max_length),
            encode_responses(eval_examples, tokenizer, max_length=config.max_length))


def check_resume(config: TrainConfig) -> None:
    """ConfigError unless ``config.output`` holds an unfinished run of the same config (the fields of
    :data:`~salf_engine.training.checkpoint.RESUME_MAY_CHANGE` aside); the error lists every difference."""
    import json


    if not config.output:
        raise ConfigError("resume needs the run directory as output")
    out_dir = Path(config.output)
    saved_path = out_dir / "config.json"
    if not saved_path.is_file():
        raise ConfigError(f"cannot resume {out_dir}: it holds no run (no config.json)")
    if (out_dir / "summary.json").exists():
        raise ConfigError(f"cannot resume {out_dir}: the run is finished (summary.json exists)")
    try:
        saved = json.loads(saved_path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"cannot resume {out_dir}: its config.json is unreadable") from None
    diffs = config_differences(saved, config.to_dict())
    if diffs:
        raise ConfigError(f"cannot resume {out_dir} with a different config (saved -> given): "
                          + "; ".join(diffs))


def prepare(config: TrainConfig, *, resume: bool = False) -> Prepared:
    """Validate the inputs, load data and model; nothing is written. Raises SalfError subclasses.

    With ``resume`` the output must hold an unfinished run of the same config (see :func:`check_resume`).
    """
    config.validate()
    out_dir = Path(config.output) if config.output else None
    if resume:
        check_resume(config)
    # under torchrun only rank 0 owns (checks, then writes) the run directory
    if out_dir is not None and int(os.environ.get("RANK", "0")) == 0 and not resume:
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"output {out_dir} exists and is not a directory")
        if (out_dir / "summary.json").exists() and not config.overwrite:
            raise ConfigError(f"{out_dir} already holds a finished run; pass --overwrite to replace it")
        if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
            raise ConfigError(f"output {out_dir} is a non-empty directory that holds no run; choose another")
        _refuse_to_clear_checkpoints(out_dir, config)
    if out_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        check_writable(out_dir)  # fail before loading anything
    strategy = strategy_from_config(config)
    device = resolve_device(config.device)
    if config.generative:
        task = load_response_task(config)
    else:
        task = load_task(config.dataset, config.data_dir, text_column=config.text_column,
                         text_pair_column=config.text_pair_column, label_column=config.label_column)
    held_out_count(task, config)  # a missing evaluation split fails here, before the model loads
    t0 = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=torch.float32, load_in_4bit=config.load_in_4bit,
                                  device=str(device))
    load_seconds = time.perf_counter() - t0
    if config.generative:
        verbalizer = None
        train_split, eval_split = encode_response_task(task, tokenizer, config)
    else:
        verbalizer, train_split, eval_split = encode_task(task, tokenizer, config)
    return Prepared(config=config, strategy=strategy, device=device, task=task, model=model,
                    tokenizer=tokenizer, verbalizer=verbalizer, train_split=train_split,
                    eval_split=eval_split, load_seconds=load_seconds, out_dir=out_dir)


def _refuse_to_clear_checkpoints(out_dir: Path, config: TrainConfig) -> None:
    """A fresh start would clear an unfinished run's checkpoints: only with ``overwrite``."""
    kept = list_checkpoints(out_dir)
    if kept and not config.overwrite and not (out_dir / "summary.json").exists():
        raise ConfigError(f"{out_dir} holds an unfinished run with checkpoints (newest: {kept[0].name}); "
                          "pass --resume to continue it, or --overwrite to start again")
