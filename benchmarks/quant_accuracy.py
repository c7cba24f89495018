"""Accuracy of quantized KV caches on the embedded SmolLM2-135M: perplexity through the cache and a needle score.

    python benchmarks/quant_accuracy.py --quick --out runs/quant_quick.json
    python benchmarks/quant_accuracy.py --out runs/quant_full.json
    python benchmarks/quant_accuracy.py --matched-bits --threads 1 --out benchmarks/results/quant_matched_bits.json

Configurations: the full-precision cache (float32, the model's dtype on CPU), transformers' ``QuantizedCache``
with the optimum-quanto backend at 4 and 2 bits (its defaults: group 64, residual 128; reported as unavailable
if optimum-quanto is not installed), and kvpress ``KVQuant`` at 2/3/4 bits with and without Hadamard rotation,
plus GEAR low-rank / outlier variants and a K4V2 split. ``--rotation-ablation``: which of keys / values to rotate.
``--matched-bits``: transformers' cache at several group sizes and residual lengths against kvpress 2-bit (and 3-,
4-bit) configurations holding their full-precision parts in float16, lined up by effective bits (table sorted by
the mean effective bits, plus a plot of perplexity against them next to the JSON).

Method (:func:`kvpress.eval.perplexity.evaluate_perplexity`, :mod:`kvpress.eval.cache_probes`): perplexity on the
standard library's ``pydoc_data.topics`` text (:func:`kvpress.eval.text.default_text`), prefill then chunks of 16
tokens through the cache (the last token fed too), scoring only tokens after the prefill; needle: a 5-digit
number hidden at evenly spaced depths of a haystack, question asked in a second forward that reads the
compressed haystack; accuracy = greedy answer starts with the number, logprob = mean log-probability per token of
the number (teacher-forced). ``kv_bytes`` is what the cache holds at the end of the perplexity run
(:func:`kvpress.eval.kv_bytes.cache_nbytes`: codes, scales, zeros, full-precision sinks and residual, low-rank
factors, outliers, positions);
``effective_bits = 8 * kv_bytes / (tokens * layers * kv_heads * head_dim * 2)``; ``mean_effective_bits`` averages
it over the states after each scored forward (a full-precision window fills and empties: the end state alone
can flatter or penalise a cache depending on where the text ends in its flush cycle).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import kvpress
from kvpress.eval.cache_probes import needle_score
from kvpress.eval.perplexity import PerplexityResult, evaluate_perplexity
from kvpress.eval.text import default_text
from kvpress.quant import KVQuant


@dataclass
class Config:
    name: str
    bits: str  # nominal code width, e.g. "4", "K4V2", "32" for the full-precision cache
    policy: Any = None
    backend: str | None = None  # "quanto" for transformers' QuantizedCache
    nbits: int = 0
    params: dict = field(default_factory=dict)


def rotation_ablation() -> list[Config]:
    """Which of keys / values to rotate, at 4 and 2 bits (perplexity only: use with --needle-trials 0)."""
    out = [Config("fp32 cache", "32")]
    for bits in (4, 2):
        for rotate, label in ((False, "no rotation"), ("keys", "rotate keys"), ("values", "rotate values"), (True, "rotate both")):
            spec = KVQuant(bits=bits, rotate=rotate)
            out.append(Config(f"kvpress {bits}-bit {label}", str(bits), spec, params=spec.params()))
    return out


def matched_bits() -> list[Config]:
    """Configurations at about 3-6.5 effective bits, for comparison at matched bytes (1536 tokens).

    transformers' ``QuantizedCache("quanto")`` holds scales and zero points in the model dtype (float32 here) and
    its residual in the model dtype; ``residual_length=16`` re-quantizes the whole cache after every 16-token
    chunk, so it holds no full-precision token, 128 (its default) holds up to 127. kvpress: fp16 scales, sinks and
    residual window in fp16 (``fp_dtype``); ``lowrank_block`` F sets both the low-rank block and the flush block,
    so the window holds R to R + F - 1 tokens.
    """
    out = [Config("fp32 cache", "32")]
    # (q_group_size 128 is left out: quanto groups the flattened tokens x head_dim, so it fails on odd-length prompts)
    for nbits, group, residual in ((2, 64, 16), (2, 64, 128), (2, 32, 16), (2, 32, 128),
                                   (4, 64, 16), (4, 64, 128), (4, 32, 16)):  # fmt: skip
        out.append(Config(f"HF quanto {nbits}-bit G{group} R{residual}", str(nbits), backend="quanto", nbits=nbits,
                          params={"q_group_size": group, "residual_length": residual}))  # fmt: skip
    # (bits, G, R, rotate, rank, F): fp16 sinks and window; 3 and 4 bits unrotated (rotate="auto")
    kvpress = [(2, g, r, False, 0, 0) for g, r in ((64, 0), (32, 32), (32, 64))]
    kvpress += [(2, g, r, True, 0, 0) for g, r in ((64, 0), (64, 32), (32, 0), (32, 32), (32, 64), (32, 96), (32, 128))]
    kvpress += [(2, 64, 0, True, 1, 64), (2, 64, 32, True, 1, 64), (2, 64, 0, True, 2, 64), (2, 32, 0, True, 2, 64),
                (2, 32, 32, True, 2, 64), (2, 64, 0, True, 2, 256)]
    kvpress += [(3, 64, 0, False, 0, 0), (3, 32, 0, False, 0, 0), (4, 64, 0, False, 0, 0)]
    for bits, group, residual, rotate, rank, block in kvpress:
        name = f"kvpress {bits}-bit" + (" +rot" if rotate else "") + (f" +lowrank r{rank} F{block}" if rank else "")
        lowrank = {"rank": rank, "lowrank_block": block} if rank else {}
        spec = KVQuant(bits=bits, group_size=group, residual=residual, fp_dtype=torch.float16,
                       **({"rotate": rotate} if bits == 2 else {}), **lowrank)
        out.append(Config(f"{name} G{group} R{residual}", str(bits), spec, params=spec.params()))
    return out


def configs() -> list[Config]:
    out = [Config("fp32 cache", "32")]
    for nbits in (4, 2):
        out.append(Config(f"HF QuantizedCache quanto {nbits}-bit", str(nbits), backend="quanto", nbits=nbits,
                          params={"q_group_size": 64, "residual_length": 128}))  # fmt: skip
    for bits in (4, 3, 2):
        for rotate in (False, True):
            spec = KVQuant(bits=bits, rotate=rotate)
            out.append(Config(f"kvpress {bits}-bit" + (" +rot" if rotate else ""), str(bits), spec, params=spec.params()))
    extra = [
        # lowrank_block = group_size keeps the residual window of plain 2-bit, so only the correction differs
        ("kvpress 2-bit +rot +lowrank r4", "2", KVQuant(bits=2, rank=4, lowrank_block=32, rotate=True)),
        ("kvpress 2-bit +rot +lowrank r4 +outliers 2%", "2", KVQuant(bits=2, rank=4, lowrank_block=32, outlier_fraction=0.02, rotate=True)),
        ("kvpress K4V2 +rot", "K4V2", KVQuant(bits=2, key_bits=4, value_bits=2, rotate=True)),
        # a 32-token residual window: fewer full-precision tokens, closer to transformers' byte count
        ("kvpress 4-bit +rot R=32", "4", KVQuant(bits=4, residual=32, rotate=True)),
        ("kvpress 2-bit +rot R=32", "2", KVQuant(bits=2, residual=32, rotate=True)),
    ]  # fmt: skip
    out += [Config(name, bits, spec, params=spec.params()) for name, bits, spec in extra]
    return out


def quanto_available(model_config) -> str | None:
    """None if transformers' quanto backend works here, else the reason."""
    try:
        from transformers.cache_utils import QuantizedCache

        QuantizedCache("quanto", model_config, nbits=2)
        return None
    except Exception as err:  # ImportError, or a backend that fails on this platform
        return f"{type(err).__name__}: {err}"


