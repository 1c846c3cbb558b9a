"""The training loop: dataset -> prompt -> depth bucket -> truncated runner -> loss -> metrics.

Every strategy (full fine-tuning, SALF, LoRA, LIFT, fixed and adaptive
freezing) goes through the same loop, built from the pieces every loop needs:
:func:`~salf_engine.training.wrapping.wrap_model` (LoRA or full weights, what may
train), :class:`~salf_engine.schedule.driver.StrategyDriver` (profile, plans,
observations), :func:`~salf_engine.training.step.micro_batch_step` (one micro-batch at
its runner cut), :func:`~salf_engine.training.step.optimizer_step` and
:class:`~salf_engine.training.rundir.RunDirectory`. Per step the strategy yields a
`StepPlan`; each micro-batch sets ``requires_grad`` from its mask, runs
`TruncatedRunner` at its depth and backpropagates its share of the step's
loss; AdamW steps once per plan. Deviations come out of the training forward
and go back to the strategy (`observe`) so Algorithm-3 SALF can refresh
eof-layers.

The semantic bases of the label tokens are computed once, before training:
they depend only on the LM head, which stays frozen under every strategy but
``full`` (with ``train_head`` they are recomputed at every epoch).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from salf_engine.config import TrainConfig
from salf_engine.errors import CheckpointError, TrainingError
from salf_engine.integrations.distributed import (
    all_reduce_grads,
    all_reduce_sum,
    init_from_env,
    rank_and_world,
)
from salf_engine.schedule.driver import Observation, StrategyDriver
from salf_engine.schedule.sampling import rank_slice
from salf_engine.training.cost import CostMeter
from salf_engine.training.inputs import Prepared, _refuse_to_clear_checkpoints, check_resume, prepare
from salf_engine.training.rundir import RunDirectory
from salf_engine.training.step import (
    build_optimizer,
    build_scheduler,
    clip_or_measure,
    micro_batch_step,
    optimizer_step,
    response_micro_batch_step,
)
from salf_engine.training.wrapping import wrap_model

__all__ = ["train"]

def train(config: TrainConfig, *, progress: bool = True, log: Callable[[str], None] | None = print,
          prepared: Prepared | None = None, resume: bool = False) -> dict[str, Any]:
    """Fine-tune as `config` says; write the run directory (when `config.output`); return the summary.

    With ``resume`` the run in ``config.output`` continues from its newest whole checkpoint (the same
    config is required, see :func:`check_resume`; without any checkpoint it starts again from step 0);
    the result equals an uninterrupted run's, bit for bit on the same device.
    """
    from salf_engine.deviation.semantics import semantic_bases
    from salf_engine.runner.truncated import TruncatedRunner
    from salf_engine.training import checkpoint as ckpt_mod

    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    if resume and prepared is not None:
        check_resume(config)
    p = prepared if prepared is not None else prepare(config, resume=resume)
    strategy, device, model, tokenizer, verbalizer = p.strategy, p.device, p.model, p.tokenizer, p.verbalizer
    train_split, eval_split = p.train_split, p.eval_split
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generative = verbalizer is None  # a prompt/response task: no classes, no label bases
    label_token_ids = (None if generative else
                       torch.as_tensor(verbalizer.label_token_ids, dtype=torch.long).to(device))
    classes = [] if generative else list(p.task.classes)

    torch.manual_seed(config.seed)
    bases = None if generative else semantic_bases(model, verbalizer.label_token_ids).to(device)

    init_from_env(device)
    if rank_and_world()[0] != 0:  # rank 0 reports and writes the run
        say = lambda _msg: None  # noqa: E731
    ckpt = None
    if not resume and p.out_dir is not None and rank_and_world()[0] == 0:
        _refuse_to_clear_checkpoints(p.out_dir, config)
    if resume and p.out_dir is not None:
        ckpt = _open_checkpoint(p.out_dir, say)
    run = RunDirectory(p.out_dir if rank_and_world()[0] == 0 else None,
                       resume_metrics_bytes=ckpt.meta["metrics_bytes"] if ckpt is not None else None)
    try:
        run.write_json("config.json", config.to_dict())
        summary: dict[str, Any] = {
            "model": config.model, "dataset": config.dataset, "strategy": config.strategy,
            "num_train_examples": len(train_split), "num_eval_examples": len(eval_split),
            "classes": classes, "load_seconds": round(p.load_seconds, 3),
            "data_rows": getattr(p.task, "row_counts", None) or None,
        }
        if generative:
            summary["responses"] = {split: {"truncated": enc.truncated, "dropped": enc.dropped}
                                    for split, enc in (("train", train_split), ("eval", eval_split))}
            say(f"data: {len(train_split)} training rows ({train_split.truncated} cut at {config.max_length} "
                f"tokens, {train_split.dropped} left out: no room for a response token), {len(eval_split)} "
                f"evaluation rows ({eval_split.truncated} cut, {eval_split.dropped} left out)")
        rows = getattr(p.task, "row_counts", None)
        if rows:
            say("data: " + "; ".join(f"{split} {c['read']} rows read, {c['skipped']} skipped (blank/header)"
                                     for split, c in rows.items() if c))

        zero_shot = None
        if ckpt is not None:
            zero_shot = _SavedReport.of(ckpt.meta.get("zero_shot"))
        elif config.zero_shot_eval:
            say(f"zero-shot evaluation on {len(eval_split)} {config.eval_split} examples ...")
            zero_shot = _evaluate(model, p, progress=progress, desc="zero-shot eval")
            run.log({"event": "eval", "phase": "zero-shot", **zero_shot.summary(),
                     "seconds": round(zero_shot.seconds, 3)})
            run.write_json("zero_shot_eval.json", zero_shot.to_dict())
            say(_fmt_scores("zero-shot", zero_shot.summary()))

        wrapped = wrap_model(model, strategy, config)
        runner = TruncatedRunner(wrapped.model, bases=bases, lens=config.lens, metric=config.metric,
                                 deviation_impl=config.deviation_impl)
        m = runner.num_layers
        lr = config.resolved_lr(wrapped.lora)
        driver = StrategyDriver(strategy, runner, train_split, config, pad_id=pad_id)
        if ckpt is not None:
            driver.load_state_dict(ckpt.meta["driver"])  # the profile of the interrupted run
        else:
            driver.profile(progress=progress, say=say)
        driver.begin(wrapped.parts.layers)
        rank, world = rank_and_world()
        step_size = config.batch_size * config.grad_accum * world
        total_steps = config.max_steps or math.ceil(len(train_split) / step_size) * config.epochs
        optimizer = build_optimizer(wrapped.trainable, config, lr)
        scheduler = build_scheduler(optimizer, config, total_steps)
        if run.path is not None and ckpt is None:
            # the final model and (with save_every) two checkpoints must fit: fail before training
            trainable_bytes = sum(q.numel() * q.element_size() for q in wrapped.trainable)
            ckpt_mod.check_free_space(run.path, trainable_bytes * (1 + (6 if config.save_every else 0)),
                                      "the model and its checkpoints")
        param_names = {id(q): n for n, q in wrapped.model.named_parameters()}

        say(f"training: strategy {getattr(strategy, 'label', config.strategy)}, {m} layers, "
            f"{len(train_split)} examples, {total_steps} steps of {step_size} examples "
            f"(micro-batches <= {config.batch_size}{f' per rank, {world} ranks' if world > 1 else ''}), "
            f"lr {lr:g}" + (" (LoRA)" if wrapped.lora else ""))
        wrapped.model.train()
        losses: list[float] = []
        cost = CostMeter(m, lora=wrapped.lora)
        run_step = _StepRunner(runner, wrapped, train_split, driver, cost, config, label_token_ids, pad_id,
                               rank, world)
        step = epoch = skipped = 0
        resume_plans = 0  # plans of the resumed epoch that ran before the checkpoint
        last_checkpoint: Path | None = None
        if ckpt is not None:
            _restore_weights(wrapped, param_names, ckpt)
            optimizer.load_state_dict(ckpt.state["optimizer"])
            scheduler.load_state_dict(ckpt.state["scheduler"])
            if ckpt.state.get("bases") is not None:
                runner.set_bases(ckpt.state["bases"].to(device))
            cost.load_state_dict(ckpt.meta["cost"])
            losses = list(ckpt.meta["losses"])
            step, epoch, skipped = ckpt.step, int(ckpt.meta["epoch"]), int(ckpt.meta["skipped_steps"])
            resume_plans = int(ckpt.meta["plans_done"])
            last_checkpoint = ckpt.path
            if step >= total_steps:  # checkpoint of the last step: the loop would have closed the epoch
                epoch += 1
        t_train = time.perf_counter()
        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress)
        try:
            while step < total_steps:
                resuming = ckpt is not None and resume_plans >= 0
                if config.train_head and epoch > 0 and strategy.needs_profile and not resuming:
                    # the head moved: recompute the label bases the deviations are measured against
                    runner.set_bases(semantic_bases(wrapped.model, verbalizer.label_token_ids).to(device))
                if resuming:  # replay the epoch's plans from the state at its start, up to the checkpoint
                    strategy.load_state_dict(ckpt.meta["epoch_start_strategy"])
                epoch_start = strategy.state_dict() if config.save_every else None
                # plans are consumed lazily: a strategy may change its masks after a step (ADT)
                plans = driver.epoch_plans(epoch, step_size, world * config.batch_size)
                plans_done = 0
                if resuming:
                    for _ in range(resume_plans):
                        next(plans)
                    plans_done, resume_plans = resume_plans, -1
                    strategy.load_state_dict(ckpt.meta["strategy"])
                    ckpt_mod.set_rng_state(ckpt.state["rng"])
                for plan in plans:
                    t_step = time.perf_counter()
                    step_loss, grad_norm, seen = run_step(plan)
                    shown = plan.depths[0] if len(plan.micro_batches) == 1 else plan.depths
                    plans_done += 1
                    if math.isfinite(step_loss) and math.isfinite(grad_norm):
                        step_lr = optimizer_step(optimizer, scheduler, wrapped.trainable, None)  # clipped
                        step += 1
                        driver.observe(seen)  # the step's eofs in one pass (one host sync), after the update
                        driver.after_step(step, wrapped.parts.layers)
                        losses.append(step_loss)
                        run.log({"step": step, "epoch": epoch, "loss": step_loss, "lr": step_lr,
                                 "depth": shown, "batch_size": len(plan),
                                 "seconds": round(time.perf_counter() - t_step, 4)})
                    else:
                        what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                        where = (f"non-finite {what} at step {step + 1} (epoch {epoch}, "
                                 f"depths {plan.depths}, examples {_shorten(plan.indices)})")
                        if config.on_nonfinite == "stop":
                            kept = (f"the run directory keeps the last good checkpoint {last_checkpoint}"
                                    if last_checkpoint is not None else "no checkpoint was written")
                            raise TrainingError(f"{where}; training stopped, {kept}; "
                                                "on_nonfinite='skip' (--on-nonfinite skip) skips such steps")
                        # skip: no update; the step still counts, so the schedule and run length stay
                        step_lr = scheduler.get_last_lr()[0]
                        optimizer.zero_grad(set_to_none=True)
                        scheduler.step()
                        step += 1
                        skipped += 1
                        driver.after_step(step, wrapped.parts.layers)
                        say(f"warning: {where}; step skipped ({skipped} so far)")
                        run.log({"step": step, "epoch": epoch, "loss": None, "lr": step_lr, "depth": shown,
                                 "batch_size": len(plan), "skipped": what,
                                 "seconds": round(time.perf_counter() - t_step, 4)})
                    if config.save_every and step % config.save_every == 0 and run.path is not None:
                        tensors = {"weights": {param_names[id(q)]: q.detach().cpu().clone()
                                               for q in wrapped.trainable},
                                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "bases": runner.bases.detach().cpu() if runner.bases is not None else None,
                                   "rng": ckpt_mod.rng_state()}
                        meta = {"epoch": epoch, "plans_done": plans_done, "skipped_steps": skipped,
                                "losses": losses, "cost": cost.state_dict(), "driver": driver.state_dict(),
                                "strategy": strategy.state_dict(), "epoch_start_strategy": epoch_start,
                                "metrics_bytes": run.metrics_bytes(),
                                "zero_shot": _SavedReport.dump(zero_shot)}
                        last_checkpoint = ckpt_mod.save_checkpoint(run.path, step, tensors, meta,
                                                                   total_limit=config.save_total_limit)
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", depth=shown)
                    if step >= total_steps:
                        break
                epoch += 1
                if config.max_steps is None and epoch >= config.epochs:
                    break
        finally:
            bar.close()
        train_seconds = time.perf_counter() - t_train
        wrapped.restore()
        wrapped.model.eval()

        say(f"evaluating the fine-tuned model on {len(eval_split)} {config.eval_split} examples ...")
        final = _evaluate(wrapped.model, p, progress=progress, desc="fine-tuned eval")
        run.log({"event": "eval", "phase": "fine-tuned", "step": step, **final.summary(),
                 "seconds": round(final.seconds, 3)})
        say(_fmt_scores("fine-tuned", final.summary()))

        if run.path is not None:  # the artefacts; summary.json last
            _write_artifacts(run, wrapped.model, tokenizer, zero_shot, final, driver, config.metric, m)

        profiled = driver.profiled + driver.probe_examples
        summary.update({
            "finished": True,
            "num_layers": m,
            "steps": step,
            "skipped_steps": skipped,
            "epochs_run": epoch,
            "examples_trained": cost.examples,
            "lr": lr,
            "trainable_parameters": int(sum(q.numel() for q in wrapped.trainable)),
            "lora": wrapped.lora,
            "head_trained": wrapped.head_trains,
            "frozen_fraction": float(strategy.realized_frozen_fraction()),
            "profiled_examples": profiled,
            "profile_seconds": round(driver.profile_seconds + driver.probe_seconds, 3),
            "train_seconds": round(train_seconds - driver.probe_seconds, 3),
            "examples_per_second": cost.examples / train_seconds if train_seconds > 0 else None,
            "first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "loss_history": losses,
            "cost_saving_ratio": cost.saving(),
            "flops_ratio": cost.flops_ratio(profiled),
            "depth_histogram": cost.depth_histogram(),
            "eof_histogram": driver.eof_histograms(),
            "zero_shot": zero_shot.summary() if zero_shot else None,
            "fine_tuned": final.summary(),
            "zero_shot_eval_seconds": round(zero_shot.seconds, 3) if zero_shot else None,
            "fine_tuned_eval_seconds": round(final.seconds, 3),
            "total_seconds": round(time.perf_counter() - t_start + (p.load_seconds if prepared else 0), 3),
        })
        run.write_json("summary.json", summary)
        return summary
    finally:
        run.close()


def _open_checkpoint(out_dir: Path, say: Callable[[str], None]):
    """The newest whole checkpoint of the run in ``out_dir`` (None: start again from step 0), after
    checking that metrics.jsonl still holds what the checkpoint recorded."""
    from salf_engine.training import checkpoint as ckpt_mod

    ckpt_mod.clean_temporary(out_dir)
    ckpt = ckpt_mod.load_latest(out_dir, say=say)  # on the CPU: RNG states must stay there
    if ckpt is None:
        say(f"no whole checkpoint in {out_dir}: starting again from step 0")
        return None
    say(f"resuming from {ckpt.path} (step {ckpt.step})")
    metrics = out_dir / "metrics.jsonl"
    have = metrics.stat().st_size if metrics.exists() else 0
    if have < ckpt.meta["metrics_bytes"]:
        raise CheckpointError(f"{metrics} is shorter ({have} bytes) than checkpoint {ckpt.path} recorded "
                              f"({ckpt.meta['metrics_bytes']} bytes)")
    return ckpt


@dataclass
class _StepRunner:
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
        from salf_engine.data import collate
        from salf_engine.data.responses import collate_responses

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
        for mb in plan.micro_batches:
            for depth, n in Counter(mb.depths).items():
                self.cost.add(n, depth, mb.trainable)
        all_reduce_grads(self.wrapped.trainable)
        step_loss = float(all_reduce_sum(loss_sum)) / max(per, 1)
        grad_norm = float(clip_or_measure(self.wrapped.trainable, self.config.max_grad_norm))
        return step_loss, grad_norm, seen


def _write_artifacts(run: RunDirectory, model, tokenizer, zero_shot, final, driver: StrategyDriver,
                     metric: str, num_layers: int) -> None:
    """The fine-tuned model, eval.json / eval.txt and (with a profile) eof_hist.png in the run directory."""
    from salf_engine.experiments.plots import eof_histogram_png

    assert run.path is not None
    model.save_pretrained(run.path / "model")
    tokenizer.save_pretrained(run.path / "model")
    run.write_json("eval.json", {"zero_shot": zero_shot.to_dict() if zero_shot else None,
                                 "fine_tuned": final.to_dict()})
    text = f"== zero-shot ==\n{zero_shot.to_text()}\n\n" if zero_shot else ""
    run.write_text("eval.txt", text + f"== fine-tuned ==\n{final.to_text()}\n")
    if driver.eofs is not None:
        profiled = [e for e in driver.eofs if e is not None]
        eof_histogram_png(profiled, num_layers, run.path / "eof_hist.png",
                          title=f"eof-layers of {len(profiled)} training examples ({metric})")


def _shorten(indices: list[int], limit: int = 32) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


def _restore_weights(wrapped, names: dict[int, str], ckpt) -> None:
    weights = ckpt.state["weights"]
    want = {names[id(q)] for q in wrapped.trainable}
    if set(weights) != want:
        raise CheckpointError(f"checkpoint {ckpt.path} holds other trainable parameters than this run "
                              f"({len(weights)} saved, {len(want)} here)")
    with torch.no_grad():
        for q in wrapped.trainable:
            saved = weights[names[id(q)]]
            if saved.shape != q.shape:
                raise CheckpointError(f"checkpoint {ckpt.path}: {names[id(q)]} has shape "
                                      f"{tuple(saved.shape)}, the model's is {tuple(q.shape)}")
            q.copy_(saved)


class _SavedReport:
    """The zero-shot evaluation of an interrupted run, as its checkpoint kept it."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self.seconds = float(data["seconds"])

    @classmethod
    def of(cls, data: dict[str, Any] | None) -> _SavedReport | None:
        return cls(data) if data is not None else None

    @staticmethod
    def dump(report) -> dict[str, Any] | None:
        if report is None:
            return None
        return {"summary": report.summary(), "dict": report.to_dict(), "text": report.to_text(),
                "seconds": report.seconds}

    def summary(self) -> dict[str, float]:
        return self._data["summary"]

    def to_dict(self) -> dict[str, Any]:
        return self._data["dict"]

    def to_text(self) -> str:
        return self._data["text"]


