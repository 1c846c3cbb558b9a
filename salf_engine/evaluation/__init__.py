"""Scores of a model: accuracy and macro-F1 of a classification task (``classification``), answer loss and
exact match of a prompt/response task (``responses``), the task's report for a training loop (``task``),
and a model's figures (``plots``)."""
