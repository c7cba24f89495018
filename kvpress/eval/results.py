"""Result files of one run directory.

    samples.jsonl   one record per (sample, configuration), written as the run goes
    metrics.json    aggregated scores (schema in kvpress/eval/README.md)
    summary.csv     one row per configuration x length (and an "all" row)
    summary.md      the same as a Markdown table, plus needle grids
    config.json     the resolved configuration of the run
    *.png           score vs compression ratio and vs KV bytes held (kvpress.eval.report); one needle heatmap
                    per configuration (grid runs)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from kvpress.eval.report import draw_heatmap, family, figure, fmt, mib, write_csv


class RecordWriter:
    """Appends records to ``out_dir/samples.jsonl`` line by line (a crashed run keeps what it did)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "samples.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "samples.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summary_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (configuration x length, then configuration x all) for the CSV summary."""
    rows = []
    for entry in metrics["entries"]:
        base = {
            "task": metrics["task"], "model": metrics["model"], "mode": metrics["mode"], "label": entry["label"],
            "policy": entry["policy"], "compression_ratio": entry["compression_ratio"],
        }
        for length, value in entry["per_length"].items():
            rows.append({**base, "length": length, "score": value})
        rows.append({
            **base, "length": "all", "score": entry["score"], "n_samples": entry["n_samples"],
            "empty_answers": entry["empty_answers"], "kv_bytes": entry["kv_bytes"],
            "kv_fraction": entry["kv_fraction"], "seconds": entry["seconds"],
        })
    return rows


SUMMARY_FIELDS = ["task", "model", "mode", "label", "policy", "compression_ratio", "length", "score", "n_samples",
                  "empty_answers", "kv_bytes", "kv_fraction", "seconds"]


def plot_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's entries as the rows :mod:`kvpress.eval.report` plots (one panel: this task)."""
    return [{"model": metrics["model"], "task": metrics["task"], "mode": metrics["mode"], "policy": e["label"],
             "family": family(e["label"]), "ratio": e["compression_ratio"], "score": e["score"],
             "kv_fraction": e["kv_fraction"], "metric": "score", "higher_is_better": True}
            for e in metrics["entries"]]


def plot_heatmap(entry: dict[str, Any], metrics: dict[str, Any], path: str | Path) -> Path:
    """Needle grid of one configuration: depth rows, length columns, score colour and text."""
    grid = entry["grid"]
    depths = sorted(grid, key=float)
    lengths = [str(x) for x in metrics["lengths"]]
    fig = figure(figsize=(1.2 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
    ax = fig.subplots()
    image = draw_heatmap(ax, [[grid[d].get(x) for x in lengths] for d in depths],
                         [f"{float(d):.0%}" for d in depths], lengths)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{metrics['task']}: {entry['label']} (score {entry['score']:.1f})", fontsize=10)
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def markdown_summary(metrics: dict[str, Any]) -> str:
    lengths = [str(x) for x in metrics["lengths"]]
    lines = [
        f"# {metrics['task']} on {metrics['model'] or 'model'}",
        "",
        f"mode: {metrics['mode']}, seed: {metrics['seed']}, samples per cell: {metrics['samples']}, "
        f"wall time: {metrics['seconds']:.0f} s",
        "",
        "| configuration | score | " + " | ".join(f"L={x}" for x in lengths)
        + " | empty | KV MiB | KV % of full | seconds |",
        "|---|---:|" + "---:|" * len(lengths) + "---:|---:|---:|---:|",
    ]
    for e in metrics["entries"]:
        frac = None if e["kv_fraction"] is None else 100 * e["kv_fraction"]
        lines.append(
            f"| {e['label']} | {fmt(e['score'])} | "
            + " | ".join(fmt(e["per_length"].get(x)) for x in lengths)
            + f" | {e['empty_answers']} | {mib(e['kv_bytes'])} | {fmt(frac)} | {fmt(e['seconds'])} |"
        )
    for e in metrics["entries"]:
        if not e.get("grid"):
            continue
        depths = sorted(e["grid"], key=float)
        lines += ["", f"## Needle grid: {e['label']} (rows: depth, columns: length)", "",
                  "| depth | " + " | ".join(lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for d in depths:
            lines.append(f"| {d} | " + " | ".join(fmt(e["grid"][d].get(x)) for x in lengths) + " |")
    return "\n".join(lines) + "\n"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def write_run(out_dir: str | Path, records: Sequence[dict[str, Any]], metrics: dict[str, Any],
              config: dict[str, Any], plots: bool = True) -> list[Path]:
    """Write metrics, summaries, configuration and plots into ``out_dir``; return the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "samples.jsonl"] if (out / "samples.jsonl").exists() else []
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")
    write_csv(out / "summary.csv", summary_rows(metrics), SUMMARY_FIELDS)
    (out / "summary.md").write_text(markdown_summary(metrics), encoding="utf-8")
    files += [out / name for name in ("metrics.json", "config.json", "summary.csv", "summary.md")]
    if plots:
        from kvpress.eval.report import plot_score_vs_bytes, plot_score_vs_ratio

        if any(e["compression_ratio"] is not None for e in metrics["entries"]):
            plots_of = (("score_vs_ratio.png", plot_score_vs_ratio), ("score_vs_bytes.png", plot_score_vs_bytes))
            for name, plot in plots_of:
                plot(plot_rows(metrics)).savefig(out / name, dpi=110)
                files.append(out / name)
        for e in metrics["entries"]:
            if e.get("grid"):
                files.append(plot_heatmap(e, metrics, out / f"heatmap_{slug(e['label'])}.png"))
    return files
