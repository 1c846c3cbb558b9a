"""The engine's own training recipe (``recipe``: ``train``) and its pieces: inputs, trainable weights, one
step,
the losses, FLOPs, the run directory and checkpoints."""

from salf_engine._moved import lazy_exports

__getattr__, __dir__ = lazy_exports("salf_engine.training.recipe")
