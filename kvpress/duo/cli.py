"""``kvpress duo identify`` / ``kvpress duo info``: find a model's retrieval and streaming heads, inspect a pattern."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from kvpress.duo.identify import NEEDLE_PROMPTS, TRAINED_PROMPTS, IdentifyConfig


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser("duo", help="DuoAttention: identify retrieval / streaming heads, inspect patterns")
    sub = parser.add_subparsers(dest="duo_command", metavar="ACTION")
    ident = sub.add_parser("identify", help="optimise one gate per (layer, KV head) on synthetic passkeys (offline)")
    ident.add_argument("--model", default="smollm2-135m", help="embedded model name or local path")
    ident.add_argument("--out", required=True, help="pattern file to write (.safetensors)")
    defaults = IdentifyConfig()
    ident.add_argument("--method", choices=["trained", "needle"], default=defaults.method,
                       help="trained: gate optimisation (the paper's); needle: attention on a planted needle (cheap)")
    for name in ("steps", "length", "n_sink", "window", "seed"):
        ident.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    ident.add_argument("--prompts", type=int, default=None,
                       help=f"distinct prompts (default: {TRAINED_PROMPTS} trained, {NEEDLE_PROMPTS} needle)")
    for name in ("lam", "lr", "init_logit"):
        ident.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    ident.add_argument("--loss", choices=["hidden", "kl"], default=defaults.loss,
                       help="hidden: relative MSE of final hidden states; kl: KL of the answer-token distributions")
    ident.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ident.add_argument("--log", default=None, help="write the per-step loss / sparsity log here (JSON)")
    ident.add_argument("--no-progress", action="store_true")
    ident.set_defaults(func=_identify)
    info = sub.add_parser("info", help="print a pattern file's metadata and gates")
    info.add_argument("path")
    info.add_argument("--sparsity", type=float, default=0.5, help="show which heads stream at this sparsity")
    info.set_defaults(func=_info)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _identify(args: argparse.Namespace) -> int:
    import torch

    import kvpress
    from kvpress.duo.identify import identify

    if args.threads:
        torch.set_num_threads(args.threads)
    names = {f.name for f in fields(IdentifyConfig)}
    cfg = IdentifyConfig(**{k: v for k, v in vars(args).items() if k in names})
    model, tokenizer = kvpress.load_model(args.model)
    log: list[dict[str, float]] = []
    pattern = identify(model, tokenizer, cfg, model_name=args.model, progress=not args.no_progress, log=log)
    pattern.save(args.out)
    if args.log:
        with open(args.log, "w") as handle:
            json.dump({"metadata": pattern.metadata, "log": log, "gates": pattern.gates.tolist()}, handle, indent=1)
    print(f"wrote {args.out}: {pattern.num_layers} layers x {pattern.kv_heads} KV heads, {cfg.method}, "
          f"{pattern.metadata['seconds']} s")
    return 0


def _info(args: argparse.Namespace) -> int:
    from kvpress.duo.pattern import load_pattern

    pattern = load_pattern(args.path)
    for key in sorted(pattern.metadata):
        print(f"{key}: {pattern.metadata[key]}")
    streaming = pattern.streaming(sparsity=args.sparsity, eligible=pattern.identified_layers)
    print(f"gates (layer: per KV head; * = streaming at sparsity {args.sparsity} among the identified layers):")
    for layer in range(pattern.num_layers):
        cells = " ".join(f"{float(g):.3f}{'*' if s else ' '}" for g, s in zip(pattern.gates[layer], streaming[layer]))
        print(f"  {layer:3d}: {cells}")
    return 0
