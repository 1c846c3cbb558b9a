"""Checkpoints of the engine's own loop: written atomically, verified on load, pruned to a limit.

A checkpoint is a directory ``RUN/checkpoints/step-00000012/`` holding

- ``state.pt``: tensors (the trainable weights or LoRA adapter, optimizer and scheduler state, the
  runner's label bases) and every RNG state (python, numpy, torch, CUDA);
- ``meta.json``: the loop's counters and history (step, epoch, plans done in the epoch, losses, cost
  meter, driver and strategy state, the byte length of metrics.jsonl at the step);
- ``manifest.json``: written last, the sha256 and size of every other file.

It is written in a temporary directory (``checkpoints/.tmp-...``), every file fsynced, the manifest last,
then renamed into place, so a kill at any moment leaves the previous checkpoint whole and never a
directory that looks finished but is not. :func:`verify_checkpoint` checks the manifest; a checkpoint
that fails it raises :class:`~salf_engine.errors.CheckpointError` naming it, and :func:`load_latest`
falls back to the next older one (saying so).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salf_engine.config import with_strategy_defaults
from salf_engine.errors import CheckpointError, ConfigError
from salf_engine.runtime.atomic import atomic_save, atomic_write, fsync_dir, fsync_file

__all__ = [
    "CHECKPOINTS",
    "RESUME_MAY_CHANGE",
    "Checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
    "load_checkpoint",
    "load_latest",
    "list_checkpoints",
    "prune_checkpoints",
    "config_differences",
    "check_writable",
    "check_free_space",
    "rng_state",
    "set_rng_state",
]

#: The run directory's folder of checkpoints.
CHECKPOINTS = "checkpoints"
#: Config fields that may differ between a run and its resumption (where it runs and how it saves, and where
#: it keeps the prefix cache: derived data, rebuilt after every resume); every other field must be identical.
RESUME_MAY_CHANGE = ("device", "output", "overwrite", "save_every", "save_total_limit", "on_nonfinite",
                     "prefix_cache")

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_STATE = "state.pt"
_META = "meta.json"
_MANIFEST = "manifest.json"


@dataclass
class Checkpoint:
    """A verified checkpoint: its directory, step, tensors/RNG states (``state``) and ``meta``."""

    path: Path
    step: int
    state: dict[str, Any]
    meta: dict[str, Any]


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every RNG the loop may draw from: python, numpy (when imported), torch CPU, and CUDA (when there)."""
    state: dict[str, Any] = {"python": _py_state_to_lists(random.getstate()), "torch": torch.get_rng_state()}
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.as_tensor(keys.astype("int64")), int(pos), int(has_gauss),
                          float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only when this process has the same GPUs)."""
    random.setstate(_py_state_from_lists(state["python"]))
    torch.set_rng_state(state["torch"])
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_lists(s: tuple) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]


def _py_state_from_lists(s: list) -> tuple:
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


# ----------------------------------------------------------------------------- writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    """``step-00000012``: the directory name of the checkpoint after ``step`` optimizer steps."""
    return f"step-{step:08d}"


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], meta: dict[str, Any], *,
                    total_limit: int | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically (temporary dir, fsync, rename); keep the newest
    ``total_limit`` checkpoints. Returns its directory. An OSError (disk full ...) leaves no partial
    checkpoint behind and is raised as CheckpointError."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        torch.save(state, tmp / _STATE)
        (tmp / _META).write_text(json.dumps({"step": step, **meta}) + "\n")
        files = {}
        for name in (_STATE, _META):
            fsync_file(tmp / name)
            files[name] = {"sha256": _sha256(tmp / name), "size": (tmp / name).stat().st_size}
        (tmp / _MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
        fsync_file(tmp / _MANIFEST)
        fsync_dir(tmp)
        if final.exists():  # a stale or bad checkpoint of the same step: move it away first
            old = root / f".old-{step_dir_name(step)}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {exc.strerror or exc}") from None
    if total_limit is not None:
        prune_checkpoints(run_dir, total_limit)
    return final


#: The engine's state in an HF Trainer checkpoint folder (next to trainer_state.json).
TRAINER_STATE = "salf_state.json"
#: Tensors of that state (ADT's warm-up reference weights), next to it when there are any.
TRAINER_TENSORS = "salf_state.pt"


def save_trainer_state(folder: str | Path, state: dict[str, Any], tensors: dict[str, Any] | None = None
                       ) -> None:
    """The engine's state inside an HF Trainer checkpoint folder, each file written atomically (tensors
    first, so a state file never names tensors that are missing)."""
    folder = Path(folder)
    try:
        if tensors:
            atomic_save(folder / TRAINER_TENSORS, lambda tmp: torch.save(tensors, tmp))
        atomic_write(folder / TRAINER_STATE, json.dumps(state) + "\n")
    except OSError as exc:
        what = exc.strerror or exc
        raise CheckpointError(f"could not write the SALF state into {folder}: {what}") from None


def load_trainer_state(folder: str | Path) -> dict[str, Any]:
    """:func:`save_trainer_state`'s state, with its tensors under ``"tensors"`` ({} when none were saved);
    ConfigError when the folder holds none (a checkpoint not saved by a SalfTrainer)."""
    folder = Path(folder)
    if not (folder / TRAINER_STATE).is_file():
        raise ConfigError(f"cannot resume SALF from {folder}: it holds no {TRAINER_STATE} (was it saved by a "
                          "SalfTrainer?)")
    state = json.loads((folder / TRAINER_STATE).read_text())
    tensors = folder / TRAINER_TENSORS
    state["tensors"] = torch.load(tensors, map_location="cpu", weights_only=True) if tensors.is_file() else {}
    return state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint directories of a run, newest (highest step) first; temporary dirs are not listed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), reverse=True)  # type: ignore


def prune_checkpoints(run_dir: str | Path, limit: int) -> list[Path]:
    """Delete all but the newest ``limit`` checkpoints (and leftover temporary dirs); returns the deleted."""
    doomed = list_checkpoints(run_dir)[limit:]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def clean_temporary(run_dir: str | Path) -> None:
    """Remove temporary directories a killed save left behind (they never count as checkpoints)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- reading


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The manifest of a whole checkpoint; CheckpointError naming ``path`` when a file is missing,
    truncated or altered (or the manifest itself is)."""
    path = Path(path)
    manifest_path = path / _MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is partial: it has no {_MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or set(files) != {_STATE, _META}:
            raise ValueError("wrong file list")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: its {_MANIFEST} is unreadable") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is partial: {name} is missing")
        size = f.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} has {size} bytes, "
                                  f"the manifest says {info.get('size')}")
        if _sha256(f) != info.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupt: the checksum of {name} does not match")
    return manifest


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify and read one checkpoint directory."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        meta = json.loads((path / _META).read_text())
        state = torch.load(path / _STATE, map_location=map_location, weights_only=True)
    except Exception as exc:  # verified but unreadable: written by another version
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from None
    return Checkpoint(path=path, step=int(meta["step"]), state=state, meta=meta)


def load_latest(run_dir: str | Path, *, say: Callable[[str], None] | None = None,
                map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest whole checkpoint of a run (None when it has none). A corrupt or partial newer one is
    named through ``say`` and renamed ``bad-step-...`` (kept for inspection); the next older is used."""
    for path in list_checkpoints(run_dir):
        try:
            return load_checkpoint(path, map_location=map_location)
        except CheckpointError as exc:
            if say is not None:
                say(f"warning: {exc}; trying the next older checkpoint")
            bad = path.with_name(f"bad-{path.name}")
            shutil.rmtree(bad, ignore_errors=True)
            os.replace(path, bad)
    return None


