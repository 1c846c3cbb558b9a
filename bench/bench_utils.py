"""Shared helpers of the benchmarks: timing, percentiles, device / commit info, CSV and Markdown writing."""

from __future__ import annotations

import csv
import datetime as dt
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

__all__ = [
    "salf_half_depths",
    "step_compositions",
    "ROOT",
    "percentile",
    "quantiles_us",
    "time_cpu",
    "time_gpu",
    "sync",
    "git_commit",
    "utc_now",
    "cpu_name",
    "device_name",
    "driver_version",
    "env_info",
    "measure_bandwidth",
    "append_csv",
    "write_csv",
    "read_csv",
    "markdown_table",
    "SavedActivations",
    "timed_step",
    "quantiles",
    "time_samples",
]

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def quantiles(samples: Sequence[float], scale: float = 1.0) -> tuple[float, float, float]:
    """(median, p20, p80) of samples, times ``scale``."""
    return tuple(percentile(samples, q) * scale for q in (50, 20, 80))  # type: ignore[return-value]


def quantiles_us(samples_s: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in microseconds of samples in seconds."""
    return quantiles(samples_s, 1e6)


def time_samples(fn: Callable[[], object], *, warmup: int = 3, min_time: float = 0.5, min_reps: int = 10,
                 max_reps: int = 2000) -> list[float]:
    """Seconds per call of ``fn`` (the one CPU timing loop): ``warmup`` calls, then at least ``min_reps``
    timed calls and at least ``min_time`` seconds, at most ``max_reps`` calls."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def time_cpu(fn: Callable[[], object], *, min_time: float = 0.5, min_reps: int = 10, max_reps: int = 2000):
    """(median, p20, p80) microseconds of :func:`time_samples`."""
    return quantiles_us(time_samples(fn, min_time=min_time, min_reps=min_reps, max_reps=max_reps))


def time_gpu(fn: Callable[[], object]):
    """(median, p20, p80) microseconds from triton.testing.do_bench (L2 flushed between runs)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med * 1e3, p20 * 1e3, p80 * 1e3


def sync(device: torch.device | str) -> None:
    """Wait for the device (no-op on CPU), so that host timers measure finished work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def git_commit(dirty_paths: Iterable[str] = ()) -> str:
    """Short HEAD commit, with "-dirty" when one of ``dirty_paths`` has uncommitted changes."""
    git = ["git", "-C", str(ROOT)]
    try:
        sha = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    paths = list(dirty_paths)
    dirty = ""
    if paths:
        status = subprocess.run([*git, "status", "--porcelain", "--", *paths], capture_output=True, text=True)
        dirty = "-dirty" if status.stdout.strip() else ""
    return sha.stdout.strip() + dirty


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """GPU name, or "CPU <model> (<cores> cores, <n> torch threads)"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def driver_version() -> str:
    """The NVIDIA driver version from nvidia-smi ("" without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


def env_info(device: torch.device | str) -> dict[str, str]:
    """What a result needs next to it: device, driver, torch / triton / CUDA versions, commit, date."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(device),
        "driver": driver_version() if device.type == "cuda" else "",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "commit": git_commit(["salf_engine", "kernels", "csrc", "bench"]),
        "date": utc_now(),
    }


def measure_bandwidth(device: torch.device | str, *, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """GB/s of a large copy on ``device`` counting bytes read + written (median of ``reps``).

    GPU: a device-to-device copy of ``nbytes`` (1 GiB) timed with CUDA events, the HBM reference the
    kernels are compared against in the same run. CPU: a memcpy of the same size by perf_counter.
    """
    device = torch.device(device)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n * 4 / quantiles(times)[0] / 1e9


def append_csv(path: str | Path, fields: Sequence[str], rows: Iterable[dict]) -> Path:
    """Append rows to a CSV (header written when the file is new); keys outside ``fields`` are an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def write_csv(path: str | Path, fields: Sequence[str], rows: Iterable[dict]) -> Path:
    """Write a fresh CSV with a header."""
    path = Path(path)
    if path.exists():
        path.unlink()
    return append_csv(path, fields, rows)


def read_csv(path: str | Path) -> list[dict]:
    with Path(path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, align: str = "") -> list[str]:
    """Lines of a Markdown table; ``align`` is one character per column ("l" or "r", default "l")."""
    marks = [("---:" if a == "r" else "---") for a in align.ljust(len(headers), "l")]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return lines


class SavedActivations:
    """Context manager counting the bytes autograd saves for backward, the model's parameters excluded
    (``.bytes`` after the block); with ``enabled=False`` it does nothing."""

    def __init__(self, model: torch.nn.Module | None, enabled: bool = True) -> None:
        self.bytes = 0
        self._params = {p.data_ptr() for p in model.parameters()} if enabled and model is not None else set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t) if enabled else None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in self._params:
            self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self) -> SavedActivations:
        if self._hooks is not None:
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)


