"""The C++ / CUDA deviation op (``torch.ops.salf``), built on demand.

``csrc/deviation.cpp`` (CPU, always) and ``csrc/deviation_cuda.cu`` (only when
``torch.cuda.is_available()`` and ``nvcc`` exists) are compiled once with
``torch.utils.cpp_extension.load`` (ninja) into
``$SALF_CACHE_DIR/torch_ext`` (default ``~/.cache/salf-engine/torch_ext``) and
register a real torch op with CPU and CUDA dispatch keys::

    salf::deviations(Tensor[] states, Tensor last_index, Tensor labels, Tensor bases,
                     Tensor? lens_weight, Tensor? lens_bias, int lens_kind, float eps,
                     int metric) -> Tensor

``lens_kind``: 0 none, 1 rms, 2 layernorm; ``metric``: 0 cosine, 1 ce, 2 rank
(the codes and the input check are in ``salf_engine.deviation.contract``, shared with the Triton
kernels; the math is in ``salf_engine.kernels.deviation``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

import salf_engine.csrc as csrc
from salf_engine.deviation.contract import (
    METRIC_CODES,
    DeviationInputs,
    KernelInputError,
    check_deviation_inputs,
    lens_parts,
)

__all__ = [
    "cpp_available",
    "cpp_unavailable_reason",
    "cuda_op_available",
    "built_for",
    "deviations_cpp",
    "run_checked",
]

# --------------------------------------------------------------------------- the C++ / CUDA op

_LOCK = threading.Lock()
_BUILD: dict = {"tried": False, "ok": False, "cuda": False, "reason": None}


def _cache_dir() -> Path:
    root = os.environ.get("SALF_CACHE_DIR") or str(Path.home() / ".cache" / "salf-engine")
    return Path(root).expanduser() / "torch_ext"


def _csrc_dir() -> Path:
    for entry in csrc.__path__:
        path = Path(entry)
        if (path / "deviation.cpp").is_file():
            return path
    raise FileNotFoundError("salf_engine.csrc holds no deviation.cpp (broken installation?)")


def _cpu_signature() -> str:
    """What -march=native depends on, so a shared cache never serves a binary built for another CPU."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features", "CPU part")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


