"""Semantic bases and lens specs, against independent straightforward computations."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_model
from torch import nn
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from salf_engine.deviation.semantics import LensSpec, lens_spec, semantic_bases
from salf_engine.errors import ModelError, SalfError


def pinv_columns(weight: torch.Tensor, ids: list[int], rcond: float = 1e-10) -> torch.Tensor:
    """Rows = the columns `ids` of pinv(W) in float64 (what the bases must equal)."""
    return torch.linalg.pinv(weight.detach().double(), rtol=rcond)[:, ids].T


class HeadOnly(nn.Module):
    """A minimal model exposing only an LM head (V x D)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.head.weight.data.copy_(weight)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


# --------------------------------------------------------------------------- bases


@pytest.mark.parametrize("as_module", [False, True])
def test_output_bases_equal_pinv_columns_random_head(as_module):
    weight = torch.randn(50, 8)
    ids = [3, 0, 49, 17, 3]
    model = HeadOnly(weight) if as_module else weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full-rank head must not take the ridge path
        bases = semantic_bases(model, torch.tensor(ids))
    assert bases.dtype == torch.float32 and bases.shape == (5, 8)
    torch.testing.assert_close(bases.double(), pinv_columns(weight, ids), rtol=1e-5, atol=1e-6)
    # the defining identity of the solve: G b_y = w_y
    gram = weight.double().T @ weight.double()
    torch.testing.assert_close(bases.double() @ gram, weight.double()[ids], rtol=1e-5, atol=1e-5)


def test_output_bases_tied_embedding_tiny_model():
    model = tiny_model("llama")
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # tied
    ids = [5, 6, 40, 100]
    bases = semantic_bases(model, ids)
    torch.testing.assert_close(bases.double(), pinv_columns(emb, ids), rtol=1e-4, atol=1e-6)


