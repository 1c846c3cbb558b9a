"""The device a run uses and the compute dtype on it."""

from __future__ import annotations

import contextlib
import os

import torch

from salf_engine.errors import ConfigError

__all__ = ["autocast_context", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; under torchrun 'auto' / 'cuda' is this rank's GPU."""
    local = os.environ.get("LOCAL_RANK")
    if device in ("auto", "cuda") and torch.cuda.is_available() and local is not None:
        return torch.device(f"cuda:{int(local)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available")
    return torch.device(device)


def autocast_context(dtype: str, device: torch.device):
    """bf16 autocast on the device for dtype 'bf16'; nothing for float32."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
