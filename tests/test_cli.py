"""`salf` end to end on tiny model directories: train -> run dir -> eval / profile, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from salf_engine.cli import commands as cli

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = ["--dataset", "trec", "--limit", "24", "--eval-limit", "18", "--max-steps", "3", "--batch-size", "8",
        "--lr", "1e-3", "--quiet", "--deviation-impl", "torch"]


def _train(model_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--model", str(model_dir), *FAST, "--output", str(out), *extra])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_train_then_eval_run_dir(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_dir("llama"), run, "--strategy", "full") == 0
    out = capsys.readouterr().out
    assert "zero-shot" in out and "fine-tuned" in out and "cost-saving" in out
    for name in ("config.json", "metrics.jsonl", "eval.json", "eval.txt", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "model" / "config.json").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "step" in x and x.get("event") != "eval"]
    assert [x["step"] for x in steps] == [1, 2, 3]
    assert all({"loss", "lr", "depth", "batch_size", "seconds", "epoch"} <= set(x) for x in steps)
    assert [x["phase"] for x in lines if x.get("event") == "eval"] == ["zero-shot", "fine-tuned"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 3
    assert json.loads((run / "config.json").read_text())["strategy"] == "full"

    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(run), "--limit", "18", "--quiet", "--output", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["num_examples"] == 18
    assert got["free"]["accuracy"] == pytest.approx(summary["fine_tuned"]["free_accuracy"])
    assert got["restricted"]["accuracy"] == pytest.approx(summary["fine_tuned"]["restricted_accuracy"])
    assert got["restricted"]["macro_f1"] == pytest.approx(summary["fine_tuned"]["restricted_macro_f1"])


def test_lora_adapter_reloads_with_same_accuracy(tiny_dir, tmp_path, capsys):
    run = tmp_path / "lora"
    assert _train(tiny_dir("llama"), run, "--strategy", "full", "--lora", "--lr", "1e-2") == 0
    saved = run / "model"
    assert (saved / "adapter_config.json").is_file()
    assert not (saved / "model.safetensors").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lora"] is True
    report = tmp_path / "eval.json"
    assert cli.main(["eval", "--model", str(run), "--limit", "18", "--quiet", "--output", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["restricted"]["accuracy"] == pytest.approx(summary["fine_tuned"]["restricted_accuracy"])
    assert got["free"]["macro_f1"] == pytest.approx(summary["fine_tuned"]["free_macro_f1"])
    # the adapter really trained: its B matrices (zero at init) moved
    from safetensors.torch import load_file

    tensors = load_file(str(saved / "adapter_model.safetensors"))
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().sum()) > 0 for v in lora_b)


def test_salf_run_and_profile(tiny_dir, tmp_path, capsys):
    run = tmp_path / "salf"
    algorithm3 = ["--strategy", "salf", "--budget", "none", "--profile-fraction", "1"]
    assert _train(tiny_dir("gemma2"), run, *algorithm3) == 0
    assert (run / "eof_hist.png").stat().st_size > 0
    summary = json.loads((run / "summary.json").read_text())
    assert sum(summary["eof_histogram"]["profile"]) == 24
    assert "eof-layer histogram" in capsys.readouterr().out

    prof = tmp_path / "prof"
    assert cli.main(["profile", "--run", str(run), "--limit", "12", "--output", str(prof), "--quiet",
                     "--deviation-impl", "torch"]) == 0
    data = json.loads((prof / "profile.json").read_text())
    assert set(data["stats"]) == {"before", "after"}
    assert len(data["stats"]["before"]["mean"]) == data["num_layers"] + 1
    assert (prof / "profile_violins.png").stat().st_size > 0
    assert "space" in capsys.readouterr().out


def test_demo_code_path_on_tiny_model(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--model", str(tiny_dir("llama")), "--limit", "16", "--eval-limit", "12",
                     "--output", str(out), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {"zero-shot", "salf:uniform:df", "salf:uniform:df:narrowing", "bot50", "lora-half:ep2", "full"}
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] and line.split()[0] in names}
    assert set(rows) == names
    assert float(rows["bot50"][5]) == pytest.approx(0.5)  # the static freeze the demo sets SALF against
    salf = json.loads((out / "cells" / "trec" / "salf_uniform_df" / "summary.json").read_text())
    full = json.loads((out / "cells" / "trec" / "full" / "summary.json").read_text())
    assert salf["examples_trained"] == full["examples_trained"] == 16  # the same examples, the same steps
    assert float(rows["salf:uniform:df"][1]) == pytest.approx(salf["fine_tuned"]["free_accuracy"], abs=1e-4)
    assert float(rows["full"][5]) == pytest.approx(0.0) and float(rows["full"][6]) == pytest.approx(1.0)
    assert 0.2 < float(rows["salf:uniform:df"][5]) < 0.6  # backward saving of the uniform budget
    # narrowing: the same budget (the same saving), no profile (the FLOPs of training alone)
    assert float(rows["salf:uniform:df:narrowing"][5]) == pytest.approx(float(rows["salf:uniform:df"][5]))
    cells = out / "cells" / "trec"
    narrowing = json.loads((cells / "salf_uniform_df_narrowing" / "summary.json").read_text())
    assert narrowing["profiled_examples"] == 0 < salf["profiled_examples"]
    # LoRA[half] for two epochs, its frozen half cached: 32 examples, epoch 2 served from the cache
    ep2 = json.loads((cells / "lora-half_ep2" / "summary.json").read_text())
    assert ep2["examples_trained"] == 32 and ep2["epochs_run"] == 2
    m = ep2["num_layers"]
    assert ep2["prefix_cache"]["hits"] == 16 and ep2["prefix_cache"]["misses"] == 16
    one = json.loads((cells / "bot50" / "summary.json").read_text())["prefix_cache"]  # one epoch: none kept
    assert one["where"] == "off" and one["reason"].startswith("the run trains one epoch")
    # FLOPs against full's one epoch, by hand: 32 rows at m forward + (m - m // 2) layers passing the
    # gradient down (LoRA: no weight gradients), less the m // 2 layers below the floor for each of the
    # 16 hits, over full's 16 rows at 3m
    hand = (32 * (m + (m - m // 2)) - 16 * (m // 2)) / (16 * 3 * m)
    assert float(rows["lora-half:ep2"][6]) == pytest.approx(hand, abs=0.005)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dataset", "sst5", "--data-dir", "/nonexistent/salf-data"], "does not exist"),
        (["--dataset", "no-such-dataset"], "no-such-dataset"),
        (["--dataset", "trec", "--batch-size", "0"], "batch_size"),
    ],
)
def test_bad_input_one_line_exit_2(tiny_dir, tmp_path, capsys, argv, needle):
    out = tmp_path / "never"
    code = cli.main(["train", "--model", str(tiny_dir("llama")), *argv, "--output", str(out), "--quiet"])
    assert code == 2
    assert needle in _one_error_line(capsys)
    assert not out.exists()


def test_unknown_model_name(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["train", "--model", "no-such-model", "--dataset", "trec", "--output", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "no-such-model" in line
    assert not out.exists()


def test_finished_run_is_not_overwritten(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_dir("llama"), run, "--strategy", "full") == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    summary = (run / "summary.json").read_text()
    capsys.readouterr()
    assert _train(tiny_dir("llama"), run, "--strategy", "full", "--seed", "1") == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert (run / "summary.json").read_text() == summary
    # with --overwrite the run is replaced
    assert _train(tiny_dir("llama"), run, "--strategy", "full", "--seed", "1", "--overwrite") == 0
    assert json.loads((run / "config.json").read_text())["seed"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 + 2


def test_foreign_directory_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "precious.txt").write_text("keep")
    assert _train(tiny_dir("llama"), out, "--strategy", "full", "--overwrite") == 2
    assert "holds no run" in _one_error_line(capsys)
    assert (out / "model" / "precious.txt").read_text() == "keep"


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--dataset", "trec", "--output", "x"])
    assert exc.value.code == 2
    assert "--model" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as exc:  # a named choice (Literal field) is checked by argparse
        cli.main(["train", "--model", "m", "--dataset", "trec", "--strategy", "no-such-strategy",
                  "--output", "x"])
    assert exc.value.code == 2
    assert "invalid choice: 'no-such-strategy'" in _one_error_line(capsys)


def test_console_exit_code_subprocess(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "salf_engine", "train", "--model", "x", "--dataset", "no-such-dataset",
         "--output", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
