"""Long runs survive: checkpoints, resume (in-process and after SIGKILL) with identical weights, corrupt
checkpoints named, non-finite guards, disk checks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from salf_engine.cli import commands as cli
from salf_engine.config import TrainConfig
from salf_engine.errors import CheckpointError, ConfigError, TrainingError
from salf_engine.training.checkpoint import (
    list_checkpoints,
    load_latest,
    save_checkpoint,
    verify_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"lr": 1e-3, "batch_size": 4, "warmup_ratio": 0.1, "weight_decay": 0.01, "zero_shot_eval": True,
        "deviation_impl": "torch"}


def _config(out: Path, **overrides) -> TrainConfig:
    return TrainConfig(model="tiny", dataset="pattern", output=str(out), **{**BASE, **overrides}).validate()


def _train(cfg: TrainConfig, family: str = "llama", **kwargs):
    from test_train import _prepared

    from salf_engine.training.recipe import train

    p = _prepared(family, cfg)
    return p, train(cfg, progress=False, log=None, prepared=p, **kwargs)


def _interrupted(cfg: TrainConfig, interrupt_after, after_steps: int) -> None:
    """Train until ``after_steps`` optimizer steps ran, then die (KeyboardInterrupt) inside the next one."""
    import salf_engine.training.recipe as train_module

    with interrupt_after(train_module, "optimizer_step", after_steps):
        _train(cfg)


def _metric_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


SAME = ("loss_history", "steps", "epochs_run", "examples_trained", "cost_saving_ratio", "flops_ratio",
        "depth_histogram", "eof_histogram", "fine_tuned", "zero_shot", "frozen_fraction", "skipped_steps")


@pytest.mark.parametrize("overrides, stop_after, corrupt_newest", [
    ({"strategy": "full", "max_steps": 9}, 5, False),                       # mid-epoch
    ({"strategy": "salf", "budget": "uniform", "depth_schedule": "per-row", "epochs": 2, "batch_size": 8},
     8, True),  # epoch end
    ({"strategy": "salf", "budget": "none", "epochs": 2, "batch_size": 8, "train_head": True},
     8, False),  # epoch 1
    ({"strategy": "adt-low", "max_steps": 10}, 5, False),                    # inside ADT's warm-up
    ({"strategy": "adt-high", "max_steps": 10}, 7, False),                   # after ADT chose
    ({"strategy": "full", "lora": True, "max_steps": 6}, 4, False),          # LoRA adapter + dropout
], ids=["full", "salf-budget-epoch-end", "salf-alg3-head", "adt-warmup", "adt-chosen", "lora"])
def test_resume_equals_uninterrupted_run(tmp_path, interrupt_after, overrides, stop_after, corrupt_newest):
    ref_cfg = _config(tmp_path / "ref", save_every=2, **overrides)
    ref_p, ref = _train(ref_cfg)

    cfg = _config(tmp_path / "run", save_every=2, save_total_limit=2, **overrides)
    _interrupted(cfg, interrupt_after, stop_after)
    kept = list_checkpoints(cfg.output)
    assert [p.name for p in kept] == [f"step-{s:08d}" for s in (stop_after // 2 * 2, stop_after // 2 * 2 - 2)]
    assert not (Path(cfg.output) / "summary.json").exists()
    if corrupt_newest:  # the newest is truncated: named, then the next older one is used
        state = kept[0] / "state.pt"
        state.write_bytes(state.read_bytes()[:100])
    messages: list[str] = []
    from test_train import _prepared

    from salf_engine.training.recipe import train

    p = _prepared("llama", cfg)
    got = train(cfg, progress=False, log=messages.append, prepared=p, resume=True)
    if corrupt_newest:
        assert any(kept[0].name in m and "corrupt" in m for m in messages), messages
        assert (kept[0].parent / f"bad-{kept[0].name}").is_dir()
    for key in SAME:
        assert got[key] == ref[key], key
    ref_w = dict(ref_p.model.named_parameters())
    for name, q in p.model.named_parameters():
        assert torch.equal(q, ref_w[name]), name
    assert _metric_rows(Path(cfg.output)) == _metric_rows(Path(ref_cfg.output))


def test_resume_after_the_last_step(tmp_path, interrupt_after):
    """Killed in the final evaluation: the checkpoint of the last step finishes the run without training."""
    import salf_engine.evaluation.classification as evaluate_module

    ref_p, ref = _train(_config(tmp_path / "ref", strategy="full", max_steps=4, save_every=2))
    cfg = _config(tmp_path / "run", strategy="full", max_steps=4, save_every=2)
    with interrupt_after(evaluate_module, "evaluate", 1):  # zero-shot, then the fine-tuned evaluation dies
        _train(cfg)
    p, got = _train(cfg, resume=True)
    for key in SAME:
        assert got[key] == ref[key], key
    assert _metric_rows(Path(cfg.output)) == _metric_rows(tmp_path / "ref")


def test_resume_refuses_another_config_and_a_finished_run(tmp_path, interrupt_after):
    cfg = _config(tmp_path / "run", strategy="full", max_steps=6, save_every=2)
    _interrupted(cfg, interrupt_after, 3)
    changed = _config(tmp_path / "run", strategy="full", max_steps=6, save_every=3, lr=2e-3, seed=1,
                      device="cpu")
    with pytest.raises(ConfigError) as err:
        _train(changed, resume=True)
    msg = str(err.value)
    assert "lr: 0.001 -> 0.002" in msg and "seed: 0 -> 1" in msg
    assert "save_every" not in msg and "device" not in msg and "\n" not in msg
    _train(cfg, resume=True)
    with pytest.raises(ConfigError, match="finished"):
        _train(cfg, resume=True)


def test_corrupt_or_partial_checkpoint_is_named(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save_checkpoint(run, step, {"weights": {"w": torch.full((64,), float(step))}}, {"epoch": 0})
    newest, middle, oldest = list_checkpoints(run)
    assert verify_checkpoint(newest)["step"] == 3
    # truncated tensor file
    (newest / "state.pt").write_bytes((newest / "state.pt").read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=f"{newest}.*corrupt.*state.pt"):
        verify_checkpoint(newest)
    # same size, one byte flipped
    meta = bytearray((middle / "meta.json").read_bytes())
    meta[2] ^= 1
    (middle / "meta.json").write_bytes(bytes(meta))
    with pytest.raises(CheckpointError, match=f"{middle}.*checksum of meta.json"):
        verify_checkpoint(middle)
    messages: list[str] = []
    got = load_latest(run, say=messages.append)
    assert got is not None and got.step == 1 and got.path == oldest
    assert torch.equal(got.state["weights"]["w"], torch.full((64,), 1.0))
    assert len(messages) == 2 and newest.name in messages[0] and middle.name in messages[1]
    # a save killed before its manifest: the temporary dir never counts; no manifest = partial
    (oldest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=f"{oldest} is partial"):
        verify_checkpoint(oldest)
    assert load_latest(run) is None


def test_save_total_limit_and_atomic_failure(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for step in range(1, 6):
        save_checkpoint(run, step, {"x": torch.zeros(2)}, {}, total_limit=2)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000005", "step-00000004"]

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(run, 6, {"x": torch.zeros(2)}, {})
    assert [p.name for p in (run / "checkpoints").iterdir()] != [] and not any(
        p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
    assert list_checkpoints(run)[0].name == "step-00000005"


# ----------------------------------------------------------------------------- non-finite guard


POISON = "surprised"  # a vocabulary word the pattern task never uses


def _poisoned(cfg: TrainConfig, victim: int):
    """qwen2 (untied head): example ``victim`` gets a token whose embedding row is NaN; the others never
    see that row, so exactly the steps that hold ``victim`` have a NaN loss."""
    from test_train import _prepared

    p = _prepared("qwen2", cfg)
    tok_id = p.tokenizer.convert_tokens_to_ids(POISON)
    p.train_split.input_ids[victim][1] = tok_id
    with torch.no_grad():
        p.model.get_input_embeddings().weight[tok_id] = float("nan")
    return p


def _steps_holding(victim: int, num_samples: int, labels, steps: int) -> list[int]:
    """1-based steps whose plan holds ``victim`` (full strategy, steps of 4, seed 0), computed afresh."""
    from salf_engine.schedule.strategies import make_strategy

    s = make_strategy("full", seed=0)
    s.begin(4, num_samples, None, 0, labels=labels)
    out, step, epoch = [], 0, 0
    while step < steps:
        for plan in s.epoch_plans(epoch, 4):
            step += 1
            if victim in plan.indices:
                out.append(step)
            if step == steps:
                break
        epoch += 1
    return out


def test_nan_stops_naming_step_and_batch_keeping_checkpoint(tmp_path):
    from salf_engine.training.recipe import train

    victim = 17
    cfg = _config(tmp_path / "run", strategy="full", max_steps=30, save_every=1, zero_shot_eval=False)
    p = _poisoned(cfg, victim)
    first = _steps_holding(victim, len(p.train_split), list(p.train_split.labels), 30)[0]
    with pytest.raises(TrainingError) as err:
        train(cfg, progress=False, log=None, prepared=p)
    msg = str(err.value)
    assert f"non-finite loss at step {first} " in msg and f"{victim}" in msg and "depths [0]" in msg
    assert "\n" not in msg
    run = Path(cfg.output)
    assert not (run / "summary.json").exists()
    if first > 1:
        newest = list_checkpoints(run)[0]
        assert newest.name == f"step-{first - 1:08d}" and str(newest) in msg
        verify_checkpoint(newest)
        for name, q in p.model.named_parameters():  # the weights never saw the NaN
            if "embed" not in name:
                assert torch.isfinite(q).all(), name


def test_nan_skip_counts_and_skips_exactly_those_steps(tmp_path):
    from salf_engine.training.recipe import train

    victim = 5
    cfg = _config(tmp_path / "run", strategy="full", max_steps=30, on_nonfinite="skip", zero_shot_eval=False)
    p = _poisoned(cfg, victim)
    bad = _steps_holding(victim, len(p.train_split), list(p.train_split.labels), 30)
    assert len(bad) >= 2  # 30 steps of 4 over 48 examples: 2.5 epochs
    summary = train(cfg, progress=False, log=None, prepared=p)
    assert summary["skipped_steps"] == len(bad) and summary["steps"] == 30
    assert len(summary["loss_history"]) == 30 - len(bad)
    rows = [r for r in _metric_rows(Path(cfg.output)) if "step" in r and r.get("event") != "eval"]
    assert [r["step"] for r in rows if r.get("skipped")] == bad
    assert all(r["loss"] is None for r in rows if r.get("skipped"))
    for name, q in p.model.named_parameters():
        if "embed" not in name:
            assert torch.isfinite(q).all(), name


# ----------------------------------------------------------------------------- disk checks


def test_unwritable_output_fails_before_loading(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = cli.main(["train", "--model", "no-such-model-never-loaded", "--dataset", "trec",
                     "--output", str(blocker / "run"), "--quiet"])
    assert code == 2
    assert "is not a directory" in capsys.readouterr().err.strip().splitlines()[-1]
    if os.geteuid() == 0:
        return  # root writes anywhere: the permission case cannot be staged
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = cli.main(["train", "--model", "no-such-model-never-loaded", "--dataset", "trec",
                         "--output", str(locked / "run"), "--quiet"])
    finally:
        locked.chmod(0o755)
    assert code == 2
    assert "not writable" in capsys.readouterr().err


def test_not_enough_space_fails_before_training(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda _p: Usage(10**9, 10**9 - 1000, 1000))
    cfg = _config(tmp_path / "run", strategy="full", max_steps=3, save_every=1, zero_shot_eval=False)
    with pytest.raises(ConfigError, match="not enough free space"):
        _train(cfg)
    assert not list_checkpoints(cfg.output)
    assert not (Path(cfg.output) / "summary.json").exists()


# ----------------------------------------------------------------------------- SIGKILL, real processes

SUB_ARGS = ["--dataset", "trec", "--limit", "48", "--eval-limit", "8", "--batch-size", "4", "--lr", "1e-3",
            "--deviation-impl", "torch", "--no-zero-shot", "--quiet", "--save-every", "3",
            "--save-total-limit", "2", "--max-steps", "120", "--max-length", "64"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def _assert_same_run(run: Path, ref: Path, keys) -> dict:
    """``run`` ended with ``ref``'s weights bit for bit, its summary's ``keys`` and its metrics lines; the
    run's summary."""
    got, want = _weights(run), _weights(ref)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    s_got = json.loads((run / "summary.json").read_text())
    s_ref = json.loads((ref / "summary.json").read_text())
    for key in keys:
        assert s_got[key] == s_ref[key], key
    assert _metric_rows(run) == _metric_rows(ref)
    return s_got


