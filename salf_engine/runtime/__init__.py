"""The bottom layer: device, distributed and autocast primitives every other layer may use.

It imports nothing of the engine but `errors`, so the schedule, the training loop, the evaluation and
the integrations can all read it without an import cycle.
"""
