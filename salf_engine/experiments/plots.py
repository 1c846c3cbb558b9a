"""Figures: a run's eof-layer histograms and per-space deviation violins (paper figures 5-6), and a
comparison grid's F1-against-cost scatter and F1 bars.

matplotlib is used with the non-interactive Agg backend; every function writes
one PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from salf_engine.experiments.grid import DatasetCell, StrategyCell

__all__ = ["eof_histogram_png", "deviation_violins_png", "deviation_stats", "format_deviation_stats",
           "write_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def eof_histogram_png(eofs: Sequence[int] | torch.Tensor, num_layers: int, path: str | Path, *,
                      title: str = "eof-layers") -> Path:
    """Bar chart of how many samples have each eof-layer 0..m."""
    plt = _pyplot()
    values = torch.as_tensor(list(eofs) if not isinstance(eofs, torch.Tensor) else eofs).long()
    counts = torch.bincount(values, minlength=num_layers + 1)[: num_layers + 1].tolist()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * (num_layers + 1)), 3.5))
    ax.bar(range(len(counts)), counts, color="#4477aa")
    ax.set_xlabel("eof-layer (number of frozen bottom layers)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.set_xlim(-0.6, num_layers + 0.6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def deviation_stats(dev: torch.Tensor) -> dict[str, list[float]]:
    """Per-space mean / std / median of deviations [N, m+1]."""
    d = dev.float()
    return {
        "mean": d.mean(0).tolist(),
        "std": d.std(0, unbiased=d.shape[0] > 1).tolist() if d.shape[0] > 1 else [0.0] * d.shape[1],
        "median": d.median(0).values.tolist(),
    }


def format_deviation_stats(stats: dict[str, dict[str, list[float]]]) -> str:
    """A table: one row per space, mean/std/median columns per phase (e.g. before / after)."""
    phases = list(stats)
    head = "space" + "".join(f" | {p:^26}" for p in phases)
    sub = "     " + "".join(" |     mean     std  median" for _ in phases)
    lines = [head, sub]
    spaces = len(next(iter(stats.values()))["mean"])
    for k in range(spaces):
        row = f"{k:5d}"
        for p in phases:
            s = stats[p]
            row += f" | {s['mean'][k]:8.4f} {s['std'][k]:7.4f} {s['median'][k]:7.4f}"
        lines.append(row)
    return "\n".join(lines)


def deviation_violins_png(before: torch.Tensor, path: str | Path, *, after: torch.Tensor | None = None,
                          metric: str = "cosine", title: str | None = None) -> Path:
    """Violin of the deviations over samples per space 0..m; before/after fine-tuning side by side."""
    plt = _pyplot()
    panels = [("before fine-tuning" if after is not None else "deviations", before)]
    if after is not None:
        panels.append(("after fine-tuning", after))
    spaces = before.shape[1]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 0.32 * spaces) * len(panels), 4.0),
                             sharey=True, squeeze=False)
    for ax, (name, dev) in zip(axes[0], panels, strict=True):
        data = [dev[:, k].float().numpy() for k in range(spaces)]
        parts = ax.violinplot(data, positions=list(range(spaces)), widths=0.8, showmedians=True,
                              showextrema=False)
        for body in parts["bodies"]:
            body.set_alpha(0.6)
        ax.set_xlabel("latent space (0 = embedding, m = final norm)")
        ax.set_title(name)
        ax.set_xlim(-0.8, spaces - 0.2)
    axes[0][0].set_ylabel(f"deviation ({metric})")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- comparison grid

def _family(label: str) -> str:
    name = label.split(":", 1)[0]
    for prefix in ("lora", "lift", "salf", "bot", "top", "int", "adt", "full"):
        if name.startswith(prefix):
            return prefix
    return "other"


_FAMILY_COLORS = {"full": "#222222", "lora": "#4477aa", "lift": "#66ccee", "salf": "#ee6677",
                  "bot": "#228833", "top": "#ccbb44", "int": "#aa3377", "adt": "#bbbbbb", "other": "#777777"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def write_plots(output: str | Path, datasets: Sequence[DatasetCell], strategies: Sequence[StrategyCell],
                summaries: dict[tuple[str, str], dict[str, Any]], zero_shot: dict[str, dict[str, float]]
                ) -> list[Path]:
    """``f1_vs_cost.png`` (free macro-F1 against cost-saving, one marker per cell) and ``f1_bars.png``."""
    if not summaries:
        return []
    from matplotlib.lines import Line2D

    from salf_engine.experiments.grid import ZERO_SHOT

    plt = _pyplot()
    out = Path(output)
    written = []
    fig, ax = plt.subplots(figsize=(9, 6))
    for j, d in enumerate(datasets):
        marker = _MARKERS[j % len(_MARKERS)]
        for s in strategies:
            summary = summaries.get((d.label, s.label))
            if summary is None:
                continue
            x, y = summary["cost_saving_ratio"], summary["fine_tuned"]["free_macro_f1"]
            ax.scatter([x], [y], marker=marker, s=55, color=_FAMILY_COLORS[_family(s.label)],
                       edgecolor="black", linewidth=0.5, zorder=3)
            ax.annotate(s.label, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6.5)
        if d.label in zero_shot:
            ax.axhline(zero_shot[d.label]["free_macro_f1"], linestyle=":", linewidth=0.8, color="gray")
            ax.annotate(f"zero-shot {d.label}", (0.0, zero_shot[d.label]["free_macro_f1"]), xytext=(2, 2),
                        textcoords="offset points", fontsize=6.5, color="gray")
    handles = [Line2D([], [], marker=_MARKERS[j % len(_MARKERS)], linestyle="", color="white",
                      markeredgecolor="black", label=d.label) for j, d in enumerate(datasets)]
    families = dict.fromkeys(_family(s.label) for s in strategies)
    handles += [Line2D([], [], marker="o", linestyle="", color=_FAMILY_COLORS[f], label=f) for f in families]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_xlabel("backward cost-saving ratio (mean frozen depth / m)")
    ax.set_ylabel("macro-F1 (free decoding)")
    ax.set_title("F1 against backward cost-saving, one marker per strategy x dataset")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "f1_vs_cost.png", dpi=120)
    plt.close(fig)
    written.append(out / "f1_vs_cost.png")

    labels = ([ZERO_SHOT] if zero_shot else []) + [s.label for s in strategies]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets) + 1.5, 0.28 * len(labels) + 1.6),
                             sharey=True, squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        values, colors = [], []
        for label in labels:
            if label == ZERO_SHOT:
                values.append(zero_shot.get(d.label, {}).get("free_macro_f1", float("nan")))
                colors.append("#dddddd")
            else:
                summary = summaries.get((d.label, label))
                values.append(float("nan") if summary is None else summary["fine_tuned"]["free_macro_f1"])
                colors.append(_FAMILY_COLORS[_family(label)])
        ypos = list(range(len(labels)))
        ax.barh(ypos, [0.0 if math.isnan(v) else v for v in values], color=colors, edgecolor="black",
                linewidth=0.4)
        for y, v in zip(ypos, values, strict=True):
            ax.text((0 if math.isnan(v) else v) + 0.01, y, "—" if math.isnan(v) else f"{v:.3f}", va="center",
                    fontsize=6.5)
        ax.set_title(d.label)
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("macro-F1 (free)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(labels)))
    axes[0][0].set_yticklabels(labels, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle("macro-F1 (free decoding) per strategy, grouped by dataset", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "f1_bars.png", dpi=120)
    plt.close(fig)
    written.append(out / "f1_bars.png")
    return written
