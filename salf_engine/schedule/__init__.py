"""Where each sample trains, step by step: budget plans (``budgets``), the strategies (``strategies``), a
step's
micro-batches per rank (``sampling``) and the driver that profiles and observes (``driver``)."""
