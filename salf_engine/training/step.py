"""One training step, for every loop: one micro-batch at its cut, then the end of the step.

Every loop (the engine's own, :class:`~salf_engine.integrations.hf.SalfTrainerMixin` inside an HF Trainer,
examples/accelerate_loop.py) trains each micro-batch through :func:`micro_batch_step` (trainable flags from
its cut, the forward at its rows' cuts through the runner or the patched HF model, the loss weighted by its
share of the step, backward, what the strategy observes) and ends each step with :func:`finish_step`
(clipping, the non-finite policy, :func:`optimizer_step`: step, schedule, zero). The forwards differ only
where the loops do: :func:`runner_forward` and :func:`response_forward` (the engine's classification and
prompt/response losses) and :func:`patched_forward` (a patched HF model and its own loss). With a
:class:`~salf_engine.training.prefix_cache.PrefixCache`, :func:`runner_forward` and :func:`response_forward`
start cached rows at the frozen floor and keep the floor states of the others (docs/prefix_cache.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from salf_engine.config import TrainConfig
from salf_engine.data import collate
from salf_engine.data.responses import collate_responses
from salf_engine.errors import ConfigError, TrainingError
from salf_engine.runner.response_loss import response_loss
from salf_engine.runtime.device import autocast_context
from salf_engine.runtime.distributed import all_reduce_grads, all_reduce_sum
from salf_engine.schedule.driver import Observation, StrategyDriver
from salf_engine.schedule.plans import MicroBatch
from salf_engine.schedule.sampling import rank_slice
from salf_engine.training.cost import CostMeter
from salf_engine.training.prefix_cache import PrefixCache, floor_rows

__all__ = [
    "Forward",
    "MicroBatchLoss",
    "StepEnd",
    "StepOutput",
    "StepRunner",
    "build_optimizer",
    "build_scheduler",
    "clip_or_measure",
    "compute_loss",
    "finish_step",
    "lr_factor",
    "micro_batch_step",
    "next_token_row_losses",
    "optimizer_step",
    "patched_forward",
    "response_forward",
    "runner_forward",
]


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


class MicroBatchLoss(NamedTuple):
    """What a loop's forward gives :func:`micro_batch_step`: the loss to weight and backpropagate, each
    row's loss (detached; None when not computed) and the rows' deviations (None when not asked for)."""

    loss: torch.Tensor
    row_losses: torch.Tensor | None
    deviations: torch.Tensor | None


#: A loop's forward at the cut: ``forward(batch, depth, train_embeddings) -> MicroBatchLoss``, where
#: ``depth`` is ``MicroBatch.runner_depth`` and ``train_embeddings`` what ``set_trainable`` returned.
Forward = Callable[[dict[str, Any], "int | list[int]", bool], MicroBatchLoss]


def runner_forward(runner, *, label_token_ids: torch.Tensor, config: TrainConfig,
                   want_deviations: bool = False, prefix_cache: PrefixCache | None = None,
                   floor: int | None = None) -> Forward:
    """The engine's classification forward: the truncated runner at the cut (autocast as ``config.dtype``
    says), then :func:`compute_loss` against the runner's current label bases; the loss is the rows' mean.
    ``batch`` holds input_ids, attention_mask, last_index and labels ([B] class indices; with
    ``prefix_cache`` also ``indices``, the rows' training-split indices: rows it keeps start at the floor,
    ``floor`` (the step's ``StepPlan.floor``; default the cache's), the others leave their floor states in
    it)."""
    device = label_token_ids.device

    def forward(batch: dict[str, Any], depth, train_embeddings: bool) -> MicroBatchLoss:
        labels = batch["labels"].to(device)
        with (floor_rows(prefix_cache, batch.get("indices"), batch["input_ids"], batch["attention_mask"],
                         floor) as rows,
              autocast_context(config.dtype, device)):
            out = runner(batch["input_ids"].to(device), batch["attention_mask"].to(device), depth=depth,
                         last_index=batch["last_index"].to(device),
                         labels=labels if want_deviations else None,
                         gradient_checkpointing=config.gradient_checkpointing,
                         train_embeddings=train_embeddings, prefix=rows)
        losses = compute_loss(out, labels, label_token_ids, runner.bases, config.loss,
                              config.semantic_temperature)
        return MicroBatchLoss(losses.mean(), losses.detach(), out.deviations)

    return forward


def response_forward(runner, *, config: TrainConfig, device: torch.device,
                     prefix_cache: PrefixCache | None = None, floor: int | None = None) -> Forward:
    """The engine's prompt/response forward (:func:`~salf_engine.data.responses.collate_responses` batches):
    the response-only loss (:func:`~salf_engine.runner.response_loss.response_loss`); the loss is its token
    sum, the row losses each row's mean. With ``prefix_cache`` (``batch["indices"]``: the rows'
    training-split indices) the rows it keeps (every real token, prompt and response) start at the floor
    (``floor``: the step's), the others leave their floor states in it, as in :func:`runner_forward`."""

    def forward(batch: dict[str, Any], depth, train_embeddings: bool) -> MicroBatchLoss:
        with (floor_rows(prefix_cache, batch.get("indices"), batch["input_ids"], batch["attention_mask"],
                         floor) as rows,
              autocast_context(config.dtype, device)):
            out = response_loss(runner, batch, depth, gradient_checkpointing=config.gradient_checkpointing,
                                train_embeddings=train_embeddings, prefix=rows)
        return MicroBatchLoss(out.total, out.rows, None)

    return forward


def patched_forward(module, *, row_losses: bool = False, context: Callable[[], Any] | None = None,
                    prefix_cache: PrefixCache | None = None, floor: int | None = None) -> Forward:
    """The forward of a SALF-patched HF model (:func:`~salf_engine.integrations.patching.patch_model`,
    possibly wrapped by DDP / FSDP / accelerate): ``module(**batch, salf_depth=..., ...)``, whose loss is
    the model's own over ``labels`` (-100: not supervised); ``row_losses``: also each row's mean next-token
    loss (:func:`next_token_row_losses`); ``context``: what the forward runs in (a Trainer's autocast).
    ``batch`` may hold ``salf_index`` (the rows' training-split indices), which never reaches the model:
    with ``prefix_cache`` the rows it keeps start at the floor (``floor``: the step's), the others leave
    their floor states in it, as in :func:`runner_forward`."""

    def forward(batch: dict[str, Any], depth, train_embeddings: bool) -> MicroBatchLoss:
        batch = dict(batch)
        indices = batch.pop("salf_index", None)
        with (floor_rows(prefix_cache, indices, batch["input_ids"], batch.get("attention_mask"),
                         floor) as rows,
              context() if context is not None else contextlib.nullcontext()):
            out = module(**batch, salf_depth=depth, salf_train_embeddings=train_embeddings, salf_prefix=rows)
        rows = next_token_row_losses(out.logits, batch["labels"]) if row_losses else None
        return MicroBatchLoss(out.loss, rows, out.deviations)

    return forward


def next_token_row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token cross-entropy over its supervised labels (``-100`` ignored), detached;
    0 for a row without one."""
    with torch.no_grad():
        targets = labels[:, 1:].to(logits.device)
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                             reduction="none")
        kept = targets != -100
        return (ce * kept).sum(1) / kept.sum(1).clamp(min=1)


@dataclass
class StepOutput:
    """What one micro-batch step leaves (detached): its loss, each row's loss and deviations (when the
    forward gave them), and the strategy's :class:`Observation` of it (None when not asked for, or for a
    rank's weight-0 stand-in row)."""

    loss: torch.Tensor
    row_losses: torch.Tensor | None
    deviations: torch.Tensor | None
    observation: Observation | None = None