def _nvcc_path() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def build_flags(native: bool) -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags) the op is built with, on top of ``torch.utils.cpp_extension``'s own;
    ``native``: ``-march=native`` (``SALF_CPP_NATIVE``, default on). Without it GCC notes that the
    8-float vectors of the CPU kernel change the ABI without AVX (-Wpsabi); they never cross a
    translation unit (anonymous namespace), so that note is off."""
    cflags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    return cflags + (["-march=native"] if native else ["-Wno-psabi"]), ["-O3", "-lineinfo"]


def _build() -> tuple[bool, bool, str | None]:
    """Compile and load the extension; (ok, with_cuda, reason when not ok)."""
    if hasattr(torch.ops, "salf") and hasattr(torch.ops.salf, "deviations"):
        return True, _has_cuda_kernel(), None
    try:
        from torch.utils import cpp_extension
    except Exception as exc:  # pragma: no cover - torch always ships it
        return False, False, f"torch.utils.cpp_extension is unavailable ({exc})"
    if not cpp_extension.is_ninja_available():
        return False, False, "ninja is not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False, False, f"no C++ compiler ({cxx!r} is not on PATH)"
    try:
        src = _csrc_dir()
    except FileNotFoundError as exc:
        return False, False, str(exc)
    with_cuda = bool(torch.cuda.is_available() and torch.version.cuda and _nvcc_path())
    sources = [src / "deviation.cpp"] + ([src / "deviation_cuda.cu"] if with_cuda else [])
    native = os.environ.get("SALF_CPP_NATIVE", "1") != "0"
    digest = hashlib.sha256()
    for path in [*sources, src / "deviation.h"]:
        digest.update(path.read_bytes())
    digest.update(
        f"{torch.__version__}|{torch.version.cuda}|{with_cuda}|{native}|{platform.python_version()}".encode()
    )
    if native:
        digest.update(_cpu_signature().encode())
    name = f"salf_ops_{digest.hexdigest()[:16]}"
    build_dir = _cache_dir() / name
    cflags, cuda_cflags = build_flags(native)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpp_extension.load(
                name=name,
                sources=[str(p) for p in sources],
                extra_include_paths=[str(src)],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                extra_cuda_cflags=cuda_cflags,
                build_directory=str(build_dir),
                with_cuda=with_cuda,
                is_python_module=False,
                verbose=os.environ.get("SALF_CPP_VERBOSE") == "1",
            )
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        detail = msg[-1] if msg else type(exc).__name__
        return False, False, f"building {name} in {build_dir} failed: {detail}"
    _register_fake()
    return True, with_cuda, None


def _has_cuda_kernel() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("salf::deviations", "CUDA")
    except Exception:  # pragma: no cover - private API moved
        return False


def _register_fake() -> None:
    """A shape-only implementation so torch.compile / FakeTensor can trace through the op."""
    try:

        @torch.library.register_fake("salf::deviations")
        def _(states, last_index, labels, bases, lens_weight, lens_bias, lens_kind, eps, metric):
            return states[0].new_empty((states[0].shape[0], len(states)), dtype=torch.float32)
    except Exception:  # already registered (a second load) or an older torch
        pass


def cpp_available() -> bool:
    """Whether ``torch.ops.salf`` is usable; builds it on the first call (about a minute), then cached.

    When the build is impossible (no compiler, no ninja, a compile error) this warns once with the
    reason (see ``cpp_unavailable_reason``) and returns False.
    """
    with _LOCK:
        if not _BUILD["tried"]:
            ok, cuda, reason = _build()
            _BUILD.update(tried=True, ok=ok, cuda=cuda, reason=reason)
            if not ok:
                warnings.warn(
                    f"salf-engine: the C++ deviation op is unavailable: {reason}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return bool(_BUILD["ok"])


def cpp_unavailable_reason() -> str | None:
    """Why ``cpp_available()`` returned False (None when it is available or was not tried yet)."""
    return _BUILD["reason"]


def cuda_op_available() -> bool:
    """Whether the CUDA C++ kernel was built into ``torch.ops.salf`` (needs a GPU and nvcc at build time)."""
    return cpp_available() and bool(_BUILD["cuda"])


def deviations_cpp(
    states: Sequence[torch.Tensor],
    last_index: torch.Tensor,
    labels: torch.Tensor,
    bases: torch.Tensor,
    lens=None,
    metric: str = "cosine",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Deviations of all ``m+1`` spaces by the C++ op (CPU tensors) or the CUDA C++ op (CUDA tensors).

    Same arguments and results as ``salf_engine.kernels.deviation.deviations_triton``: float32
    ``[B, m+1]``.

    Raises:
        KernelInputError: inputs that do not fit together, or no op for the inputs' device.
    """
    if not cpp_available():
        raise KernelInputError(f"the C++ deviation op is unavailable: {cpp_unavailable_reason()}")
    op = torch.ops.salf.deviations
    first = states[0] if isinstance(states, (list, tuple)) and len(states) > 0 else None
    fast = (
        isinstance(first, torch.Tensor)
        and first.dim() == 3
        and first.device.type == "cpu"
        and metric in METRIC_CODES
        and all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in (last_index, labels, bases))
        and all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in states)
    )
    if fast:
        # CPU: the op checks shapes, dtypes, devices and ranges itself (TORCH_CHECK); only the lens and
        # the metric name are translated here, which keeps the Python overhead at a few microseconds.
        lens_kind, weight, bias, eps = lens_parts(lens, first.shape[2], first.device)
        args = (list(states), last_index, labels, bases, weight, bias, lens_kind, eps, METRIC_CODES[metric])
        return _call(op, args)
    inp = check_deviation_inputs(states, last_index, labels, bases, lens, metric, validate=validate,
                                 gather=False)
    return run_checked(inp)


def run_checked(inp: DeviationInputs) -> torch.Tensor:
    """The op over inputs already checked (``check_deviation_inputs(..., gather=False)``, the lens as
    parts): what ``deviations_cpp`` runs after its check, and what the dispatcher calls, so inputs are
    checked once per call."""
    if not cpp_available():
        raise KernelInputError(f"the C++ deviation op is unavailable: {cpp_unavailable_reason()}")
    if inp.device.type == "cuda" and not _BUILD["cuda"]:
        raise KernelInputError("the CUDA C++ deviation op was not built (no CUDA device or nvcc at build "
                               "time)")
    if inp.device.type not in ("cpu", "cuda"):
        raise KernelInputError(f"the C++ deviation op runs on CPU or CUDA tensors, not {inp.device.type}")
    return _call(torch.ops.salf.deviations, (inp.views, inp.last_index, inp.labels, inp.bases, inp.weight,
                                             inp.bias, inp.lens_kind, inp.eps, inp.metric))


def built_for(device: torch.device) -> bool:
    """Whether ``torch.ops.salf`` is already built for tensors on ``device``; never builds it (safe while
    torch.compile traces)."""
    return bool(_BUILD["ok"]) and (device.type == "cpu" or bool(_BUILD["cuda"]))


def _call(op, args) -> torch.Tensor:
    """``op(*args)`` without autograd; the op's own input errors as KernelInputError."""
    try:
        with torch.no_grad():
            return op(*args)
    except RuntimeError as exc:
        message = str(exc)
        marker = "salf::deviations: "
        if marker in message:
            raise KernelInputError(message.split(marker, 1)[1].splitlines()[0]) from None
        raise
