"""The GPU code compiled for Ampere (sm_80) and Hopper (sm_90) on a machine without a GPU.

Every specialization of the Triton deviation kernel that the launchers pick is compiled by Triton's CUDA
backend and must use no local memory (no spills); the CUDA op is compiled by nvcc (and its C++ part by
the host compiler) with the flags of its ``torch.utils.cpp_extension`` build and must not warn in
``csrc/``. The compile code lives in ``bench/kernel_compile.py`` (which also writes
``bench/results/kernel_compile.md``); results are cached per source hash, so only a kernel change
compiles again (cold on the 2-core CPU machine: about 5 min for Triton, 6 min for nvcc; cached: 5 s).
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import kernel_compile as kc  # noqa: E402
from salf_engine.kernels import deviation as kdev  # noqa: E402

from salf_engine.deviation.contract import MAX_LABELS, METRICS  # noqa: E402


@pytest.fixture(scope="module")
def triton_results():
    if (why := kc.triton_missing()) is not None:
        pytest.skip(why)
    specs = [spec for gpu in kc.GPUS for spec in kc.triton_cases(gpu)]
    return list(zip(specs, kc.compile_triton(specs), strict=True))


@pytest.fixture(scope="module")
def cuda_result():
    if (why := kc.nvcc_missing()) is not None:
        pytest.skip(why)
    return kc.compile_cuda_op()


def test_every_triton_specialization_compiles_for_sm80_and_sm90_without_spills(triton_results):
    assert {spec.gpu.cc for spec, _ in triton_results} == {80, 90}
    for spec, res in triton_results:
        assert 0 < res["regs"] <= 255, (spec.cases[0], res)
        assert res["warps"] == spec.options["num_warps"]
        assert res["smem"] > 0  # the block reductions go through shared memory
    spilled = [(spec.gpu.cc, spec.cases[0], res) for spec, res in triton_results if res["local"]]
    assert not spilled


def test_the_registered_op_kernel_is_among_them(triton_results):
    for gpu in kc.GPUS:
        stacked = [s for s, _ in triton_results if s.gpu is gpu and s.constexpr("STACKED")]
        assert {c.launcher for s in stacked for c in s.cases} == {"op"} and len(stacked) >= len(METRICS) * 4


def _choices(specs, *names):
    return {tuple(s.constexpr(n) for n in names) for s in specs}


@pytest.mark.parametrize("gpu", kc.GPUS, ids=lambda g: g.name)
def test_cases_cover_every_launcher_choice(gpu):
    """The specializations come from the launchers' own choice functions and cover every value: each
    dtype x lens x metric (list launcher), each tile kernel_meta picks for the D and K of the grid, and
    the arguments Triton fixes when they equal 1."""
    specs = kc.triton_cases(gpu)
    listed = [s for s in specs if not s.constexpr("STACKED")]
    body = {(c.dtype, c.lens, c.metric) for s in listed for c in s.cases}
    assert body == set(itertools.product(kc.DTYPES, kc.LENSES, METRICS))
    assert _choices(listed, "LENS_KIND", "HAS_BIAS") == {(0, False), (1, False), (2, False), (2, True)}
    assert {s.signature["ref_ptr"] for s in specs} == {"*fp32", "*bf16", "*fp16"}
    for stacked in (False, True):
        mine = [s for s in specs if bool(s.constexpr("STACKED")) == stacked]
        tiles = {(s.constexpr("BLOCK_D"), s.constexpr("BLOCK_K"), s.options["num_warps"]) for s in mine}
        want = {tuple(kdev.kernel_meta(2, d, k).values()) for d in kc.HIDDEN for k in kc.LABELS}
        assert want <= tiles
        assert {(1024, 2), (2048, 2), (4096, 2), (16, MAX_LABELS)} <= {t[:2] for t in tiles}
        fixed = {n for s in mine for n in ("group_size", "n_groups", "K", "n_time_stacked")
                 if s.constexpr(n) == 1}
        assert fixed == ({"group_size", "n_groups", "K", "n_time_stacked"} if stacked
                         else {"group_size", "n_groups", "K"})
    # cases that give the same specialization compile once: D does not matter at K = 6 (BLOCK_D 1024)
    six = [s for s in listed if {c.labels for c in s.cases} == {6} and s.cases[0].batch == 32]
    assert all({c.hidden for c in s.cases} == set(kc.HIDDEN) for s in six)


def test_group_and_tile_choices_by_hand():
    assert kdev.group_size_for(132, 1, 25) == 1
    assert kdev.group_size_for(132, 32, 25) == 2  # ceil(800 / 528)
    assert kdev.group_size_for(108, 1024, 25) == 25
    assert kdev.kernel_meta(2, 576, 2) == {"BLOCK_D": 1024, "BLOCK_K": 2, "num_warps": 4}
    assert kdev.kernel_meta(4, 8192, 2) == {"BLOCK_D": 4096, "BLOCK_K": 2, "num_warps": 8}
    assert kdev.kernel_meta(2, 4096, 6) == {"BLOCK_D": 1024, "BLOCK_K": 8, "num_warps": 8}
    assert kdev.kernel_meta(2, 64, 3) == {"BLOCK_D": 64, "BLOCK_K": 4, "num_warps": 2}
    assert kdev.kernel_meta(4, 4096, 1024) == {"BLOCK_D": 16, "BLOCK_K": 1024, "num_warps": 8}


def test_specialize_follows_the_triton_jit():
    """kc.specialize gives what Triton's own binder gives for the same launch arguments."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = kc._jit(kdev.deviation_kernel)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    gpu = kc.GPUS[0]
    for case in (kc.TritonCase("list", "bfloat16", "layernorm+bias", "ce", 576, 1, 1),
                 kc.TritonCase("op", "float16", "rms", "rank", 4096, 6, 1024, 1),
                 kc.TritonCase("op", "float32", "none", "cosine", 2048, 6, 32, 128)):
        _grid, args, kwargs = kc._launch(case, gpu)
        mine = kc.specialize(fn, args, kwargs)
        bound, specialization, options = binder(*args, **kwargs)
        _opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        assert mine[0] == signature
        assert {k: v for k, v in mine[1].items()} == {k: v for k, v in constexprs.items()}
        assert mine[2] == attrs


