"""Decode speed of compressed caches against the full cache, on a real model, every configuration in one run.

    python benchmarks/decode_speed.py --lengths 2048 4096 8192 --out benchmarks/results/decode_speed.json

For each prompt length: every configuration prefills the same prompt (pydoc prose; each prefill paired with a
full-cache prefill run right before it, so the prefill ratio is paired too), then the configurations decode
**interleaved**: step 1 of every configuration, then step 2 of every configuration, ... (greedy, each on its own
cache), so machine load drifts hit all alike. Reported per configuration: decode tokens/s (from the median step
time) and its ratio to the full cache's, bytes held (``cache.nbytes()``) against the full cache's, the *floor*
speed-up a step would get if its time were only reading memory (``(weights + full cache bytes) / (weights + held
bytes)``: a step reads every weight once and every held cache byte once), and the paired prefill ratio.

``--device cuda``: the same on a GPU (fp16 model and cache unless ``--dtype``), lengths e.g. 4096 32768 131072,
also with ``--model random-1b`` (a Llama config of ~1.2B parameters with random weights: speed needs no trained
weights). ``--kernels`` adds per-layer-step kernel times against dense SDPA (``benchmarks/decode_attention.py``).
``--smoke``: a tiny random Llama under ``TRITON_INTERPRET=1`` with toy lengths, to check the script end to end
on a machine without a GPU (its times mean nothing); the unit tier runs it.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports triton: the interpreter flag is read at import
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KVPRESS_KERNELS", "triton")  # the GPU decode kernels, interpreted on CPU

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvpress  # noqa: E402
from kvpress import cache_kwargs  # noqa: E402
from kvpress.kernels.dispatch import ENV_VAR  # noqa: E402
from kvpress.policies.expr import expand  # noqa: E402

# label -> policy expression (labels are the expressions themselves, so each row parses back).
CONFIGS = [
    "none",
    "snapkv(compression_ratio=0.5)",
    "adakv(snapkv(), compression_ratio=0.5)",
    "duo_attention(sparsity=0.5)",
    "h2o(budget={half})",  # evicts one token per head at every step
    "decoding_budget(policy=h2o(), budget={half}, interval=32)",  # H2O's scores, evicting every 32 steps
    "kvquant(bits=4)",
    "kvquant(bits=2)",
    "snapkv(compression_ratio=0.5) | kvquant(bits=2)",
]


# Wall clock by default; `--clock cpu` (with --threads 1) times the process's CPU time instead, which other
# processes on a shared machine disturb far less (they still share caches and memory bandwidth).
CLOCK = time.perf_counter


@dataclass
class Run:
    """One configuration's cache and timings at one prompt length."""

    label: str
    policy: Any
    cache: Any = None
    token: torch.Tensor | None = None
    prefill_s: float = 0.0
    full_prefill_s: float = 0.0
    steps_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def build_policy(label: str, n_tokens: int, overrides: dict[str, Any] | None = None) -> Any:
    configs = expand(label)
    if len(configs) != 1:
        raise ValueError(f"configuration {label!r} must denote one policy, not a grid")
    return configs[0].build(n_tokens, overrides)


def random_duo_pattern(model) -> Any:
    """Random DuoAttention gates for a random-weight model (no pattern ships for it; speed does not care)."""
    from kvpress.duo.pattern import DuoPattern

    config = model.config
    gates = torch.rand(config.num_hidden_layers, config.num_key_value_heads, generator=torch.Generator().manual_seed(0))
    return DuoPattern(gates, {"model": "random weights (decode_speed benchmark)"})


