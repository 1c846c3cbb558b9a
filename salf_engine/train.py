"""The training loop: dataset -> prompt -> depth bucket -> truncated runner -> loss -> metrics.

Every strategy (full fine-tuning, SALF, LoRA, LIFT, fixed and adaptive
freezing) goes through the same loop: per micro-batch the strategy yields a
`StepPlan` (sample indices, a runner cut `depth`, an optional per-layer
trainable mask); the trainer sets ``requires_grad`` from the mask (only among
the parameters that were trainable at the start: with LoRA that is the adapter
alone), runs `TruncatedRunner` at that depth, and steps AdamW after
``grad_accum`` micro-batches. Deviations come out of the training forward and
go back to the strategy (`observe`) so Algorithm-3 SALF can refresh eof-layers.

The semantic bases of the label tokens are computed once, before training:
they depend only on the LM head, which fine-tuning moves little, and the eof
of a sample is an argmax over gains that tolerates such small shifts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import TrainConfig
from .errors import ConfigError

__all__ = [
    "train",
    "prepare",
    "encode_task",
    "profile_deviations",
    "compute_loss",
    "build_optimizer",
    "apply_lora",
    "resolve_device",
    "RUN_FILES",
    "HOLDOUT",
    "CostMeter",
    "profile_subset",
    "strategy_from_config",
]

#: ``eval_split`` value that evaluates on examples held out of the training split.
HOLDOUT = "holdout"
#: Seed of the held-out draw: the same validation examples for every run seed.
HOLDOUT_SEED = 20240617

# Everything a run directory may hold; overwrite clears exactly these.
RUN_FILES = ("config.json", "metrics.jsonl", "model", "eval.json", "eval.txt", "eof_hist.png", "summary.json",
             "zero_shot_eval.json")


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available")
    return torch.device(device)


def autocast_context(dtype: str, device: torch.device):
    """bf16 autocast on the device for dtype 'bf16'; nothing for float32."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- setup

def apply_lora(model, config: TrainConfig, layers: Sequence[int] | None = None):
    """Wrap `model` with a PEFT LoRA adapter on the attention + MLP projections (optionally some layers)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in config.lora_target_modules if t in names]
    if not targets:
        raise ConfigError(
            f"none of the LoRA target modules {config.lora_target_modules} exist in this model"
        )
    kwargs: dict[str, Any] = {}
    if layers is not None:
        kwargs["layers_to_transform"] = sorted(int(i) for i in layers)
        kwargs["layers_pattern"] = "layers"
    lora_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM", **kwargs,
    )
    return get_peft_model(model, lora_config)


def build_optimizer(params: Sequence[torch.nn.Parameter], config: TrainConfig,
                    lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (no decay on norms and biases); ``lr`` defaults to the
    config's learning rate for full weights."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr or config.resolved_lr(False),
                             betas=(0.9, 0.999), eps=1e-8)


def lr_factor(step: int, warmup: int, total: int, schedule: str = "linear") -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based): warm-up ``(step+1)/(warmup+1)``,
    then constant, or linear decay to ``1/(total-warmup)`` at the last step. Never 0: every step learns."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    return max(total - step, 1) / max(total - warmup, 1)


def build_scheduler(optimizer, config: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay (or constant); see `lr_factor`."""
    warmup = int(round(config.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, config.schedule))


def compute_loss(out, labels: torch.Tensor, label_token_ids: torch.Tensor, bases: torch.Tensor | None,
                 loss: str = "next-token", temperature: float = 0.05) -> torch.Tensor:
    """Mean loss of a batch.

    next-token: cross-entropy of the full-vocabulary logits at the medium token vs the label token id.
    semantic-ce: cross-entropy over the K cosines of the final-norm state to the label bases / temperature.
    cosine: 1 - cosine of the final-norm state to the ground-truth basis.
    """
    if loss == "next-token":
        return F.cross_entropy(out.logits.float(), label_token_ids[labels])
    if bases is None:
        raise ConfigError(f"loss {loss!r} needs the semantic bases")
    h = F.normalize(out.last_hidden.float(), dim=-1)
    b = F.normalize(bases.to(h.device).float(), dim=-1)
    cos = h @ b.T
    if loss == "semantic-ce":
        return F.cross_entropy(cos / temperature, labels)
    if loss == "cosine":
        return (1.0 - cos.gather(1, labels[:, None])).mean()
    raise ConfigError(f"unknown loss {loss!r}")


