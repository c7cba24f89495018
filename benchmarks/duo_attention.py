"""DuoAttention on SmolLM2-135M: trained gates vs the needle identifier vs random heads vs StreamingLLM.

    python benchmarks/duo_attention.py --threads 1                      # ~20 min on one thread
    python benchmarks/duo_attention.py --samples 2 --tasks niah_single_prose --sparsities 0.5   # a quick look

Configurations (query-agnostic: the context is prefilled and compressed before the question is seen):
uncompressed; DuoAttention with the trained pattern (``--pattern``, default the shipped one) at each of
``--sparsities``; with the training-free needle identifier (identified here, timed) and with random gates at each of
``--compare-sparsities`` (one random draw per ``--random-seeds`` entry); StreamingLLM with the same sinks and the
window that holds the same bytes as DuoAttention at that sparsity. Tasks: ``niah_single_prose``,
``niah_multikey_prose``, ``vt`` at ``--length`` tokens, plus perplexity through the cache (chunked, ``--ppl-tokens``
tokens of the harness's prose). Columns: score per task, mean, % of the uncompressed mean, KV bytes held after the
prefill vs the uncompressed cache (``cache.nbytes()``), perplexity, identification seconds. Writes ``--out`` (JSON)
and a heat map of the gates (PNG) next to it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvpress.duo.identify import IdentifyConfig, identify
from kvpress.duo.pattern import DuoPattern, embedded_pattern, load_pattern
from kvpress.eval import PolicyConfig, evaluate, get_task
from kvpress.models import load_model
from kvpress.policies.expr import Stage

TASKS = ("niah_single_prose", "niah_multikey_prose", "vt")


def _portable(path: Path) -> str:
    """``path`` relative to the working directory when inside it (labels and JSON hold no machine's paths)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def duo(pattern: Path, s: float, common: tuple, bits: int | None = None) -> PolicyConfig:
    """``duo_attention(pattern=..., sparsity=s, ...)``, followed by ``| kvquant(bits=...)`` when ``bits``."""
    stages = [Stage("duo_attention", (("pattern", _portable(pattern)), ("sparsity", s), *common))]
    if bits:
        stages.append(Stage("kvquant", (("bits", bits),)))
    return PolicyConfig(tuple(stages))


def heat_map(patterns: dict[str, DuoPattern], path: Path) -> None:
    from kvpress.eval.report import figure

    fig = figure(figsize=(1.6 + 1.5 * len(patterns), 6.5))
    axes = fig.subplots(1, len(patterns), squeeze=False, sharey=True)
    for i, (ax, (name, pattern)) in enumerate(zip(axes[0], patterns.items())):
        image = ax.imshow(pattern.gates.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("KV head")
        ax.set_xticks(range(pattern.kv_heads))
        if i == 0:
            ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="gate (1 = retrieval)")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pattern", default=None, help="trained pattern file (default: the shipped one)")
    p.add_argument("--extra-pattern", default=None, help="a second trained pattern (other seed): heat map + overlap")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--length", type=int, default=2000)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    p.add_argument("--compare-sparsities", nargs="*", type=float, default=[0.5])
    p.add_argument("--kvquant-bits", type=int, default=None,
                   help="also run DuoAttention (trained) | KVQuant(bits) at each of --sparsities")
    p.add_argument("--random-seeds", nargs="+", type=int, default=[0],
                   help="one random head assignment per seed at each of --compare-sparsities (a draw is one sample)")
    p.add_argument("--n-sink", type=int, default=16)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--ppl-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/duo_attention.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model)
    trained_path = Path(args.pattern) if args.pattern else embedded_pattern(model)
    trained = load_pattern(trained_path)
    trained.check(model)
    patterns = {"trained": trained}
    ident_seconds = {"trained": float(trained.metadata.get("seconds", "nan"))}

    t0 = time.perf_counter()  # the cheap identifier, on the same kind of prompts as the trained one
    needle = identify(model, tokenizer, IdentifyConfig(method="needle", seed=0), model_name=args.model,
                      progress=False)
    ident_seconds["needle"] = time.perf_counter() - t0
    needle_path = needle.save(out.with_name(out.stem + "_needle.safetensors"))
    patterns["needle"] = needle
    random_paths = {}  # config label -> pattern file, one random draw per --random-seeds entry (the first unnamed)
    for i, seed in enumerate(args.random_seeds):
        random_gates = torch.rand(trained.gates.shape, generator=torch.Generator().manual_seed(seed))
        label, suffix = ("duo random", "_random") if i == 0 else (f"duo random (seed {seed})", f"_random{seed}")
        random_paths[label] = DuoPattern(random_gates, {"model": args.model, "method": "random", "seed": seed}).save(
            out.with_name(out.stem + suffix + ".safetensors"))
    patterns["random"] = load_pattern(random_paths["duo random"])
    ident_seconds["random"] = 0.0

    overlaps = {}
    heat = {"trained (seed 0)": trained}
    if args.extra_pattern:
        extra = load_pattern(args.extra_pattern)
        heat["trained (seed 1)"] = extra
        overlaps["trained seed 0 vs seed 1"] = len(trained.retrieval_heads(0.5) & extra.retrieval_heads(0.5)) / max(
            1, len(trained.retrieval_heads(0.5)))
    heat["needle identifier"] = needle
    for name in ("needle", "random"):
        top = patterns[name].retrieval_heads(0.5)
        overlaps[f"trained vs {name}"] = len(trained.retrieval_heads(0.5) & top) / max(1, len(top))
    png = out.with_suffix(".png")
    heat_map(heat, png)

    common = (("n_sink", args.n_sink), ("window", args.window))
    configs: list[tuple[str, str, float | None, PolicyConfig]] = [("none", "uncompressed", None, PolicyConfig())]
    for s in args.sparsities:
        configs.append((f"duo trained s={s:g}", "trained", s, duo(trained_path, s, common)))
        if args.kvquant_bits:
            configs.append((f"duo trained s={s:g} | kvquant({args.kvquant_bits})", "trained", s,
                            duo(trained_path, s, common, args.kvquant_bits)))
    for s in args.compare_sparsities:
        configs.append((f"duo needle s={s:g}", "needle", s, duo(needle_path, s, common)))
        for label, random_path in random_paths.items():
            configs.append((f"{label} s={s:g}", "random", s, duo(random_path, s, common)))
        # equal bytes: a streaming head holds n_sink + window of the ~length context tokens
        ratio = round(s * (1 - (args.n_sink + args.window) / (args.length - 50)), 4)
        configs.append((f"streaming_llm = bytes of s={s:g}", "streaming", s,
                        PolicyConfig.of("streaming_llm", {"n_sink": args.n_sink}, ratio)))
    specs = [c[3] for c in configs]

    started = time.perf_counter()
    per_task: dict[str, dict[str, dict]] = {}
    for task_name in args.tasks:
        result = evaluate(model, tokenizer, get_task(task_name), specs, [args.length], args.samples,
                          model_name=args.model, progress=True)
        per_task[task_name] = {name: entry for (name, *_), entry in zip(configs, result.metrics["entries"])}

    from kvpress.eval.perplexity import evaluate_perplexity
    from kvpress.eval.text import load_text, tokenize_text

    text, _ = load_text(None)
    ppl_ids = tokenize_text(tokenizer, text, max_tokens=args.ppl_tokens)
    ppl = {}
    for name, _, _, spec in configs:
        policy = spec.build(ppl_ids.shape[1])
        ppl[name] = evaluate_perplexity(model, ppl_ids, policy=policy, mode="chunked", chunk_size=256).perplexity
    seconds = time.perf_counter() - started

    rows = []
    base_mean = None
    for name, kind, s, _ in configs:
        scores = {t: per_task[t][name]["score"] for t in args.tasks}
        fractions = [per_task[t][name]["kv_fraction"] for t in args.tasks if per_task[t][name]["kv_fraction"]]
        mean = sum(scores.values()) / len(scores)
        base_mean = mean if kind == "uncompressed" else base_mean
        rows.append({
            "config": name, "kind": kind, "sparsity": s, "scores": scores, "mean": mean,
            "pct_of_full": None if not base_mean else 100.0 * mean / base_mean,
            "kv_fraction": sum(fractions) / len(fractions) if fractions else 1.0,
            "perplexity": ppl[name], "ident_seconds": ident_seconds.get(kind),
        })

    header = ["config", *args.tasks, "mean", "% of full", "KV held / full", "ppl", "ident s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["config"], *[f"{r['scores'][t]:.0f}" for t in args.tasks], f"{r['mean']:.1f}",
                 "-" if r["pct_of_full"] is None else f"{r['pct_of_full']:.0f}", f"{r['kv_fraction']:.3f}",
                 f"{r['perplexity']:.2f}", "-" if r["ident_seconds"] is None else f"{r['ident_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    print("overlap of top-half retrieval heads:", json.dumps({k: round(v, 3) for k, v in overlaps.items()}))
    random_draws = {}  # mean score of the random head assignments at each sparsity, against the trained gates
    for s in args.compare_sparsities:
        means = [r["mean"] for r in rows if r["kind"] == "random" and r["sparsity"] == s]
        trained_mean = next((r["mean"] for r in rows if r["kind"] == "trained" and r["sparsity"] == s), None)
        draws = random_draws[f"s={s:g}"] = {"draws": means, "mean": sum(means) / len(means), "min": min(means),
                                            "max": max(means), "trained": trained_mean}
        print(f"random heads at s={s:g}: {len(means)} draws, mean {draws['mean']:.1f} "
              f"(min {min(means):.1f}, max {max(means):.1f}); trained {trained_mean}")
    out.write_text(json.dumps({
        "model": args.model, "length": args.length, "samples": args.samples, "tasks": args.tasks,
        "n_sink": args.n_sink, "window": args.window, "threads": torch.get_num_threads(),
        "trained_pattern": str(trained_path), "trained_metadata": trained.metadata, "overlaps": overlaps,
        "rows": rows, "random_draws": random_draws, "per_task": per_task, "seconds": round(seconds, 1),
        "heat_map": str(png), "table": table,
    }, indent=1, default=str))
    print(f"wrote {out} and {png} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
