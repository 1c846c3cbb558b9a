"""Figures of a comparison grid: the F1-against-cost scatter and the F1 bars (a model's own figures are
`salf_engine.evaluation.plots`).

matplotlib is used with the non-interactive Agg backend; every function writes
one PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from salf_engine.evaluation.plots import pyplot
from salf_engine.experiments.grid import ZERO_SHOT, DatasetCell, StrategyCell

__all__ = ["write_plots"]


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
    from matplotlib.lines import Line2D  # with pyplot: matplotlib loads only when a figure is drawn

    plt = pyplot()
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
