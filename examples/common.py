"""What every example shares: the command line, the model, the task and the engine's evaluation."""

from __future__ import annotations

import argparse
from typing import Any

from salf_engine.cli.options import add_config_options, fields_from_args
from salf_engine.config import TrainConfig
from salf_engine.data import load_task
from salf_engine.deviation.semantics import semantic_bases
from salf_engine.evaluation.classification import evaluate
from salf_engine.models.loading import load_model
from salf_engine.training.inputs import encode_task

__all__ = ["evaluate_model", "load", "parser"]


#: The TrainConfig fields the examples take as options, and the examples' own defaults for some of them.
FIELDS = ("model", "dataset", "strategy", "budget", "limit", "eval_limit", "batch_size", "grad_accum",
          "max_steps", "lr", "seed", "output")
DEFAULTS = {"budget": "uniform", "grad_accum": 2, "max_steps": 60, "lr": 1e-4, "output": "runs/example"}


def parser(description: str) -> argparse.ArgumentParser:
    """The options of every example: TrainConfig fields (generated as `salf train` generates them)."""
    p = argparse.ArgumentParser(description=description)
    add_config_options(p, FIELDS, defaults=DEFAULTS)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    return p


def load(args: argparse.Namespace) -> dict[str, Any]:
    """The SALF config, model, tokenizer, encoded splits and label bases the options ask for."""
    cfg = TrainConfig(**fields_from_args(args, exclude=("output",)), zero_shot_eval=False).validate()
    model, tokenizer = load_model(cfg.model)
    task = load_task(cfg.dataset)
    verbalizer, train_split, eval_split = encode_task(task, tokenizer, cfg)
    bases = semantic_bases(model, verbalizer.label_token_ids)
    return dict(config=cfg, model=model, tokenizer=tokenizer, task=task, verbalizer=verbalizer,
                train_split=train_split, eval_split=eval_split, bases=bases)


def evaluate_model(model: Any, loaded: dict[str, Any]) -> dict[str, float]:
    """Label-restricted and free accuracy / macro-F1 of `model` on the evaluation split."""
    model.eval()
    report = evaluate(model, loaded["tokenizer"], loaded["eval_split"], loaded["verbalizer"],
                      batch_size=32, classes=list(loaded["task"].classes), progress=False)
    return report.summary()
