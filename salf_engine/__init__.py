"""salf-engine: Semantic-Aware Layer-Freezing for causal LMs.

Public API (lazily imported so ``import salf_engine`` stays cheap and never
needs a GPU or triton).
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (
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
    "semantic_bases": "salf_engine.semantics",
    "lens_spec": "salf_engine.semantics",
    "LensSpec": "salf_engine.semantics",
    "deviations": "salf_engine.deviation",
    "deviations_reference": "salf_engine.deviation",
    "gains": "salf_engine.deviation",
    "eof_layers": "salf_engine.deviation",
    "TruncatedRunner": "salf_engine.runner",
    "RunnerOutput": "salf_engine.runner",
    "DepthBucketSampler": "salf_engine.sampling",
    "budget_quotas": "salf_engine.budgets",
    "assign_depths": "salf_engine.budgets",
    "cost_saving_ratio": "salf_engine.budgets",
    "make_strategy": "salf_engine.strategies",
    "Strategy": "salf_engine.strategies",
    "StepPlan": "salf_engine.strategies",
    "TrainConfig": "salf_engine.config",
    "train": "salf_engine.training",
    "prepare": "salf_engine.inputs",
    "Prepared": "salf_engine.inputs",
    "patch_model": "salf_engine.patching",
    "SalfTrainer": "salf_engine.hf",
    "SalfTrainerMixin": "salf_engine.hf",
    "evaluate": "salf_engine.evaluation",
    "load_model": "salf_engine.models.loading",
    "load_task": "salf_engine.data",
    "load_latest": "salf_engine.checkpoint",
    "verify_checkpoint": "salf_engine.checkpoint",
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
