"""One training step: the loss, one micro-batch at a runner cut, the optimizer step and its schedule.

Every loop (the engine's own, an HF Trainer, an accelerate or torchrun loop) trains through
:func:`micro_batch_step` (forward at the micro-batch's cut, loss weighted by its share of the step,
backward) and :func:`optimizer_step` (clip, step, schedule, zero).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from salf_engine.config import TrainConfig
from salf_engine.data import collate
from salf_engine.data.responses import collate_responses
from salf_engine.errors import ConfigError
from salf_engine.integrations.distributed import all_reduce_grads, all_reduce_sum
from salf_engine.schedule.driver import Observation, StrategyDriver
from salf_engine.schedule.sampling import rank_slice
from salf_engine.training.cost import CostMeter

__all__ = [
    "StepOutput",
    "StepRunner",
    "autocast_context",
    "build_optimizer",
    "build_scheduler",
    "clip_or_measure",
    "compute_loss",
    "lr_factor",
    "micro_batch_step",
    "optimizer_step",
    "response_micro_batch_step",
]


def autocast_context(dtype: str, device: torch.device):
    """bf16 autocast on the device for dtype 'bf16'; nothing for float32."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_optimizer(params: Sequence[torch.nn.Parameter], config: TrainConfig,
                    lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (no decay on norms and biases), fused where torch has the
    kernel (CPU and CUDA: half the time of the default loop on 111M CPU parameters); ``lr`` defaults to
    the config's learning rate for full weights."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (CPU and CUDA) is the fastest AdamW; other devices take the default loop
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr or config.resolved_lr(False),
                             betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


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
    """The loss of each row of a batch ([B]; the training loss is its mean).

    next-token: cross-entropy of the full-vocabulary logits at the medium token vs the label token id.
    semantic-ce: cross-entropy over the K cosines of the final-norm state to the label bases / temperature.
    cosine: 1 - cosine of the final-norm state to the ground-truth basis.
    """
    if loss == "next-token":
        return F.cross_entropy(out.logits.float(), label_token_ids[labels], reduction="none")
    if bases is None:
        raise ConfigError(f"loss {loss!r} needs the semantic bases")
    h = F.normalize(out.last_hidden.float(), dim=-1)
    b = F.normalize(bases.to(h.device).float(), dim=-1)
    cos = h @ b.T
    if loss == "semantic-ce":
        return F.cross_entropy(cos / temperature, labels, reduction="none")
    if loss == "cosine":
        return 1.0 - cos.gather(1, labels[:, None])[:, 0]
    raise ConfigError(f"unknown loss {loss!r}")


@dataclass
class StepOutput:
    """What one micro-batch step leaves (detached): its mean loss, each row's loss and its deviations (when
    asked)."""

    loss: torch.Tensor
    row_losses: torch.Tensor
    deviations: torch.Tensor | None


def micro_batch_step(runner, model, batch: dict[str, Any], depth: int | Sequence[int],
                     trainable: Sequence[bool], *, weight: float, label_token_ids: torch.Tensor,
                     bases: torch.Tensor | None, config: TrainConfig,
                     want_deviations: bool = False) -> StepOutput:
    """Forward a collated micro-batch at cut ``depth`` (one int, or one per row: ``MicroBatch.runner_depth``)
    with the plan's ``trainable`` mask, backward its loss times ``weight`` (its share of the step's
    examples); gradients accumulate in the parameters.

    ``model`` is the :class:`~salf_engine.training.wrapping.TrainableModel` whose ``requires_grad`` flags
    follow the
    mask from the lowest cut up; ``batch`` holds input_ids, attention_mask, last_index and labels ([B])
    tensors; ``bases`` are the label bases of the semantic losses.
    """
    device = label_token_ids.device
    labels = batch["labels"].to(device)
    rows = [depth] if isinstance(depth, int) else list(depth)
    train_embed = model.set_trainable(min(rows), trainable, rows)
    with autocast_context(config.dtype, device):
        out = runner(batch["input_ids"].to(device), batch["attention_mask"].to(device), depth=depth,
                     last_index=batch["last_index"].to(device), labels=labels if want_deviations else None,
                     gradient_checkpointing=config.gradient_checkpointing, train_embeddings=train_embed)
    rows_loss = compute_loss(out, labels, label_token_ids, bases, config.loss, config.semantic_temperature)
    loss = rows_loss.mean()
    (loss * weight).backward()
    return StepOutput(loss=loss.detach(), row_losses=rows_loss.detach(), deviations=out.deviations)


