"""The one report toolkit of kvpress: number formatting, intervals, tables (rich in the terminal, Markdown, CSV)
and plots (matplotlib's Agg canvas; pyplot is never imported). ``kvpress eval`` run folders
(:mod:`kvpress.eval.results`), ``kvpress perplexity``, ``kvpress sweep report`` / the leaderboard
(:mod:`kvpress.sweep.report`) and the benchmark scripts all format, tabulate and plot through it.

Plots take *rows*: dicts with ``model, task, mode`` (one panel per distinct triple), ``policy`` (a configuration's
label), ``family`` (the line it belongs to: the label without its ratio), ``ratio``, ``score``, ``kv_fraction``
(bytes held / uncompressed), ``metric`` and ``higher_is_better``.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

# ----------------------------------------------------------------------------------------------------- numbers


def fmt(value: Any, digits: int = 1) -> str:
    """``"-"`` for ``None``, a float with ``digits`` decimals, anything else as ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pct(fraction: float | None, digits: int = 1) -> str:
    """A fraction as a percentage string (``0.756`` -> ``"75.6"``; ``None`` -> ``"-"``)."""
    return fmt(None if fraction is None else 100 * fraction, digits)


def mib(nbytes: float | None) -> str:
    """Bytes as MiB with two decimals (``"-"`` for ``None``)."""
    return "-" if nbytes is None else f"{nbytes / 2**20:,.2f}"


def code(label: str) -> str:
    """A label as inline code in a Markdown table cell (``|`` escaped so it does not split the cell)."""
    return "`" + label.replace("|", "\\|") + "`"


def family(label: str) -> str:
    """A configuration's label without its ratio: the line it belongs to in score-vs-ratio plots."""
    text = re.sub(r"(compression_ratio|ratio)=[0-9.e-]+(, )?", "", label)
    return text.replace("()", "").replace(", )", ")")


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not ``None`` (``None`` when there are none)."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def ci95(values: Sequence[float]) -> float | None:
    """Half-width of the 95% normal-approximation interval of the mean of ``values``: ``1.96 * sd / sqrt(n)``
    (sample standard deviation); ``None`` for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return 1.96 * sd / math.sqrt(n)


# ----------------------------------------------------------------------------------------------------- tables


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> Path:
    """``rows`` as CSV (``fields`` in order, missing keys empty, floats rounded to 6 decimals, ``\\n`` line ends)."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: round(row[k], 6) if isinstance(row.get(k), float) else row.get(k, "") for k in fields})
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    """Lines of a Markdown table; ``align``: one character per column, ``l`` (``---``) or ``r`` (``---:``);
    default: the first column left, the others right."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---|" if a == "l" else "---:|" for a in align)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table in the terminal: rich when available, aligned plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        print(title)
        for row in (header, *rows):
            print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
        return
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


# ----------------------------------------------------------------------------------------------------- plots


def figure(**kwargs):
    """A bare matplotlib ``Figure`` (renders with the Agg canvas; pyplot state is never touched)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def panels(n: int, width: float = 5.0, height: float = 3.6, **kwargs):
    """``(figure, axes)``: ``n`` panels, at most 3 per row (unused cells hidden)."""
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig = figure(figsize=(width * cols, height * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False, **kwargs)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def groups(rows: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by ``(model, task, mode)``, in first-seen order."""
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        out[(row["model"], row["task"], row["mode"])].append(row)
    return out


def _ylabel(row: dict[str, Any]) -> str:
    if not row["higher_is_better"]:
        return f"{row['metric']} (lower is better)"
    return f"score ({row['metric']})" if row["metric"] in ("all", "part") else row["metric"]


def _label(ax, key: tuple, row: dict[str, Any], xlabel: str, legend_size: int) -> None:
    """Title (the task, and its mode unless query-agnostic), axis labels, grid and legend of one panel."""
    _, task, mode = key
    ax.set_title(task + (f" ({mode})" if mode and mode != "query-agnostic" else ""), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_ylabel(row))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_score_vs_ratio(rows: Sequence[dict[str, Any]]):
    """Score vs compression ratio, one line per policy family and one panel per task; uncompressed dashed."""
    grouped = groups(rows)
    fig, axes = panels(max(1, len(grouped)))
    for ax, (key, members) in zip(axes, grouped.items()):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in members:
            if r["ratio"] is not None and r["policy"] != "none" and r["score"] is not None:
                lines[r["family"]].append((r["ratio"], r["score"]))
        for fam, points in lines.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=fam)
        for r in members:
            if r["policy"] == "none" and r["score"] is not None:
                ax.axhline(r["score"], linestyle="--", color="gray", label=f"uncompressed ({r['score']:.1f})")
        _label(ax, key, members[0], "compression ratio (fraction of tokens evicted)", legend_size=7)
    fig.tight_layout()
    return fig


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The points no other point beats on both bytes held (fewer) and score (better), sorted by bytes."""
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        value = y if higher_is_better else -y
        if value > best:
            front.append((x, y))
            best = value
    return front


def plot_score_vs_bytes(rows: Sequence[dict[str, Any]]):
    """Score vs KV bytes held (fraction of the uncompressed cache): every configuration, eviction and quantization
    together, one colour per family, and the Pareto front, one panel per task."""
    grouped = groups(rows)
    fig, axes = panels(max(1, len(grouped)))
    families = sorted({r["family"] for r in rows})
    colours = {f: f"C{i % 10}" for i, f in enumerate(families)}
    for ax, (key, members) in zip(axes, grouped.items()):
        held = [r for r in members if r["kv_fraction"] is not None and r["score"] is not None]
        points = [(r["kv_fraction"], r["score"]) for r in held]
        for fam in families:
            mine = [(r["kv_fraction"], r["score"]) for r in held if r["family"] == fam]
            if mine:
                ax.scatter([p[0] for p in mine], [p[1] for p in mine], color=colours[fam], label=fam, s=22, zorder=3)
        front = pareto_front(points, members[0]["higher_is_better"])
        if front:
            front.append((max(p[0] for p in points), front[-1][1]))  # the front holds up to the largest cache
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", alpha=0.5,
                    linewidth=1, label="Pareto front", zorder=2)
        _label(ax, key, members[0], "KV bytes held / uncompressed", legend_size=6)
    fig.tight_layout()
    return fig


def draw_heatmap(ax, values: Sequence[Sequence[float | None]], rows: Sequence[str], columns: Sequence[str],
                 fontsize: int = 9):
    """Scores in [0, 100] as a red-yellow-green grid with each value written in its cell (``-`` when missing);
    returns the image (for a colour bar)."""
    data = [[float("nan") if v is None else v for v in row] for row in values]
    image = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v is None else f"{v:.0f}", ha="center", va="center", fontsize=fontsize)
    ax.set_xticks(range(len(columns)), list(columns))
    ax.set_yticks(range(len(rows)), list(rows))
    return image
