"""Truncated runner: exact logits, exact suffix gradients, no backward / no activations below the cut."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from test_families import CASES, _batch
from tiny_models import tiny_model

from salf_engine.errors import ConfigError, UnsupportedArchitectureError
from salf_engine.runner.truncated import RunnerOutput, TruncatedRunner, last_token_index

M = 4  # tiny models have 4 decoder layers
ATTN_CASES = [
    (c, a) for c in CASES for a in ("eager", "sdpa") if not (CASES[c][0] == "gemma2" and a == "sdpa")
]


def _model(case: str, attn: str = "eager"):
    family, overrides = CASES[case]
    return tiny_model(family, attn=attn, **overrides)


def _params_by_name(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())


def _layer_prefix(k: int) -> str:
    return f"model.layers.{k}."


# ---------------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize(("case", "attn"), ATTN_CASES)
def test_logits_equal_model_at_every_depth(case, attn, padding_side):
    model = _model(case, attn)
    runner = TruncatedRunner(model)
    assert runner.num_layers == M
    ids, mask = _batch(padding_side)
    rows = torch.arange(ids.shape[0])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    last = last_token_index(mask, ids)
    for depth in range(M + 1):
        out_all = runner(ids, mask, depth=depth, logits="all")
        out_last = runner(ids, mask, depth=depth, logits="last")
        assert isinstance(out_all, RunnerOutput)
        torch.testing.assert_close(out_all.logits, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(out_last.logits, ref[rows, last], atol=1e-5, rtol=0)
        torch.testing.assert_close(out_all.last_hidden, out_last.last_hidden, atol=1e-5, rtol=0)
        assert out_last.logits.shape == (3, ref.shape[-1]) and out_last.deviations is None


def test_last_index_default_left_and_right_padding():
    ids, mask = _batch("left")
    assert last_token_index(mask, ids).tolist() == [13, 13, 13]
    ids, mask = _batch("right")
    assert last_token_index(mask, ids).tolist() == [13 - 5, 13, 13 - 2]
    assert last_token_index(None, ids).tolist() == [13, 13, 13]


def test_explicit_last_index_is_used():
    model = _model("llama")
    runner = TruncatedRunner(model)
    ids, mask = _batch("left")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    idx = torch.tensor([7, 3, 13])
    out = runner(ids, mask, depth=2, last_index=idx)
    torch.testing.assert_close(out.logits, ref[torch.arange(3), idx], atol=1e-5, rtol=0)


def test_head_runs_on_last_positions_only():
    model = _model("llama")
    runner = TruncatedRunner(model)
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    ids, mask = _batch("left")
    runner(ids, mask, depth=1)
    handle.remove()
    assert shapes == [(3, 64)]


@pytest.mark.parametrize("bad", [-1, M + 1, 1.5, True, "2"])
def test_depth_validation(bad):
    runner = TruncatedRunner(_model("llama"))
    ids, mask = _batch("left")
    with pytest.raises(ConfigError, match="depth"):
        runner(ids, mask, depth=bad)


def test_argument_validation():
    model = _model("llama")
    ids, mask = _batch("left")
    runner = TruncatedRunner(model)
    with pytest.raises(ConfigError, match="logits"):
        runner(ids, mask, depth=0, logits="every")
    with pytest.raises(ConfigError, match="lens"):
        TruncatedRunner(model, lens="tuned")
    with pytest.raises(ConfigError, match="metric"):
        TruncatedRunner(model, metric="l2")
    with pytest.raises(ConfigError, match="bases"):
        TruncatedRunner(model, bases=torch.randn(3, 7))
    with pytest.raises(ConfigError, match="train_embeddings"):
        runner(ids, mask, depth=1, train_embeddings=True)
    with pytest.raises(ConfigError, match="attention_mask"):
        runner(ids, mask[:, :-1], depth=0)
    with_bases = TruncatedRunner(model, bases=torch.randn(3, model.config.hidden_size))
    with pytest.raises(ConfigError, match="labels must index the 3 label bases"):
        with_bases(ids, mask, depth=0, labels=torch.full((ids.shape[0],), 3))


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama"):
        TruncatedRunner(gpt2)


def test_no_grad_call_builds_no_graph():
    runner = TruncatedRunner(_model("llama"))
    ids, mask = _batch("left")
    with torch.no_grad():
        out = runner(ids, mask, depth=0)
    assert not out.logits.requires_grad


# ------------------------------------------------------------------------------------------- gradients


def _loss(logits: torch.Tensor) -> torch.Tensor:
    targets = torch.arange(logits.shape[0]) * 7 + 5
    return F.cross_entropy(logits.float(), targets)


def _reference_grads(model, ids, mask, depth, trainable_names=None):
    """Full-graph reference: detached embeddings, prefix params requires_grad=False, plain model forward."""
    params = _params_by_name(model)
    frozen = [p for n, p in params.items() if any(n.startswith(_layer_prefix(i)) for i in range(depth))]
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in frozen:
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach()
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    _loss(logits[torch.arange(ids.shape[0]), last_token_index(mask, ids)]).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(flags[n])
    model.zero_grad(set_to_none=True)
    return grads


def _runner_grads(model, runner, ids, mask, depth, **kwargs):
    model.zero_grad(set_to_none=True)
    out = runner(ids, mask, depth=depth, **kwargs)
    _loss(out.logits if out.logits.dim() == 2 else out.logits[torch.arange(ids.shape[0]), -1]).backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in _params_by_name(model).items()}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(got, ref):
    assert got.keys() == ref.keys()
    for name in ref:
        if ref[name] is None:
            assert got[name] is None, f"{name} got a gradient but is below the cut"
        else:
            assert got[name] is not None, f"{name} has no gradient"
            torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_suffix_gradients_equal_full_graph_reference(case):
    model = _model(case)
    runner = TruncatedRunner(model)
    ids, mask = _batch("left")
    for depth in range(M + 1):
        ref = _reference_grads(model, ids, mask, depth)
        got = _runner_grads(model, runner, ids, mask, depth)
        _assert_same_grads(got, ref)
        # the prefix really is untouched and the suffix really trains
        for i in range(M):
            layer_grads = [g for n, g in got.items() if n.startswith(_layer_prefix(i))]
            assert all(g is None for g in layer_grads) == (i < depth)


def test_gradient_checkpointing_same_grads_and_prefix_not_recomputed():
    model = _model("gemma3_text")
    model.train()
    runner = TruncatedRunner(model)
    ids, mask = _batch("right")
    calls = [0] * M
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1))
    for depth in (0, 2, M):
        plain = _runner_grads(model, runner, ids, mask, depth)
        calls[:] = [0] * M
        ckpt = _runner_grads(model, runner, ids, mask, depth, gradient_checkpointing=True)
        _assert_same_grads(ckpt, plain)
        # frozen layers run once (never checkpointed), trained layers run again in backward
        assert calls == [1] * depth + [2] * (M - depth)


def test_hf_gradient_checkpointing_flag_is_honoured_not_doubled():
    model = _model("llama")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    runner = TruncatedRunner(model)
    ids, mask = _batch("left")
    calls = [0] * M
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1))
    depth = 2
    got = _runner_grads(model, runner, ids, mask, depth)
    assert calls == [1, 1, 2, 2]
    assert all(layer.gradient_checkpointing for layer in model.model.layers)  # restored after the call
    model.gradient_checkpointing_disable()
    model.eval()
    _assert_same_grads(got, _reference_grads(model, ids, mask, depth))


def test_train_embeddings_at_depth_zero_is_full_fine_tuning():
    model = _model("qwen2")
    runner = TruncatedRunner(model)
    ids, mask = _batch("left")
    got = _runner_grads(model, runner, ids, mask, 0, train_embeddings=True)
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask).logits
    _loss(logits[torch.arange(3), -1]).backward()
    ref = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    _assert_same_grads(got, ref)
    assert got["model.embed_tokens.weight"] is not None


# ------------------------------------------------------------------- no backward below the cut (hooks)


class _BackwardSpy:
    """Records which decoder layers run backward and which parameters receive a gradient."""

    def __init__(self, model, layers):
        self.layers: list[int] = []
        self.params: set[str] = set()
        self.handles = []
        for i, layer in enumerate(layers):
            hook = layer.register_full_backward_hook(lambda mod, gi, go, i=i: self.layers.append(i))
            self.handles.append(hook)
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.handles.append(p.register_hook(lambda g, name=name: self.params.add(name)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1])
    return None


def test_naive_freezing_falls_into_the_input_grad_trap():
    """Control: requires_grad=False + enable_input_require_grads backprops through frozen layers."""
    model = _model("llama")
    model.enable_input_require_grads()
    for p in model.model.layers[:2].parameters():
        p.requires_grad_(False)
    spy = _BackwardSpy(model, model.model.layers)
    ids, mask = _batch("left")
    model(ids, attention_mask=mask).logits[:, -1].sum().backward()
    assert 0 in spy.layers and 1 in spy.layers


@pytest.mark.parametrize("input_grads", [False, True], ids=["plain", "enable_input_require_grads"])
@pytest.mark.parametrize("case", ["llama", "gemma2", "qwen2-sliding"])
def test_no_frozen_layer_runs_backward(case, input_grads):
    model = _model(case)
    if input_grads:
        model.enable_input_require_grads()
    runner = TruncatedRunner(model)
    spy = _BackwardSpy(model, model.model.layers)
    ids, mask = _batch("right")
    for depth in range(M + 1):
        spy.layers.clear()
        spy.params.clear()
        model.zero_grad(set_to_none=True)
        _loss(runner(ids, mask, depth=depth).logits).backward()
        assert sorted(spy.layers) == list(range(depth, M))
        touched = {_layer_of(n) for n in spy.params} - {None}
        assert touched == set(range(depth, M))
        assert "model.embed_tokens.weight" not in spy.params or model.config.tie_word_embeddings
        for name, p in model.named_parameters():
            layer = _layer_of(name)
            if layer is not None and layer < depth:
                assert p.grad is None, name
    spy.remove()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("case", ["llama", "gemma3_text"])
def test_lora_peft_no_backward_below_cut_and_exact_grads(case, checkpointing):
    peft = pytest.importorskip("peft")
    model = _model(case)
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    # LoRA B matrices start at zero; give them values so the A-gradients are non-trivial
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    wrapped.enable_input_require_grads()  # the trap: PEFT / k-bit preparation does this
    if checkpointing:
        wrapped.train()
    runner = TruncatedRunner(wrapped)
    layers = model.model.layers
    spy = _BackwardSpy(wrapped, layers)
    ids, mask = _batch("left")
    lora = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    with torch.enable_grad():  # every LoRA weight frozen: nothing to train, no graph at all
        assert not runner(ids, mask, depth=M).logits.requires_grad
    for depth in (0, 1, 3):
        spy.layers.clear()
        spy.params.clear()
        wrapped.zero_grad(set_to_none=True)
        out = runner(ids, mask, depth=depth, gradient_checkpointing=checkpointing)
        _loss(out.logits).backward()
        if not checkpointing:  # full backward hooks and recomputation do not mix; param hooks suffice there
            assert sorted(spy.layers) == list(range(depth, M))
        assert {_layer_of(n) for n in spy.params} == set(range(depth, M))
        got = {n: None if p.grad is None else p.grad.clone() for n, p in lora.items()}
        # reference: full graph, prefix LoRA params frozen, embeddings detached
        wrapped.zero_grad(set_to_none=True)
        for n, p in lora.items():
            p.requires_grad_(_layer_of(n) >= depth)
        embeds = model.get_input_embeddings()(ids).detach()
        logits = wrapped(inputs_embeds=embeds, attention_mask=mask).logits
        _loss(logits[:, -1]).backward()
        for n, p in lora.items():
            if _layer_of(n) < depth:
                assert got[n] is None, n
            else:
                assert got[n] is not None, n
                torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
            p.requires_grad_(True)
    spy.remove()


# ---------------------------------------------------------------------------------- activation memory


def _saved_activation_bytes(model, fn) -> int:
    """Bytes of non-parameter tensors the autograd graph saves for backward during fn()."""
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in param_ptrs:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("case", ["llama", "gemma2", "mistral-sliding"])
def test_saved_activations_drop_with_the_cut(case):
    family, overrides = CASES[case]
    overrides = {k: (v * 2 if k == "layer_types" else v) for k, v in overrides.items()}
    model = tiny_model(family, num_layers=8, **overrides)
    model.enable_input_require_grads()
    runner = TruncatedRunner(model)
    m = runner.num_layers
    ids, mask = _batch("left", length=32)
    saved = {
        depth: _saved_activation_bytes(model, lambda depth=depth: runner(ids, mask, depth=depth))
        for depth in range(m + 1)
    }
    per_layer = saved[0] - saved[1]
    assert per_layer > 0
    for depth in range(m):
        # every frozen layer removes exactly one layer's worth of saved activations (the first trained layer
        # saves a little less than the others at every depth: its input is the detached cut)
        assert saved[depth] == saved[0] - depth * per_layer, saved
    # with every layer frozen only the norm + head on [B, D] rows remain
    assert saved[m] < per_layer / 10
    half = m // 2
    ckpt = _saved_activation_bytes(model, lambda: runner(ids, mask, depth=half, gradient_checkpointing=True))
    assert ckpt < saved[half] / 4


# ------------------------------------------------------------------------------------------ deviations


@pytest.mark.parametrize("lens", ["final_norm", "none", "raw"])  # raw: the 0.1 spelling of none
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("case", ["llama", "gemma2", "gemma3_text", "qwen2"])
def test_deviations_equal_independent_hidden_states_computation(case, padding_side, lens):
    model = _model(case)
    ids, mask = _batch(padding_side)
    gen = torch.Generator().manual_seed(3)
    bases = torch.randn(5, 64, generator=gen)
    labels = torch.tensor([4, 0, 2])
    runner = TruncatedRunner(model, bases=bases, lens=lens, deviation_impl="torch")
    with torch.no_grad():
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(hs) == M + 1
    rows, last = torch.arange(3), last_token_index(mask, ids)
    expected = torch.empty(3, M + 1)
    for k in range(M + 1):
        v = hs[k][rows, last]
        if k < M and lens == "final_norm":
            v = model.model.norm(v)
        expected[:, k] = 1 - F.cosine_similarity(v, bases[labels], dim=-1)
    for depth in range(M + 1):
        out = runner(ids, mask, depth=depth, labels=labels, logits="all" if depth % 2 else "last")
        assert out.deviations is not None and out.deviations.dtype == torch.float32
        assert out.deviations.shape == (3, M + 1) and not out.deviations.requires_grad
        torch.testing.assert_close(out.deviations, expected, atol=1e-5, rtol=0)
    assert runner(ids, mask, depth=1).deviations is None  # no labels -> no deviations
    assert TruncatedRunner(model)(ids, mask, depth=1, labels=labels).deviations is None  # no bases


def test_deviations_do_not_change_gradients():
    model = _model("llama")
    ids, mask = _batch("left")
    plain = _runner_grads(model, TruncatedRunner(model), ids, mask, 2)
    with_dev = _runner_grads(
        model, TruncatedRunner(model, bases=torch.randn(3, 64), deviation_impl="torch"), ids, mask, 2,
        labels=torch.tensor([0, 1, 2]),
    )
    _assert_same_grads(with_dev, plain)


@pytest.mark.parametrize("metric", ["ce", "rank"])
def test_deviation_metric_and_default_impl_pass_through(metric):
    dev = importlib.import_module("salf_engine.deviation.compute")
    model = _model("gemma3_text")
    ids, mask = _batch("right")
    bases = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([3, 1, 0])
    with torch.no_grad():
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    expected = dev.deviations_reference(
        list(hs), last_token_index(mask, ids), labels, bases, lens=model.model.norm, metric=metric
    )
    out = TruncatedRunner(model, bases=bases, metric=metric)(ids, mask, depth=2, labels=labels)  # impl="auto"
    torch.testing.assert_close(out.deviations, expected, atol=1e-4, rtol=0)
