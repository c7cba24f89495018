"""Accuracy of every eviction policy on SmolLM2: four synthetic tasks, ratios 0 .. 0.9, query-agnostic and
query-aware, with bytes held and the policy's prefill time as a ratio to the uncompressed prefill.

    python benchmarks/policy_accuracy.py --out benchmarks/results/policy_accuracy.json        # full (hours)
    python benchmarks/policy_accuracy.py --quick --out runs/policy_accuracy_quick.json        # <= 15 min

The full grid takes hours on 2 cores, so ``--out`` is rewritten after every (mode, task) and a rerun with the
same ``--out`` resumes: finished (mode, task) pairs are kept, not recomputed. To use both cores, run disjoint
``--tasks`` in two processes (``--no-overhead``, one thread each), then ``--combine A.json B.json --out ALL.json``
measures the prefill-time ratios and writes one table over all the records.

Query-agnostic: the context is compressed before the question is seen (the hard, reusable-cache setting).
Query-aware: context and question are compressed together. Every configuration of a task shares the same
samples; configurations of one scoring policy share one prefill per sample (fan-out, equal to direct runs).
Scores are case-insensitive substring matches x100 (``kvpress/eval/README.md``); "% of full" is the policy's
mean score over the tasks divided by the uncompressed mean over the same tasks. The 95% interval is the
normal-approximation half-width of the mean over every (task, sample) score of that row. Policy time is the
median paired ratio of a prefill under the policy to an uncompressed prefill (``policy_overhead.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvpress  # noqa: E402
from kvpress.eval import PolicyConfig, evaluate, get_task  # noqa: E402
from kvpress.eval.report import ci95  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_overhead import POLICIES as OVERHEAD_POLICIES  # noqa: E402
from policy_overhead import paired_ratio  # noqa: E402

TASKS = ["niah_single_prose", "niah_single_noise", "niah_multikey_prose", "vt"]
RATIOS = [0.25, 0.5, 0.75, 0.9]
# label -> (registry name, fixed parameters); each runs at every ratio
POLICIES: dict[str, tuple[str, dict]] = {
    "streaming_llm": ("streaming_llm", {}),
    "knorm": ("knorm", {}),
    "snapkv": ("snapkv", {}),
    "tova": ("tova", {}),
    "h2o": ("h2o", {}),
    "pyramidkv(snapkv)": ("pyramidkv", {"scorer": "snapkv"}),
    "adakv(snapkv)": ("adakv", {"scorer": "snapkv"}),
    "kvzip": ("kvzip", {}),
    "learned": ("learned", {}),  # the shipped MLP predictor of KVzip's scores
    "learned(kind='linear')": ("learned", {"kind": "linear"}),  # the shipped linear predictor
}
# label -> (registry name, parameters): sized by their content, not a ratio; one row each, whose
# compression_ratio is the achieved one (1 - bytes held / full bytes) and `threshold` is set
THRESHOLDS: dict[str, tuple[str, dict]] = {
    "learned(threshold=-5)": ("learned", {"threshold": -5.0}),
    "learned(threshold=-7)": ("learned", {"threshold": -7.0}),
}
ALL = {**POLICIES, **THRESHOLDS}
# --quick: ~90 s per sample for all 13 configurations x 2 ratios on 2 idle cores, so 3 needle tasks x 2 samples
# (vt is left out: the uncompressed SmolLM2 scores 0 on it) plus the overhead pairs fit 15 minutes.
QUICK = dict(ratios=[0.5, 0.75], samples=2, modes=["query-agnostic"], overhead_reps=2,
             tasks=["niah_single_prose", "niah_single_noise", "niah_multikey_prose"])
FULL = dict(ratios=RATIOS, samples=10, modes=["query-agnostic", "query-aware"], overhead_reps=3)


def _ci95_pct(scores: list[float]) -> float:
    """95% interval half-width of the mean of scores in [0, 1], in points (nan for fewer than 2 scores)."""
    half = ci95(scores)
    return float("nan") if half is None else 100 * half


def specs_for(labels: list[str], ratios: list[float]) -> list[PolicyConfig]:
    specs = [PolicyConfig()]
    for label in labels:
        name, params = ALL[label]
        sized = label in THRESHOLDS
        specs += [PolicyConfig.of(name, dict(sorted(params.items())), None if sized else r)
                  for r in ratios[: 1 if sized else None]]
    return specs


def label_of(spec: PolicyConfig) -> str:
    return "none" if spec.is_baseline else next(
        k for k, v in ALL.items() if v[0] == spec.name and dict(v[1]) == dict(spec.stages[0].params))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ratios .5/.75, 2 samples, 3 needle tasks, query-agnostic only (<= 15 min)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=1536, help="prompt tokens (the model is reliable at 1-2k)")
    p.add_argument("--tasks", nargs="*", default=None, help=f"default: {TASKS} (--quick: no vt)")
    p.add_argument("--policies", nargs="*", default=list(ALL), choices=list(ALL))
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--ratios", type=float, nargs="*", default=None)
    p.add_argument("--modes", nargs="*", default=None, choices=["query-agnostic", "query-aware"])
    p.add_argument("--no-overhead", action="store_true", help="skip the paired prefill-time measurement")
    p.add_argument("--out", type=Path, default=None, help="JSON with one record per (policy, ratio, task, mode); "
                   "rewritten after every task, and an existing file is resumed")
    p.add_argument("--combine", type=Path, nargs="*", default=None,
                   help="evaluate nothing: merge the records of these JSON files, measure overhead, write --out")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    default_tasks = cfg.pop("tasks", TASKS)  # --quick leaves out vt
    if args.tasks is None:
        args.tasks = default_tasks
    for key in ("samples", "ratios", "modes"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)

    started = time.perf_counter()
    model, tokenizer = kvpress.load_model(args.model)
    specs = specs_for(args.policies, cfg["ratios"])
    records: list[dict] = []
    if args.combine:
        records, cfg, args.tasks, args.policies = _combined(args.combine, args.length)
    elif args.out is not None and args.out.exists():
        records = _resumable(args.out, args.length, cfg, args.policies)
    done = {(r["mode"], r["task"]) for r in records}

    def write(table: str = "") -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            meta = {"model": args.model, "length": args.length, "tasks": args.tasks, "policies": args.policies,
                    **cfg, "seconds": round(time.perf_counter() - started, 1), "kvpress": kvpress.__version__}
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"meta": meta, "records": records, "table": table}, indent=1))
            tmp.replace(args.out)

    for mode in cfg["modes"] if not args.combine else []:
        for task_name in args.tasks:
            if (mode, task_name) in done:
                print(f"{mode} {task_name}: already in {args.out}, kept", flush=True)
                continue
            task = get_task(task_name)
            result = evaluate(model, tokenizer, task, specs, [args.length], cfg["samples"], mode=mode,
                              model_name=args.model, progress=True)
            by_label: dict[str, list[dict]] = {}
            for r in result.records:
                by_label.setdefault(r["label"], []).append(r)
            full = by_label["none"]
            full_score = 100 * sum(r["score"] for r in full) / len(full)
            full_bytes = sum(r["kv_bytes"] for r in full) / len(full)
            for spec in specs:
                rows = by_label[spec.label]
                kv_bytes = sum(r["kv_bytes"] for r in rows) / len(rows)
                achieved = spec.compression_ratio is None and not spec.is_baseline
                records.append({
                    "policy": label_of(spec),
                    "compression_ratio": (round(1 - kv_bytes / full_bytes, 3) if achieved
                                          else 0.0 if spec.is_baseline else spec.compression_ratio),
                    "threshold": dict(spec.params).get("threshold"),
                    "task": task_name,
                    "mode": mode,
                    "query_aware": mode == "query-aware",
                    "length": args.length,
                    "n_samples": len(rows),
                    "score": 100 * sum(r["score"] for r in rows) / len(rows),
                    "sample_scores": [r["score"] for r in rows],
                    "full_score": full_score,
                    "kv_bytes": kv_bytes,
                    "full_kv_bytes": full_bytes,
                    "empty_answers": sum(r["empty"] for r in rows),
                })
            print(f"[{time.perf_counter() - started:.0f}s] {mode} {task_name}: uncompressed {full_score:.0f}", flush=True)
            write()

    overhead: dict[str, float] = {}
    if not args.no_overhead:
        prompt = get_task("niah_single_prose").make_sample(tokenizer, args.length, index=0).prefix_ids
        for label in args.policies:
            overhead[label] = paired_ratio(model, prompt, OVERHEAD_POLICIES[label], cfg["overhead_reps"])
            print(f"{label}: prefill time x{overhead[label]:.2f}", flush=True)
    for r in records:
        if overhead or "policy_time_ratio" not in r:  # --combine --no-overhead keeps ratios measured earlier
            r["policy_time_ratio"] = overhead.get(r["policy"])

    table = summarize(records, cfg["modes"], args.tasks)
    print(table)
    if args.out:
        write(table)
        print(f"wrote {args.out}")
    return 0


def _resumable(path: Path, length: int, cfg: dict, policies: list[str]) -> list[dict]:
    """Records of an earlier run with the same length, ratios, samples and policies (else refuse to mix)."""
    meta = json.loads(path.read_text())["meta"]
    theirs = (meta["length"], meta["ratios"], meta["samples"], meta.get("policies"))
    ours = (length, cfg["ratios"], cfg["samples"], policies)
    if theirs != ours:
        raise SystemExit(f"--out {path} holds a run with (length, ratios, samples, policies) = {theirs}, "
                         f"not {ours}: pass another --out or delete it")
    return json.loads(path.read_text())["records"]


def _combined(paths: list[Path], length: int) -> tuple[list[dict], dict, list[str], list[str]]:
    """Records, config, tasks and policies of several partial runs that share length, ratios and samples."""
    runs = [json.loads(p.read_text()) for p in paths]
    first = runs[0]["meta"]
    for p, run in zip(paths, runs):
        m = run["meta"]
        if (m["length"], m["ratios"], m["samples"]) != (first["length"], first["ratios"], first["samples"]):
            raise SystemExit(f"--combine: {p} differs from {paths[0]} in length, ratios or samples")
    if first["length"] != length:
        raise SystemExit(f"--combine: the runs used --length {first['length']}, not {length}")
    records: list[dict] = []
    seen: dict[tuple, dict] = {}
    for p, run in zip(paths, runs):
        for r in run["records"]:
            # Every partial run scores the uncompressed baseline of its tasks: keep one row per cell.
            key = (r["policy"], r["compression_ratio"], r.get("threshold"), r["task"], r["mode"])
            if key in seen:
                if seen[key]["sample_scores"] != r["sample_scores"]:
                    raise SystemExit(f"--combine: {p} scores {key} differently from an earlier file")
                continue
            seen[key] = r
            records.append(r)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    policies = [p for p in dict.fromkeys(r["policy"] for r in records) if p != "none"]
    cfg = {"ratios": first["ratios"], "samples": first["samples"], "modes": modes,
           "overhead_reps": first.get("overhead_reps", 3)}
    return records, cfg, tasks, policies


def nominal(record: dict) -> float | None:
    """The ratio a row is grouped by: the requested one, or None for a threshold (its achieved ratio varies)."""
    return None if record.get("threshold") is not None else record["compression_ratio"]


def summarize(records: list[dict], modes: list[str], all_tasks: list[str]) -> str:
    """One Markdown table per mode: rows (policy, ratio), a column per task, mean, % of full, CI, bytes, time."""
    out = []
    for mode in modes:
        rows = [r for r in records if r["mode"] == mode]
        tasks = [t for t in all_tasks if any(r["task"] == t for r in rows)]  # a mode may cover fewer tasks
        keys = list(dict.fromkeys((r["policy"], nominal(r)) for r in rows))
        full_mean = sum(r["full_score"] for r in rows if r["policy"] == "none") / len(tasks)
        out.append(f"\n### {mode}\n")
        out.append("| policy | ratio | " + " | ".join(tasks) + " | mean | % of full | ±95% | KV bytes vs full | time / prefill |")
        out.append("|---|---:|" + "---:|" * (len(tasks) + 5))
        for policy, ratio in keys:
            cells = {r["task"]: r for r in rows if (r["policy"], nominal(r)) == (policy, ratio)}
            if any(t not in cells for t in tasks):
                continue  # a policy run on fewer tasks than the table: no comparable mean
            scores = [cells[t]["score"] for t in tasks]
            mean = sum(scores) / len(scores)
            samples = [s for t in tasks for s in cells[t]["sample_scores"]]
            kv = sum(cells[t]["kv_bytes"] for t in tasks) / sum(cells[t]["full_kv_bytes"] for t in tasks)
            shown = f"{ratio:g}" if ratio is not None else f"{1 - kv:.2f} achieved"
            time_ratio = cells[tasks[0]].get("policy_time_ratio")
            out.append(
                f"| {policy} | {shown} | " + " | ".join(f"{s:.0f}" for s in scores)
                + f" | {mean:.1f} | {100 * mean / full_mean if full_mean else float('nan'):.0f}% | {_ci95_pct(samples):.0f}"
                + f" | {kv:.2f} | {'' if time_ratio is None else f'{time_ratio:.2f}x'} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
