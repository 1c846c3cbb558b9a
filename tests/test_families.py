"""Per-family decoder parts: layer-by-layer pass == model forward, masks per layer type, errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import STANDARD_FAMILIES, tiny_model, tiny_standard_model
from transformers import GPT2Config, GPT2LMHeadModel, PhiConfig

from salf_engine.errors import UnsupportedArchitectureError
from salf_engine.models.families import (
    SUPPORTED_FAMILIES,
    check_exact,
    decoder_parts,
    family_of,
    unwrap_peft,
)
from salf_engine.runner.truncated import TruncatedRunner

# family, tiny_model overrides: the sliding variants make T > sliding_window matter
CASES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen2-sliding": (
        "qwen2",
        dict(
            use_sliding_window=True, sliding_window=5, layer_types=["sliding_attention", "full_attention"] * 2
        ),
    ),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", dict(layer_types=["sliding_attention", "full_attention"] * 2)),
    "mistral": ("mistral", {}),
    "mistral-sliding": ("mistral", dict(sliding_window=5)),
}


def _batch(padding_side: str, length: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 60, (3, length), generator=gen)
    mask = torch.ones(3, length, dtype=torch.long)
    for row, pad in enumerate((5, 0, 2)):
        if pad:
            if padding_side == "left":
                mask[row, :pad] = 0
                ids[row, :pad] = 0
            else:
                mask[row, -pad:] = 0
                ids[row, -pad:] = 0
    return ids, mask


def _manual_forward(parts, ids, mask):
    hidden = parts.embed_tokens(ids)
    kwargs = parts.layer_inputs(hidden, mask)
    for i in range(parts.num_layers):
        hidden = parts.layers[i](hidden, **kwargs[i])
    return parts.head(parts.final_norm(hidden))


def test_supported_families_are_the_tested_ones():
    assert SUPPORTED_FAMILIES[:5] == ("llama", "qwen2", "gemma2", "gemma3_text", "mistral")
    assert sorted(SUPPORTED_FAMILIES) == sorted(STANDARD_FAMILIES)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", STANDARD_FAMILIES)
def test_every_standard_family_exact_logits(family, padding_side):
    """Layer by layer == model(...) for every standard family (sliding layers where it has them)."""
    model = tiny_standard_model(family)
    parts = decoder_parts(model)
    assert parts.family == family and parts.num_layers == 4
    assert family_of(model.config) == family
    ids, mask = _batch(padding_side)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = _manual_forward(parts, ids, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("family", STANDARD_FAMILIES)
def test_every_standard_family_runner_cut(family):
    """The runner at a cut: logits == model(...) and no layer below the cut runs backward."""
    model = tiny_standard_model(family)  # eval mode: no dropout, the reference is the same function
    runner = TruncatedRunner(model)
    ids, mask = _batch("left")
    backward_calls: list[int] = []
    for i, layer in enumerate(runner.parts.layers):
        layer.register_full_backward_hook(lambda mod, gi, go, i=i: backward_calls.append(i))
    out = runner(ids, mask, depth=2, logits="all")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    out.logits.float().square().mean().backward()
    assert backward_calls and min(backward_calls) == 2
    head = {id(p) for p in runner.parts.lm_head.parameters()}  # a tied embedding trains through the head
    below = [p for layer in list(runner.parts.layers)[:2] for p in layer.parameters()]
    below += [p for p in runner.parts.embed.parameters() if id(p) not in head]
    assert all(p.grad is None for p in below)
    assert any(p.grad is not None for p in runner.parts.layers[3].parameters())


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_manual_forward_matches_model(case, padding_side):
    family, overrides = CASES[case]
    model = tiny_model(family, **overrides)
    parts = decoder_parts(model)
    assert parts.family == family and parts.num_layers == 4
    ids, mask = _batch(padding_side)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = _manual_forward(parts, ids, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["qwen2-sliding", "gemma3_text", "gemma2"])
def test_layer_types_get_their_own_masks(case):
    family, overrides = CASES[case]
    parts = decoder_parts(tiny_model(family, **overrides))
    types = parts.layer_types()
    assert types == list(parts.config.layer_types)
    ids, mask = _batch("left")
    kwargs = parts.layer_inputs(parts.embed_tokens(ids), mask)
    full = kwargs[types.index("full_attention")]["attention_mask"]
    sliding = kwargs[types.index("sliding_attention")]["attention_mask"]
    assert full is not None and sliding is not None
    assert not torch.equal(full, sliding)  # T=14 > sliding window: the sliding mask hides far keys


def test_mistral_sliding_window_changes_output():
    """The sliding-window branch is real: the same weights without the window give other logits."""
    ids, mask = _batch("right")
    slid = tiny_model("mistral", sliding_window=5)
    plain = tiny_model("mistral")
    with torch.no_grad():
        a = _manual_forward(decoder_parts(slid), ids, mask)
        b = _manual_forward(decoder_parts(plain), ids, mask)
    assert not torch.allclose(a, b, atol=1e-4)


def test_gemma_head_softcaps():
    model = tiny_model("gemma2")
    parts = decoder_parts(model)
    hidden = torch.randn(2, 64) * 50
    raw = parts.lm_head(hidden)
    capped = parts.head(hidden)
    cap = model.config.final_logit_softcapping
    torch.testing.assert_close(capped, torch.tanh(raw / cap) * cap)
    assert capped.abs().max() <= cap


def test_family_of_rejects_unknown_architecture():
    with pytest.raises(UnsupportedArchitectureError, match="gpt2") as info:
        family_of(GPT2Config())
    for fam in SUPPORTED_FAMILIES:
        assert fam in str(info.value)


def test_decoder_parts_rejects_gpt2_model():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*missing.*model.embed_tokens"):
        decoder_parts(model)


def test_missing_final_norm_is_named():
    """Phi keeps its final norm as model.final_layernorm: the error (from the config) names model.norm."""
    cfg = PhiConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2)
    with pytest.raises(UnsupportedArchitectureError, match=r"'phi'.*missing model\.norm;"):
        family_of(cfg)


def test_unknown_layer_type_is_refused():
    model = tiny_model("qwen2")
    model.config.layer_types = ["linear_attention"] * 4
    parts = decoder_parts(model)
    with pytest.raises(UnsupportedArchitectureError, match="linear_attention"):
        parts.layer_inputs(parts.embed_tokens(torch.ones(1, 3, dtype=torch.long)), None)


def test_untested_family_is_checked_against_its_own_forward():
    """An unlisted standard-layout type is accepted when exact, refused when its forward differs."""
    model = tiny_model("llama")
    model.config.model_type = "my_llama"
    assert decoder_parts(model).family == "my_llama"
    quirky = tiny_model("llama")
    quirky.config.model_type = "my_quirky_llama"
    plain_forward = quirky.forward
    quirky.forward = lambda *a, **k: type(out := plain_forward(*a, **k))(logits=out.logits * 2)
    with pytest.raises(UnsupportedArchitectureError, match="my_quirky_llama.*differs from model"):
        decoder_parts(quirky)
    check_exact(decoder_parts(model))  # the exact one passes an explicit re-check


def test_decoder_parts_unwraps_peft():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert unwrap_peft(wrapped) is model
    parts = decoder_parts(wrapped)
    assert parts.model is model and parts.layers is model.model.layers
    ids, mask = _batch("left")
    with torch.no_grad():
        ref = wrapped(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(_manual_forward(parts, ids, mask), ref, atol=1e-5, rtol=0)
