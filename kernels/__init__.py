"""Triton kernels of salf-engine (installed as ``salf_engine.kernels``)."""
