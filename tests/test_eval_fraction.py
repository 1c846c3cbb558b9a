"""A single-split local file: a class-stratified ``eval_fraction`` is held out; without it, the missing
evaluation split is reported before the model loads. Runs without a 4-bit model print no 4-bit note."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from tiny_models import tiny_tokenizer

from salf_engine.cli import commands as cli
from salf_engine.config import TrainConfig
from salf_engine.data import load_task
from salf_engine.errors import ConfigError
from salf_engine.training.inputs import encode_task

ROOT = Path(__file__).resolve().parents[1]
WORDS = {"joy": "i feel happy", "sadness": "i am sad", "anger": "they are angry"}


def _single_file(tmp_path: Path, per_class=(20, 10, 10)) -> Path:
    path = tmp_path / "only_train.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for (label, text), n in zip(WORDS.items(), per_class, strict=True):
            for i in range(n):
                w.writerow([f"{text} number {i}", label])
    return path


def test_eval_fraction_is_stratified_disjoint_and_counted(tmp_path):
    path = _single_file(tmp_path)
    task = load_task(str(path))
    assert list(task.splits) == ["train"]
    cfg = TrainConfig(dataset=str(path), eval_fraction=0.25).validate()
    _, train, held = encode_task(task, tiny_tokenizer(), cfg)
    assert len(held) == 10 and len(train) == 30
    # 25% of each class (20 / 10 / 10), the halves rounded by largest remainder
    by_class = Counter(task.classes[y] for y in held.labels)
    assert by_class["joy"] == 5 and sorted(by_class.values()) == [2, 3, 5]
    assert not set(held.example_indices) & set(train.example_indices)
    assert sorted([*held.example_indices, *train.example_indices]) == list(range(40))
    # the same examples for every run seed; --limit draws the training subset from the rest
    _, train2, held2 = encode_task(task, tiny_tokenizer(), TrainConfig(dataset=str(path), eval_fraction=0.25,
                                                                        seed=7, limit=12).validate())
    assert held2.example_indices == held.example_indices
    assert len(train2) == 12 and set(train2.example_indices) <= set(train.example_indices)


def test_eval_fraction_conflicts_and_range():
    with pytest.raises(ConfigError, match="eval_fraction"):
        TrainConfig(eval_fraction=1.0).validate()
    with pytest.raises(ConfigError, match="holdout"):
        TrainConfig(eval_fraction=0.2, eval_split="holdout").validate()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def test_missing_eval_split_is_reported_before_the_model_loads(tmp_path, capsys):
    path = _single_file(tmp_path)
    out = tmp_path / "never"
    # the model does not exist either: the data error must come first (nothing loaded yet)
    argv = ["train", "--model", str(tmp_path / "no-model"), "--dataset", str(path), "--output", str(out)]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert "no split 'test'" in line and "--eval-fraction" in line
    assert not out.exists()
    # with a held-out fraction the data is fine, and the next problem is the model
    assert cli.main([*argv, "--eval-fraction", "0.2"]) == 2
    assert "no-model" in _one_error_line(capsys)


def test_compare_checks_eval_splits_before_the_model_loads(tmp_path, capsys):
    path = _single_file(tmp_path)
    argv = ["compare", "--model", str(tmp_path / "no-model"), "--datasets", str(path), "--strategies", "full",
            "--output", str(tmp_path / "grid"), "--quiet"]
    assert cli.main(argv) == 2
    assert "no split 'test'" in _one_error_line(capsys)


def test_no_4bit_note_without_4bit_loading():
    """peft imports bitsandbytes, whose CPU backend logs a note about an optional 4-bit kernel; a run that
    loads nothing in 4 bits does not show it (run from the repository root, where ``kernels/`` would
    shadow the hub's ``kernels`` package)."""
    pytest.importorskip("peft")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = "from salf_engine.training.wrapping import import_peft; import_peft(); import bitsandbytes"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gemm_4bit" not in proc.stderr
