"""The fused Triton deviation kernel against the independent loop reference.

Runs under the Triton interpreter on CPU (tests/conftest.py imports the kernels with
TRITON_INTERPRET=1), so every grid is tiny.
"""

from __future__ import annotations

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

from salf_engine.errors import SalfError

triton = pytest.importorskip("triton")

from salf_engine.kernels import deviation as kdev  # noqa: E402

# the Triton kernel is the subject here: the dispatcher may run it, interpreted on a CPU
pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("lens_name", LENSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_reference(dtype, lens_name, metric):
    B, m, T, D, K = 3, 3, 5, 72, 4
    states, li, y, bases = make_case(B, m, T, D, K, dtype=dtype, layouts=LAYOUTS, padding="right", seed=1)
    lens = named_lens(lens_name, D)
    out = kdev.deviations_triton(states, li, y, bases, lens, metric)
    check_kernel_output(states, li, y, bases, lens, metric, out, f"{dtype} {lens_name} {metric}")


@pytest.mark.parametrize(
    "B,m,T,D,K,padding,layouts",
    [
        (1, 1, 3, 40, 2, "left", ("contiguous",)),
        (2, 4, 6, 40, 3, "right", ("time_major", "strided")),
        (3, 2, 4, 17, 4, "left", ("strided", "feature_strided", "contiguous")),
        (2, 1, 2, 300, 64, "right", ("time_major",)),  # K = 64 -> BLOCK_D = 128: three D blocks
    ],
)
@pytest.mark.parametrize("lens_name", ("rms", "layernorm"))
def test_odd_shapes_and_layouts(B, m, T, D, K, padding, layouts, lens_name):
    states, li, y, bases = make_case(B, m, T, D, K, layouts=layouts, padding=padding, seed=2)
    lens = named_lens(lens_name, D)
    for metric in ("cosine", "ce"):
        out = kdev.deviations_triton(states, li, y, bases, lens, metric)
        check_kernel_output(states, li, y, bases, lens, metric, out, f"{B},{m},{D},{K} {lens_name} {metric}")


@pytest.mark.parametrize("group_size", [1, 2, None])
@pytest.mark.parametrize("metric", ("cosine", "rank"))
def test_group_sizes(group_size, metric):
    """Any number of spaces per program gives the reference's deviations."""
    B, m, T, D, K = 3, 4, 4, 40, 3
    states, li, y, bases = make_case(B, m, T, D, K, layouts=("contiguous", "time_major"), seed=3)
    lens = make_lens("rms", D)
    out = kdev.deviations_triton(states, li, y, bases, lens, metric, group_size=group_size)
    check_kernel_output(states, li, y, bases, lens, metric, out, f"{metric} g={group_size}")


def test_rank_metric_hand_computed():
    # Orthonormal bases e0, e1, e2; label 0: the rank of e0 among the cosines of each row, by hand.
    D, K = 40, 3
    e = torch.eye(D)[:K]
    rows0 = [e[1], 2 * e[2] + e[1] - e[0], e[1], e[0]]
    rows1 = [2 * e[2] + e[1] - e[0], e[1], e[0], e[0]]
    states = [torch.stack([rows0[s], rows1[s]])[:, None, :].clone() for s in range(4)]
    li = torch.zeros(2, dtype=torch.int64)
    y = torch.zeros(2, dtype=torch.int64)
    for g in (1, 4):
        out = kdev.deviations_triton(states, li, y, e.clone(), None, "rank", group_size=g)
        assert out.tolist() == [[2.0, 3.0, 2.0, 1.0], [3.0, 2.0, 1.0, 1.0]]


def test_empty_batch():
    states, li, y, bases = make_case(1, 2, 3, 40, 2)
    states = [s[:0] for s in states]
    out = kdev.deviations_triton(states, li[:0], y[:0], bases, None, "cosine")
    assert out.shape == (0, 3)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(labels=a["labels"][:-1]), "labels must have shape"),
        (
            lambda a: a.update(last_index=torch.cat([a["last_index"], a["last_index"]])),
            "last_index must have",
        ),
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
        (lambda a: a.update(lens="final_norm"), "LensSpec"),
    ],
)
def test_bad_input_raises_salf_error(mutate, match):
    states, li, y, bases = make_case(2, 2, 3, 40, 2)
    args = dict(states=states, last_index=li, labels=y, bases=bases, lens=None, metric="cosine")
    mutate(args)
    with pytest.raises(SalfError, match=match):
        kdev.deviations_triton(**args)


def test_dispatcher_uses_the_kernel():
    from salf_engine.deviation import compute as deviations_mod
    states, li, y, bases = make_case(2, 2, 3, 40, 3, layouts=LAYOUTS, seed=8)
    lens = make_lens("rms", 40)
    ref = reference_deviations(states, li, y, bases, lens, "ce")
    out = deviations_mod.deviations(states, li, y, bases, lens=lens, metric="ce", impl="triton")
    assert_three_way(out, ref, ref, atol=2e-5, what="dispatcher impl=triton")


_GPU_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from kernel_cases import LAYOUTS, make_case, make_lens, reference_deviations, Lens
from salf_engine.kernels.deviation import deviations_triton
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for kind in ("rms", "layernorm"):
        states, li, y, bases = make_case(5, 6, 7, 1000, 6, dtype=dtype, layouts=LAYOUTS, seed=9)
        lens = make_lens(kind, 1000)
        lc = Lens(kind=lens.kind, weight=lens.weight.cuda(),
                  bias=None if lens.bias is None else lens.bias.cuda(), eps=lens.eps)
        for metric in ("cosine", "ce", "rank"):
            for g in (1, 3, None):
                dev = [s.cuda() for s in states]
                out = deviations_triton(dev, li.cuda(), y.cuda(), bases.cuda(), lc, metric, group_size=g)
                ref = reference_deviations(states, li, y, bases, lens, metric)
                pt = reference_deviations(states, li, y, bases, lens, metric, compute_dtype=dtype)
                err = (out.cpu().double() - ref).abs()
                bound = 2 * (pt.double() - ref).abs() + 3e-5
                assert bool((err <= bound).all()), (dtype, kind, metric, g, err.max().item())
print("ok")
"""


@pytest.mark.cuda
def test_compiled_kernel_on_gpu(tmp_path):
    # The session runs under TRITON_INTERPRET=1, so the compiled kernel is checked in a clean subprocess.
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "gpu_check.py"
    script.write_text(_GPU_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
