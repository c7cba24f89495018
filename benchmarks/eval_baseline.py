"""Which synthetic tasks can the model do at all, uncompressed? Runs every task at 1024 and 2048 tokens.

    python benchmarks/eval_baseline.py                       # SmolLM2-135M, ~1 h on 2 CPU cores
    python benchmarks/eval_baseline.py --tasks niah_single_noise --lengths 1024 --samples 5

Writes one run directory per task under ``--out`` (samples.jsonl, metrics.json, ...) plus ``baseline.json``
and ``baseline.md``: score per task and length, empty answers, seconds per sample, and a verdict
(``ok`` >= 80 at every length, ``partial`` >= 30 somewhere, ``fails`` otherwise). A task the model fails
is reported as failing, not dropped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvpress.eval import PolicyConfig, available_tasks, evaluate, get_task
from kvpress.eval.results import read_records, write_run
from kvpress.eval.runner import summarize
from kvpress.models import load_model

# The acceptance check uses 20 samples for single-needle retrieval; other tasks get --other-samples.
KEY_TASKS = ("niah_single_noise", "niah_single_prose")


def verdict(scores: list[float]) -> str:
    if all(s >= 80 for s in scores):
        return "ok"
    return "partial" if any(s >= 30 for s in scores) else "fails"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", nargs="+", default=None, help="default: every task, single needles first")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048])
    p.add_argument("--samples", type=int, default=20, help="samples per length for single-needle tasks")
    p.add_argument("--other-samples", type=int, default=10, help="samples per length for the other tasks")
    p.add_argument("--mode", default="query-agnostic", choices=("query-agnostic", "query-aware"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/eval_baseline")
    p.add_argument("--resume", action="store_true", help="reuse task runs whose metrics.json exists")
    args = p.parse_args(argv)

    tasks = args.tasks or [*KEY_TASKS, *[t for t in available_tasks() if t not in KEY_TASKS]]
    out = Path(args.out)
    model, tokenizer = load_model(args.model)
    rows = []
    for name in tasks:
        run_dir = out / name
        if args.resume and (run_dir / "metrics.json").is_file():
            # re-aggregate the stored records, so summaries follow the current metric definitions
            records = read_records(run_dir)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            metrics["entries"] = summarize(records, [PolicyConfig()])
            write_run(run_dir, records, metrics, json.loads((run_dir / "config.json").read_text()), plots=False)
        else:
            samples = args.samples if name in KEY_TASKS else args.other_samples
            metrics = evaluate(
                model, tokenizer, get_task(name), [PolicyConfig()], args.lengths, samples, mode=args.mode,
                seed=args.seed, model_name=args.model, out_dir=run_dir,
                config={"benchmark": "eval_baseline", **vars(args), "task": name},
            ).metrics
        entry = metrics["entries"][0]
        scores = [entry["per_length"][str(length)] for length in metrics["lengths"]]
        rows.append({
            "task": name,
            "per_length": entry["per_length"],
            "score": entry["score"],
            "samples_per_length": metrics["samples"],
            "empty_answers": entry["empty_answers"],
            "seconds_per_sample": round(entry["seconds"] / max(1, entry["n_samples"]), 2),
            "kv_bytes_mean": entry["kv_bytes"],
            "verdict": verdict(scores),
        })
        print(f"{name}: {entry['per_length']} -> {rows[-1]['verdict']}", flush=True)

    summary = {"model": args.model, "mode": args.mode, "seed": args.seed, "lengths": args.lengths,
               "date": time.strftime("%Y-%m-%d %H:%M"), "tasks": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "baseline.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# Uncompressed {args.model}, {args.mode}, seed {args.seed}", "",
        "| task | " + " | ".join(f"L={x}" for x in args.lengths) + " | samples/L | empty | s/sample | verdict |",
        "|---|" + "---:|" * len(args.lengths) + "---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | " + " | ".join(f"{r['per_length'][str(x)]:.1f}" for x in args.lengths)
            + f" | {r['samples_per_length']} | {r['empty_answers']} | {r['seconds_per_sample']} | {r['verdict']} |"
        )
    (out / "baseline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