def test_occupancy_by_hand():
    h100, a100 = kc.GPUS
    # 128 registers x 32 lanes = 4096 per warp; a quarter's 16384 hold 4 warps, the SM 16 = 2 blocks of 8
    assert kc.occupancy(h100, 128, 8, 1024) == (2, 0.25)
    # 32 registers, 4 warps, little shared memory: the 64 warp slots are the limit (16 blocks)
    assert kc.occupancy(a100, 32, 4, 512) == (16, 1.0)
    # 100 KiB of shared memory per block: one block fits in the A100's 164 KiB, two in the H100's 228
    assert kc.occupancy(a100, 32, 4, 100 * 1024) == (1, 4 / 64)
    assert kc.occupancy(h100, 32, 4, 100 * 1024) == (2, 8 / 64)
    # 40 registers round up to 1280 per warp: 12 warps per quarter, 48 per SM = 6 blocks of 8
    assert kc.occupancy(h100, 40, 8, 0) == (6, 0.75)


def test_cuda_op_compiles_with_nvcc_for_sm80_and_sm90_without_warnings(cuda_result):
    assert cuda_result["ok"], cuda_result["log"][-6000:]
    assert cuda_result["project_warnings"] == []
    got = {(k["arch"], k["dtype"]) for k in cuda_result["kernels"]}
    assert got == set(itertools.product(("sm_80", "sm_90"), ("float32", "float64", "bfloat16", "float16")))
    for k in cuda_result["kernels"]:
        assert 0 < k["regs"] <= 255 and k["spill_stores"] == 0, k
    assert kc.problems({"triton": [], "cuda": cuda_result}) == []


