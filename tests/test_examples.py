"""Every example in examples/ runs end to end on a tiny model and a tiny local dataset."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """train.csv / test.csv of a two-class task in the tiny tokenizer's words."""
    path = tmp_path_factory.mktemp("pattern-data")
    good = ["happy joy love", "great good movie", "very good film", "love this movie"]
    bad = ["sad anger fear", "terrible bad movie", "very bad film", "not good movie"]
    for split, reps in (("train", 4), ("test", 1)):
        lines = ["text,label"]
        for _ in range(reps):
            lines += [f"{t},positive" for t in good] + [f"{t},negative" for t in bad]
        (path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return path


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(tiny_dir, data_dir, tmp_path) -> list[str]:
    return ["--model", str(tiny_dir("llama")), "--dataset", str(data_dir), "--max-steps", "2",
            "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-3", "--cpu",
            "--output", str(tmp_path / "out")]


@pytest.mark.parametrize("name", ["hf_trainer", "sft_trainer", "accelerate_loop"])
def test_example_runs(name, tiny_dir, data_dir, tmp_path):
    if name == "sft_trainer":
        pytest.importorskip("trl")
    scores = _example(name).main(_argv(tiny_dir, data_dir, tmp_path))
    assert 0.0 <= scores["restricted_accuracy"] <= 1.0


def test_torchrun_example(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, NPROC="2", MODEL=str(tiny_dir("llama")),
               DATASET=str(data_dir), OUTPUT=str(out), BATCH_SIZE="2", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(["bash", str(EXAMPLES / "torchrun.sh"), "--device", "cpu", "--max-steps", "2",
                           "--no-zero-shot", "--lr", "1e-3"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 2 and summary["examples_trained"] == 2 * 2 * 2
