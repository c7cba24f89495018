"""``kvpress demo``: hide a fact in a ~1.5k-token context and ask for it under several policies."""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

import kvpress
from kvpress.compat import output_cache
from kvpress.models import DEFAULT_MODEL, load_model
from kvpress.policies import SnapKV, StreamingLLM

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class DemoRow:
    policy: str
    answer: str
    correct: bool
    kv_bytes: int
    seconds: float


def build_prompt(tokenizer, target_tokens: int, depth: float, seed: int) -> tuple[torch.Tensor, str]:
    """Chat prompt of about ``target_tokens`` tokens with one needle at ``depth``; returns (ids, answer)."""
    rng = random.Random(seed)
    value = str(rng.randint(1_000_000, 9_999_999))
    needle = f" The special magic number for the blue lighthouse is: {value}. "
    question = "What is the special magic number for the blue lighthouse? Answer with the number only."
    noise_tokens = len(tokenizer(NOISE, add_special_tokens=False).input_ids)
    n_noise = max(1, (target_tokens - 80) // noise_tokens)
    cut = int(n_noise * depth)
    context = NOISE * cut + needle + NOISE * (n_noise - cut)
    messages = [{"role": "user", "content": f"{context}\n\n{question}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prefix = tokenizer("The special magic number for the blue lighthouse is:", add_special_tokens=False,
                       return_tensors="pt").input_ids
    return torch.cat([ids["input_ids"], prefix], dim=1), value


def run_demo(model_name: str = DEFAULT_MODEL, length: int = 1536, depth: float = 0.4, seed: int = 0) -> list[DemoRow]:
    model, tokenizer = load_model(model_name)
    ids, answer = build_prompt(tokenizer, length, depth, seed)
    policies = [
        ("full cache", None),
        ("SnapKV 50%", SnapKV(compression_ratio=0.5, window=32)),
        ("SnapKV 75%", SnapKV(compression_ratio=0.75, window=32)),
        ("SnapKV 90%", SnapKV(compression_ratio=0.9, window=32)),
        ("StreamingLLM 4+256", StreamingLLM(n_sink=4, window=256)),
    ]
    rows = []
    for label, policy in policies:
        start = time.perf_counter()
        with kvpress.patch(model, policy):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
        text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
        rows.append(DemoRow(label, text, answer in text, output_cache(out).nbytes(), seconds))
    return rows, ids.shape[1], answer


def print_table(rows: list[DemoRow], prompt_tokens: int, answer: str, console: Console | None = None) -> None:
    console = console or Console()
    full = rows[0].kv_bytes
    table = Table(title=f"Needle retrieval, {prompt_tokens}-token prompt, expected {answer}")
    for col in ("policy", "answer", "correct?", "KV bytes held", "vs full", "time (s)"):
        table.add_column(col, justify="right" if col not in ("policy", "answer") else "left")
    for row in rows:
        table.add_row(row.policy, row.answer, "yes" if row.correct else "no", f"{row.kv_bytes:,}",
                      f"{row.kv_bytes / full:.1%}", f"{row.seconds:.1f}")
    console.print(table)
    console.print("KV bytes are the physical bytes of the tensors the cache holds after generation "
                  "(fp32 K/V; kept positions as int32).")


def _main(args: argparse.Namespace) -> int:
    if args.length < 64:
        raise ValueError(f"--length must be >= 64 tokens (a needle in a haystack), got {args.length}")
    if not 0.0 <= args.depth <= 1.0:  # NaN fails too
        raise ValueError(f"--depth must be in [0, 1], got {args.depth}")
    rows, n, answer = run_demo(args.model, args.length, args.depth, args.seed)
    print_table(rows, n, answer)
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="needle retrieval under several policies on the embedded model")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--length", type=int, default=1536, help="prompt length in tokens")
    parser.add_argument("--depth", type=float, default=0.4, help="needle depth in [0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_main)
