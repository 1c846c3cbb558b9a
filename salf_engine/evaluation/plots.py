"""A model's figures: its eof-layer histogram and per-space deviation violins (paper figures 5-6).

matplotlib is used with the non-interactive Agg backend; every function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["eof_histogram_png", "deviation_violins_png", "deviation_stats", "format_deviation_stats",
           "pyplot"]


def pyplot():
    """matplotlib's pyplot on the Agg backend (imported here, on first use: matplotlib takes a second to
    import, and most runs write no figure)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def eof_histogram_png(eofs: Sequence[int] | torch.Tensor, num_layers: int, path: str | Path, *,
                      title: str = "eof-layers") -> Path:
    """Bar chart of how many samples have each eof-layer 0..m."""
    plt = pyplot()
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
    plt = pyplot()
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
