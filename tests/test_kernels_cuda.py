"""GPU checks (all ``cuda``-marked; they skip on a machine without one): the deviation ops against the fp64
loop reference at odd shapes and strides in fp32/bf16/fp16, and the truncated runner on CUDA in bf16.

Compiled Triton is checked in a subprocess without TRITON_INTERPRET (tests/conftest.py imports the kernels
interpreted on a machine without CUDA); the CUDA C++ op and the runner run in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import (
    DTYPES,
    LAYOUTS,
    check_kernel_output,
    make_case,
    named_lens,
)

pytestmark = pytest.mark.cuda

ODD_CASES = [  # B, m, T, D, K, padding, layouts
    (1, 1, 3, 1, 2, "left", ("contiguous",)),  # D = 1
    (3, 2, 4, 17, 4, "right", ("strided", "feature_strided", "contiguous")),
    (7, 5, 6, 300, 64, "right", ("time_major", "strided")),  # K = 64: several D blocks
    (33, 24, 8, 896, 6, "right", LAYOUTS),  # Qwen2-0.5B depth and width, B not a power of two
    (2, 3, 2, 16384, 3, "left", ("contiguous", "feature_strided")),  # the largest D of the contract
]


def _lens_on(lens, device):
    return lens if lens.weight is None and lens.bias is None else lens.to(device)


def _on_gpu(states, li, y, bases):
    return [s.cuda() for s in states], li.cuda(), y.cuda(), bases.cuda()


# --------------------------------------------------------------------------- CUDA C++ op


@pytest.fixture(scope="module")
def cuda_op():
    from salf_engine.deviation import cpp_op as ops

    assert ops.cuda_op_available(), f"the CUDA C++ op was not built: {ops.cpp_unavailable_reason()}"
    return ops


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", ODD_CASES, ids=lambda c: f"B{c[0]}-m{c[1]}-D{c[3]}-K{c[4]}")
def test_cuda_op_odd_shapes_and_strides(cuda_op, case, dtype):
    B, m, T, D, K, padding, layouts = case
    states, li, y, bases = make_case(B, m, T, D, K, dtype=dtype, layouts=layouts, padding=padding, seed=21)
    for lens_name in ("rms_gemma", "layernorm"):
        lens = named_lens(lens_name, D)
        for metric in ("cosine", "ce", "rank"):
            gpu_args = _on_gpu(states, li, y, bases)
            out = cuda_op.deviations_cpp(*gpu_args, _lens_on(lens, "cuda"), metric)
            what = f"cuda {case} {lens_name} {metric}"
            check_kernel_output(states, li, y, bases, lens, metric, out.cpu(), what)


# --------------------------------------------------------------------------- compiled Triton (subprocess)

_TRITON_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from kernel_cases import DTYPES, LAYOUTS, make_case, named_lens, reference_deviations
from salf_engine.kernels import deviation as kdev
cases = [
    (1, 1, 3, 1, 2, "left", ("contiguous",)),
    (3, 2, 4, 17, 4, "right", ("strided", "feature_strided", "contiguous")),
    (7, 5, 6, 300, 64, "right", ("time_major", "strided")),
    (33, 24, 8, 896, 6, "right", LAYOUTS),
    (2, 3, 2, 16384, 3, "left", ("contiguous", "feature_strided")),
]
def check(out, states, li, y, bases, lens, metric, what):
    ref = reference_deviations(states, li, y, bases, lens, metric)
    low = states[0].dtype
    pt = ref if low == torch.float32 else reference_deviations(states, li, y, bases, lens, metric,
                                                               compute_dtype=low)
    atol = (0.0 if metric == "rank" else 2e-5) + (1e-5 if low != torch.float32 else 0.0)
    err = (out.cpu().double() - ref).abs()
    assert bool((err <= 2 * (pt.double() - ref).abs() + atol).all()), (what, err.max().item())
for dtype in DTYPES:
    for (B, m, T, D, K, padding, layouts) in cases:
        states, li, y, bases = make_case(B, m, T, D, K, dtype=dtype, layouts=layouts, padding=padding,
                                         seed=21)
        g = [s.cuda() for s in states]
        for lens_name in ("rms_gemma", "layernorm"):
            lens = named_lens(lens_name, D)
            lc = lens.to("cuda")
            for metric in ("cosine", "ce", "rank"):
                for group in (1, 3, None):
                    what = (str(dtype), B, m, D, K, lens_name, metric, group)
                    out = kdev.deviations_triton(g, li.cuda(), y.cuda(), bases.cuda(), lc, metric,
                                                 group_size=group)
                    check(out, states, li, y, bases, lens, metric, what)
                stacked = torch.stack(states).cuda()  # the registered op, one [S, B, T, D] tensor
                out = kdev.deviations_triton_stacked(stacked, li.cuda(), y.cuda(), bases.cuda(), lc, "ce")
                check(out, states, li, y, bases, lens, "ce", ("stacked",) + what[:6])
print("ok")
"""


def test_compiled_triton_odd_shapes_and_strides(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "triton_gpu.py"
    script.write_text(_TRITON_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]


# --------------------------------------------------------------------------- runner on CUDA, bf16


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_runner_on_cuda_bf16(family):
    from tiny_models import tiny_model

    from salf_engine.deviation.compute import deviations_reference
    from salf_engine.deviation.semantics import semantic_bases
    from salf_engine.runner.truncated import TruncatedRunner, last_token_index

    model = tiny_model(family, num_layers=4).cuda().to(torch.bfloat16).train()
    label_ids = torch.tensor([10, 11, 12], device="cuda")
    bases = semantic_bases(model, label_ids)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 60, (5, 9), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    labels = torch.tensor([0, 1, 2, 0, 1], device="cuda")
    rows = torch.arange(5, device="cuda")
    last = last_token_index(mask, ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
    # "auto" is the compiled Triton kernel unless this session runs Triton interpreted
    impls = ["torch"] + (["auto"] if os.environ.get("TRITON_INTERPRET") != "1" else [])  # gpu_suite.sh: 0
    impls += ["cuda"] if _cuda_op_built() else []
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    dev_ref = deviations_reference(list(ref.hidden_states), last, labels, bases, lens=model.model.norm)
    for impl in impls:
        runner = TruncatedRunner(model, bases=bases, deviation_impl=impl)
        for depth in (0, 2, 4):
            model.zero_grad(set_to_none=True)
            out = runner(ids, mask, depth=depth, labels=labels)
            want = ref.logits[rows, last].float()
            torch.testing.assert_close(out.logits.float(), want, atol=3e-2, rtol=3e-2)
            assert out.deviations is not None and out.deviations.shape == (5, 5)
            assert (out.deviations - dev_ref).abs().max().item() < 3e-2, (impl, depth)
            torch.nn.functional.cross_entropy(out.logits.float(), label_ids[labels]).backward()
            for name, p in model.named_parameters():
                below = any(name.startswith(f"model.layers.{i}.") for i in range(depth))
                if below or ("embed_tokens" in name and not tied):
                    assert p.grad is None, f"{name} got a gradient below the cut (depth {depth})"
                elif name.startswith(f"model.layers.{depth}.") and depth < 4:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _cuda_op_built() -> bool:
    from salf_engine.deviation import cpp_op as ops

    return ops.cuda_op_available()