@torch.no_grad()
def profile_deviations(runner, encoded, pad_id: int, *, batch_size: int = 32, dtype: str = "float32",
                       progress: bool = True, desc: str = "profile") -> torch.Tensor:
    """float32 [N, m+1]: deviations of every sample of `encoded` in every space, one batched no-grad pass."""
    from .data import collate

    if runner.bases is None:
        raise ConfigError("profiling deviations needs the runner's semantic bases")
    device = next(runner.model.parameters()).device
    n = len(encoded)
    out = torch.empty(n, runner.num_layers + 1, dtype=torch.float32)
    order = sorted(range(n), key=lambda i: len(encoded.input_ids[i]))
    was_training = runner.model.training
    runner.model.eval()
    try:
        for s in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            idx = order[s:s + batch_size]
            batch = collate(encoded, idx, pad_id, padding_side="left")
            with autocast_context(dtype, device):
                res = runner(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             depth=runner.num_layers, last_index=batch["last_index"].to(device),
                             labels=batch["labels"].to(device))
            out[torch.as_tensor(idx)] = res.deviations.float().cpu()
    finally:
        runner.model.train(was_training)
    return out


def encode_task(task, tokenizer, config: TrainConfig):
    """(verbalizer, train split, eval split) of `task`, encoded as `config` says (length, limits, seed).

    With ``eval_split="holdout"`` the evaluation examples are ``holdout_size`` class-stratified examples
    carved out of the training split (the same ones for every run seed, :data:`HOLDOUT_SEED`), and the
    training subset is drawn from the rest: a validation part for choosing hyperparameters that never
    touches the test split.
    """
    from .data import Verbalizer, encode_split, stratified_subset, subset_split

    verbalizer = Verbalizer(task.classes, task.label_words, tokenizer)
    if config.eval_split == HOLDOUT:
        full = encode_split(task, tokenizer, "train", verbalizer, max_length=config.max_length)
        if config.holdout_size >= len(full):
            raise ConfigError(f"holdout_size {config.holdout_size} leaves no training example out of the "
                              f"{len(full)} of {config.dataset}'s training split")
        held = stratified_subset(full.labels, config.holdout_size, seed=HOLDOUT_SEED)
        held_set = set(held)
        rest = [i for i in range(len(full)) if i not in held_set]
        if config.limit is not None:
            rest = [rest[j] for j in stratified_subset([full.labels[i] for i in rest], config.limit,
                                                       seed=config.seed)]
        train_split, eval_split = subset_split(full, rest), subset_split(full, held)
    else:
        train_split = encode_split(task, tokenizer, "train", verbalizer, max_length=config.max_length,
                                   limit=config.limit, seed=config.seed)
        eval_split = encode_split(task, tokenizer, config.eval_split, verbalizer,
                                  max_length=config.max_length, limit=config.eval_limit, seed=config.seed)
    if len(train_split) == 0:
        raise ConfigError(f"the training split of {config.dataset} is empty")
    return verbalizer, train_split, eval_split


def strategy_from_config(config: TrainConfig):
    """The :class:`~salf_engine.strategies.Strategy` a config asks for (ConfigError for a bad combination)."""
    from .strategies import make_strategy

    return make_strategy(config.strategy, budget=config.budget, infill=config.infill,
                         freeze_fraction=config.freeze_fraction, seed=config.seed,
                         boundary=config.eof_boundary, lora=config.lora, schedule=config.depth_schedule,
                         assignment=config.depth_assignment, cuts_per_step=config.cuts_per_step)


def prepare(config: TrainConfig) -> dict[str, Any]:
    """Validate the inputs, load data and model; nothing is written. Raises SalfError subclasses."""
    from .data import load_task
    from .models.loading import load_model

    config.validate()
    out_dir = Path(config.output) if config.output else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"output {out_dir} exists and is not a directory")
        if (out_dir / "summary.json").exists() and not config.overwrite:
            raise ConfigError(f"{out_dir} already holds a finished run; pass --overwrite to replace it")
        if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
            raise ConfigError(f"output {out_dir} is a non-empty directory that holds no run; choose another")
    strategy = strategy_from_config(config)
    device = resolve_device(config.device)
    task = load_task(config.dataset, config.data_dir, text_column=config.text_column,
                     text_pair_column=config.text_pair_column, label_column=config.label_column)
    t0 = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype=torch.float32, load_in_4bit=config.load_in_4bit,
                                  device=str(device))
    load_seconds = time.perf_counter() - t0
    verbalizer, train_split, eval_split = encode_task(task, tokenizer, config)
    return dict(config=config, strategy=strategy, device=device, task=task, model=model,
                tokenizer=tokenizer, verbalizer=verbalizer, train_split=train_split, eval_split=eval_split,
                load_seconds=load_seconds, out_dir=out_dir)


