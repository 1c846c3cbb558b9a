"""The C++ deviation op (torch.ops.salf) against the independent loop reference.

The CPU op is built once per session (about a minute). A failed build FAILS these
tests (CI has gcc and ninja); set SALF_ALLOW_NO_CPP=1 to skip them on a machine
without a compiler instead. CUDA tests carry the ``cuda`` marker.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_cases import (
    DTYPES,
    LAYOUTS,
    LENSES,
    METRICS,
    Lens,
    assert_three_way,
    check_kernel_output,
    make_case,
    make_lens,
    named_lens,
    reference_deviations,
)

from salf_engine.deviation import cpp_op as ops
from salf_engine.errors import SalfError


@pytest.fixture(scope="session", autouse=True)
def built():
    if not ops.cpp_available():
        reason = ops.cpp_unavailable_reason()
        if os.environ.get("SALF_ALLOW_NO_CPP") == "1":
            pytest.skip(f"C++ op unavailable and SALF_ALLOW_NO_CPP=1: {reason}")
        pytest.fail(f"the C++ deviation op failed to build: {reason}")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("lens_name", LENSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_reference(dtype, lens_name, metric):
    B, m, T, D, K = 5, 6, 7, 72, 4
    states, li, y, bases = make_case(B, m, T, D, K, dtype=dtype, layouts=LAYOUTS, padding="right", seed=1)
    lens = named_lens(lens_name, D)
    out = ops.deviations_cpp(states, li, y, bases, lens, metric)
    check_kernel_output(states, li, y, bases, lens, metric, out, f"{dtype} {lens_name} {metric}")


@pytest.mark.parametrize(
    "B,m,T,D,K,padding,layouts",
    [
        (1, 1, 3, 40, 2, "left", ("contiguous",)),
        (2, 4, 6, 40, 3, "right", ("time_major", "strided")),
        (3, 2, 4, 17, 4, "left", ("strided", "feature_strided", "contiguous")),
        (2, 1, 2, 1, 2, "right", ("contiguous",)),  # D = 1
        (2, 3, 2, 300, 64, "right", ("time_major",)),  # K = 64
        (4, 24, 8, 896, 6, "right", LAYOUTS),  # Qwen2-0.5B hidden size and depth
        (1, 1, 2, 16384, 3, "left", ("contiguous",)),  # the largest D of the contract
    ],
)
@pytest.mark.parametrize("lens_name", ("rms", "layernorm"))
def test_odd_shapes_and_layouts(B, m, T, D, K, padding, layouts, lens_name):
    states, li, y, bases = make_case(B, m, T, D, K, layouts=layouts, padding=padding, seed=2)
    lens = named_lens(lens_name, D)
    for metric in ("cosine", "ce"):
        out = ops.deviations_cpp(states, li, y, bases, lens, metric)
        check_kernel_output(states, li, y, bases, lens, metric, out, f"{B},{m},{D},{K} {lens_name} {metric}")


def test_layernorm_with_large_mean():
    # A large common offset: the mean must be removed exactly, and the bias does not cancel.
    states, li, y, bases = make_case(3, 3, 4, 72, 4, seed=5)
    states = [s + 50.0 for s in states]
    lens = make_lens("layernorm", 72)
    out = ops.deviations_cpp(states, li, y, bases, lens, "cosine")
    check_kernel_output(states, li, y, bases, lens, "cosine", out, "layernorm large mean")


def test_rank_metric_hand_computed():
    D, K = 40, 3
    e = torch.eye(D)[:K]
    rows0 = [e[1], 2 * e[2] + e[1] - e[0], e[1], e[0]]
    rows1 = [2 * e[2] + e[1] - e[0], e[1], e[0], e[0]]
    states = [torch.stack([rows0[s], rows1[s]])[:, None, :].clone() for s in range(4)]
    zeros = torch.zeros(2, dtype=torch.int64)
    out = ops.deviations_cpp(states, zeros, zeros, e.clone(), None, "rank")
    assert out.tolist() == [[2.0, 3.0, 2.0, 1.0], [3.0, 2.0, 1.0, 1.0]]


def test_registered_torch_ops():
    states, li, y, bases = make_case(2, 2, 3, 40, 3, seed=6)
    lens = make_lens("layernorm", 40)
    out = torch.ops.salf.deviations(states, li, y, bases, lens.weight, lens.bias, 2, lens.eps, 1)
    check_kernel_output(states, li, y, bases, lens, "ce", out, "torch.ops.salf")
    with pytest.raises(RuntimeError, match=r"salf::deviations: label index 7 of sample 0 is outside 0..K-1"):
        torch.ops.salf.deviations(states, li, torch.tensor([7, 0]), bases, None, None, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"metric must be 0 \(cosine\), 1 \(ce\) or 2 \(rank\)"):
        torch.ops.salf.deviations(states, li, y, bases, None, None, 0, 0.0, 9)


def test_empty_batch():
    states, li, y, bases = make_case(1, 2, 3, 40, 2)
    out = ops.deviations_cpp([s[:0] for s in states], li[:0], y[:0], bases, None, "cosine")
    assert out.shape == (0, 3)


def test_threads_agree():
    states, li, y, bases = make_case(16, 9, 4, 130, 5, layouts=LAYOUTS, seed=7)
    lens = make_lens("rms", 130)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.deviations_cpp(states, li, y, bases, lens, "ce")
        torch.set_num_threads(max(2, before))
        many = ops.deviations_cpp(states, li, y, bases, lens, "ce")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_dispatcher_uses_the_op():
    from salf_engine.deviation import compute as deviations_mod
    states, li, y, bases = make_case(3, 3, 4, 72, 4, layouts=LAYOUTS, seed=8)
    lens = make_lens("rms", 72)
    ref = reference_deviations(states, li, y, bases, lens, "cosine")
    out = deviations_mod.deviations(states, li, y, bases, lens=lens, metric="cosine", impl="cpp")
    assert_three_way(out, ref, ref, atol=2e-5, what="dispatcher impl=cpp")


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(labels=a["labels"][:-1]), "labels must have shape"),
        (lambda a: a.update(labels=a["labels"] + 5), "outside 0..K-1"),
        (lambda a: a.update(labels=a["labels"].float()), "integer tensor"),
        (lambda a: a.update(last_index=a["last_index"] + 100), "last_index .* outside"),
        (lambda a: a.update(bases=torch.randn(2, 41)), "D = 41"),
        (lambda a: a.update(states=[a["states"][0].to(torch.bfloat16), *a["states"][1:]]), "share a dtype"),
        (lambda a: a.update(states=[s.to(torch.int32) for s in a["states"]]), "float32, bfloat16 or float16"),
        (lambda a: a.update(states=[a["states"][0], torch.randn(2, 3, 41)]), r"expected \[B=2, T, D=40\]"),
        (lambda a: a.update(states=a["states"][:1]), "m\\+1 >= 2"),
        (lambda a: a.update(labels=torch.zeros(2, dtype=torch.int64, device="meta")), "is on meta"),
        (lambda a: a.update(metric="l2"), "unknown deviation metric"),
        (
            lambda a: a.update(lens=Lens(kind="rms", weight=torch.ones(39), bias=None, eps=1e-6)),
            r"\[D\] = \[40\]",
        ),
    ],
)
def test_bad_input_raises_salf_error(mutate, match):
    states, li, y, bases = make_case(2, 2, 3, 40, 2)
    args = dict(states=states, last_index=li, labels=y, bases=bases, lens=None, metric="cosine")
    mutate(args)
    with pytest.raises(SalfError, match=match):
        ops.deviations_cpp(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("lens_name", ("rms", "layernorm"))
def test_cuda_op_matches_reference(dtype, lens_name):
    assert ops.cuda_op_available(), "the CUDA C++ op was not built although a GPU is present"
    B, m, T, D, K = 5, 6, 7, 1000, 6
    states, li, y, bases = make_case(B, m, T, D, K, dtype=dtype, layouts=LAYOUTS, seed=9)
    lens = named_lens(lens_name, D)
    dev = [s.cuda() for s in states]
    lens_cuda = Lens(
        kind=lens.kind,
        weight=None if lens.weight is None else lens.weight.cuda(),
        bias=None if lens.bias is None else lens.bias.cuda(),
        eps=lens.eps,
    )
    for metric in METRICS:
        out = ops.deviations_cpp(dev, li.cuda(), y.cuda(), bases.cuda(), lens_cuda, metric)
        what = f"cuda {dtype} {lens_name} {metric}"
        check_kernel_output(states, li, y, bases, lens, metric, out.cpu(), what)