def cache_perplexity(model, ids: torch.Tensor, prefill: int, chunk: int, policy: Any = None,
                     cache_factory: Any = None) -> PerplexityResult:
    """Perplexity of the tokens after a ``prefill``, fed in chunks of ``chunk`` (the last token too), with the
    effective bits at the end and averaged over the chunks."""
    return evaluate_perplexity(model, ids, policy=policy, cache=cache_factory or "kvpress", mode="chunked",
                               chunk_size=chunk, prefill=prefill, score_from=prefill, feed_last=True,
                               measure_bits=True)


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = kvpress.load_model()
    ids = tokenizer(default_text()[: args.tokens * 8], return_tensors="pt").input_ids[:, : args.tokens]
    quanto_problem = quanto_available(model.config)
    records = []
    chosen = rotation_ablation() if args.rotation_ablation else matched_bits() if args.matched_bits else configs()
    for cfg in chosen:
        if args.only and not any(s in cfg.name for s in args.only):
            continue
        rec: dict[str, Any] = {"name": cfg.name, "bits": cfg.bits, "params": cfg.params}
        factory = None
        if cfg.backend == "quanto":
            if quanto_problem:
                rec.update(error=f"quanto backend unavailable: {quanto_problem}")
                records.append(rec)
                print(f"{cfg.name}: skipped ({quanto_problem})", flush=True)
                continue
            from transformers.cache_utils import QuantizedCache

            def factory(cfg=cfg):
                return QuantizedCache("quanto", model.config, nbits=cfg.nbits, **cfg.params)

        t0 = time.perf_counter()
        try:
            ppl = cache_perplexity(model, ids, args.prefill, args.chunk, policy=cfg.policy, cache_factory=factory)
        except Exception as err:  # a backend that rejects this shape: record it, go on with the others
            rec.update(error=f"{type(err).__name__}: {err}")
            records.append(rec)
            print(f"{cfg.name}: failed ({rec['error']})", flush=True)
            continue
        t1 = time.perf_counter()
        needle = None
        if args.needle_trials:
            try:
                needle = needle_score(model, tokenizer, cfg.policy, factory, n_trials=args.needle_trials,
                                      haystack_tokens=args.needle_tokens)  # fmt: skip
            except Exception as err:
                rec.update(needle_error=f"{type(err).__name__}: {err}")
        t2 = time.perf_counter()
        rec.update(
            effective_bits=round(ppl.effective_bits, 3),
            mean_effective_bits=round(ppl.mean_effective_bits, 3),
            kv_bytes=ppl.final_kv_bytes,
            perplexity=round(ppl.perplexity, 4),
            nll=round(ppl.mean_nll, 5),
            needle_score=None if needle is None else needle.accuracy,
            needle_logprob=None if needle is None else round(needle.logprob, 4),
            needle_answers=None if needle is None else needle.answers,
            seconds_perplexity=round(t1 - t0, 1),
            seconds_needle=round(t2 - t1, 1),
        )
        records.append(rec)
        needle_text = "-" if needle is None else f"{needle.accuracy:.2f} ({needle.logprob:+.3f})"
        print(f"{cfg.name:46s} bits={cfg.bits:5s} eff={ppl.effective_bits:6.2f} (mean {ppl.mean_effective_bits:5.2f}) "
              f"ppl={ppl.perplexity:8.3f} "
              f"needle={needle_text}  [{t2 - t0:.0f}s]", flush=True)  # fmt: skip
    return records


