"""Issue 38: where SALF puts each class before training, without training: the cut of every training
example of binary SST under ``--strategy salf --budget none`` (the CLI's default before issue 38:
Algorithm 3, each sample at its own eof, a sample outside the 5 % profile at its class's median profiled
eof) and under SALF[half] by eof rank (``--budget uniform``, per-row: the profile fraction is given), per
seed and training-set size, from the same profile as the run's.

    python bench/collapse_placement.py [--sizes 480,960] [--seeds 0,1,2,3,4] [--full-profile-seeds 0]

Writes ``bench/results/collapse/placement_profile.md`` (run ``bench/collapse_study.py`` first: it writes
the data files).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from salf_engine.config import TrainConfig
from salf_engine.deviation.semantics import semantic_bases
from salf_engine.runner.truncated import TruncatedRunner
from salf_engine.schedule.driver import StrategyDriver
from salf_engine.schedule.strategies import strategy_from_config
from salf_engine.training.inputs import encode_task, prepare

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "collapse"
NAMES = ("negative", "positive")


def _placement(p, config: TrainConfig, runner, pad_id: int) -> dict:
    """Depths per class under the config's strategy, and the profiled eofs per class."""
    _, train_split, _ = encode_task(p.task, p.tokenizer, config)
    strategy = strategy_from_config(config)
    driver = StrategyDriver(strategy, runner, train_split, config, pad_id=pad_id)
    driver.profile()
    labels = [int(y) for y in train_split.labels]
    strategy.begin(runner.num_layers, len(train_split), driver.eofs, config.seed, labels=labels)
    out = {}
    for y, name in enumerate(NAMES):
        depths = [d for d, lab in zip(strategy.depths, labels, strict=True) if lab == y]
        eofs = [e for e, lab in zip(driver.eofs, labels, strict=True) if lab == y and e is not None]
        out[name] = {"n": len(depths), "mean_depth": statistics.fmean(depths),
                     "deep": sum(d >= runner.num_layers // 2 for d in depths) / len(depths),
                     "distinct": len(set(depths)), "eofs": sorted(eofs)}
    return out


def _eofs(e: list[int]) -> str:
    """The eofs themselves, or their median and quartiles when there are many."""
    if len(e) <= 30:
        return " ".join(map(str, e))
    q = statistics.quantiles(e, n=4)
    return f"median {statistics.median(e):g}, quartiles {q[0]:g}-{q[2]:g}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "runs" / "collapse" / "data" / "val"))
    ap.add_argument("--sizes", default="480,960")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--full-profile-seeds", default="0")
    ap.add_argument("--append", action="store_true", help="add rows to an existing placement_profile.md")
    args = ap.parse_args()
    base = TrainConfig(model="smollm2-135m", dataset=args.data, strategy="salf", limit=480, seed=0)
    p = prepare(base)
    bases = semantic_bases(p.model, p.verbalizer.label_token_ids)
    runner = TruncatedRunner(p.model, bases=bases, lens=base.lens, metric=base.metric,
                             deviation_impl=base.deviation_impl)
    pad_id = p.tokenizer.pad_token_id if p.tokenizer.pad_token_id is not None else 0
    lines = ["# Placement before training (issue 38): each class's cuts, binary SST, SmolLM2-135M", "",
             "Per cell: a class's mean cut, the share of its rows cut at >= 15 of 30 layers, and its "
             "profiled eofs (before training). `default` is `--budget none` (Algorithm 3, the default before "
             "issue 38: a sample at its "
             "eof, unprofiled ones at their class's median profiled eof); `half` is `--budget uniform` "
             "(eof rank inside each class). `python bench/collapse_placement.py` wrote this.", "",
             "| examples | seed | strategy | profile | negative: mean cut / deep | positive: mean cut / deep "
             "| negative eofs (profiled) | positive eofs (profiled) |",
             "|---:|---:|---|---:|---|---|---|---|"]
    full = {int(s) for s in args.full_profile_seeds.split(",") if s}
    with torch.no_grad():
        for n in (int(x) for x in args.sizes.split(",")):
            for seed in (int(x) for x in args.seeds.split(",")):
                for fraction in (0.05, 1.0) if seed in full and n == 480 else (0.05,):
                    # with every sample profiled, the eof rank spreads each class by construction
                    cells = (("default", "none"), ("half", "uniform"))
                    for label, budget in cells[:1 if fraction == 1 else 2]:
                        config = dataclasses.replace(base, limit=n, seed=seed, budget=budget,
                                                     profile_fraction=fraction)
                        got = _placement(p, config, runner, pad_id)
                        neg, pos = got["negative"], got["positive"]
                        lines.append(f"| {n} | {seed} | {label} | {fraction:g} | {neg['mean_depth']:.1f} / "
                                     f"{neg['deep']:.2f} | {pos['mean_depth']:.1f} / {pos['deep']:.2f} | "
                                     f"{_eofs(neg['eofs'])} | {_eofs(pos['eofs'])} |")
                        print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "placement_profile.md"
    if args.append and path.is_file():
        lines = path.read_text().splitlines() + [x for x in lines if x.startswith("| ") and x[2].isdigit()]
    path.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
