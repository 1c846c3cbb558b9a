"""Resume after SIGKILL under torchrun: two gloo processes killed (torchrun and both ranks, at once) after a
checkpoint, then resumed with ``salf train --resume`` under torchrun again, end with the uninterrupted
two-rank run's weights, bit for bit, and its losses and metrics lines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from salf_engine.training.checkpoint import list_checkpoints

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ARGS = ["--dataset", "trec", "--limit", "48", "--eval-limit", "8", "--batch-size", "2", "--lr", "1e-3",
        "--strategy", "salf", "--budget", "uniform", "--deviation-impl", "torch", "--no-zero-shot", "--quiet",
        "--device", "cpu", "--save-every", "2", "--save-total-limit", "2", "--max-steps", "40",
        "--max-length", "64"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "salf_engine", "train", *args]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def _metric_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _errors(stderr: str) -> str:
    """The ranks' one-line errors (or the end of the log)."""
    lines = [line for line in stderr.splitlines() if "error:" in line or "Error" in line]
    return "\n".join(lines[-10:]) or stderr[-3000:]


def test_torchrun_sigkill_then_resume_gives_identical_weights(tiny_dir, tmp_path):
    model = str(tiny_dir("llama"))
    ref = tmp_path / "ref"
    done = subprocess.run(_torchrun("--model", model, *ARGS, "--output", str(ref)), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, _errors(done.stderr)
    assert done.stdout.count("run directory:") == 1  # rank 0 reports, rank 1 does not

    run = tmp_path / "run"
    proc = subprocess.Popen(_torchrun("--model", model, *ARGS, "--output", str(run)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not list_checkpoints(run):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.005)
        # torchrun starts each rank in a session of its own: kill torchrun and its ranks, all at once
        agent = psutil.Process(proc.pid)
        doomed = [agent, *agent.children(recursive=True)]
        assert len(doomed) >= 3
        for p in doomed:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(doomed, timeout=30)
    finally:
        proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before the kill"
    killed_at = int(list_checkpoints(run)[0].name.split("-")[1])
    assert killed_at < 40

    resumed = subprocess.run(_torchrun("--resume", str(run), "--device", "cpu", "--quiet"), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, _errors(resumed.stderr)
    assert resumed.stdout.count("resuming from") == 1
    got, want = _weights(run), _weights(ref)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    s_got = json.loads((run / "summary.json").read_text())
    s_ref = json.loads((ref / "summary.json").read_text())
    for key in ("loss_history", "steps", "examples_trained", "depth_histogram", "eof_histogram",
                "fine_tuned"):
        assert s_got[key] == s_ref[key], key
    assert s_got["resumed_at_steps"] == [killed_at]
    assert _metric_rows(run) == _metric_rows(ref)
