"""The engine's own training recipe (``recipe``: ``train``) and its pieces: inputs, trainable weights, one
step, FLOPs, the run directory and checkpoints."""