def test_cuda_op_build_uses_cpp_extension_flags(tmp_path, monkeypatch):
    """The ninja file is torch's own: its include paths, nvcc flags, arch flags and the op's flags."""
    if kc.nvcc_missing() is not None:
        pytest.skip(kc.nvcc_missing())
    from torch.utils import cpp_extension

    from salf_engine.deviation.cpp_op import build_flags

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    _objects, text = kc._write_build(tmp_path, tmp_path / "include")
    cflags = next(line for line in text.splitlines() if line.startswith("cflags = "))
    cuda_cflags = next(line for line in text.splitlines() if line.startswith("cuda_cflags = "))
    for path in cpp_extension.include_paths():
        assert f"-isystem {path}" in cflags and f"-isystem {path}" in cuda_cflags
    assert f"-I{tmp_path / 'include'}" in cuda_cflags
    for flag in cpp_extension.COMMON_NVCC_FLAGS:
        assert flag in cuda_cflags
    assert "-gencode=arch=compute_80,code=sm_80" in cuda_cflags
    assert "-gencode=arch=compute_90,code=sm_90" in cuda_cflags
    native = os.environ.get("SALF_CPP_NATIVE", "1") != "0"
    host, device = build_flags(native)
    assert all(f in cflags for f in host) and all(f in cuda_cflags for f in device)
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # patched only while the file was written


def test_warnings_are_told_apart_by_file():
    log = "\n".join([
        "/work/main/csrc/deviation.cpp:125:31: warning: AVX vector return without AVX enabled [-Wpsabi]",
        "/x/torch/include/c10/util/Half.h(42): warning #20012-D: __host__ annotation is ignored",
        "/x/csrc/deviation_cuda.cu(77): warning #177-D: variable \"n\" was declared but never referenced",
        "/x/a.h:3: note: something",
        "ptxas warning : Stack size for entry function '_Z1kv' cannot be statically determined",
        "ptxas info    : Used 48 registers, used 1 barriers, 16 bytes smem, 444 bytes cmem[0]",
    ])
    assert kc._warnings(log) == [
        ("/work/main/csrc/deviation.cpp", 125, "AVX vector return without AVX enabled [-Wpsabi]"),
        ("/x/torch/include/c10/util/Half.h", 42, "#20012-D: __host__ annotation is ignored"),
        ("/x/csrc/deviation_cuda.cu", 77, "#177-D: variable \"n\" was declared but never referenced"),
        ("ptxas", 0, "Stack size for entry function '_Z1kv' cannot be statically determined"),
    ]
    bad = {"ok": True, "log": "", "warnings": [], "kernels": [],
           "project_warnings": [("/x/csrc/deviation.cpp", 1, "unused variable 'x'")]}
    problems = kc.problems({"triton": [], "cuda": bad})
    assert any("unused variable" in p for p in problems)


def test_ptxas_lines_are_read_per_arch_and_dtype():
    log = "\n".join([
        "ptxas info    : Compiling entry function '_ZN4salf_16deviation_kernelIN3c108BFloat16EEEvPKl' for "
        "'sm_90'",
        "ptxas info    : Function properties for _ZN4salf_16deviation_kernelIN3c108BFloat16EEEvPKl",
        "    208 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads",
        "ptxas info    : Used 48 registers, used 1 barriers, 16 bytes smem, 620 bytes cmem[0]",
    ])
    assert kc._ptxas_usage(log) == [dict(arch="sm_90", dtype="bfloat16", stack=208, spill_stores=4, regs=48,
                                         smem=16)]


def test_table_lists_every_specialization(triton_results, cuda_result, tmp_path):
    results = {"triton": triton_results, "cuda": cuda_result, "skipped": []}
    path = tmp_path / "kernel_compile.md"
    kc.write_markdown(path, results)
    text = path.read_text()
    for gpu in kc.GPUS:
        n = sum(s.gpu is gpu for s, _ in triton_results)
        assert f"### {gpu.name} (sm_{gpu.cc}): {n} specializations" in text
    rows = [line for line in text.splitlines() if line.startswith("| list ") or line.startswith("| op ")]
    assert len(rows) == len(triton_results)
    assert "| sm_80 | A100 | bfloat16 |" in text and "| sm_90 | H100 | float16 |" in text
    assert torch.__version__ in text
