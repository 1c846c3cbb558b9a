"""Import paths of the 0.1 flat layout, kept for one release.

``salf_engine.strategies``, ``salf_engine.ops`` ... moved into the architecture folders
(docs/ARCHITECTURE.md).
Importing an old path still works: it warns (DeprecationWarning) and returns the module at its new home, the
same object, so monkeypatching through either path patches both. Old paths that are now packages
(``salf_engine.deviation``, ``runner``, ``training``, ``evaluation``, ``cli``) keep their public names
through :func:`lazy_exports` without a warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

#: old module -> its new home
MOVED = {
    "salf_engine.semantics": "salf_engine.deviation.semantics",
    "salf_engine.deviation_contract": "salf_engine.deviation.contract",
    "salf_engine.ops": "salf_engine.deviation.cpp_op",
    "salf_engine.response_deviation": "salf_engine.deviation.responses",
    "salf_engine.budgets": "salf_engine.schedule.budgets",
    "salf_engine.strategies": "salf_engine.schedule.strategies",
    "salf_engine.sampling": "salf_engine.schedule.sampling",
    "salf_engine.driver": "salf_engine.schedule.driver",
    "salf_engine.step": "salf_engine.training.step",
    "salf_engine.cost": "salf_engine.training.cost",
    "salf_engine.wrapping": "salf_engine.training.wrapping",
    "salf_engine.checkpoint": "salf_engine.training.checkpoint",
    "salf_engine.rundir": "salf_engine.training.rundir",
    "salf_engine.inputs": "salf_engine.training.inputs",
    "salf_engine.chunked_loss": "salf_engine.training.chunked_loss",
    "salf_engine.sft": "salf_engine.training.sft",
    "salf_engine.sft_evaluation": "salf_engine.evaluation.responses",
    "salf_engine.profiling": "salf_engine.evaluation.profiling",
    "salf_engine.hf": "salf_engine.integrations.hf",
    "salf_engine.patching": "salf_engine.integrations.patching",
    "salf_engine.distributed": "salf_engine.integrations.distributed",
    "salf_engine.grid": "salf_engine.experiments.grid",
    "salf_engine.compare": "salf_engine.experiments.compare",
    "salf_engine.report": "salf_engine.experiments.report",
    "salf_engine.plots": "salf_engine.experiments.plots",
    "salf_engine.demo": "salf_engine.experiments.demo",
    "salf_engine.options": "salf_engine.cli.options",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED`; loading one returns the module at its new home."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system overwrites __spec__ with the old path's
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


def lazy_exports(home: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package that re-exports the public names (``__all__``) of its
    module ``home`` on first use."""

    def getattr_(name: str) -> Any:
        module = importlib.import_module(home)
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
        raise AttributeError(f"module {home.rsplit('.', 1)[0]!r} has no attribute {name!r}")

    def dir_() -> list[str]:
        return sorted(importlib.import_module(home).__all__)

    return getattr_, dir_