def _evaluate(model, p: Prepared, *, progress: bool, desc: str):
    """The evaluation split's report: accuracy and macro-F1 of a classification task, answer loss and exact
    match of a prompt/response task."""
    config = p.config
    if p.verbalizer is None:
        from salf_engine.evaluation.responses import evaluate_responses

        return evaluate_responses(model, p.tokenizer, p.eval_split, batch_size=config.eval_batch_size,
                                  exact_match_rows=config.exact_match_rows,
                                  max_new_tokens=config.max_new_tokens)
    from salf_engine.evaluation.classification import evaluate

    return evaluate(model, p.tokenizer, p.eval_split, p.verbalizer, batch_size=config.eval_batch_size,
                    dtype=config.dtype, classes=list(p.task.classes), progress=progress, desc=desc)


def _fmt_scores(phase: str, s: dict[str, float]) -> str:
    if "answer_loss" in s:
        match = "" if s["exact_match"] is None else (f", exact match {s['exact_match']:.3f} on "
                                                     f"{s['exact_match_rows']} rows")
        return f"{phase}: answer loss {s['answer_loss']:.4f} (perplexity {s['perplexity']:.2f}){match}"
    return (f"{phase}: accuracy {s['free_accuracy']:.4f} (free) / {s['restricted_accuracy']:.4f} "
            f"(label-restricted), macro-F1 {s['free_macro_f1']:.4f} / {s['restricted_macro_f1']:.4f}")


