"""Cost of StreamingLLM's re-positioning per decoding step, against the same policy at original positions.

    .venv/bin/python benchmarks/reposition_overhead.py --threads 1 --out runs/reposition_overhead.json

On the embedded SmolLM2-135M: a prompt longer than the window is prefilled under ``StreamingLLM(n_sink, window)``
(so the cache is already evicted), then ``--steps`` greedy decoding steps are timed one forward at a time. The
two settings alternate in ``--rounds`` rounds so machine load hits both alike; the table reports the median
step time of each and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvpress  # noqa: E402
from kvpress.compat import cache_kwargs  # noqa: E402
from kvpress.eval.text import load_text, tokenize_text  # noqa: E402
from kvpress.policies import StreamingLLM  # noqa: E402


def step_times(model, ids: torch.Tensor, policy, steps: int) -> list[float]:
    """Seconds of each single-token forward after a prefill of ``ids`` under ``policy``."""
    times = []
    with torch.no_grad(), kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = time.perf_counter()
            out = model(token, **cache_kwargs(model, cache), use_cache=True)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=1536)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--n-sink", type=int, default=4)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = kvpress.load_model("smollm2-135m")
    text, _ = load_text(None)
    ids = tokenize_text(tokenizer, text, args.prompt_tokens)
    settings = {"original positions": False, "reposition": True}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, reposition in settings.items():
            policy = StreamingLLM(n_sink=args.n_sink, window=args.window, reposition=reposition)
            times[name] += step_times(model, ids, policy, args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["reposition"] / median["original positions"]
    print(f"| StreamingLLM({args.n_sink}, {args.window}), prompt {ids.shape[1]} | median decode step (ms) |")
    print("|---|---:|")
    for name, value in median.items():
        print(f"| {name} | {value * 1000:.1f} |")
    print(f"| ratio reposition / original | {ratio:.3f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {"args": vars(args), "median_step_seconds": median, "ratio": ratio, "step_seconds": times,
                  "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
        Path(args.out).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
