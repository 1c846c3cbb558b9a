"""CPU deviation benchmark through pytest-benchmark.

    pytest bench/ --benchmark-enable                 # appends rows to bench/results/deviation.csv
    pytest bench/ --benchmark-enable -k qwen2-0.5b   # one model

Each (model, batch, provider) case is timed by pytest-benchmark; the median and the 20th/80th
percentiles of its raw rounds are appended to the results CSV and deviation.md is rewritten at the
end. Without --benchmark-enable (the project default) every case runs once as a smoke test and
nothing is written. CPU shapes: T = 16 (the kernels read one row per sample and space whatever T is),
B in {8, 32}, float32; torch.compile is timed for Qwen2-0.5B only (compiling each shape takes
about 45 s on a small CPU). SALF_BENCH_THREADS=n sets the torch CPU threads.
"""

from __future__ import annotations

import os

import pytest
import torch
from bench_deviation import (
    MODELS,
    append_row,
    make_case,
    provider_fn,
    quantiles_us,
    write_summary,
)

CPU_PROVIDERS = ("torch", "torch_lean", "torch_compile", "cpp")
CPU_BATCHES = (8, 32)
CPU_TOKENS = 16
COMPILE_MODEL = "qwen2-0.5b"

_CASES: dict = {}


def _case(model: str, batch: int):
    key = (model, batch)
    if key not in _CASES:
        _CASES.clear()  # keep one shape's states in memory at a time
        _CASES[key] = make_case(model, batch, tokens=CPU_TOKENS, dtype=torch.float32, device="cpu")
    return _CASES[key]


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    threads = os.environ.get("SALF_BENCH_THREADS")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    yield
    torch.set_num_threads(before)
    if request.config.getoption("benchmark_enable", False):
        write_summary()


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("batch", CPU_BATCHES)
@pytest.mark.parametrize("model", list(MODELS))
def test_deviation_cpu(benchmark, model, batch, provider):
    if provider == "torch_compile" and model != COMPILE_MODEL:
        pytest.skip(f"torch.compile takes ~45 s per shape on a small CPU; timed for {COMPILE_MODEL} only")
    case = _case(model, batch)
    fn, why = provider_fn(provider, case)
    if fn is None:
        pytest.skip(why)
    for _ in range(2):  # warm-up (torch.compile compiles here)
        result = fn()
    assert result is not None
    benchmark.pedantic(fn, rounds=30, iterations=1, warmup_rounds=1)
    if benchmark.disabled:
        return
    med, p20, p80 = quantiles_us(list(benchmark.stats.stats.data))
    append_row(case, provider, med, p20, p80, timer="pytest-benchmark")
