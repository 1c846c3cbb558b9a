"""Deviations, gains and eof-layers against loop-based per-sample, per-layer implementations."""

from __future__ import annotations

import copy
import importlib
import math
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, tiny_model
from torch import nn
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from salf_engine.deviation.compute import deviations, deviations_reference, eof_layers, gains
from salf_engine.deviation.contract import LENS_CODES, METRIC_CODES
from salf_engine.deviation.semantics import LensSpec, lens_spec, semantic_bases
from salf_engine.errors import SalfError

METRICS = ("cosine", "ce", "rank")
dev_mod = importlib.import_module("salf_engine.deviation.compute")

# --------------------------------------------------------------------------- independent loop reference


def loop_deviations(states, last_index, labels, bases, norm, metric, dtype=torch.float32):
    """One sample, one space at a time, in `dtype` arithmetic, with the real norm module."""
    norm = None if norm is None else copy.deepcopy(norm).to(dtype)
    num_spaces = len(states)
    out = torch.empty(states[0].shape[0], num_spaces, dtype=torch.float64)
    for i in range(states[0].shape[0]):
        y = int(labels[i])
        for k in range(num_spaces):
            h = states[k][i, int(last_index[i])].to(dtype)
            if norm is not None and k < num_spaces - 1:
                with torch.no_grad():
                    h = norm(h.unsqueeze(0)).squeeze(0)
            cos = [F.cosine_similarity(h, bases[j].to(dtype), dim=0) for j in range(bases.shape[0])]
            if metric == "cosine":
                out[i, k] = float(1 - cos[y])
            elif metric == "ce":
                lse = torch.logsumexp(torch.stack(cos), dim=0)
                out[i, k] = float(lse - cos[y])
            else:
                out[i, k] = 1 + sum(float(c) > float(cos[y]) for c in cos)
    return out.float()


def make_norm(kind: str, dim: int) -> nn.Module | None:
    if kind == "none":
        return None
    norm = {"llama": LlamaRMSNorm, "gemma2": Gemma2RMSNorm, "layernorm": nn.LayerNorm}[kind](dim)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (0.0 if kind == "gemma2" else 1.0))
    return norm


def make_inputs(batch, seq, dim, num_layers, num_labels, *, padding="right", layout="contiguous"):
    """Random states (with the requested memory layout), last_index for the padding side, labels, bases."""
    states = []
    for _ in range(num_layers + 1):
        if layout == "transposed":  # [T, B, D] storage viewed as [B, T, D]
            h = (torch.randn(seq, batch, dim) * 2 + 0.3).transpose(0, 1)
        elif layout == "strided":  # every other feature and every other step of a bigger buffer
            h = (torch.randn(batch, 2 * seq, 2 * dim) * 2 + 0.3)[:, ::2, 1::2]
        elif layout == "channels_first":  # [B, D, T] storage
            h = (torch.randn(batch, dim, seq) * 2 + 0.3).transpose(1, 2)
        else:
            h = torch.randn(batch, seq, dim) * 2 + 0.3
        states.append(h)
    if padding == "left":
        last_index = torch.full((batch,), seq - 1)
    else:
        last_index = torch.randint(0, seq, (batch,))
    labels = torch.randint(0, num_labels, (batch,))
    bases = torch.randn(num_labels, dim)
    return states, last_index, labels, bases