def timed_step(forward: Callable[[], torch.Tensor], targets: torch.Tensor,
               frozen: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               device: torch.device | str, *, model: torch.nn.Module | None = None
               ) -> tuple[dict[str, float], int, int]:
    """One training step (forward + cross-entropy, backward, optimizer step) with ``frozen`` parameters out
    of autograd: (seconds per phase: step / fwd / bwd / opt; with ``model``, the bytes of activations saved
    for backward and of the gradients before the update, else 0, 0). The one step timer of bench_step and
    gpu_suite; the device is synchronized at every phase boundary."""
    for p in frozen:
        p.requires_grad_(False)
    try:
        hooks = SavedActivations(model, enabled=model is not None)
        sync(device)
        t0 = time.perf_counter()
        with hooks:
            loss = torch.nn.functional.cross_entropy(forward().float(), targets)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        unique = {id(q): q for q in model.parameters()}.values() if model is not None else ()
        grads = sum(q.grad.numel() * q.grad.element_size() for q in unique if q.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {"step": t3 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2}, hooks.bytes, grads


def salf_half_depths(batch: int, num_layers: int, seed: int = 1) -> list[int]:
    """Per-row depths of a SALF[half] forward: spread evenly over 0..m-1 (the uniform budget's backward
    saving, about 0.48) and shuffled."""
    import random

    depths = [int(num_layers * (r + 0.5) / batch) for r in range(batch)]
    random.Random(seed).shuffle(depths)
    return depths


def step_compositions(runner, ids: torch.Tensor, mask: torch.Tensor, depths: list[int]
                      ) -> dict[str, Callable[[], torch.Tensor]]:
    """The ways to run one SALF step's rows, as forwards returning [B, V] logits in row order:
    ``salf_rows`` (one forward, every row at its own cut: the default), ``salf_rows_levels{4,2}`` (the
    depths rounded down to 4 or 2 cut levels), ``salf_micro4`` (the former default: 4 micro-batches of
    rows in depth order, each at its lowest cut)."""
    from salf_engine.schedule.strategies import round_to_levels

    batch = len(depths)
    out: dict[str, Callable[[], torch.Tensor]] = {
        "salf_rows": lambda: runner(ids, mask, depth=depths).logits}
    for levels in (4, 2):
        rounded = round_to_levels(depths, levels)
        out[f"salf_rows_levels{levels}"] = lambda rounded=rounded: runner(ids, mask, depth=rounded).logits
    size = max(1, batch // 4)
    by_depth = sorted(range(batch), key=lambda r: depths[r])
    runs = [by_depth[i : i + size] for i in range(0, batch, size)]

    def micro_batched() -> torch.Tensor:
        logits: list[torch.Tensor | None] = [None] * batch
        for run in runs:
            got = runner(ids[run], mask[run], depth=min(depths[r] for r in run)).logits
            for k, r in enumerate(run):
                logits[r] = got[k]
        return torch.stack(logits)  # type: ignore[arg-type]

    out["salf_micro4"] = micro_batched
    return out


def cached_forward(runner, ids: torch.Tensor, mask: torch.Tensor, floor: int) -> Callable[[], torch.Tensor]:
    """BOT-``floor``'s step with the prefix cache (docs/prefix_cache.md), as a forward returning [B, V]
    logits: the batch enters at ``floor`` with its kept states (the first call runs the frozen layers and
    keeps them, as a first epoch does). On a GPU the states sit in the pinned host store and are copied
    ahead during the step's backward, as the engine's loop copies the next step's rows; on a CPU in memory."""
    from salf_engine.training.prefix_cache import PINNED_ON, PinnedRows, PrefixCache, floor_rows

    rows = list(range(ids.shape[0]))
    lengths = mask.sum(1).tolist()
    pinned = None
    if ids.device.type in PINNED_ON:
        hidden = runner.model.config.hidden_size
        dtype = next(runner.model.parameters()).dtype
        pinned = PinnedRows(lengths, hidden, dtype, ids.device)
    cache = PrefixCache(floor, len(rows), 0, pinned=pinned)

    def forward() -> torch.Tensor:
        with floor_rows(cache, rows, ids, mask, floor) as prefix:
            logits = runner(ids, mask, depth=floor, prefix=prefix).logits
        cache.prefetch(rows)  # the next step's rows (the same batch here), beside this step's backward
        return logits

    return forward


def run_cells(todo: list, command: Callable[[object], list[str]], log_dir: Path, *, workers: int,
              done: Callable[[object], None], skip: Callable[[object], bool] = lambda cell: False,
              cwd: Path | None = None, start_until: float | None = None) -> list:
    """Run one subprocess per cell of ``todo`` (taken in order), ``workers`` at a time, one thread each
    (OMP / MKL), offline; ``done(cell)`` after each success (under a lock: keep its results, rewrite the
    report), cells with ``skip(cell)`` passed over when their turn comes. No cell starts once
    ``time.time()`` passes ``start_until`` (running ones finish; the rest wait for the next run). Each
    worker appends its cells' output to ``log_dir/worker<k>.log``. Returns the failed cells."""
    import threading

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    todo, lock, failed = list(todo), threading.Lock(), []
    start = time.perf_counter()
    log_dir.mkdir(parents=True, exist_ok=True)

    def worker(k: int) -> None:
        with open(log_dir / f"worker{k}.log", "a") as log:
            while True:
                with lock:
                    if not todo:
                        return
                    if start_until is not None and time.time() >= start_until:
                        print(f"not started (past --start-within): {todo}", flush=True)
                        todo.clear()
                        return
                    cell = todo.pop(0)
                    if skip(cell):
                        continue
                code = subprocess.run(command(cell), cwd=cwd, env=env, stdout=log,
                                      stderr=subprocess.STDOUT).returncode
                with lock:
                    print(f"[{time.perf_counter() - start:6.0f}s] {cell}: {'failed' if code else 'done'}; "
                          f"{len(todo)} cells left", flush=True)
                    if code:
                        failed.append(cell)
                    else:
                        done(cell)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


def half_range(values: Sequence[float]) -> float:
    """The spread every report here gives over seeds (or paired differences): half of max - min."""
    return (max(values) - min(values)) / 2


def mean_spread(values: Sequence[float]) -> str:
    """``mean ± half the range`` over seeds, to three decimals ("—" for none, the value alone for one)."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{sum(values) / len(values):.3f} ± {half_range(values):.3f}"


#: What of a finished grid cell is committed beside the report, so a fresh checkout resumes the grid.
KEPT = ("summary.json", "config.json")


def keep_cell(out: Path, results: Path, cell_dir: Path, *, discard_models: bool = False) -> None:
    """Copy a finished cell's summary and config from ``out/...`` to ``results/cells/...`` (runs/ is not
    committed); ``discard_models`` then deletes the cell's ``model/`` and ``checkpoints/`` (tables need
    only the summary)."""
    import shutil

    dst = results / "cells" / cell_dir.relative_to(out)
    dst.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        shutil.copy2(cell_dir / name, dst / name)
    for name in ("model", "checkpoints") if discard_models else ():
        shutil.rmtree(cell_dir / name, ignore_errors=True)


def run_grid(cells: Iterable, cell_dir: Callable[[object], Path], command: Callable[[object], list[str]],
             out: Path, results: Path, *, workers: int, after: Callable[[object], None] = lambda cell: None,
             discard_models: bool = False, restart: bool = True, start_within: float | None = None) -> list:
    """Run (or resume) a grid of ``salf`` runs under ``out``, ``workers`` at a time (``run_cells``): every
    cell whose ``cell_dir(cell)`` holds no ``summary.json``, also when another run finished it meanwhile.
    ``restart`` removes what an interrupted run of the cell left first. After each success the cell is
    kept in ``results`` (``keep_cell``), then ``after(cell)`` runs (rewrite the report). No cell starts
    after ``start_within`` hours. Returns the failed cells."""
    import shutil

    def finished(cell) -> bool:
        return (cell_dir(cell) / "summary.json").is_file()

    def run(cell) -> list[str]:
        if restart:
            shutil.rmtree(cell_dir(cell), ignore_errors=True)
        return command(cell)

    def done(cell) -> None:
        keep_cell(out, results, cell_dir(cell), discard_models=discard_models)
        after(cell)

    until = None if start_within is None else time.time() + 3600 * start_within
    return run_cells([c for c in cells if not finished(c)], run, out, workers=workers, done=done,
                     skip=finished, cwd=ROOT, start_until=until)


def resume_grid(args, cells: list, cell_dir: Callable[[object], Path], command: Callable[[object], list[str]],
                out: Path, results: Path, report: Callable[[], str]) -> int:
    """A grid driver's main after its options (:func:`add_grid_options`): put the committed cells back
    (``restore_kept``), run the rest unless ``--report-only`` (``run_grid``, the models discarded, the
    report rewritten after each cell), print the report. Returns 1 when a cell failed, else 0."""
    restore_kept(out, results)
    failed = [] if args.report_only else run_grid(
        cells, cell_dir, command, out, results, workers=args.workers, after=lambda cell: report(),
        discard_models=True, start_within=args.start_within)
    print(report())
    return 1 if failed else 0


def grid_parser(doc: str, output: str, *, workers: int, datasets: str | None = None,
                datasets_help: str | None = None):
    """A grid driver's parser: ``--output`` (default ``runs/<output>``), ``--data-dir`` (``../shared/data``),
    ``--seeds`` (0,1), ``--datasets`` when ``datasets`` gives its default, and :func:`add_grid_options`."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--output", default=str(ROOT / "runs" / output))
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--seeds", default="0,1")
    if datasets is not None:
        ap.add_argument("--datasets", default=datasets, help=datasets_help)
    add_grid_options(ap, workers=workers)
    return ap


