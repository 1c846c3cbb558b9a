"""Independent reference and input builders for the deviation kernel tests.

The reference is deliberately naive: per-sample, per-space Python loops that
apply the norm math explicitly (no shared code with the kernels or with
``salf_engine.deviation.compute``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Lens",
    "make_lens",
    "make_case",
    "reference_deviations",
    "assert_three_way",
    "LAYOUTS",
]

try:  # the real LensSpec when semantics.py exists; the kernels only read these four fields
    from salf_engine.deviation.semantics import LensSpec as Lens  # type: ignore[attr-defined]
except Exception:  # pragma: no cover - depends on what else is in the tree

    @dataclass(frozen=True)
    class Lens:  # type: ignore[no-redef]
        kind: str
        weight: torch.Tensor | None
        bias: torch.Tensor | None
        eps: float


LAYOUTS = ("contiguous", "time_major", "strided", "feature_strided")


def make_lens(kind: str, D: int, *, gemma: bool = False, bias: bool = True, seed: int = 0) -> Lens:
    g = torch.Generator().manual_seed(seed + 101)
    if kind == "none":
        return Lens(kind="none", weight=None, bias=None, eps=0.0)
    w = torch.randn(D, generator=g) * 0.5
    w = 1.0 + w if gemma else w + 1.5  # Gemma's effective multiplier is 1 + weight
    if kind == "rms":
        return Lens(kind="rms", weight=w, bias=None, eps=1e-6)
    b = torch.randn(D, generator=g) if bias else None
    return Lens(kind="layernorm", weight=w, bias=b, eps=1e-5)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` [B, T, D] in a different memory layout."""
    B, T, D = x.shape
    if layout == "contiguous":
        return x.contiguous()
    if layout == "time_major":  # [T, B, D] storage seen as [B, T, D]
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":  # every other time step of a wider buffer, D a slice of a wider row
        big = torch.zeros(B, 2 * T, D + 7, dtype=x.dtype)
        big[:, ::2, 3 : 3 + D] = x
        return big[:, ::2, 3 : 3 + D]
    if layout == "feature_strided":  # feature stride 2: exercises the gather fallback
        big = torch.zeros(B, T, 2 * D, dtype=x.dtype)
        big[:, :, ::2] = x
        return big[:, :, ::2]
    raise ValueError(layout)


def make_case(B, m, T, D, K, *, dtype=torch.float32, layouts=("contiguous",), padding="right", seed=0):
    """States (m+1 spaces, layouts cycled per space), last_index, labels, bases."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for s in range(m + 1):
        x = (torch.randn(B, T, D, generator=g) * 2.0 + 0.3 * s).to(dtype)
        states.append(_layout(x, layouts[s % len(layouts)]))
    if padding == "left":  # the medium token is the last position
        last_index = torch.full((B,), T - 1, dtype=torch.int64)
    else:  # right padding: last non-padding position varies per sample
        last_index = torch.randint(0, T, (B,), generator=g)
    labels = torch.randint(0, K, (B,), generator=g)
    bases = torch.randn(K, D, generator=g)
    return states, last_index, labels, bases


def _lens_apply(h: torch.Tensor, lens: Lens | None, dt: torch.dtype) -> torch.Tensor:
    if lens is None or lens.kind == "none":
        return h
    w = lens.weight.to(dt) if lens.weight is not None else torch.ones_like(h)
    if lens.kind == "rms":
        rms = torch.sqrt(torch.mean(h * h) + lens.eps)
        return w * (h / rms)
    mu = torch.mean(h)
    var = torch.mean((h - mu) * (h - mu))
    y = w * ((h - mu) / torch.sqrt(var + lens.eps))
    if lens.bias is not None:
        y = y + lens.bias.to(dt)
    return y


def reference_deviations(states, last_index, labels, bases, lens, metric, *, compute_dtype=torch.float64):
    """[B, m+1] deviations with explicit per-sample loops, arithmetic in ``compute_dtype``."""
    dt = compute_dtype
    B, S, K = states[0].shape[0], len(states), bases.shape[0]
    out = torch.empty(B, S, dtype=torch.float64)
    bs = bases.to(dt)
    for b in range(B):
        y = int(labels[b])
        t = int(last_index[b])
        for s in range(S):
            h = states[s][b, t, :].to(dt)
            x = _lens_apply(h, lens, dt) if s < S - 1 else h
            nx = torch.sqrt(torch.sum(x * x))
            cos = []
            for j in range(K):
                nb = torch.sqrt(torch.sum(bs[j] * bs[j]))
                cos.append(torch.sum(x * bs[j]) / (nx * nb))
            cos = torch.stack(cos)
            if metric == "cosine":
                d = 1 - cos[y]
            elif metric == "ce":
                d = torch.logsumexp(cos, dim=0) - cos[y]
            elif metric == "rank":
                d = 1 + sum(int(cos[j] > cos[y]) for j in range(K))
            else:
                raise ValueError(metric)
            out[b, s] = float(d)
    return out


def assert_three_way(out, ref, out_pt, *, atol: float, what: str = ""):
    """flash-attention's rule: |out - ref| <= 2 |out_pt - ref| + atol (ref in high precision)."""
    out = out.detach().cpu().double()
    err = (out - ref).abs()
    bound = 2 * (out_pt.double() - ref).abs() + atol
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} entries off; max err {err.max().item():.3g}, "
        f"worst at {bad.nonzero()[0].tolist()}: out={out[bad][0].item():.6g} ref={ref[bad][0].item():.6g} "
        f"bound={bound[bad][0].item():.3g}"
    )


METRICS = ("cosine", "ce", "rank")
LENSES = ("none", "rms", "rms_gemma", "layernorm", "layernorm_nobias")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ATOL = {"cosine": 2e-5, "ce": 2e-5, "rank": 0.0}


def named_lens(name: str, D: int) -> Lens:
    """A lens by test name: none, rms, rms_gemma (1 + w), layernorm, layernorm_nobias."""
    if name == "rms_gemma":
        return make_lens("rms", D, gemma=True)
    if name == "layernorm_nobias":
        return make_lens("layernorm", D, bias=False)
    return make_lens(name, D)


def check_kernel_output(states, last_index, labels, bases, lens, metric, out, what):
    """A kernel's [B, m+1] output against the fp64 loop reference (three-way rule for bf16/fp16)."""
    cpu = [s.cpu() for s in states]
    args = (cpu, last_index.cpu(), labels.cpu(), bases.cpu(), lens, metric)
    ref = reference_deviations(*args)
    low = states[0].dtype
    out_pt = ref if low == torch.float32 else reference_deviations(*args, compute_dtype=low)
    assert out.dtype == torch.float32 and tuple(out.shape) == tuple(ref.shape)
    atol = ATOL[metric] + (1e-5 if low != torch.float32 else 0.0)
    assert_three_way(out.cpu(), ref, out_pt, atol=atol, what=what)
    return ref
