"""`train()` on a prompt/response task: the same weights as a plain HF loop, every freezing strategy at
per-row cuts with no backward below a row's cut, loss-ranked depths from the response losses, the
evaluation report, and the named refusals."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_strategy_training import _record_micro_batches
from tiny_models import tiny_model, tiny_tokenizer

from salf_engine.config import TrainConfig
from salf_engine.data.responses import ResponseExample, ResponseTask, collate_responses, encode_responses
from salf_engine.errors import ConfigError
from salf_engine.experiments.report import print_summary
from salf_engine.schedule.strategies import strategy_from_config
from salf_engine.training.inputs import Prepared
from salf_engine.training.recipe import train

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]

WORDS = ["city", "river", "year", "name", "day", "game", "team", "school"]


def _examples(n: int, seed: int = 0) -> list[ResponseExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = (WORDS[int(i)] for i in torch.randint(0, len(WORDS), (2,), generator=g))
        k = int(torch.randint(0, 10, (1,), generator=g))
        out.append(ResponseExample(f"how many {a} ?", f"the {b} of {k} . {k}"))
    return out


def _prepared(config: TrainConfig, family: str = "qwen2") -> Prepared:
    tok = tiny_tokenizer()
    train_ex, test_ex = _examples(24), _examples(6, seed=1)
    task = ResponseTask("tiny", {"train": train_ex, "test": test_ex})
    return Prepared(config=config, strategy=strategy_from_config(config), device=torch.device("cpu"),
                    task=task, model=tiny_model(family), tokenizer=tok, verbalizer=None,
                    train_split=encode_responses(train_ex, tok, max_length=32),
                    eval_split=encode_responses(test_ex, tok, max_length=32))


def _config(strategy: str = "full", **kw) -> TrainConfig:
    base = dict(model="tiny", dataset="tiny.jsonl", response_column="response", strategy=strategy, lr=1e-2,
                batch_size=4, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=None, schedule="constant",
                zero_shot_eval=False, exact_match_rows=2, max_new_tokens=4, eval_batch_size=4)
    return TrainConfig(**{**base, **kw}).validate()


def test_full_fine_tuning_equals_a_plain_hf_loop():
    """Oracle: HF's own causal-LM loss of each step's rows (one batch, mean over response tokens) and a plain
    AdamW over every parameter, on the rows in the order the run took them."""
    cfg = _config(max_steps=3)
    p = _prepared(cfg)
    reference = copy.deepcopy(p.model).train()
    same = strategy_from_config(cfg)  # the run's order: the strategy's shuffle with the run's seed
    same.begin(4, len(p.train_split), None, cfg.seed, labels=p.train_split.labels)
    order = [plan.indices for plan in same.epoch_plans(0, 4)][:3]
    summary = train(cfg, progress=False, log=None, prepared=p)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for rows in order:
        loss = reference(**collate_responses(p.train_split, rows, pad_id=0)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert summary["loss_history"] == pytest.approx(losses, rel=1e-5)
    for (name, a), (_, b) in zip(reference.named_parameters(), p.model.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert summary["fine_tuned"]["answer_loss"] > 0 and summary["fine_tuned"]["exact_match_rows"] == 2
    assert summary["responses"]["train"] == {"truncated": 0, "dropped": 0}
    printed = io.StringIO()
    print_summary(summary, out=printed)
    assert f"{summary['fine_tuned']['answer_loss']:12.4f}" in printed.getvalue()
    # final_loss is the mean of the last (up to 10) steps' losses, and the printed summary says so
    assert summary["final_loss"] == pytest.approx(sum(losses) / 3)
    assert (f"training loss {losses[0]:.4f} at the first step, {summary['final_loss']:.4f} averaged over the "
            "last 3 steps") in printed.getvalue()


STRATEGIES = [("full", {}), ("bot50", {}), ("top50", {}), ("int50", {}), ("adt-low", {}),
              ("lift-star-half", {}), ("lora-half", {}),
              ("salf", {"budget": "uniform", "depth_assignment": "loss-rank"}),
              ("salf", {"budget": "uniform", "depth_schedule": "narrowing"}),
              ("salf", {"budget": "uniform", "infill": "df", "profile_fraction": 0.5})]


@pytest.mark.parametrize("name,kw", STRATEGIES, ids=str)
def test_every_strategy_trains_without_backward_below_a_row_s_cut(name, kw):
    cfg = _config(name, max_steps=6, **kw)
    p = _prepared(cfg, family="llama")
    current = _record_micro_batches(p.model, p.strategy)
    trained_rows: list[tuple[int, int, list[int]]] = []  # (layer, rows in its backward, the forward's depths)
    for i, layer in enumerate(p.model.model.layers):
        layer.register_full_backward_hook(
            lambda mod, gi, go, i=i: trained_rows.append((i, go[0].shape[0], current["mb"].depths)))
    summary = train(cfg, progress=False, log=None, prepared=p)
    assert summary["steps"] == 6 and all(torch.isfinite(torch.tensor(summary["loss_history"])))
    assert trained_rows, "no layer ran backward"
    for layer, rows, depths in trained_rows:
        assert rows == sum(d <= layer for d in depths), (layer, rows, depths)  # rows cut at or below it


def test_loss_rank_observes_each_row_s_response_loss():
    cfg = _config("salf", budget="uniform", depth_assignment="loss-rank", lr=1e-30, max_steps=None, epochs=1)
    p = _prepared(cfg)
    reference = copy.deepcopy(p.model).eval()
    train(cfg, progress=False, log=None, prepared=p)
    want = []
    with torch.no_grad():
        for i in range(len(p.train_split)):
            want.append(reference(**collate_responses(p.train_split, [i], pad_id=0)).loss.item())
    assert p.strategy.losses == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("kw,match", [
    (dict(strategy="salf", budget="uniform", depth_schedule="paper"), "answer deviation is profiled once"),
    (dict(metric="rank"), "defined with the cosine metric"),
    (dict(loss="cosine"), "trains with the next-token loss"),
    (dict(text_column="text"), "text_column belongs to classification files"),
    (dict(exact_match_rows=-1), "exact_match_rows must be an integer >= 0"),
])
def test_what_a_prompt_response_task_cannot_do_is_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(dataset="gsm8k", **kw).validate()


def test_compare_refuses_a_prompt_response_dataset_by_name(tmp_path):
    from salf_engine.experiments.compare import run_compare
    from salf_engine.experiments.grid import CompareSettings

    settings = CompareSettings(model="tiny", datasets=["gsm8k"], strategies=["full"], output=str(tmp_path),
                               data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="gsm8k is a prompt/response task"):
        run_compare(settings, progress=False, log=None)


def test_salf_on_answers_places_rows_by_the_eof_of_their_answer_deviation():
    """The profile's eofs are those of the fp64 loop reference's deviations (test_response_deviation.py), and
    the budget places rows by them: the lower a row's eof, the lower its depth."""
    from test_response_deviation import _fp64_reference

    from salf_engine.deviation.compute import eof_layers

    cfg = _config("salf", budget="uniform", infill="df", profile_fraction=1.0, max_steps=1)
    p = _prepared(cfg, family="llama")
    reference = copy.deepcopy(p.model).eval()
    train(cfg, progress=False, log=None, prepared=p)
    rows = list(range(len(p.train_split)))
    want = eof_layers(_fp64_reference(reference, collate_responses(p.train_split, rows, pad_id=0)).float())
    assert p.strategy.eofs == want.tolist()
    assert not p.strategy.needs_observe  # the training forward measures no answer deviation
    depth = p.strategy.depths
    assert all(depth[i] <= depth[j] for i in rows for j in rows if want[i] < want[j])