# ----------------------------------------------------------------------------- checks


def config_differences(saved: dict[str, Any], given: dict[str, Any],
                       may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> list[str]:
    """``name: saved -> given`` for every field that differs and may not change on resume (the strategy's
    defaults filled in on both sides: :func:`~salf_engine.config.with_strategy_defaults`)."""
    saved, given = with_strategy_defaults(saved), with_strategy_defaults(given)
    out = []
    for name in sorted(set(saved) | set(given)):
        if name in may_change:
            continue
        a, b = saved.get(name), given.get(name)
        if a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def check_writable(directory: str | Path) -> None:
    """ConfigError unless a file can be created in ``directory`` (or, while it does not exist yet, in its
    nearest existing ancestor, where it will be created); leaves nothing behind."""
    d = Path(directory)
    probe_dir = d
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(f"output {d} cannot be created: {probe_dir} is not a directory")
    probe = probe_dir / f".salf-write-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"x")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise ConfigError(f"output {d} is not writable: {exc.strerror or exc} ({probe_dir})") from None
    finally:
        probe.unlink(missing_ok=True)


def check_free_space(directory: str | Path, needed: int, what: str = "a checkpoint") -> None:
    """ConfigError when the file system of ``directory`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ConfigError(f"not enough free space in {directory} for {what}: {free / 2**20:.1f} MiB free, "
                          f"about {needed / 2**20:.1f} MiB needed")


def restore_weights(wrapped, names: dict[int, str], ckpt: Checkpoint) -> None:
    """Copy a checkpoint's trainable weights into the model (``names``: parameter id -> name); CheckpointError
    when the checkpoint holds other parameters or shapes."""
    weights = ckpt.state["weights"]
    want = {names[id(q)] for q in wrapped.trainable}
    if set(weights) != want:
        raise CheckpointError(f"checkpoint {ckpt.path} holds other trainable parameters than this run "
                              f"({len(weights)} saved, {len(want)} here)")
    with torch.no_grad():
        for q in wrapped.trainable:
            saved = weights[names[id(q)]]
            if saved.shape != q.shape:
                raise CheckpointError(f"checkpoint {ckpt.path}: {names[id(q)]} has shape "
                                      f"{tuple(saved.shape)}, the model's is {tuple(q.shape)}")
            q.copy_(saved)
