"""Fused SALF deviation kernel (Triton): every latent space of every sample in ONE launch.

For sample ``b`` with medium-token position ``t = last_index[b]`` and ground-truth
label ``y = labels[b]``, space ``s`` (``s = 0..m``) holds the state
``h = states[s][b, t, :]`` (length ``D``). With ``lens`` applied to spaces
``0..m-1`` (space ``m`` is already normed and read raw)::

    none       x = h
    rms        x = g * h * r            r = 1 / sqrt(mean(h^2) + eps)   (r > 0 cancels in a cosine)
    layernorm  x = g * (h - mu) * r + beta,   mu = mean(h), r = 1 / sqrt(mean((h - mu)^2) + eps)

    cos_j   = <x, b_j> / (max(|x|, 1e-8) * max(|b_j|, 1e-8))      j = 0..K-1 (all label bases)
    cosine  d = 1 - cos_y
    ce      d = logsumexp_j(cos_j) - cos_y                           (= -log softmax(cos)[y])
    rank    d = 1 + #{j : cos_j > cos_y}                             (1-based rank of y)

The layernorm case is evaluated exactly without materializing ``x``: with
``c = g * (h - mu)`` (two passes over ``h``: the mean, then everything else),
``<x, b_j> = r <c, b_j> + <beta, b_j>`` and ``|x|^2 = r^2 |c|^2 + 2 r <c, beta> + |beta|^2``.
Without a bias ``r`` cancels, as it does for RMSNorm.

Launch design (one launch, no stacking copy):

* The ``m+1`` state tensors are read where they lie through a device table
  (int64 ``[4, m+1]``: ``data_ptr()``, batch stride, time stride, time length, in
  elements); feature stride 1 is required (a space without it is gathered to
  ``[B, D]`` rows first, the only copy the launcher ever makes).
* Grid ``B * G``: program ``(b, g)`` handles sample ``b`` and the ``g``-th group of
  consecutive spaces; inside a program a loop runs over its spaces and, per
  space, over ``D`` in ``BLOCK_D`` chunks, accumulating the K dot products,
  ``|x|^2``, ``|b_j|^2`` (and the bias terms) in fp32. The group size is
  chosen by the launcher so that small batches still fill the GPU (about
  four programs per SM), while the K x D bases stay hot in L1/L2 across the
  spaces of a group. The ce / rank metrics only need the K cosines of one
  (sample, space), so they finish inside the program.
* ``deviations_triton_stacked`` reads the spaces from ONE ``[S, B, T, D]`` tensor (any strides,
  feature stride 1) by its strides instead of the pointer table. It is the launcher registered as the
  torch op ``torch.ops.salf_triton.deviations`` with ``torch.library.triton_op`` + ``wrap_triton``, so
  ``torch.compile`` traces through it without a graph break (the pointer table needs ``data_ptr()``,
  which no tracer can see). Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors)
  ``wrap_triton`` cannot trace an interpreted kernel, so the same body is registered as an opaque
  ``torch.library.custom_op`` with a shape-only fake instead: still no graph break, the kernel runs
  at run time (``OP_KIND`` says which registration is live).
* The eof-layer (the argmax of the gains) is not fused: it reads ``m+1`` floats per sample that
  ``salf_engine.deviation.compute.eof_layers`` reads from the output in one small pass, and every
  caller needs the deviations themselves too. (An earlier version fused it with a last-block arrival
  counter; no caller used it, and it saved nothing measurable.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

try:
    from torch.library import wrap_triton
except ImportError:  # torch < 2.6: no triton_op either, the op is registered as an opaque custom_op

    def wrap_triton(kernel):
        return kernel


from salf_engine.deviation.contract import (
    DeviationInputs,
    KernelInputError,
    check_deviation_inputs,
)

__all__ = ["deviations_triton", "deviations_triton_stacked", "deviation_kernel", "launch_deviations",
           "TRITON_OP", "OP_KIND", "kernel_meta", "group_size_for", "list_launch", "stacked_launch",
           "stacked_op_args"]

_TILE_ELEMENTS = 8192  # register budget of the [BLOCK_K, BLOCK_D] bases tile (fp32 elements)


@triton.jit
def deviation_kernel(
    table_ptr,  # int64 [4, S]: row 0 data_ptr of each space, row 1 batch stride, row 2 time stride, row 3 T
    ref_ptr,  # a state tensor: its element type (all spaces share it); STACKED: the [S, B, T, D] states
    last_index_ptr,  # int64 [B]: medium-token position of each sample
    labels_ptr,  # int64 [B]: ground-truth label index (0..K-1) of each sample
    bases_ptr,  # float32 [K, D] contiguous: semantic basis of every label
    weight_ptr,  # float32 [D]: lens weight g (read only when LENS_KIND > 0)
    bias_ptr,  # float32 [D]: layernorm bias beta (read only when HAS_BIAS)
    out_ptr,  # float32 [B, S] contiguous: the metric of every (sample, space)
    n_spaces,  # S = m + 1
    group_size,  # spaces per program
    n_groups,  # programs per sample = cdiv(S, group_size)
    D,  # hidden size
    K,  # number of labels
    eps,  # lens epsilon (layernorm with bias only; it cancels otherwise)
    stride_s,  # STACKED only: element strides of the [S, B, T, D] states tensor (space, batch, time) and T
    stride_b,
    stride_t,
    n_time_stacked,
    STACKED: tl.constexpr,  # states are one [S, B, T, D] tensor at ref_ptr (no pointer table)
    LENS_KIND: tl.constexpr,  # 0 none, 1 rms, 2 layernorm
    HAS_BIAS: tl.constexpr,  # layernorm bias present
    METRIC: tl.constexpr,  # 0 cosine, 1 ce, 2 rank
    BLOCK_D: tl.constexpr,  # chunk of the hidden dimension
    BLOCK_K: tl.constexpr,  # next_pow2(K)
):
    """d[b, s] for the spaces of one group of one sample (math in the module docstring)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_groups
    grp = pid % n_groups
    s_begin = grp * group_size
    s_end = tl.minimum(s_begin + group_size, n_spaces)

    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    y = tl.load(labels_ptr + b)
    pos = tl.load(last_index_ptr + b)
    elem_ty = ref_ptr.dtype.element_ty

    for s in range(s_begin, s_end):
        if STACKED:
            valid = (y >= 0) & (y < K) & (pos >= 0) & (pos < n_time_stacked)
            safe_pos = tl.where(valid, pos, 0)
            row_ptr = ref_ptr + s * stride_s + b * stride_b + safe_pos * stride_t
        else:
            row_ptr = tl.load(table_ptr + s).to(tl.pointer_type(elem_ty))
            sb = tl.load(table_ptr + n_spaces + s)
            st = tl.load(table_ptr + 2 * n_spaces + s)
            n_time = tl.load(table_ptr + 3 * n_spaces + s)
            valid = (y >= 0) & (y < K) & (pos >= 0) & (pos < n_time)
            safe_pos = tl.where(valid, pos, 0)
            row_ptr = row_ptr + b * sb + safe_pos * st
        lensed = s < n_spaces - 1  # the lens applies to spaces 0..m-1, space m is read raw

        mu = 0.0
        if LENS_KIND == 2:
            acc_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs = d0 + tl.arange(0, BLOCK_D)
                m_d = (offs < D) & valid
                acc_sum += tl.load(row_ptr + offs, mask=m_d, other=0.0).to(tl.float32)
            mu = tl.where(lensed, tl.sum(acc_sum, axis=0) / D, 0.0)

        acc_dot = tl.zeros([BLOCK_K], dtype=tl.float32)  # <c, b_j>
        acc_bb = tl.zeros([BLOCK_K], dtype=tl.float32)  # |b_j|^2
        acc_xx = tl.zeros([BLOCK_D], dtype=tl.float32)  # |c|^2, reduced at the end
        acc_cc = tl.zeros([BLOCK_D], dtype=tl.float32)  # |h - mu|^2 (layernorm variance)
        acc_bbeta = tl.zeros([BLOCK_K], dtype=tl.float32)  # <beta, b_j>
        acc_xbeta = tl.zeros([BLOCK_D], dtype=tl.float32)  # <c, beta>
        acc_beta2 = tl.zeros([BLOCK_D], dtype=tl.float32)  # |beta|^2
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            m_d = offs < D
            h = tl.load(row_ptr + offs, mask=m_d & valid, other=0.0).to(tl.float32)
            if LENS_KIND == 2:
                h = tl.where(m_d, h - mu, 0.0)
                acc_cc += h * h
            if LENS_KIND > 0:
                g = tl.load(weight_ptr + offs, mask=m_d, other=0.0)
                x = h * tl.where(lensed, g, 1.0)
            else:
                x = h
            bt = tl.load(
                bases_ptr + offs_k[:, None] * D + offs[None, :],
                mask=mask_k[:, None] & m_d[None, :],
                other=0.0,
            )
            acc_dot += tl.sum(bt * x[None, :], axis=1)
            acc_bb += tl.sum(bt * bt, axis=1)
            acc_xx += x * x
            if HAS_BIAS:
                beta = tl.load(bias_ptr + offs, mask=m_d, other=0.0)
                acc_bbeta += tl.sum(bt * beta[None, :], axis=1)
                acc_xbeta += x * beta
                acc_beta2 += beta * beta

        dot = acc_dot
        xx = tl.sum(acc_xx, axis=0)
        if HAS_BIAS:
            rstd = 1.0 / tl.sqrt(tl.sum(acc_cc, axis=0) / D + eps)
            bias_on = tl.where(lensed, 1.0, 0.0)
            scale = tl.where(lensed, rstd, 1.0)
            dot = scale * acc_dot + bias_on * acc_bbeta
            xx = scale * scale * xx + bias_on * (
                2.0 * scale * tl.sum(acc_xbeta, axis=0) + tl.sum(acc_beta2, axis=0)
            )
        norm_x = tl.maximum(tl.sqrt(xx), 1e-8)
        norm_b = tl.maximum(tl.sqrt(acc_bb), 1e-8)
        cos = dot / (norm_x * norm_b)
        cos_y = tl.sum(tl.where(offs_k == y, cos, 0.0), axis=0)
        if METRIC == 0:
            d = 1.0 - cos_y
        elif METRIC == 1:
            c_max = tl.max(tl.where(mask_k, cos, float("-inf")), axis=0)
            lse = c_max + tl.log(tl.sum(tl.where(mask_k, tl.exp(cos - c_max), 0.0), axis=0))
            d = lse - cos_y
        else:
            d = 1.0 + tl.sum(tl.where(mask_k & (cos > cos_y), 1.0, 0.0), axis=0)
        d = tl.where(valid, d, float("nan"))
        tl.store(out_ptr + b * n_spaces + s, d)


