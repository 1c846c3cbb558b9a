"""The ``salf`` command: its subcommands (``commands``), the options generated from ``TrainConfig``
(``options``), and ``salf eval`` / ``salf profile`` (``eval_profile``)."""
