"""Vocabulary-defined semantics: label bases and the logit lens.

Semantic bases (the paper, arXiv 2406.11753). For the LM head ``W_o`` (V x D) the
output-side basis of token ``y`` is the y-th column of the pseudo-inverse,

    b_y = W_o^+ e_y = G^{-1} w_y,    G = W_o^T W_o  (D x D),

with ``w_y`` the y-th row of ``W_o`` (full column rank). ``G`` is accumulated
in float64 over row chunks and factorized with Cholesky; the V x D
pseudo-inverse is never formed. If ``G`` is singular or ill-conditioned a tiny
relative ridge ``lambda * max(diag G) * I`` is added (with a warning); as
``lambda -> 0`` the ridge solution tends to the minimum-norm ``W_o^+ e_y``.
The input-side basis is the embedding row ``E[y]``.

The lens is the model's final norm applied to intermediate states. `LensSpec`
holds it as plain math so kernels can fold it in:

    rms:        lens(x) = w * x / sqrt(mean(x^2) + eps)
    layernorm:  lens(x) = w * (x - mean(x)) / sqrt(var(x) + eps) + bias
    none:       lens(x) = x

``w`` is the effective multiplier (Llama/Qwen2/Mistral: ``weight``;
Gemma/Gemma2/Gemma3: ``1 + weight``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from salf_engine.deviation.contract import LENS_ALIASES
from salf_engine.errors import ModelError, SalfError

__all__ = ["semantic_bases", "LensSpec", "lens_spec", "LENS_KINDS"]

LENS_KINDS = ("none", "rms", "layernorm")

# RMSNorm classes whose forward is ``weight * x * rsqrt(mean(x^2) + eps)``
# (checked against the transformers 5.x sources).
_PLAIN_RMS_NAMES = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"})
# RMSNorm classes whose forward is ``(1 + weight) * x * rsqrt(mean(x^2) + eps)``.
_GEMMA_RMS_NAMES = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})

_GRAM_CHUNK_ROWS = 8192
_PIVOT_RTOL = 1e-12  # min Cholesky pivot^2 relative to max(diag G) below which G counts as singular
_RIDGE_START = 1e-9  # first ridge, relative to max(diag G); multiplied by 100 per retry
_RIDGE_MAX = 1e-1


# --------------------------------------------------------------------------- bases


def _head_weight(model: nn.Module | Tensor, side: str) -> Tensor:
    """The V x D matrix of the LM head (side="output") or the input embedding (side="input")."""
    if isinstance(model, Tensor):
        return model
    getter = "get_output_embeddings" if side == "output" else "get_input_embeddings"
    candidates: list[nn.Module] = [model]
    if hasattr(model, "get_base_model"):  # PEFT wrapper
        try:
            candidates.append(model.get_base_model())
        except Exception:  # pragma: no cover - defensive: odd wrappers
            pass
    for candidate in candidates:
        fn = getattr(candidate, getter, None)
        if fn is None:
            continue
        try:
            module = fn()
        except (AttributeError, NotImplementedError):
            continue
        if module is not None and getattr(module, "weight", None) is not None:
            return module.weight
    what = "an LM head (get_output_embeddings)" if side == "output" else "input embeddings"
    raise ModelError(f"cannot find {what} on {type(model).__name__}")


def _as_float_matrix(weight: Tensor) -> Tensor:
    """A floating-point view of a head/embedding weight, dequantizing bitsandbytes 4-bit if needed."""
    if weight.is_floating_point():
        return weight.detach()
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        try:
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(weight.data, quant_state).detach()
        except Exception as exc:
            raise ModelError(f"cannot dequantize the {weight.dtype} head weight: {exc}") from exc
    raise ModelError(f"the head weight has non-float dtype {weight.dtype} and no known dequantization")


def _token_index(token_ids: Tensor | Sequence[int], vocab_size: int, device: torch.device) -> Tensor:
    ids = torch.as_tensor(token_ids)
    if ids.dim() != 1:
        raise SalfError(f"token_ids must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise SalfError("token_ids is empty: need at least one label token id")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise SalfError(f"token_ids must be integers, got dtype {ids.dtype}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise SalfError(f"token id {bad} is out of range for a vocabulary of {vocab_size} tokens")
    return ids.to(device=device, dtype=torch.long)


def _gram(weight: Tensor) -> Tensor:
    """G = W^T W in float64, accumulated over row chunks (never a float64 copy of all of W)."""
    d = weight.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], _GRAM_CHUNK_ROWS):
        chunk = weight[start : start + _GRAM_CHUNK_ROWS].to(torch.float64)
        gram.addmm_(chunk.T, chunk)
    return gram


def _cholesky_ok(gram: Tensor, scale: float) -> Tensor | None:
    """The Cholesky factor of `gram`, or None if it fails or a pivot is negligible (singular G)."""
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return None
    pivots = torch.diagonal(factor)
    if not bool(torch.isfinite(pivots).all()) or float(pivots.min()) ** 2 < _PIVOT_RTOL * scale:
        return None
    return factor


def _solve_gram(gram: Tensor, rhs: Tensor) -> Tensor:
    """Solve G X = rhs (rhs: D x K) by Cholesky, adding a growing relative ridge only if needed."""
    scale = float(torch.diagonal(gram).max())
    if not scale > 0.0 or not torch.isfinite(gram).all():
        raise ModelError("the LM head weight is zero or not finite: semantic bases are undefined")
    factor = _cholesky_ok(gram, scale)
    ridge = 0.0
    rel = _RIDGE_START
    while factor is None:
        if rel > _RIDGE_MAX:
            raise ModelError("cannot factorize W_o^T W_o even with a ridge; the LM head looks degenerate")
        ridge = rel * scale
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        factor = _cholesky_ok(gram + ridge * eye, scale)
        rel *= 100.0
    if ridge > 0.0:
        warnings.warn(
            f"W_o^T W_o is singular or ill-conditioned (LM head not of full column rank); added a ridge "
            f"of {ridge:.3g} ({ridge / scale:.1e} x max diag) before the Cholesky solve",
            RuntimeWarning,
            stacklevel=3,
        )
    return torch.cholesky_solve(rhs, factor)


def semantic_bases(
    model: nn.Module | Tensor, token_ids: Tensor | Sequence[int], side: str = "output"
) -> Tensor:
    """Semantic bases of the label tokens, float32 [K, D].

    side="output": ``b_y = (W_o^T W_o)^{-1} w_y`` = column y of ``pinv(W_o)`` (Cholesky in float64,
    tiny ridge with a warning when ``W_o`` is rank-deficient). side="input": ``b_y = E[y]``.
    `model` is a causal LM (PEFT-wrapped models and tied embeddings work) or a V x D weight tensor.
    """
    if side not in ("output", "input"):
        raise SalfError(f"unknown side {side!r}: expected 'output' or 'input'")
    weight = _head_weight(model, side)
    if weight.dim() != 2:
        raise ModelError(f"expected a 2-D V x D weight, got shape {tuple(weight.shape)}")
    weight = _as_float_matrix(weight)
    ids = _token_index(token_ids, weight.shape[0], weight.device)
    rows = weight.index_select(0, ids)
    if side == "input":
        return rows.to(torch.float32).clone()
    gram = _gram(weight)
    solved = _solve_gram(gram, rows.to(torch.float64).T)  # D x K
    return solved.T.to(torch.float32).contiguous()


# --------------------------------------------------------------------------- lens


def _float_vector(t: Tensor | None, name: str) -> Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.dim() != 1:
        raise SalfError(f"LensSpec.{name} must be 1-D [D], got shape {tuple(t.shape)}")
    return t.detach().to(torch.float32)


@dataclass(frozen=True, eq=False)
class LensSpec:
    """The final norm as math (see module docstring); weight/bias are float32 [D] or None (= 1 / 0)."""

    kind: str
    weight: Tensor | None = None
    bias: Tensor | None = None
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.kind not in LENS_KINDS:
            raise SalfError(f"unknown lens kind {self.kind!r}: expected one of {', '.join(LENS_KINDS)}")
        object.__setattr__(self, "weight", _float_vector(self.weight, "weight"))
        object.__setattr__(self, "bias", _float_vector(self.bias, "bias"))
        if self.bias is not None and self.kind != "layernorm":
            raise SalfError(f"a bias only makes sense for a layernorm lens, not {self.kind!r}")
        if self.kind == "none" and self.weight is not None:
            raise SalfError("a 'none' lens takes no weight")
        if self.weight is not None and self.bias is not None and self.weight.shape != self.bias.shape:
            raise SalfError(
                f"LensSpec weight {tuple(self.weight.shape)} and bias {tuple(self.bias.shape)} differ in size"
            )
        eps = float(self.eps)
        if not eps >= 0.0:
            raise SalfError(f"LensSpec eps must be >= 0, got {self.eps}")
        object.__setattr__(self, "eps", eps)

    @property
    def dim(self) -> int | None:
        """D if the spec carries a weight or bias, else None (any D)."""
        ref = self.weight if self.weight is not None else self.bias
        return None if ref is None else int(ref.shape[0])

    def to(self, device: torch.device | str) -> LensSpec:
        """The same spec with its tensors on `device` (float32, contiguous)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=torch.float32).contiguous()

        return LensSpec(self.kind, move(self.weight), move(self.bias), self.eps)

    def apply(self, x: Tensor) -> Tensor:
        """lens(x) over the last dimension, computed in float32."""
        x = x.to(torch.float32)
        if self.kind == "none":
            return x
        if self.kind == "rms":
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            centered = x - x.mean(-1, keepdim=True)
            y = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(x.device)
        if self.bias is not None:
            y = y + self.bias.to(x.device)
        return y


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def lens_spec(norm: nn.Module | LensSpec | str | None) -> LensSpec:
    """`LensSpec` of a final-norm module (Llama/Qwen2/Mistral/Gemma* RMSNorm, nn.RMSNorm, nn.LayerNorm).

    None or "none" gives the identity lens; a LensSpec is returned as is.
    """
    if norm is None:
        return LensSpec("none")
    if isinstance(norm, LensSpec):
        return norm
    if isinstance(norm, str):
        if LENS_ALIASES.get(norm, norm) == "none":
            return LensSpec("none")
        raise SalfError(f"unknown lens {norm!r}: pass a norm module, a LensSpec, None or 'none'")
    if not isinstance(norm, nn.Module):
        raise SalfError(
            f"cannot use a {type(norm).__name__} as a lens: pass a norm module, a LensSpec or None"
        )
    if isinstance(norm, nn.LayerNorm):
        if len(norm.normalized_shape) != 1:
            raise SalfError(f"only 1-D LayerNorm lenses are supported, got shape {norm.normalized_shape}")
        return LensSpec("layernorm", norm.weight, norm.bias, norm.eps)
    if isinstance(norm, nn.RMSNorm):
        if len(norm.normalized_shape) != 1:
            raise SalfError(f"only 1-D RMSNorm lenses are supported, got shape {norm.normalized_shape}")
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        return LensSpec("rms", norm.weight, None, eps)
    names = _type_names(norm)
    if names & (_PLAIN_RMS_NAMES | _GEMMA_RMS_NAMES):
        weight = getattr(norm, "weight", None)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if weight is None or eps is None:
            raise SalfError(f"{type(norm).__name__} has no weight/eps attribute; cannot build a lens from it")
        weight = weight.detach().to(torch.float32)
        if names & _GEMMA_RMS_NAMES:
            weight = 1.0 + weight
        return LensSpec("rms", weight, None, eps)
    known = sorted(_PLAIN_RMS_NAMES | _GEMMA_RMS_NAMES | {"LayerNorm", "RMSNorm"})
    raise SalfError(f"unknown norm type {type(norm).__name__} for the lens; supported: {', '.join(known)}")
