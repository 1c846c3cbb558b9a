"""The training loop: dataset -> prompt -> step plan (each row's cut) -> truncated runner -> loss -> metrics.

Every strategy (full fine-tuning, SALF, LoRA, LIFT, fixed and adaptive
freezing) goes through the same loop, built from the pieces every loop needs:
:func:`~salf_engine.training.wrapping.wrap_model` (LoRA or full weights, what may
train), :class:`~salf_engine.schedule.driver.StrategyDriver` (profile, plans,
observations), :func:`~salf_engine.training.step.micro_batch_step` (one micro-batch at
its runner cut), :func:`~salf_engine.training.step.finish_step` (clipping, the
non-finite policy, the update), :class:`~salf_engine.training.state.TrainState` and
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
from salf_engine.errors import CheckpointError
from salf_engine.evaluation.plots import eof_histogram_png
from salf_engine.evaluation.task import SavedReport, evaluate_task, format_scores
from salf_engine.runner.truncated import TruncatedRunner
from salf_engine.runtime.distributed import (
    init_from_env,
    rank_and_world,
)
from salf_engine.schedule.driver import StrategyDriver
from salf_engine.training import checkpoint as ckpt_mod
from salf_engine.training.cost import CostMeter
from salf_engine.training.eval_prefix import EvalPrefix, eval_floor, plan_eval_prefix
from salf_engine.training.inputs import Prepared, _refuse_to_clear_checkpoints, check_resume, prepare
from salf_engine.training.prefix_cache import copy_ahead, plan_prefix_cache
from salf_engine.training.rundir import RunDirectory
from salf_engine.training.state import TrainState
from salf_engine.training.step import (
    StepRunner,
    build_optimizer,
    build_scheduler,
    finish_step,
    optimizer_step,
)
from salf_engine.training.wrapping import TrainableModel, wrap_model

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
    """The engine's loop. :meth:`run` reads top to bottom: setup (:meth:`setup`, :meth:`open_run`), the
    builders (:meth:`make_model`, :meth:`make_strategy`, :meth:`make_optimizer`, :meth:`make_step`; each
    returns what it builds), :meth:`restore` (the one home of resuming), the epochs (:meth:`train_epochs`,
    :meth:`epoch`, :meth:`step`, :meth:`checkpoint`) and the report (:meth:`evaluate_final`,
    :meth:`report`). Where the run stands is one :class:`~salf_engine.training.state.TrainState`."""

    def __init__(self, config: TrainConfig, *, progress: bool = True,
                 log: Callable[[str], None] | None = print, prepared: Prepared | None = None,
                 resume: bool = False) -> None:
        self.config, self.progress, self.resume = config, progress, resume
        self.say = log or (lambda _msg: None)
        self._given = prepared
        self.t_start = time.perf_counter()
        self.state = TrainState()
        self.last_checkpoint: Path | None = None
        # the training clock: state.train_seconds counts up to t_lap (moved past each checkpoint write); the
        # checkpoint resumed from brings the earlier processes' time, a step lost to the interruption is lost
        self.t_lap = 0.0
        self.resume_rng: dict[str, Any] | None = None  # the RNG states at the checkpoint resumed from

    def run(self) -> dict[str, Any]:
        """Setup, the epochs, the report; returns the summary."""
        self.setup()
        ckpt = self.open_run()
        try:
            self.wrapped, self.runner = self.make_model()
            self.driver = self.make_strategy(ckpt)
            self.eval_prefix = self.make_eval_prefix(ckpt)
            self.zero_shot = self.zero_shot_eval(ckpt)
            self.optimizer, self.scheduler = self.make_optimizer()
            self.check_disk_space(resuming=ckpt is not None)
            self.cost = CostMeter(self.runner.num_layers, lora=self.wrapped.lora)
            self.run_step = self.make_step()
            if ckpt is not None:
                self.restore(ckpt)
            self.train_epochs()
            return self.report(self.evaluate_final())
        finally:
            self.run_dir.close()

    # ---- setup
    def setup(self) -> None:
        """Inputs checked and loaded, the label token ids and bases, torch.distributed, the step sizes."""
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
        self.pad_id = p.tokenizer.pad_token_id if p.tokenizer.pad_token_id is not None else 0
        init_from_env(p.device)
        self.rank, self.world = rank_and_world()
        if self.rank != 0:  # rank 0 reports and writes the run
            self.say = lambda _msg: None
        self.step_size = config.batch_size * config.grad_accum * self.world
        self.micro_size = self.world * config.batch_size
        self.total_steps = config.max_steps or math.ceil(len(p.train_split) / self.step_size) * config.epochs

    def open_run(self) -> ckpt_mod.Checkpoint | None:
        """The checkpoint guards, the checkpoint resumed from (None: a fresh start), the run directory (rank
        0 writes it) with config.json, and what the data holds."""
        config, p = self.config, self.p
        if not self.resume and p.out_dir is not None and self.rank == 0:
            _refuse_to_clear_checkpoints(p.out_dir, config)
        ckpt = _open_checkpoint(p.out_dir, self.say) if self.resume and p.out_dir is not None else None
        self.run_dir = RunDirectory(p.out_dir if self.rank == 0 else None,
                                    resume_metrics_bytes=ckpt.meta["metrics_bytes"] if ckpt else None)
        self.run_dir.write_json("config.json", config.to_dict())
        self._log_data()
        return ckpt

    def zero_shot_eval(self, ckpt) -> Any:
        """The zero-shot evaluation (None when not asked for); a resumed run's comes from its checkpoint."""
        p, run = self.p, self.run_dir
        if ckpt is not None:
            return SavedReport.of(ckpt.meta.get("zero_shot"))
        if not self.config.zero_shot_eval:
            return None
        self.say(f"zero-shot evaluation on {len(p.eval_split)} {_eval_name(self.config)} examples ...")
        zero_shot = self._evaluate(p.model, "zero-shot eval")
        run.log({"event": "eval", "phase": "zero-shot", **zero_shot.summary(),
                 "seconds": round(zero_shot.seconds, 3)})
        run.write_json("zero_shot_eval.json", zero_shot.to_dict())
        self.say(format_scores("zero-shot", zero_shot.summary()))
        return zero_shot

    def make_eval_prefix(self, ckpt) -> EvalPrefix | None:
        """The evaluation prefix cache (off with ``--prefix-cache off``) where this process evaluates more
        than once and it is exact: the evaluation rows' states at the floor, kept from one evaluation to the
        next (the zero-shot evaluation runs after the model is wrapped and the strategy begun: its floor)."""
        config = self.config
        evaluations = (int(ckpt is None and config.zero_shot_eval) + 1
                       + int(config.eval_every_epoch and self.run_epochs > 1))
        return plan_eval_prefix(config.prefix_cache, self.p.strategy, self.wrapped,
                                [len(ids) for ids in self.p.eval_split.input_ids], world=self.world,
                                evaluations=evaluations, say=self.say)

    def _evaluate(self, model, desc: str):
        """The evaluation split's report of ``model``, through the evaluation prefix cache (if any) at this
        evaluation's floor (the next training step's)."""
        if self.eval_prefix is not None:
            self.eval_prefix.begin(eval_floor(self.p.strategy, self.state.step, self.total_steps))
        return evaluate_task(model, self.p, progress=self.progress, desc=desc, prefix=self.eval_prefix)

    # ---- builders
    def make_model(self) -> tuple[TrainableModel, TruncatedRunner]:
        """The trainable model (LoRA or full weights, as the strategy says) and the truncated runner over
        it."""
        config = self.config
        wrapped = wrap_model(self.p.model, self.p.strategy, config)
        runner = TruncatedRunner(wrapped.model, bases=self.bases, lens=config.lens, metric=config.metric,
                                 deviation_impl=config.deviation_impl)
        return wrapped, runner

    def make_strategy(self, ckpt) -> StrategyDriver:
        """The strategy's driver, begun on the model: profiled, or with the interrupted run's profile."""
        p = self.p
        driver = StrategyDriver(p.strategy, self.runner, p.train_split, self.config, pad_id=self.pad_id)
        if ckpt is not None:
            driver.load_state_dict(ckpt.meta["driver"])
        else:
            driver.profile(progress=self.progress, say=self.say)
        driver.begin(self.wrapped.parts.layers, epochs=self.run_epochs)
        return driver

    @property
    def run_epochs(self) -> int:
        """The epochs the run's steps cover (--max-steps may end inside one, or go on past --epochs)."""
        return math.ceil(self.total_steps / math.ceil(len(self.p.train_split) / self.step_size))

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """AdamW over the trainable parameters and its learning-rate schedule over the run's steps."""
        optimizer = build_optimizer(self.wrapped.trainable, self.config, self.lr)
        return optimizer, build_scheduler(optimizer, self.config, self.total_steps)

    def make_step(self) -> StepRunner:
        """Forward and backward of a step plan (this rank's share), counted in the cost meter, with the
        prefix cache ``--prefix-cache`` asks for (empty after a resume: the cache is derived data, so an
        example's first forward in this process is a miss)."""
        p = self.p
        self.prefix_cache, self.prefix_off = plan_prefix_cache(
            self.config.prefix_cache, p.strategy, self.wrapped, [len(ids) for ids in p.train_split.input_ids],
            device=p.device, run_dir=p.out_dir, world=self.world,
            wants_deviations=self.driver.wants_deviations, say=self.say, epochs=self.run_epochs)
        return StepRunner(self.runner, self.wrapped, p.train_split, self.driver, self.cost, self.config,
                          self.label_token_ids, self.pad_id, self.rank, self.world, self.prefix_cache)

    @property
    def lr(self) -> float:
        """The peak learning rate (the config's, or its default for LoRA or full weights)."""
        return self.config.resolved_lr(self.wrapped.lora)

    def check_disk_space(self, *, resuming: bool) -> None:
        """Fail before training when the final model and (with save_every) two checkpoints cannot fit."""
        run = self.run_dir
        if run.path is not None and not resuming:
            trainable_bytes = sum(q.numel() * q.element_size() for q in self.wrapped.trainable)
            ckpt_mod.check_free_space(run.path, trainable_bytes * (1 + (6 if self.config.save_every else 0)),
                                      "the model and its checkpoints")

    def restore(self, ckpt: ckpt_mod.Checkpoint) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, label bases, cost meter and the run's
        state (the epoch it was taken in is replayed up to it, see :meth:`epoch`)."""
        ckpt_mod.restore_weights(self.wrapped, _param_names(self.wrapped), ckpt)
        self.optimizer.load_state_dict(ckpt.state["optimizer"])
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        if ckpt.state.get("bases") is not None:
            self.runner.set_bases(ckpt.state["bases"].to(self.p.device))
        self.cost.load_state_dict(ckpt.meta["cost"])
        if "train_seconds" not in ckpt.meta:
            self.say(f"warning: checkpoint {ckpt.path.name} predates wall-time accounting: train_seconds "
                     "will count only the resumed part of the run")
        self.state.load_state_dict({**ckpt.meta, "step": ckpt.step}, total_steps=self.total_steps)
        self.resume_rng = ckpt.state["rng"]
        self.last_checkpoint = ckpt.path

    # ---- the epochs
    def train_epochs(self) -> None:
        """Epoch after epoch until the run's steps are done, on the training clock."""
        config, w = self.config, self.wrapped
        self.say(f"training: strategy {getattr(self.p.strategy, 'label', config.strategy)}, "
                 f"{self.runner.num_layers} layers, {len(self.p.train_split)} examples, {self.total_steps} "
                 f"steps of {self.step_size} examples (micro-batches <= {config.batch_size}"
                 f"{f' per rank, {self.world} ranks' if self.world > 1 else ''}), lr {self.lr:g}"
                 + (" (LoRA)" if w.lora else ""))
        w.model.train()
        self.t_lap = time.perf_counter()
        try:
            with tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step",
                      disable=not self.progress) as self.bar:
                while self.state.step < self.total_steps and self.epoch():
                    if config.eval_every_epoch and self.state.step < self.total_steps:
                        self.evaluate_epoch()
        finally:
            if self.prefix_cache is not None:  # derived data: a disk cache's file goes
                self.prefix_cache.close()
        self._lap()

    def epoch(self) -> bool:
        """One epoch's plans, each an optimizer step (a resumed epoch replays its plans up to the checkpoint);
        False when training is over."""
        config, state = self.config, self.state
        resume = state.take_resume()
        if config.train_head and state.epoch > 0 and self.p.strategy.needs_profile and resume is None:
            # the head moved: recompute the label bases the deviations are measured against
            labels = self.p.verbalizer.label_token_ids
            self.runner.set_bases(semantic_bases(self.wrapped.model, labels).to(self.p.device))
        start, replayed, plans = self.driver.resumable_epoch(state.epoch, self.step_size, self.micro_size,
                                                             resume)
        state.start_epoch(start, len(replayed))
        if resume is not None:
            ckpt_mod.set_rng_state(self.resume_rng)
        # lazily: a strategy may change its masks after a step (ADT); a GPU's pinned cache copies ahead
        for plan in copy_ahead(plans, self.prefix_cache, fixed=self.p.strategy.plans_fixed):
            self.step(plan)
            if config.save_every and state.step % config.save_every == 0 and self.run_dir.path:
                self.checkpoint()
            if state.step >= self.total_steps:
                break
        state.epoch += 1
        return config.max_steps is not None or state.epoch < config.epochs

    def step(self, plan) -> None:
        """Forward and backward of the plan's micro-batches, then :func:`finish_step` (clipping, the
        non-finite policy, the update); one metrics line."""
        config, state = self.config, self.state
        t_step = time.perf_counter()
        step_loss, seen = self.run_step(plan)
        where = (f"at step {state.step + 1} (epoch {state.epoch}, depths {plan.depths}, examples "
                 f"{_shorten(plan.indices)})")
        kept = (f"the run directory keeps the last good checkpoint {self.last_checkpoint}"
                if self.last_checkpoint is not None else "no checkpoint was written")
        end = finish_step(self.optimizer, self.scheduler, self.wrapped.trainable, loss=step_loss,
                          max_grad_norm=config.max_grad_norm, on_nonfinite=config.on_nonfinite,
                          where=where, kept=kept, update=optimizer_step)
        state.record(None if end.skipped else step_loss)
        if end.skipped is None:
            self.driver.observe(seen)  # the step's eofs in one pass (one host sync), after the update
        self.driver.after_step(state.step, self.wrapped.parts.layers)
        shown = plan.depths[0] if len(plan.micro_batches) == 1 else plan.depths
        row: dict[str, Any] = {"step": state.step, "epoch": state.epoch,
                               "loss": None if end.skipped else step_loss, "lr": end.lr, "depth": shown,
                               "batch_size": len(plan)}
        if end.skipped:
            self.say(f"warning: non-finite {end.skipped} {where}; step skipped ({state.skipped} so far)")
            row["skipped"] = end.skipped
        self.run_dir.log({**row, "seconds": round(time.perf_counter() - t_step, 4)})
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step_loss:.4f}", depth=shown)

    def evaluate_epoch(self) -> None:
        """``--eval-every-epoch``: the model's evaluation after the epoch just done, off the training clock
        and with the RNG states put back after it (the run trains exactly as without it), kept in the
        state."""
        self._lap()
        rng = ckpt_mod.rng_state()
        model = self.wrapped.model
        model.eval()
        report = self._evaluate(model, f"epoch {self.state.epoch} eval")
        model.train()
        ckpt_mod.set_rng_state(rng)
        scores = {"epoch": self.state.epoch, "step": self.state.step,
                  "train_seconds": round(self.state.train_seconds, 3), **report.summary()}
        self.state.epoch_evals.append(scores)
        self.run_dir.log({"event": "eval", "phase": f"epoch {self.state.epoch}", **scores,
                          "seconds": round(report.seconds, 3)})
        self.say(format_scores(f"after epoch {self.state.epoch}", report.summary()))
        self.t_lap = time.perf_counter()

    def checkpoint(self) -> None:
        """The whole training state after this step (checkpoint.py writes it atomically); writing it is not
        training time."""
        w, runner = self.wrapped, self.runner
        self._lap()
        names = _param_names(w)
        tensors = {"weights": {names[id(q)]: q.detach().cpu().clone() for q in w.trainable},
                   "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "bases": runner.bases.detach().cpu() if runner.bases is not None else None,
                   "rng": ckpt_mod.rng_state()}
        meta = {**self.state.state_dict(), "cost": self.cost.state_dict(), "driver": self.driver.state_dict(),
                "strategy": self.p.strategy.state_dict(), "metrics_bytes": self.run_dir.metrics_bytes(),
                "zero_shot": SavedReport.dump(self.zero_shot)}
        t_write = time.perf_counter()
        self.last_checkpoint = ckpt_mod.save_checkpoint(self.run_dir.path, self.state.step, tensors, meta,
                                                        total_limit=self.config.save_total_limit)
        written = time.perf_counter() - t_write
        self.t_lap += written
        self.state.checkpoint_seconds += written

    def _lap(self) -> None:
        """Count the training time since the last lap into ``state.train_seconds``."""
        now = time.perf_counter()
        self.state.train_seconds += now - self.t_lap
        self.t_lap = now

    # ---- the report
    def evaluate_final(self):
        """The fine-tuned model's evaluation (every parameter trainable again, eval mode), logged."""
        config, p, w = self.config, self.p, self.wrapped
        w.restore()
        w.model.eval()
        self.say(f"evaluating the fine-tuned model on {len(p.eval_split)} {_eval_name(config)} examples ...")
        final = self._evaluate(w.model, "fine-tuned eval")
        self.run_dir.log({"event": "eval", "phase": "fine-tuned", "step": self.state.step, **final.summary(),
                          "seconds": round(final.seconds, 3)})
        self.say(format_scores("fine-tuned", final.summary()))
        return final

    def report(self, final) -> dict[str, Any]:
        """The artefacts and summary.json (last); returns the summary."""
        run = self.run_dir
        if run.path is not None:  # the artefacts; summary.json last
            _write_artifacts(run, self.wrapped.model, self.p.tokenizer, self.zero_shot, final, self.driver,
                             self.config.metric, self.runner.num_layers)
        summary = self._summary(final)
        run.write_json("summary.json", summary)
        return summary

    # ---- pieces of the phases
    def _log_data(self) -> None:
        p, config = self.p, self.config
        rows = getattr(p.task, "row_counts", None)
        if rows:
            self.say("data: " + "; ".join(f"{split} {c['read']} rows read, {c['skipped']} skipped "
                                          "(blank/header)" for split, c in rows.items() if c))
        if self.generative:  # rows cut or left out at --max-length, counted and named
            self.say("data: " + p.train_split.describe("training", config.max_length))
            self.say("data: " + p.eval_split.describe("evaluation", config.max_length))

    def _summary(self, final) -> dict[str, Any]:
        config, p, driver, cost, w, state = (self.config, self.p, self.driver, self.cost, self.wrapped,
                                             self.state)
        train_seconds = state.train_seconds
        profiled = driver.profiled + driver.probe_examples
        losses = state.losses
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
            "finished": True, "num_layers": self.runner.num_layers, "steps": state.step,
            "skipped_steps": state.skipped, "epochs_run": state.epoch, "examples_trained": cost.examples,
            "lr": self.lr, "trainable_parameters": int(sum(q.numel() for q in w.trainable)), "lora": w.lora,
            "head_trained": w.head_trains, "frozen_fraction": cost.frozen_fraction(),
            "profiled_examples": profiled,
            "profile_seconds": round(driver.profile_seconds + driver.probe_seconds, 3),
            "train_seconds": round(train_seconds - driver.probe_seconds, 3),
            "examples_per_second": cost.examples / train_seconds if train_seconds > 0 else None,
            "checkpoint_seconds": round(state.checkpoint_seconds, 3), "resumed_at_steps": state.resumed_at,
            "first_loss": losses[0] if losses else None,
            "final_loss": state.final_loss(),
            "loss_history": losses, "cost_saving_ratio": cost.saving(),
            "flops_ratio": cost.flops_ratio(
                profiled, skipped=self.prefix_cache.counts[2] if self.prefix_cache is not None else 0),
            "depth_histogram": cost.depth_histogram(), "eof_histogram": driver.eof_histograms(),
            "prefix_cache": self.prefix_cache.summary() if self.prefix_cache is not None else self.prefix_off,
            "eval_prefix_cache": self.eval_prefix.summary() if self.eval_prefix is not None else None,
            "zero_shot": zero_shot.summary() if zero_shot else None, "fine_tuned": final.summary(),
            "epochs": ([*state.epoch_evals, {"epoch": state.epoch, "step": state.step,
                                             "train_seconds": round(train_seconds, 3), **final.summary()}]
                       if config.eval_every_epoch else None),
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


def _eval_name(config: TrainConfig) -> str:
    """What the evaluation examples are, for the log: a split's name, or held out of the training split."""
    return "held-out" if config.eval_fraction is not None or config.eval_split == "holdout" else \
        config.eval_split


def _param_names(wrapped) -> dict[int, str]:
    """Parameter id -> name of the model's parameters (a checkpoint's weights are saved by name)."""
    return {id(q): n for n, q in wrapped.model.named_parameters()}


def _shorten(indices: list[int], limit: int = 32) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"
