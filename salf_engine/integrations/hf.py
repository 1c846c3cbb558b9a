"""SALF inside ``transformers.Trainer`` and ``trl.SFTTrainer``: a trainer mixin and its callback.

One train batch is one SALF step plan (the rank's share of it under DDP), collated micro-batch by
micro-batch; :meth:`SalfTrainerMixin.training_step` trains each micro-batch through the engine's one
micro-batch step (:func:`~salf_engine.training.step.micro_batch_step`: its trainable layers, the patched
forward at its cut, its share of the step's loss backward), counts the plan in ``salf_cost`` and applies
the non-finite policy (``salf_config.on_nonfinite``, :func:`~salf_engine.training.step.finish_step`); then
the Trainer clips and steps the optimizer once. The strategy begins after the optimizer exists
(``on_train_begin``), plans each epoch lazily, and gets its observations and ADT's after-step hook at
``on_step_end``.

Rows are HF causal-LM rows: ``input_ids``, ``labels`` (-100 where not supervised), optionally
``attention_mask`` and ``salf_label`` (the class index, needed with the label ``salf_bases`` by strategies
that profile or observe eof-layers). The medium token of a row is the position that predicts its first
supervised label.

``SalfTrainer`` and ``SalfCallback`` are made on first use, so importing this module does not import
transformers' Trainer (seconds, with peft and bitsandbytes).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from salf_engine.config import TrainConfig
from salf_engine.data import EncodedSplit
from salf_engine.errors import ConfigError
from salf_engine.integrations.patching import patch_model, runner_of
from salf_engine.runtime.distributed import all_reduce_sum
from salf_engine.schedule.driver import Observation, StrategyDriver
from salf_engine.schedule.plans import MicroBatch, StepPlan
from salf_engine.schedule.sampling import PlanBatchSampler
from salf_engine.schedule.strategies import strategy_from_config
from salf_engine.training.checkpoint import load_trainer_state, save_trainer_state
from salf_engine.training.cost import CostMeter
from salf_engine.training.prefix_cache import PrefixCache, plan_prefix_cache
from salf_engine.training.state import TrainState
from salf_engine.training.step import finish_step, micro_batch_step, patched_forward
from salf_engine.training.wrapping import TrainableModel, import_peft, wrap_model

__all__ = [  # noqa: F822 - SalfCallback and SalfTrainer are made on first use (module __getattr__)
    "PlanDataset", "SalfCallback", "SalfTrainer", "SalfTrainerMixin", "classification_rows",
    "left_pad_collate", "prompt_split",
]

_log = logging.getLogger(__name__)
_MODEL_KEYS = ("input_ids", "attention_mask", "labels")


class PlanDataset(Dataset):
    """A dataset indexed by ``(sample index, micro-batch number)`` pairs (see ``PlanBatchSampler``)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, micro = key
        row = dict(self.dataset[int(index)])
        row["salf_index"] = int(index)
        row["salf_micro"] = int(micro)
        return row


