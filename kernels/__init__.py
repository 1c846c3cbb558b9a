"""Triton kernels of salf-engine, installed as ``salf_engine.kernels``; never the top-level ``kernels``.

The top-level name ``kernels`` belongs to the Hugging Face hub package, which transformers >= 5.25
imports from ``transformers.activations``. A Python started in the repository root (``python``,
``python -m pytest``) has the root first on ``sys.path``, and the import system takes the first
*regular* package it meets on ``sys.path``: this folder. So when this file runs under the name
``kernels`` it steps aside before anything of the engine runs:

* the hub package installed: it is loaded from the rest of ``sys.path`` and put in
  ``sys.modules["kernels"]``, which the import statement returns (importlib re-reads ``sys.modules``
  after a module's body ran), so ``from kernels import get_kernel`` gets the hub's function;
* not installed: ``kernels`` becomes an empty namespace-like module (no ``__file__``, no version, no
  attributes), which is what the import system would give for a stray folder without
  ``__init__.py``; transformers' availability check reads that as "not installed", and
  ``from kernels import x`` raises ImportError as a missing package would.

A namespace portion (no ``__init__.py`` here) would give the same ``sys.path`` semantics without code,
but setuptools' editable finder then cannot import ``salf_engine.kernels`` from this folder.
"""

if __name__ != "salf_engine.kernels":
    import importlib.util
    import sys
    from importlib.machinery import ModuleSpec, PathFinder
    from pathlib import Path

    def _step_aside(name: str) -> None:
        here = Path(__file__).resolve().parent.parent

        def elsewhere(entry: str) -> bool:
            try:
                return Path(entry or ".").resolve() != here
            except OSError:
                return True

        spec = PathFinder.find_spec(name, [p for p in sys.path if elsewhere(p)])
        if spec is None or spec.loader is None:
            stand_in = type(sys)(name)
            stand_in.__spec__ = ModuleSpec(name, None, is_package=True)
            stand_in.__spec__.submodule_search_locations = []
            stand_in.__path__ = []
            sys.modules[name] = stand_in
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)

    _step_aside(__name__)
