"""What every example shares: the command line, the model, the task and the engine's evaluation."""

from __future__ import annotations

import argparse
from typing import Any

from salf_engine.config import TrainConfig
from salf_engine.data import load_task
from salf_engine.evaluation import evaluate
from salf_engine.models.loading import load_model
from salf_engine.semantics import semantic_bases
from salf_engine.training import encode_task

__all__ = ["evaluate_model", "load", "parser"]


def parser(description: str) -> argparse.ArgumentParser:
    """The options of every example."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2-135m", help="short name, HF directory or .gguf file")
    p.add_argument("--dataset", default="trec", help="preset (trec, sst5, carer, ...) or a data directory")
    p.add_argument("--strategy", default="salf")
    p.add_argument("--budget", default="uniform")
    p.add_argument("--limit", type=int, default=None, help="training examples (class-stratified)")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size (per device)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    p.add_argument("--output", default="runs/example")
    return p


def load(args: argparse.Namespace) -> dict[str, Any]:
    """The SALF config, model, tokenizer, encoded splits and label bases the options ask for."""
    cfg = TrainConfig(model=args.model, dataset=args.dataset, strategy=args.strategy, budget=args.budget,
                      limit=args.limit, eval_limit=args.eval_limit, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, max_steps=args.max_steps, lr=args.lr, seed=args.seed,
                      zero_shot_eval=False).validate()
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