# --------------------------------------------------------------------------- reference vs loops


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("norm_kind", ["none", "llama", "gemma2", "layernorm"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_reference_matches_loops(metric, norm_kind, padding):
    states, last_index, labels, bases = make_inputs(5, 9, 24, 3, 6, padding=padding)
    norm = make_norm(norm_kind, 24)
    out = deviations_reference(states, last_index, labels, bases, lens=norm, metric=metric)
    assert out.dtype == torch.float32 and out.shape == (5, 4)
    torch.testing.assert_close(out, loop_deviations(states, last_index, labels, bases, norm, metric))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("layout", ["transposed", "strided", "channels_first"])
def test_reference_non_contiguous_inputs(metric, layout):
    states, last_index, labels, bases = make_inputs(4, 7, 10, 2, 3, layout=layout)
    assert not any(h.is_contiguous() for h in states)
    bases_nc = bases.T.contiguous().T
    norm = make_norm("llama", 10)
    out = deviations_reference(states, last_index, labels, bases_nc, lens=norm, metric=metric)
    torch.testing.assert_close(out, loop_deviations(states, last_index, labels, bases, norm, metric))


@pytest.mark.parametrize(
    ("batch", "dim", "num_layers", "num_labels"),
    [(1, 7, 1, 2), (3, 13, 1, 2), (1, 5, 4, 9), (6, 33, 2, 2)],
)
@pytest.mark.parametrize("metric", METRICS)
def test_reference_odd_shapes(batch, dim, num_layers, num_labels, metric):
    states, last_index, labels, bases = make_inputs(batch, 3, dim, num_layers, num_labels)
    norm = make_norm("gemma2", dim)
    out = deviations_reference(states, last_index, labels, bases, lens=norm, metric=metric)
    assert out.shape == (batch, num_layers + 1)
    torch.testing.assert_close(out, loop_deviations(states, last_index, labels, bases, norm, metric))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["cosine", "ce"])
def test_reference_low_precision_three_way_rule(dtype, metric):
    """|out - ref| <= 2 |out_pt - ref| + atol (ref: fp32 on the fp32 data; out_pt: loops in `dtype`)."""
    states32, last_index, labels, bases = make_inputs(6, 5, 40, 3, 5)
    norm = make_norm("llama", 40)
    states = [h.to(dtype) for h in states32]
    out = deviations_reference(states, last_index, labels, bases, lens=norm, metric=metric)
    ref = loop_deviations(states32, last_index, labels, bases, norm, metric)
    out_pt = loop_deviations(states, last_index, labels, bases, norm, metric, dtype=dtype)
    assert ((out - ref).abs() <= 2 * (out_pt - ref).abs() + 1e-5).all()
    # and on exactly the low-precision values, the fp32 computation is exact up to fp32 rounding
    upcast = [h.float() for h in states]
    torch.testing.assert_close(out, loop_deviations(upcast, last_index, labels, bases, norm, metric))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision_rank(dtype):
    states, last_index, labels, bases = make_inputs(6, 5, 40, 3, 5)
    states = [h.to(dtype) for h in states]
    norm = make_norm("gemma2", 40)
    out = deviations_reference(states, last_index, labels, bases, lens=norm, metric="rank")
    upcast = [h.float() for h in states]
    torch.testing.assert_close(out, loop_deviations(upcast, last_index, labels, bases, norm, "rank"))


def test_ce_and_rank_hand_example():
    """Two labels along e0 and e1; a state at 45 degrees + a bit towards e1."""
    bases = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    states = [torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[1.0, 3.0]]])]  # two spaces, B = T = 1, D = 2
    last, labels = torch.tensor([0]), torch.tensor([0])
    c0 = 1 / math.sqrt(2)
    c1 = (1 / math.sqrt(10), 3 / math.sqrt(10))
    cos = deviations_reference(states, last, labels, bases, metric="cosine")
    torch.testing.assert_close(cos, torch.tensor([[1 - c0, 1 - c1[0]]]))
    ce = deviations_reference(states, last, labels, bases, metric="ce")
    expected_ce = [math.log(2.0), math.log(math.exp(c1[0]) + math.exp(c1[1])) - c1[0]]
    torch.testing.assert_close(ce, torch.tensor([expected_ce]))
    rank = deviations_reference(states, last, labels, bases, metric="rank")
    assert rank.tolist() == [[1.0, 2.0]]  # a tie counts as rank 1; a strictly larger cosine pushes it down


