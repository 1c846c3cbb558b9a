"""The top-level API: every name in `__all__` resolves, and `import salf_engine` stays light."""

import subprocess
import sys

import salf_engine


def test_every_public_name_resolves():
    for name in salf_engine.__all__:
        assert getattr(salf_engine, name) is not None, name


def test_deviations_is_the_function_not_a_module():
    import salf_engine.deviation  # noqa: F401  (importing the module must not shadow the function)

    assert callable(salf_engine.deviations)
    assert salf_engine.deviations.__module__ == "salf_engine.deviation"


def test_import_needs_neither_triton_nor_transformers():
    code = (
        "import sys; import salf_engine; "
        "print(any(m in sys.modules for m in ('triton', 'transformers', 'salf_engine.kernels.deviation')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
