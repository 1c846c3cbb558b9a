"""The ``salf`` command: its subcommands (``commands``) and the options generated from ``TrainConfig``
(``options``)."""

from salf_engine._moved import lazy_exports

__getattr__, __dir__ = lazy_exports("salf_engine.cli.commands")