def table(records: list[dict], setup: dict) -> str:
    lines = [
        f"SmolLM2-135M (float32, CPU), {setup['tokens']} tokens of pydoc_data.topics: prefill {setup['prefill']}, "
        f"then chunks of {setup['chunk']} through the cache ({setup['tokens'] - setup['prefill']} scored); "
        f"needle: {setup['needle_trials']} trials, {setup['needle_tokens']}-token haystack."
        if setup["needle_trials"]
        else "no needle.",
        "",
        "| config | bits | effective bits | KV bytes | perplexity | needle acc | needle logprob |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['bits']} | - | - | - | - | {r['error']} |")
            continue
        needle = "| - | - |" if r["needle_score"] is None else f"| {r['needle_score']:.2f} | {r['needle_logprob']:+.3f} |"
        lines.append(
            f"| {r['name']} | {r['bits']} | {r['effective_bits']:.2f} | {r['kv_bytes']:,} | {r['perplexity']:.3f} "
            + needle
        )
    return "\n".join(lines)


def matched_table(records: list[dict], setup: dict) -> str:
    """The ``--matched-bits`` table: sorted by mean effective bits, perplexity change against the fp32 cache."""
    ref = next((r["perplexity"] for r in records if r["name"] == "fp32 cache" and "perplexity" in r), None)
    lines = [
        f"SmolLM2-135M (float32, CPU), {setup['tokens']} tokens: prefill {setup['prefill']}, then chunks of "
        f"{setup['chunk']}; bits = 8 * bytes held / K-V elements, mean over the states after each scored forward "
        "and at the end; "
        + (f"needle: {setup['needle_trials']} trials, {setup['needle_tokens']}-token haystack."
           if setup["needle_trials"] else "no needle."),
        "",
        "| config | mean eff. bits | end eff. bits | KV bytes (end) | perplexity | vs fp32 | needle acc | needle logprob |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    ok = [r for r in records if "error" not in r]
    for r in sorted(ok, key=lambda r: (r["mean_effective_bits"], r["name"])):
        delta = "-" if ref is None else f"{100 * (r['perplexity'] / ref - 1):+.1f}%"
        needle = "- | -" if r["needle_score"] is None else f"{r['needle_score']:.2f} | {r['needle_logprob']:+.3f}"
        lines.append(
            f"| {r['name']} | {r['mean_effective_bits']:.2f} | {r['effective_bits']:.2f} | {r['kv_bytes']:,} "
            f"| {r['perplexity']:.3f} | {delta} | {needle} |"
        )
    lines += [f"| {r['name']} | - | - | - | - | - | - | {r['error']} |" for r in records if "error" in r]
    return "\n".join(lines)


def _family(name: str) -> str:
    if name.startswith("HF quanto"):
        return "transformers QuantizedCache (quanto) " + name.split()[2]
    if "lowrank" in name:
        return "kvpress 2-bit +rot +lowrank"
    if "+rot" in name:
        return "kvpress 2-bit +rot"
    return "kvpress " + name.split()[1] + " (no rotation)"


def plot_matched(records: list[dict], path: str) -> str | None:
    """Perplexity (log) against mean effective bits, one series per family; None if matplotlib is missing."""
    from kvpress.eval.report import figure

    try:
        fig = figure(figsize=(7.5, 4.8))
    except ImportError:
        return None
    ok = [r for r in records if "error" not in r]
    ax = fig.add_subplot()
    families: dict[str, list[dict]] = {}
    for r in ok:
        if r["name"] != "fp32 cache":
            families.setdefault(_family(r["name"]), []).append(r)
    markers = iter("os^Dvx<>P*")
    for fam, rs in sorted(families.items()):
        rs = sorted(rs, key=lambda r: r["mean_effective_bits"])
        ax.plot([r["mean_effective_bits"] for r in rs], [r["perplexity"] for r in rs], marker=next(markers),
                linestyle="none", label=fam)  # fmt: skip
    ref = next((r["perplexity"] for r in ok if r["name"] == "fp32 cache"), None)
    if ref is not None:
        ax.axhline(ref, color="grey", linestyle="--", linewidth=1, label=f"fp32 cache ({ref:.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per K/V element (mean over scored steps)")
    ax.set_ylabel("perplexity through the cache (log)")
    ax.set_title("SmolLM2-135M, 1536 tokens: perplexity vs effective bits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run (about 10 minutes on 2 CPU cores)")
    parser.add_argument("--out", help="write the JSON records here")
    parser.add_argument("--tokens", type=int, help="text tokens for perplexity (default 1536, quick 768)")
    parser.add_argument("--prefill", type=int, help="tokens in the first forward (default half of --tokens)")
    parser.add_argument("--chunk", type=int, default=16, help="tokens per forward after the prefill")
    parser.add_argument("--needle-trials", type=int, help="needle trials (default 6, quick 2; 0 skips the needle)")
    parser.add_argument("--needle-tokens", type=int, help="haystack tokens (default 800, quick 400)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--only", nargs="*", help="run only configs whose name contains one of these strings")
    parser.add_argument("--rotation-ablation", action="store_true",
                        help="instead of the main list: 4- and 2-bit with no / key / value / both rotations")  # fmt: skip
    parser.add_argument("--matched-bits", action="store_true",
                        help="instead of the main list: transformers' cache vs kvpress 2-bit (fp16 full-precision "
                             "parts) at matched effective bits (about 25 minutes on 2 cores with --threads 1)")  # fmt: skip
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (768 if args.quick else 1536)
    args.prefill = args.prefill or args.tokens // 2
    if args.needle_trials is None:
        args.needle_trials = 2 if args.quick or args.matched_bits else 6
    args.needle_tokens = args.needle_tokens or (400 if args.quick else 800)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    records = run(args)
    setup = {k: getattr(args, k) for k in ("tokens", "prefill", "chunk", "needle_trials", "needle_tokens", "threads")}
    setup["seconds"] = round(time.perf_counter() - start, 1)
    print()
    print(matched_table(records, setup) if args.matched_bits else table(records, setup))
    print(f"\ntotal {setup['seconds']:.0f}s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"setup": setup, "records": records}, f, indent=2)
        if args.matched_bits:
            plot = plot_matched(records, os.path.splitext(args.out)[0] + ".png")
            print(f"plot: {plot}" if plot else "plot skipped (matplotlib not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
