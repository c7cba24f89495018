"""Plots (matplotlib's Agg canvas, no pyplot state): score vs compression ratio per policy, needle heatmaps."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _figure(**kwargs):
    from matplotlib.figure import Figure  # a bare Figure renders with the Agg canvas; pyplot is never imported

    return Figure(**kwargs)


def plot_score_vs_ratio(metrics: dict[str, Any], path: str | Path) -> Path:
    """Score vs nominal compression ratio (left) and vs fraction of the full KV bytes held (right), one line
    per policy; the uncompressed score is a dashed horizontal line."""
    lines: dict[str, list[tuple[float, float, float | None]]] = defaultdict(list)
    baseline = None
    for e in metrics["entries"]:
        if e["policy"] == "none":
            baseline = e["score"]
        elif e["compression_ratio"] is not None and e["score"] is not None:
            lines[e["policy"]].append((e["compression_ratio"], e["score"], e["kv_fraction"]))
    fig = _figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for name, points in lines.items():
        points.sort()
        axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        held = [(p[2], p[1]) for p in points if p[2] is not None]
        if held:
            axes[1].plot([h[0] for h in held], [h[1] for h in held], marker="o", label=name)
    for ax in axes:
        if baseline is not None:
            ax.axhline(baseline, linestyle="--", color="gray", label=f"uncompressed ({baseline:.1f})")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("compression ratio (fraction of tokens evicted)")
    axes[1].set_xlabel("KV bytes held / uncompressed")
    axes[0].set_ylabel("score")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{metrics['task']} ({metrics['mode']}), {metrics['model']}, lengths {metrics['lengths']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_heatmap(entry: dict[str, Any], metrics: dict[str, Any], path: str | Path) -> Path:
    """Needle grid of one configuration: depth rows, length columns, score colour and text."""
    grid = entry["grid"]
    depths = sorted(grid, key=float)
    lengths = [str(x) for x in metrics["lengths"]]
    values = [[grid[d].get(x) for x in lengths] for d in depths]
    data = [[float("nan") if v is None else v for v in row] for row in values]
    fig = _figure(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v is None else f"{v:.0f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{metrics['task']}: {entry['label']} (score {entry['score']:.1f})", fontsize=10)
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
