"""Per-sample deviations of every latent space, gains, and eof-layers (Algorithms 1-3).

For a sample with medium-token states ``h_0..h_m`` (space 0 = embedding output,
space k = output of ``layers[k-1]``, space m = after the final norm) and label
index ``y`` into the K bases ``b_1..b_K``, with ``c_k(j) = cos(lens(h_k), b_j)``
(``lens`` applied to spaces 0..m-1 only; space m is already normed):

    cosine:  d_k = 1 - c_k(y)                                   in [0, 2]
    ce:      d_k = -log softmax_j(c_k(j))[y]
    rank:    d_k = 1 + #{j : c_k(j) > c_k(y)}                  (1-based rank)

    gain[k] = d_k - d_{k+1}            (gain of layers[k], k = 0..m-1)
    eof     = argmax_k gain[k]          (first index on ties)

`eof_layers` returns the freeze depth: ``eof`` (boundary="trainable", the
paper's Algorithm 3: layers[0..eof-1] frozen) or ``eof + 1`` (boundary="frozen",
the figure-2 reading where the eof-layer itself is frozen).
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import ops as _ops
from .deviation_contract import BOUNDARIES, IMPLS, LENS_CODES, METRIC_CODES, METRICS
from .errors import SalfError
from .semantics import LensSpec, lens_spec

__all__ = [
    "METRICS",
    "IMPLS",
    "BOUNDARIES",
    "deviations",
    "deviations_reference",
    "validate_deviation_inputs",
    "gains",
    "eof_layers",
]

_COS_EPS = 1e-8  # same clamp as torch.nn.functional.cosine_similarity

Lens = nn.Module | LensSpec | str | None


@dataclass(frozen=True)
class _Inputs:
    """Validated inputs: states as given, indices as int64 on the states' device, float32 bases."""

    states: list[Tensor]
    last_index: Tensor
    labels: Tensor
    bases: Tensor


