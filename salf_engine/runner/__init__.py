"""The truncated runner: one forward of an HF decoder with every row cut at its own depth (``truncated``)."""

from salf_engine._moved import lazy_exports

__getattr__, __dir__ = lazy_exports("salf_engine.runner.truncated")
