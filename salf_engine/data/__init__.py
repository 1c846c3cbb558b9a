"""Datasets as prompts: presets and generic files -> `TaskData` -> token ids ending in the medium token."""

from __future__ import annotations

from salf_engine.data.files import load_files
from salf_engine.data.presets import PRESETS, Preset, load_preset, load_task
from salf_engine.data.prompts import (
    EncodedSplit,
    Example,
    PromptTemplate,
    TaskData,
    Verbalizer,
    collate,
    encode_split,
    stratified_subset,
    subset_split,
)

__all__ = [
    "Example",
    "TaskData",
    "PromptTemplate",
    "load_task",
    "load_preset",
    "load_files",
    "PRESETS",
    "Preset",
    "Verbalizer",
    "EncodedSplit",
    "encode_split",
    "stratified_subset",
    "subset_split",
    "collate",
]
