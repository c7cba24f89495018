"""Reports of a result store: Markdown and CSV tables and matplotlib plots (Agg canvas; pyplot is never imported).

A *row* pools every stored cell of one (model, task, mode, policy configuration) over lengths, depths and seeds:
its score is the mean over all their samples (perplexity: exp of the token-weighted mean NLL), with a 95%
normal-approximation interval for sample-scored tasks. ``pct_of_full`` compares it to the uncompressed row of the
same (model, task, mode): ``100 * score / full`` for scores, ``100 * full_ppl / ppl`` for perplexity, so 100 is
lossless and lower is worse either way. ``kv_fraction`` is the mean over samples of bytes held after the
compressed first forward (perplexity: the peak) over the bytes of the uncompressed cache on the same tokens.

Files: ``report.md`` (or ``--markdown``), ``scores.csv`` (one row per row above), ``times.csv``,
``score_vs_ratio.png``, ``score_vs_bytes.png`` (with the Pareto front of every configuration, eviction and
quantization together) and ``heatmap_<task>.png`` (needle depth x length per policy, needle tasks).
Everything but the times section and ``times.csv`` is a function of the stored records' scores and bytes, so
the same cells give the same report whichever backend or how many runs produced them.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from kvpress.eval.report import (ci95, code, draw_heatmap, family, fmt, groups, mean, panels, pct,
                                 plot_score_vs_bytes, plot_score_vs_ratio, write_csv)
from kvpress.sweep.records import RecordsFile, open_results
from kvpress.sweep.store import ResultStore

__all__ = ["load_records", "load_rows", "aggregate", "family", "headline_table", "task_tables", "times_table",
           "plot_score_vs_ratio", "plot_score_vs_bytes", "plot_needle_heatmaps", "needle_grid", "write_report",
           "update_readme"]

README_START = "<!-- kvpress-leaderboard:start -->"
README_END = "<!-- kvpress-leaderboard:end -->"
DEPTH_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)
SCORE_FIELDS = ["model", "task", "mode", "policy", "family", "ratio", "metric", "higher_is_better", "score", "ci95",
                "pct_of_full", "kv_fraction", "kv_mib", "n_samples", "n_cells", "empty_answers"]
TIME_FIELDS = ["model", "task", "mode", "policy", "n_samples", "seconds_per_sample", "prefill_seconds_per_sample",
               "decode_seconds_per_sample"]


# ----------------------------------------------------------------------------------------------------- loading


def load_records(store: str | Path | ResultStore | RecordsFile,
                 keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The stored cell records (only ``keys`` when given), in key order; ``store``: a result store or a records
    file (:mod:`kvpress.sweep.records`)."""
    store = open_results(store)
    wanted = None if keys is None else set(keys)
    return [r for r in store.records() if wanted is None or r["key"] in wanted]


def _pool(records: list[dict[str, Any]]) -> dict[str, Any]:
    first = records[0]
    samples = [s for r in records for s in r["samples"]]
    n = sum(r["n_samples"] for r in records)
    ci = None
    if first["metric"] == "perplexity":
        tokens = sum(s["tokens_scored"] for s in samples)
        score = math.exp(sum(math.log(s["perplexity"]) * s["tokens_scored"] for s in samples) / tokens)
    elif samples and "score" in samples[0] and not first["task"].startswith("lm_eval:"):
        values = [100.0 * s["score"] for s in samples]
        score = sum(values) / len(values)
        ci = ci95(values)
    else:
        score = sum(r["score"] * r["n_samples"] for r in records) / max(n, 1)
    fractions = [s["kv_fraction"] for s in samples if s.get("kv_fraction") is not None]
    held = [s["kv_bytes"] for s in samples if s.get("kv_bytes") is not None]
    times = [r["seconds"] for r in records if r.get("seconds") is not None]
    prefill = [r["prefill_seconds"] for r in records if r.get("prefill_seconds") is not None]
    return {
        "model": first["model"], "task": first["task"], "mode": first["mode"], "policy": first["policy"],
        "family": family(first["policy"]), "ratio": first["compression_ratio"], "metric": first["metric"],
        "higher_is_better": first["higher_is_better"], "score": score, "ci95": ci, "pct_of_full": None,
        "kv_fraction": sum(fractions) / len(fractions) if fractions else None,
        "kv_mib": sum(held) / len(held) / 2**20 if held else None, "n_samples": n, "n_cells": len(records),
        "empty_answers": sum(r["empty_answers"] or 0 for r in records),
        "per_length": _per(records, samples, "length"),
        "seconds_per_sample": sum(times) / n if times else None,
        "prefill_seconds_per_sample": sum(prefill) / n if prefill else None,
        "decode_seconds_per_sample": (sum(times) - sum(prefill)) / n if prefill else None,
    }