def test_lens_spec_and_module_and_raw_agree():
    states, last_index, labels, bases = make_inputs(3, 4, 12, 2, 4)
    for kind in ("llama", "gemma2", "layernorm"):
        norm = make_norm(kind, 12)
        by_module = deviations_reference(states, last_index, labels, bases, lens=norm, metric="ce")
        by_spec = deviations_reference(states, last_index, labels, bases, lens=lens_spec(norm), metric="ce")
        torch.testing.assert_close(by_spec, by_module)
    raw = deviations_reference(states, last_index, labels, bases, lens="none")
    torch.testing.assert_close(raw, deviations_reference(states, last_index, labels, bases, lens=None))
    torch.testing.assert_close(raw, loop_deviations(states, last_index, labels, bases, None, "cosine"))


def test_last_space_is_not_normed_again():
    states, last_index, labels, bases = make_inputs(2, 3, 8, 2, 3)
    norm = make_norm("layernorm", 8)
    out = deviations_reference(states, last_index, labels, bases, lens=norm)
    unlensed = deviations_reference(states, last_index, labels, bases, lens=None)
    torch.testing.assert_close(out[:, -1], unlensed[:, -1])
    assert not torch.allclose(out[:, :-1], unlensed[:, :-1])


def test_reference_is_detached():
    states, last_index, labels, bases = make_inputs(2, 3, 8, 2, 3)
    states = [h.requires_grad_() for h in states]
    assert not deviations_reference(states, last_index, labels, bases).requires_grad


# --------------------------------------------------------------------------- real model hidden states


