"""``kvpress scorer train`` / ``kvpress scorer info``: train a learned-scorer predictor offline, inspect one."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from kvpress.scorer.train import TrainConfig


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser("scorer", help="train or inspect a learned query-agnostic scorer")
    sub = parser.add_subparsers(dest="scorer_command", metavar="ACTION")
    train = sub.add_parser("train", help="fit a predictor of KVzip scores from hidden states (offline)")
    train.add_argument("--model", default="smollm2-135m", help="embedded model name or local path")
    train.add_argument("--out", required=True, help="predictor file to write (.safetensors)")
    defaults = TrainConfig()
    train.add_argument("--kind", choices=["linear", "mlp"], default=defaults.kind)
    for name in ("sequences", "held_out", "length", "seed", "width", "steps", "batch", "tokens_per_sequence"):
        train.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("eps", "ridge", "lr"):
        train.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    train.add_argument("--text-file", default=None, help="prose for the data (default: pydoc_data.topics)")
    train.add_argument("--teacher-cache", default=None, metavar="DIR",
                       help="keep the teacher's scores here and reuse them in later runs (they do not depend on the "
                            "fitting settings)")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=_train)
    info = sub.add_parser("info", help="print a predictor file's metadata and held-out metrics")
    info.add_argument("path")
    info.set_defaults(func=_info)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _train(args: argparse.Namespace) -> int:
    from kvpress.scorer.train import train_to_file

    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    predictor = train_to_file(args.model, args.out, cfg, progress=not args.no_progress,
                              teacher_cache=args.teacher_cache)
    print(f"wrote {args.out} ({predictor.kind}, {predictor.num_layers} layers)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from kvpress.scorer.predictor import load_predictor

    predictor = load_predictor(args.path)
    meta = dict(predictor.metadata)
    metrics = json.loads(meta.pop("metrics", "{}") or "{}")
    for key in sorted(meta):
        print(f"{key}: {meta[key]}")
    per_layer = metrics.pop("spearman_per_layer", {})
    print("metrics:", json.dumps(metrics))
    if per_layer:
        print("spearman per layer:", " ".join(f"{float(v):.2f}" for v in per_layer.values()))
    return 0