def _sigkill_at_first_checkpoint(proc: subprocess.Popen, run: Path, timeout: float) -> int:
    """Wait for ``run``'s first checkpoint, then SIGKILL ``proc`` and every process it started, all at once
    (torchrun starts each rank in a session of its own); how many processes were killed."""
    import psutil

    deadline = time.monotonic() + timeout
    try:
        while not list_checkpoints(run):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"no checkpoint within {timeout:.0f} s"
            time.sleep(0.005)
        parent = psutil.Process(proc.pid)
        descendants = parent.children(recursive=True)
        for victim in [parent, *descendants]:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        psutil.wait_procs(descendants, timeout=30)  # proc itself is reaped by proc.wait(), keeping its status
    finally:
        proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before the kill"
    return 1 + len(descendants)


@pytest.mark.parametrize("strategy", [
    ["--strategy", "salf", "--budget", "uniform", "--depth-schedule", "per-row"], ["--strategy", "adt-low"]],
    ids=["salf-uniform", "adt-low"])
def test_sigkill_then_resume_gives_identical_weights(tiny_dir, tmp_path, strategy):
    model = str(tiny_dir("llama"))
    ref = tmp_path / "ref"
    assert cli.main(["train", "--model", model, *SUB_ARGS, *strategy, "--output", str(ref)]) == 0

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "salf_engine", "train", "--model", model, *SUB_ARGS, *strategy,
           "--output", str(run)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _sigkill_at_first_checkpoint(proc, run, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(list_checkpoints(run)[0].name.split("-")[1])
    assert killed_at < 120

    resumed = subprocess.run([sys.executable, "-m", "salf_engine", "train", "--resume", str(run), "--quiet"],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    _assert_same_run(run, ref, SAME)


def test_plain_train_never_clears_checkpoints(tmp_path, interrupt_after):
    cfg = _config(tmp_path / "run", strategy="full", max_steps=4, save_every=1, zero_shot_eval=False)
    _interrupted(cfg, interrupt_after, 2)
    with pytest.raises(ConfigError, match="unfinished run with checkpoints.*--resume"):
        _train(cfg)
    assert len(list_checkpoints(cfg.output)) == 2
    cfg.overwrite = True
    _, summary = _train(cfg)  # overwrite starts again (the old checkpoints go)
    assert summary["steps"] == 4 and len(list_checkpoints(cfg.output)) == 4


def test_resumed_wall_time_adds_up_without_checkpoint_writes(tmp_path, monkeypatch, interrupt_after):
    """On a fake clock (1 s per optimizer step, 100 s per checkpoint write), train_seconds is 6 s for six
    steps whether or not the run was killed in step 4 and resumed from step 2's checkpoint: the lost step
    and the writes are not training; checkpoint_seconds counts the writes (the one resumed from excepted)."""
    import types

    import salf_engine.training.recipe as recipe

    now = [0.0]
    monkeypatch.setattr(recipe, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def advancing(real, seconds):
        def call(*args, **kwargs):
            now[0] += seconds
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(recipe, "optimizer_step", advancing(recipe.optimizer_step, 1.0))
    monkeypatch.setattr(recipe.ckpt_mod, "save_checkpoint", advancing(recipe.ckpt_mod.save_checkpoint, 100.0))

    _, whole = _train(_config(tmp_path / "ref", strategy="full", max_steps=6, save_every=2))
    timing = ("train_seconds", "checkpoint_seconds", "resumed_at_steps")
    assert [whole[k] for k in timing] == [6.0, 300.0, []]

    cfg = _config(tmp_path / "run", strategy="full", max_steps=6, save_every=2)
    _interrupted(cfg, interrupt_after, 3)  # steps 1-3 ran (1 s each), checkpoint at 2; dies in step 4
    _, got = _train(cfg, resume=True)  # steps 3-6 again from step 2's checkpoint, checkpoints at 4 and 6
    assert [got[k] for k in timing] == [6.0, 200.0, [2]]
    assert got["examples_per_second"] == whole["examples_per_second"] == 6 * 4 / 6.0


#: Resume after SIGKILL under torchrun: two gloo processes killed (torchrun and both ranks, at once) after a
#: checkpoint, then resumed with ``salf train --resume`` under torchrun again, end with the uninterrupted
#: two-rank run's weights, bit for bit, and its losses and metrics lines.
TORCHRUN_ARGS = ["--dataset", "trec", "--limit", "48", "--eval-limit", "8", "--batch-size", "2",
                 "--lr", "1e-3", "--strategy", "salf", "--budget", "uniform", "--depth-schedule", "per-row",
                 "--deviation-impl", "torch",
                 "--no-zero-shot", "--quiet", "--device", "cpu", "--save-every", "2",
                 "--save-total-limit", "2", "--max-steps", "40", "--max-length", "64"]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "salf_engine", "train", *args]


def _errors(stderr: str) -> str:
    """The ranks' one-line errors (or the end of the log)."""
    lines = [line for line in stderr.splitlines() if "error:" in line or "Error" in line]
    return "\n".join(lines[-10:]) or stderr[-3000:]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_torchrun_sigkill_then_resume_gives_identical_weights(tiny_dir, tmp_path):
    model = str(tiny_dir("llama"))
    ref = tmp_path / "ref"
    done = subprocess.run(_torchrun("--model", model, *TORCHRUN_ARGS, "--output", str(ref)), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, _errors(done.stderr)
    assert done.stdout.count("run directory:") == 1  # rank 0 reports, rank 1 does not

    run = tmp_path / "run"
    proc = subprocess.Popen(_torchrun("--model", model, *TORCHRUN_ARGS, "--output", str(run)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _sigkill_at_first_checkpoint(proc, run, timeout=300) >= 3  # torchrun and its two ranks
    killed_at = int(list_checkpoints(run)[0].name.split("-")[1])
    assert killed_at < 40

    resumed = subprocess.run(_torchrun("--resume", str(run), "--device", "cpu", "--quiet"), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, _errors(resumed.stderr)
    assert resumed.stdout.count("resuming from") == 1
    assert _assert_same_run(run, ref, ("loss_history", "steps", "examples_trained", "depth_histogram",
                                       "eof_histogram", "fine_tuned"))["resumed_at_steps"] == [killed_at]