def prose_ids(tokenizer, length: int) -> torch.Tensor:
    """``[1, length]`` token ids of the standard library's pydoc prose (offline, identical on every machine)."""
    from kvpress.eval.text import default_text

    ids = tokenizer(default_text()[: length * 8], add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] < length:
        raise ValueError(f"--lengths: the prose has only {ids.shape[1]} tokens, asked for {length}")
    return ids[:, :length]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def prefill(model, ids: torch.Tensor, policy: Any) -> tuple[Any, torch.Tensor, float]:
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        _sync(ids.device)
        start = CLOCK()
        out = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        _sync(ids.device)
        seconds = CLOCK() - start
    return cache, out.logits[:, -1:].argmax(-1), seconds


@torch.no_grad()
def decode_step(model, run: Run) -> None:
    with kvpress.patch(model, run.policy):
        _sync(run.token.device)
        start = CLOCK()
        out = model(run.token, **cache_kwargs(model, run.cache), use_cache=True)
        _sync(run.token.device)
        run.steps_s.append(CLOCK() - start)
    run.token = out.logits[:, -1:].argmax(-1)
    run.tokens.append(int(run.token))


# Top-level profiler ops by what they do in a decode step.
_WEIGHT_OPS = ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::embedding")
_ATTENTION_OPS = ("aten::scaled_dot_product_attention", "kvpress", "aten::_scaled_dot_product")


@torch.no_grad()
def profile_step(model, run: Run, top: int = 12) -> dict:
    """One more decode step of ``run`` under ``torch.profiler``: where its time goes (top-level ops by category,
    the rest of the wall time being Python: transformers' and kvpress's), and the op table."""
    from torch.profiler import ProfilerActivity, profile

    with kvpress.patch(model, run.policy), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        out = model(run.token, **cache_kwargs(model, run.cache), use_cache=True)
        wall = time.perf_counter() - start
    run.token = out.logits[:, -1:].argmax(-1)
    split = {"weight matmuls": 0.0, "attention": 0.0, "other ops (cache, masks, policy)": 0.0}
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        if event.name.startswith(_WEIGHT_OPS):
            key = "weight matmuls"
        elif event.name.startswith(_ATTENTION_OPS):
            key = "attention"
        else:
            key = "other ops (cache, masks, policy)"
        split[key] += event.cpu_time_total / 1e6
    split["python and dispatch"] = max(0.0, wall - sum(split.values()))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return {"wall_s": wall, "split_s": split, "table": table}


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def measure_length(model, ids: torch.Tensor, configs: list[str], steps: int, warmup: int,
                   overrides: dict[str, Any] | None = None, paired_prefill: bool = True,
                   profile: bool = False) -> list[dict]:
    n = ids.shape[1]
    runs = []
    full_s = float("nan")
    for template in configs:
        label = template.format(half=n // 2)
        if paired_prefill or label == "none":
            full_cache, full_token, full_s = prefill(model, ids, None)  # the paired full-cache prefill
        if label == "none":
            cache, token, seconds = full_cache, full_token, full_s
            if paired_prefill:
                full_s = prefill(model, ids, None)[2]
        else:
            full_cache = None
            policy = build_policy(label, n, overrides)
            cache, token, seconds = prefill(model, ids, policy)
        run = Run(label, None if label == "none" else policy, cache, token, seconds, full_s)
        runs.append(run)
        print(f"  prefill {label}: {seconds:.2f}s (paired full {full_s:.2f}s)", flush=True)
    for step in range(warmup + steps):
        for run in runs:
            decode_step(model, run)
        if step < warmup:
            for run in runs:
                run.steps_s.clear()
    profiles = {run.label: profile_step(model, run) for run in runs} if profile else {}
    full = runs[0]
    assert full.label == "none", "the first configuration is the full cache"
    full_step = statistics.median(full.steps_s)
    full_bytes = full.cache.nbytes()
    weights = weight_bytes(model)
    rows = []
    for run in runs:
        step_s = statistics.median(run.steps_s)
        held = run.cache.nbytes()
        rows.append({
            "config": run.label,
            "prompt_tokens": n,
            "decode_tok_s": 1.0 / step_s,
            "decode_ratio": full_step / step_s,
            "bytes_held": held,
            "bytes_ratio": held / full_bytes,
            "floor_ratio": (weights + full_bytes) / (weights + held),
            "prefill_s": run.prefill_s,
            "prefill_ratio": run.prefill_s / run.full_prefill_s,
            "steps_s": run.steps_s,
            "tokens": run.tokens,
        })
        if run.label in profiles:
            prof = profiles[run.label]
            rows[-1]["profile_split_s"] = prof["split_s"]
            print(f"\n{n} tokens, {run.label}: one decode step {1e3 * prof['wall_s']:.1f} ms = " + ", ".join(
                f"{k} {1e3 * v:.1f} ms" for k, v in prof["split_s"].items()))
            print(prof["table"])
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| tokens | configuration | decode tok/s | vs full | bytes vs full | floor | prefill vs full (paired) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prompt_tokens']} | `{r['config']}` | {r['decode_tok_s']:.2f} | {r['decode_ratio']:.2f}x | "
              f"{r['bytes_ratio']:.3f}x | {r['floor_ratio']:.2f}x | {r['prefill_ratio']:.3f} |")


