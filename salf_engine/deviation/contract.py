"""The contract every deviation kernel shares: metric / lens names and codes, and the one input check.

The Triton kernels (``salf_engine.kernels.deviation``), the C++ / CUDA op loader
(``salf_engine.deviation.cpp_op``)
and the dispatcher (``salf_engine.deviation.compute``) import these from here, so no backend depends on a
sibling backend. Importing this module needs neither torch (imported when a check runs), nor triton,
nor a compiler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

from salf_engine.errors import SalfError

if TYPE_CHECKING:  # torch is imported where a check runs, so `TrainConfig` can read the names cheaply
    import torch

__all__ = [
    "Metric",
    "LensName",
    "Boundary",
    "DeviationImpl",
    "METRICS",
    "LENSES",
    "LENS_ALIASES",
    "BOUNDARIES",
    "IMPLS",
    "METRIC_CODES",
    "LENS_CODES",
    "MAX_LABELS",
    "KernelInputError",
    "DeviationInputs",
    "check_deviation_inputs",
    "for_kernel",
    "kernel_limits",
    "lens_parts",
]

#: Names of the deviation metrics, lenses, eof boundaries and implementations (the one definition;
#: `TrainConfig`, the dispatcher and the kernels all read them from here).
Metric = Literal["cosine", "ce", "rank"]
LensName = Literal["final_norm", "none"]
Boundary = Literal["trainable", "frozen"]
DeviationImpl = Literal["auto", "torch", "triton", "cpp", "cuda"]
METRICS: tuple[str, ...] = get_args(Metric)
LENSES: tuple[str, ...] = get_args(LensName)
BOUNDARIES: tuple[str, ...] = get_args(Boundary)
IMPLS: tuple[str, ...] = get_args(DeviationImpl)
#: Integer codes the kernels take for a metric (``METRIC`` in Triton, ``metric`` in the C++ op).
METRIC_CODES = {name: code for code, name in enumerate(METRICS)}
#: Integer codes of the lens kinds of a `LensSpec` (``lens_kind`` in the C++ op).
LENS_CODES = {"none": 0, "rms": 1, "layernorm": 2}
#: The 0.1 spelling of the identity lens, accepted for one release.
LENS_ALIASES = {"raw": "none"}
MAX_LABELS = 1024


class KernelInputError(SalfError, ValueError):
    """Inputs of a deviation kernel that do not fit together (shape, dtype, device, range, name)."""


@dataclass
class DeviationInputs:
    """Checked, normalized inputs of a deviation kernel."""

    views: list[torch.Tensor]  # per space: the tensor to read (feature stride 1)
    batch_strides: list[int]  # per space, in elements
    time_strides: list[int]  # per space, in elements (0 for a gathered fallback)
    time_lengths: list[int]  # per space: T (bound of last_index)
    last_index: torch.Tensor  # int64 [B], contiguous, on device
    labels: torch.Tensor  # int64 [B], contiguous, on device
    bases: torch.Tensor  # float32 [K, D], contiguous, on device
    weight: torch.Tensor | None  # float32 [D] or None
    bias: torch.Tensor | None  # float32 [D] or None (layernorm only)
    lens_kind: int
    eps: float
    metric: int
    device: torch.device
    dtype: torch.dtype
    batch: int
    n_spaces: int
    hidden: int
    n_labels: int
    states: list[torch.Tensor]  # per space: the state as given (detached), for the torch reference


def lens_parts(lens, hidden: int, device: torch.device):
    import torch

    if lens is None:
        return 0, None, None, 0.0
    kind = getattr(lens, "kind", None)
    if kind not in LENS_CODES:
        raise KernelInputError(
            f"lens must be a LensSpec with kind 'none', 'rms' or 'layernorm', got {lens!r}"
        )
    code = LENS_CODES[kind]
    eps = float(getattr(lens, "eps", 0.0) or 0.0)
    if code == 0:
        return 0, None, None, eps
    parts = []
    for name in ("weight", "bias"):
        t = getattr(lens, name, None)
        if t is None or (name == "bias" and code != 2):
            parts.append(None)
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != hidden:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise KernelInputError(f"lens {name} must be a [D] = [{hidden}] tensor, got {shape}")
        if t.device != device:
            raise KernelInputError(f"lens {name} is on {t.device} but the states are on {device}")
        parts.append(t.detach().to(torch.float32).contiguous())
    weight, bias = parts
    if weight is None:
        weight = torch.ones(hidden, dtype=torch.float32, device=device)
    return code, weight, bias, eps


def _index_tensor(t, name: str, batch: int, device: torch.device) -> torch.Tensor:
    import torch

    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t, device=device)
        except (TypeError, ValueError, RuntimeError):
            raise KernelInputError(
                f"{name} must be a tensor or a sequence of ints, got {type(t).__name__}") from None
    if t.dim() != 1 or t.shape[0] != batch:
        raise KernelInputError(f"{name} must have shape [B] = [{batch}], got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise KernelInputError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.device != device:
        raise KernelInputError(f"{name} is on {t.device} but the states are on {device}")
    return t.to(torch.int64).contiguous()


def check_deviation_inputs(
    states: Sequence[torch.Tensor],
    last_index: torch.Tensor,
    labels: torch.Tensor,
    bases: torch.Tensor,
    lens=None,
    metric: str = "cosine",
    *,
    validate: bool = True,
    gather: bool = True,
    kernel: bool = True,
) -> DeviationInputs:
    """Check the inputs of a deviation computation; raise ``KernelInputError`` naming the problem.

    The one input check of every path: the dispatcher (`salf_engine.deviation.compute.deviations`, which
    hands the checked inputs to a kernel through :func:`for_kernel`), the torch reference, and the Triton
    kernels' and the C++ op's own Python entries when called directly. (The C++ op's ``prepare`` keeps
    its own ``TORCH_CHECK``s, the guard of a raw ``torch.ops.salf`` call; the CPU fast path relies on them.)

    ``last_index`` and ``labels``: [B] integer tensors or sequences of ints. A space whose feature stride is
    not 1 is gathered to contiguous ``[B, D]`` rows (the only copy); every other space is read in place.
    With ``validate`` the label and position ranges are checked on the host (one device sync).
    ``gather=False`` keeps such spaces as they are (for the C++ op, which gathers them itself).
    ``kernel=False`` accepts what only the torch reference computes: any floating dtype per space (mixed
    too) and more than :data:`MAX_LABELS` labels; :func:`kernel_limits` says whether kernels can run it.
    """
    import torch

    if metric not in METRIC_CODES:
        raise KernelInputError(f"unknown deviation metric {metric!r}: expected one of {', '.join(METRICS)}")
    batch, hidden, device, dtype = _check_states(states, kernel)
    li = _index_tensor(last_index, "last_index", batch, device)
    lab = _index_tensor(labels, "labels", batch, device)
    n_labels = _check_bases(bases, hidden, device, kernel)
    lens_kind, weight, bias, eps = lens_parts(lens, hidden, device)
    detached = [s.detach() for s in states]
    if validate and batch > 0:
        _check_ranges(lab, li, n_labels, min(s.shape[1] for s in detached))
    inputs = DeviationInputs(
        views=detached, batch_strides=[s.stride(0) for s in detached],
        time_strides=[s.stride(1) for s in detached], time_lengths=[s.shape[1] for s in detached],
        last_index=li, labels=lab, bases=bases.detach().to(torch.float32).contiguous(), weight=weight,
        bias=bias, lens_kind=lens_kind, eps=eps, metric=METRIC_CODES[metric], device=device, dtype=dtype,
        batch=batch, n_spaces=len(states), hidden=hidden, n_labels=n_labels, states=detached,
    )
    return _gathered(inputs) if gather else inputs


def for_kernel(inputs: DeviationInputs, lens, *, gather: bool) -> DeviationInputs:
    """Inputs the dispatcher checked (``check_deviation_inputs(..., gather=False)``) made ready for a kernel:
    the lens as its parts and, with ``gather``, the medium-token rows of spaces whose feature stride is
    not 1; nothing is checked again but the lens's own shape."""
    kind, weight, bias, eps = lens_parts(lens, inputs.hidden, inputs.device)
    ready = dataclasses.replace(inputs, lens_kind=kind, weight=weight, bias=bias, eps=eps)
    return _gathered(ready) if gather else ready


