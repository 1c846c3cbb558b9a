"""The deviation of a generated answer against an fp64 loop reference (pinv bases, the RMS lens written out),
through every backend: torch, the C++ op and the Triton kernel (interpreter), all positions in one call."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from salf_engine.data.responses import ResponseExample, collate_responses, encode_responses
from salf_engine.deviation import cpp_op as ops
from salf_engine.deviation.responses import profile_response_deviations, response_deviations
from salf_engine.errors import ConfigError

EXAMPLES = [ResponseExample("how many city ?", "5 . 7 and 8"), ResponseExample("who is it ?", "he"),
            ResponseExample("where is the river ?", "in the city of the mountain")]


def _fp64_reference(model, batch) -> torch.Tensor:
    """Loops over rows, positions and spaces in float64: lens(x) = w * x / sqrt(mean(x^2) + eps) for spaces
    0..m-1, b_y = column y of pinv(W_o), deviation 1 - cos, averaged over the row's response positions."""
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states
    norm = model.model.norm
    w, eps = norm.weight.double(), norm.variance_epsilon
    pinv = torch.linalg.pinv(model.lm_head.weight.double())  # [D, V]
    m = len(hidden) - 1
    out = torch.zeros(batch["labels"].shape[0], m + 1, dtype=torch.float64)
    for b, labels in enumerate(batch["labels"]):
        positions = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
        for space in range(m + 1):
            total = 0.0
            for t in positions:
                x = hidden[space][b, t].double()
                if space < m:
                    x = w * x / torch.sqrt((x * x).mean() + eps)
                basis = pinv[:, int(labels[t + 1])]
                total += 1.0 - float(torch.dot(x, basis) / (x.norm() * basis.norm()))
            out[b, space] = total / len(positions)
    return out


@pytest.mark.parametrize("impl", ["torch", "cpp", "triton"])
def test_every_backend_matches_the_fp64_loop(impl, monkeypatch):
    if impl == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreted kernel on a CPU
    if impl == "cpp" and not ops.cpp_available():
        pytest.skip(f"C++ op unavailable: {ops.cpp_unavailable_reason()}")
    model = tiny_model("llama", attn="eager").eval()
    enc = encode_responses(EXAMPLES, tiny_tokenizer(), max_length=32)
    batch = collate_responses(enc, [0, 1, 2], pad_id=0)
    want = _fp64_reference(model, batch)
    got = profile_response_deviations(model, enc, pad_id=0, batch_size=2, impl=impl)
    assert got.shape == (3, len(model.model.layers) + 1) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_a_row_without_a_response_token_is_named():
    model = tiny_model("llama")
    enc = encode_responses(EXAMPLES[:2], tiny_tokenizer(), max_length=32)
    batch = collate_responses(enc, [0, 1], pad_id=0)
    batch["labels"][1] = -100
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    with pytest.raises(ConfigError, match=r"rows \[1\] have no supervised response token"):
        response_deviations(hidden, batch["labels"], model)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_positions_are_read_in_place_or_gathered(impl, monkeypatch):
    """Contiguous states go to the kernel as a zero-batch-stride view of themselves (no copy); states whose
    rows are not evenly spaced are gathered; both give the fp64 loop's deviations."""
    import salf_engine.deviation.responses as responses_mod

    if impl == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    elif not ops.cpp_available():
        pytest.skip(f"C++ op unavailable: {ops.cpp_unavailable_reason()}")
    model = tiny_model("llama", attn="eager").eval()
    enc = encode_responses(EXAMPLES, tiny_tokenizer(), max_length=32)
    batch = collate_responses(enc, [0, 1, 2], pad_id=0)
    want = _fp64_reference(model, batch)
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states
    seen = []
    real = responses_mod.deviations
    monkeypatch.setattr(responses_mod, "deviations",
                        lambda states, *a, **k: seen.append(states) or real(states, *a, **k))
    got = response_deviations(hidden, batch["labels"], model, lens=model.model.norm, impl=impl)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    assert all(s.stride(0) == 0 and s.data_ptr() == h.data_ptr()
               for s, h in zip(seen[-1], hidden, strict=True))
    padded = [torch.nn.functional.pad(h, (0, 0, 0, 3))[:, : h.shape[1]] for h in hidden]  # rows 3 steps apart
    got = response_deviations(padded, batch["labels"], model, lens=model.model.norm, impl=impl)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    assert all(s.shape[1] == 1 and s.is_contiguous() for s in seen[-1])  # gathered [N, 1, D]
