import contextlib
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def _interpreted_triton_kernels() -> None:
    """Import the Triton kernels once with TRITON_INTERPRET=1 (triton reads it when @triton.jit runs, so the
    kernels become interpreted functions that run on the CPU), then unset it again unless the session was
    started with it: the engine's "auto" backend then picks what users get on this machine (the C++ op on a
    CPU), and only the tests whose subject is the Triton kernel run it, directly or through the
    ``triton_interpreter`` fixture."""
    given = os.environ.get("TRITON_INTERPRET")
    if given is None and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import salf_engine.kernels.deviation  # noqa: F401
        try:  # triton imports gluon at the first launch and checks the mode again there
            import triton.experimental.gluon  # noqa: F401
        except ImportError:
            pass
    finally:
        if given is None:
            os.environ.pop("TRITON_INTERPRET", None)


_interpreted_triton_kernels()

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_interpreter(monkeypatch):
    """The dispatcher may choose the Triton kernel on a CPU (under the interpreter) for this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models run fastest (and steadiest on a shared CPU) that way."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def interrupt_after(monkeypatch):
    """``with interrupt_after(module, name, calls): ...``: ``module.name`` runs ``calls`` times, the next
    call raises KeyboardInterrupt (a kill in the middle of a run), which the block must end in; the real
    function is back afterwards."""

    @contextlib.contextmanager
    def interrupt(module, name: str, calls: int):
        real = getattr(module, name)
        count = 0

        def dying(*args, **kwargs):
            nonlocal count
            count += 1
            if count > calls:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, dying)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(module, name, real)

    return interrupt


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip cleanly without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: a saved tiny model directory per family (cached for the session)."""
    from tiny_models import save_tiny_model

    cache: dict = {}

    def make(family: str = "llama", num_layers: int = 4) -> Path:
        key = (family, num_layers)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = save_tiny_model(path, family, num_layers=num_layers)
        return cache[key]

    return make


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