def test_salf_on_answers_profiles_every_row_unless_told_and_says_so():
    """A prompt/response task's training forward measures no answer deviation, so without a
    ``profile_fraction`` SALF profiles every row (docs/sft.md); given one, it is kept; classification keeps
    its 5 % default."""
    said: list[str] = []
    cfg = _config("salf", budget="uniform", infill="df", depth_schedule="per-row", max_steps=1)
    assert cfg.profile_fraction is None and cfg.resolved_profile_fraction() == 1.0
    p = _prepared(cfg)
    summary = train(cfg, progress=False, log=said.append, prepared=p)
    assert summary["profiled_examples"] == len(p.train_split) == 24
    assert None not in p.strategy.eofs
    assert any("profiling eof-layers of 24 of 24" in line and "--profile-fraction" in line for line in said)
    cfg = _config("salf", budget="uniform", infill="df", max_steps=1, profile_fraction=0.25)
    said.clear()
    assert train(cfg, progress=False, log=said.append, prepared=_prepared(cfg))["profiled_examples"] == 6
    assert not any("--profile-fraction" in line for line in said)
    assert TrainConfig(strategy="salf").validate().resolved_profile_fraction() == 0.05


def test_eval_and_profile_name_a_prompt_response_task():
    from salf_engine.cli.eval_profile import evaluate_model_or_run, profile_model_or_run

    for call in (lambda: evaluate_model_or_run("tiny", dataset="gsm8k"),
                 lambda: profile_model_or_run("tiny", dataset="gsm8k", output="unused")):
        with pytest.raises(ConfigError, match="gsm8k is a prompt/response task"):
            call()
