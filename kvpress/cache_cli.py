"""``kvpress cache``: compress a document once, save the cache, answer questions from the file.

    kvpress cache build --model smollm2-135m --policy "learned(compression_ratio=0.5) | kvquant(bits=4)" \\
        --text contract.txt --out contract.kvc
    kvpress cache ask contract.kvc "Who signs the contract?" --max-new-tokens 32
    kvpress cache info contract.kvc

``build`` formats the text as the first part of one user turn (the model's chat template, as ``kvpress eval``
does), prefills and compresses it without any question in view, and saves the compressed cache
(:mod:`kvpress.persist`). ``ask`` loads the file, appends the question (the rest of that user turn and the assistant
header) and decodes greedily, continuing under the policy the file was built with; every question starts from the
saved context, so earlier questions leave no trace.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

QUESTION = "\u0000KVPRESS-CACHE-QUESTION\u0000"  # where the question goes in the saved suffix template


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("cache", help="build a compressed cache file from a text, answer questions from it",
                              description=__doc__.split("\n\n")[0])  # fmt: skip
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="prefill + compress a text and save the cache",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    b.add_argument("--model", default="smollm2-135m", help="embedded model name, local path or hub id")
    b.add_argument("--policy", default="none", help='policy expression, e.g. "learned(compression_ratio=0.5) | '
                   'kvquant(bits=4)"; none = uncompressed')  # fmt: skip
    b.add_argument("--text", required=True, help="text file: the document to compress")
    b.add_argument("--out", required=True, help="the cache file to write (e.g. doc.kvc)")
    b.add_argument("--instruction", default="", help="text placed before the document in the user turn")
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=run_build)
    a = sub.add_parser("ask", help="answer a question from a saved cache",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    a.add_argument("cache", help="a file written by `kvpress cache build`")
    a.add_argument("question")
    a.add_argument("--max-new-tokens", type=_positive, default=64)
    a.add_argument("--model", default=None, help="the model (default: the one the file was built with)")
    a.add_argument("--device", default="cpu")
    a.set_defaults(func=run_ask)
    i = sub.add_parser("info", help="tokens, bytes per layer, policy and model of a saved cache")
    i.add_argument("cache")
    i.add_argument("--json", action="store_true", help="print the information as JSON")
    i.set_defaults(func=run_info)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--max-new-tokens must be >= 1, got {text}")
    return value


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_policy(expression: str | None, n_tokens: int) -> Any:
    """The policy object of a single-configuration expression (``None``/``"none"``: no policy)."""
    from kvpress.policies.expr import expand

    if expression is None or expression.strip() in ("", "none", "full"):
        return None
    configs = expand(expression, where="--policy")
    if len(configs) != 1:
        raise ValueError(f"--policy: {expression!r} denotes {len(configs)} configurations (a list is a grid "
                         "axis); give one")  # fmt: skip
    return configs[0].build(n_tokens)


def context_prompt(tokenizer, text: str, instruction: str = "") -> tuple[list[int], str]:
    """``(prefix ids, suffix template)``: the document's tokens as the first part of a user turn, and the text
    that follows it with :data:`QUESTION` where the question goes (end of turn, assistant header)."""
    from kvpress.eval.tasks.base import build_prompt, encode_prompt

    prefix, suffix = build_prompt(tokenizer, instruction, text, QUESTION, "")
    prefix_ids, _ = encode_prompt(tokenizer, prefix, "")
    return prefix_ids, suffix


def question_ids(tokenizer, suffix_template: str, question: str) -> list[int]:
    return list(tokenizer(suffix_template.replace(QUESTION, question), add_special_tokens=False)["input_ids"])


def run_build(args: argparse.Namespace) -> int:
    import torch

    import kvpress
    from kvpress.compat import cache_kwargs

    text_path = Path(args.text)
    if not text_path.is_file():
        raise SystemExit(f"kvpress cache build: --text {args.text}: no such file")
    if Path(args.out).is_dir():
        raise SystemExit(f"kvpress cache build: --out {args.out} is a directory; give a file path")
    build_policy(args.policy, 1024)  # a bad expression fails before the model loads
    t0 = time.perf_counter()
    _say(f"[1/4] loading {args.model} ...")
    model, tokenizer = kvpress.load_model(args.model, device=args.device)
    prefix_ids, suffix = context_prompt(tokenizer, text_path.read_text(encoding="utf-8"), args.instruction)
    _say(f"[2/4] {len(prefix_ids):,} tokens of context ({time.perf_counter() - t0:.1f} s)")
    policy = build_policy(args.policy, len(prefix_ids))
    t1 = time.perf_counter()
    with kvpress.patch(model, policy) as session, torch.no_grad():
        cache = session.new_cache()
        model(torch.tensor([prefix_ids], device=model.device), **cache_kwargs(model, cache), use_cache=True,
              logits_to_keep=1)  # fmt: skip
    _say(f"[3/4] prefilled and compressed with {args.policy}: {cache.nbytes():,} bytes held "
         f"({time.perf_counter() - t1:.1f} s)")  # fmt: skip
    n = cache.save(args.out, policy=args.policy, prompt_tokens=len(prefix_ids),
                   extra={"model": args.model, "suffix_template": suffix, "instruction": args.instruction})  # fmt: skip
    _say(f"[4/4] wrote {args.out}: {n:,} bytes ({time.perf_counter() - t0:.1f} s in all)")
    return 0


def answer_from_cache(
    model, tokenizer, cache, question: str, max_new_tokens: int, policy: Any = None
) -> tuple[str, float]:
    """Greedy answer to ``question`` continuing ``cache`` (a loaded file: the question is appended with the
    file's suffix template) under ``policy``; returns the text and the seconds to the first token."""
    import torch

    import kvpress
    from kvpress.eval.generation import forward_last, greedy_decode, stop_token_ids

    template = cache.extra.get("suffix_template")
    if template is None:
        raise ValueError("this cache file has no question template: it was not written by `kvpress cache build`")
    ids = question_ids(tokenizer, template, question)
    with kvpress.patch(model, policy), torch.no_grad():
        t0 = time.perf_counter()
        logits = forward_last(model, ids, cache)
        first = time.perf_counter() - t0
        tokens = greedy_decode(model, cache, logits, max_new_tokens, stop_token_ids(model, tokenizer))
    return tokenizer.decode(tokens, skip_special_tokens=True).strip(), first


def run_ask(args: argparse.Namespace) -> int:
    import kvpress
    from kvpress.persist import cache_info

    info = cache_info(args.cache)
    name = args.model or info["extra"].get("model") or info["model"].get("name")
    if not name:
        raise SystemExit("kvpress cache ask: the file names no model; pass --model")
    model, tokenizer = kvpress.load_model(name, device=args.device)
    t0 = time.perf_counter()
    cache = kvpress.load_cache(args.cache, model)
    read = time.perf_counter() - t0
    policy = build_policy(cache.policy_expression, cache.prompt_tokens or 1)
    text, first = answer_from_cache(model, tokenizer, cache, args.question, args.max_new_tokens, policy)
    print(text)
    _say(f"(read {read * 1000:.0f} ms, first token {first * 1000:.0f} ms after it; context {info['prompt_tokens']:,} "
         f"tokens, {info['file_bytes']:,} bytes, policy {info['policy']})")  # fmt: skip
    return 0


def run_info(args: argparse.Namespace) -> int:
    from kvpress.persist import cache_info

    info = cache_info(args.cache)
    if args.json:
        print(json.dumps({k: v for k, v in info.items() if k != "extra"} | {"extra": {
            k: v for k, v in info["extra"].items() if k != "suffix_template"}}, indent=2))  # fmt: skip
        return 0
    model = info["model"]
    print(f"file:    {args.cache} ({info['file_bytes']:,} bytes, format {info['format_version']}, "
          f"kvpress {info['kvpress_version']})")  # fmt: skip
    print(f"model:   {info['extra'].get('model') or model.get('name')} ({model['model_type']}, "
          f"{model['num_hidden_layers']} layers, {model['dtype']})")  # fmt: skip
    print(f"policy:  {info['policy']}")
    print(f"tokens:  {info['prompt_tokens']:,} in the prompt, {info['tokens_seen']:,} seen")
    print("layers:")
    for idx, (kind, nbytes) in enumerate(zip(info["layer_kinds"], info["layer_bytes"])):
        print(f"  {idx:>3}  {kind:<26} {nbytes:>12,} bytes")
    return 0
