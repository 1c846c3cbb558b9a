"""torch.compile: the registered Triton op and the truncated runner trace without graph breaks.

On CPU the Triton kernel runs under the interpreter (conftest imports it so), where
``wrap_triton`` cannot trace it, so the op is registered as an opaque ``custom_op`` there; on a GPU it is
a ``triton_op`` (checked by the cuda-marked test in a clean subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import check_kernel_output, make_case, make_lens
from tiny_models import tiny_model

pytest.importorskip("triton")

from salf_engine.kernels import deviation as kdev  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from salf_engine.deviation.compute import deviations  # noqa: E402
from salf_engine.deviation.semantics import semantic_bases  # noqa: E402
from salf_engine.runner.truncated import TruncatedRunner  # noqa: E402

# the Triton kernel is the subject here: the dispatcher may run it, interpreted on a CPU
pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_op_registration_follows_the_interpreter():
    interpreted = not torch.cuda.is_available()  # conftest: then the kernel is an InterpretedFunction
    assert kdev.OP_KIND == ("custom_op" if interpreted else "triton_op")
    assert kdev.TRITON_OP is torch.ops.salf_triton.deviations


@pytest.mark.parametrize("metric", ["cosine", "ce", "rank"])
@pytest.mark.parametrize("layout", ["space_major", "batch_major"])
def test_stacked_op_matches_reference(metric, layout):
    B, m, T, D, K = 3, 4, 5, 72, 4
    states, li, y, bases = make_case(B, m, T, D, K, seed=11)
    lens = make_lens("layernorm", D)
    if layout == "space_major":
        stacked = torch.stack(states)  # [S, B, T, D]
    else:  # [B, S, T, D] storage seen as [S, B, T, D]
        stacked = torch.stack(states, dim=1).transpose(0, 1)
    for group in (1, 2, None):
        out = kdev.deviations_triton_stacked(stacked, li, y, bases, lens, metric, group_size=group)
        check_kernel_output(states, li, y, bases, lens, metric, out, f"stacked {layout} {metric} g={group}")


def test_stacked_rows_and_bad_input():
    states, li, y, bases = make_case(2, 2, 3, 40, 3, seed=12)
    rows = torch.stack([s[torch.arange(2), li] for s in states])  # [S, B, D]: T = 1, last_index None
    out = kdev.deviations_triton_stacked(rows, None, y, bases, None, "cosine")
    check_kernel_output(states, li, y, bases, None, "cosine", out, "rows")
    from salf_engine.errors import SalfError

    with pytest.raises(SalfError, match="one tensor"):
        kdev.deviations_triton_stacked(states, li, y, bases)
    with pytest.raises(SalfError, match="outside 0..K-1"):
        kdev.deviations_triton_stacked(rows, None, y + 5, bases)


def test_op_traces_in_one_graph():
    states, li, y, bases = make_case(3, 3, 4, 40, 3, seed=13)
    stacked = torch.stack(states)
    lens = make_lens("rms", 40)

    def fn(stacked, li, y, bases):
        return kdev.deviations_triton_stacked(stacked * 2.0, li, y, bases, lens, "ce").sum(dim=1)

    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(fn, backend=counter, fullgraph=True)(stacked, li, y, bases)
    want = fn(stacked, li, y, bases)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want)


def test_dispatcher_traces_in_one_graph():
    states, li, y, bases = make_case(3, 3, 4, 40, 3, seed=14)
    lens = make_lens("rms", 40)
    for impl in ("auto", "torch"):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("eager")
        fn = torch.compile(
            lambda s, li, y, b, impl=impl: deviations(s, li, y, b, lens=lens, metric="cosine", impl=impl),
            backend=counter,
            fullgraph=True,
        )
        out = fn(states, li, y, bases)
        assert counter.frame_count == 1
        check_kernel_output(states, li, y, bases, lens, "cosine", out, f"compiled dispatcher {impl}")
    with pytest.raises(Exception, match="needs CUDA tensors"):
        torch.compile(
            lambda s: deviations(s, li, y, bases, lens=lens, impl="triton"), backend="eager", fullgraph=True
        )(states)


def test_runner_under_inductor_equals_eager(one_thread):
    """Whole training forward (runner + deviations + loss) compiled with Inductor: one graph, same numbers."""
    model = tiny_model("qwen2", num_layers=3).train()
    label_ids = torch.tensor([10, 11, 12])
    runner = TruncatedRunner(model, bases=semantic_bases(model, label_ids))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 60, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row
    labels = torch.tensor([0, 2, 1])

    def step(ids, mask, labels):
        out = runner(ids, mask, depth=1, labels=labels)
        loss = torch.nn.functional.cross_entropy(out.logits, label_ids[labels])
        return loss, out.logits, out.deviations

    def grads():
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return got

    want = step(ids, mask, labels)
    want[0].backward()
    want_grads = grads()
    counter = CompileCounterWithBackend("inductor")
    got = torch.compile(step, backend=counter)(ids, mask, labels)
    got[0].backward()
    got_grads = grads()
    assert counter.frame_count == 1, "the runner step broke into several graphs"
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)
    assert sorted(got_grads) == sorted(want_grads)
    assert not any(n.startswith("model.layers.0.") for n in got_grads)  # the frozen layer stays frozen
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_per_row_runner_compiles_once_per_depth_pattern(one_thread):
    """Per-row cuts are Python-level grouping: one graph per depth pattern, same numbers as eager; a new
    pattern is a recompile (the documented limit), never a wrong graph."""
    model = tiny_model("llama", num_layers=3).train()
    runner = TruncatedRunner(model)
    ids = torch.randint(4, 60, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def step(ids, mask, depths):
        return runner(ids, mask, depth=depths).logits

    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(step, backend=counter)
    for depths in ([2, 0, 1], [1, 3, 0]):
        want = step(ids, mask, depths)
        want.sum().backward()
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        got = compiled(ids, mask, depths)
        got.sum().backward()
        got_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert sorted(got_grads) == sorted(want_grads)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert counter.frame_count == 2  # one graph per depth pattern


_GPU_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from kernel_cases import make_case, make_lens, reference_deviations
from tiny_models import tiny_model
from salf_engine.kernels import deviation as kdev
from salf_engine.runner.truncated import TruncatedRunner
from salf_engine.deviation.semantics import semantic_bases
assert kdev.OP_KIND == "triton_op", kdev.OP_KIND
states, li, y, bases = make_case(5, 6, 7, 1000, 6, dtype=torch.bfloat16, seed=3)
lens = make_lens("rms", 1000)
st = torch.stack(states).cuda()
lc = lens.to("cuda")
fn = lambda st, li, y, b: kdev.deviations_triton_stacked(st * 1.0, li, y, b, lc, "ce")
got = torch.compile(fn, fullgraph=True)(st, li.cuda(), y.cuda(), bases.cuda())
ref = reference_deviations(states, li, y, bases, lens, "ce")
assert (got.cpu().double() - ref).abs().max().item() < 2e-2, "compiled triton_op"
model = tiny_model("llama", num_layers=3).cuda().to(torch.bfloat16).train()
label_ids = torch.tensor([10, 11, 12], device="cuda")
runner = TruncatedRunner(model, bases=semantic_bases(model, label_ids))
ids = torch.randint(4, 60, (4, 9), device="cuda")
mask = torch.ones_like(ids)
labels = torch.tensor([0, 2, 1, 0], device="cuda")
def step(ids, mask, labels):
    out = runner(ids, mask, depth=1, labels=labels)
    loss = torch.nn.functional.cross_entropy(out.logits.float(), label_ids[labels])
    return loss, out.logits, out.deviations
want = step(ids, mask, labels)
got = torch.compile(step, fullgraph=True)(ids, mask, labels)
assert (got[1].float() - want[1].float()).abs().max().item() < 5e-2
assert (got[2] - want[2]).abs().max().item() < 2e-2
print("ok")
"""


@pytest.mark.cuda
def test_triton_op_and_runner_compile_on_gpu(tmp_path):
    # The session runs under TRITON_INTERPRET=1 (custom_op); the triton_op needs a clean process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "gpu_compile.py"
    script.write_text(_GPU_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
