"""Scores of a model: accuracy and macro-F1 of a classification task (``classification``), answer loss and
exact
match of a prompt/response task (``responses``), and ``salf eval`` / ``salf profile`` (``profiling``)."""

from salf_engine._moved import lazy_exports

__getattr__, __dir__ = lazy_exports("salf_engine.evaluation.classification")
