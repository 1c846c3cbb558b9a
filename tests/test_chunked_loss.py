"""The chunked linear + cross-entropy equals the plain loss (values and gradients), never holds more than one
chunk of logits, and refuses bad input with a named error."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from salf_engine.errors import ConfigError
from salf_engine.runner.chunked_loss import head_cross_entropy, linear_cross_entropy


def _inputs(shape=(3, 7), d=5, v=11, dtype=torch.float64, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, shape, generator=g)
    targets.view(-1)[::3] = -100  # every third position unsupervised (prompt, padding)
    return hidden, weight, b, targets


def _plain(hidden, weight, bias, targets, reduction):
    logits = F.linear(hidden, weight, bias)
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1), reduction=reduction)
    return loss.reshape(targets.shape) if reduction == "none" else loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 4, 5, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_the_plain_loss_and_its_gradients_in_fp64(reduction, chunk, bias):
    hidden, weight, b, targets = _inputs(bias=bias)
    got = linear_cross_entropy(hidden, weight, targets, bias=b, reduction=reduction, chunk_size=chunk)
    params = [hidden, weight] + ([b] if bias else [])
    grads = torch.autograd.grad(got.sum() if reduction == "none" else got, params)
    want = _plain(hidden, weight, b, targets, reduction)
    want_grads = torch.autograd.grad(want.sum() if reduction == "none" else want, params)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_hand_computed_value():
    # one position, logits [0, ln 3] -> softmax [1/4, 3/4]; target 0 -> loss ln 4
    hidden = torch.tensor([[1.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64)
    loss = linear_cross_entropy(hidden, weight, torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(4.0), abs=1e-12)


def test_bf16_states_take_the_softmax_in_fp32():
    hidden, weight, _, targets = _inputs(shape=(2, 9), d=16, v=37, dtype=torch.float32, seed=3)
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    got = linear_cross_entropy(h16, w16, targets, chunk_size=4)
    want = F.cross_entropy(F.linear(h16, w16).float().reshape(-1, 37), targets.reshape(-1))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # summation order only


def test_no_supervised_position_gives_zero_loss_and_zero_gradients():
    hidden, weight, _, targets = _inputs()
    loss = linear_cross_entropy(hidden, weight, torch.full_like(targets, -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_at_most_one_chunk_of_logits_is_ever_alive():
    """No op of the forward or the backward (checkpoint's recomputation included) produces a [rows, V]
    tensor of more than chunk_size rows; the plain loss produces the whole [positions, V] logits."""
    v, chunk = 97, 6
    hidden, weight, _, targets = _inputs(shape=(4, 10), d=3, v=v)  # d < chunk: weight.T is no chunk

    class Widest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == v:
                    Widest.rows = max(Widest.rows, t.shape[0])
            return out

    with Widest():
        linear_cross_entropy(hidden, weight, targets, chunk_size=chunk).backward()
    assert int((targets != -100).sum()) > chunk  # several chunks ran
    assert Widest.rows == chunk
    Widest.rows = 0
    with Widest():
        _plain(hidden, weight, None, targets, "mean").backward()
    assert Widest.rows == targets.numel()


@pytest.mark.parametrize("call,match", [
    (lambda h, w, t: linear_cross_entropy(h, w, t, reduction="avg"), "reduction must be one of"),
    (lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=0), "chunk_size must be a positive integer"),
    (lambda h, w, t: linear_cross_entropy(h[:, :3], w, t), r"hidden \(3, 3, 5\) and targets \(3, 7\)"),
    (lambda h, w, t: linear_cross_entropy(h, w[:, :4], t), r"weight must be \[V, 5\]"),
    (lambda h, w, t: linear_cross_entropy(h, w, t + 11), r"token ids in 0\.\.10"),
])
def test_bad_input_is_named(call, match):
    hidden, weight, _, targets = _inputs()
    with pytest.raises(ConfigError, match=match):
        call(hidden, weight, targets)


def test_any_head_a_soft_capped_one_included():
    hidden, weight, _, targets = _inputs()

    def capped(h):  # Gemma-2's final soft-capping
        return torch.tanh(F.linear(h, weight) / 3.0) * 3.0

    got = head_cross_entropy(hidden, capped, targets, vocab_size=11, chunk_size=4)
    want = F.cross_entropy(capped(hidden).reshape(-1, 11), targets.reshape(-1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, weight)[0], torch.autograd.grad(want, weight)[0],
                               rtol=1e-12, atol=1e-12)
