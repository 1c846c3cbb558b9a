"""The repository's ``kernels/`` folder is ``salf_engine.kernels`` only, never the top-level ``kernels``.

transformers >= 5.25 imports the hub package ``kernels`` from ``transformers.activations``; a Python
started in the repository root has the root first on ``sys.path``. These tests start such Pythons.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _hub_kernels_dir() -> Path | None:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels")).resolve()


def test_root_python_gets_the_hub_package_and_the_engine_kernels():
    code = (
        "import json, kernels, salf_engine.kernels.deviation as dev\n"
        "import transformers.activations, transformers.integrations.hub_kernels\n"
        "print(json.dumps({'kernels': getattr(kernels, '__file__', None), 'dev': dev.__file__}))"
    )
    out = _run_in_root("-c", code)
    assert out.returncode == 0, out.stderr[-2000:]
    files = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(files["dev"]).resolve() == ROOT / "kernels" / "deviation.py"
    hub = _hub_kernels_dir()
    if hub is None:
        assert files["kernels"] is None  # the empty stand-in, never this repository's folder
    else:
        assert Path(files["kernels"]).resolve() == hub / "__init__.py"


@pytest.mark.skipif(_hub_kernels_dir() is None, reason="the hub package 'kernels' is not installed")
def test_root_python_imports_the_hub_api():
    out = _run_in_root("-c", "from kernels import get_kernel, kernelize; print(get_kernel.__module__)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("kernels")


def test_without_the_hub_package_the_folder_is_an_empty_stand_in():
    # -S: no site-packages, so no hub package; the root alone on sys.path
    code = (
        "import sys; sys.path.insert(0, '')\n"
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None and not kernels.__path__, vars(kernels)\n"
        "for stmt in ('from kernels import get_kernel', 'import kernels.deviation'):\n"
        "    try:\n"
        "        exec(stmt)\n"
        "    except ImportError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(stmt + ' should fail')\n"
        "print('ok')"
    )
    out = _run_in_root("-S", "-c", code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_pytest_collects_from_the_root():
    out = _run_in_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                       "tests/test_runner.py")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "error" not in out.stdout.lower()
