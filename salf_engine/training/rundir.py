"""The run directory: config.json, metrics.jsonl, model/, eval files and summary.json (written last)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from salf_engine.config import TrainConfig
from salf_engine.errors import ModelError
from salf_engine.models.loading import load_model
from salf_engine.runtime.atomic import atomic_write
from salf_engine.training.wrapping import import_peft

__all__ = ["RUN_FILES", "RunDirectory", "is_run_dir", "read_run_config", "load_for_eval"]

# Everything a run directory may hold; overwrite clears exactly these.
RUN_FILES = ("config.json", "metrics.jsonl", "model", "eval.json", "eval.txt", "eof_hist.png", "summary.json",
             "zero_shot_eval.json", "checkpoints")


class RunDirectory:
    """Writes the artefacts of a run; summary.json last and atomically. ``path=None`` writes nothing."""

    def __init__(self, path: Path | None, *, resume_metrics_bytes: int | None = None) -> None:
        """Start a run in ``path`` (an unfinished run there is cleared, checkpoints included), or, with
        ``resume_metrics_bytes``, continue one: metrics.jsonl is cut back to that length (the lines
        written up to the checkpoint resumed from) and appended to; nothing else is touched."""
        self.path = path
        if path is None:
            return
        path.mkdir(parents=True, exist_ok=True)
        if resume_metrics_bytes is not None:
            (path / "summary.json").unlink(missing_ok=True)
            metrics = path / "metrics.jsonl"
            metrics.touch()
            self._metrics = open(metrics, "r+")  # noqa: SIM115 - closed in close()
            self._metrics.truncate(resume_metrics_bytes)
            self._metrics.seek(resume_metrics_bytes)
            return
        # a finished run is only replaced with overwrite (checked in `prepare`), an unfinished one always;
        # drop the finished marker first, so an interrupted overwrite never looks finished
        (path / "summary.json").unlink(missing_ok=True)
        for name in RUN_FILES:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        self._metrics = open(path / "metrics.jsonl", "w")  # noqa: SIM115 - closed in close()

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl."""
        if self.path is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def write_json(self, name: str, data: Any) -> None:
        """Write ``name`` as indented JSON, atomically."""
        if self.path is not None:
            atomic_write(self.path / name, json.dumps(data, indent=2) + "\n")

    def write_text(self, name: str, text: str) -> None:
        """Write ``name`` as text, atomically."""
        if self.path is not None:
            atomic_write(self.path / name, text)

    def metrics_bytes(self) -> int:
        """The length of metrics.jsonl so far, on disk (fsynced: a checkpoint records it)."""
        if self.path is None:
            return 0
        self._metrics.flush()
        os.fsync(self._metrics.fileno())
        return self._metrics.tell()

    def close(self) -> None:
        """Close metrics.jsonl."""
        if self.path is not None and not self._metrics.closed:
            self._metrics.close()


# ----------------------------------------------------------------------------- reading a run back

def is_run_dir(path: str | Path) -> bool:
    """Whether `path` is a run directory (config.json and model/)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "model").is_dir()


def read_run_config(path: str | Path):
    """The TrainConfig a run directory was made with."""
    return TrainConfig.from_json(Path(path) / "config.json")


def load_for_eval(model_or_run: str | Path, *, device: str = "cpu"):
    """(model, tokenizer, run config or None): a model name/path, or a run dir's saved model / adapter."""
    if not is_run_dir(model_or_run):
        model, tok = load_model(str(model_or_run), device=device)
        return model, tok, None
    run = Path(model_or_run)
    cfg = read_run_config(run)
    saved = run / "model"
    if (saved / "adapter_config.json").is_file():
        PeftModel = import_peft(load_in_4bit=cfg.load_in_4bit).PeftModel  # noqa: N806
        base, tok = load_model(cfg.model, device=device, load_in_4bit=cfg.load_in_4bit)
        try:
            model = PeftModel.from_pretrained(base, saved, is_trainable=False)
        except Exception as exc:  # a broken adapter is a user-facing problem
            raise ModelError(f"cannot load the LoRA adapter in {saved}: {type(exc).__name__}: {exc}") from exc
        model.eval()
        return model, tok, cfg
    model, tok = load_model(saved, device=device)
    return model, tok, cfg