def group_size_for(sms: int, batch: int, n_spaces: int) -> int:
    """Spaces per program on a GPU with ``sms`` multiprocessors: about four programs per SM."""
    return max(1, min(n_spaces, math.ceil(batch * n_spaces / (4 * sms))))


def _group_size(device: torch.device, batch: int, n_spaces: int) -> int:
    if device.type != "cuda":  # interpreter: one program per sample keeps the interpreted grid small
        return n_spaces
    return group_size_for(torch.cuda.get_device_properties(device).multi_processor_count, batch, n_spaces)


def _num_warps(tile: int) -> int:
    if tile <= 1024:
        return 2
    if tile <= 4096:
        return 4
    return 8


def kernel_meta(element_size: int, hidden: int, n_labels: int) -> dict[str, int]:
    """``BLOCK_D``, ``BLOCK_K`` and ``num_warps`` that both launchers pick for states of ``element_size``
    bytes and ``[K, D]`` bases: ``BLOCK_K = next_pow2(K)``, and ``BLOCK_D`` as large as the bases tile
    budget (``_TILE_ELEMENTS``) allows, at most ``next_pow2(D)``."""
    block_k = max(2, triton.next_power_of_2(n_labels))
    block_d = min(65536 // element_size, triton.next_power_of_2(hidden), max(16, _TILE_ELEMENTS // block_k))
    return {"BLOCK_D": block_d, "BLOCK_K": block_k, "num_warps": _num_warps(block_k * block_d)}


def deviations_triton(
    states: Sequence[torch.Tensor],
    last_index: torch.Tensor,
    labels: torch.Tensor,
    bases: torch.Tensor,
    lens=None,
    metric: str = "cosine",
    *,
    validate: bool = True,
    group_size: int | None = None,
) -> torch.Tensor:
    """Deviations of all ``m+1`` spaces in one Triton launch.

    Args:
        states: ``m+1`` tensors ``[B, T, D]`` (fp32/bf16/fp16, any batch/time
            strides, feature stride 1 preferred), space ``m`` already normed.
        last_index: int ``[B]`` medium-token positions.
        labels: int ``[B]`` ground-truth label indices in ``0..K-1``.
        bases: ``[K, D]`` semantic bases of the labels.
        lens: a ``LensSpec`` (``kind`` "none" | "rms" | "layernorm", ``weight``,
            ``bias``, ``eps``) applied to spaces ``0..m-1``, or None.
        metric: "cosine" | "ce" | "rank".
        validate: check label/position ranges on the host (one device sync);
            without it an out-of-range entry yields NaN.
        group_size: spaces per program (default: chosen from the SM count).

    Returns:
        float32 ``[B, m+1]``.

    Raises:
        KernelInputError: (a ``SalfError``) on inconsistent shapes, dtypes,
            devices, ranges or names.
    """
    inp = check_deviation_inputs(states, last_index, labels, bases, lens, metric, validate=validate)
    return launch_deviations(inp, group_size=group_size)


def launch_deviations(inp: DeviationInputs, *, group_size: int | None = None) -> torch.Tensor:
    """The kernel over inputs already checked (``check_deviation_inputs``, gathered, the lens as parts):
    what ``deviations_triton`` runs after its check, and what the dispatcher calls, so inputs are
    checked once per call."""
    device, B, S = inp.device, inp.batch, inp.n_spaces
    out = torch.empty(B, S, dtype=torch.float32, device=device)
    if B == 0:
        return out

    if group_size is None:
        group_size = _group_size(device, B, S)
    grid, args, kwargs = list_launch(inp, out, group_size)
    deviation_kernel[grid](*args, **kwargs)
    return out


def list_launch(inp: DeviationInputs, out: torch.Tensor, group_size: int) -> tuple[tuple[int], tuple, dict]:
    """Grid, arguments and keyword arguments (constexprs, ``num_warps``) of the list launcher's kernel
    launch, nothing launched: what ``launch_deviations`` runs, and what the compile check compiles."""
    B, S, D, K = inp.batch, inp.n_spaces, inp.hidden, inp.n_labels
    if group_size < 1:
        raise KernelInputError(f"group_size must be >= 1, got {group_size}")
    group_size = min(group_size, S)
    n_groups = math.ceil(S / group_size)
    table = torch.tensor(
        [[v.data_ptr() for v in inp.views], inp.batch_strides, inp.time_strides, inp.time_lengths],
        dtype=torch.int64,
    ).to(inp.device, non_blocking=False)
    weight = inp.weight if inp.weight is not None else out
    bias = inp.bias if inp.bias is not None else out
    meta = kernel_meta(inp.views[0].element_size(), D, K)
    args = (
        table,
        inp.views[0],
        inp.last_index,
        inp.labels,
        inp.bases,
        weight,
        bias,
        out,
        S,
        group_size,
        n_groups,
        D,
        K,
        float(inp.eps),
        0,
        0,
        0,
        0,
    )
    kwargs = dict(STACKED=False, LENS_KIND=inp.lens_kind, HAS_BIAS=inp.bias is not None, METRIC=inp.metric,
                  **meta)
    return (B * n_groups,), args, kwargs


# --------------------------------------------------------------------------- the registered torch op

OP_NAME = "salf_triton::deviations"


def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every triton 3.x has it
        return False
    return isinstance(kernel, InterpretedFunction)


def _deviations_stacked_impl(
    states: torch.Tensor,
    last_index: torch.Tensor,
    labels: torch.Tensor,
    bases: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lens_kind: int,
    eps: float,
    metric: int,
    group_size: int,
) -> torch.Tensor:
    """One launch over a stacked ``[S, B, T, D]`` states tensor (checked by the caller)."""
    S, B = states.shape[0], states.shape[1]
    out = torch.empty((B, S), dtype=torch.float32, device=states.device)
    if B == 0:
        return out
    grid, args, kwargs = stacked_launch(
        states, last_index, labels, bases, weight, bias, lens_kind, eps, metric, group_size, out
    )
    wrap_triton(deviation_kernel)[grid](*args, **kwargs)
    return out


def stacked_launch(
    states: torch.Tensor,
    last_index: torch.Tensor,
    labels: torch.Tensor,
    bases: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lens_kind: int,
    eps: float,
    metric: int,
    group_size: int,
    out: torch.Tensor,
) -> tuple[tuple[int], tuple, dict]:
    """Grid, arguments and keyword arguments of the registered op's kernel launch, nothing launched
    (the counterpart of ``list_launch``)."""
    S, B, T, D = states.shape
    K = bases.shape[0]
    group_size = max(1, min(group_size, S))
    n_groups = triton.cdiv(S, group_size)
    args = (
        last_index,  # table_ptr: not read when STACKED
        states,
        last_index,
        labels,
        bases,
        bases if weight is None else weight,  # never read without a lens weight
        bases if bias is None else bias,  # never read without a bias
        out,
        S,
        group_size,
        n_groups,
        D,
        K,
        eps,
        states.stride(0),
        states.stride(1),
        states.stride(2),
        T,
    )
    kwargs = dict(STACKED=True, LENS_KIND=lens_kind, HAS_BIAS=bias is not None, METRIC=metric,
                  **kernel_meta(states.element_size(), D, K))
    return (B * n_groups,), args, kwargs


def _register_op():
    """``salf_triton::deviations`` as a triton_op (real Triton) or an opaque custom_op (interpreter)."""
    namespace, name = OP_NAME.split("::")
    ops_ns = getattr(torch.ops, namespace)
    kind = "triton_op" if not _is_interpreted(deviation_kernel) and hasattr(torch.library, "triton_op") else (
        "custom_op"
    )
    if hasattr(ops_ns, name):  # a second import of this module (importlib.reload): keep the first
        return getattr(ops_ns, name), kind
    if kind == "triton_op":
        torch.library.triton_op(OP_NAME, mutates_args=())(_deviations_stacked_impl)
        return getattr(ops_ns, name), kind
    op = torch.library.custom_op(OP_NAME, mutates_args=())(_deviations_stacked_impl)

    @op.register_fake
    def _(states, last_index, labels, bases, weight, bias, lens_kind, eps, metric, group_size):
        return states.new_empty((states.shape[1], states.shape[0]), dtype=torch.float32)

    return getattr(ops_ns, name), kind


def _stacked_view(states: torch.Tensor) -> torch.Tensor:
    if not isinstance(states, torch.Tensor) or states.dim() not in (3, 4):
        got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        raise KernelInputError(f"stacked states must be one tensor [S, B, T, D] or [S, B, D], got {got}")
    if states.dim() == 3:
        states = states.unsqueeze(2)
    if states.shape[-1] > 1 and states.stride(-1) != 1:
        states = states.contiguous()
    return states


def deviations_triton_stacked(
    states: torch.Tensor,
    last_index: torch.Tensor | None,
    labels: torch.Tensor,
    bases: torch.Tensor,
    lens=None,
    metric: str = "cosine",
    *,
    validate: bool = True,
    group_size: int | None = None,
) -> torch.Tensor:
    """``deviations_triton`` for spaces stacked in one tensor, through the registered torch op.

    Args:
        states: ``[S, B, T, D]`` (any strides; a feature stride other than 1 is made contiguous) or
            ``[S, B, D]`` (the medium-token rows already gathered: T = 1, ``last_index`` may be None).
        Everything else as in ``deviations_triton``. Under ``torch.compile`` the host-side range check
        is skipped (it would need a device sync); an out-of-range entry then yields NaN.

    Returns:
        float32 ``[B, S]``.
    """
    args = stacked_op_args(states, last_index, labels, bases, lens, metric, validate=validate,
                           group_size=group_size)
    return TRITON_OP(*args)


def stacked_op_args(
    states: torch.Tensor,
    last_index: torch.Tensor | None,
    labels: torch.Tensor,
    bases: torch.Tensor,
    lens=None,
    metric: str = "cosine",
    *,
    validate: bool = True,
    group_size: int | None = None,
) -> tuple:
    """The checked arguments of ``torch.ops.salf_triton.deviations`` for the inputs of
    ``deviations_triton_stacked`` (which calls the op with them)."""
    states = _stacked_view(states)
    S, B = states.shape[0], states.shape[1]
    if last_index is None:
        last_index = torch.zeros(B, dtype=torch.int64, device=states.device)
    validate = validate and not torch.compiler.is_compiling()
    inp = check_deviation_inputs(
        list(states.unbind(0)), last_index, labels, bases, lens, metric, validate=validate, gather=False
    )
    if group_size is None:
        group_size = _group_size(inp.device, B, S)
    if group_size < 1:
        raise KernelInputError(f"group_size must be >= 1, got {group_size}")
    return (states, inp.last_index, inp.labels, inp.bases, inp.weight, inp.bias, inp.lens_kind,
            float(inp.eps), inp.metric, int(group_size))


TRITON_OP, OP_KIND = _register_op()