def left_pad_collate(features: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad input_ids (``pad_id``), attention_mask (0) and labels (-100) of the given rows."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    for b, f in enumerate(features):
        row = torch.as_tensor(f["input_ids"], dtype=torch.long)
        start = width - len(row)
        ids[b, start:] = row
        mask[b, start:] = torch.as_tensor(f.get("attention_mask", [1] * len(row)), dtype=torch.long)
        if f.get("labels") is not None:
            labels[b, start:] = torch.as_tensor(f["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def classification_rows(split: Any, label_token_ids: Sequence[int]) -> list[dict[str, Any]]:
    """HF causal-LM rows of an encoded classification split: the prompt plus its label word's token, only
    that token supervised (the engine's next-token loss), and the class as ``salf_label``."""
    rows = []
    for ids, cls in zip(split.input_ids, split.labels, strict=True):
        token = int(label_token_ids[cls])
        labels = [-100] * len(ids) + [token]
        rows.append({"input_ids": [*ids, token], "labels": labels, "salf_label": int(cls)})
    return rows


def prompt_split(dataset: Any):
    """An ``EncodedSplit`` of each row's prompt (through its medium token) and ``salf_label``, for eof
    profiles; ConfigError when a row has no supervised label or no ``salf_label``."""
    prompts, classes = [], []
    for i in range(len(dataset)):
        row = dataset[i]
        labels = list(row.get("labels") or [])
        first = next((t for t, v in enumerate(labels) if v != -100), None)
        if first is None or first == 0 or row.get("salf_label") is None:
            raise ConfigError(f"row {i} needs a supervised label after a prompt and a salf_label class for "
                              "SALF's eof-layers (or pick a strategy that neither profiles nor observes)")
        prompts.append(list(row["input_ids"][:first]))
        classes.append(int(row["salf_label"]))
    return EncodedSplit(input_ids=prompts, labels=classes)


class _PlanCollator:
    """Collates a plan batch micro-batch by micro-batch with the base collator."""

    def __init__(self, base: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.base = base

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        groups: dict[int, list[dict[str, Any]]] = {}
        for f in features:
            groups.setdefault(int(f["salf_micro"]), []).append(f)
        micro_batches = []
        for k in sorted(groups):
            rows = groups[k]
            batch = dict(self.base([{key: r[key] for key in _MODEL_KEYS if key in r} for r in rows]))
            batch["salf_index"] = torch.tensor([r["salf_index"] for r in rows], dtype=torch.long)
            if all(r.get("salf_label") is not None for r in rows):
                batch["salf_label"] = torch.tensor([int(r["salf_label"]) for r in rows], dtype=torch.long)
            micro_batches.append(batch)
        return {"salf_micro_batches": micro_batches}


def _check_args(args: Any) -> None:
    if getattr(args, "deepspeed", None):
        raise ConfigError("SALF does not run under DeepSpeed: its engine owns backward and cannot skip "
                          "the layers below a batch's cut; use DDP or FSDP2")
    if getattr(args, "ddp_static_graph", None):
        raise ConfigError("ddp_static_graph cannot work with SALF: the set of trained layers changes "
                          "every micro-batch; leave it unset (find_unused_parameters is turned on)")
    if getattr(args, "packing", False) or getattr(args, "padding_free", False):
        raise ConfigError("packing / padding-free batches mix samples that need different cuts in one "
                          "row; turn packing and padding_free off")
    if args.gradient_accumulation_steps != 1:
        raise ConfigError("set gradient_accumulation_steps=1 and pass salf_grad_accum instead: one SALF "
                          "train batch is a whole optimizer step, split into micro-batches by cut")


class SalfTrainerMixin:
    """Mix into ``transformers.Trainer`` (or ``trl.SFTTrainer``): ``class T(SalfTrainerMixin, Trainer)``.

    Keyword arguments (besides the trainer's own):
        salf_strategy: a Strategy, or a strategy name (default: ``salf_config.strategy``, else "salf");
            a name that contradicts ``salf_config.strategy`` is an error.
        salf_config: TrainConfig of the SALF settings (budget, eof boundary, profile fraction, lens, LoRA,
            train_head...); its optimisation fields are ignored (the trainer's arguments rule).
        salf_bases: float32 [K, D] label bases (``semantics.semantic_bases``), for eof-layers.
        salf_grad_accum: micro-batches of ``per_device_train_batch_size`` per optimizer step.
    """

    def __init__(self, model: Any = None, args: Any = None, *args_rest: Any, salf_strategy: Any = None,
                 salf_config: TrainConfig | None = None, salf_bases: torch.Tensor | None = None,
                 salf_grad_accum: int = 1, **kwargs: Any) -> None:
        if args is None:
            raise ConfigError("SalfTrainer needs its TrainingArguments (args=...)")
        _check_args(args)
        if kwargs.get("peft_config") is not None:
            raise ConfigError("pass a PEFT-wrapped model or salf_config.lora instead of peft_config: the "
                              "adapters must exist before SALF patches the model")
        named = isinstance(salf_strategy, str)
        if named and salf_config is not None and salf_config.strategy != salf_strategy:
            raise ConfigError(f"salf_strategy={salf_strategy!r} contradicts salf_config.strategy="
                              f"{salf_config.strategy!r}; give the strategy once (TrainConfig(strategy=...))")
        if salf_strategy is None:
            salf_strategy = salf_config.strategy if salf_config is not None else "salf"
        name = salf_strategy if isinstance(salf_strategy, str) else salf_strategy.name
        cfg = salf_config or TrainConfig(model="hf", dataset="hf", strategy=name, seed=args.seed)
        strategy = strategy_from_config(cfg) if isinstance(salf_strategy, str) else salf_strategy
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = True
        self.salf_config = cfg
        self.salf_strategy = strategy
        self.salf_grad_accum = int(salf_grad_accum)
        self.salf_wrapped: TrainableModel = wrap_model(model, strategy, cfg)
        patch_model(self.salf_wrapped.model, bases=salf_bases, lens=cfg.lens, metric=cfg.metric,
                    deviation_impl=cfg.deviation_impl, gradient_checkpointing=cfg.gradient_checkpointing)
        self.salf_driver: StrategyDriver | None = None
        self.salf_sampler: PlanBatchSampler | None = None
        self.salf_seen: list[Observation] = []
        self.salf_train_state = TrainState()  # steps, skipped steps and losses, saved in salf_state.json
        self.salf_cost = CostMeter(self.salf_wrapped.parts.num_layers, lora=self.salf_wrapped.lora)
        self._salf_plans_ahead: list[StepPlan] = []  # the whole plans of the sampler's pending batches
        self._salf_resume: dict[str, Any] | None = None  # salf_state.json of the checkpoint resumed from
        # (epoch, the strategy's state at its start): what a checkpoint needs to replay the epoch's plans
        self._salf_epoch_start: tuple[int, dict[str, Any]] | None = None
        self._salf_user_collator = kwargs.get("data_collator") is not None
        # each training row's states at the frozen floor (salf_config.prefix_cache; planned at train begin)
        self.salf_prefix_cache: PrefixCache | None = None
        self.salf_prefix_summary: dict[str, Any] = {}
        super().__init__(self.salf_wrapped.model, args, *args_rest, **kwargs)
        self.add_callback(_trainer_classes()[1](self))

    # ---- data
    def _salf_pad_id(self) -> int:
        tok = getattr(self, "processing_class", None)
        pad = getattr(tok, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def get_train_dataloader(self) -> DataLoader:
        """One batch per SALF step plan: the rank's share, micro-batch by micro-batch."""
        dataset = self.train_dataset
        if dataset is None:
            raise ConfigError("SalfTrainer needs a train_dataset")
        strategy, cfg = self.salf_strategy, self.salf_config
        wants_eofs = strategy.needs_profile or getattr(strategy, "needs_observe", False)
        split = prompt_split(dataset) if wants_eofs else _LabelsOnly(dataset)
        runner = runner_of(self.salf_wrapped.model)
        if wants_eofs and runner.bases is None:
            raise ConfigError(f"strategy {strategy.name!r} measures eof-layers: pass salf_bases")
        self.salf_driver = StrategyDriver(strategy, runner, split, cfg, pad_id=self._salf_pad_id())
        world = max(1, self.args.world_size)
        micro = self.args.per_device_train_batch_size * world
        step_size = micro * self.salf_grad_accum
        self.salf_sampler = PlanBatchSampler(lambda epoch: self._salf_plans(epoch, step_size, micro),
                                             math.ceil(len(dataset) / step_size),
                                             rank=self.args.process_index, num_replicas=world)
        pad_id = self._salf_pad_id()
        base = self.data_collator if getattr(self, "_salf_user_collator", False) else (
            lambda rows: left_pad_collate(rows, pad_id))
        return DataLoader(PlanDataset(dataset), batch_sampler=self.salf_sampler,
                          collate_fn=_PlanCollator(base), num_workers=self.args.dataloader_num_workers,
                          pin_memory=self.args.dataloader_pin_memory)

    def _salf_plans(self, epoch: int, step_size: int, micro: int):
        """The epoch's plans (``StrategyDriver.resumable_epoch``); in the epoch a checkpoint was taken in,
        the plans before it come first, for the Trainer's ``skip_first_batches`` to drop."""
        state, point = self.salf_train_state, None
        if state.resume is not None and state.resume.epoch == epoch:
            point = state.take_resume()
            if self.args.ignore_data_skip:
                point = point._replace(plans_done=0)
        start, replayed, plans = self.salf_driver.resumable_epoch(  # type: ignore[union-attr]
            epoch, step_size, micro, point)
        self._salf_epoch_start = (epoch, start)
        yield from replayed
        if replayed and self.salf_sampler is not None:
            del self.salf_sampler.pending[:len(replayed)]  # nobody trains them
        for plan in plans:
            self._salf_plans_ahead.append(plan)  # in step with the sampler's pending micro-batches
            yield plan

    def _salf_plan_prefix_cache(self, epochs: int | None) -> None:
        """The prefix cache ``salf_config.prefix_cache`` asks for, once the strategy has begun (its floor),
        for a run of ``epochs`` (None: unknown); empty after a resume: an example's first forward in this
        process is a miss. Rows are the train dataset's, keyed by their index in it; the disk file lives in
        ``args.output_dir``."""
        dataset, args, driver = self.train_dataset, self.args, self.salf_driver
        assert dataset is not None and driver is not None
        lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        self.salf_prefix_cache, self.salf_prefix_summary = plan_prefix_cache(
            self.salf_config.prefix_cache, self.salf_strategy, self.salf_wrapped, lengths, device=args.device,
            run_dir=Path(args.output_dir) if args.output_dir else None,
            world=max(1, args.world_size), wants_deviations=driver.wants_deviations, say=_log.info,
            epochs=epochs)

    def salf_state(self, global_step: int) -> dict[str, Any]:
        """The engine's state at ``global_step`` (JSON-able), as ``salf_state.json`` of a checkpoint."""
        assert self.salf_driver is not None and self.salf_sampler is not None
        state = self.salf_train_state
        state.step = int(global_step)
        state.epoch, state.plans_done = divmod(state.step, self.salf_sampler.steps_per_epoch)
        epoch, start = self._salf_epoch_start or (0, self.salf_strategy.state_dict())
        state.epoch_start = start if epoch == state.epoch else self.salf_strategy.state_dict()
        return {"global_step": state.step, **state.state_dict(), "driver": self.salf_driver.state_dict(),
                "strategy": self.salf_strategy.state_dict(), "cost": self.salf_cost.state_dict()}

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; resuming from a checkpoint also restores the engine's state saved in it
        (``salf_state.json``: eof profile, strategy state, position in the epoch's plan)."""
        self._salf_resume = None
        path = resume_from_checkpoint
        if path is not None and path is not False:
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir)
            if not path:
                raise ConfigError(f"cannot resume SALF: {self.args.output_dir} holds no checkpoint")
            self._salf_resume = resume = load_trainer_state(path)
            self.salf_train_state.load_state_dict({"step": resume["global_step"], **resume})
            if "cost" in resume:
                self.salf_cost.load_state_dict(resume["cost"])
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    # ---- one step
    def training_step(self, model: Any, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """Every micro-batch of the step plan through :func:`~salf_engine.training.step.micro_batch_step`
        (its cut, the patched forward, weighted backward; DDP syncs on the last), the plan counted in
        ``salf_cost``, then the non-finite policy of :func:`~salf_engine.training.step.finish_step` (the
        Trainer clips and steps the optimizer itself)."""
        assert self.salf_sampler is not None and self.salf_driver is not None
        local: list[MicroBatch] = self.salf_sampler.pending.pop(0)
        plan = self._salf_plans_ahead.pop(0)
        model.train()
        inputs = self._prepare_inputs(inputs)
        micro_batches = inputs["salf_micro_batches"]
        if len(micro_batches) != len(local):
            raise ConfigError("a plan batch lost micro-batches on the way (a custom collator dropped rows?)")
        driver = self.salf_driver
        losses = bool(getattr(self.salf_strategy, "needs_losses", False))
        forward = patched_forward(model, row_losses=losses, context=self.compute_loss_context_manager,
                                  prefix_cache=self.salf_prefix_cache, floor=plan.floor)
        # a rank's weight-0 stand-in row is another rank's: it leaves the cache (the ranks share it) alone
        stand_in = patched_forward(model, row_losses=losses, context=self.compute_loss_context_manager)
        total = torch.zeros((), device=self.args.device)
        for k, (mb, batch) in enumerate(zip(local, micro_batches, strict=True)):
            sync = None if k == len(local) - 1 else self.accelerator.no_sync(model)
            res = micro_batch_step(forward if mb.weight > 0 else stand_in, self.salf_wrapped, mb, batch,
                                   observe=driver.wants_observations, backward=self.accelerator.backward,
                                   sync=sync)
            total += res.loss * mb.weight
            if res.observation is not None and (res.deviations is not None or not driver.wants_deviations):
                self.salf_seen.append(res.observation)
        self.salf_cost.add_plan(plan)
        self._salf_finish(plan, total)
        return total

    def _salf_finish(self, plan: StepPlan, total: torch.Tensor) -> None:
        """The non-finite policy (``salf_config.on_nonfinite``) on the step's loss and gradients, every rank
        deciding alike; a skipped step's gradients are dropped, so the Trainer's update changes nothing."""
        params = self.salf_wrapped.trainable
        grads = [q.grad.to_local() if hasattr(q.grad, "to_local") else q.grad  # an FSDP shard: its own
                 for q in params if q.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if getattr(self.accelerator, "scaler", None) is not None:
            norm = torch.zeros(())  # fp16: the grad scaler skips overflowing steps itself
        # the sums over the ranks are finite only when every rank's loss and gradients are
        sums = all_reduce_sum(torch.stack([total.float(), norm.to(total.device).float()]))
        loss, grad_norm = (float(x) for x in sums)
        world = max(1, self.args.world_size)
        state = self.salf_train_state
        where = (f"at step {self.state.global_step + 1} (depths {plan.depths}, examples "
                 f"{plan.indices[:32]}{' ...' if len(plan) > 32 else ''})")
        end = finish_step(self.optimizer, None, params, loss=loss, grad_norm=grad_norm, max_grad_norm=None,
                          on_nonfinite=self.salf_config.on_nonfinite, where=where, update=None)
        state.record(None if end.skipped else loss / world)
        if end.skipped:
            self.salf_seen = []  # a skipped step shows the strategy nothing
            _log.warning("non-finite %s %s; step skipped (%d so far)", end.skipped, where, state.skipped)


class _LabelsOnly:
    """What a strategy without eof-layers needs of the training rows: their count and class labels."""

    def __init__(self, dataset: Any) -> None:
        self.labels = [int(dataset[i].get("salf_label") or 0) for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.labels)


@functools.cache
def _trainer_classes() -> tuple[type, type]:
    """(``SalfTrainer``, ``SalfCallback``), made on first use: they subclass transformers' Trainer classes,
    whose import takes seconds (peft and bitsandbytes with it), so importing this module does not."""
    import_peft()  # the Trainer imports peft: without bitsandbytes' import-time note (as the CLI)
    from transformers import Trainer, TrainerCallback

    class SalfCallback(TrainerCallback):
        """Begins the strategy once the optimizer exists, feeds it each step's observations, restores the
        trainable flags at the end."""

        def __init__(self, trainer: SalfTrainerMixin) -> None:
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kwargs):
            t = self.trainer
            if t.salf_driver is None:
                raise ConfigError("SalfCallback needs SalfTrainerMixin's train dataloader")
            resume = getattr(t, "_salf_resume", None)
            if resume is not None:
                t.salf_driver.load_state_dict(resume["driver"])  # the profile of the interrupted run
            else:
                t.salf_driver.profile()
            # the epochs the Trainer's steps cover (SALF's rising schedule spreads its depths over them)
            per_epoch = t.salf_sampler.steps_per_epoch if t.salf_sampler is not None else 0
            epochs = math.ceil(state.max_steps / per_epoch) if per_epoch and state.max_steps > 0 else None
            t.salf_driver.begin(t.salf_wrapped.parts.layers, epochs)
            if resume is not None and hasattr(t.salf_strategy, "set_reference_weights"):
                # ADT's warm-up reference: on_train_start saw the checkpoint's weights, not the initial ones
                t.salf_strategy.set_reference_weights(resume["tensors"].get("reference_weights"))
            t._salf_plan_prefix_cache(epochs)
            if resume is not None:
                if t.salf_sampler is not None:
                    t.salf_sampler.set_epoch(int(resume["epoch"]))  # the sampler counts epochs itself
                if args.ignore_data_skip:
                    t.salf_strategy.load_state_dict(resume["strategy"])

        def on_save(self, args, state, control, **kwargs):
            """The engine's state into the Trainer's checkpoint folder (``checkpoint-N/salf_state.json``)."""
            t = self.trainer
            if t.salf_driver is None or not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                reference = getattr(t.salf_strategy, "reference_weights", lambda: None)()
                save_trainer_state(folder, t.salf_state(state.global_step),
                                   {"reference_weights": reference} if reference is not None else None)

        def on_step_end(self, args, state, control, **kwargs):
            t = self.trainer
            if t.salf_driver is not None:
                seen, t.salf_seen = t.salf_seen, []
                t.salf_driver.observe(seen)
                t.salf_driver.after_step(state.global_step, t.salf_wrapped.parts.layers)

        def on_train_end(self, args, state, control, **kwargs):
            t = self.trainer
            t.salf_wrapped.restore()
            if t.salf_prefix_cache is not None:
                t.salf_prefix_cache.close()
                t.salf_prefix_summary = t.salf_prefix_cache.summary()

    class SalfTrainer(SalfTrainerMixin, Trainer):
        """``transformers.Trainer`` with SALF step plans (:class:`SalfTrainerMixin` lists the extra
        arguments)."""

    for cls in (SalfTrainer, SalfCallback):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return SalfTrainer, SalfCallback


def __getattr__(name: str) -> Any:
    """``SalfTrainer`` and ``SalfCallback``, made on first use (see :func:`_trainer_classes`)."""
    if name in ("SalfTrainer", "SalfCallback"):
        return dict(zip(("SalfTrainer", "SalfCallback"), _trainer_classes(), strict=True))[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