def micro_batch_step(forward: Forward, model, mb: MicroBatch, batch: dict[str, Any], *,
                     weight: float | None = None, observe: bool = False,
                     backward: Callable[[torch.Tensor], Any] | None = None,
                     sync: Any = None) -> StepOutput:
    """Train one micro-batch: the one function every loop (the engine's, :class:`~salf_engine.integrations.
    hf.SalfTrainerMixin`, an accelerate loop) trains through.

    ``requires_grad`` follows the micro-batch's lowest cut and mask (``model``: the
    :class:`~salf_engine.training.wrapping.TrainableModel`), ``forward`` runs ``batch`` at the rows' cuts,
    its loss times ``weight`` (default ``mb.weight``, the micro-batch's share of the step) goes backward
    (``backward``: the loop's own, e.g. ``accelerator.backward``; default ``Tensor.backward``) and the
    gradients accumulate in the parameters. ``sync``: a context around forward and backward (DDP's
    ``no_sync`` on every micro-batch but the step's last). ``observe``: return the rows' observation
    for the strategy (``StrategyDriver.observe``).
    """
    train_embed = model.set_trainable(mb.depth, mb.trainable, mb.depths)
    with sync if sync is not None else contextlib.nullcontext():
        out = forward(batch, mb.runner_depth, train_embed)
        scaled = out.loss * (mb.weight if weight is None else weight)
        if backward is None:
            scaled.backward()
        else:
            backward(scaled)
    seen = Observation(mb.indices, out.deviations, out.row_losses) if observe and mb.weight > 0 else None
    return StepOutput(out.loss.detach(), out.row_losses, out.deviations, seen)


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
class StepEnd:
    """How an optimizer step ended: its learning rate, the gradient norm (before clipping) and, for a skipped
    step, what was non-finite (``"loss"`` or ``"gradient norm"``; None: the step updated)."""

    lr: float
    grad_norm: float
    skipped: str | None = None