def _per(records, samples, axis: str) -> dict[str, float]:
    out: dict[str, list[float]] = defaultdict(list)
    for r in records:
        for s in r["samples"]:
            if "score" in s and r[axis] is not None:
                out[str(r[axis])].append(100.0 * s["score"])
    return {k: sum(v) / len(v) for k, v in out.items()}


def _sort_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row["task"], row["mode"] or "", row["family"] != "none", row["family"],
            -1.0 if row["ratio"] is None else row["ratio"], row["policy"])


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, task, mode, policy configuration); see the module docstring."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["task"], r["mode"], r["policy"])].append(r)
    rows = [_pool(g) for g in groups.values()]
    full = {(r["model"], r["task"], r["mode"]): r["score"] for r in rows if r["policy"] == "none"}
    for row in rows:
        base = full.get((row["model"], row["task"], row["mode"]))
        if base and row["higher_is_better"]:
            row["pct_of_full"] = 100.0 * row["score"] / base
        elif base and row["score"]:
            row["pct_of_full"] = 100.0 * base / row["score"]
    return sorted(rows, key=_sort_key)


def load_rows(store: str | Path | ResultStore | RecordsFile,
              keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """:func:`aggregate` of the stored records (only ``keys`` when given)."""
    return aggregate(load_records(store, keys))


# ----------------------------------------------------------------------------------------------------- tables


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def task_tables(rows: Sequence[dict[str, Any]]) -> str:
    """One Markdown table per (model, task, mode): score, interval, % of uncompressed, KV held, samples."""
    lines = []
    for (model, task, mode), members in groups(rows).items():
        lower = not members[0]["higher_is_better"]
        what = f"{members[0]['metric']}, lower is better" if lower else f"{members[0]['metric']} x100"
        lines += ["", f"### {task}" + (f" ({mode})" if mode else "") + f" — {model}", "",
                  f"score: {what}; % of full: 100 = as good as uncompressed", "",
                  "| policy | ratio | score | ±95% | % of full | KV held % | KV MiB | samples | empty |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in members:
            lines.append(
                f"| {code(r['policy'])} | {_ratio(r['ratio'])} | {fmt(r['score'], 2 if lower else 1)} | {fmt(r['ci95'])} "
                f"| {fmt(r['pct_of_full'])} | {pct(r['kv_fraction'])} | {fmt(r['kv_mib'], 2)} | {r['n_samples']} "
                f"| {r['empty_answers'] if not lower else '-'} |"
            )
    return "\n".join(lines).lstrip("\n")


def headline_table(rows: Sequence[dict[str, Any]]) -> str:
    """Policies x ratios: mean % of the uncompressed score over the accuracy tasks (and perplexity apart), then
    the configurations without a ratio (quantizers, fixed windows) in a second table."""
    acc = [r for r in rows if r["higher_is_better"] and r["pct_of_full"] is not None]
    ppl = [r for r in rows if not r["higher_is_better"] and r["pct_of_full"] is not None]
    ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
    tasks = sorted({r["task"] for r in acc})
    fam_order: list[str] = []
    for r in rows:
        if r["family"] not in fam_order and r["family"] != "none":
            fam_order.append(r["family"])

    lines = [f"Mean % of the uncompressed score over {', '.join(tasks) or 'no accuracy task'}"
             + (" (perplexity: 100 x full ppl / ppl)" if ppl else "") + "; KV held: % of the uncompressed cache's bytes.",
             ""]
    ratio_fams = [f for f in fam_order if any(r["family"] == f and r["ratio"] is not None for r in rows)]
    if ratios and ratio_fams:
        head = "| policy | " + " | ".join(f"r={x:g}" for x in ratios)
        head += (" | " + " | ".join(f"ppl r={x:g}" for x in ratios) if ppl else "") + " | KV held % at each r |"
        head += " ppl: peak KV held % |" if ppl else ""
        lines += [head, "|---|" + "---:|" * ((len(ratios) + 1) * (2 if ppl else 1))]
        for fam in ratio_fams:
            cells = [mean([r["pct_of_full"] for r in acc if r["family"] == fam and r["ratio"] == x]) for x in ratios]
            pcells = [mean([r["pct_of_full"] for r in ppl if r["family"] == fam and r["ratio"] == x]) for x in ratios]
            # Accuracy tasks hold the compressed context; chunked perplexity reports its peak: never averaged together.
            held_text = _held_per_ratio(acc or rows, fam, ratios)
            lines.append(f"| {code(fam)} | " + " | ".join(fmt(c) for c in cells)
                         + (" | " + " | ".join(fmt(c) for c in pcells) if ppl else "") + f" | {held_text} |"
                         + (f" {_held_per_ratio(ppl, fam, ratios)} |" if ppl else ""))
    fixed = [f for f in fam_order if f not in ratio_fams]
    if fixed:
        lines += ["", "| configuration | % of full (accuracy) | % of full (perplexity) | KV held % | ppl: peak KV held % |",
                  "|---|---:|---:|---:|---:|"]
        for fam in fixed:
            held = mean([r["kv_fraction"] for r in acc or rows if r["family"] == fam])
            peak = mean([r["kv_fraction"] for r in ppl if r["family"] == fam])
            lines.append(f"| {code(fam)} | {fmt(mean([r['pct_of_full'] for r in acc if r['family'] == fam]))} | "
                         f"{fmt(mean([r['pct_of_full'] for r in ppl if r['family'] == fam]))} | "
                         f"{pct(held)} | {pct(peak)} |")
    full_scores = [r for r in rows if r["policy"] == "none"]
    if full_scores:
        lines += ["", "Uncompressed: " + ", ".join(
            f"{r['task']} {fmt(r['score'], 2 if not r['higher_is_better'] else 1)}" for r in full_scores) + "."]
    return "\n".join(lines)


def model_order(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Models by how many rows they have (the main model of a sweep first), then by name."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[r["model"]] += 1
    return sorted(counts, key=lambda m: (-counts[m], m))


def summary_tables(rows: Sequence[dict[str, Any]]) -> str:
    """The headline table, one per model under a ``###`` heading when the rows hold several models."""
    models = model_order(rows)
    if len(models) == 1:
        return headline_table(rows)
    return "\n\n".join(f"### {model}\n\n" + headline_table([r for r in rows if r["model"] == model])
                       for model in models)


def _held_per_ratio(rows: Sequence[dict[str, Any]], family: str, ratios: list[float]) -> str:
    """``"76 / 50 / 25"``: mean % of the uncompressed cache's bytes held by ``family`` at each ratio."""
    return " / ".join(pct(mean([r["kv_fraction"] for r in rows if r["family"] == family and r["ratio"] == x]), 0)
                      for x in ratios)


def times_table(rows: Sequence[dict[str, Any]]) -> str:
    several = len({r["model"] for r in rows}) > 1
    lines = ["| " + ("model | " if several else "") + "task | policy | s/sample | prefill s/sample | decode s/sample |",
             "|---|" + ("---|" if several else "") + "---|---:|---:|---:|"]
    for r in rows:
        lines.append("| " + (f"{r['model']} | " if several else "") + f"{r['task']} | {code(r['policy'])} | "
                     f"{fmt(r['seconds_per_sample'], 2)} | "
                     f"{fmt(r['prefill_seconds_per_sample'], 2)} | {fmt(r['decode_seconds_per_sample'], 2)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- plots


def _depth_bin(value: float) -> float:
    return min(DEPTH_BINS, key=lambda b: abs(b - value))


def needle_grid(records: Sequence[dict[str, Any]], task: str, policy: str) -> dict[float, dict[int, float]]:
    """``{depth: {length: score x100}}`` of one policy on one needle task (depths binned to 0, .25, .5, .75, 1)."""
    cells: dict[float, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["task"] != task or r["policy"] != policy:
            continue
        for s in r["samples"]:
            depth = r["depth"] if r["depth"] is not None else s.get("needle_depth")
            if depth is not None and "score" in s:
                cells[_depth_bin(depth)][r["length"]].append(100.0 * s["score"])
    return {d: {n: sum(v) / len(v) for n, v in row.items()} for d, row in cells.items()}


def heatmap_policies(records: Sequence[dict[str, Any]], task: str, ratio: float = 0.5) -> list[str]:
    """The uncompressed run and, per family, its configuration at the ratio nearest ``ratio`` (or its only one)."""
    by_family: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for r in records:
        if r["task"] == task:
            fam = family(r["policy"])
            distance = 0.0 if r["compression_ratio"] is None else abs(r["compression_ratio"] - ratio)
            if (distance, r["policy"]) not in by_family[fam]:
                by_family[fam].append((distance, r["policy"]))
    chosen = [min(v)[1] for f, v in sorted(by_family.items(), key=lambda kv: (kv[0] != "none", kv[0]))]
    return chosen


def plot_needle_heatmaps(records: Sequence[dict[str, Any]], task: str, ratio: float = 0.5):
    """Needle depth x context length heat maps of ``task``: one panel per policy (see :func:`heatmap_policies`)."""
    policies = [p for p in heatmap_policies(records, task, ratio) if needle_grid(records, task, p)]
    fig, axes = panels(max(1, len(policies)), width=3.6, height=3.0)
    for ax, policy in zip(axes, policies):
        grid = needle_grid(records, task, policy)
        depths = sorted(grid)
        lengths = sorted({n for row in grid.values() for n in row})
        values = [[grid[d].get(n) for n in lengths] for d in depths]
        draw_heatmap(ax, values, [f"{d:.0%}" for d in depths], [str(n) for n in lengths], fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        ax.set_title(policy if len(policy) < 40 else policy[:38] + "…", fontsize=8)
    fig.suptitle(f"{task}: score by needle depth and length", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------- writing


def write_report(store: str | Path | ResultStore | RecordsFile, out_dir: str | Path, *,
                 markdown: str | Path | None = None, keys: Iterable[str] | None = None, title: str | None = None,
                 intro: str = "", readme: str | Path | None = None, plots: bool = True) -> list[Path]:
    """Write the report of ``store`` (a result store or a records file; only ``keys`` when given) into
    ``out_dir``; ``markdown`` puts the Markdown elsewhere (image links relative to it). ``readme``: replace the
    block between ``README_START`` and ``README_END`` in that file with the headline table. Returns the files
    written. The same records give the same report, byte for byte (times included), from a store or its export."""
    store = open_results(store)
    records = load_records(store, keys)
    if not records:
        raise ValueError(f"{store.root}: no finished cells to report")
    versions = sorted({r["config"]["kvpress_version"] for r in records})
    rows = aggregate(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path = Path(markdown) if markdown else out / "report.md"
    files = [write_csv(out / "scores.csv", rows, SCORE_FIELDS), write_csv(out / "times.csv", rows, TIME_FIELDS)]
    models = model_order(rows)
    several = len(models) > 1  # one summary and one set of plots per model (file names then carry the model)
    images: list[tuple[str, Path]] = []
    if plots:
        for model in models:
            m_rows = [r for r in rows if r["model"] == model]
            m_records = [r for r in records if r["model"] == model]
            tag, note = (f"_{model}", f" ({model})") if several else ("", "")
            figures = [(f"Score vs compression ratio{note}", f"score_vs_ratio{tag}.png", plot_score_vs_ratio(m_rows)),
                       (f"Score vs KV bytes held (Pareto front){note}", f"score_vs_bytes{tag}.png",
                        plot_score_vs_bytes(m_rows))]
            for task in sorted({r["task"] for r in m_records}):
                if any(s.get("needle_depth") is not None for r in m_records if r["task"] == task for s in r["samples"]):
                    figures.append((f"Needle depth x length: {task}{note}", f"heatmap_{task}{tag}.png",
                                    plot_needle_heatmaps(m_records, task)))
            for caption, name, fig in figures:
                fig.savefig(out / name, dpi=100)
                images.append((caption, out / name))
                files.append(out / name)
    keys_failed = [e for e in store.errors() if keys is None or e["key"] in set(keys)]
    lines = [f"# {title or 'Sweep report'}", ""]
    if intro:
        lines += [intro.strip(), ""]
    lines += [f"{len(records)} cells, kvpress {', '.join(versions)}, models: {', '.join(models)}. "
              f"Failed cells: {len(keys_failed)}.", "", "## Summary", "", summary_tables(rows), "",
              "## Per task", "", task_tables(rows), ""]
    if images:
        lines += ["## Plots", ""]
        for caption, path in images:
            lines += [f"![{caption}]({_relative(path, md_path.parent)})", ""]
    if keys_failed:
        lines += ["## Failed cells", "", "| cell | error |", "|---|---|"]
        lines += [f"| {e['cell']} | {e['error'].splitlines()[0][:160]} |" for e in keys_failed]
        lines.append("")
    lines += ["## Times", "", "Seconds per sample on the machine that ran each cell (fan-out prefills counted for "
              "every configuration that shares them); not part of the comparison.", "", times_table(rows), ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines), encoding="utf-8")
    files.append(md_path)
    if readme:
        update_readme(readme, summary_tables(rows), source=_relative(md_path, Path(readme).parent))
        files.append(Path(readme))
    return files


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve()).replace(os.sep, "/")


def update_readme(path: str | Path, table: str, source: str) -> None:
    """Replace the text between the leaderboard markers of ``path`` with ``table`` (markers must exist)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path}: no {README_START} ... {README_END} block to update")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    block = f"{README_START}\n{table}\n\nGenerated by `make leaderboard` (full tables and plots: [{source}]({source})).\n"
    path.write_text(head + block + README_END + tail, encoding="utf-8")
