"""StreamingLLM perplexity on a long text through the bounded KVPressCache, beside the full cache.

    .venv/bin/python benchmarks/perplexity_streaming.py --max-tokens 20000 --out runs/perplexity_streaming.json

Runs on the embedded SmolLM2-135M over the standard library's pydoc topics (or ``--text FILE``):

* ``streaming_llm[token]``: StreamingLLM (n_sink + window) teacher-forced token by token through the cache
  (the StreamingLLM paper's protocol); the cache is bounded, so peak bytes stay at n_sink + window tokens.
  Positions within the cache (``reposition=True``, the paper's method and kvpress's default).
* ``streaming_llm[chunked]``: the same policy fed in chunks of C tokens (each chunk attends to the evicted
  past plus itself), a cheaper protocol; reported with its C.
* ``full``: the uncompressed cache on the same tokens, fed in chunks through a transformers DynamicCache
  (nothing is evicted, so this equals token-by-token teacher forcing up to float rounding). Its tokens/s is
  chunked throughput, not comparable with token-mode throughput; its peak bytes grow with the text.
* ``nosink`` (not in the default set): StreamingLLM with ``n_sink=0``, chunked: what the sinks are worth.
* ``original`` (not in the default set): StreamingLLM chunked with ``reposition=False``: keys keep their original
  rotary positions, so the query-to-sink distance grows with the text and passes the model's trained context
  (8192 for SmolLM2).

Prints a table and writes every result (with per-segment perplexity and timing) as JSON. tokens/s depend on
the machine's load: the load average at start and end is recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvpress.eval.perplexity import MODE_OVERRIDES, evaluate_perplexity, write_json  # noqa: E402
from kvpress.eval.text import load_text, tokenize_text  # noqa: E402
from kvpress.policies.expr import PolicyConfig  # noqa: E402
from kvpress.eval.perplexity_cli import print_results  # noqa: E402
from kvpress.models import load_model  # noqa: E402

RUNS = ("token", "chunked", "full")
EXTRA_RUNS = ("nosink", "original")
# StreamingLLM runs: name -> (result label, parameter overrides, feeding mode)
STREAMING_RUNS = {
    "token": ("streaming_llm[token]", {}, "token"),
    "chunked": ("streaming_llm[chunked]", {}, "chunked"),
    "nosink": ("streaming_llm[chunked, n_sink=0]", {"n_sink": 0}, "chunked"),
    "original": ("streaming_llm[chunked, reposition=False]", {"reposition": False}, "chunked"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default=None)
    p.add_argument("--max-tokens", type=int, default=20000)
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=512, help="C of the chunked StreamingLLM run")
    p.add_argument("--full-chunk-size", type=int, default=1024)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS + EXTRA_RUNS}")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--segment-tokens", type=int, default=1000)
    p.add_argument("--kv-check-every", type=int, default=32)
    p.add_argument("--out", default="runs/perplexity_streaming.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if unknown := set(runs) - set(RUNS) - set(EXTRA_RUNS):
        p.error(f"unknown runs {sorted(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    text, source = load_text(args.text)
    ids = tokenize_text(tokenizer, text, args.max_tokens)
    params = {"n_sink": args.n_sink, "window": args.window}
    common = dict(model_name=args.model, text_source=source, segment_tokens=args.segment_tokens,
                  kv_check_every=args.kv_check_every, progress=not args.no_progress)
    load_start = os.getloadavg()
    started = time.time()
    results = {}
    for run in runs:
        if run == "full":
            results["full"] = evaluate_perplexity(
                model, ids, policy=None, policy_name="full", mode="chunked", chunk_size=args.full_chunk_size,
                cache="dynamic", **common,
            )
        else:
            label, overrides, mode = STREAMING_RUNS[run]
            results[label] = evaluate_perplexity(
                model, ids,
                policy=PolicyConfig.of("streaming_llm", {**params, **overrides}).build(None, MODE_OVERRIDES[mode]),
                policy_name="streaming_llm", mode=mode, chunk_size=args.chunk_size, **common,
            )
        if args.out:  # keep what is done so far if a later run is interrupted
            write_json(args.out, results, config=_config(args, ids, load_start, started))
    print_results(results)
    for label, result in results.items():
        curve = " ".join(f"{s['perplexity']:.1f}" for s in result.segments)
        print(f"{label}: perplexity per {args.segment_tokens} tokens: {curve}")
    if args.out:
        print(f"wrote {write_json(args.out, results, config=_config(args, ids, load_start, started))}")
    return 0


def _config(args: argparse.Namespace, ids: torch.Tensor, load_start, started: float) -> dict:
    return {
        "args": vars(args),
        "tokens": int(ids.shape[1]),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
