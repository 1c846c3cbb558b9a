"""Model loading (`loading`) and per-family decoder parts (`families`)."""

from __future__ import annotations

from salf_engine.models.loading import (
    SHORT_NAMES,
    PackagedModel,
    cache_dir,
    convert_gguf,
    load_model,
    resolve_model,
)

__all__ = ["load_model", "resolve_model", "SHORT_NAMES", "PackagedModel", "convert_gguf", "cache_dir"]
