"""Compile the GPU code for Ampere (sm_80) and Hopper (sm_90) on a machine without a GPU.

* **Triton.** Every specialization of ``deviation_kernel`` that the launchers pick (see
  :func:`triton_cases`) is compiled by Triton's CUDA backend (``triton.compile(ASTSource(...),
  target=GPUTarget("cuda", cc, 32))``, ptxas included, in a fresh Python without ``TRITON_INTERPRET``);
  the cubin's registers, local memory (spills land there) and shared memory are read with the
  ``cuobjdump`` bundled with Triton.
* **The CUDA op.** ``csrc/deviation.cpp`` (host compiler) and ``csrc/deviation_cuda.cu`` (nvcc,
  ``-c`` only, sm_80 and sm_90) are compiled by the ninja file ``torch.utils.cpp_extension`` writes
  for ``salf_engine.deviation.cpp_op``'s build (its include paths, nvcc flags and arch flags; the
  project's flags from ``cpp_op.build_flags``), plus ``-Wall -Wextra`` for the host compiler and
  ``-Xptxas=-v`` for the resource usage. The CPU torch wheel lacks the generated
  ``c10/cuda/impl/cuda_cmake_macros.h``: a one-line stand-in goes into a temporary include directory.

Results are cached per source hash under ``$SALF_CACHE_DIR/compile`` (default
``~/.cache/salf-engine/compile``): a kernel or flag change compiles again, nothing else does.
``tests/test_kernel_compile.py`` and ``bench/gpu_suite.sh`` use this module; run as a script it writes
the table ``bench/results/kernel_compile.md`` (registers, spills, shared memory and the occupancy they
allow on an H100 and an A100)::

    python bench/kernel_compile.py [--out PATH] [--no-cache]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
CUDA_CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


# --------------------------------------------------------------------------- devices and occupancy


@dataclass(frozen=True)
class Gpu:
    """What bounds the occupancy of one SM (CUDA C Programming Guide, compute capabilities table)."""

    name: str
    cc: int
    sms: int
    smem_per_sm: int  # bytes of shared memory an SM can give to blocks
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    reserved_smem: int = 1024  # the runtime's shared memory per block (compute capability >= 8.0)


GPUS = (Gpu("H100", 90, 132, 228 * 1024), Gpu("A100", 80, 108, 164 * 1024))


def occupancy(gpu: Gpu, regs: int, warps: int, smem: int) -> tuple[int, float]:
    """(resident blocks per SM, fraction of the SM's warp slots they fill) for a kernel with ``regs``
    registers per thread, ``warps`` warps per block and ``smem`` bytes of shared memory per block.
    Registers go to warps in units of 256 within each of the SM's four quarters."""
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = 4 * ((gpu.regs_per_sm // 4) // regs_per_warp) // warps if regs else gpu.max_blocks
    by_smem = gpu.smem_per_sm // (smem + gpu.reserved_smem)
    blocks = min(by_regs, by_smem, gpu.max_warps // warps, gpu.max_blocks)
    return blocks, blocks * warps / gpu.max_warps


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    root = os.environ.get("SALF_CACHE_DIR") or str(Path.home() / ".cache" / "salf-engine")
    return Path(root).expanduser() / "compile"


def _load(key: str) -> dict | None:
    try:
        return {**json.loads((cache_dir() / f"{key}.json").read_text()), "cached": True}
    except (OSError, ValueError):
        return None


def _store(key: str, result: dict) -> dict:
    path = cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return {**result, "cached": False}


def _cached(key: str, use_cache: bool, compute) -> dict:
    return (_load(key) if use_cache else None) or _store(key, compute())


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


# --------------------------------------------------------------------------- Triton

DTYPES = ("float32", "bfloat16", "float16")
LENSES = ("none", "rms", "layernorm", "layernorm+bias")
HIDDEN = (576, 2048, 4096, 8192)
#: K = 6 is the label count of the project's datasets (CARER, TREC); K = 1 and 2 give the widest
#: BLOCK_D (and K = 1 a constant K); MAX_LABELS the largest bases tile.
LABELS = (1, 2, 6, 1024)
#: batches at S = 25 spaces: one program per space, a few spaces per program, one program per sample
#: (group_size 1 and n_groups 1 are compile-time constants to Triton)
BATCHES = (1, 32, 1024)
SPACES = 25
TOKENS = (128, 1)  # the registered op: [S, B, T, D] states, or the medium-token rows [S, B, D] (T = 1)


def triton_missing() -> str | None:
    """Why Triton cannot compile for CUDA here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # ImportError, or a broken backend
        return f"Triton's CUDA backend is not installed ({type(exc).__name__}: {exc})"
    return None


@dataclass(frozen=True)
class TritonCase:
    """One input situation of a launcher; several map to the same specialization."""

    launcher: str  # "list" (deviations_triton) or "op" (torch.ops.salf_triton.deviations)
    dtype: str
    lens: str
    metric: str
    hidden: int
    labels: int
    batch: int
    tokens: int = 128


def _case_grid() -> list[TritonCase]:
    """Every value of every axis; the kernel body's axes (dtype x lens x metric) in full product for the
    list launcher, one pass through them for the op; the shape axes (D x K, batch, T) at bfloat16."""
    from salf_engine.deviation.contract import METRICS

    body = [(d, lens, m) for d in DTYPES for lens in LENSES for m in METRICS]
    cases = [TritonCase("list", d, lens, m, D, 6, 32) for d, lens, m in body for D in HIDDEN]
    cases += [TritonCase("op", DTYPES[i % 3], lens, m, D, 6, 32)
              for i, (lens, m) in enumerate((lens, m) for lens in LENSES for m in METRICS) for D in HIDDEN]
    for launcher in ("list", "op"):
        cases += [TritonCase(launcher, "bfloat16", "layernorm+bias", "ce", D, K, 32)
                  for D in HIDDEN for K in LABELS]
        for tokens in TOKENS if launcher == "op" else TOKENS[:1]:
            cases += [TritonCase(launcher, "bfloat16", "rms", "cosine", 4096, 6, B, tokens) for B in BATCHES]
    return cases


def _launch(case: TritonCase, gpu: Gpu):
    """(grid, args, kwargs) the launcher builds for ``case`` on ``gpu``, from meta tensors (shapes,
    strides and dtypes without memory; their data pointers are 0, as aligned as real allocations)."""
    import torch
    from salf_engine.kernels import deviation as kdev

    from salf_engine.deviation.contract import check_deviation_inputs
    from salf_engine.deviation.semantics import LensSpec

    meta = torch.device("meta")
    dtype = getattr(torch, case.dtype)
    D, K, B, S, T = case.hidden, case.labels, case.batch, SPACES, case.tokens
    kind = case.lens.split("+")[0]
    bias = torch.zeros(D, device=meta) if case.lens.endswith("+bias") else None
    lens = None if kind == "none" else LensSpec(kind, torch.ones(D, device=meta), bias)
    bases = torch.zeros(K, D, device=meta)
    labels = torch.zeros(B, dtype=torch.int64, device=meta)
    out = torch.empty(B, S, device=meta)
    group_size = kdev.group_size_for(gpu.sms, B, S)
    if case.launcher == "list":
        states = [torch.empty(B, T, D, dtype=dtype, device=meta) for _ in range(S)]
        inp = check_deviation_inputs(states, labels, labels, bases, lens, case.metric, validate=False)
        return kdev.list_launch(inp, out, group_size)
    states = torch.empty(S, B, T, D, dtype=dtype, device=meta)
    if T == 1:
        states = states[:, :, 0]  # the medium-token rows [S, B, D], as the dispatcher gathers them
    args = kdev.stacked_op_args(states, labels, labels, bases, lens, case.metric, validate=False,
                                group_size=group_size)
    return kdev.stacked_launch(*args, out)


_TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32"}


def specialize(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) for ``fn[grid](*args, **kwargs)``, by the rules of
    Triton's JIT: tensors become typed pointers, ints equal to 1 constants, other ints i32/i64,
    floats fp32; pointers and ints divisible by 16 get ``tt.divisibility`` 16."""
    import torch

    names = list(fn.arg_names)
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    values = dict(zip(names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        divisible = None  # None: no attribute (floats, bools); False: an empty one (as the JIT gives)
        if name in constexpr_names or (type(value) is int and value == 1):
            signature[name] = "constexpr"
            constexprs[(i,)] = value
            attrs[(i,)] = []
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
            divisible = value.data_ptr() % 16 == 0
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
            divisible = value % 16 == 0
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: no Triton type for {type(value).__name__}")
        if divisible is not None:
            attrs[(i,)] = [["tt.divisibility", 16]] if divisible else []
    return signature, constexprs, attrs, options


@dataclass
class TritonSpec:
    """One specialization (what Triton compiles once) and the cases that lead to it."""

    gpu: Gpu
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list[TritonCase]

    @property
    def key(self) -> str:
        return _digest(self.gpu.cc, self.signature, sorted(map(str, self.constexprs.items())),
                       sorted(map(str, self.attrs.items())), self.options)

    def constexpr(self, name: str):
        from salf_engine.kernels.deviation import deviation_kernel

        i = list(deviation_kernel.arg_names).index(name)
        return self.constexprs.get((i,), self.constexprs.get(name))


def triton_cases(gpu: Gpu) -> list[TritonSpec]:
    """The distinct specializations the launchers (``list_launch``, ``stacked_launch``, with
    ``kernel_meta`` and ``group_size_for``) pick for the case grid on ``gpu``, in grid order."""
    from salf_engine.kernels.deviation import deviation_kernel

    fn = _jit(deviation_kernel)
    specs: dict[str, TritonSpec] = {}
    for case in _case_grid():
        _grid, args, kwargs = _launch(case, gpu)
        spec = TritonSpec(gpu, *specialize(fn, args, kwargs), cases=[case])
        if spec.key in specs:
            specs[spec.key].cases.append(case)
        else:
            specs[spec.key] = spec
    return list(specs.values())


def _jit(kernel):
    """The JITFunction of ``kernel`` (the test suite imports the kernels under the interpreter, which
    wraps them in an InterpretedFunction holding the Python function)."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def compile_triton(specs: list[TritonSpec], use_cache: bool = True) -> list[dict]:
    """Compile each spec for its GPU: registers, local memory (stack + local: where spills go), shared
    memory (static + dynamic) and warps of the cubin, one dict per spec.

    Cached per (kernel source, Triton version, specialization). What is not cached is compiled in a
    fresh Python without ``TRITON_INTERPRET``: a process that imported ``triton.language`` under the
    interpreter (as the test suite's conftest does) cannot compile for a GPU any more.
    """
    import triton
    from salf_engine.kernels import deviation as kdev

    source = Path(kdev.__file__).read_bytes()
    keys = [_digest("triton", triton.__version__, source, spec.key) for spec in specs]
    todo = {k: spec for k, spec in zip(keys, specs, strict=True) if not (use_cache and _load(k))}
    if todo:
        jobs = [dict(key=k, cc=spec.gpu.cc, signature=spec.signature, options=spec.options,
                     constexprs=[[i, v] for (i,), v in spec.constexprs.items()],
                     attrs=[[i, a] for (i,), a in spec.attrs.items()]) for k, spec in todo.items()]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        n = max(1, min(len(jobs), (os.cpu_count() or 2) // 2))  # workers: half the cores
        with tempfile.TemporaryDirectory(prefix="salf-triton-") as tmp:
            if not use_cache:  # Triton's own cache too
                env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton-cache")
            workers = []
            for i in range(n):
                job, log = Path(tmp) / f"jobs{i}.json", Path(tmp) / f"log{i}.txt"
                job.write_text(json.dumps(jobs[i::n]))
                with log.open("w") as f:
                    cmd = [sys.executable, __file__, "--triton-worker", str(job)]
                    workers.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log))
            failed = [log for worker, log in workers if worker.wait() != 0]
            if failed:
                tail = failed[0].read_text(errors="replace")[-10000:]
                raise RuntimeError(f"compiling the Triton kernel failed:\n{tail}")
    results = [_load(k) for k in keys]
    for k, res in zip(keys, results, strict=True):
        if res is None:
            raise RuntimeError(f"no compile result for {k} in {cache_dir()}")
        res["cached"] = res["cached"] and k not in todo
    return results


def _triton_worker(jobs: list[dict]) -> None:
    """Compile the jobs ``compile_triton`` sends (in this fresh process) and store their results."""
    import triton
    from salf_engine.kernels.deviation import deviation_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for job in jobs:
        start = time.perf_counter()
        constexprs = {(i,): v for i, v in job["constexprs"]}
        attrs = {(i,): a for i, a in job["attrs"]}
        src = ASTSource(fn=deviation_kernel, signature=job["signature"], constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", job["cc"], 32), options=job["options"])
        (res,) = cubin_usage(kernel.asm["cubin"]).values()
        _store(job["key"], dict(regs=res["REG"], local=res["STACK"] + res["LOCAL"],
                                smem=res["SHARED"] + kernel.metadata.shared, warps=kernel.metadata.num_warps,
                                seconds=round(time.perf_counter() - start, 2)))


def _cuobjdump() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def cubin_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """Per function of a cubin: REG, STACK, SHARED, LOCAL (bytes; registers per thread) by cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True,
                              text=True,
                              check=True).stdout
    out, name = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            name = None
    return out


# --------------------------------------------------------------------------- the CUDA op (nvcc)


def nvcc_missing() -> str | None:
    """Why the CUDA op cannot be compiled here, or None."""
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        return "ninja is not installed"
    if _cuda_home() is None:
        return "nvcc is not on PATH (and CUDA_HOME is not set)"
    return None


def _cuda_home() -> str | None:
    """The CUDA toolkit: CUDA_HOME / CUDA_PATH, else the one holding the nvcc on PATH (a wrapper script
    is followed through its exec line)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home if (Path(home) / "bin" / "nvcc").exists() else None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    path = Path(nvcc).resolve()
    if path.stat().st_size < 4096:  # a shell wrapper ("exec /usr/local/cuda-13.0/bin/nvcc "$@"")
        if m := re.search(r"(/\S+)/bin/nvcc\b", path.read_text(errors="replace")):
            return m.group(1)
    return str(path.parent.parent)


def _ninja() -> str:
    local = Path(sys.executable).parent / "ninja"
    return str(local) if local.exists() else "ninja"


CUDA_ARCHES = ("8.0", "9.0")


def _write_build(build: Path, include: Path) -> tuple[list[str], str]:
    """The ninja file ``torch.utils.cpp_extension`` writes for the op with CUDA; (objects, its text)."""
    from torch.utils import cpp_extension

    from salf_engine.deviation.cpp_op import _csrc_dir, build_flags

    src = _csrc_dir()
    cflags, cuda_cflags = build_flags(os.environ.get("SALF_CPP_NATIVE", "1") != "0")
    env = {"TORCH_CUDA_ARCH_LIST": ";".join(CUDA_ARCHES)}
    with mock.patch.object(cpp_extension, "CUDA_HOME", _cuda_home()), mock.patch.dict(os.environ, env):
        cpp_extension._write_ninja_file_to_build_library(
            path=str(build / "build.ninja"), name="salf_ops_check",
            sources=[str(src / "deviation.cpp"), str(src / "deviation_cuda.cu")],
            extra_cflags=cflags + ["-Wall", "-Wextra"], extra_cuda_cflags=cuda_cflags + ["-Xptxas=-v"],
            extra_sycl_cflags=[], extra_ldflags=[], extra_include_paths=[str(src), str(include)],
            with_cuda=True, with_sycl=False, is_standalone=False,
        )
    return ["deviation.o", "deviation_cuda.cuda.o"], (build / "build.ninja").read_text()


def compile_cuda_op(use_cache: bool = True) -> dict:
    """Compile the op's objects as its build would; warnings per file, ptxas usage per kernel and arch.

    Returns ``{"ok", "log", "warnings": [(file, line, text)], "project_warnings": [...], "kernels":
    [{"arch", "dtype", "regs", "stack", "spill_stores", "smem"}], "seconds"}``.
    """
    import torch
    from torch.utils import cpp_extension

    from salf_engine.deviation.cpp_op import _csrc_dir

    src = _csrc_dir()
    with tempfile.TemporaryDirectory(prefix="salf-nvcc-") as tmp:
        build, include = Path(tmp) / "build", Path(tmp) / "include"
        header = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"
        (include / header).parent.mkdir(parents=True)
        if not any((Path(p) / header).is_file() for p in cpp_extension.include_paths()):  # a CPU wheel
            (include / header).write_text(CUDA_CMAKE_MACROS)
        build.mkdir()
        objects, ninja_text = _write_build(build, include)
        versions = [subprocess.run([cmd, "--version"], capture_output=True, text=True).stdout
                    for cmd in (str(Path(_cuda_home()) / "bin" / "nvcc"), os.environ.get("CXX", "c++"))]
        sources = [p.read_bytes() for p in sorted(src.glob("*")) if p.suffix in (".cpp", ".cu", ".h")]
        key = _digest("cuda-op", torch.__version__, ninja_text.replace(tmp, "<tmp>"), versions,
                      *sources)

        def run() -> dict:
            start = time.perf_counter()
            done = subprocess.run([_ninja(), "-C", str(build), *objects], capture_output=True, text=True)
            log = (done.stdout + done.stderr).replace(tmp, "<tmp>")
            return dict(ok=done.returncode == 0, log=log[-20000:], warnings=_warnings(log),
                        kernels=_ptxas_usage(log), seconds=round(time.perf_counter() - start, 1))

        result = _cached(key, use_cache, run)
    own = [w for w in result["warnings"] if w[0] == "ptxas" or Path(w[0]).resolve().parent == src.resolve()]
    return {**result, "project_warnings": own}


def _warnings(log: str) -> list[tuple[str, int, str]]:
    """(file, line, message) of every compiler warning: gcc's ``f:l:c: warning:``, nvcc's
    ``f(l): warning #n-D:`` and ptxas's (file ``ptxas``: it only sees the project's device code)."""
    found = []
    for line in log.splitlines():
        m = re.match(r"(\S+?):(\d+):(?:\d+:)? warning: (.*)", line) or re.match(
            r"(\S+?)\((\d+)\): warning (.*)", line)
        if m:
            found.append((m.group(1), int(m.group(2)), m.group(3).strip()))
        elif m := re.match(r"ptxas warning\s*: (.*)", line):
            found.append(("ptxas", 0, m.group(1).strip()))
    return found


_DEMANGLED = {"IfE": "float32", "IdE": "float64", "IN3c108BFloat16E": "bfloat16", "IN3c104HalfE": "float16"}


def _ptxas_usage(log: str) -> list[dict]:
    """``-Xptxas=-v`` lines of the deviation kernel: one entry per (arch, dtype)."""
    rows, current = [], None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
            name, arch = m.groups()
            dtype = next((v for k, v in _DEMANGLED.items() if f"deviation_kernel{k}" in name), name)
            current = dict(arch=arch, dtype=dtype)
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            smem = re.search(r"(\d+) bytes smem", line)
            current.update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
            rows.append(current)
            current = None
    return rows


def cuda_op_smem(labels: int) -> int:
    """Dynamic shared memory of the CUDA kernel's launch for K labels (``shmem`` in
    ``csrc/deviation_cuda.cu``: 3 K + kWarps * kMaxReduce + kMaxReduce floats, kWarps = 8,
    kMaxReduce = 28)."""
    return 4 * (3 * labels + 8 * 28 + 28)


CUDA_OP_THREADS = 256  # kThreads in csrc/deviation_cuda.cu


# --------------------------------------------------------------------------- the table


def _spec_row(spec: TritonSpec, res: dict) -> list:
    from salf_engine.kernels.deviation import deviation_kernel

    names = list(deviation_kernel.arg_names)
    const = {names[i]: v for (i,), v in spec.constexprs.items()}
    first = spec.cases[0]
    fixed = [n for n in ("group_size", "n_groups", "K", "n_time_stacked") if n in const]
    blocks, occ = occupancy(spec.gpu, res["regs"], res["warps"], res["smem"])
    return [
        first.launcher, first.dtype, first.lens, first.metric,
        ", ".join(str(d) for d in sorted({c.hidden for c in spec.cases})),
        ", ".join(str(k) for k in sorted({c.labels for c in spec.cases})),
        ", ".join(f"{n}=1" for n in fixed) or "-",
        f"{const['BLOCK_D']} x {const['BLOCK_K']}", res["warps"], res["regs"], res["local"], res["smem"],
        blocks,
        f"{100 * occ:.0f} %",
    ]


def run_all(use_cache: bool = True, log=print) -> dict:
    """Compile everything that can be compiled here; ``{"triton": [(spec, result)], "cuda": result or
    None, "skipped": [reasons], "seconds": {...}}``."""
    out: dict = {"triton": [], "cuda": None, "skipped": [], "seconds": {}}
    start = time.perf_counter()
    if (why := triton_missing()) is None:
        for gpu in GPUS:
            specs = triton_cases(gpu)
            results = compile_triton(specs, use_cache)
            out["triton"] += list(zip(specs, results, strict=True))
            log(f"triton sm_{gpu.cc}: {len(specs)} specializations compiled "
                f"({sum(not r['cached'] for r in results)} now, the others cached)")
    else:
        out["skipped"].append(why)
    out["seconds"]["triton"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    if (why := nvcc_missing()) is None:
        out["cuda"] = compile_cuda_op(use_cache)
        log(f"cuda op: {'compiled' if out['cuda']['ok'] else 'FAILED'}, "
            f"{len(out['cuda']['project_warnings'])} warnings in csrc/")
    else:
        out["skipped"].append(why)
    out["seconds"]["cuda"] = round(time.perf_counter() - start, 1)
    return out


def problems(results: dict) -> list[str]:
    """What fails the check: a Triton specialization with local memory (spills), a CUDA op build that
    failed, warned in the project's files, or spilled."""
    bad = [f"sm_{s.gpu.cc} {s.cases[0]}: {r['local']} bytes of local memory per thread (spills)"
           for s, r in results["triton"] if r["local"]]
    cuda = results["cuda"]
    if cuda is not None:
        if not cuda["ok"]:
            bad.append("the CUDA op does not compile:\n" + cuda["log"][-6000:])
        bad += [f"warning in {f}:{line}: {msg}" for f, line, msg in cuda["project_warnings"]]
        bad += [f"CUDA op {k['arch']} {k['dtype']}: {k['spill_stores']} bytes of spill stores"
                for k in cuda["kernels"] if k.get("spill_stores")]
        if cuda["ok"] and {(k["arch"], k["dtype"]) for k in cuda["kernels"]} != {
                (f"sm_{a.replace('.', '')}", d) for a in CUDA_ARCHES for d in _DEMANGLED.values()}:
            bad.append(f"CUDA op: expected ptxas lines for every arch and dtype, got {cuda['kernels']}")
    return bad


def write_markdown(path: Path, results: dict) -> None:
    import torch
    import triton
    from bench_utils import markdown_table

    lines = [
        "# GPU code compiled without a GPU: registers, spills, shared memory, occupancy", "",
        f"Written by `bench/kernel_compile.py` (also run by `tests/test_kernel_compile.py` and "
        f"`bench/gpu_suite.sh`); Triton {triton.__version__}, torch {torch.__version__}, "
        f"{_nvcc_version()}. Occupancy: resident blocks per SM and the share of the SM's 64 warp slots "
        "they fill, from registers (allocated per warp in units of 256), shared memory (plus the runtime's "
        "1 KiB per block) and the warp and block limits; H100 SXM (sm_90, 228 KiB shared memory per SM), "
        "A100 (sm_80, 164 KiB). Nothing here ran on a GPU.", "",
        "## Triton: `deviation_kernel`", "",
        "Each row is one specialization the launchers pick (`kernel_meta`, `group_size_for`, "
        "`list_launch` / `stacked_launch` in `kernels/deviation.py`): `list` = `deviations_triton` (the "
        "eager path), `op` = `torch.ops.salf_triton.deviations`. `D` and `K` list the cases that give "
        "it; `consts` the arguments Triton fixes because they equal 1 (one space per program, one "
        "program per sample, K = 1, gathered rows T = 1). `local` = stack + local memory per thread "
        "(where spills go); it must be 0. Smem = static + dynamic bytes per block.", "",
    ]
    head = ["launcher", "dtype", "lens", "metric", "D", "K", "consts", "BLOCK_D x K", "warps", "regs",
            "local B", "smem B", "blocks/SM", "occupancy"]
    for gpu in GPUS:
        rows = [_spec_row(s, r) for s, r in results["triton"] if s.gpu is gpu]
        if rows:
            lines += [f"### {gpu.name} (sm_{gpu.cc}): {len(rows)} specializations", ""]
            lines += markdown_table(head, rows, align="llllllllrrrrrr") + [""]
    cuda = results["cuda"]
    lines += ["## CUDA C++: `csrc/deviation_cuda.cu`", ""]
    if cuda is None:
        lines += ["Not compiled here: " + "; ".join(results["skipped"]), ""]
    else:
        lines += [
            f"nvcc `-c` for sm_80 and sm_90 with the flags of the op's `torch.utils.cpp_extension` build; "
            f"{CUDA_OP_THREADS} threads per block; ptxas `-v`. Shared memory = static + the launch's dynamic "
            f"bytes at K = 6 and K = 1024. Warnings in `csrc/`: {len(cuda['project_warnings'])}; in torch's "
            f"headers: {len(cuda['warnings']) - len(cuda['project_warnings'])}.", "",
        ]
        rows = []
        for k in sorted(cuda["kernels"], key=lambda k: (k["arch"], k["dtype"])):
            gpu = next(g for g in GPUS if f"sm_{g.cc}" == k["arch"])
            cells = [k["arch"], gpu.name, k["dtype"], k["regs"], k["stack"], k["spill_stores"]]
            for labels in (6, 1024):
                smem = k["smem"] + cuda_op_smem(labels)
                blocks, occ = occupancy(gpu, k["regs"], CUDA_OP_THREADS // 32, smem)
                cells += [smem, f"{blocks} ({100 * occ:.0f} %)"]
            rows.append(cells)
        lines += markdown_table(["arch", "GPU", "dtype", "regs", "stack B", "spill B", "smem K=6",
                                 "blocks/SM K=6", "smem K=1024", "blocks/SM K=1024"], rows,
                                align="lllrrrrrrr") + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def _nvcc_version() -> str:
    home = _cuda_home()
    if home is None:
        return "no nvcc"
    nvcc = str(Path(home) / "bin" / "nvcc")
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+),", text)
    return f"nvcc {m.group(1)}" if m else "nvcc"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernel_compile.md")
    ap.add_argument("--no-cache", action="store_true", help=f"compile again (cache: {cache_dir()})")
    ap.add_argument("--triton-worker", type=Path, help=argparse.SUPPRESS)  # a job file of compile_triton
    args = ap.parse_args(argv)
    if args.triton_worker:
        _triton_worker(json.loads(args.triton_worker.read_text()))
        return 0
    start = time.perf_counter()
    results = run_all(use_cache=not args.no_cache)
    write_markdown(args.out, results)
    bad = problems(results)
    for why in results["skipped"]:
        print(f"skipped: {why}")
    for problem in bad:
        print(f"error: {problem}", file=sys.stderr)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
