"""``kvpress eval``: RULER-style synthetic tasks and the needle grid through compressed caches.

    kvpress eval --list
    kvpress eval niah_single_noise --policy snapkv --compression-ratio 0.25 0.5 0.75 --lengths 1024 --samples 5
    kvpress eval niah-grid --haystack prose --lengths 512 1024 2048 --depths 0 0.25 0.5 0.75 1
    kvpress eval vt --policy snapkv streaming_llm --compression-ratio 0.5 --mode query-aware
    kvpress eval niah_multikey_prose --queries 4 --policy "learned(compression_ratio=0.5) | kvquant(bits=4)"

``--queries K``: K questions about one context, answered from one compressed cache (kvpress/eval/multiquery.py);
policies may then be expressions (``"snapkv | kvquant(bits=4)"``), scores are reported per question index.

Each run writes a directory (``--out``, default ``runs/<task>-<time>``) with samples.jsonl, metrics.json,
summary.csv, summary.md, config.json and plots; see kvpress/eval/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

GRID = "niah-grid"
GRID_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
GRID_LENGTHS = [512, 1024, 2048]


def _param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _ratio(text: str) -> float:
    """``--compression-ratio`` values: numbers in [0, 1) (the fraction of the first forward's tokens removed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"compression_ratio must be a number in [0, 1), got {text!r}") from None
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"compression_ratio must be in [0, 1) (the fraction of tokens removed), "
                                         f"got {text}")
    return value


