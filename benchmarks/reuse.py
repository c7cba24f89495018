"""Compress once, answer many: time to first token from a saved cache, file bytes, and K questions per context.

On one context of ``--length`` tokens (a ``--task`` sample with K needles), for each configuration:

* **TTFT from text**: prefill the context under the policy (compressing it), then the first question's forward
  and its first token; the uncompressed row is the full prefill every new process pays today.
* **TTFT from file**: ``kvpress.load_cache`` (read, checks, tensors to the model) + the question's forward and its
  first token, in the same process (the file in the page cache, as on a second question).
* **bytes**: the file, against the uncompressed cache in float32 (the model's dtype here) and float16, and against
  the context's text (UTF-8).

Then the K-question task (``kvpress/eval/multiquery.py``) on ``--samples`` contexts: every configuration
query-agnostic, plus SnapKV query-aware (compressed with question 1 in view), each question from a clone of the
compressed context and as a multi-turn conversation, scored per question index.

    python benchmarks/reuse.py --length 4096 --samples 4 --threads 1 --out benchmarks/results/reuse.json

More contexts for the K-question table, added to an existing result (contexts 4-11, two configurations, each
question from a clone; two processes can take different ``--first-sample`` ranges and ``--append`` one by one):

    python benchmarks/reuse.py --skip-ttft --first-sample 4 --samples 8 --configs none \
        "learned(compression_ratio=0.5) | kvquant(bits=4)" --no-query-aware --turns clone \
        --accuracy-out runs/reuse_more.json
    python benchmarks/reuse.py --append runs/reuse_more.json --out benchmarks/results/reuse.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvpress  # noqa: E402
from kvpress.cache_cli import build_policy  # noqa: E402
from kvpress.eval.generation import forward_last  # noqa: E402
from kvpress.eval.multiquery import (  # noqa: E402
    TURNS,
    compress_context,
    make_multi_sample,
    markdown_table,
    needle_task,
    per_question_table,
    run_multi,
)
from kvpress.eval.tasks import get_task  # noqa: E402
from kvpress.policies.expr import expand  # noqa: E402

CONFIGS = [
    "none",
    "learned(compression_ratio=0.5)",
    "kvquant(bits=2)",
    "learned(compression_ratio=0.5) | kvquant(bits=4)",
]
QUERY_AWARE = ["snapkv(compression_ratio=0.5)"]
ACCURACY_ONLY = ["snapkv(compression_ratio=0.5)"]  # query-agnostic too: the same policy without question 1


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def ttft_and_bytes(model, tokenizer, sample, expression: str, reps: int, workdir: Path) -> dict:
    """Time to first token from text and from a saved file, and the file's bytes, for one configuration."""
    question = sample.questions[0].suffix_ids
    n = sample.context_tokens

    def from_text():
        policy = build_policy(expression, n)
        cache, _ = compress_context(model, tokenizer, policy, sample, "query-agnostic")
        with kvpress.patch(model, policy):
            return int(forward_last(model, question, cache).argmax())

    policy = build_policy(expression, n)
    cache, _ = compress_context(model, tokenizer, policy, sample, "query-agnostic")
    path = workdir / "context.kvc"
    file_bytes = cache.save(path, policy=expression, prompt_tokens=n)
    held = cache.nbytes()
    with kvpress.patch(model, policy):
        expected = int(forward_last(model, question, cache).argmax())
    del cache

    first_tokens = []

    def from_file():
        loaded = kvpress.load_cache(path, model)
        with kvpress.patch(model, policy):
            first_tokens.append(int(forward_last(model, question, loaded).argmax()))

    text_s = _median_time(from_text, reps)
    file_s = _median_time(from_file, reps)
    assert set(first_tokens) == {expected}, "the loaded cache gave another first token"
    return {"config": expression, "text_seconds": text_s, "file_seconds": file_s, "file_bytes": file_bytes,
            "held_bytes": held, "first_token_equal": True}  # fmt: skip