# ----------------------------------------------------------------------------- run directory

class _RunDir:
    """Writes the artefacts of a run; summary.json last and atomically."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is None:
            return
        path.mkdir(parents=True, exist_ok=True)
        # a finished run is only replaced with overwrite (checked in `prepare`), an unfinished one always;
        # drop the finished marker first, so an interrupted overwrite never looks finished
        (path / "summary.json").unlink(missing_ok=True)
        for name in RUN_FILES:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        self._metrics = open(path / "metrics.jsonl", "w")  # noqa: SIM115 - closed in close()

    def log(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def write_json(self, name: str, data: Any) -> None:
        if self.path is not None:
            _atomic_write(self.path / name, json.dumps(data, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if self.path is not None:
            _atomic_write(self.path / name, text)

    def close(self) -> None:
        if self.path is not None and not self._metrics.closed:
            self._metrics.close()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the loop

_Params = list[torch.nn.Parameter]


def _param_groups(parts) -> tuple[_Params, list[_Params], _Params]:
    """(embedding params, params of each layer, everything else: norm, head, a tied embedding)."""
    embed = list(parts.embed.parameters())
    layers = [list(layer.parameters()) for layer in parts.layers]
    seen = {id(p) for p in embed} | {id(p) for ps in layers for p in ps}
    rest = [p for p in parts.model.parameters() if id(p) not in seen]
    # tied head: the embedding matrix is also the head and trains through it
    head_ids = {id(p) for p in parts.lm_head.parameters()}
    rest += [p for p in embed if id(p) in head_ids]
    return embed, layers, rest


@dataclass
class _ProbeTally:
    examples: int = 0
    seconds: float = 0.0


class CostMeter:
    """What a run's training cost, in units of one decoder layer's forward over one example.

    Per trained example: m units of forward; in backward, 2 units for every layer whose weights train
    (input and weight gradients) and 1 for every layer above the cut that only passes the gradient down
    (a masked layer, or a LoRA-wrapped one: its adapter's gradient is negligible). Full fine-tuning
    costs 3m per example; a profiled example costs m (forward only). The head and embedding are
    left out: at the medium token only, the head is a small part of a step.
    """

    def __init__(self, num_layers: int, *, lora: bool) -> None:
        self.m = num_layers
        self.lora = lora
        self.examples = 0
        self._depth_sum = 0
        self._units = 0
        self._depths: Counter[int] = Counter()

    def add(self, n: int, depth: int, trainable: Sequence[bool]) -> None:
        """Count ``n`` examples trained at cut ``depth`` with the per-layer ``trainable`` mask."""
        above = self.m - depth
        weights = 0 if self.lora else sum(trainable[depth:])
        self.examples += n
        self._depth_sum += n * depth
        self._units += n * (self.m + above + weights)
        self._depths[depth] += n

    def saving(self) -> float:
        """The paper's backward cost-saving ratio: mean over trained examples of depth / m."""
        return self._depth_sum / (self.examples * self.m) if self.examples else 0.0

    def flops_ratio(self, profiled: int = 0) -> float:
        """Estimated training FLOPs (``profiled`` forward-only examples included) relative to full
        fine-tuning of the same examples."""
        if not self.examples:
            return 0.0
        return (self._units + profiled * self.m) / (3 * self.m * self.examples)

    def depth_histogram(self) -> list[int]:
        """Trained examples per cut depth 0..m."""
        return [self._depths.get(k, 0) for k in range(self.m + 1)]


def profile_subset(num_samples: int, fraction: float, seed: int) -> list[int]:
    """The training samples profiled before epoch 0: ``ceil(fraction * N)`` of them, seeded, ascending."""
    count = max(1, math.ceil(fraction * num_samples))
    if count >= num_samples:
        return list(range(num_samples))
    return sorted(random.Random(seed + 7919).sample(range(num_samples), count))


def _histogram(values: Sequence[int], size: int) -> list[int]:
    counts = Counter(int(v) for v in values)
    return [counts.get(k, 0) for k in range(size)]


def train(config: TrainConfig, *, progress: bool = True, log: Callable[[str], None] | None = print,
          prepared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune as `config` says; write the run directory (when `config.output`); return the summary."""
    from .data import collate, subset_split
    from .deviation import eof_layers
    from .evaluate import evaluate
    from .runner import TruncatedRunner
    from .semantics import semantic_bases

    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    p = prepared if prepared is not None else prepare(config)
    strategy, device = p["strategy"], p["device"]
    model, tokenizer, verbalizer = p["model"], p["tokenizer"], p["verbalizer"]
    train_split, eval_split, task = p["train_split"], p["eval_split"], p["task"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    label_token_ids = torch.as_tensor(verbalizer.label_token_ids, dtype=torch.long).to(device)
    classes = list(task.classes)

    torch.manual_seed(config.seed)
    bases = semantic_bases(model, verbalizer.label_token_ids).to(device)

    run = _RunDir(p["out_dir"])
    try:
        run.write_json("config.json", config.to_dict())
        summary: dict[str, Any] = {
            "model": config.model, "dataset": config.dataset, "strategy": config.strategy,
            "num_train_examples": len(train_split), "num_eval_examples": len(eval_split),
            "classes": classes, "load_seconds": round(p["load_seconds"], 3),
        }

        zero_shot = None
        if config.zero_shot_eval:
            say(f"zero-shot evaluation on {len(eval_split)} {config.eval_split} examples ...")
            zero_shot = evaluate(model, tokenizer, eval_split, verbalizer,
                                 batch_size=config.eval_batch_size, dtype=config.dtype, classes=classes,
                                 progress=progress, desc="zero-shot eval")
            run.log({"event": "eval", "phase": "zero-shot", **zero_shot.summary(),
                     "seconds": round(zero_shot.seconds, 3)})
            run.write_json("zero_shot_eval.json", zero_shot.to_dict())
            say(_fmt_scores("zero-shot", zero_shot.summary()))

        # ---- model wrapping: LoRA adapters (all layers, or the top half) or full fine-tuning
        runner_model = model
        num_layers = TruncatedRunner(model).num_layers
        lora_mode = getattr(strategy, "uses_lora", False)
        uses_lora = bool(config.lora or lora_mode)
        if uses_lora:
            lora_layers = range(num_layers // 2, num_layers) if lora_mode == "half" else None
            runner_model = apply_lora(model, config, lora_layers)
        else:
            for prm in model.parameters():
                prm.requires_grad_(True)
        runner = TruncatedRunner(runner_model, bases=bases, lens=config.lens, metric=config.metric,
                                 deviation_impl=config.deviation_impl)
        parts = runner.parts
        m = runner.num_layers
        embed_params, layer_params, rest_params = _param_groups(parts)
        # layer-freezing strategies keep the head (and the embedding below every frozen layer) fixed:
        # the frozen layers' input, the semantic bases and the profiled eofs stay what they were
        # (`train_head` trains the head alone: the embedding's input path stays frozen even when tied)
        full_weights = strategy.name == "full" and not uses_lora
        if not full_weights:
            for q in embed_params:
                q.requires_grad_(False)
            for q in parts.lm_head.parameters():
                q.requires_grad_(config.train_head)
        head_trains = any(q.requires_grad for q in parts.lm_head.parameters())
        base_trainable = [q for q in runner_model.parameters() if q.requires_grad]
        base_ids = {id(q) for q in base_trainable}
        embed_trainable = full_weights and any(id(q) in base_ids for q in embed_params)
        if not base_trainable:
            raise ConfigError("the model has no trainable parameters")
        lr = config.resolved_lr(uses_lora)
        labels_all = list(train_split.labels)

        # ---- eof profile (one batched no-grad pass, or a fraction of it) for strategies that want it
        probes = _ProbeTally()

        def probe(indices: Sequence[int]) -> list[int]:
            """eof of each given training sample under the current weights (one no-grad pass)."""
            t0 = time.perf_counter()
            dev = profile_deviations(runner, subset_split(train_split, indices), pad_id,
                                     batch_size=config.eval_batch_size, dtype=config.dtype, progress=False)
            probes.examples += len(indices)
            probes.seconds += time.perf_counter() - t0
            return eof_layers(dev, boundary=config.eof_boundary).tolist()

        eofs: list[int | None] | None = None
        profile_seconds = 0.0
        profiled = 0
        if strategy.needs_profile:
            chosen = profile_subset(len(train_split), config.profile_fraction, config.seed)
            say(f"profiling eof-layers of {len(chosen)} of {len(train_split)} training examples ...")
            t0 = time.perf_counter()
            dev = profile_deviations(runner, subset_split(train_split, chosen), pad_id,
                                     batch_size=config.eval_batch_size, dtype=config.dtype, progress=progress,
                                     desc="eof profile")
            eofs = [None] * len(train_split)
            for i, e in zip(chosen, eof_layers(dev, boundary=config.eof_boundary).tolist(), strict=True):
                eofs[i] = int(e)
            profile_seconds = time.perf_counter() - t0
            profiled = len(chosen)

        strategy.begin(m, len(train_split), eofs, config.seed, labels=labels_all)
        strategy.probe = probe
        strategy.on_train_start(parts.layers)
        step_size = config.batch_size * config.grad_accum
        steps_per_epoch = math.ceil(len(train_split) / step_size)
        total_steps = config.max_steps or steps_per_epoch * config.epochs
        optimizer = build_optimizer(base_trainable, config, lr)
        scheduler = build_scheduler(optimizer, config, total_steps)
        want_dev = bool(getattr(strategy, "needs_observe", False))
        last_seen_eofs: dict[int, int] = {}

        def set_trainable(depth: int, mask: Sequence[bool]) -> bool:
            """requires_grad from the plan, among the parameters trainable at the start."""
            allowed: set[int] = set()
            train_embed = embed_trainable and depth == 0 and all(mask)
            if train_embed:
                allowed.update(id(q) for q in embed_params)
            for i in range(depth, m):
                if mask[i]:
                    allowed.update(id(q) for q in layer_params[i])
            allowed.update(id(q) for q in rest_params)
            for q in base_trainable:
                q.requires_grad_(id(q) in allowed)
            return train_embed

        say(f"training: strategy {getattr(strategy, 'label', config.strategy)}, {m} layers, "
            f"{len(train_split)} examples, {total_steps} steps of {step_size} examples "
            f"(micro-batches <= {config.batch_size}), lr {lr:g}" + (" (LoRA)" if uses_lora else ""))
        runner_model.train()
        losses: list[float] = []
        cost = CostMeter(m, lora=uses_lora)
        step = 0
        epoch = 0
        t_train = time.perf_counter()
        bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress)
        try:
            while step < total_steps:
                if config.train_head and epoch > 0 and strategy.needs_profile:
                    # the head moved: recompute the label bases the deviations are measured against
                    runner.set_bases(semantic_bases(runner_model, verbalizer.label_token_ids).to(device))
                # plans are consumed lazily: a strategy may change its masks after a step (ADT)
                planned = 0
                for plan in strategy.epoch_plans(epoch, step_size, config.batch_size):
                    planned += 1
                    t_step = time.perf_counter()
                    loss_sum = torch.zeros((), device=device)
                    seen: list[tuple[list[int], torch.Tensor]] = []  # (indices, deviations) per micro-batch
                    n_step = len(plan)
                    for mb in plan.micro_batches:
                        batch = collate(train_split, mb.indices, pad_id, padding_side="left")
                        labels = batch["labels"].to(device)
                        train_embed = set_trainable(mb.depth, mb.trainable)
                        with autocast_context(config.dtype, device):
                            out = runner(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                         depth=mb.depth, last_index=batch["last_index"].to(device),
                                         labels=labels if want_dev else None,
                                         gradient_checkpointing=config.gradient_checkpointing,
                                         train_embeddings=train_embed)
                        loss = compute_loss(out, labels, label_token_ids, bases, config.loss,
                                            config.semantic_temperature)
                        # every example weighs 1 / (examples in the step), whatever its micro-batch
                        (loss * (len(mb.indices) / n_step)).backward()
                        loss_sum += loss.detach() * len(mb.indices)
                        if out.deviations is not None:
                            seen.append((mb.indices, out.deviations))
                        cost.add(len(mb.indices), mb.depth, mb.trainable)
                    if config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_([q for q in base_trainable if q.grad is not None],
                                                       config.max_grad_norm)
                    step_lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if seen:  # the step's eofs in one pass (one host sync), after the update
                        indices = [i for idx, _dev in seen for i in idx]
                        dev = torch.cat([dev for _idx, dev in seen])
                        eof = eof_layers(dev, boundary=config.eof_boundary).tolist()
                        strategy.observe(indices, eof)
                        last_seen_eofs.update(zip(indices, eof, strict=True))
                    strategy.after_step(step, parts.layers)
                    step_loss = float(loss_sum) / n_step
                    losses.append(step_loss)
                    shown = plan.depths[0] if len(plan.micro_batches) == 1 else plan.depths
                    run.log({"step": step, "epoch": epoch, "loss": step_loss, "lr": step_lr, "depth": shown,
                             "batch_size": n_step, "seconds": round(time.perf_counter() - t_step, 4)})
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", depth=shown)
                    if step >= total_steps:
                        break
                if planned == 0:
                    raise ConfigError(f"strategy {config.strategy!r} planned no step in epoch {epoch}")
                epoch += 1
                if config.max_steps is None and epoch >= config.epochs:
                    break
        finally:
            bar.close()
        train_seconds = time.perf_counter() - t_train
        for q in base_trainable:
            q.requires_grad_(True)
        runner_model.eval()

        say(f"evaluating the fine-tuned model on {len(eval_split)} {config.eval_split} examples ...")
        final = evaluate(runner_model, tokenizer, eval_split, verbalizer, batch_size=config.eval_batch_size,
                         dtype=config.dtype, classes=classes, progress=progress, desc="fine-tuned eval")
        run.log({"event": "eval", "phase": "fine-tuned", "step": step, **final.summary(),
                 "seconds": round(final.seconds, 3)})
        say(_fmt_scores("fine-tuned", final.summary()))

        # ---- artefacts (summary last)
        if run.path is not None:
            runner_model.save_pretrained(run.path / "model")
            tokenizer.save_pretrained(run.path / "model")
            run.write_json("eval.json", {"zero_shot": zero_shot.to_dict() if zero_shot else None,
                                         "fine_tuned": final.to_dict()})
            text = (f"== zero-shot ==\n{zero_shot.to_text()}\n\n" if zero_shot else "")
            run.write_text("eval.txt", text + f"== fine-tuned ==\n{final.to_text()}\n")

        eof_hist = None
        if eofs is not None:
            profiled_eofs = [e for e in eofs if e is not None]
            seen_hist = _histogram(list(last_seen_eofs.values()), m + 1) if last_seen_eofs else None
            eof_hist = {"profile": _histogram(profiled_eofs, m + 1), "last_seen": seen_hist}
            if run.path is not None:
                from .plots import eof_histogram_png

                title = f"eof-layers of {len(profiled_eofs)} training examples ({config.metric})"
                eof_histogram_png(profiled_eofs, m, run.path / "eof_hist.png", title=title)

        summary.update({
            "finished": True,
            "num_layers": m,
            "steps": step,
            "epochs_run": epoch,
            "examples_trained": cost.examples,
            "lr": lr,
            "trainable_parameters": int(sum(q.numel() for q in base_trainable)),
            "lora": uses_lora,
            "head_trained": head_trains,
            "frozen_fraction": float(strategy.realized_frozen_fraction()),
            "profiled_examples": profiled + probes.examples,
            "profile_seconds": round(profile_seconds + probes.seconds, 3),
            "train_seconds": round(train_seconds - probes.seconds, 3),
            "examples_per_second": cost.examples / train_seconds if train_seconds > 0 else None,
            "first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "loss_history": losses,
            "cost_saving_ratio": cost.saving(),
            "flops_ratio": cost.flops_ratio(profiled + probes.examples),
            "depth_histogram": cost.depth_histogram(),
            "eof_histogram": eof_hist,
            "zero_shot": zero_shot.summary() if zero_shot else None,
            "fine_tuned": final.summary(),
            "zero_shot_eval_seconds": round(zero_shot.seconds, 3) if zero_shot else None,
            "fine_tuned_eval_seconds": round(final.seconds, 3),
            "total_seconds": round(time.perf_counter() - t_start + (p["load_seconds"] if prepared else 0), 3),
        })
        run.write_json("summary.json", summary)
        return summary
    finally:
        run.close()


def _fmt_scores(phase: str, s: dict[str, float]) -> str:
    return (f"{phase}: accuracy {s['free_accuracy']:.4f} (free) / {s['restricted_accuracy']:.4f} "
            f"(label-restricted), macro-F1 {s['free_macro_f1']:.4f} / {s['restricted_macro_f1']:.4f}")