def add_grid_options(ap, *, workers: int) -> None:
    """The options every grid driver takes: ``--workers``, ``--report-only`` and ``--start-within``."""
    ap.add_argument("--workers", type=int, default=workers, help="cells at a time, one thread each")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the finished cells")
    ap.add_argument("--start-within", type=float, default=None, metavar="HOURS",
                    help="start no cell after this many hours (running cells finish; the rest wait for the "
                         "next run, which resumes)")


def restore_kept(out: Path, results: Path) -> None:
    """Put the kept cells of an earlier checkout (``results/cells``) back under ``out`` (those not there)."""
    import shutil

    kept = results / "cells"
    for summary in kept.rglob("summary.json") if kept.is_dir() else []:
        dst = out / summary.parent.relative_to(kept)
        if not (dst / "summary.json").is_file():
            dst.mkdir(parents=True, exist_ok=True)
            for name in KEPT:
                shutil.copy2(summary.parent / name, dst / name)


def scatter_by_dataset(points: dict[str, dict[str, list[tuple[float, float]]]], path: Path,
                       xlabel: str, *, lines: bool = False, ylabel: str = "macro-F1 (free decoding)") -> None:
    """One panel per dataset (``points[dataset][label]`` = (x, y) per seed, y macro-F1 unless ``ylabel``
    says otherwise, or with ``lines`` a label's points in order, drawn as one line through them), saved
    as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        return
    fig, axes = plt.subplots(1, len(points), figsize=(5.5 * len(points), 4.5), squeeze=False)
    for ax, (ds, series) in zip(axes[0], points.items(), strict=True):
        for label, xy in series.items():
            xs, ys = [x for x, _ in xy], [y for _, y in xy]
            if lines:
                ax.plot(xs, ys, marker="o", label=label)
            else:
                ax.scatter(xs, ys, label=label, s=20)
        ax.set(title=ds, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