def finish_step(optimizer, scheduler, params: Sequence[torch.nn.Parameter], *, loss: float,
                max_grad_norm: float | None, on_nonfinite: str = "stop", where: str = "", kept: str = "",
                update: Callable[..., Any] | None = optimizer_step,
                grad_norm: float | None = None) -> StepEnd:
    """End a step whose gradients sit in ``params`` (all-reduced over the ranks): clip them to
    ``max_grad_norm`` (or only measure their norm; ``grad_norm``: measured already), then the non-finite
    policy, then ``update`` (:func:`optimizer_step`: step, schedule, zero).

    A non-finite ``loss`` or gradient norm raises :class:`~salf_engine.errors.TrainingError` naming
    ``where`` (and what was ``kept``) with ``on_nonfinite="stop"``; with ``"skip"`` the gradients are
    dropped and the schedule still advances, so the step counts without an update. ``update=None``: the
    loop steps the optimizer and the schedule itself (an HF Trainer); a skipped step then only drops the
    gradients, so the loop's optimizer step changes nothing.
    """
    norm = float(clip_or_measure(params, max_grad_norm)) if grad_norm is None else grad_norm
    lr = scheduler.get_last_lr()[0] if scheduler is not None else math.nan
    if math.isfinite(loss) and math.isfinite(norm):
        if update is not None:
            update(optimizer, scheduler, params, None)  # clipped above
        return StepEnd(lr, norm)
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    if on_nonfinite == "stop":
        raise TrainingError(f"non-finite {what} {where}; training stopped{f', {kept}' if kept else ''}; "
                            "on_nonfinite='skip' (--on-nonfinite skip) skips such steps")
    optimizer.zero_grad(set_to_none=True)
    if update is not None:
        scheduler.step()
    return StepEnd(lr, norm, what)


@dataclass
class StepRunner:
    """The engine's forward and backward of one step plan: this rank's share of each micro-batch through
    :func:`micro_batch_step`, the plan counted in the cost meter, the gradients all-reduced over the ranks;
    the semantic losses measure against the runner's current bases (recomputed every epoch with
    ``train_head``)."""

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
    prefix_cache: PrefixCache | None = None  # each example's states at the frozen floor (prefix_cache.py)

    def __call__(self, plan) -> tuple[float, list[Observation]]:
        """Gradients of the step accumulated and all-reduced; returns (mean loss over the step's examples,
        what each micro-batch showed, for ``driver.observe``)."""
        device = next(self.wrapped.model.parameters()).device
        loss_sum = torch.zeros((), device=device)
        seen: list[Observation] = []
        generative = self.label_token_ids is None
        # classification: every example weighs 1 / (examples in the step); a prompt/response task: every
        # supervised token weighs 1 / (supervised tokens in the step), whatever its micro-batch and rank
        per = self.train_split.supervised(plan.indices) if generative else len(plan)

        def make_forward(cache: PrefixCache | None) -> Forward:
            if generative:
                return response_forward(self.runner, config=self.config, device=device, prefix_cache=cache,
                                        floor=plan.floor)
            return runner_forward(self.runner, label_token_ids=self.label_token_ids, config=self.config,
                                  want_deviations=self.driver.wants_deviations, prefix_cache=cache,
                                  floor=plan.floor)

        forward = make_forward(self.prefix_cache)
        # a rank's weight-0 stand-in row is another rank's: it leaves the cache (the ranks share it) alone
        stand_in = make_forward(None)
        for mb in rank_slice(plan, self.rank, self.world):
            if generative:
                batch = collate_responses(self.train_split, mb.indices, self.pad_id)
                batch["indices"] = mb.indices  # the cache's keys; never reaches the model
            else:
                batch = collate(self.train_split, mb.indices, self.pad_id, padding_side="left")
            res = micro_batch_step(forward if mb.weight > 0 else stand_in, self.wrapped, mb, batch,
                                   weight=(mb.weight > 0) / per if generative else None,
                                   observe=self.driver.wants_observations)
            if mb.weight > 0:
                loss_sum += res.loss if generative else res.loss * len(mb.indices)
            if res.observation is not None:
                seen.append(res.observation)
        self.cost.add_plan(plan)
        all_reduce_grads(self.wrapped.trainable)
        return float(all_reduce_sum(loss_sum)) / max(per, 1), seen