def plot(ttft: list[dict], rows: list[dict], k: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    full = next(r for r in ttft if r["config"] == "none")
    labels = [r["config"].replace(" | ", "|\n") for r in ttft]
    x = range(len(ttft))
    ax1.bar([i - 0.2 for i in x], [r["text_seconds"] for r in ttft], 0.4, label="from text (prefill)")
    ax1.bar([i + 0.2 for i in x], [r["file_seconds"] for r in ttft], 0.4, label="from saved cache (read + step)")
    for i, r in enumerate(ttft):
        ax1.annotate(f"{r['file_bytes'] / full['full_fp32_bytes']:.0%} bytes", (i + 0.2, r["file_seconds"]),
                     ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax1.set_xticks(list(x), labels, fontsize=7)
    ax1.set_ylabel("time to first token (s)")
    ax1.set_title("TTFT; labels: file bytes / fp32 full cache")
    ax1.legend(fontsize=8)
    for r in rows:
        if r["turns"] != "clone":
            continue
        style = "--" if r["mode"] == "query-aware" else "-"
        ax2.plot(range(1, k + 1), [r[f"q{q}"] for q in range(1, k + 1)], style, marker="o",
                 label=f"{r['config']} ({r['mode']})")  # fmt: skip
    ax2.set_xticks(range(1, k + 1))
    ax2.set_xlabel("question index (each from a clone of the compressed context)")
    ax2.set_ylabel("% correct")
    ax2.set_ylim(-5, 105)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def report(result: dict) -> str:
    """The markdown tables of a result (``--report``: from a saved JSON, no model run)."""
    full = next((r for r in result["ttft"] if r["config"] == "none"), None)
    lines = [
        f"{result['model']}, {result['context_tokens']:,}-token context ({result['task']} sample 0), "
        f"{result['threads']} thread(s), median of {result['reps']}; the context's text is "
        f"{result['text_bytes']:,} bytes (UTF-8).",
    ]
    if full is not None:
        lines += [
            "",
            "| configuration | TTFT from text (s) | TTFT from file (s) | file / full prefill TTFT | file bytes | "
            "/ fp32 cache | / fp16 cache | / text |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in result["ttft"] if full is not None else []:
        lines.append(
            f"| `{r['config'].replace('|', chr(92) + '|')}` | {r['text_seconds']:.1f} | {r['file_seconds']:.2f} | "
            f"{r['file_seconds'] / full['text_seconds']:.3f} | {r['file_bytes']:,} | "
            f"{r['file_bytes'] / r['full_fp32_bytes']:.3f} | {r['file_bytes'] / r['full_fp16_bytes']:.3f} | "
            f"{r['file_bytes'] / result['text_bytes']:.0f}x |"
        )
    rows = result.get("per_question") or per_question_table(result["accuracy"], result["queries"])
    if rows:
        lines += ["", markdown_table(rows, result["queries"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="niah_multikey_prose")
    p.add_argument("--length", type=int, default=4096, help="prompt + answer budget in tokens")
    p.add_argument("--queries", type=int, default=4, help="K questions per context")
    p.add_argument("--samples", type=int, default=4, help="contexts for the K-question task")
    p.add_argument("--reps", type=int, default=2, help="timing repetitions (median)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-ttft", action="store_true", help="only the K-question task")
    p.add_argument("--first-sample", type=int, default=0, help="index of the first context of the K-question task")
    p.add_argument("--configs", nargs="+", default=None,
                   help="query-agnostic configurations of the K-question task (default: every row above + SnapKV)")
    p.add_argument("--no-query-aware", dest="query_aware", action="store_false", help="skip query-aware SnapKV")
    p.add_argument("--turns", nargs="+", default=list(TURNS), choices=list(TURNS))
    p.add_argument("--accuracy-out", type=Path, default=None,
                   help="write the K-question records here instead of into --out (to --append later)")
    p.add_argument("--append", type=Path, default=None,
                   help="add the K-question records of this file to --out (new contexts only), redo tables and plot")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/reuse.json"))
    p.add_argument("--report", action="store_true", help="print the tables (and redraw the plot) of --out, run nothing")
    args = p.parse_args(argv)
    for name in ("samples", "queries", "reps", "threads", "length"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.first_sample < 0:
        p.error(f"--first-sample must be >= 0, got {args.first_sample}")
    if args.append is not None:
        return append_records(args.out, args.append)
    if args.report:
        show(json.loads(args.out.read_text(encoding="utf-8")), args.out.with_suffix(".png"))
        return 0
    torch.set_num_threads(args.threads)
    model, tokenizer = kvpress.load_model(args.model)
    task = needle_task(get_task(args.task), args.queries)
    indices = range(args.first_sample, args.first_sample + args.samples)
    samples = [make_multi_sample(task, tokenizer, args.length, args.queries, args.seed, i) for i in indices]
    first = samples[0]
    text_bytes = len(tokenizer.decode(first.prefix_ids).encode("utf-8"))
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    result: dict = {"model": args.model, "task": task.name, "length": args.length,
                    "context_tokens": first.context_tokens, "queries": args.queries, "samples": args.samples, "threads": args.threads, "reps": args.reps,
                    "text_bytes": text_bytes, "ttft": [], "accuracy": []}  # fmt: skip
    out = args.accuracy_out or args.out
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2), encoding="utf-8")

    with tempfile.TemporaryDirectory() as tmp:
        for expression in [] if args.skip_ttft else CONFIGS:
            row = ttft_and_bytes(model, tokenizer, first, expression, args.reps, Path(tmp))
            row["full_fp32_bytes"] = per_token * first.context_tokens * 4
            row["full_fp16_bytes"] = per_token * first.context_tokens * 2
            result["ttft"].append(row)
            print(json.dumps(row), flush=True)
            save()
    if not args.skip_accuracy:
        agnostic = args.configs if args.configs is not None else CONFIGS + ACCURACY_ONLY
        for mode, configs in (("query-agnostic", agnostic), ("query-aware", QUERY_AWARE if args.query_aware else [])):
            built = [c for text in configs for c in expand(text)]
            if not built:
                continue
            t0 = time.perf_counter()

            def progress(s, c, mode=mode, t0=t0):
                print(f"  sample {s.index} {c.label} ({mode}) {time.perf_counter() - t0:.0f} s", flush=True)

            records = run_multi(model, tokenizer, built, samples, mode, turns=args.turns, progress=progress)
            result["accuracy"].extend(records)
            save()
        rows = per_question_table(result["accuracy"], args.queries)
        result["per_question"] = rows
        save()
        show(result, None if args.accuracy_out is not None else args.out.with_suffix(".png"))
    return 0


def show(result: dict, png: Path | None) -> None:
    """Print ``result``'s tables; redraw its plot at ``png`` when there are K-question rows and a full-prefill TTFT
    row (the plot's TTFT panel is relative to it)."""
    print(report(result))
    rows = result.get("per_question") or per_question_table(result["accuracy"], result["queries"])
    if png is not None and rows and any(r["config"] == "none" for r in result["ttft"]):
        plot(result["ttft"], rows, result["queries"], png)


def append_records(out: Path, extra: Path) -> int:
    """Add ``extra``'s K-question records to ``out`` (contexts ``out`` does not hold yet for that configuration,
    mode and turns), then redo its per-question table, the tables printed and the plot."""
    result = json.loads(out.read_text(encoding="utf-8"))
    more = json.loads(extra.read_text(encoding="utf-8"))
    for field in ("task", "length", "queries", "model"):
        if result.get(field) != more.get(field):
            print(f"reuse.py: error: --append: {field} differs ({more.get(field)!r} in {extra}, "
                  f"{result.get(field)!r} in {out})", file=sys.stderr)
            return 2
    held = {(r["config"], r["mode"], r["turns"], r["index"]) for r in result["accuracy"]}
    added = [r for r in more["accuracy"] if (r["config"], r["mode"], r["turns"], r["index"]) not in held]
    result["accuracy"].extend(added)
    result["per_question"] = per_question_table(result["accuracy"], result["queries"])
    result.setdefault("appended", []).append({"from": str(extra), "records": len(added)})
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"added {len(added)} records ({len(more['accuracy']) - len(added)} already held) to {out}")
    show(result, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
