"""Policy overhead at prefill: time of a patched prefill under each policy over the uncompressed prefill.

Each policy's prefill is timed right after an uncompressed one, alternating, and the median of the paired ratios
is reported (these machines are shared and noisy: a paired ratio cancels most of the load drift).

    python benchmarks/policy_overhead.py --length 2048 --reps 5 --out benchmarks/results/policy_overhead.json
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
from kvpress import cache_kwargs  # noqa: E402
from kvpress.demo import build_prompt  # noqa: E402
from kvpress.policies import H2O, TOVA, AdaKV, KeyNorm, KVzip, Learned, PyramidKV, SnapKV, StreamingLLM  # noqa: E402

POLICIES = {
    "streaming_llm": lambda: StreamingLLM(n_sink=4, window=1024),
    "knorm": lambda: KeyNorm(compression_ratio=0.5),
    "snapkv": lambda: SnapKV(compression_ratio=0.5),
    "h2o": lambda: H2O(compression_ratio=0.5),
    "tova": lambda: TOVA(compression_ratio=0.5),
    "adakv(snapkv)": lambda: AdaKV(SnapKV(), compression_ratio=0.5),
    "pyramidkv(snapkv)": lambda: PyramidKV(SnapKV(), compression_ratio=0.5),
    "kvzip": lambda: KVzip(compression_ratio=0.5),
    "learned": lambda: Learned(compression_ratio=0.5),
    "learned(kind='linear')": lambda: Learned(kind="linear", compression_ratio=0.5),
    "learned(threshold=-5)": lambda: Learned(threshold=-5.0),
    "learned(threshold=-7)": lambda: Learned(threshold=-7.0),
}


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor, policy) -> float:
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        start = time.perf_counter()
        model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start


def paired_times(model, ids, factory, reps: int) -> tuple[list[float], list[float]]:
    """``reps`` pairs of (uncompressed prefill, prefill under ``factory()``) seconds, run back to back."""
    ids = torch.as_tensor(ids).view(1, -1)
    base, timed = [], []
    for _ in range(reps):
        base.append(prefill_seconds(model, ids, None))
        timed.append(prefill_seconds(model, ids, factory()))
    return base, timed


def paired_ratio(model, ids, factory, reps: int = 3) -> float:
    """Median over pairs of (prefill under the policy) / (uncompressed prefill)."""
    base, timed = paired_times(model, ids, factory, reps)
    return statistics.median(t / b for t, b in zip(timed, base))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens")
    p.add_argument("--reps", type=int, default=5, help="paired repetitions per policy")
    p.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = kvpress.load_model(args.model)
    ids, _ = build_prompt(tokenizer, args.length, 0.5, seed=0)
    prefill_seconds(model, ids, None)  # warm-up
    rows = []
    for name in args.policies:
        base, timed = paired_times(model, ids, POLICIES[name], args.reps)
        ratios = [t / b for t, b in zip(timed, base)]
        row = {
            "policy": name,
            "prompt_tokens": ids.shape[1],
            "prefill_s": statistics.median(base),
            "policy_prefill_s": statistics.median(timed),
            "ratio_median": statistics.median(ratios),
            "overhead_pct": 100 * (statistics.median(ratios) - 1),
            "ratios": ratios,
        }
        rows.append(row)
        print(f"{name:>20}: prefill {row['prefill_s']:.2f}s, with policy {row['policy_prefill_s']:.2f}s, "
              f"paired ratio {row['ratio_median']:.3f} (overhead {row['overhead_pct']:+.1f}%)", flush=True)
    print("\n| policy | prompt tokens | prefill s | with policy s | ratio (median of paired) | overhead |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {r['prompt_tokens']} | {r['prefill_s']:.2f} | {r['policy_prefill_s']:.2f} | "
              f"{r['ratio_median']:.3f} | {r['overhead_pct']:+.1f}% |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model, "length": args.length, "reps": args.reps, "torch_threads": torch.get_num_threads()}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
