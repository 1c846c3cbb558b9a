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


def test_old_flat_paths_warn_and_return_the_moved_module():
    """Every 0.1 flat module path still imports, with a DeprecationWarning naming the new home, and is the
    same module object (so monkeypatching either path patches both)."""
    import importlib
    import subprocess
    import sys

    code = """
import importlib, sys, warnings
from salf_engine._moved import MOVED
for old, new in MOVED.items():
    module = importlib.import_module(new)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert importlib.import_module(old) is module, old
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
    assert module.__spec__.name == new, old
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-800:]
    # modules that became packages keep their public names without a warning
    for pkg, name in [("salf_engine.deviation", "deviations"), ("salf_engine.runner", "TruncatedRunner"),
                      ("salf_engine.training", "train"), ("salf_engine.evaluation", "evaluate"),
                      ("salf_engine.cli", "main")]:
        assert callable(getattr(importlib.import_module(pkg), name))
