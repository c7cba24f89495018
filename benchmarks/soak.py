"""Soak: generate a long stream through a compressed cache and watch that nothing drifts.

    python benchmarks/soak.py --configs streaming_kvquant2 --tokens 100000     # ~2 h on 2 cores: run it in the background
    python benchmarks/soak.py --configs streaming h2o decoding_budget duo learned_threshold --tokens 10000
    python benchmarks/soak.py --tokens 2000 --out runs/soak-smoke               # a smoke run of every configuration

SmolLM2-135M (``--model``), sampling on (temperature ``--temperature``, top-k ``--top-k``) with a fixed seed, one
token per forward after a prompt of ``--prompt-tokens`` tokens of the harness's prose. Every step: ``cache.nbytes()``
and a finiteness check of the logits. Every ``--every`` tokens (and at the end): the process RSS, a finiteness check
of every floating tensor the cache holds, tokens/s over the interval and the largest ``nbytes()`` of the interval;
a progress line is printed. At the end, per configuration, the soak criteria:

* bytes: the largest bytes held in the last interval within 1% of the largest in the first interval after warm-up
  (the first ``--every`` tokens; a bounded policy then holds a steady budget; quantized storage oscillates within
  its residual window, hence the maxima). Policies whose size grows by design (DuoAttention's retrieval heads, the
  learned scorer's content-dependent threshold) report their growth in bytes per token instead, and are judged on
  the other criteria;
* RSS grows by less than 5% from the first interval to the last (for the growing policies: beyond the growth of
  the cache's own bytes);
* no NaN or Inf in any logits or cache tensor;
* tokens/s in the last interval >= 90% of tokens/s in the first interval after warm-up (bounded policies; a
  growing cache reads more bytes each step, so its ratio is reported, not judged).

``--rejudge`` recomputes the verdicts of the JSON files already in ``--out`` (after a change of the criteria)
and redraws the plot, without generating anything.

Writes ``--out/soak_<config>_<tokens>.json`` (the series and the verdicts) and ``--out/soak.png`` (bytes, RSS and
tokens/s against tokens generated, one line per configuration soaked in ``--out``, this run's and earlier ones).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

BOUNDED = {"streaming_kvquant2": True, "streaming": True, "h2o": True, "decoding_budget": True, "duo": False,
           "learned_threshold": False}
DEFAULT_TOKENS = {"streaming_kvquant2": 100_000}  # the others: 10,000


def make_policy(name: str, window: int) -> Any:
    """The soak configurations (``window``: StreamingLLM's window and the budgets of H2O / DecodingBudget)."""
    from kvpress.policies import H2O, DuoAttention, StreamingLLM, get_policy
    from kvpress.policies.learned import Learned
    from kvpress.quant import KVQuant

    factories: dict[str, Callable[[], Any]] = {
        # window 1024 >> KVQuant's full-precision part (4 sinks + residual 128 + 31): most of the window is 2-bit
        "streaming_kvquant2": lambda: StreamingLLM(n_sink=4, window=window) | KVQuant(bits=2),
        "streaming": lambda: StreamingLLM(n_sink=4, window=window),
        "h2o": lambda: H2O(budget=window),
        "decoding_budget": lambda: get_policy("decoding_budget", budget=window, policy="snapkv"),
        "duo": lambda: DuoAttention("auto", sparsity=0.5),
        "learned_threshold": lambda: Learned(threshold=-5.0),
    }
    if name not in factories:
        raise ValueError(f"--configs: unknown configuration {name!r}; choose from {sorted(factories)}")
    return factories[name]()


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def cache_finite(cache: Any) -> bool:
    """Every floating tensor held by the cache's compressed layers is finite."""
    for idx in cache.compressed_layers:
        for tensor in cache.layers[idx].storage.tensors():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return False
    return True


def sample(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int) -> torch.Tensor:
    """``[1, vocab]`` logits -> ``[1, 1]`` token ids, top-k sampling at ``temperature``."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)


def soak(model, prompt: torch.Tensor, name: str, policy: Any, tokens: int, every: int, seed: int,
         temperature: float, top_k: int, log: Callable[[str], None] = print,
         on_interval: Callable[[list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Generate ``tokens`` tokens under ``policy``; the per-interval series and the verdicts (module docstring).

    ``on_interval`` receives the series so far after every interval (the script saves it, so that a long soak
    stopped early still leaves what it measured).
    """
    import kvpress

    generator = torch.Generator().manual_seed(seed)
    intervals: list[dict[str, Any]] = []
    nonfinite_logits = 0
    with torch.no_grad(), kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        out = model(input_ids=prompt, **kvpress.cache_kwargs(model, cache))
        started = last = time.perf_counter()
        peak = 0
        for step in range(1, tokens + 1):
            logits = out.logits[:, -1]
            if not bool(torch.isfinite(logits).all()):
                nonfinite_logits += 1
                logits = torch.nan_to_num(logits, nan=-1e4, posinf=1e4, neginf=-1e4)
            token = sample(logits, generator, temperature, top_k)
            out = model(input_ids=token, **kvpress.cache_kwargs(model, cache))
            peak = max(peak, cache.nbytes())
            if step % every == 0 or step == tokens:
                now = time.perf_counter()
                n = step - (intervals[-1]["tokens"] if intervals else 0)
                row = {"tokens": step, "max_nbytes": peak, "nbytes": cache.nbytes(), "rss": rss_bytes(),
                       "tokens_per_s": n / (now - last), "seconds": now - started, "cache_finite": cache_finite(cache),
                       "nonfinite_logits": nonfinite_logits}
                intervals.append(row)
                log(f"[{name}] {step:>7,}/{tokens:,} tokens  {row['nbytes'] / 2**20:8.2f} MiB held (max "
                    f"{peak / 2**20:.2f})  RSS {row['rss'] / 2**20:8.1f} MiB  {row['tokens_per_s']:6.1f} tok/s  "
                    f"finite={row['cache_finite'] and nonfinite_logits == 0}")
                sys.stdout.flush()
                if on_interval is not None:
                    on_interval(intervals)
                last, peak = now, 0
    return {"config": name, "policy_repr": repr(policy), "tokens": tokens, "every": every, "seed": seed,
            "prompt_tokens": int(prompt.shape[1]), "intervals": intervals, "verdict": verdict(name, intervals)}


def verdict(name: str, intervals: list[dict[str, Any]]) -> dict[str, Any]:
    """The soak criteria (module docstring) on the interval series; ``None`` where too short to judge."""
    out: dict[str, Any] = {}
    finite = all(r["cache_finite"] for r in intervals) and intervals[-1]["nonfinite_logits"] == 0
    out["no_nan"] = finite
    if len(intervals) < 3:  # warm-up, one interval after it, and a last one
        out.update(bytes_flat=None, rss_growth=None, rss_ok=None, speed_ratio=None, speed_ok=None,
                   note="fewer than 3 intervals: only the NaN check applies")
        return out
    first, after, end = intervals[0], intervals[1], intervals[-1]
    if BOUNDED.get(name, False):
        drift = end["max_nbytes"] / after["max_nbytes"] - 1.0
        out["bytes_drift"] = drift
        out["bytes_flat"] = abs(drift) <= 0.01
    else:
        span = end["tokens"] - after["tokens"]
        out["bytes_per_token"] = (end["nbytes"] - after["nbytes"]) / span if span else 0.0
        out["bytes_flat"] = None
    out["rss_growth"] = end["rss"] / first["rss"] - 1.0 if first["rss"] else None
    out["speed_ratio"] = end["tokens_per_s"] / after["tokens_per_s"]
    if BOUNDED.get(name, False):
        out["rss_ok"] = None if out["rss_growth"] is None else out["rss_growth"] < 0.05
        out["speed_ok"] = out["speed_ratio"] >= 0.9
    else:
        # A cache that grows by design grows the process by its own bytes, and each step reads more: judge the
        # RSS growth beyond the cache's own growth; the speed ratio is reported, not judged.
        beyond = end["rss"] - first["rss"] - (end["nbytes"] - first["nbytes"])
        out["rss_growth_beyond_cache"] = beyond / first["rss"] if first["rss"] else None
        out["rss_ok"] = None if not first["rss"] else out["rss_growth_beyond_cache"] < 0.05
        out["speed_ok"] = None
        out["note"] = "the cache grows by design: RSS judged beyond the cache's growth, speed reported not judged"
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for result in results:
        x = [r["tokens"] for r in result["intervals"]]
        axes[0].plot(x, [r["max_nbytes"] / 2**20 for r in result["intervals"]], marker=".", label=result["config"])
        axes[1].plot(x, [r["rss"] / 2**20 for r in result["intervals"]], marker=".", label=result["config"])
        axes[2].plot(x, [r["tokens_per_s"] for r in result["intervals"]], marker=".", label=result["config"])
    for ax, title in zip(axes, ("KV cache bytes held (max per interval, MiB)", "process RSS (MiB)", "tokens/s")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens generated")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=sorted(BOUNDED), choices=sorted(BOUNDED))
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens generated per configuration (default: 100,000 for streaming_kvquant2, 10,000 others)")
    p.add_argument("--every", type=int, default=1000, help="tokens per measured interval")
    p.add_argument("--window", type=int, default=1024, help="StreamingLLM window; H2O and DecodingBudget budgets")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results/soak", help="directory of the JSON files and the plot")
    p.add_argument("--rejudge", action="store_true", help="recompute the verdicts of --out's JSON files, redraw")
    args = p.parse_args(argv)
    for name in ("tokens", "every", "window", "prompt_tokens", "top_k"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "top_k" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'top_k' else 1}, got {value}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        p.error(f"--temperature must be a finite number > 0, got {args.temperature}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.rejudge:
        return rejudge(out)
    from kvpress.eval.text import load_text, tokenize_text
    from kvpress.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    policies = {name: make_policy(name, args.window) for name in args.configs}  # bad settings fail before loading
    model, tokenizer = load_model(args.model)
    prompt = tokenize_text(tokenizer, load_text(None)[0], args.prompt_tokens)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, policy in policies.items():
        tokens = args.tokens or DEFAULT_TOKENS.get(name, 10_000)
        print(f"[{name}] {policy!r}: {tokens:,} tokens, sampling (T={args.temperature}, top-k {args.top_k}, "
              f"seed {args.seed}), torch threads {torch.get_num_threads()}")
        path = out / f"soak_{name}_{tokens}.json"
        partial = path.with_name(path.name + ".partial")  # not matched by --rejudge and the plot (soak_*_*.json)
        settings = dict(model=args.model, window=args.window, torch_threads=torch.get_num_threads(),
                        versions={"torch": torch.__version__})

        def save_partial(intervals: list[dict[str, Any]], name: str = name, partial: Path = partial) -> None:
            partial.write_text(json.dumps({"config": name, "intervals": intervals, **settings}) + "\n",
                               encoding="utf-8")

        result = soak(model, prompt, name, policy, tokens, args.every, args.seed, args.temperature, args.top_k,
                      on_interval=save_partial)
        result.update(settings)
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        partial.unlink(missing_ok=True)
        print(f"[{name}] verdict: {json.dumps(result['verdict'])} -> {path}")
        results.append(result)
    plot_all(out)
    return 0


def plot_all(out: Path, results: list[dict[str, Any]] | None = None) -> None:
    """One plot over every configuration soaked in ``out`` (runs of one configuration each add their line);
    ``results``: those runs when already read."""
    if results is None:
        results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("soak_*_*.json"))]
    plot(results, out / "soak.png")
    print(f"plot: {out / 'soak.png'} ({len(results)} configurations)")


def table(results: list[dict[str, Any]]) -> str:
    """The soak verdicts as a markdown table (what RESULTS.md shows)."""
    lines = ["| configuration | tokens | threads | bytes held after warm-up -> end (MiB) | RSS growth | NaN/Inf | "
             "tok/s after warm-up -> end | verdict |", "|---|---:|---:|---|---|---|---|---|"]
    for r in results:
        v, iv = r["verdict"], r["intervals"]
        after, end = iv[1] if len(iv) > 1 else iv[0], iv[-1]
        if v.get("bytes_flat") is None and "bytes_per_token" in v:
            held = f"{after['nbytes'] / 2**20:.2f} -> {end['nbytes'] / 2**20:.2f} (grows {v['bytes_per_token']:,.0f} B/token)"
        else:
            held = f"{after['max_nbytes'] / 2**20:.2f} -> {end['max_nbytes'] / 2**20:.2f} ({v.get('bytes_drift', 0):+.2%})"
        rss = "-" if v.get("rss_growth") is None else f"{v['rss_growth']:+.2%}"
        if "rss_growth_beyond_cache" in v and v["rss_growth_beyond_cache"] is not None:
            rss += f" ({v['rss_growth_beyond_cache']:+.2%} beyond the cache)"
        speed = f"{after['tokens_per_s']:.1f} -> {end['tokens_per_s']:.1f} ({v.get('speed_ratio', float('nan')):.2f}x)"
        checks = [v.get(k) for k in ("no_nan", "bytes_flat", "rss_ok", "speed_ok")]
        verdict = "fail" if any(c is False for c in checks) else "pass"
        if v.get("speed_ok") is None and v.get("bytes_flat") is None:
            verdict += " (grows by design: bytes and speed not judged)"
        lines.append(f"| `{r['config']}` | {r['tokens']:,} | {r.get('torch_threads', '?')} | {held} | {rss} | "
                     f"{'none' if v['no_nan'] else 'FOUND'} | {speed} | {verdict} |")
    return "\n".join(lines)


def rejudge(out: Path) -> int:
    """Recompute the verdict of every soak JSON in ``out`` from its interval series; redraw the plot."""
    paths = sorted(out.glob("soak_*_*.json"))
    if not paths:
        print(f"kvpress soak: error: no soak_*_*.json in {out}", file=sys.stderr)
        return 2
    results = []
    for path in paths:
        result = json.loads(path.read_text(encoding="utf-8"))
        result["verdict"] = verdict(result["config"], result["intervals"])
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"[{result['config']}] verdict: {json.dumps(result['verdict'])}")
        results.append(result)
    print(table(results))
    plot_all(out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