def test_output_bases_use_the_untied_head_not_the_embedding():
    model = tiny_model("qwen2")
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    assert head.data_ptr() != emb.data_ptr()
    ids = [7, 8, 9]
    bases = semantic_bases(model, ids)
    torch.testing.assert_close(bases.double(), pinv_columns(head, ids), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(bases.double(), pinv_columns(emb, ids), atol=1e-3)


def test_output_bases_of_peft_wrapped_model_match_base_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("qwen2")
    ids = [10, 11, 12]
    expected = pinv_columns(model.get_output_embeddings().weight, ids)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj", "lm_head"], r=4))
    bases = semantic_bases(wrapped, ids)
    torch.testing.assert_close(bases.double(), expected, rtol=1e-4, atol=1e-6)


def test_input_bases_are_embedding_rows():
    model = tiny_model("gemma2")
    ids = [4, 99, 4]
    bases = semantic_bases(model, torch.tensor(ids), side="input")
    assert bases.dtype == torch.float32
    torch.testing.assert_close(bases, model.get_input_embeddings().weight.detach()[ids])


def test_bf16_head_gives_float32_bases():
    weight = torch.randn(50, 8).to(torch.bfloat16)
    bases = semantic_bases(weight, [1, 2])
    assert bases.dtype == torch.float32
    torch.testing.assert_close(bases.double(), pinv_columns(weight.float(), [1, 2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["low_rank", "duplicate_column", "dead_dimension"])
def test_ridge_path_on_rank_deficient_head(kind):
    # exactly rank-deficient in float32 (small integers, exact products): a true null space
    if kind == "low_rank":
        weight = (torch.randint(-3, 4, (50, 5)) @ torch.randint(-3, 4, (5, 8))).float()
    else:
        weight = torch.randn(50, 8)
        weight[:, 7] = weight[:, 6] if kind == "duplicate_column" else 0.0
    ids = [0, 1, 25, 49]
    with pytest.warns(RuntimeWarning, match="ridge"):
        bases = semantic_bases(weight, ids)
    assert torch.isfinite(bases).all()
    # the ridge solution tends to the minimum-norm pinv column
    torch.testing.assert_close(bases.double(), pinv_columns(weight, ids, rcond=1e-6), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("ids", "side", "match"),
    [
        ([50], "output", "out of range"),
        ([-1], "output", "out of range"),
        ([3, 60], "input", "out of range"),
        ([], "output", "empty"),
        (torch.tensor([1.0, 2.0]), "output", "integers"),
        (torch.tensor([[1, 2]]), "output", "1-D"),
        ([1], "middle", "unknown side"),
    ],
)
def test_bases_bad_inputs(ids, side, match):
    model = HeadOnly(torch.randn(50, 8))
    model.get_input_embeddings = lambda: model.head  # type: ignore[method-assign]
    with pytest.raises(SalfError, match=match):
        semantic_bases(model, ids, side=side)


def test_bases_zero_head_and_missing_head():
    with pytest.raises(ModelError, match="zero"):
        semantic_bases(torch.zeros(10, 4), [1])
    with pytest.raises(ModelError, match="LM head"):
        semantic_bases(nn.Linear(3, 3), [1])


# --------------------------------------------------------------------------- lens


def _randomized(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (0.0 if "Gemma" in type(norm).__name__ else 1.0))
    return norm


NORMS = {
    "llama": lambda d: LlamaRMSNorm(d, eps=1e-5),
    "qwen2": lambda d: Qwen2RMSNorm(d, eps=1e-6),
    "mistral": lambda d: MistralRMSNorm(d, eps=1e-6),
    "gemma2": lambda d: Gemma2RMSNorm(d, eps=1e-6),
    "gemma3": lambda d: Gemma3RMSNorm(d, eps=1e-6),
    "layernorm": lambda d: nn.LayerNorm(d, eps=1e-5),
    "layernorm_noaffine": lambda d: nn.LayerNorm(d, elementwise_affine=False),
    "torch_rmsnorm": lambda d: nn.RMSNorm(d, eps=1e-6),
}


@pytest.mark.parametrize("name", list(NORMS))
@pytest.mark.parametrize("dim", [7, 64])
def test_lens_spec_apply_equals_module(name, dim):
    norm = _randomized(NORMS[name](dim))
    spec = lens_spec(norm)
    x = torch.randn(3, 5, dim) * 3
    with torch.no_grad():
        expected = norm(x)
    torch.testing.assert_close(spec.apply(x), expected, rtol=1e-5, atol=1e-5)
    if spec.weight is not None:
        assert spec.weight.dtype == torch.float32 and spec.weight.shape == (dim,)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3", "qwen2", "mistral"])
def test_rms_lens_folds_into_cosine(name):
    """cos(norm(h), b) = <g*h, b> / (|g*h| |b|): the rms factor cancels."""
    norm = _randomized(NORMS[name](16))
    spec = lens_spec(norm)
    assert spec.kind == "rms"
    expected_g = norm.weight.detach() + (1.0 if name.startswith("gemma") else 0.0)
    torch.testing.assert_close(spec.weight, expected_g)
    h, b = torch.randn(16), torch.randn(16)
    with torch.no_grad():
        cos_module = torch.nn.functional.cosine_similarity(norm(h[None])[0], b, dim=0)
    cos_folded = torch.dot(spec.weight * h, b) / ((spec.weight * h).norm() * b.norm())
    torch.testing.assert_close(cos_folded, cos_module, rtol=1e-5, atol=1e-6)


def test_lens_spec_layernorm_fields():
    norm = _randomized(nn.LayerNorm(6, eps=1e-3))
    spec = lens_spec(norm)
    assert spec.kind == "layernorm" and spec.eps == pytest.approx(1e-3)
    torch.testing.assert_close(spec.weight, norm.weight.detach())
    torch.testing.assert_close(spec.bias, norm.bias.detach())


def test_lens_spec_of_tiny_model_norms():
    for family, kind_weight in [("llama", 0.0), ("gemma2", 1.0), ("gemma3_text", 1.0)]:
        norm = tiny_model(family).model.norm
        spec = lens_spec(norm)
        assert spec.kind == "rms"
        torch.testing.assert_close(spec.weight, norm.weight.detach().float() + kind_weight)


def test_lens_spec_identity_and_passthrough():
    for value in (None, "raw", "none"):
        spec = lens_spec(value)
        assert spec.kind == "none" and spec.weight is None
        x = torch.randn(4, 3)
        assert torch.equal(spec.apply(x), x)
    given = LensSpec("rms", torch.ones(3), None, 1e-6)
    assert lens_spec(given) is given
    assert given.to("cpu").weight.dtype == torch.float32


def test_lens_spec_errors():
    with pytest.raises(SalfError, match="unknown norm type"):
        lens_spec(nn.Linear(3, 3))
    with pytest.raises(SalfError, match="unknown lens"):
        lens_spec("final_normx")
    with pytest.raises(SalfError, match="cannot use"):
        lens_spec(3.0)  # type: ignore[arg-type]
    with pytest.raises(SalfError, match="unknown lens kind"):
        LensSpec("batchnorm")
    with pytest.raises(SalfError, match="bias"):
        LensSpec("rms", torch.ones(3), torch.zeros(3))
    with pytest.raises(SalfError, match="differ"):
        LensSpec("layernorm", torch.ones(3), torch.zeros(4))
    with pytest.raises(SalfError, match="1-D"):
        LensSpec("rms", torch.ones(3, 3))
    with pytest.raises(SalfError, match="eps"):
        LensSpec("rms", torch.ones(3), eps=-1.0)