def _index_tensor(value: Tensor | Sequence[int], name: str, batch: int, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.device != device:
            raise SalfError(f"{name} is on {value.device} but the hidden states are on {device}")
        t = value
    else:
        t = torch.as_tensor(value, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise SalfError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise SalfError(f"{name} must have shape [B] = [{batch}], got {tuple(t.shape)}")
    return t.to(torch.long)


def validate_deviation_inputs(
    hidden_states: Sequence[Tensor],
    last_index: Tensor | Sequence[int],
    labels: Tensor | Sequence[int],
    bases: Tensor,
    metric: str = "cosine",
    *,
    check_ranges: bool = True,
) -> _Inputs:
    """Check shapes, dtypes, devices and index ranges; raise a `SalfError` naming the problem.

    ``check_ranges=False`` skips the index-range checks (they read the indices back to the host).
    """
    if metric not in METRICS:
        raise SalfError(f"unknown deviation metric {metric!r}: expected one of {', '.join(METRICS)}")
    if isinstance(hidden_states, Tensor):
        raise SalfError("hidden_states must be a sequence of m+1 tensors [B, T, D], not a single tensor")
    states = list(hidden_states)
    if len(states) < 2:
        raise SalfError(f"need at least 2 latent spaces (m >= 1 layers), got {len(states)}")
    first = states[0]
    if not isinstance(first, Tensor) or first.dim() != 3:
        raise SalfError("hidden_states[0] must be a tensor [B, T, D]")
    batch, dim, device = first.shape[0], first.shape[2], first.device
    min_t = first.shape[1]
    for k, h in enumerate(states):
        if not isinstance(h, Tensor) or h.dim() != 3:
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise SalfError(f"hidden_states[{k}] must be a tensor [B, T, D], got {got}")
        if not h.is_floating_point():
            raise SalfError(f"hidden_states[{k}] must be floating point, got dtype {h.dtype}")
        if h.device != device:
            raise SalfError(f"hidden_states[{k}] is on {h.device} but hidden_states[0] is on {device}")
        if h.shape[0] != batch:
            raise SalfError(f"hidden_states[{k}] has batch size {h.shape[0]}, hidden_states[0] has {batch}")
        if h.shape[2] != dim:
            raise SalfError(f"hidden_states[{k}] has hidden size {h.shape[2]}, hidden_states[0] has {dim}")
        min_t = min(min_t, h.shape[1])
    if batch == 0:
        raise SalfError("hidden_states have an empty batch (B = 0)")
    if not isinstance(bases, Tensor) or bases.dim() != 2:
        raise SalfError("bases must be a tensor [K, D]")
    if not bases.is_floating_point():
        raise SalfError(f"bases must be floating point, got dtype {bases.dtype}")
    if bases.device != device:
        raise SalfError(f"bases are on {bases.device} but the hidden states are on {device}")
    if bases.shape[1] != dim:
        raise SalfError(f"bases have dimension {bases.shape[1]} but the hidden states have D = {dim}")
    num_labels = bases.shape[0]
    if num_labels == 0:
        raise SalfError("bases are empty (K = 0)")
    last = _index_tensor(last_index, "last_index", batch, device)
    lab = _index_tensor(labels, "labels", batch, device)
    if not check_ranges:
        return _Inputs(states, last, lab, bases.detach().to(torch.float32))
    if bool((last < 0).any()) or bool((last >= min_t).any()):
        bad = int(last[(last < 0) | (last >= min_t)][0])
        raise SalfError(f"last_index {bad} is out of range for sequence length {min_t}")
    if bool((lab < 0).any()) or bool((lab >= num_labels).any()):
        bad = int(lab[(lab < 0) | (lab >= num_labels)][0])
        raise SalfError(f"label index {bad} is out of range for K = {num_labels} bases")
    return _Inputs(states, last, lab, bases.detach().to(torch.float32))


def _check_lens(lens: Lens, dim: int) -> None:
    if isinstance(lens, LensSpec):
        if lens.dim is not None and lens.dim != dim:
            raise SalfError(f"the lens has dimension {lens.dim} but the hidden states have D = {dim}")
    elif isinstance(lens, str):
        lens_spec(lens)  # raises for unknown names
    elif lens is not None and not isinstance(lens, nn.Module):
        raise SalfError(
            f"cannot use a {type(lens).__name__} as a lens: pass a norm module, a LensSpec or None"
        )


def _lens_fn(lens: Lens, device: torch.device) -> Callable[[Tensor], Tensor]:
    """lens as a float32 -> float32 function: the module itself (float32 params) or the LensSpec math."""
    if lens is None or isinstance(lens, str):
        spec = lens_spec(lens)
        return spec.apply
    if isinstance(lens, LensSpec):
        return lens.to(device).apply
    params = {name: p.detach().to(device=device, dtype=torch.float32) for name, p in lens.named_parameters()}
    buffers = {
        name: (b.to(device=device, dtype=torch.float32) if b.is_floating_point() else b.to(device))
        for name, b in lens.named_buffers()
    }

    def apply(x: Tensor) -> Tensor:
        out = torch.func.functional_call(lens, {**params, **buffers}, (x,))
        return out.to(torch.float32)

    return apply


def _gather_last(states: list[Tensor], last_index: Tensor) -> Tensor:
    """[B, m+1, D] float32: each sample's state at last_index in every space."""
    rows = torch.arange(last_index.shape[0], device=last_index.device)
    return torch.stack([h[rows, last_index].detach().to(torch.float32) for h in states], dim=1)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_COS_EPS)


def _reference(inputs: _Inputs, lens: Lens, metric: str) -> Tensor:
    gathered = _gather_last(inputs.states, inputs.last_index)  # [B, S, D]
    num_spaces = gathered.shape[1]
    lensed = _lens_fn(lens, gathered.device)(gathered[:, : num_spaces - 1])
    spaces = torch.cat([lensed, gathered[:, num_spaces - 1 :]], dim=1)
    units = _unit(spaces)
    base_units = _unit(inputs.bases)
    if metric == "cosine":
        own = base_units[inputs.labels]  # [B, D]
        cos = torch.einsum("bsd,bd->bs", units, own)
        return (1.0 - cos).to(torch.float32)
    cos_all = torch.einsum("bsd,kd->bsk", units, base_units)  # [B, S, K]
    index = inputs.labels.view(-1, 1, 1).expand(-1, num_spaces, 1)
    if metric == "ce":
        return -torch.log_softmax(cos_all, dim=-1).gather(-1, index).squeeze(-1)
    own_cos = cos_all.gather(-1, index)
    return 1.0 + (cos_all > own_cos).sum(dim=-1).to(torch.float32)


def deviations_reference(
    hidden_states: Sequence[Tensor],
    last_index: Tensor | Sequence[int],
    labels: Tensor | Sequence[int],
    bases: Tensor,
    *,
    lens: Lens = None,
    metric: str = "cosine",
) -> Tensor:
    """Plain-torch deviations, float32 [B, m+1] (detached; see the module docstring for the math).

    hidden_states: m+1 tensors [B, T, D] (any strides/dtypes; the last one already normed);
    last_index: [B] medium-token positions; labels: [B] indices into bases [K, D];
    lens: the final norm module (applied as is, in float32), a LensSpec, or None/"raw" (no lens).
    """
    inputs = validate_deviation_inputs(hidden_states, last_index, labels, bases, metric)
    _check_lens(lens, inputs.bases.shape[1])
    with torch.no_grad():
        return _reference(inputs, lens, metric)


# --------------------------------------------------------------------------- dispatcher

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_kernel(impl: str) -> Callable[..., Tensor]:
    """The kernel entry point for `impl`; ImportError (with the reason) if it is not available."""
    if impl == "triton":
        module_name, attr = "salf_engine.kernels.deviation", "deviations_triton"
    else:
        module_name, attr = "salf_engine.ops", "deviations_cpp"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"{module_name} cannot be imported ({exc})") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ImportError(f"{module_name} has no {attr}")
    if impl != "triton":
        available = getattr(module, "cpp_available", None)
        if available is None or not available():
            raise ImportError("the C++ deviation op is not built (salf_engine.ops.cpp_available() is False)")
    return fn


