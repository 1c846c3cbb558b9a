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
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from salf_engine.deviation import cpp_op
from salf_engine.deviation.contract import (
    BOUNDARIES,
    IMPLS,
    METRICS,
    DeviationInputs,
    check_deviation_inputs,
    for_kernel,
    kernel_limits,
)
from salf_engine.deviation.semantics import LensSpec, lens_spec
from salf_engine.errors import SalfError

__all__ = [
    "METRICS",
    "IMPLS",
    "BOUNDARIES",
    "deviations",
    "deviations_reference",
    "BACKENDS",
    "Backend",
    "gains",
    "eof_layers",
]

_COS_EPS = 1e-8  # same clamp as torch.nn.functional.cosine_similarity

Lens = nn.Module | LensSpec | str | None


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


def _reference(inputs: DeviationInputs, lens: Lens, metric: str) -> Tensor:
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
    lens: the final norm module (applied as is, in float32), a LensSpec, or None/"none" (no lens).
    """
    inputs = _check(hidden_states, last_index, labels, bases, metric, validate=True)
    _check_lens(lens, inputs.hidden)
    with torch.no_grad():
        return _reference(inputs, lens, metric)


def _check(hidden_states, last_index, labels, bases, metric: str, *, validate: bool) -> DeviationInputs:
    """The one input check (`check_deviation_inputs`), in the form every backend of the dispatcher takes."""
    return check_deviation_inputs(hidden_states, last_index, labels, bases, None, metric, validate=validate,
                                  gather=False, kernel=False)


# --------------------------------------------------------------------------- dispatcher

_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class _Unavailable(Exception):
    """A backend that cannot run here: ``reason`` says why; ``quiet`` when it was already said."""

    def __init__(self, reason: str, quiet: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.quiet = reason, quiet


def _triton_device(device: torch.device) -> str | None:
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "it needs CUDA tensors or TRITON_INTERPRET=1 set before triton is used"


def _cpp_device(device: torch.device) -> str | None:
    return None if device.type in ("cpu", "cuda") else f"it runs on CPU or CUDA tensors, not {device.type}"


def _cuda_device(device: torch.device) -> str | None:
    return None if device.type == "cuda" else f"it needs CUDA tensors, but the inputs are on {device}"


def _cpp_ready(module, with_cuda: bool) -> None:
    if not module.cpp_available():
        reason = getattr(module, "cpp_unavailable_reason", lambda: None)()
        # cpp_available() warned with the reason already: auto moves on quietly
        raise _Unavailable(f"the C++ deviation op is not built ({reason or 'cpp_available() is False'})",
                           quiet=True)
    if with_cuda and not getattr(module, "cuda_op_available", lambda: False)():
        raise _Unavailable("the CUDA C++ deviation op was not built (no CUDA device or nvcc at build time)")


@dataclass(frozen=True)
class Backend:
    """One deviation implementation: where it runs, whether it is available, and its entry point.

    ``module`` is imported on first use (None: the torch reference of this module); ``device_problem``
    says why the backend cannot take tensors on a device (None when it can); ``ready`` raises when the
    imported module cannot run (the C++ op not built).
    """

    name: str
    module: str | None
    attr: str  # the entry point over checked inputs (``contract.for_kernel``)
    device_problem: Callable[[torch.device], str | None]
    ready: Callable[[object], None] | None = None
    gather: bool = True  # the kernel reads spaces with feature stride 1 only: gather the others' rows
    #: under torch.compile: the traceable call over kernel-ready inputs, or None where it cannot run
    traced: Callable[[DeviationInputs, LensSpec, str], Tensor | None] | None = None

    def entry(self, device: torch.device) -> Callable[..., Tensor] | None:
        """The kernel function for tensors on `device` (None: the torch reference); raises _Unavailable."""
        problem = self.device_problem(device)
        if problem is not None:
            raise _Unavailable(problem)
        if self.module is None:
            return None
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise _Unavailable(f"{self.module} cannot be imported ({exc})") from exc
        if self.ready is not None:
            self.ready(module)
        return getattr(module, self.attr)


def _traced_triton(inp: DeviationInputs, lens: LensSpec, metric: str) -> Tensor | None:
    """The registered Triton op over the gathered medium-token rows ([S, B, D]); CUDA only (the
    interpreter cannot trace)."""
    if inp.device.type != "cuda":
        return None
    from salf_engine.kernels.deviation import deviations_triton_stacked  # triton is optional: on first use

    rows = torch.arange(inp.batch, device=inp.device)
    stacked = torch.stack([h[rows, inp.last_index] for h in inp.states])
    return deviations_triton_stacked(stacked, None, inp.labels, inp.bases, lens, metric, validate=False)


def _traced_cpp(inp: DeviationInputs, lens: LensSpec, metric: str) -> Tensor | None:
    """``torch.ops.salf`` (it has a fake kernel), when it was built for the device before tracing."""
    if not cpp_op.built_for(inp.device):
        return None
    inp = for_kernel(inp, lens, gather=False)
    return torch.ops.salf.deviations(inp.views, inp.last_index, inp.labels, inp.bases, inp.weight, inp.bias,
                                     inp.lens_kind, float(inp.eps), inp.metric)


#: The deviation backends by name; ``auto`` tries :data:`AUTO_ORDER` and takes the first that can run. The
#: one home of the backend choice, eager and traced.
BACKENDS: dict[str, Backend] = {
    "triton": Backend("triton", "salf_engine.kernels.deviation", "launch_deviations", _triton_device,
                      traced=_traced_triton),
    "cpp": Backend("cpp", "salf_engine.deviation.cpp_op", "run_checked", _cpp_device,
                   lambda m: _cpp_ready(m, with_cuda=False), gather=False, traced=_traced_cpp),
    "cuda": Backend("cuda", "salf_engine.deviation.cpp_op", "run_checked", _cuda_device,
                    lambda m: _cpp_ready(m, with_cuda=True), gather=False, traced=_traced_cpp),
    "torch": Backend("torch", None, "", lambda _device: None),
}
AUTO_ORDER = ("triton", "cpp", "torch")


def _choose(impl: str, inputs: DeviationInputs, lens: Lens
            ) -> tuple[Backend | None, Callable[..., Tensor] | None, LensSpec | None]:
    """(the backend, its kernel function, the lens as a LensSpec for a kernel) for `impl` and the inputs;
    (None, None, None) for the torch reference.

    ``auto``: the first backend of AUTO_ORDER that runs here, saying once why one was skipped. An explicit
    impl that cannot run raises a SalfError with the reason.
    """
    device = inputs.device
    if impl == "torch":
        return None, None, None
    names = AUTO_ORDER if impl == "auto" else (impl,)
    for name in names:
        if name == "torch":
            return None, None, None
        try:
            fn = BACKENDS[name].entry(device)
            too_big = kernel_limits(inputs)
            if too_big is not None:
                raise _Unavailable(too_big)
        except _Unavailable as exc:
            if impl != "auto":
                raise SalfError(f"impl={impl!r} was requested but {exc.reason}") from None
            if not exc.quiet and BACKENDS[name].device_problem(device) is None:
                _warn_once(name, f"deviations: the {name} kernel is unavailable ({exc.reason}); "
                                 "auto falls back to the next backend")
            continue
        if impl == "auto":
            try:
                spec = lens_spec(lens)
            except SalfError as exc:
                _warn_once(f"lens:{type(lens).__name__}", f"deviations: using torch because {exc}")
                return None, None, None
        else:
            spec = lens_spec(lens)
        return BACKENDS[name], fn, spec
    return None, None, None


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
    (`salf_engine.deviation.cpp_op`), or "auto": the first of :data:`AUTO_ORDER` that can run
    (:data:`BACKENDS`:
    Triton on CUDA inputs or with TRITON_INTERPRET=1, else the C++ op if built, else torch; a kernel
    that cannot run is skipped with a one-time warning). An explicitly requested kernel that cannot run
    raises a `SalfError` saying why. Under ``torch.compile`` the call traces without a graph break and
    without the host-side index-range check (see `_deviations_compiling`).
    """
    if impl not in IMPLS:
        raise SalfError(f"unknown deviation impl {impl!r}: expected one of {', '.join(IMPLS)}")
    if torch.compiler.is_compiling():
        return _deviations_compiling(hidden_states, last_index, labels, bases, lens, metric, impl)
    inputs = _check(hidden_states, last_index, labels, bases, metric, validate=check_ranges)
    _check_lens(lens, inputs.hidden)
    backend, fn, spec = _choose(impl, inputs, lens)
    if backend is None:
        with torch.no_grad():
            return _reference(inputs, lens, metric)
    if spec.dim is not None and spec.dim != inputs.hidden:
        raise SalfError(f"the lens has dimension {spec.dim} but the hidden states have D = {inputs.hidden}")
    # checked once, above: the kernel gets the checked inputs, made ready for it
    return fn(for_kernel(inputs, spec.to(inputs.device), gather=backend.gather))


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
    inputs = _check(hidden_states, last_index, labels, bases, metric, validate=False)
    dim = inputs.hidden
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
    names = AUTO_ORDER if impl == "auto" else (impl,)
    with torch.no_grad():
        for name in names:
            traced = BACKENDS[name].traced
            if spec is None or traced is None:
                break
            out = traced(inputs, spec.to(device), metric)
            if out is not None:
                return out
        if impl in ("cpp", "cuda"):
            raise SalfError(f"impl={impl!r} under torch.compile needs the C++ op built before tracing")
        return _reference(inputs, lens, metric)


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
