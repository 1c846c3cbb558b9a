"""The top-level API: every name in `__all__` resolves, and `import salf_engine` stays light."""

import subprocess
import sys

import salf_engine


def test_every_public_name_resolves():
    for name in salf_engine.__all__:
        assert getattr(salf_engine, name) is not None, name


def test_deviations_is_the_function_not_a_module():
    import salf_engine.deviation.compute  # noqa: F401  (importing the module must not shadow the function)

    assert callable(salf_engine.deviations)
    assert salf_engine.deviations.__module__ == "salf_engine.deviation.compute"


def test_import_needs_neither_triton_nor_transformers():
    code = (
        "import sys; import salf_engine; "
        "print(any(m in sys.modules for m in ('triton', 'transformers', 'salf_engine.kernels.deviation')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_cli_parser_loads_no_torch():
    """Building every `salf` parser (`--help`, argument errors) imports no torch: the subcommands import what
    they run when they run, and the config, the grid syntax and the strategy names are torch-free."""
    code = ("import sys; from salf_engine.cli.commands import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_import_hook_and_no_flat_paths():
    """`import salf_engine` adds no import hook, and the 0.1 flat paths (``salf_engine.strategies`` ...) are
    gone: every module has one path, its folder's (docs/ARCHITECTURE.md)."""
    code = """
import importlib, sys
before = list(sys.meta_path)
import salf_engine
assert sys.meta_path == before, sys.meta_path
for old in ("strategies", "ops", "driver", "distributed", "profiling", "options"):
    try:
        importlib.import_module(f"salf_engine.{old}")
    except ModuleNotFoundError:
        continue
    raise AssertionError(f"salf_engine.{old} still imports")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-800:]
