"""`TrainConfig`: every setting of one fine-tuning run, validated, to and from JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["TrainConfig", "DTYPES", "LOSSES", "METRICS", "SCHEDULES", "NONFINITE_ACTIONS",
           "DEFAULT_LORA_TARGETS", "DEFAULT_LR", "DEFAULT_LORA_LR"]

DTYPES = ("float32", "bf16")
LOSSES = ("next-token", "semantic-ce", "cosine")
METRICS = ("cosine", "ce", "rank")
SCHEDULES = ("linear", "constant")
LENSES = ("final_norm", "raw")
EOF_BOUNDARIES = ("trainable", "frozen")
DEVIATION_IMPLS = ("auto", "torch", "triton", "cpp", "cuda")
#: Learning rates when ``lr`` is not given, chosen by a sweep on held-out training data
#: (bench/results/lr_sweep.md): fine-tuning the weights themselves, and LoRA adapters.
DEFAULT_LR = 1e-4
DEFAULT_LORA_LR = 3e-3
DEPTH_SCHEDULES = ("mixed", "paper")
DEPTH_ASSIGNMENTS = ("class-rank", "eof-match")
#: What a non-finite loss or gradient does: stop the run (the last good checkpoint stays), or skip the step.
NONFINITE_ACTIONS = ("stop", "skip")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """Settings of one run; `validate()` raises ConfigError naming the first bad field."""

    # what to train on
    model: str = "smollm2-135m"
    dataset: str = "trec"
    data_dir: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    eval_split: str = "test"            # a split of the dataset, or "holdout" (carved from train)
    holdout_size: int = 500            # examples held out of the training split for eval_split="holdout"
    # which layers to train
    strategy: str = "salf"
    budget: str | None = None          # budget plan (uniform | arithmetic | geometric ...), strategy-defined
    infill: str | None = None          # share order: bf | df (decides quotas, not the visit order)
    depth_schedule: str = "mixed"      # mixed (several cuts per optimizer step) | paper (Algorithm 4)
    depth_assignment: str = "class-rank"  # budgeted SALF: class-rank | eof-match
    cuts_per_step: int = 4             # micro-batches (cuts) per optimizer step of depth-varying strategies
    profile_fraction: float = 1.0      # share of the training examples profiled before epoch 0
    train_head: bool = False           # train the LM head under layer-freezing strategies too
    freeze_fraction: float | None = None  # bot / top / int / adt strategies
    metric: str = "cosine"             # deviation metric for the eof-layer
    lens: str = "final_norm"           # lens for intermediate spaces: final_norm | raw
    eof_boundary: str = "trainable"    # the eof-layer itself trains (algorithm) or is frozen (figure 2)
    deviation_impl: str = "auto"       # deviation kernel: auto | torch | triton | cpp | cuda
    loss: str = "next-token"
    semantic_temperature: float = 0.05  # temperature of the cosine logits for loss="semantic-ce"
    # parameter-efficient / quantized
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    load_in_4bit: bool = False
    # numerics
    dtype: str = "float32"             # float32 | bf16 (autocast; master weights stay float32)
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    gradient_checkpointing: bool = False
    # optimisation
    max_steps: int | None = None       # optimizer steps; overrides epochs when set
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None            # None: DEFAULT_LR (full weights) or DEFAULT_LORA_LR (LoRA)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: str = "linear"           # linear decay after warm-up | constant after warm-up
    max_grad_norm: float | None = 1.0
    # data sizes
    max_length: int = 256
    limit: int | None = None           # training subset size (random, seeded)
    eval_limit: int | None = None
    eval_batch_size: int = 32
    zero_shot_eval: bool = True
    seed: int = 0
    # run directory
    output: str | None = None
    overwrite: bool = False
    save_every: int | None = None      # write a checkpoint every N optimizer steps (None: no checkpoints)
    save_total_limit: int | None = None  # keep the newest K checkpoints (None: keep all)
    on_nonfinite: str = "stop"         # non-finite loss / gradient: stop | skip (skip the update, count it)

    def validate(self) -> TrainConfig:
        """Check every field; return self so calls chain."""

        def positive(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        def choice(name: str, value: Any, options: tuple[str, ...]) -> None:
            if value not in options:
                raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(options)}")

        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must be a model name or a path")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError("dataset must be a preset name or a path")
        if not isinstance(self.strategy, str) or not self.strategy:
            raise ConfigError("strategy must be a strategy name")
        choice("dtype", self.dtype, DTYPES)
        choice("loss", self.loss, LOSSES)
        choice("metric", self.metric, METRICS)
        choice("schedule", self.schedule, SCHEDULES)
        choice("lens", self.lens, LENSES)
        choice("eof boundary", self.eof_boundary, EOF_BOUNDARIES)
        choice("deviation impl", self.deviation_impl, DEVIATION_IMPLS)
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "eval_batch_size", "lora_r",
                     "holdout_size"):
            positive(name, getattr(self, name))
        for name in ("max_steps", "limit", "eval_limit", "save_every", "save_total_limit"):
            positive(name, getattr(self, name), allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        choice("on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS)
        if self.save_every is not None and self.depth_schedule == "paper":
            raise ConfigError("save_every is not supported with the 'paper' depth schedule: its plans "
                              "probe the weights while they are made, so a resumed epoch cannot replay them")
        choice("depth schedule", self.depth_schedule, DEPTH_SCHEDULES)
        choice("depth assignment", self.depth_assignment, DEPTH_ASSIGNMENTS)
        positive("cuts_per_step", self.cuts_per_step)
        if not _finite(self.profile_fraction) or not 0 < self.profile_fraction <= 1:
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
        return self

    def resolved_lr(self, lora: bool) -> float:
        """``lr``, or the default for what trains: LoRA adapters or the weights themselves."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LORA_LR if lora else DEFAULT_LR

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


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
