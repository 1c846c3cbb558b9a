"""`TrainConfig`: every setting of one fine-tuning run, validated, to and from JSON."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from salf_engine.deviation.contract import (
    LENS_ALIASES,
    LENSES,
    METRICS,
    Boundary,
    DeviationImpl,
    LensName,
    Metric,
)
from salf_engine.errors import ConfigError, positive_int
from salf_engine.schedule.names import (
    ADT_STEPS,
    DEFAULT_CUTS_PER_STEP,
    INFILLS,
    Budget,
    DepthAssignment,
    DepthSchedule,
    Infill,
    StrategyName,
    strategy_defaults,
)
from salf_engine.schedule.names import ASSIGNMENTS as DEPTH_ASSIGNMENTS
from salf_engine.schedule.names import SCHEDULES as DEPTH_SCHEDULES

__all__ = ["TrainConfig", "DTYPES", "LOSSES", "METRICS", "SCHEDULES", "LENSES",
           "DEPTH_SCHEDULES", "DEPTH_ASSIGNMENTS", "INFILLS", "DEFAULT_LORA_TARGETS",
           "DEFAULT_LR", "DEFAULT_LORA_LR", "DEFAULT_PROFILE_FRACTION", "NONFINITE_ACTIONS",
           "GENERATIVE_PRESETS", "is_generative_preset", "load_config_file", "with_strategy_defaults"]

# The allowed names of every choice field, defined once (as the field types); the tuples are read off them.
# The deviation names come from `deviation.contract` and the strategy names from `schedule.names`, where
# what they name lives.
DType = Literal["float32", "bf16"]
Loss = Literal["next-token", "semantic-ce", "cosine"]
LRSchedule = Literal["linear", "constant"]
#: What a non-finite loss or gradient does: stop the run (the last good checkpoint stays), or skip the step.
NonfiniteAction = Literal["stop", "skip"]
#: Where each training example's hidden states at the frozen floor are kept (docs/prefix_cache.md).
PrefixCacheWhere = Literal["auto", "memory", "disk", "off"]
DTYPES: tuple[str, ...] = get_args(DType)
LOSSES: tuple[str, ...] = get_args(Loss)
SCHEDULES: tuple[str, ...] = get_args(LRSchedule)
NONFINITE_ACTIONS: tuple[str, ...] = get_args(NonfiniteAction)
#: Learning rates when ``lr`` is not given, chosen by a sweep on held-out training data
#: (bench/results/lr_sweep.md): fine-tuning the weights themselves, and LoRA adapters.
DEFAULT_LR = 1e-4
DEFAULT_LORA_LR = 3e-3
#: Share of a classification task's training examples profiled before epoch 0 when not given.
DEFAULT_PROFILE_FRACTION = 0.05
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


#: Dataset presets that are prompt/response tasks (supervised fine-tuning) rather than classification.
GENERATIVE_PRESETS = ("gsm8k",)


def is_generative_preset(dataset: object) -> bool:
    """Whether ``dataset`` names a prompt/response preset (:data:`GENERATIVE_PRESETS`)."""
    return isinstance(dataset, str) and dataset.lower() in GENERATIVE_PRESETS


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A field with its help text (shown by ``salf ... --help``; the CLI options are generated from these)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Settings of one run; `validate()` raises ConfigError naming the first bad field.

    Every field is a command-line option of ``salf train`` (``--field-name``; see `salf_engine.cli.options`),
    with the help text of its metadata; ``config.json`` of a run directory holds them all.
    """

    # what to train on
    model: str = _opt("smollm2-135m", "short name (smollm2-135m), HF directory or .gguf file")
    dataset: str = _opt("trec", "preset (trec, sst5, carer, mrpc, webss) or a local data file/directory")
    data_dir: str | None = _opt(None, "directory holding the preset's raw files")
    text_column: str | None = _opt(None, "text column of a local data file")
    text_pair_column: str | None = _opt(None, "second text column of a local data file (sentence pairs)")
    label_column: str | None = _opt(None, "label column of a local data file")
    prompt_column: str | None = _opt(None, "prompt column of a local prompt/response file (with "
                                           "--response-column; default 'prompt')")
    response_column: str | None = _opt(None, "response column of a local prompt/response file: supervised "
                                             "fine-tuning on the response tokens (the gsm8k preset is one)")
    eval_split: str = _opt("test", "the split evaluated: a split name, or 'holdout' (carved from train)")
    holdout_size: int = _opt(500, "examples held out of the training split for --eval-split holdout")
    eval_fraction: float | None = _opt(
        None, "a local file with only a training split: hold out this class-stratified fraction for "
              "evaluation (0 < f < 1)")
    # which layers to train
    strategy: StrategyName = _opt("salf", "what trains where (see README)")
    budget: Budget | None = _opt(
        None, "SALF budget plan (default: uniform, SALF[half]; none: Algorithm 3, each sample at its eof)")
    infill: Infill | None = _opt(None, "budget infilling order (sets the quotas, not the visit order; "
                                       "default: bf)")
    depth_schedule: DepthSchedule | None = _opt(
        None, "default: narrowing for salf, per-row with --budget none, --depth-assignment, "
              "--profile-fraction or --cut-levels (a schedule needs --budget named). per-row (every row of "
              "a forward at its own cut), mixed (cuts-per-step micro-batches of one cut each per optimizer "
              "step), paper (Algorithm 4 as written), narrowing / widening (per-row, the budget's depths "
              "ascending / descending over each epoch; no profile), rising (narrowing across the whole run: "
              "the frozen floor rises, and the prefix cache keeps the rows below it), stepped (rising's "
              "depths of each epoch in a random order: per-row cuts above a floor that rises per epoch)")
    depth_assignment: DepthAssignment | None = _opt(
        None, "budgeted SALF, per-row or mixed (default: class-rank): class-rank (eof rank inside each "
              "class), eof-match (Algorithm 4's matching) or loss-rank (last training loss inside each "
              "class, hardest deepest; no profile)")
    cuts_per_step: int = _opt(DEFAULT_CUTS_PER_STEP, "micro-batches of different depths per optimizer step "
                                                     "(SALF's mixed schedule, LIFT)")
    cut_levels: int | None = _opt(None, "per-row schedule: round each forward's depths down to at most "
                                        "this many distinct cuts (default: every row at its own depth)")
    profile_fraction: float | None = _opt(
        None, "share of the training examples profiled before epoch 0 (1 = the paper's full pass; default: "
              f"{DEFAULT_PROFILE_FRACTION:g}, later eofs come from the training forward, and 1 for prompt/"
              "response tasks, whose training forward measures no answer deviation)")
    train_head: bool = _opt(False, "train the LM head under layer-freezing strategies too "
                                   "(full always trains it)")
    freeze_fraction: float | None = _opt(None, "frozen share of the layers for bot / top / int / adt")
    adt_steps: int = _opt(ADT_STEPS, "adt-low / adt-high: optimizer steps of full training before the "
                                     "frozen layers are chosen")
    metric: Metric = _opt("cosine", "deviation metric of the eof-layer")
    lens: LensName = _opt("final_norm", "lens for intermediate spaces")
    eof_boundary: Boundary = _opt(
        "trainable", "the eof-layer itself trains (the algorithm) or is frozen (figure 2)")
    deviation_impl: DeviationImpl = _opt(
        "auto", "deviation kernel (auto: the first available of triton, cpp, torch)")
    loss: Loss = _opt("next-token", "training loss")
    semantic_temperature: float = _opt(0.05, "temperature of the cosine logits for --loss semantic-ce")
    # parameter-efficient / quantized
    lora: bool = _opt(False, "train LoRA adapters (PEFT) instead of the weights")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: int = _opt(16, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _opt(0.0, "LoRA dropout (0: PEFT skips its dropout module; docs/prefix_cache.md)")
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS),
                                           metadata={"help": "module names LoRA adapts"})
    load_in_4bit: bool = _opt(False, "load the weights in 4 bits (bitsandbytes; needs --lora and a GPU)")
    # numerics
    dtype: DType = _opt("float32", "compute dtype (bf16: autocast; master weights stay float32)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward (less memory)")
    prefix_cache: PrefixCacheWhere = _opt(
        "auto", "keep each training example's hidden states at the frozen floor and start its next forward "
                "there: auto (where exact: in memory within a quarter of the free memory, else a file in the "
                "run directory; else off, saying why), memory or disk (refuse where not exact), off "
                "(docs/prefix_cache.md)")
    # optimisation
    max_steps: int | None = _opt(None, "optimizer steps; overrides --epochs when set")
    epochs: int = _opt(1, "passes over the training set")
    batch_size: int = _opt(8, "examples per forward (micro-batch)")
    grad_accum: int = _opt(
        1, "micro-batches per optimizer step: a step holds batch-size x grad-accum examples")
    lr: float | None = _opt(None, f"learning rate (default: {DEFAULT_LR:g} for full weights, "
                                  f"{DEFAULT_LORA_LR:g} for LoRA)")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    warmup_ratio: float = _opt(0.1, "share of the steps spent warming up the learning rate")
    schedule: LRSchedule = _opt("linear", "learning rate after warm-up: linear decay or constant")
    max_grad_norm: float | None = _opt(1.0, "gradient clipping norm (null in a config file: no clipping)")
    # data sizes
    max_length: int = _opt(256, "tokens per example (longer prompts are cut)")
    limit: int | None = _opt(None, "training subset size (class-stratified, seeded)")
    eval_limit: int | None = _opt(None, "evaluation subset size (the same rows for every seed)")
    eval_batch_size: int = _opt(32, "examples per evaluation forward")
    zero_shot_eval: bool = _opt(True, "evaluate the pretrained model before training too",
                                flag="--no-zero-shot")
    eval_every_epoch: bool = _opt(False, "evaluate after every epoch too, off the training clock "
                                         "(summary.json 'epochs': the scores against training seconds)")
    exact_match_rows: int = _opt(100, "prompt/response tasks: greedy final-number exact match on the first N "
                                      "evaluation rows (0: answer loss only)")
    max_new_tokens: int = _opt(256, "prompt/response tasks: tokens generated per row for the exact match")
    seed: int = _opt(0, "random seed (subsets, shuffling, initialisation)")
    # run directory
    output: str | None = _opt(None, "run directory")
    overwrite: bool = _opt(False, "replace a finished run in --output")
    save_every: int | None = _opt(None, "write a checkpoint every N optimizer steps (none: no checkpoints)")
    save_total_limit: int | None = _opt(None, "keep the newest K checkpoints (none: all)")
    on_nonfinite: NonfiniteAction = _opt(
        "stop", "a non-finite loss or gradient: stop the run (the last good checkpoint stays) or skip the "
                "update and count it")

    @property
    def generative(self) -> bool:
        """Whether the task is supervised fine-tuning on prompt/response rows (gsm8k, --response-column)."""
        return self.response_column is not None or is_generative_preset(self.dataset)

    def __post_init__(self) -> None:
        if isinstance(self.lens, str):  # "raw", the 0.1 spelling of "none", for one release
            self.lens = LENS_ALIASES.get(self.lens, self.lens)

    def validate(self) -> TrainConfig:
        """Check every field; return self so calls chain."""

        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if not (value is None and allow_none):
                positive_int(value, name)

        def choice(name: str, value: Any, options: tuple[str, ...]) -> None:
            if value not in options:
                raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(options)}")

        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must be a model name or a path")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError("dataset must be a preset name or a path")
        if not isinstance(self.strategy, str) or not self.strategy:
            raise ConfigError("strategy must be a strategy name")
        for name, (options, optional) in field_choices().items():
            value = getattr(self, name)
            if not (optional and value is None):
                choice(name.replace("_", " "), value, options)
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "eval_batch_size", "lora_r",
                     "holdout_size", "max_new_tokens"):
            positive(name, getattr(self, name))
        for name in ("max_steps", "limit", "eval_limit", "save_every", "save_total_limit"):
            positive(name, getattr(self, name), allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.eval_fraction is not None and (not _finite(self.eval_fraction)
                                               or not 0 < self.eval_fraction < 1):
            raise ConfigError(f"eval_fraction must lie strictly between 0 and 1, got {self.eval_fraction!r}")
        if self.eval_fraction is not None and self.eval_split == "holdout":
            raise ConfigError("eval_fraction and eval_split 'holdout' both carve the evaluation examples out "
                              "of the training split; give one of them")
        if self.save_every is not None and self.depth_schedule == "paper":
            raise ConfigError("save_every is not supported with the 'paper' depth schedule: its plans "
                              "probe the weights while they are made, so a resumed epoch cannot replay them")
        if self.generative:
            self._validate_generative()
        if self.profile_fraction is not None and (not _finite(self.profile_fraction)
                                                  or not 0 < self.profile_fraction <= 1):
            raise ConfigError(f"profile_fraction must be in (0, 1], got {self.profile_fraction!r}")
        if self.lr is not None and (not _finite(self.lr) or self.lr <= 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not _finite(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not _finite(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not _finite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not _finite(self.semantic_temperature) or self.semantic_temperature <= 0:
            raise ConfigError(f"semantic_temperature must be positive, got {self.semantic_temperature!r}")
        if self.max_grad_norm is not None and (not _finite(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise ConfigError(f"max_grad_norm must be positive or null, got {self.max_grad_norm!r}")
        if not self.lora_target_modules or not all(isinstance(t, str) for t in self.lora_target_modules):
            raise ConfigError("lora_target_modules must be a non-empty list of module names")
        if self.load_in_4bit and not self.lora:
            raise ConfigError("load_in_4bit needs lora: 4-bit weights cannot be fine-tuned directly")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        # imported here, not at the top: the strategies import torch, and config stays cheap to import
        # (`salf --help` builds every option from it)
        from salf_engine.schedule.strategies import strategy_from_config

        strategy_from_config(self)  # the strategy's own options and how they combine, checked in one place
        return self

    def resolved_profile_fraction(self) -> float:
        """``profile_fraction``, or its default: every row for a prompt/response task (its training forward
        measures no answer deviation, so an unprofiled row would be placed at random), else
        :data:`DEFAULT_PROFILE_FRACTION` (later eofs come from the training forward)."""
        if self.profile_fraction is not None:
            return self.profile_fraction
        return 1.0 if self.generative else DEFAULT_PROFILE_FRACTION

    def resolved_lr(self, lora: bool) -> float:
        """``lr``, or the default for what trains: LoRA adapters or the weights themselves."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LORA_LR if lora else DEFAULT_LR

    def _validate_generative(self) -> None:
        """What a prompt/response task cannot do (no classes, no label bases), named before anything loads."""
        if isinstance(self.exact_match_rows, bool) or not isinstance(self.exact_match_rows, int) \
                or self.exact_match_rows < 0:
            raise ConfigError(f"exact_match_rows must be an integer >= 0, got {self.exact_match_rows!r}")
        if self.loss != "next-token":
            raise ConfigError(f"loss {self.loss!r} measures against class bases; a prompt/response task "
                              "trains with the next-token loss on its response tokens")
        for name in ("text_column", "text_pair_column", "label_column"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name} belongs to classification files; a prompt/response task reads "
                                  "--prompt-column and --response-column")
        if self.strategy == "salf" and self.depth_schedule == "paper":
            raise ConfigError("the 'paper' schedule probes eofs at every visit; a prompt/response task's "
                              "answer deviation is profiled once: use the per-row or mixed schedule")
        if self.metric != "cosine":
            raise ConfigError(f"metric {self.metric!r} compares with the other labels' bases; an answer's "
                              "deviation (docs/sft.md) is defined with the cosine metric")

    # ---- JSON ----
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as indented JSON; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict; unknown keys are a ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError("a training config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, source: str | Path) -> TrainConfig:
        """Read a config from a JSON file path or a JSON string."""
        text = str(source)
        path = Path(text)
        if not text.lstrip().startswith("{"):
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


@functools.cache
def field_types() -> dict[str, Any]:
    """Field name -> its resolved type (``Literal[...]``, ``int | None``, ``list[str]`` ...)."""
    return typing.get_type_hints(TrainConfig)


def field_choices() -> dict[str, tuple[tuple[str, ...], bool]]:
    """Field name -> (allowed names, whether None is allowed) for every ``Literal`` field."""
    out = {}
    for name, tp in field_types().items():
        args = get_args(tp)
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)] if optional else [tp]
        if len(inner) == 1 and typing.get_origin(inner[0]) is Literal:
            out[name] = (get_args(inner[0]), optional)
    return out


def with_strategy_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with the strategy's defaults filled in (``budget``, ``depth_schedule``,
    ``depth_assignment``), so that two configs of the same strategy compare equal. A salf config with a
    schedule and no budget was saved before issue 38, when no budget meant Algorithm 3: its budget reads
    ``"none"``."""
    out = dict(data)
    name = out.get("strategy", "salf")
    budget, schedule = out.get("budget"), out.get("depth_schedule")
    if name == "salf" and budget is None and schedule is not None:
        budget = "none"
    out["budget"], out["depth_schedule"], out["depth_assignment"] = strategy_defaults(
        name, budget, schedule, out.get("depth_assignment"), out.get("profile_fraction"),
        out.get("cut_levels"))
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON file; a one-line ConfigError when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {' '.join(str(exc).split())}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of option names to values")
    return data


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
