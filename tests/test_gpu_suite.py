"""bench/gpu_suite.sh --dry-run end to end on CPU: the one-command GPU check must never rot."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import kernel_compile as kc  # noqa: E402
from bench_utils import markdown_table, percentile, quantiles_us  # noqa: E402
from gpu_suite import DEV_FIELDS, DEV_PROVIDERS, STEP_FIELDS  # noqa: E402


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu-suite")
    # the script's 240 s for `pytest -m cuda` is the GPU machine's; a loaded CPU collects slower
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTEST_TIMEOUT_S": "900"}
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
        # 300 s, plus the kernel compile when its cache is cold (tests/test_kernel_compile.py fills the same)
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    return out, done


def test_dry_run_succeeds_and_writes_everything(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("deviation.csv", "step.csv", "env.json", "gpu_suite.md", "pytest.log", "suite.log",
                 "kernel_compile.md", "kernel_compile.log"):
        assert (out / name).is_file(), name
    assert "== pytest -m cuda" in done.stdout and "== benchmarks" in done.stdout
    assert "== kernel compile (sm_80, sm_90)" in done.stdout
    log = (out / "pytest.log").read_text()
    assert "skipped" in log and "failed" not in log  # cuda tests are collected, then skip on CPU


def test_kernel_compile_ran_both_checks(dry_run):
    """The dry run compiled the Triton kernel and the CUDA op for sm_80 and sm_90 (where the tools are)."""
    out, _ = dry_run
    text = (out / "kernel_compile.md").read_text()
    log = (out / "kernel_compile.log").read_text()
    assert "error:" not in log
    if kc.triton_missing() is None:
        assert "### H100 (sm_90): " in text and "### A100 (sm_80): " in text
        assert "triton sm_90: " in log and "triton sm_80: " in log
    if kc.nvcc_missing() is None:
        assert "| sm_80 | A100 | bfloat16 |" in text and "| sm_90 | H100 | bfloat16 |" in text
        assert "cuda op: compiled, 0 warnings in csrc/" in log


def test_env_records_device_versions_commit_date(dry_run):
    out, _ = dry_run
    env = json.loads((out / "env.json").read_text())
    for key in ("device", "driver", "torch", "triton", "commit", "date", "hbm_gbps", "mode", "skipped"):
        assert key in env, key
    assert env["mode"] == "dry-run" and env["device"].startswith("CPU") and float(env["hbm_gbps"]) > 0
    assert env["commit"] != "unknown" and env["date"].endswith("Z")


def test_deviation_csv_rows(dry_run):
    out, _ = dry_run
    fields, rows = _csv(out / "deviation.csv")
    assert fields == DEV_FIELDS
    assert [r["provider"] for r in rows] == list(DEV_PROVIDERS) * 2  # one tiny shape, B = 2 and 4
    assert {r["batch"] for r in rows} == {"2", "4"}
    by = {(r["batch"], r["provider"]): r for r in rows}
    for batch in ("2", "4"):
        assert by[(batch, "cuda")]["median_us"] == "" and "GPU" in by[(batch, "cuda")]["note"]
        assert by[(batch, "triton")]["timer"] == "interpreter"
        assert by[(batch, "torch")]["x_torch"] == "1.00"
        assert by[(batch, "torch_compile")]["x_compile"] == "1.00"
        for provider in ("torch", "torch_lean", "torch_compile", "triton"):
            r = by[(batch, provider)]
            assert float(r["median_us"]) > 0 and float(r["gbps"]) > 0 and float(r["pct_hbm"]) >= 0


def test_step_csv_rows(dry_run):
    out, _ = dry_run
    fields, rows = _csv(out / "step.csv")
    assert fields == STEP_FIELDS
    configs = {m: [r["config"] for r in rows if r["model"] == m] for m in ("tiny-qwen2", "tiny-llama-lora")}
    steps = ["salf_rows", "salf_rows_levels4", "salf_rows_levels2", "salf_micro4"]
    runner = ["runner_k1", "runner_k2", "runner_k3", "static_k2", "cached_k2"]
    assert configs["tiny-qwen2"] == ["full", *runner, *steps]
    assert configs["tiny-llama-lora"] == ["lora", *runner, *steps]
    for r in rows:
        assert float(r["median_s"]) > 0 and int(r["steps"]) == 2 and r["peak_mib"] == ""  # no CUDA memory
        if r["config"] in ("full", "lora"):
            assert r["ratio"] == "1.000" and r["saved_act_ratio"] == "1.000" and r["ideal_ratio"] == "1.000"
    for model in configs:
        saved = {r["config"]: float(r["saved_act_ratio"]) for r in rows if r["model"] == model}
        # the cut drops the frozen layers' activations: deeper cut, fewer saved bytes
        assert saved["runner_k3"] < saved["runner_k2"] < saved["runner_k1"] < 1.0
        # entering at the floor with cached states saves no frozen layer's activations either
        assert saved["cached_k2"] < saved["runner_k1"]


def test_markdown_report(dry_run):
    out, _ = dry_run
    text = (out / "gpu_suite.md").read_text()
    assert text.startswith("# GPU suite (dry run")
    for needle in ("- device: CPU", "- torch ", "commit ", "`pytest -m cuda`: ", "## Deviation op",
                   "### tiny-rms", "| B | provider | us | GB/s | % copy bw | x torch | x compile |",
                   "## Training step", "### tiny-qwen2", "### tiny-llama-lora", "| runner_k2 |",
                   "skipped: needs a GPU"):
        assert needle in text, needle
    assert "8 skipped" in text or "skipped" in text.split("`pytest -m cuda`: ")[1].splitlines()[0]


def test_bench_utils_helpers():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0], 20) == pytest.approx(1.2)
    med, p20, p80 = quantiles_us([1e-6, 2e-6, 3e-6])
    assert (med, p20, p80) == pytest.approx((2.0, 1.4, 2.6))
    assert markdown_table(["a", "b"], [[1, None]], align="lr") == ["| a | b |", "|---|---:|", "| 1 |  |"]


def test_bad_argument_exits_2():
    script = ROOT / "bench" / "gpu_suite.sh"
    done = subprocess.run(["bash", str(script), "--nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument" in done.stderr