def _randomize_final_norm(model):
    norm = model.model.norm
    with torch.no_grad():
        norm.weight.copy_(
            torch.randn_like(norm.weight) * 0.5 + (0.0 if "Gemma" in type(norm).__name__ else 1.0)
        )
    return norm


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_hidden_states_indexing(family):
    model = tiny_model(family, num_layers=3)
    norm = _randomize_final_norm(model)
    layer_out = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, i=i: layer_out.__setitem__(i, out))
        for i, layer in enumerate(model.model.layers)
    ]
    ids = torch.randint(4, 120, (3, 6))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    m = len(model.model.layers)
    assert len(hidden) == m + 1
    for k in range(1, m):  # space k = output of layers[k-1]
        torch.testing.assert_close(hidden[k], layer_out[k - 1])
    with torch.no_grad():  # space m = final norm of the last layer's output: already normed
        torch.testing.assert_close(hidden[m], norm(layer_out[m - 1]))
    last_index = torch.tensor([5, 3, 0])
    labels = torch.tensor([0, 2, 1])
    bases = semantic_bases(model, [10, 20, 30])
    for metric in METRICS:
        out = deviations_reference(hidden, last_index, labels, bases, lens=norm, metric=metric)
        torch.testing.assert_close(out, loop_deviations(hidden, last_index, labels, bases, norm, metric))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_left_and_right_padding_give_the_unpadded_deviations(family):
    """Same samples padded either side: the gather at last_index must pick the medium token."""
    model = tiny_model(family, num_layers=2)
    norm = _randomize_final_norm(model)
    bases = semantic_bases(model, [10, 20, 30])
    seqs = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23]]
    labels = torch.tensor([2, 0, 1])
    width = max(map(len, seqs))
    single = []
    with torch.no_grad():
        for seq, y in zip(seqs, labels, strict=True):
            hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
            single.append(deviations_reference(hs, [len(seq) - 1], [int(y)], bases, lens=norm))
    expected = torch.cat(single)
    for side in ("left", "right"):
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[i, span] = torch.tensor(seq)
            mask[i, span] = 1
        last_index = (mask * torch.arange(width)).argmax(dim=1)
        position_ids = (mask.cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            hs = model(
                ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True
            ).hidden_states
        out = deviations_reference(hs, last_index, labels, bases, lens=norm)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- bad inputs


def _good():
    return make_inputs(2, 4, 6, 2, 3)


def test_bad_inputs():
    """One input check (`deviation_contract.check_deviation_inputs`) for the reference and the dispatcher."""
    states, last, labels, bases = _good()
    cases = [
        (([states[0], states[1][:1], states[2]], last, labels, bases), {}, r"expected \[B=2, T, D=6\]"),
        (([states[0], states[1], torch.randn(2, 4, 5)], last, labels, bases), {}, r"D=6\] like state 0"),
        ((states[:1], last, labels, bases), {}, r"m\+1 >= 2"),
        ((states[0], last, labels, bases), {}, "must be a list"),
        (([states[0], states[1].long()], last, labels, bases), {}, "floating point"),
        (([states[0], torch.randn(2, 4)], last, labels, bases), {}, r"\[B, T, D\]"),
        ((states, torch.tensor([0, 4]), labels, bases), {}, "last_index 4 is outside"),
        ((states, torch.tensor([-1, 0]), labels, bases), {}, "last_index -1"),
        (([states[0], states[1][:, :2]], torch.tensor([0, 3]), labels, bases), {}, r"0\.\.T-1 = 0\.\.1"),
        ((states, torch.tensor([0, 1, 2]), labels, bases), {}, "last_index must have shape"),
        ((states, torch.tensor([0.0, 1.0]), labels, bases), {}, "integer tensor"),
        ((states, last, torch.tensor([0, 3]), bases), {}, "label index 3"),
        ((states, last, torch.tensor([-1, 0]), bases), {}, "label index -1"),
        ((states, last, labels, torch.randn(3, 5)), {}, "bases have D = 5"),
        ((states, last, labels, torch.randn(3)), {}, r"\[K, D\]"),
        ((states, last, labels, torch.randn(0, 6)), {}, "K = 0"),
        ((states, last, labels, bases), {"metric": "l2"}, "unknown deviation metric"),
        ((states, last, labels, bases), {"lens": LensSpec("rms", torch.ones(5))}, "lens has dimension 5"),
        ((states, last, labels, bases), {"lens": "final"}, "unknown lens"),
        ((states, last, labels, bases), {"lens": 3}, "cannot use"),
        # device mismatches (meta tensors stand in for a second device)
        ((states, last, labels, bases.to("meta")), {}, "bases are on meta"),
        (([states[0], states[1].to("meta")], last, labels, bases), {}, "state 1 is on meta"),
        ((states, last.to("meta"), labels, bases), {}, "last_index is on meta"),
        ((states, last, labels.to("meta"), bases), {}, "labels is on meta"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(SalfError, match=match):
            deviations_reference(*args, **kwargs)
        with pytest.raises(SalfError, match=match):
            deviations(*args, impl="torch", **kwargs)


def test_unknown_impl():
    with pytest.raises(SalfError, match="unknown deviation impl"):
        deviations(*_good(), impl="numpy")


def test_lists_are_accepted_for_indices():
    states, last, labels, bases = _good()
    out = deviations_reference(states, last.tolist(), labels.tolist(), bases)
    torch.testing.assert_close(out, deviations_reference(states, last, labels, bases))


# --------------------------------------------------------------------------- dispatcher


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(dev_mod, "_WARNED", set())


def _fake_module(name: str, attr: str, calls: list, *, cpp_available: bool | None = None):
    """A stand-in kernel module whose entry point (over checked inputs) records what the dispatcher hands
    it: (module, states, last_index, labels, bases, lens kind, lens weight, metric code)."""
    module = types.ModuleType(name)

    def kernel(inp, *args, **kwargs):
        calls.append((name, inp.views, inp.last_index, inp.labels, inp.bases, inp.lens_kind, inp.weight,
                      inp.metric))
        return torch.full((inp.batch, inp.n_spaces), 7.0)

    setattr(module, attr, kernel)
    if cpp_available is not None:
        module.cpp_available = lambda: cpp_available
    return module


def _install(monkeypatch, *, triton=None, ops=None):
    monkeypatch.setitem(sys.modules, "salf_engine.kernels.deviation", triton)
    monkeypatch.setitem(sys.modules, "salf_engine.deviation.cpp_op", ops)


def test_auto_falls_back_to_torch_when_kernels_are_missing(monkeypatch, fresh_warnings):
    _install(monkeypatch, triton=None, ops=None)  # None in sys.modules -> ImportError on import
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    states, last, labels, bases = _good()
    norm = make_norm("llama", 6)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        out = deviations(states, last, labels, bases, lens=norm, metric="ce")
    torch.testing.assert_close(out, loop_deviations(states, last, labels, bases, norm, "ce"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        deviations(states, last, labels, bases, lens=norm, metric="ce")
    for impl in ("triton", "cpp"):
        with pytest.raises(SalfError, match=f"impl='{impl}' was requested"):
            deviations(states, last, labels, bases, impl=impl)


def test_auto_picks_triton_under_the_interpreter(monkeypatch, fresh_warnings):
    calls: list = []
    _install(
        monkeypatch,
        triton=_fake_module("salf_engine.kernels.deviation", "launch_deviations", calls),
        ops=_fake_module("salf_engine.deviation.cpp_op", "run_checked", calls, cpp_available=True),
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    states, last, labels, bases = _good()
    norm = make_norm("gemma2", 6)
    out = deviations(states, last.int(), labels.tolist(), bases.double(), lens=norm, metric="rank")
    assert torch.equal(out, torch.full((2, 3), 7.0))
    name, k_states, k_last, k_labels, k_bases, k_lens, k_weight, k_metric = calls[-1]
    assert name == "salf_engine.kernels.deviation" and k_metric == METRIC_CODES["rank"]
    assert len(k_states) == 3 and all(
        a is b or torch.equal(a, b) for a, b in zip(k_states, states, strict=True)
    )
    assert (
        k_last.dtype == torch.long and k_labels.dtype == torch.long and k_labels.tolist() == labels.tolist()
    )
    assert k_bases.dtype == torch.float32 and k_bases.is_contiguous()
    assert k_lens == LENS_CODES["rms"]  # gemma2's norm scales by 1 + w
    torch.testing.assert_close(k_weight, norm.weight.detach() + 1.0)


def test_auto_picks_cpp_without_interpreter_then_torch(monkeypatch, fresh_warnings):
    calls: list = []
    triton_mod = _fake_module("salf_engine.kernels.deviation", "launch_deviations", calls)
    _install(
        monkeypatch,
        triton=triton_mod,
        ops=_fake_module("salf_engine.deviation.cpp_op", "run_checked", calls, cpp_available=True),
    )
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    states, last, labels, bases = _good()
    deviations(states, last, labels, bases)
    assert calls[-1][0] == "salf_engine.deviation.cpp_op" and calls[-1][5] == LENS_CODES["none"]
    # the C++ op not built: auto silently uses torch, an explicit request is an error
    _install(
        monkeypatch,
        triton=triton_mod,
        ops=_fake_module("salf_engine.deviation.cpp_op", "run_checked", calls, cpp_available=False),
    )
    n_calls = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = deviations(states, last, labels, bases)
    assert len(calls) == n_calls
    torch.testing.assert_close(out, loop_deviations(states, last, labels, bases, None, "cosine"))
    with pytest.raises(SalfError, match="not built"):
        deviations(states, last, labels, bases, impl="cpp")
    with pytest.raises(SalfError, match="needs CUDA tensors"):
        deviations(states, last, labels, bases, impl="cuda")
    with pytest.raises(SalfError, match="TRITON_INTERPRET"):
        deviations(states, last, labels, bases, impl="triton")


def test_auto_uses_torch_for_a_norm_kernels_cannot_fold(monkeypatch, fresh_warnings):
    calls: list = []
    _install(
        monkeypatch,
        triton=_fake_module("salf_engine.kernels.deviation", "launch_deviations", calls),
        ops=None,
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    states, last, labels, bases = _good()
    odd = nn.Tanh()  # not a norm: the reference applies it as is, kernels cannot fold it
    with pytest.warns(RuntimeWarning, match="unknown norm type"):
        out = deviations(states, last, labels, bases, lens=odd)
    assert not calls
    torch.testing.assert_close(out, loop_deviations(states, last, labels, bases, odd, "cosine"))
    with pytest.raises(SalfError, match="unknown norm type"):
        deviations(states, last, labels, bases, lens=odd, impl="triton")


def test_explicit_torch_never_touches_kernels(monkeypatch, fresh_warnings):
    calls: list = []
    _install(
        monkeypatch,
        triton=_fake_module("salf_engine.kernels.deviation", "launch_deviations", calls),
        ops=_fake_module("salf_engine.deviation.cpp_op", "run_checked", calls, cpp_available=True),
    )
    states, last, labels, bases = _good()
    out = deviations(states, last, labels, bases, impl="torch", metric="rank")
    assert not calls
    torch.testing.assert_close(out, loop_deviations(states, last, labels, bases, None, "rank"))


@pytest.mark.parametrize("impl", ["triton", "cpp"])
@pytest.mark.parametrize("metric", METRICS)
def test_real_kernels_through_the_dispatcher(impl, metric, monkeypatch):
    """When the real kernels are importable (triton interpreter on CPU, built C++ op), they match loops."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        module = importlib.import_module(
            "salf_engine.kernels.deviation" if impl == "triton" else "salf_engine.deviation.cpp_op"
        )
    except ImportError as exc:
        pytest.skip(f"{impl} kernel not importable: {exc}")
    if impl == "cpp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not module.cpp_available():
                pytest.skip("C++ op not built")
    states, last, labels, bases = make_inputs(3, 5, 24, 2, 4, layout="transposed")
    norm = make_norm("gemma2", 24)
    out = deviations(states, last, labels, bases, lens=norm, metric=metric, impl=impl)
    torch.testing.assert_close(out, loop_deviations(states, last, labels, bases, norm, metric))


# --------------------------------------------------------------------------- gains / eof


def test_gains_hand_example():
    dev = torch.tensor([[1.0, 0.75, 0.25, 0.5], [0.5, 0.5, 0.5, 0.0]])
    torch.testing.assert_close(gains(dev), torch.tensor([[0.25, 0.5, -0.25], [0.0, 0.0, 0.5]]))


@pytest.mark.parametrize(
    ("dev", "trainable"),
    [
        ([1.0, 0.8, 0.3, 0.2], 1),  # gains .2 .5 .1
        ([1.0, 0.5, 0.0, 0.0], 0),  # tie .5 .5 at 0 and 1 -> first
        ([1.0, 1.0, 0.5, 0.0, 0.0], 1),  # gains 0 .5 .5 0 -> first of the tie is 1
        ([1.0, 0.75, 0.5, 0.5, 0.25], 0),  # gains .25 .25 0 .25 -> 0
        ([0.4, 0.4, 0.4, 0.4], 0),  # all zero gains
        ([1.0, 0.9, 0.8, 0.1], 2),  # last layer: trainable depth m-1, frozen depth m
        ([0.2, 0.5, 0.9], 0),  # all negative gains: least bad is the first
        ([0.9, 0.95, 0.5], 1),  # gains -.05 .45
        ([0.3, 0.1], 0),  # m = 1
    ],
)
def test_eof_hand_examples(dev, trainable):
    t = torch.tensor([dev])
    m = len(dev) - 1
    depth = eof_layers(t)
    assert depth.dtype == torch.int64 and depth.tolist() == [trainable]
    assert eof_layers(t, boundary="frozen").tolist() == [min(trainable + 1, m)]


def test_eof_ties_first_index_against_python_loop():
    torch.manual_seed(3)
    dev = torch.randint(0, 4, (200, 9)).float() / 4  # many exact ties among the gains
    g = gains(dev)
    expected = []
    for row in g.tolist():
        best = max(row)
        expected.append(next(i for i, v in enumerate(row) if v == best))
    assert eof_layers(dev).tolist() == expected
    assert eof_layers(dev, boundary="frozen").tolist() == [e + 1 for e in expected]


def test_eof_of_reference_deviations_runs_end_to_end():
    states, last, labels, bases = make_inputs(4, 3, 8, 5, 3)
    dev = deviations_reference(states, last, labels, bases)
    eof = eof_layers(dev)
    assert eof.shape == (4,) and ((eof >= 0) & (eof < 5)).all()
    g = dev[:, :-1] - dev[:, 1:]
    assert torch.equal(g.gather(1, eof[:, None]).squeeze(1), g.max(dim=1).values)


def test_gains_eof_bad_inputs():
    with pytest.raises(SalfError, match=r"\[B, m\+1\]"):
        gains(torch.zeros(4))
    with pytest.raises(SalfError, match="at least 2"):
        eof_layers(torch.zeros(3, 1))
    with pytest.raises(SalfError, match="unknown eof boundary"):
        eof_layers(torch.zeros(2, 3), boundary="middle")
    with pytest.raises(SalfError, match="NaN"):
        eof_layers(torch.tensor([[0.1, float("nan"), 0.2]]))


def test_backend_table_covers_every_impl():
    assert set(dev_mod.BACKENDS) == set(dev_mod.IMPLS) - {"auto"}
    assert dev_mod.AUTO_ORDER[-1] == "torch" and set(dev_mod.AUTO_ORDER) <= set(dev_mod.BACKENDS)


def test_auto_falls_back_once_for_inputs_no_kernel_takes(monkeypatch, fresh_warnings):
    """float64 states: auto says once why the kernel is skipped and computes in torch; an explicit kernel
    request raises with the same reason."""
    calls: list = []
    _install(
        monkeypatch,
        triton=_fake_module("salf_engine.kernels.deviation", "launch_deviations", calls),
        ops=_fake_module("salf_engine.deviation.cpp_op", "run_checked", calls, cpp_available=True),
    )
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    states, last, labels, bases = _good()
    states64 = [s.double() for s in states]
    with pytest.warns(RuntimeWarning, match="float32, bfloat16 or float16") as record:
        out = deviations(states64, last, labels, bases)
    assert len([w for w in record if "kernel is unavailable" in str(w.message)]) == 1
    assert calls == []
    torch.testing.assert_close(out, deviations_reference(states64, last, labels, bases))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deviations(states64, last, labels, bases)
    with pytest.raises(SalfError, match="impl='cpp' was requested but the kernels take float32"):
        deviations(states64, last, labels, bases, impl="cpp")


@pytest.mark.parametrize("impl", ["triton", "cpp"])
def test_the_dispatcher_checks_the_inputs_once(impl, monkeypatch):
    """One deviations() call runs the input check once, whichever kernel runs (the kernel gets the checked
    inputs through contract.for_kernel, never its own public entry)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = importlib.import_module("salf_engine.kernels.deviation" if impl == "triton"
                                     else "salf_engine.deviation.cpp_op")
    if impl == "cpp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not module.cpp_available():
                pytest.skip("C++ op not built")
    import salf_engine.deviation.contract as contract

    calls = []
    real = contract.check_deviation_inputs

    def counted(*args, **kwargs):
        calls.append(kwargs.get("kernel", True))
        return real(*args, **kwargs)

    for mod in (dev_mod, module):
        monkeypatch.setattr(mod, "check_deviation_inputs", counted)
    states, last, labels, bases = make_inputs(2, 3, 16, 2, 3, layout="transposed")
    norm = make_norm("llama", 16)
    out = deviations(states, last, labels, bases, lens=norm, impl=impl)
    assert len(calls) == 1
    torch.testing.assert_close(out, loop_deviations(states, last, labels, bases, norm, "cosine"))
