"""Peak memory and time of the SFT loss: the plain [B, T, V] logits + cross-entropy against the chunked head
cross-entropy (`salf_engine.runner.chunked_loss`), forward + backward of the loss alone.

Each variant runs in its own process (the peak resident set only grows), on SmolLM2-135M's head shape
(V = 49,152, D = 576) with random float32 states and weights, every position supervised (the worst
case for both). On CPU the peak is the process's ``ru_maxrss`` growth over the inputs; on CUDA,
``torch.cuda.max_memory_allocated`` over the inputs. Writes ``bench/results/loss_memory.md``.

    python bench/bench_loss.py [--batch 8] [--length 512] [--chunk 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, DIM = 49152, 576


def _measure(variant: str, batch: int, length: int, chunk: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from salf_engine.runner.chunked_loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(batch, length, DIM, device=device, requires_grad=True)
    weight = (torch.randn(VOCAB, DIM, device=device) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (batch, length), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if variant == "plain":
        loss = F.cross_entropy((hidden @ weight.T).float().reshape(-1, VOCAB), targets.reshape(-1))
    else:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "peak_mib": peak / 2**20, "seconds": time.perf_counter() - start,
            "loss": float(loss), "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "loss_memory.md"))
    args = ap.parse_args(argv)
    if args.variant:  # the child: one measurement, as JSON
        print(json.dumps(_measure(args.variant, args.batch, args.length, args.chunk, args.device)))
        return 0
    rows = []
    for variant in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch", str(args.batch),
                              "--length", str(args.length), "--chunk", str(args.chunk),
                              "--device", args.device], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain, chunked = rows
    lines = [f"# SFT loss: peak memory, B = {args.batch}, T = {args.length}, V = {VOCAB}, D = {DIM}", "",
             "Forward + backward of the loss alone, float32, every position supervised; device "
             f"{args.device} ({platform.processor() or platform.machine()}), {plain['threads']} torch "
             f"thread(s); chunk {args.chunk} positions. `python bench/bench_loss.py` wrote this.", "",
             "| loss | peak memory (MiB) | seconds | loss value |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['peak_mib']:.0f} | {r['seconds']:.2f} | {r['loss']:.6f} |"
              for r in rows]
    lines += ["", f"Chunked / plain peak: {chunked['peak_mib'] / plain['peak_mib']:.3f}; time "
              f"{chunked['seconds'] / plain['seconds']:.2f}x."]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
