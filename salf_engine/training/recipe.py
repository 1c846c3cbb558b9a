"""The training loop: dataset -> prompt -> step plan (each row's cut) -> truncated runner -> loss -> metrics.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from salf_engine.config import TrainConfig
from salf_engine.deviation.semantics import semantic_bases
from salf_engine.errors import CheckpointError, TrainingError
from salf_engine.evaluation.task import SavedReport, evaluate_task, format_scores
from salf_engine.integrations.distributed import (
    init_from_env,
    rank_and_world,
)
from salf_engine.runner.truncated import TruncatedRunner
from salf_engine.schedule.driver import ResumePoint, StrategyDriver
from salf_engine.training import checkpoint as ckpt_mod
from salf_engine.training.cost import CostMeter
from salf_engine.training.inputs import Prepared, _refuse_to_clear_checkpoints, check_resume, prepare
from salf_engine.training.rundir import RunDirectory
from salf_engine.training.step import (
    StepRunner,
    build_optimizer,
    build_scheduler,
    optimizer_step,
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
    return TrainingRecipe(config, progress=progress, log=log, prepared=prepared, resume=resume).run()


class TrainingRecipe:
    """The engine's loop, one method per phase: :meth:`setup` (inputs, guards, run directory), :meth:`build`
    (zero-shot evaluation, model, strategy, optimizer, restore), :meth:`epoch` (its plans, replayed after a
    resume), :meth:`step` (one optimizer step and the non-finite policy), :meth:`checkpoint` and
    :meth:`report` (final evaluation, artefacts, summary). :meth:`run` calls them in that order."""

    def __init__(self, config: TrainConfig, *, progress: bool = True,
                 log: Callable[[str], None] | None = print, prepared: Prepared | None = None,
                 resume: bool = False) -> None:
        self.config, self.progress, self.resume = config, progress, resume
        self.say = log or (lambda _msg: None)
        self._given = prepared
        self.t_start = time.perf_counter()
        self.step_count = self.epoch_count = self.skipped = 0
        self.losses: list[float] = []
        self.last_checkpoint: Path | None = None
        self.resume_point: ResumePoint | None = None
        # training wall time: this process's (from t_train, moved past each checkpoint write) plus what the
        # checkpoint resumed from had counted; the time of a step lost to the interruption is not in it
        self.t_train = 0.0
        self.train_seconds_before = self.checkpoint_seconds = 0.0
        self.resumed_at: list[int] = []
        self.zero_shot = None

    def run(self) -> dict[str, Any]:
        """Every phase; the summary."""
        self.setup()
        try:
            self.build()
            self.t_train = time.perf_counter()
            self.bar = tqdm(total=self.total_steps, initial=self.step_count, desc="train", unit="step",
                            disable=not self.progress)
            try:
                while self.step_count < self.total_steps and self.epoch():
                    pass
            finally:
                self.bar.close()
            return self.report(self._train_seconds())
        finally:
            self.run_dir.close()

    # ---- phases
    def setup(self) -> None:
        """Inputs checked and loaded, the label bases, torch.distributed, the checkpoint guards and the run
        directory (rank 0 writes it)."""
        config = self.config
        if self.resume and self._given is not None:
            check_resume(config)
        p = self.p = self._given if self._given is not None else prepare(config, resume=self.resume)
        self.generative = p.verbalizer is None  # a prompt/response task: no classes, no label bases
        self.label_token_ids = (None if self.generative else
                                torch.as_tensor(p.verbalizer.label_token_ids, dtype=torch.long).to(p.device))
        torch.manual_seed(config.seed)
        self.bases = None if self.generative else semantic_bases(p.model, p.verbalizer.label_token_ids).to(
            p.device)
        init_from_env(p.device)
        if rank_and_world()[0] != 0:  # rank 0 reports and writes the run
            self.say = lambda _msg: None
        self.ckpt = None
        if not self.resume and p.out_dir is not None and rank_and_world()[0] == 0:
            _refuse_to_clear_checkpoints(p.out_dir, config)
        if self.resume and p.out_dir is not None:
            self.ckpt = _open_checkpoint(p.out_dir, self.say)
        metrics_bytes = self.ckpt.meta["metrics_bytes"] if self.ckpt is not None else None
        self.run_dir = RunDirectory(p.out_dir if rank_and_world()[0] == 0 else None,
                                    resume_metrics_bytes=metrics_bytes)

    def build(self) -> None:
        """config.json, the data counts, the zero-shot evaluation (or the checkpoint's), the trainable model,
        runner, driver (profiled or restored), optimizer and schedule; a checkpoint's state restored."""
        config, p, run = self.config, self.p, self.run_dir
        run.write_json("config.json", config.to_dict())
        self._log_data()
        self._zero_shot()
        self.wrapped = wrap_model(p.model, p.strategy, config)
        self.runner = TruncatedRunner(self.wrapped.model, bases=self.bases, lens=config.lens,
                                      metric=config.metric, deviation_impl=config.deviation_impl)
        self.lr = config.resolved_lr(self.wrapped.lora)
        pad_id = p.tokenizer.pad_token_id if p.tokenizer.pad_token_id is not None else 0
        self.driver = StrategyDriver(p.strategy, self.runner, p.train_split, config, pad_id=pad_id)
        if self.ckpt is not None:
            self.driver.load_state_dict(self.ckpt.meta["driver"])  # the profile of the interrupted run
        else:
            self.driver.profile(progress=self.progress, say=self.say)
        self.driver.begin(self.wrapped.parts.layers)
        rank, world = rank_and_world()
        self.step_size = config.batch_size * config.grad_accum * world
        self.micro_size = world * config.batch_size
        self.total_steps = config.max_steps or math.ceil(len(p.train_split) / self.step_size) * config.epochs
        self.optimizer = build_optimizer(self.wrapped.trainable, config, self.lr)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        if run.path is not None and self.ckpt is None:
            # the final model and (with save_every) two checkpoints must fit: fail before training
            trainable_bytes = sum(q.numel() * q.element_size() for q in self.wrapped.trainable)
            ckpt_mod.check_free_space(run.path, trainable_bytes * (1 + (6 if config.save_every else 0)),
                                      "the model and its checkpoints")
        self.param_names = {id(q): n for n, q in self.wrapped.model.named_parameters()}
        self.say(f"training: strategy {getattr(p.strategy, 'label', config.strategy)}, "
                 f"{self.runner.num_layers} layers, {len(p.train_split)} examples, {self.total_steps} "
                 f"steps of {self.step_size} examples (micro-batches <= {config.batch_size}"
                 f"{f' per rank, {world} ranks' if world > 1 else ''}), lr {self.lr:g}"
                 + (" (LoRA)" if self.wrapped.lora else ""))
        self.wrapped.model.train()
        self.cost = CostMeter(self.runner.num_layers, lora=self.wrapped.lora)
        self.run_step = StepRunner(self.runner, self.wrapped, p.train_split, self.driver, self.cost, config,
                                    self.label_token_ids, pad_id, rank, world)
        if self.ckpt is not None:
            self._restore()

    def epoch(self) -> bool:
        """One epoch's plans, each an optimizer step (a resumed epoch replays its plans up to the checkpoint);
        False when training is over."""
        config, strategy = self.config, self.p.strategy
        resume, self.resume_point = self.resume_point, None
        if config.train_head and self.epoch_count > 0 and strategy.needs_profile and resume is None:
            # the head moved: recompute the label bases the deviations are measured against
            labels = self.p.verbalizer.label_token_ids
            self.runner.set_bases(semantic_bases(self.wrapped.model, labels).to(self.p.device))
        self.epoch_start, replayed, plans = self.driver.resumable_epoch(
            self.epoch_count, self.step_size, self.micro_size, resume)
        self.plans_done = len(replayed)
        if resume is not None:
            ckpt_mod.set_rng_state(self.ckpt.state["rng"])
        for plan in plans:  # lazily: a strategy may change its masks after a step (ADT)
            self.step(plan)
            if config.save_every and self.step_count % config.save_every == 0 and self.run_dir.path:
                self.checkpoint()
            if self.step_count >= self.total_steps:
                break
        self.epoch_count += 1
        return config.max_steps is not None or self.epoch_count < config.epochs

    def step(self, plan) -> None:
        """Forward and backward of the plan's micro-batches, then the update; a non-finite loss or gradient
        stops the run or skips the step, as ``on_nonfinite`` says."""
        t_step = time.perf_counter()
        step_loss, grad_norm, seen = self.run_step(plan)
        shown = plan.depths[0] if len(plan.micro_batches) == 1 else plan.depths
        self.plans_done += 1
        row = {"depth": shown, "batch_size": len(plan)}
        if math.isfinite(step_loss) and math.isfinite(grad_norm):
            step_lr = optimizer_step(self.optimizer, self.scheduler, self.wrapped.trainable, None)  # clipped
            self.step_count += 1
            self.driver.observe(seen)  # the step's eofs in one pass (one host sync), after the update
            self.driver.after_step(self.step_count, self.wrapped.parts.layers)
            self.losses.append(step_loss)
            row["loss"] = step_loss
        else:
            what = "loss" if not math.isfinite(step_loss) else "gradient norm"
            where = (f"non-finite {what} at step {self.step_count + 1} (epoch {self.epoch_count}, "
                     f"depths {plan.depths}, examples {_shorten(plan.indices)})")
            if self.config.on_nonfinite == "stop":
                kept = (f"the run directory keeps the last good checkpoint {self.last_checkpoint}"
                        if self.last_checkpoint is not None else "no checkpoint was written")
                raise TrainingError(f"{where}; training stopped, {kept}; "
                                    "on_nonfinite='skip' (--on-nonfinite skip) skips such steps")
            # skip: no update; the step still counts, so the schedule and run length stay
            step_lr = self.scheduler.get_last_lr()[0]
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step_count += 1
            self.skipped += 1
            self.driver.after_step(self.step_count, self.wrapped.parts.layers)
            self.say(f"warning: {where}; step skipped ({self.skipped} so far)")
            row.update(loss=None, skipped=what)
        self.run_dir.log({"step": self.step_count, "epoch": self.epoch_count, "loss": row.pop("loss"),
                          "lr": step_lr, **row, "seconds": round(time.perf_counter() - t_step, 4)})
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step_loss:.4f}", depth=shown)

    def checkpoint(self) -> None:
        """The whole training state after this step (checkpoint.py writes it atomically)."""
        w, runner = self.wrapped, self.runner
        tensors = {"weights": {self.param_names[id(q)]: q.detach().cpu().clone() for q in w.trainable},
                   "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "bases": runner.bases.detach().cpu() if runner.bases is not None else None,
                   "rng": ckpt_mod.rng_state()}
        meta = {"epoch": self.epoch_count, "plans_done": self.plans_done, "skipped_steps": self.skipped,
                "losses": self.losses, "cost": self.cost.state_dict(), "driver": self.driver.state_dict(),
                "strategy": self.p.strategy.state_dict(), "epoch_start_strategy": self.epoch_start,
                "metrics_bytes": self.run_dir.metrics_bytes(), "zero_shot": SavedReport.dump(self.zero_shot),
                "train_seconds": self._train_seconds(), "checkpoint_seconds": self.checkpoint_seconds,
                "resumed_at_steps": self.resumed_at}
        t_write = time.perf_counter()
        self.last_checkpoint = ckpt_mod.save_checkpoint(self.run_dir.path, self.step_count, tensors, meta,
                                                        total_limit=self.config.save_total_limit)
        written = time.perf_counter() - t_write
        self.t_train += written  # writing checkpoints is not training
        self.checkpoint_seconds += written

    def _train_seconds(self) -> float:
        """Training wall time so far, over every process of a resumed run, checkpoint writes excepted."""
        return self.train_seconds_before + time.perf_counter() - self.t_train

    def report(self, train_seconds: float) -> dict[str, Any]:
        """The fine-tuned evaluation, the artefacts and summary.json (last); returns the summary."""
        config, p, run, w = self.config, self.p, self.run_dir, self.wrapped
        w.restore()
        w.model.eval()
        self.say(f"evaluating the fine-tuned model on {len(p.eval_split)} {config.eval_split} examples ...")
        final = evaluate_task(w.model, p, progress=self.progress, desc="fine-tuned eval")
        run.log({"event": "eval", "phase": "fine-tuned", "step": self.step_count, **final.summary(),
                 "seconds": round(final.seconds, 3)})
        self.say(format_scores("fine-tuned", final.summary()))
        if run.path is not None:  # the artefacts; summary.json last
            _write_artifacts(run, w.model, p.tokenizer, self.zero_shot, final, self.driver, config.metric,
                             self.runner.num_layers)
        summary = self._summary(final, train_seconds)
        run.write_json("summary.json", summary)
        return summary

    # ---- pieces of the phases
    def _log_data(self) -> None:
        p, config = self.p, self.config
        if self.generative:
            tr, ev = p.train_split, p.eval_split
            self.say(f"data: {len(tr)} training rows ({tr.truncated} cut at {config.max_length} tokens, "
                     f"{tr.dropped} left out: no room for a response token), {len(ev)} evaluation rows "
                     f"({ev.truncated} cut, {ev.dropped} left out)")
        rows = getattr(p.task, "row_counts", None)
        if rows:
            self.say("data: " + "; ".join(f"{split} {c['read']} rows read, {c['skipped']} skipped "
                                          "(blank/header)" for split, c in rows.items() if c))

    def _zero_shot(self) -> None:
        p, run = self.p, self.run_dir
        if self.ckpt is not None:
            self.zero_shot = SavedReport.of(self.ckpt.meta.get("zero_shot"))
        elif self.config.zero_shot_eval:
            self.say(f"zero-shot evaluation on {len(p.eval_split)} {self.config.eval_split} examples ...")
            self.zero_shot = evaluate_task(p.model, p, progress=self.progress, desc="zero-shot eval")
            run.log({"event": "eval", "phase": "zero-shot", **self.zero_shot.summary(),
                     "seconds": round(self.zero_shot.seconds, 3)})
            run.write_json("zero_shot_eval.json", self.zero_shot.to_dict())
            self.say(format_scores("zero-shot", self.zero_shot.summary()))

    def _restore(self) -> None:
        ckpt = self.ckpt
        ckpt_mod.restore_weights(self.wrapped, self.param_names, ckpt)
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        if ckpt.state.get("bases") is not None:
            self.runner.set_bases(ckpt.state["bases"].to(self.p.device))
        self.cost.load_state_dict(ckpt.meta["cost"])
        self.losses = list(ckpt.meta["losses"])
        self.step_count, self.skipped = ckpt.step, int(ckpt.meta["skipped_steps"])
        self.epoch_count = int(ckpt.meta["epoch"])
        self.last_checkpoint = ckpt.path
        if "train_seconds" in ckpt.meta:
            self.train_seconds_before = float(ckpt.meta["train_seconds"])
            self.checkpoint_seconds = float(ckpt.meta["checkpoint_seconds"])
        else:
            self.say(f"warning: checkpoint {ckpt.path.name} predates wall-time accounting: train_seconds "
                     "will count only the resumed part of the run")
        self.resumed_at = [*ckpt.meta.get("resumed_at_steps", []), ckpt.step]
        if self.step_count >= self.total_steps:  # the last step's checkpoint: its epoch is over
            self.epoch_count += 1
        else:
            self.resume_point = ResumePoint.of(ckpt.meta)

    def _summary(self, final, train_seconds: float) -> dict[str, Any]:
        config, p, driver, cost, w = self.config, self.p, self.driver, self.cost, self.wrapped
        profiled = driver.profiled + driver.probe_examples
        losses = self.losses
        summary: dict[str, Any] = {
            "model": config.model, "dataset": config.dataset, "strategy": config.strategy,
            "num_train_examples": len(p.train_split), "num_eval_examples": len(p.eval_split),
            "classes": [] if self.generative else list(p.task.classes),
            "load_seconds": round(p.load_seconds, 3),
            "data_rows": getattr(p.task, "row_counts", None) or None,
        }
        if self.generative:
            summary["responses"] = {split: {"truncated": enc.truncated, "dropped": enc.dropped}
                                    for split, enc in (("train", p.train_split), ("eval", p.eval_split))}
        zero_shot = self.zero_shot
        summary.update({
            "finished": True, "num_layers": self.runner.num_layers, "steps": self.step_count,
            "skipped_steps": self.skipped, "epochs_run": self.epoch_count, "examples_trained": cost.examples,
            "lr": self.lr, "trainable_parameters": int(sum(q.numel() for q in w.trainable)), "lora": w.lora,
            "head_trained": w.head_trains, "frozen_fraction": cost.frozen_fraction(),
            "profiled_examples": profiled,
            "profile_seconds": round(driver.profile_seconds + driver.probe_seconds, 3),
            "train_seconds": round(train_seconds - driver.probe_seconds, 3),
            "examples_per_second": cost.examples / train_seconds if train_seconds > 0 else None,
            "checkpoint_seconds": round(self.checkpoint_seconds, 3), "resumed_at_steps": self.resumed_at,
            "first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "loss_history": losses, "cost_saving_ratio": cost.saving(),
            "flops_ratio": cost.flops_ratio(profiled),
            "depth_histogram": cost.depth_histogram(), "eof_histogram": driver.eof_histograms(),
            "zero_shot": zero_shot.summary() if zero_shot else None, "fine_tuned": final.summary(),
            "zero_shot_eval_seconds": round(zero_shot.seconds, 3) if zero_shot else None,
            "fine_tuned_eval_seconds": round(final.seconds, 3),
            "total_seconds": round(time.perf_counter() - self.t_start
                                   + (p.load_seconds if self._given else 0), 3),
        })
        return summary


def _open_checkpoint(out_dir: Path, say: Callable[[str], None]):
    """The newest whole checkpoint of the run in ``out_dir`` (None: start again from step 0), after
    checking that metrics.jsonl still holds what the checkpoint recorded."""
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
