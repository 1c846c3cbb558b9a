"""Issue 35's quick check of supervised fine-tuning, in under 15 minutes on the 2-core CPU: SmolLM2-135M on
128 GSM8K problems for one epoch, BOT50 and LoRA[half]; the held-out answer loss must fall below the
zero-shot one for both.

Each strategy is one ``salf train`` run (``--limit`` training problems drawn with seed 0, one epoch, steps
of 8, chat template, ``--max-length`` 384), evaluated on the same ``--eval-limit`` test problems (the
same rows for every seed) by answer loss alone (``--exact-match-rows 0``: no greedy
decode). The first run also evaluates the zero-shot model; the second compares with that. Prints a table
and exits 1 when a run fails or its fine-tuned answer loss is not below the zero-shot one.

    python bench/sft_check.py [--data-dir ../shared/data] [--output runs/sft-check] [--limit 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: (label, ``salf train`` options) of the two strategies checked
STRATEGIES = {"bot50": ["--strategy", "bot50"], "lora-half": ["--strategy", "lora-half"]}
#: the 15 minutes the issue allows the whole check
BUDGET_SECONDS = 15 * 60


def _command(args: argparse.Namespace, label: str, zero_shot: bool) -> list[str]:
    return [sys.executable, "-m", "salf_engine", "train", "--model", args.model, "--dataset", "gsm8k",
            "--data-dir", str(args.data_dir), *STRATEGIES[label], "--limit", str(args.limit),
            "--eval-limit", str(args.eval_limit), "--max-length", str(args.max_length), "--epochs", "1",
            "--batch-size", "8", "--eval-batch-size", "8", "--exact-match-rows", "0", "--seed", "0",
            *([] if zero_shot else ["--no-zero-shot"]), "--quiet", "--overwrite",
            "--output", str(args.output / label)]


def _run(args: argparse.Namespace, label: str, zero_shot: bool) -> dict | None:
    """One ``salf train`` run, its output in ``OUTPUT/<label>.log``; its summary, or None when it failed."""
    cmd = _command(args, label, zero_shot)
    log = args.output / f"{label}.log"
    print(f"{label}: {' '.join(cmd[1:])}", flush=True)
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    summary = args.output / label / "summary.json"
    if code != 0 or not summary.is_file():
        tail = log.read_text().strip().splitlines()[-5:]
        print(f"{label}: failed (exit status {code}); the end of {log}:", *tail, sep="\n  ", flush=True)
        return None
    return json.loads(summary.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data",
                        help="directory holding gsm8k/ (default: ../shared/data)")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "sft-check",
                        help="run directories and logs (replaced on every check)")
    parser.add_argument("--model", default="smollm2-135m", help="default smollm2-135m")
    parser.add_argument("--limit", type=int, default=128, help="training problems (default 128)")
    parser.add_argument("--eval-limit", type=int, default=128,
                        help="test problems of the fixed held-out slice (default 128)")
    parser.add_argument("--max-length", type=int, default=384, help="tokens per row (default 384)")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summaries = {label: _run(args, label, zero_shot=i == 0) for i, label in enumerate(STRATEGIES)}
    seconds = time.perf_counter() - start
    first = summaries[next(iter(STRATEGIES))]
    zero = first["zero_shot"]["answer_loss"] if first and first.get("zero_shot") else None

    print(f"\nSFT check: {args.model}, {args.limit} GSM8K problems, one epoch, answer loss on "
          f"{args.eval_limit} test problems")
    print(f"{'strategy':10s} {'zero-shot':>10s} {'fine-tuned':>11s} {'change':>8s} {'train s':>8s} "
          f"{'rows cut / left out':>20s}  result")
    failed = []
    for label, s in summaries.items():
        if s is None or zero is None:
            failed.append(label)
            print(f"{label:10s} {'-':>10s} {'-':>11s} {'-':>8s} {'-':>8s} {'-':>20s}  FAIL (no result)")
            continue
        loss = s["fine_tuned"]["answer_loss"]
        rows = s["responses"]["train"]
        cut = f"{rows['truncated']} / {rows['dropped']}"
        ok = loss < zero
        if not ok:
            failed.append(label)
        print(f"{label:10s} {zero:10.4f} {loss:11.4f} {loss - zero:+8.4f} {s['train_seconds']:8.1f} "
              f"{cut:>20s}  {'pass' if ok else 'FAIL (not below zero-shot)'}")
    over = "" if seconds <= BUDGET_SECONDS else f", over the {BUDGET_SECONDS // 60} minutes the issue allows"
    print(f"wall time {seconds / 60:.1f} min{over}; logs and runs in {args.output}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print("passed: the held-out answer loss fell below the zero-shot one for every strategy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