def response_micro_batch_step(runner, model, batch: dict[str, Any], depth: int | Sequence[int],
                              trainable: Sequence[bool], *, weight: float, config: TrainConfig
                              ) -> StepOutput:
    """:func:`micro_batch_step` for a prompt/response batch (:func:`~salf_engine.data.responses.
    collate_responses`): the response-only loss (:func:`~salf_engine.training.sft.response_loss`), its token
    sum
    times ``weight`` (1 / the step's supervised tokens) backward. ``loss`` is the token sum, ``row_losses``
    each row's mean."""
    from salf_engine.training.sft import response_loss

    rows = [depth] if isinstance(depth, int) else list(depth)
    train_embed = model.set_trainable(min(rows), trainable, rows)
    device = next(model.model.parameters()).device
    with autocast_context(config.dtype, device):
        out = response_loss(runner, batch, depth, gradient_checkpointing=config.gradient_checkpointing,
                            train_embeddings=train_embed)
    (out.total * weight).backward()
    return StepOutput(loss=out.total.detach(), row_losses=out.rows, deviations=None)


def clip_or_measure(params, max_grad_norm: float | None) -> torch.Tensor:
    """The total gradient norm of ``params`` (those with a gradient; 0 when none has one), clipped to
    ``max_grad_norm`` when given; inf or nan when a gradient is. A tensor: no host sync here."""
    grads = [q for q in params if q.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_grad_norm is not None:
        return torch.nn.utils.clip_grad_norm_(grads, max_grad_norm)
    return torch.nn.utils.get_total_norm([q.grad for q in grads])


def optimizer_step(optimizer, scheduler, params: Sequence[torch.nn.Parameter],
                   max_grad_norm: float | None) -> float:
    """Clip (with ``max_grad_norm``), step, advance the schedule, zero the grads; returns the step's lr."""
    if max_grad_norm is not None:
        clip_or_measure(params, max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


@dataclass
class StepRunner:
    """Forward and backward of one optimizer step's micro-batches (this rank's share of each); the semantic
    losses measure against the runner's current bases (recomputed every epoch with ``train_head``)."""

    runner: Any
    wrapped: Any
    train_split: Any
    driver: StrategyDriver
    cost: CostMeter
    config: TrainConfig
    label_token_ids: torch.Tensor | None  # None: a prompt/response task
    pad_id: int
    rank: int
    world: int

    def __call__(self, plan) -> tuple[float, float, list[Observation]]:
        """Gradients of the step accumulated (and all-reduced), clipped; returns (mean loss over the step's
        examples, gradient norm, what each micro-batch showed, for ``driver.observe``)."""
        device = next(self.wrapped.model.parameters()).device
        loss_sum = torch.zeros((), device=device)
        seen: list[Observation] = []
        generative = self.label_token_ids is None
        # classification: every example weighs 1 / (examples in the step); a prompt/response task: every
        # supervised token weighs 1 / (supervised tokens in the step), whatever its micro-batch and rank
        per = self.train_split.supervised(plan.indices) if generative else len(plan)
        for mb in rank_slice(plan, self.rank, self.world):
            if generative:
                batch = collate_responses(self.train_split, mb.indices, self.pad_id)
                res = response_micro_batch_step(self.runner, self.wrapped, batch, mb.runner_depth,
                                                mb.trainable, weight=(mb.weight > 0) / per,
                                                config=self.config)
            else:
                batch = collate(self.train_split, mb.indices, self.pad_id, padding_side="left")
                res = micro_batch_step(self.runner, self.wrapped, batch, mb.runner_depth, mb.trainable,
                                       weight=mb.weight, label_token_ids=self.label_token_ids,
                                       bases=self.runner.bases, config=self.config,
                                       want_deviations=self.driver.wants_deviations)
            if mb.weight > 0:
                loss_sum += res.loss if generative else res.loss * len(mb.indices)
                if self.driver.wants_observations:
                    seen.append(Observation(mb.indices, res.deviations, res.row_losses))
        self.cost.add_plan(plan)
        all_reduce_grads(self.wrapped.trainable)
        step_loss = float(all_reduce_sum(loss_sum)) / max(per, 1)
        grad_norm = float(clip_or_measure(self.wrapped.trainable, self.config.max_grad_norm))
        return step_loss, grad_norm, seen