def load(args) -> tuple[Any, Any]:
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device == "cuda" else torch.float32)
    if args.model in ("random-1b", "tiny-random"):
        from transformers import LlamaConfig, LlamaForCausalLM

        if args.model == "random-1b":  # Llama-3.2-1B's shape: 16 layers, 32 query / 8 KV heads, head_dim 64
            config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 max_position_embeddings=131072 + 1024, tie_word_embeddings=True)
        else:
            config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()
        return model, None
    model, tokenizer = kvpress.load_model(args.model, dtype=dtype)
    return model.to(args.device), tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a kvpress model name or path, random-1b or tiny-random")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="policy expressions ({half}: half the prompt)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 / float16 / bfloat16 (default: fp32 CPU, fp16 CUDA)")
    p.add_argument("--no-paired-prefill", dest="paired_prefill", action="store_false",
                   help="one full-cache prefill per length instead of one before each configuration's")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall clock, or the process's CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, one more step per configuration under torch.profiler: time split and op table")
    p.add_argument("--kernels", action="store_true", help="also per-layer kernel times (decode_attention.py)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, toy lengths (TRITON_INTERPRET=1)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    for n in args.lengths:
        if n < 16:
            p.error(f"--lengths: each length must be >= 16 tokens, got {n}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.configs[0] != "none":
        args.configs = ["none", *[c for c in args.configs if c != "none"]]
    if args.smoke:
        args.model, args.lengths, args.steps, args.warmup = "tiny-random", [160, 300], 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if torch.get_num_threads() != 1:
            p.error("--clock cpu needs --threads 1 (CPU time of several threads includes their waiting)")
        global CLOCK
        CLOCK = time.process_time
    for label in args.configs:  # every expression parses before the model loads
        build_policy(label.format(half=64), 128)
    model, tokenizer = load(args)
    device = torch.device(args.device)
    overrides = {"pattern": random_duo_pattern(model)} if tokenizer is None else None
    rows = []
    for n in args.lengths:
        if tokenizer is None:
            ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        else:
            ids = prose_ids(tokenizer, n)
        ids = ids.to(device)
        print(f"{n} tokens:", flush=True)
        rows += measure_length(model, ids, args.configs, args.steps, args.warmup, overrides, args.paired_prefill,
                               args.profile)
    print_table(rows)
    if args.kernels:
        import decode_attention  # noqa: PLC0415 (benchmarks/ sibling script)

        decode_attention.main(["--smoke"] if args.smoke else [])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model, "device": str(device), "dtype": str(next(model.parameters()).dtype),
                "torch_threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
                "paired_prefill": args.paired_prefill, "clock": args.clock,
                "backend": os.environ.get(ENV_VAR, "auto"), "torch": torch.__version__}
        if device.type == "cuda":
            meta["device_name"] = torch.cuda.get_device_name(device)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