def _depth(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"depth must be in [0, 1], got {text}")
    return value


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="synthetic long-context tasks (needles, variable tracking, word extraction) under compression",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("task", nargs="?", help=f"task name (see --list) or {GRID!r}")
    p.add_argument("--list", action="store_true", help="list the tasks, one per line, and exit")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name, local path or hub id")
    p.add_argument("--policy", nargs="+", default=["snapkv"],
                   help="policy names or expressions (kvpress.policies.expr, e.g. 'snapkv | kvquant(bits=4)'); "
                        "none = full")
    p.add_argument("--compression-ratio", nargs="+", type=_ratio, default=[0.25, 0.5, 0.75], metavar="R",
                   help="fractions in [0, 1) of the first forward's tokens evicted, for every policy that takes a "
                        "compression_ratio (a policy without one, e.g. kvquant, runs once)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="fixed policy parameter, e.g. window=32 (repeatable)")
    p.add_argument("--lengths", nargs="+", type=_positive_int, default=None, metavar="L",
                   help=f"prompt + answer budget in model tokens (default 1024; {GRID}: {GRID_LENGTHS})")
    p.add_argument("--depths", nargs="+", type=_depth, default=None, metavar="D",
                   help=f"needle depths in [0, 1] (default: random per sample; {GRID}: {GRID_DEPTHS})")
    p.add_argument("--samples", type=_positive_int, default=None, help="samples per length (x depth) (default 5; grid 1)")
    p.add_argument("--mode", choices=("query-agnostic", "query-aware"), default="query-agnostic",
                   help="query-agnostic: the context is compressed before the question is seen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory (default runs/<task>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--haystack", choices=("noise", "prose", "needles"), default="noise",
                   help=f"{GRID} only: the haystack of the single needle")
    p.add_argument("--haystack-file", default=None, help="text file for prose haystacks (default: pydoc topics)")
    p.add_argument("--no-baseline", action="store_true", help="skip the uncompressed reference run")
    p.add_argument("--no-fanout", action="store_true", help="prefill separately for every ratio (slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--queries", type=int, default=None, metavar="K",
                   help="K questions about one context from one compressed cache (needle tasks), scored per "
                   "question index")
    p.add_argument("--turns", nargs="+", choices=("clone", "multi-turn"), default=["clone", "multi-turn"],
                   help="--queries: each question from a clone of the compressed context, and/or as a conversation")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def list_tasks() -> list[str]:
    from kvpress.eval.tasks import TASKS

    lines = []
    width = max(len(name) for name in [*TASKS, GRID])
    for name, factory in TASKS.items():
        lines.append(f"{name:<{width}}  {factory().description}")
    lines.append(f"{GRID:<{width}}  single-needle grid, lengths x depths, heatmap per configuration (--haystack)")
    return lines


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The run's resolved settings (defaults filled in), as recorded in config.json."""
    grid = args.task == GRID
    task = f"niah_single_{args.haystack}" if grid else args.task.lower().replace("-", "_")
    return {
        "command": "eval",
        "task": task,
        "grid": grid,
        "model": args.model,
        "policies": args.policy,
        "compression_ratios": args.compression_ratio,
        "params": dict(args.param),
        "lengths": args.lengths or (GRID_LENGTHS if grid else [1024]),
        "depths": args.depths or (GRID_DEPTHS if grid else None),
        "samples": args.samples if args.samples is not None else (1 if grid else 5),
        "mode": args.mode,
        "seed": args.seed,
        "haystack_file": args.haystack_file,
        "baseline": not args.no_baseline,
        "fanout": not args.no_fanout,
        "device": args.device,
        "out": args.out or f"runs/{'niah-grid-' + args.haystack if grid else task}-{time.strftime('%Y%m%d-%H%M%S')}",
    }


def checked_configurations(cfg: dict[str, Any]) -> list:
    """The run's policy configurations, each built once so that an unknown policy or parameter fails before a
    model loads (``ValueError`` naming it)."""
    from kvpress.eval.runner import configurations
    from kvpress.policies.expr import check_builds

    configs = configurations(cfg["policies"], cfg["compression_ratios"], cfg["params"], baseline=cfg["baseline"])
    for config in configs:
        check_builds(config, max(cfg["lengths"]), f"--policy ({config.label})")
        if cfg["compression_ratios"] and config.ratio is None and not config.is_baseline:
            print(f"note: {config.label} takes no compression ratio (or is sized by its own parameters): it runs once")
    return configs


def run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(list_tasks()))
        return 0
    if not args.task:
        from kvpress.cli import fail

        return fail("eval", "give a task (see kvpress eval --list)")
    from kvpress.eval.tasks import get_task

    cfg = resolve(args)
    task = get_task(cfg["task"], haystack_file=cfg["haystack_file"])  # fail on a bad name before loading a model
    if args.queries is not None:
        return run_queries(args, cfg, task)
    import torch
    import transformers

    import kvpress
    from kvpress.eval.runner import evaluate
    from kvpress.models import load_model

    try:
        specs = checked_configurations(cfg)
    except ValueError as err:
        print(f"kvpress eval: error: {err}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(cfg["model"], device=cfg["device"])
    cfg["configurations"] = [spec.label for spec in specs]
    cfg["versions"] = {"kvpress": kvpress.__version__, "torch": torch.__version__,
                       "transformers": transformers.__version__}
    cfg["torch_threads"] = torch.get_num_threads()
    result = evaluate(
        model, tokenizer, task, specs, cfg["lengths"], cfg["samples"], depths=cfg["depths"], mode=cfg["mode"],
        seed=cfg["seed"], fanout=cfg["fanout"], model_name=cfg["model"], out_dir=cfg["out"], config=cfg,
        progress=not args.no_progress,
    )
    print((result.out_dir / "summary.md").read_text(encoding="utf-8"))
    print(f"results in {result.out_dir}/: " + ", ".join(f.name for f in result.files))
    return 0


def run_queries(args: argparse.Namespace, cfg: dict[str, Any], task: Any) -> int:
    """``--queries K``: the multi-question evaluation (kvpress/eval/multiquery.py)."""
    from pathlib import Path

    import torch

    import kvpress
    from kvpress.eval.multiquery import make_multi_sample, markdown_table, needle_task, per_question_table, run_multi
    from kvpress.models import load_model

    k = args.queries
    task = needle_task(task, k)
    configs = checked_configurations(cfg)  # the same policy configurations as a one-question run
    if not configs:
        raise ValueError("--policy: no configuration to run")
    model, tokenizer = load_model(cfg["model"], device=cfg["device"])
    samples = [make_multi_sample(task, tokenizer, length, k, cfg["seed"], i, d)
               for length in cfg["lengths"] for d in (cfg["depths"] or [None]) for i in range(cfg["samples"])]
    done = [0]

    def progress(sample, config):
        done[0] += 1
        if not args.no_progress:
            print(f"[{done[0]}/{len(samples) * len(configs)}] sample {sample.index} ({sample.context_tokens} tokens) "
                  f"{config.label}", flush=True)

    records = run_multi(model, tokenizer, configs, samples, cfg["mode"], args.turns, progress)
    rows = per_question_table(records, k)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cfg.update(queries=k, turns=args.turns, task=task.name, configurations=[c.label for c in configs],
               versions={"kvpress": kvpress.__version__, "torch": torch.__version__},
               torch_threads=torch.get_num_threads())  # fmt: skip
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    table = markdown_table(rows, k)
    (out / "summary.md").write_text(f"# {task.name}: {k} questions per context, % correct per question index\n\n"
                                    f"{table}\n", encoding="utf-8")  # fmt: skip
    print(table)
    print(f"results in {out}/: samples.jsonl, metrics.json, summary.md, config.json")
    return 0
