"""Per-row cuts: one forward in which every row has its own depth.

Oracle: the plain HF forward of each row alone, with a forward hook that detaches the output of the
row's last frozen layer (or of the embedding at depth 0): exactly "backward stops at the row's cut".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_families import CASES, _batch
from tiny_models import tiny_model

from salf_engine.errors import ConfigError
from salf_engine.runner.truncated import TruncatedRunner, last_token_index

M = 4
TARGETS = torch.tensor([7, 11, 23])


def _model(case: str):
    family, overrides = CASES[case]
    return tiny_model(family, attn="eager", **overrides)


def _detach_output(module, args, output):
    if isinstance(output, tuple):
        return (output[0].detach(), *output[1:])
    return output.detach()


def _oracle_grads(model, base, ids, mask, depths):
    """Sum over rows of the row's loss, each row alone through the HF model, cut by a detaching hook."""
    model.zero_grad(set_to_none=True)
    last = last_token_index(mask, ids)
    logits_rows = []
    for r, depth in enumerate(depths):
        where = base.model.embed_tokens if depth == 0 else base.model.layers[depth - 1]
        hook = where.register_forward_hook(_detach_output)
        try:
            logits = model(ids[r : r + 1], attention_mask=mask[r : r + 1]).logits[0, last[r]]
        finally:
            hook.remove()
        F.cross_entropy(logits[None], TARGETS[r : r + 1], reduction="sum").backward()
        logits_rows.append(logits.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack(logits_rows), grads


def _runner_grads(model, runner, ids, mask, depths):
    model.zero_grad(set_to_none=True)
    out = runner(ids, mask, depth=torch.tensor(depths))
    F.cross_entropy(out.logits, TARGETS, reduction="sum").backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _assert_same(got, want):
    (logits, grads), (ref_logits, ref_grads) = got, want
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert set(grads) == set(ref_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("depths", [[3, 0, 1], [1, 4, 1], [0, 2, 4]])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_per_row_cuts_equal_each_row_cut_alone(case, padding_side, depths):
    model = _model(case)
    ids, mask = _batch(padding_side)
    want = _oracle_grads(model, model, ids, mask, depths)
    got = _runner_grads(model, TruncatedRunner(model), ids, mask, depths)
    _assert_same(got, want)
    # layers below every row's cut get no gradient at all
    for name in got[1]:
        if name.startswith("model.layers."):
            assert int(name.split(".")[2]) >= min(depths), name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_per_row_cuts_with_lora(checkpointing):
    peft = pytest.importorskip("peft")
    base = _model("llama")
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.enable_input_require_grads()  # the hook that makes a naive freeze backprop everywhere
    ids, mask = _batch("left")
    depths = [2, 0, 3]
    want = _oracle_grads(model, base, ids, mask, depths)
    runner = TruncatedRunner(model)
    model.zero_grad(set_to_none=True)
    out = runner(ids, mask, depth=depths, gradient_checkpointing=checkpointing)
    F.cross_entropy(out.logits, TARGETS, reduction="sum").backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    _assert_same((out.logits.detach(), grads), want)
    assert grads and all("lora_" in n for n in grads)


def test_backward_runs_per_layer_exactly_the_rows_at_or_above_their_cut():
    model = _model("llama")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 60, (6, 9), generator=gen)
    mask = torch.ones_like(ids)
    depths = [4, 1, 0, 3, 1, 2]
    rows_in_backward: dict[int, list[int]] = {}
    hooks = [layer.register_full_backward_hook(
        lambda mod, gin, gout, i=i: rows_in_backward.setdefault(i, []).append(gout[0].shape[0]))
        for i, layer in enumerate(model.model.layers)]
    out = TruncatedRunner(model)(ids, mask, depth=depths)
    out.logits.sum().backward()
    for hook in hooks:
        hook.remove()
    # layer i runs backward once, over the rows whose depth is at most i: 1, 3, 4, 5 rows
    assert rows_in_backward == {i: [sum(d <= i for d in depths)] for i in range(M)}


def test_no_activation_of_a_frozen_row_is_kept():
    model = _model("llama")
    ids = torch.randint(4, 60, (4, 9), generator=torch.Generator().manual_seed(4))
    params = {p.data_ptr() for p in model.parameters()}
    saved_rows: list[int] = []

    def pack(t):
        if t.data_ptr() not in params and t.dim() >= 3 and t.shape[-2:] == (9, 64):
            saved_rows.append(t.shape[0])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        TruncatedRunner(model)(ids, None, depth=[4, 4, 4, 3])
    # only the one row that trains layer 3 is saved for backward
    assert saved_rows and set(saved_rows) == {1}


def test_deviations_and_outputs_keep_the_input_row_order():
    model = _model("qwen2")
    ids, mask = _batch("left")
    bases = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    runner = TruncatedRunner(model, bases=bases)
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        ref = runner(ids, mask, depth=0, labels=labels, logits="all")
        got = runner(ids, mask, depth=[1, 4, 2], labels=labels, logits="all")
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.last_hidden, ref.last_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.deviations, ref.deviations, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("depth", "message"), [
    ([1, 2], "2 entries for a batch of 3"),
    ([0, 5, 1], "depth 5 is out of range"),
    (torch.tensor([0.0, 1.0, 2.0]), "integer tensor"),
    ([0, True, 1], "one such int per row"),
])
def test_bad_per_row_depths_are_named(depth, message):
    model = _model("llama")
    ids, mask = _batch("left")
    with pytest.raises(ConfigError, match=message):
        TruncatedRunner(model)(ids, mask, depth=depth)
    with pytest.raises(ConfigError, match="train_embeddings needs depth 0"):
        TruncatedRunner(model)(ids, mask, depth=[0, 1, 0], train_embeddings=True)
