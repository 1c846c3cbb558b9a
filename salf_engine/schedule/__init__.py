"""Where each sample trains, step by step: the names (``names``), budget plans (``budgets``), the strategies
(``strategies``), a step's micro-batches per rank (``sampling``), the eof profile's forward (``profile``)
and the driver that profiles and observes (``driver``)."""