def _check_states(states, kernel: bool):
    """(B, D, device, dtype) of m+1 [B, T, D] states that fit together."""
    import torch

    if isinstance(states, torch.Tensor) or not isinstance(states, Sequence):
        raise KernelInputError("states must be a list of m+1 tensors [B, T, D]")
    if len(states) < 2:
        raise KernelInputError(f"states must hold m+1 >= 2 spaces, got {len(states)}")
    first = states[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 3:
        raise KernelInputError("every state must be a [B, T, D] tensor")
    batch, _, hidden = first.shape
    device, dtype = first.device, first.dtype
    if kernel and dtype not in _kernel_dtypes():
        raise KernelInputError(f"states must be float32, bfloat16 or float16, got {dtype}")
    for k, s in enumerate(states):
        if not isinstance(s, torch.Tensor) or s.dim() != 3:
            raise KernelInputError(f"state {k} must be a [B, T, D] tensor")
        if s.shape[0] != batch or s.shape[2] != hidden:
            raise KernelInputError(
                f"state {k} has shape {tuple(s.shape)}, expected [B={batch}, T, D={hidden}] like state 0"
            )
        if not s.is_floating_point():
            raise KernelInputError(f"state {k} must be floating point, got dtype {s.dtype}")
        if kernel and s.dtype != dtype:
            raise KernelInputError(
                f"state {k} is {s.dtype} but state 0 is {dtype}; all spaces must share a dtype"
            )
        if s.device != device:
            raise KernelInputError(f"state {k} is on {s.device} but state 0 is on {device}")
        if s.shape[1] == 0:
            raise KernelInputError(f"state {k} has no time steps")
    return batch, hidden, device, dtype


def _check_bases(bases, hidden: int, device, kernel: bool) -> int:
    """K, the number of label bases of a [K, D] tensor that fits the states."""
    import torch

    if not isinstance(bases, torch.Tensor) or bases.dim() != 2:
        raise KernelInputError("bases must be a [K, D] tensor")
    if bases.shape[1] != hidden:
        raise KernelInputError(f"bases have D = {bases.shape[1]} but the states have D = {hidden}")
    if not bases.dtype.is_floating_point:
        raise KernelInputError(f"bases must be a floating tensor, got {bases.dtype}")
    if bases.device != device:
        raise KernelInputError(f"bases are on {bases.device} but the states are on {device}")
    n_labels = bases.shape[0]
    if n_labels < 1 or (kernel and n_labels > MAX_LABELS):
        raise KernelInputError(f"bases must hold 1..{MAX_LABELS} labels, got K = {n_labels}")
    return n_labels


def _check_ranges(labels, last_index, n_labels: int, time_steps: int) -> None:
    """Label and position ranges, read on the host (one device sync)."""
    import torch

    lo_y, hi_y, lo_t, hi_t = torch.stack([labels.min(), labels.max(), last_index.min(),
                                          last_index.max()]).tolist()
    if lo_y < 0 or hi_y >= n_labels:
        bad = lo_y if lo_y < 0 else hi_y
        raise KernelInputError(f"label index {bad} is outside 0..K-1 = 0..{n_labels - 1}")
    if lo_t < 0 or hi_t >= time_steps:
        bad = lo_t if lo_t < 0 else hi_t
        raise KernelInputError(f"last_index {bad} is outside 0..T-1 = 0..{time_steps - 1}")


def _gathered(inputs: DeviationInputs) -> DeviationInputs:
    """Spaces whose feature stride is not 1 replaced by their contiguous medium-token rows ([B, D], time
    stride 0): only those rows are copied, never a whole tensor."""
    import torch

    if inputs.hidden <= 1 or all(v.stride(2) == 1 for v in inputs.views):
        return inputs
    views, sb, st = list(inputs.views), list(inputs.batch_strides), list(inputs.time_strides)
    rows = torch.arange(inputs.batch, device=inputs.device)
    for k, v in enumerate(views):
        if v.stride(2) != 1:
            views[k] = v[rows, inputs.last_index.clamp(0, v.shape[1] - 1)].contiguous()
            sb[k], st[k] = inputs.hidden, 0
    return dataclasses.replace(inputs, views=views, batch_strides=sb, time_strides=st)


def _kernel_dtypes():
    import torch

    return (torch.float32, torch.bfloat16, torch.float16)


def kernel_limits(inp: DeviationInputs) -> str | None:
    """Why the kernels cannot take checked inputs (None when they can): dtypes or too many labels."""
    dtypes = {s.dtype for s in inp.states}
    if len(dtypes) > 1 or inp.dtype not in _kernel_dtypes():
        got = ", ".join(sorted(map(str, dtypes)))
        return f"the kernels take float32, bfloat16 or float16 states of one dtype, got {got}"
    if inp.n_labels > MAX_LABELS:
        return f"the kernels take at most {MAX_LABELS} labels, got K = {inp.n_labels}"
    return None
