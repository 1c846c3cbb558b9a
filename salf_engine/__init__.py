"""salf-engine: Semantic-Aware Layer-Freezing for causal LMs.

Public API (lazily imported so ``import salf_engine`` stays cheap and never
needs a GPU or triton).
"""

from __future__ import annotations

import importlib
from typing import Any

from salf_engine.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    SalfError,
    TrainingError,
    UnsupportedArchitectureError,
)

__version__ = "0.1.0"

_LAZY = {
    "semantic_bases": "salf_engine.deviation.semantics",
    "lens_spec": "salf_engine.deviation.semantics",
    "LensSpec": "salf_engine.deviation.semantics",
    "deviations": "salf_engine.deviation.compute",
    "deviations_reference": "salf_engine.deviation.compute",
    "gains": "salf_engine.deviation.compute",
    "eof_layers": "salf_engine.deviation.compute",
    "TruncatedRunner": "salf_engine.runner.truncated",
    "RunnerOutput": "salf_engine.runner.truncated",
    "budget_quotas": "salf_engine.schedule.budgets",
    "assign_depths": "salf_engine.schedule.budgets",
    "cost_saving_ratio": "salf_engine.schedule.budgets",
    "make_strategy": "salf_engine.schedule.strategies",
    "Strategy": "salf_engine.schedule.strategies",
    "StepPlan": "salf_engine.schedule.strategies",
    "TrainConfig": "salf_engine.config",
    "train": "salf_engine.training.recipe",
    "prepare": "salf_engine.training.inputs",
    "Prepared": "salf_engine.training.inputs",
    "patch_model": "salf_engine.integrations.patching",
    "SalfTrainer": "salf_engine.integrations.hf",
    "SalfTrainerMixin": "salf_engine.integrations.hf",
    "evaluate": "salf_engine.evaluation.classification",
    "load_model": "salf_engine.models.loading",
    "load_task": "salf_engine.data",
    "load_latest": "salf_engine.training.checkpoint",
    "verify_checkpoint": "salf_engine.training.checkpoint",
}

__all__ = [
    "__version__",
    "SalfError",
    "DataError",
    "ModelError",
    "UnsupportedArchitectureError",
    "ConfigError",
    "CheckpointError",
    "TrainingError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'salf_engine' has no attribute {name!r}")