def _triton_allowed(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _auto_candidates(device: torch.device) -> list[str]:
    candidates = []
    if _triton_allowed(device):
        candidates.append("triton")
    candidates.append("cpp")
    return candidates


def deviations(
    hidden_states: Sequence[Tensor],
    last_index: Tensor | Sequence[int],
    labels: Tensor | Sequence[int],
    bases: Tensor,
    *,
    lens: Lens = None,
    metric: str = "cosine",
    impl: str = "auto",
    check_ranges: bool = True,
) -> Tensor:
    """Deviations of all m+1 spaces, float32 [B, m+1], by the chosen implementation.

    ``check_ranges=False`` skips the index-range checks of ``last_index`` and ``labels`` (they read the
    indices back to the host: a device sync); for callers that built the indices themselves.

    impl: "torch" (reference), "triton" (`salf_engine.kernels.deviation`), "cpp"/"cuda"
    (`salf_engine.ops`), or "auto": Triton on CUDA inputs or with TRITON_INTERPRET=1, else the C++ op
    if built, else torch (a missing kernel falls back with a one-time warning). Explicitly requested
    kernels that are unavailable raise a `SalfError`. Under ``torch.compile`` the call traces without a
    graph break and without the host-side index-range check (see `_deviations_compiling`).
    """
    if impl not in IMPLS:
        raise SalfError(f"unknown deviation impl {impl!r}: expected one of {', '.join(IMPLS)}")
    if torch.compiler.is_compiling():
        return _deviations_compiling(hidden_states, last_index, labels, bases, lens, metric, impl)
    inputs = validate_deviation_inputs(hidden_states, last_index, labels, bases, metric,
                                       check_ranges=check_ranges)
    dim = inputs.bases.shape[1]
    _check_lens(lens, dim)
    device = inputs.bases.device
    if impl == "torch":
        with torch.no_grad():
            return _reference(inputs, lens, metric)

    if impl == "auto":
        for candidate in _auto_candidates(device):
            try:
                fn = _load_kernel(candidate)
            except ImportError as exc:
                if candidate == "triton" or "cpp_available" not in str(exc):
                    _warn_once(candidate, f"deviations: the {candidate} kernel is unavailable ({exc})")
                continue
            try:
                spec = lens_spec(lens)
            except SalfError as exc:
                _warn_once(f"lens:{type(lens).__name__}", f"deviations: using torch because {exc}")
                break
            return _run_kernel(fn, inputs, spec, metric, dim)
        with torch.no_grad():
            return _reference(inputs, lens, metric)

    kernel = "triton" if impl == "triton" else "cpp"
    if impl == "triton" and not _triton_allowed(device):
        raise SalfError("impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 set before triton is used")
    if impl == "cuda" and device.type != "cuda":
        raise SalfError(f"impl='cuda' needs CUDA tensors, but the inputs are on {device}")
    try:
        fn = _load_kernel(kernel)
    except ImportError as exc:
        raise SalfError(f"impl={impl!r} was requested but {exc}") from exc
    spec = lens_spec(lens)
    return _run_kernel(fn, inputs, spec, metric, dim)


def _deviations_compiling(
    hidden_states: Sequence[Tensor],
    last_index: Tensor | Sequence[int],
    labels: Tensor | Sequence[int],
    bases: Tensor,
    lens: Lens,
    metric: str,
    impl: str,
) -> Tensor:
    """`deviations` while torch.compile traces: only ops the tracer sees through, no host sync.

    CUDA + "auto"/"triton": the medium-token rows are gathered into one [S, B, D] tensor and handed to
    the registered Triton op (``torch.ops.salf_triton.deviations``, a ``triton_op``). "cpp"/"cuda"
    (and "auto" on CPU when the op is already built) call ``torch.ops.salf`` (it has a fake kernel).
    Everything else, and a lens no kernel folds, is the torch math, which Inductor fuses. Index
    ranges are not checked here (that needs a device sync); an out-of-range entry yields NaN from the
    kernels or an indexing error from torch.
    """
    inputs = validate_deviation_inputs(hidden_states, last_index, labels, bases, metric, check_ranges=False)
    dim = inputs.bases.shape[1]
    _check_lens(lens, dim)
    device = inputs.bases.device
    if impl == "triton" and device.type != "cuda":
        raise SalfError("impl='triton' under torch.compile needs CUDA tensors (the interpreter cannot trace)")
    if impl == "cuda" and device.type != "cuda":
        raise SalfError(f"impl='cuda' needs CUDA tensors, but the inputs are on {device}")
    try:
        spec = None if impl == "torch" else lens_spec(lens)
    except SalfError:
        if impl != "auto":
            raise
        spec = None
    if spec is not None and spec.dim is not None and spec.dim != dim:
        raise SalfError(f"the lens has dimension {spec.dim} but the hidden states have D = {dim}")
    with torch.no_grad():
        if spec is not None and impl in ("auto", "triton") and device.type == "cuda":
            from salf_engine.kernels.deviation import deviations_triton_stacked

            rows = torch.arange(inputs.last_index.shape[0], device=device)
            stacked = torch.stack([h.detach()[rows, inputs.last_index] for h in inputs.states])  # [S, B, D]
            return deviations_triton_stacked(
                stacked, None, inputs.labels, inputs.bases, spec.to(device), metric, validate=False
            )
        if spec is not None and impl in ("auto", "cpp", "cuda") and _cpp_built(device):
            spec = spec.to(device)
            return torch.ops.salf.deviations(
                [h.detach() for h in inputs.states],
                inputs.last_index,
                inputs.labels,
                inputs.bases,
                spec.weight,
                spec.bias,
                LENS_CODES[spec.kind],
                float(spec.eps),
                METRIC_CODES[metric],
            )
        if impl in ("cpp", "cuda"):
            raise SalfError(f"impl={impl!r} under torch.compile needs the C++ op built before tracing")
        return _reference(inputs, lens, metric)


def _cpp_built(device: torch.device) -> bool:
    """Whether torch.ops.salf was already built (for `device`); never builds it (not while tracing)."""
    state = _ops._BUILD
    return bool(state["ok"]) and (device.type == "cpu" or bool(state["cuda"]))


def _run_kernel(fn: Callable[..., Tensor], inputs: _Inputs, spec: LensSpec, metric: str, dim: int) -> Tensor:
    if spec.dim is not None and spec.dim != dim:
        raise SalfError(f"the lens has dimension {spec.dim} but the hidden states have D = {dim}")
    states = [h.detach() for h in inputs.states]
    bases = inputs.bases.contiguous()
    extra = {"validate": False} if _accepts_validate(fn) else {}  # validated once, above
    return fn(states, inputs.last_index, inputs.labels, bases, spec.to(bases.device), metric, **extra)


def _accepts_validate(fn: Callable[..., Tensor]) -> bool:
    try:
        return "validate" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- gains / eof


def _check_dev(dev: Tensor) -> Tensor:
    if not isinstance(dev, Tensor) or dev.dim() != 2:
        got = tuple(dev.shape) if isinstance(dev, Tensor) else type(dev).__name__
        raise SalfError(f"deviations must be a tensor [B, m+1], got {got}")
    if dev.shape[1] < 2:
        raise SalfError(f"deviations need at least 2 spaces (m >= 1), got {dev.shape[1]}")
    if not dev.is_floating_point():
        dev = dev.to(torch.float32)
    return dev


def gains(dev: Tensor) -> Tensor:
    """Per-layer gains [B, m]: ``gain[:, k] = dev[:, k] - dev[:, k+1]`` (the gain of layers[k])."""
    dev = _check_dev(dev)
    return dev[:, :-1] - dev[:, 1:]


def eof_layers(dev: Tensor, *, boundary: str = "trainable") -> Tensor:
    """Freeze depth per sample, int64 [B], from deviations [B, m+1].

    eof = argmax_k gain[k], the FIRST maximal index on ties. boundary="trainable" (Algorithm 3): depth =
    eof, the eof-layer is trained. boundary="frozen" (figure 2): depth = eof + 1 (at most m).
    """
    if boundary not in BOUNDARIES:
        raise SalfError(f"unknown eof boundary {boundary!r}: expected one of {', '.join(BOUNDARIES)}")
    g = gains(dev)
    if bool(torch.isnan(g).any()):
        raise SalfError("deviations contain NaN; the eof-layer is undefined")
    num_layers = g.shape[1]
    best = g.max(dim=1, keepdim=True).values
    positions = torch.arange(num_layers, device=g.device).expand_as(g)
    sentinel = torch.full_like(positions, num_layers)
    eof = torch.where(g == best, positions, sentinel).min(dim=1).values
    if boundary == "frozen":
        eof = (eof + 1).clamp(max=num_layers)
    return eof.to(torch.int64)
