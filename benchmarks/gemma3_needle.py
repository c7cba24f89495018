"""Needle retrieval on the embedded Gemma-3-270M (15 sliding-window layers of 512 tokens, 3 full layers) at ~1,500
tokens, query-agnostic (context compressed before the question): score and whole-cache bytes held vs the
uncompressed fp32 cache, for quantization of every layer and for eviction on full layers only or on every layer.

    python benchmarks/gemma3_needle.py --samples 20 --out benchmarks/results/gemma3_needle.json

Every configuration of a task shares the same samples. "bytes vs full" is the mean over samples of the bytes the
cache holds right after the context forward (every layer: sliding rings included) over the uncompressed cache's;
the nominal ratio of an eviction policy applies to the layers it acts on (full-attention ones unless
``sliding_layers=True``). Scores are case-insensitive substring matches x100 (``kvpress/eval/README.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvpress  # noqa: E402
from kvpress.eval import evaluate, get_task  # noqa: E402
from kvpress.eval.report import ci95  # noqa: E402
from kvpress.policies.expr import expand  # noqa: E402

TASKS = ["niah_single_prose", "niah_single_noise", "niah_multikey_prose"]
# Each configuration is a policy expression (kvpress.policies.expr): the name in the tables is the expression.
CONFIGS = [
    "none",
    "kvquant(bits=2)",
    "kvquant(bits=4)",
    # sinks and the 128-token residual window held in float16 instead of the model's float32
    "kvquant(bits=2, fp_dtype=torch.float16)",
    "kvquant(bits=4, fp_dtype=torch.float16)",
    "knorm(compression_ratio=0.5)",  # full-attention layers only (the default)
    "knorm(compression_ratio=0.5, sliding_layers=True)",
    "snapkv(compression_ratio=0.5, sliding_layers=True)",
    "streaming_llm(compression_ratio=0.5, sliding_layers=True)",
]
# the default set: what fits ~1.5 h on one thread at 20 samples x 3 tasks is less; see RESULTS.md for what ran
DEFAULT = ["none", "kvquant(bits=2)", "kvquant(bits=4)", "knorm(compression_ratio=0.5)",
           "knorm(compression_ratio=0.5, sliding_layers=True)", "snapkv(compression_ratio=0.5, sliding_layers=True)"]


def _ci95_points(scores: list[float]) -> str:
    half = ci95(scores)
    return "nan" if half is None else f"{100 * half:.0f}"


def table(records: list[dict], tasks: list[str]) -> str:
    """Markdown: one row per configuration, a score column per task (with samples), mean, % of full, bytes."""
    full = {t: [r for r in records if r["config"] == "none" and r["task"] == t] for t in tasks}
    if not all(full.values()):
        return "(no uncompressed baseline in these records: run with the `none` configuration, or merge its records)"
    full_mean = sum(100 * sum(r["score"] for r in full[t]) / len(full[t]) for t in tasks) / len(tasks)
    out = ["| configuration | " + " | ".join(tasks) + " | mean | % of full | ±95% | whole-cache bytes vs full |",
           "|---|" + "---:|" * (len(tasks) + 4)]
    for name in dict.fromkeys(r["config"] for r in records):
        cells, kv, kv_full, all_scores = [], 0.0, 0.0, []
        for t in tasks:
            rows = [r for r in records if r["config"] == name and r["task"] == t]
            scores = [r["score"] for r in rows]
            all_scores += scores
            cells.append(f"{100 * sum(scores) / len(scores):.0f} (n={len(scores)})")
            kv += sum(r["kv_bytes"] for r in rows)
            kv_full += sum(r["kv_bytes"] for r in full[t])
        mean = 100 * sum(all_scores) / len(all_scores)
        out.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.1f} | {100 * mean / full_mean:.0f}% | "
                   f"{_ci95_points(all_scores)} | {kv / kv_full:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--length", type=int, default=1500)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--tasks", nargs="*", default=TASKS)
    p.add_argument("--configs", nargs="*", default=DEFAULT, metavar="EXPR",
                   help="policy expressions (`none` = uncompressed); measured so far: " + "; ".join(CONFIGS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON of the per-sample records and the table, "
                   "rewritten after every task")
    p.add_argument("--merge", type=Path, nargs="*", default=None,
                   help="evaluate nothing: merge the records of these JSON files (same samples), print the table")
    args = p.parse_args(argv)
    if args.merge:
        merged: dict[tuple, dict] = {}
        for path in args.merge:
            for r in json.loads(path.read_text())["records"]:
                merged.setdefault((r["config"], r["task"], r["index"]), r)
        records = list(merged.values())
        tasks = [t for t in args.tasks if any(r["task"] == t for r in records)]
        text = table(records, tasks)
        print(text)
        if args.out:
            args.out.write_text(json.dumps({"meta": {"merged": [str(m) for m in args.merge]}, "records": records,
                                            "table": text}, indent=1))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = kvpress.load_model(args.model)
    specs = [expand(c)[0] for c in args.configs]
    names = {spec.label: name for name, spec in zip(args.configs, specs)}
    records: list[dict] = []
    done: list[str] = []
    for task_name in args.tasks:
        result = evaluate(model, tokenizer, get_task(task_name), specs, [args.length], args.samples,
                          mode="query-agnostic", model_name=args.model, progress=True)
        for r in result.records:
            records.append({"config": names[r["label"]], "task": task_name, "index": r["index"],
                            "score": r["score"], "kv_bytes": r["kv_bytes"], "prompt_tokens": r["prompt_tokens"]})
        done.append(task_name)
        text = table(records, done)
        print(f"[{time.perf_counter() - started:.0f}s] {task_name}\n{text}", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            meta = {"model": args.model, "length": args.length, "samples": args.samples, "tasks": done,
                    "configs": args.configs, "threads": args.threads, "seconds": round(time.perf_counter() - started, 1)}
            args.out.write_text(json.dumps({"meta": meta, "records": records, "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
