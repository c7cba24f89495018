"""``kvpress perplexity`` (perplexity through the compressed cache) and ``kvpress lm-eval`` (lm-eval's own
command line with the ``kvpress`` model and the offline kvpress tasks registered).

    kvpress perplexity --policy streaming_llm --window 1024 --n-sink 4 --max-tokens 20000 --compare-full
    kvpress perplexity --policy snapkv --compression-ratio 0.5 --mode chunked --chunk-size 512
    kvpress lm-eval --model kvpress --model_args pretrained=smollm2-135m,policy=snapkv,compression_ratio=0.5 \\
        --tasks kvpress_niah_choice --limit 10

Heavy imports (torch, transformers, lm-eval) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvpress.eval.cli import _param, _ratio  # parsing shared with `kvpress eval`

DEFAULT_FULL_CHUNK = 1024


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "perplexity",
        help="perplexity through the compressed KV cache (teacher forcing, token by token or in chunks)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, local path or hub id")
    p.add_argument("--policy", default="streaming_llm",
                   help="policy name or expression (kvpress.policies.expr, e.g. 'snapkv(compression_ratio=0.5)'); "
                        "none = full. A compression ratio of StreamingLLM/DecodingBudget/DuoAttention refers to "
                        "the scored text's length")
    p.add_argument("--window", type=int, help="policy window (StreamingLLM: recent tokens kept; SnapKV: queries)")
    p.add_argument("--n-sink", type=int, help="StreamingLLM attention sinks")
    p.add_argument("--compression-ratio", type=_ratio, help="fraction of tokens removed, in [0, 1)")
    p.add_argument("--budget", type=int, help="tokens kept per head (score policies)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="any other policy parameter (repeatable)")
    p.add_argument("--mode", choices=("token", "chunked"), default="token",
                   help="token: one token per forward (StreamingLLM protocol); chunked: C tokens per forward, "
                        "compress after each chunk")
    p.add_argument("--chunk-size", type=int, default=512, help="C, tokens per forward in chunked mode")
    p.add_argument("--prefill", type=int, default=0, help="tokens of a first piece fed in one forward (either mode)")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the stdlib's pydoc topics)")
    p.add_argument("--max-tokens", type=int, default=20000, help="score the first N tokens of the text (0 = all)")
    p.add_argument("--compare-full", action="store_true", help="also run the uncompressed cache on the same text")
    p.add_argument("--full-mode", choices=("chunked", "token"), default="chunked",
                   help="how --compare-full runs the full cache: chunked = DynamicCache on the unpatched model in "
                        "chunks of --full-chunk-size (nothing is evicted, so this equals token-by-token teacher "
                        "forcing up to float rounding, and is much faster); token = KVPressCache with no policy")
    p.add_argument("--full-chunk-size", type=int, default=DEFAULT_FULL_CHUNK)
    p.add_argument("--kv-check-every", type=int, default=32,
                   help="read the cache's bytes every N forwards (plus first and last) for the peak")
    p.add_argument("--segment-tokens", type=int, default=2048, help="perplexity reported per segment of N tokens")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the result(s) as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_perplexity)

    lm = subparsers.add_parser(
        "lm-eval",
        help="lm-eval's command line with the 'kvpress' model and the offline kvpress tasks registered",
        add_help=False,
        prefix_chars="+",  # hand every '-'/'--' option through to lm-eval untouched
    )
    lm.add_argument("args", nargs=argparse.REMAINDER)
    lm.set_defaults(func=lambda args: _run_lm_eval(args.args))


def _run_lm_eval(argv: list[str]) -> int:
    from kvpress.eval.lm_eval_adapter import main

    return main(argv)


def policy_config(args: argparse.Namespace) -> Any:
    """The :class:`~kvpress.policies.expr.PolicyConfig` of ``--policy`` (a name with the parameter flags, or an
    expression without them); raises ``ValueError`` naming what is wrong."""
    from kvpress.policies.expr import PolicyConfig, parse_config

    params = policy_params(args)
    if args.policy.strip().replace("-", "_").isidentifier():
        return PolicyConfig.of(args.policy, params, where="--policy")
    if params:
        raise ValueError(f"--policy {args.policy!r} is an expression: write its parameters in it, not as "
                         f"{', '.join(sorted(params))} flags")
    return parse_config(args.policy, "--policy")


def policy_params(args: argparse.Namespace) -> dict[str, Any]:
    params = {
        name: getattr(args, name)
        for name in ("window", "n_sink", "compression_ratio", "budget")
        if getattr(args, name) is not None
    }
    params.update(dict(args.param))
    return params


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the option for a setting out of range, ``FileNotFoundError`` for ``--text``."""
    from pathlib import Path

    for name, minimum in (("chunk_size", 1), ("full_chunk_size", 1), ("kv_check_every", 1), ("segment_tokens", 1),
                          ("prefill", 0), ("max_tokens", 0), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if args.max_tokens == 1:
        raise ValueError("--max-tokens must be 0 (all) or >= 2 (one token to read, one to predict), got 1")
    if args.text is not None and not Path(args.text).is_file():
        raise FileNotFoundError(f"--text {args.text!r} does not exist")


def run_perplexity(args: argparse.Namespace) -> int:
    import torch

    from kvpress.eval.perplexity import MODE_OVERRIDES, evaluate_perplexity, write_json
    from kvpress.eval.text import load_text, tokenize_text
    from kvpress.models import load_model

    check_args(args)  # every setting, the text file and the policy fail here, before the model loads
    policy_cfg = policy_config(args)
    policy_cfg.build(None, MODE_OVERRIDES[args.mode])
    text, source = load_text(args.text)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = tokenize_text(tokenizer, text, args.max_tokens or None)
    params = policy_cfg.parameters()
    policy = policy_cfg.build(int(ids.shape[1]), MODE_OVERRIDES[args.mode])
    progress = not args.no_progress
    common = dict(kv_check_every=args.kv_check_every, segment_tokens=args.segment_tokens, progress=progress,
                  model_name=args.model, text_source=source)
    results = {}
    results[args.policy] = evaluate_perplexity(
        model, ids, policy=policy, policy_name=args.policy, mode=args.mode, chunk_size=args.chunk_size,
        prefill=args.prefill, **common,
    )
    if args.compare_full:
        full_cache = "dynamic" if args.full_mode == "chunked" else "kvpress"
        results["full"] = evaluate_perplexity(
            model, ids, policy=None, policy_name="full", mode=args.full_mode, chunk_size=args.full_chunk_size,
            cache=full_cache, **common,
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] > limit:
        for result in results.values():
            result.notes.append(
                f"the text ({ids.shape[1]} tokens) is longer than the model's max_position_embeddings ({limit}): "
                "positions past it were never trained, which hurts an uncompressed cache most"
            )
    print_results(results)
    if args.out:
        config = {"command": ["kvpress", "perplexity", *sys.argv[2:]], "policy_params": params,
                  "tokens": int(ids.shape[1]), "torch_threads": torch.get_num_threads()}
        path = write_json(args.out, results, config=config)
        print(f"wrote {path}")
    return 0


def print_results(results: dict) -> None:
    """A side-by-side table of the runs (rich when available)."""
    from kvpress.eval.report import mib, print_table

    rows = [
        ("how", lambda r: r.describe()),
        ("perplexity", lambda r: f"{r.perplexity:.3f}"),
        ("tokens scored", lambda r: f"{r.tokens_scored:,}"),
        ("tokens/s", lambda r: f"{r.tokens_per_second:,.1f}"),
        ("seconds", lambda r: f"{r.seconds:,.1f}"),
        ("peak KV bytes", lambda r: f"{r.peak_kv_bytes:,} ({mib(r.peak_kv_bytes)} MiB)"),
        ("final KV bytes", lambda r: f"{r.final_kv_bytes:,} ({mib(r.final_kv_bytes)} MiB)"),
        ("last segment ppl", lambda r: f"{r.segments[-1]['perplexity']:.3f}" if r.segments else "-"),
    ]
    labels = list(results)
    print_table("perplexity through the KV cache", ["", *labels],
                [[name, *(fn(results[k]) for k in labels)] for name, fn in rows])
    notes = {note for r in results.values() for note in r.notes}
    for note in sorted(notes):
        print(f"note: {note}")
