"""User-facing errors: each names the problem in one sentence.

The CLI prints these as ``error: <message>`` and exits with status 2; anything
else that escapes is a bug in the engine.
"""

from __future__ import annotations

__all__ = ["SalfError", "DataError", "ModelError", "UnsupportedArchitectureError", "ConfigError",
           "CheckpointError", "TrainingError", "positive_int"]


class SalfError(Exception):
    """Bad input or an impossible setting, with a message meant for the user."""


class DataError(SalfError):
    """A dataset, file, split, label or prompt problem."""


class ModelError(SalfError):
    """A model that cannot be found, loaded or converted."""


class UnsupportedArchitectureError(ModelError):
    """A model family the truncated runner does not know how to cut."""


class ConfigError(SalfError):
    """An unknown strategy/plan name or an impossible combination of settings."""


class CheckpointError(SalfError):
    """A checkpoint that is partial, corrupt or cannot be written (the message names it)."""


class TrainingError(SalfError):
    """Training cannot go on: a non-finite loss or gradient (the message names the step and batch)."""


def positive_int(value: object, what: str) -> int:
    """``value`` when it is an integer >= 1 (bools are not), else ConfigError naming ``what``: the one check
    of every count setting (config fields, strategy options, budget sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value
