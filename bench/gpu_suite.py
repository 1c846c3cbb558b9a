"""The benchmarks of the GPU suite (`bench/gpu_suite.sh`): the deviation op and the training step.

Deviation op (bfloat16, K = 6 labels, T = 128, RMSNorm lens, cosine): B = 8, 32, 128, 512 at the
Qwen2-0.5B, Qwen2-7B, Llama-3-8B and Gemma-2-9B shapes; providers torch (the eager reference
``deviations_reference``), torch_lean (the same math in a few eager ops), torch_compile
(``torch.compile(torch_lean, dynamic=True)``), triton and cuda (the CUDA C++ op). Time by
``triton.testing.do_bench``; GB/s = bytes that must be read / median, next to the HBM bandwidth
measured in the same run by a 1 GiB device-to-device copy; speed-ups over torch eager and torch.compile.

Training step at real sizes, random-init models built from configs (nothing downloaded):
``qwen2-1.5b`` (Qwen2-1.5B shape, untied head) in full bf16 fine-tuning, and ``llama3-8b-lora``
(Llama-3-8B shape, bf16, PEFT LoRA r = 16 on every projection). Configurations: the baseline (full
fine-tuning, resp. LoRA at every layer), the truncated runner at k = m/4, m/2, 3m/4, and static
``requires_grad=False`` freezing at m/2; one shared AdamW; one step of each configuration per round
in a fresh random order; median step time, phase times, the activations autograd saves, and on a GPU
``torch.cuda.max_memory_allocated`` over the step, all as ratios to the baseline of the same run.

``--dry-run``: CPU, float32, tiny shapes, a few rounds; the Triton kernel runs under the interpreter
(TRITON_INTERPRET=1; its times are no timing). The test suite runs it so the script never rots.

Writes ``deviation.csv``, ``step.csv``, ``env.json`` and ``gpu_suite.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_deviation import MODELS, bytes_read, make_case, provider_fn, torch_lean  # noqa: E402
from bench_utils import (  # noqa: E402
    cached_forward,
    env_info,
    markdown_table,
    measure_bandwidth,
    quantiles,
    salf_half_depths,
    step_compositions,
    sync,
    time_cpu,
    time_gpu,
    timed_step,
    write_csv,
)

__all__ = ["DEV_FIELDS", "STEP_FIELDS", "run_deviation", "run_step", "main"]

PHASES = ("step", "fwd", "bwd", "opt")
DEV_PROVIDERS = ("torch", "torch_lean", "torch_compile", "triton", "cuda")
DEV_FIELDS = [
    "model", "batch", "layers", "hidden", "labels", "tokens", "dtype", "provider", "median_us", "p20_us",
    "p80_us", "gbps", "hbm_gbps", "pct_hbm", "x_torch", "x_compile", "timer", "note",
]
STEP_FIELDS = [
    "model", "params_m", "batch", "seq", "dtype", "config", "depth", "layers", "median_s", "p20_s", "p80_s",
    "ratio", "fwd_s", "bwd_s", "opt_s", "ideal_ratio", "vs_ideal", "saved_act_mib", "saved_act_ratio",
    "peak_mib", "peak_ratio", "step_mem_mib", "step_mem_ratio", "steps",
]


@dataclass(frozen=True)
class StepModel:
    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    lora: bool
    batch: int
    seq: int


GPU_DEV = dict(models={k: MODELS[k] for k in MODELS}, batches=(8, 32, 128, 512), tokens=128, dtype="bfloat16")
DRY_DEV = dict(models={"tiny-rms": (3, 64, "rms")}, batches=(2, 4), tokens=4, dtype="float32")
GPU_STEP = {
    "qwen2-1.5b": StepModel("qwen2", 28, 1536, 8960, 12, 2, 151936, False, 8, 512),
    "llama3-8b-lora": StepModel("llama", 32, 4096, 14336, 32, 8, 128256, True, 4, 512),
}
DRY_STEP = {
    "tiny-qwen2": StepModel("qwen2", 4, 64, 128, 4, 2, 256, False, 2, 16),
    "tiny-llama-lora": StepModel("llama", 4, 64, 128, 4, 2, 256, True, 2, 16),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Budget:
    """Wall-clock budget of the benchmarks; parts that would start after it are skipped and listed."""

    def __init__(self, seconds: float | None) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds
        self.skipped: list[str] = []

    def left(self) -> bool:
        return self.seconds is None or time.perf_counter() - self.start < self.seconds

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        print(f"skipped (time budget): {what}", flush=True)


# --------------------------------------------------------------------------- deviation op


def _fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None or x != x else f"{x:.{digits}f}"


def run_deviation(device: torch.device, dry: bool, hbm: float, budget: Budget) -> list[dict]:
    spec = DRY_DEV if dry else GPU_DEV
    dtype = _DTYPES[spec["dtype"]]
    gpu = device.type == "cuda"
    rows: list[dict] = []
    for model, shape in spec["models"].items():
        compiled = torch.compile(torch_lean, dynamic=True)  # one compile per model (list length = m+1)
        for batch in spec["batches"]:
            if not budget.left():
                budget.skip(f"deviation {model} B={batch}")
                continue
            case = make_case(model, batch, tokens=spec["tokens"], dtype=dtype, device=device, shape=shape)
            shape_rows = []
            for provider in DEV_PROVIDERS:
                fn, why, timer = _dev_provider(provider, case, compiled, dry)
                row = {
                    "model": model, "batch": batch, "layers": case.layers, "hidden": case.hidden,
                    "labels": case.labels, "tokens": case.tokens, "dtype": spec["dtype"],
                    "provider": provider,
                    "hbm_gbps": _fmt(hbm, 1), "timer": timer, "note": why,
                }
                if fn is not None:
                    med, p20, p80 = time_gpu(fn) if gpu else time_cpu(fn, min_time=0.02, min_reps=3)
                    gbps = bytes_read(case) / (med * 1e-6) / 1e9
                    row.update(median_us=_fmt(med), p20_us=_fmt(p20), p80_us=_fmt(p80), gbps=f"{gbps:.4g}",
                               pct_hbm=f"{100 * gbps / hbm:.3g}")
                    print(f"{case.shape:<52} {provider:<14} {med:10.1f} us  {gbps:8.1f} GB/s", flush=True)
                else:
                    print(f"{case.shape:<52} {provider:<14} skipped: {why}", flush=True)
                shape_rows.append(row)
            times = {r["provider"]: float(r["median_us"]) for r in shape_rows if r.get("median_us")}
            for r in shape_rows:
                if r.get("median_us"):
                    med = float(r["median_us"])
                    r["x_torch"] = _fmt(times["torch"] / med) if "torch" in times else ""
                    r["x_compile"] = _fmt(times["torch_compile"] / med) if "torch_compile" in times else ""
            rows += shape_rows
            del case
            if gpu:
                torch.cuda.empty_cache()
    return rows


def _dev_provider(name: str, case, compiled, dry: bool) -> tuple[Callable[[], object] | None, str, str]:
    gpu = case.device.type == "cuda"
    timer = "do_bench" if gpu else "loop"
    c = case
    if name == "torch_compile":
        return lambda: compiled(c.states, c.last_index, c.label_ids, c.bases, c.lens.weight), "", timer
    if name == "triton" and not gpu:
        if not dry or os.environ.get("TRITON_INTERPRET") != "1":
            return None, "needs a GPU (or the interpreter in the dry run)", timer
        from salf_engine.kernels.deviation import deviations_triton

        fn = lambda: deviations_triton(c.states, c.last_index, c.label_ids, c.bases, c.lens, "cosine")  # noqa: E731
        return fn, "interpreter: no timing", "interpreter"
    fn, why = provider_fn(name, case)
    return fn, why, timer


# --------------------------------------------------------------------------- training step


@dataclass
class StepConfig:
    name: str
    depth: int
    forward: Callable[[], torch.Tensor]
    frozen: list[torch.nn.Parameter] = field(default_factory=list)
    times: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in PHASES})
    saved: float = 0.0
    peak: list[float] = field(default_factory=list)
    step_mem: list[float] = field(default_factory=list)


def build_model(spec: StepModel, device: torch.device, dtype: torch.dtype):
    """A random-init causal LM of the given shape on ``device`` (LoRA-wrapped when ``spec.lora``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[spec.family]
    cfg = cls(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads, max_position_embeddings=max(4096, spec.seq),
        tie_word_embeddings=False, pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if spec.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
        model = get_peft_model(model, lora)
    return model.train()


def _mib(nbytes: float) -> float:
    return nbytes / 2**20


def _one_step(cfg: StepConfig, model, targets, opt, device, *, measure_saved: bool = False) -> None:
    gpu = device.type == "cuda"
    if gpu:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times, saved, _grads = timed_step(cfg.forward, targets, cfg.frozen, opt, device,
                                      model=model if measure_saved else None)
    if measure_saved:
        cfg.saved = _mib(saved)
        return
    for key, value in times.items():
        cfg.times[key].append(value)
    if gpu:
        peak = torch.cuda.max_memory_allocated(device)
        cfg.peak.append(_mib(peak))
        cfg.step_mem.append(_mib(peak - base))


def run_step(device: torch.device, dry: bool, budget: Budget, *, rounds: int, warmup: int) -> list[dict]:
    dtype = torch.float32 if dry else torch.bfloat16
    rows: list[dict] = []
    for name, spec in (DRY_STEP if dry else GPU_STEP).items():
        if not budget.left():
            budget.skip(f"step {name}")
            continue
        rows += _bench_model(name, spec, device, dtype, budget, rounds=rounds, warmup=warmup)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _bench_model(name: str, spec: StepModel, device: torch.device, dtype: torch.dtype, budget: Budget, *,
                 rounds: int, warmup: int) -> list[dict]:
    from salf_engine.models.families import decoder_parts
    from salf_engine.runner.truncated import TruncatedRunner

    t_build = time.perf_counter()
    model = build_model(spec, device, dtype)
    parts = decoder_parts(model)
    m = parts.num_layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, spec.vocab, (spec.batch, spec.seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    targets = torch.randint(4, spec.vocab, (spec.batch,), generator=gen).to(device)
    runner = TruncatedRunner(model)

    def plain() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]

    half = m // 2
    configs = [StepConfig("lora" if spec.lora else "full", 0, plain)]
    for k in (m // 4, half, (3 * m) // 4):
        configs.append(StepConfig(f"runner_k{k}", k, lambda k=k: runner(ids, mask, depth=k).logits))
    frozen = [p for layer in parts.layers[:half] for p in layer.parameters() if p.requires_grad]
    if not spec.lora:
        frozen.append(parts.embed.weight)
    configs.append(StepConfig(f"static_k{half}", half, plain, frozen=frozen))
    configs.append(StepConfig(f"cached_k{half}", half, cached_forward(runner, ids, mask, half)))
    for step_name, forward in step_compositions(runner, ids, mask, salf_half_depths(spec.batch, m)).items():
        configs.append(StepConfig(step_name, half, forward))
    trainable = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    opt = torch.optim.AdamW(trainable, lr=1e-7, **({"fused": True} if device.type == "cuda" else {}))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"step {name}: {n_params / 1e6:.0f}M params, m={m}, "
          f"built in {time.perf_counter() - t_build:.1f}s", flush=True)
    for cfg in configs:  # saved-activation pass, also the first warm-up step
        _one_step(cfg, model, targets, opt, device, measure_saved=True)
    order_rng = random.Random(0)
    for r in range(warmup + rounds):
        if not budget.left():
            budget.skip(f"step {name} rounds {max(1, r + 1 - warmup)}..{rounds}")
            break
        order = configs[:]
        order_rng.shuffle(order)
        for cfg in order:
            _one_step(cfg, model, targets, opt, device)
        if r < warmup:
            for cfg in configs:
                cfg.times = {k: [] for k in cfg.times}
                cfg.peak, cfg.step_mem = [], []
        else:
            print(f"  round {r + 1 - warmup}/{rounds}: "
                  + " ".join(f"{c.name}={c.times['step'][-1]:.3f}s" for c in configs), flush=True)
    return _step_rows(name, spec, configs, m, n_params, dtype)


def _step_rows(name, spec, configs, m, n_params, dtype) -> list[dict]:
    base = configs[0]
    if not base.times["step"]:
        return []

    def med(values: list[float]) -> float | None:
        return quantiles(values)[0] if values else None

    b_step, b_fwd, b_bwd = med(base.times["step"]), med(base.times["fwd"]), med(base.times["bwd"])
    b_peak, b_mem = med(base.peak), med(base.step_mem)
    rows = []
    for cfg in configs:
        t = cfg.times
        step = med(t["step"])
        if step is None:
            continue
        fwd, bwd = med(t["fwd"]), med(t["bwd"])
        keep = (m - cfg.depth) / m
        ideal = (b_fwd + b_bwd * keep) / (b_fwd + b_bwd)  # forward + that share of the layers' backward
        peak, mem = med(cfg.peak), med(cfg.step_mem)
        rows.append({
            "model": name, "params_m": f"{n_params / 1e6:.0f}", "batch": spec.batch, "seq": spec.seq,
            "dtype": str(dtype).removeprefix("torch."), "config": cfg.name, "depth": cfg.depth, "layers": m,
            "median_s": f"{step:.4f}", "p20_s": f"{quantiles(t['step'])[1]:.4f}",
            "p80_s": f"{quantiles(t['step'])[2]:.4f}", "ratio": f"{step / b_step:.3f}",
            "fwd_s": f"{fwd:.4f}", "bwd_s": f"{bwd:.4f}", "opt_s": f"{med(t['opt']):.4f}",
            "ideal_ratio": f"{ideal:.3f}", "vs_ideal": f"{(fwd + bwd) / (b_fwd + b_bwd) / ideal:.3f}",
            "saved_act_mib": f"{cfg.saved:.1f}",
            "saved_act_ratio": f"{cfg.saved / base.saved:.3f}" if base.saved else "",
            "peak_mib": _fmt(peak, 1), "peak_ratio": _fmt(peak / b_peak, 3) if peak and b_peak else "",
            "step_mem_mib": _fmt(mem, 1), "step_mem_ratio": _fmt(mem / b_mem, 3) if mem and b_mem else "",
            "steps": len(t["step"]),
        })
    return rows


# --------------------------------------------------------------------------- report


def _per_model(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(model, its rows) in the order the models first appear."""
    models = dict.fromkeys(r["model"] for r in rows)
    return [(model, [r for r in rows if r["model"] == model]) for model in models]


def write_markdown(path: Path, env: dict, dev_rows: list[dict], step_rows: list[dict], *, dry: bool,
                   skipped: list[str], pytest_summary: str) -> None:
    lines = [
        "# GPU suite" + (" (dry run: CPU, tiny shapes, no GPU numbers)" if dry else ""),
        "",
        f"- device: {env['device']}" + (f", driver {env['driver']}" if env.get("driver") else ""),
        f"- torch {env['torch']}, triton {env['triton'] or '-'}, CUDA {env['cuda'] or '-'}, "
        f"Python {env['python']}",
        f"- commit {env['commit']}, {env['date']}",
        f"- measured copy bandwidth (read + write): {env['hbm_gbps']} GB/s",
        f"- `pytest -m cuda`: {pytest_summary or 'not run'}",
    ]
    if skipped:
        lines.append("- skipped: " + "; ".join(skipped))
    lines += ["", "## Deviation op", "",
              "Median us [p20, p80], GB/s of the bytes that must be read and % of the measured copy "
              "bandwidth, speed-up over torch eager (`x torch`) and torch.compile (`x compile`) in the same "
              "run.", ""]
    for model, mine in _per_model(dev_rows):
        head = mine[0]
        lines += [f"### {model}: m = {head['layers']}, D = {head['hidden']}, K = {head['labels']}, "
                  f"T = {head['tokens']}, {head['dtype']}", ""]
        table = []
        for r in mine:
            if not r.get("median_us"):
                table.append([r["batch"], r["provider"], "skipped: " + r["note"], "", "", "", ""])
                continue
            table.append([
                r["batch"], r["provider"], f"{r['median_us']} [{r['p20_us']}, {r['p80_us']}]", r["gbps"],
                r["pct_hbm"], r["x_torch"], r["x_compile"],
            ])
        lines += markdown_table(["B", "provider", "us", "GB/s", "% copy bw", "x torch", "x compile"], table,
                                align="rllrrrr")
        lines.append("")
    lines += ["## Training step", "",
              "`ratio` = median step / the baseline's (full fine-tuning, or LoRA at every layer) in the same "
              "run; `ideal` = (forward + (1 - k/m) backward) / (forward + backward) from the baseline's "
              "phase times; `vs ideal` = this configuration's forward + backward against that; `saved act` = "
              "bytes autograd saves for backward (non-parameter tensors); `peak` = "
              "`torch.cuda.max_memory_allocated` over the step, `step mem` = peak minus what was allocated "
              "when the step began (activations, gradients, optimizer temporaries).", ""]
    for model, mine in _per_model(step_rows):
        head = mine[0]
        lines += [f"### {model}: {head['params_m']}M parameters, m = {head['layers']}, B = {head['batch']}, "
                  f"T = {head['seq']}, {head['dtype']}, {head['steps']} measured steps each", ""]
        keys = ["config", "median_s", "ratio", "ideal_ratio", "vs_ideal", "fwd_s", "bwd_s", "opt_s",
                "saved_act_mib", "saved_act_ratio", "peak_mib", "peak_ratio", "step_mem_mib",
                "step_mem_ratio"]
        table = [[r[k] for k in keys] for r in mine]
        lines += markdown_table(
            ["config", "median s", "ratio", "ideal", "vs ideal", "fwd s", "bwd s", "opt s", "saved act MiB",
             "act ratio", "peak MiB", "peak ratio", "step mem MiB", "step mem ratio"],
            table, align="lrrrrrrrrrrrrr",
        )
        lines.append("")
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) if out else Path(__file__).resolve().parent / "results" / "gpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few rounds")
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT, else bench/results/gpu")
    ap.add_argument("--skip-deviation", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--rounds", type=int, help="measured steps per configuration (default 6; dry run 2)")
    ap.add_argument("--budget-s", type=float, help="stop starting new parts after this (default 420 on GPU)")
    ap.add_argument("--pytest-summary", default="", help="last line of `pytest -m cuda` (from the script)")
    ap.add_argument("--skipped", action="append", default=[], help="parts the script skipped (repeatable)")
    args = ap.parse_args(argv)

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s if args.budget_s is not None else (None if dry else 420.0))
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    hbm = measure_bandwidth(device, nbytes=(64 << 20) if dry else (1 << 30))
    env = {**env_info(device), "hbm_gbps": f"{hbm:.1f}", "mode": "dry-run" if dry else "gpu"}
    print(f"# {env['device']} {env.get('driver', '')}; torch {env['torch']}; copy bandwidth {hbm:.1f} GB/s",
          flush=True)
    dev_rows = [] if args.skip_deviation else run_deviation(device, dry, hbm, budget)
    rounds = args.rounds or (2 if dry else 6)
    step_rows = [] if args.skip_step else run_step(device, dry, budget, rounds=rounds, warmup=1)
    env["total_s"] = f"{time.perf_counter() - budget.start:.1f}"
    skipped = args.skipped + budget.skipped
    write_csv(out / "deviation.csv", DEV_FIELDS, dev_rows)
    write_csv(out / "step.csv", STEP_FIELDS, step_rows)
    (out / "env.json").write_text(json.dumps({**env, "skipped": skipped}, indent=1) + "\n")
    write_markdown(out / "gpu_suite.md", env, dev_rows, step_rows, dry=dry, skipped=skipped,
                   pytest_summary=args.pytest_summary)
    print(f"wrote {out}/deviation.csv, step.csv, env.json, gpu_suite.md in {env['total_s']}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
