"""Accuracy of quantized KV caches on the embedded SmolLM2-135M: perplexity through the cache and a needle score.

    python benchmarks/quant_accuracy.py --quick --out runs/quant_quick.json
    python benchmarks/quant_accuracy.py --out runs/quant_full.json

Configurations: the full-precision cache (float32, the model's dtype on CPU), transformers' ``QuantizedCache``
with the optimum-quanto backend at 4 and 2 bits (its defaults: group 64, residual 128; reported as unavailable
if optimum-quanto is not installed), and kvpress ``KVQuant`` at 2/3/4 bits with and without Hadamard rotation,
plus GEAR low-rank / outlier variants and a K4V2 split.

Method (see :mod:`kvpress.quant.accuracy`): perplexity on the standard library's ``pydoc_data.topics`` text,
prefill then chunks of 16 tokens through the cache, scoring only tokens after the prefill; needle: a 5-digit
number hidden at evenly spaced depths of a haystack, question asked in a second forward that reads the
compressed haystack; accuracy = greedy answer starts with the number, logprob = mean log-probability per token of
the number (teacher-forced). ``kv_bytes`` is what the cache holds at the end of the perplexity run (every
tensor: codes, scales, zeros, full-precision sinks and residual, low-rank factors, outliers, positions);
``effective_bits = 8 * kv_bytes / (tokens * layers * kv_heads * head_dim * 2)``.
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
from kvpress.quant import KVQuant
from kvpress.quant.accuracy import cache_perplexity, haystack_text, needle_score


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


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = kvpress.load_model()
    ids = tokenizer(haystack_text()[: args.tokens * 8], return_tensors="pt").input_ids[:, : args.tokens]
    quanto_problem = quanto_available(model.config)
    records = []
    for cfg in rotation_ablation() if args.rotation_ablation else configs():
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
        ppl = cache_perplexity(model, ids, args.prefill, args.chunk, policy=cfg.policy, cache_factory=factory)
        t1 = time.perf_counter()
        needle = None
        if args.needle_trials:
            needle = needle_score(model, tokenizer, cfg.policy, factory, n_trials=args.needle_trials,
                                  haystack_tokens=args.needle_tokens)  # fmt: skip
        t2 = time.perf_counter()
        rec.update(
            effective_bits=round(ppl.effective_bits, 3),
            kv_bytes=ppl.kv_bytes,
            perplexity=round(ppl.perplexity, 4),
            nll=round(ppl.nll, 5),
            needle_score=None if needle is None else needle.accuracy,
            needle_logprob=None if needle is None else round(needle.logprob, 4),
            needle_answers=None if needle is None else needle.answers,
            seconds_perplexity=round(t1 - t0, 1),
            seconds_needle=round(t2 - t1, 1),
        )
        records.append(rec)
        needle_text = "-" if needle is None else f"{needle.accuracy:.2f} ({needle.logprob:+.3f})"
        print(f"{cfg.name:46s} bits={cfg.bits:5s} eff={ppl.effective_bits:6.2f} ppl={ppl.perplexity:8.3f} "
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
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (768 if args.quick else 1536)
    args.prefill = args.prefill or args.tokens // 2
    if args.needle_trials is None:
        args.needle_trials = 2 if args.quick else 6
    args.needle_tokens = args.needle_tokens or (400 if args.quick else 800)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    records = run(args)
    setup = {k: getattr(args, k) for k in ("tokens", "prefill", "chunk", "needle_trials", "needle_tokens", "threads")}
    setup["seconds"] = round(time.perf_counter() - start, 1)
    print()
    print(table(records, setup))
    print(f"\ntotal {setup['seconds']:.0f}s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"setup": setup, "records": records}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
