"""Comparison grids and their reports: cells (``grid``), the resumable runner (``compare``), tables
(``report``), plots (``plots``) and ``salf demo`` (``demo``)."""
