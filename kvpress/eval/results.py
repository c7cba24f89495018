"""Result files of one run directory.

    samples.jsonl   one record per (sample, configuration), written as the run goes
    metrics.json    aggregated scores (schema in kvpress/eval/README.md)
    summary.csv     one row per configuration x length (and an "all" row)
    summary.md      the same as a Markdown table, plus needle grids
    config.json     the resolved configuration of the run
    *.png           score vs compression ratio; one needle heatmap per configuration (grid runs)
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Sequence


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


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.2f}"


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


def write_csv(path: Path, metrics: dict[str, Any]) -> None:
    rows = summary_rows(metrics)
    fields = ["task", "model", "mode", "label", "policy", "compression_ratio", "length", "score", "n_samples",
              "empty_answers", "kv_bytes", "kv_fraction", "seconds"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


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
            f"| {e['label']} | {_fmt(e['score'])} | "
            + " | ".join(_fmt(e["per_length"].get(x)) for x in lengths)
            + f" | {e['empty_answers']} | {_mib(e['kv_bytes'])} | {_fmt(frac)} | {_fmt(e['seconds'])} |"
        )
    for e in metrics["entries"]:
        if not e.get("grid"):
            continue
        depths = sorted(e["grid"], key=float)
        lines += ["", f"## Needle grid: {e['label']} (rows: depth, columns: length)", "",
                  "| depth | " + " | ".join(lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for d in depths:
            lines.append(f"| {d} | " + " | ".join(_fmt(e["grid"][d].get(x)) for x in lengths) + " |")
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
    write_csv(out / "summary.csv", metrics)
    (out / "summary.md").write_text(markdown_summary(metrics), encoding="utf-8")
    files += [out / name for name in ("metrics.json", "config.json", "summary.csv", "summary.md")]
    if plots:
        from kvpress.eval.plots import plot_heatmap, plot_score_vs_ratio

        if any(e["compression_ratio"] is not None for e in metrics["entries"]):
            files.append(plot_score_vs_ratio(metrics, out / "score_vs_ratio.png"))
        for e in metrics["entries"]:
            if e.get("grid"):
                files.append(plot_heatmap(e, metrics, out / f"heatmap_{slug(e['label'])}.png"))
    return files
