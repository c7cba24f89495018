"""The evaluation loop: tasks x lengths x depths x samples x policy configurations -> records and metrics.

One record per (sample, configuration); see ``kvpress/eval/README.md`` for the record and metrics schemas.
Configurations that differ only in the ratio of one prefill :class:`~kvpress.policies.ScorePolicy` (and the
uncompressed baseline) share one prefill per sample (fan-out, :func:`kvpress.eval.generation.run_fanout`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kvpress.eval.generation import Generation, fanout_key, first_forward_ids, run_direct, run_fanout
from kvpress.eval.scoring import score as score_prediction
from kvpress.eval.tasks import Task
from kvpress.policies.base import check_ratio
from kvpress.policies.expr import PolicyConfig, expand

SCHEMA_VERSION = 1


def configurations(policies: Sequence[str], ratios: Sequence[float] | None, params: dict[str, Any] | None = None,
                   baseline: bool = True) -> list[PolicyConfig]:
    """Configurations for every policy x ratio (the uncompressed baseline first, once, when ``baseline``).

    ``policies``: registry names or policy expressions (``"snapkv(window=16) | kvquant(bits=4)"``); ``params``
    are added to every single-name policy; ``ratios`` reach every configuration that takes a compression ratio
    (one without such a parameter, e.g. ``kvquant``, runs once). Raises :class:`~kvpress.policies.expr.
    ExpressionError` (a ``ValueError``) naming the bad policy, parameter or ratio.
    """
    for i, r in enumerate(ratios or []):
        check_ratio(f"compression_ratio[{i}]", r)
    out: list[PolicyConfig] = [PolicyConfig()] if baseline else []
    for i, text in enumerate(policies):
        where = f"policy[{i}]"
        if params and _is_name(text) and text.strip().lower() not in ("none", "full"):
            found = [PolicyConfig.of(text, params, r, where) for r in (ratios or [None])]
        else:
            found = expand(text, ratios, where)
        for config in found:
            if config.is_baseline and baseline:
                continue
            if config not in out:
                out.append(config)
    return out


def _is_name(text: str) -> bool:
    return text.strip().replace("-", "_").isidentifier()


@dataclass
class EvalResult:
    records: list[dict[str, Any]]
    metrics: dict[str, Any]
    out_dir: Path | None = None
    files: list[Path] = field(default_factory=list)


def _plan(policies: Sequence[Any], fanout: bool) -> list[list[int]]:
    """Groups of configuration indices that share one prefill (singletons run directly)."""
    if not fanout:
        return [[i] for i in range(len(policies))]
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, policy in enumerate(policies):
        key = None if policy is None else fanout_key(policy)
        if key is not None:
            groups[key].append(i)
    baseline = [i for i, policy in enumerate(policies) if policy is None]
    plan: list[list[int]] = []
    for members in groups.values():
        if baseline and not plan:  # the uncompressed run rides along with the first fan-out group
            members = baseline + members
        if len(members) > 1:
            plan.append(sorted(members))
    grouped = {i for members in plan for i in members}
    return plan + [[i] for i in range(len(policies)) if i not in grouped]


def run_sample(model, tokenizer, sample, specs: Sequence[PolicyConfig], mode: str,
               fanout: bool = True) -> list[tuple[PolicyConfig, Any, Generation]]:
    """Every configuration on one sample: ``(spec, policy, generation)`` in the order of ``specs``."""
    n_first = len(first_forward_ids(sample.prefix_ids, sample.suffix_ids, mode))
    policies = [_with_tokenizer(spec.build(n_first), tokenizer) for spec in specs]
    out: dict[int, Generation] = {}
    for group in _plan(policies, fanout):
        if len(group) == 1:
            i = group[0]
            out[i] = run_direct(model, tokenizer, policies[i], sample.prefix_ids, sample.suffix_ids, mode,
                                sample.max_new_tokens)
        else:
            gens = run_fanout(model, tokenizer, [policies[i] for i in group], sample.prefix_ids, sample.suffix_ids,
                              mode, sample.max_new_tokens)
            out.update(zip(group, gens))
    return [(spec, policies[i], out[i]) for i, spec in enumerate(specs)]


def _with_tokenizer(policy: Any, tokenizer) -> Any:
    """Hand the evaluation's tokenizer to policies that write prompts (KVzip) and were given none."""
    for stage in getattr(policy, "policies", [policy]):
        if hasattr(stage, "tokenizer") and stage.tokenizer is None:
            stage.tokenizer = tokenizer
    return policy


def make_record(sample, spec: PolicyConfig, policy: Any, gen: Generation, mode: str, model_name: str) -> dict[str, Any]:
    return {
        "task": sample.task,
        "length": sample.length,
        "depth": sample.depth,
        "needle_depth": sample.needle_depth,
        "index": sample.index,
        "seed": sample.seed,
        "mode": mode,
        "model": model_name,
        "label": spec.label,
        "policy": spec.name,
        "compression_ratio": spec.compression_ratio,
        "parameters": policy.params() if hasattr(policy, "params") else {},
        "prompt_tokens": sample.prompt_tokens,
        "context_tokens": sample.context_tokens,
        "haystack_units": sample.haystack_units,
        "prediction": gen.text,
        "gold": sample.references,
        "metric": sample.metric,
        "score": score_prediction(gen.text, sample.references, sample.metric),
        "empty": not gen.text.strip(),
        "kv_bytes": gen.kv_bytes,
        "kv_bytes_end": gen.kv_bytes_end,
        "kv_bytes_by_layer_type": dict(gen.kv_bytes_by_type),
        "seconds": round(gen.seconds, 4),
        "prefill_seconds": round(gen.prefill_seconds, 4),
        "fanout": gen.fanout,
    }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _score_x100(values: Sequence[float]) -> float | None:
    """Mean of scores in [0, 1], as a percentage rounded to 2 decimals (the metrics' scale)."""
    m = _mean(values)
    return None if m is None else round(100.0 * m, 2)


def _key(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def summarize(records: Sequence[dict[str, Any]], specs: Sequence[PolicyConfig]) -> list[dict[str, Any]]:
    """One metrics entry per configuration (scores x100; KV bytes averaged over samples)."""
    baseline_bytes = {
        (r["length"], r["depth"], r["index"]): r["kv_bytes"] for r in records if r["policy"] == "none"
    }
    baseline_types = {
        (r["length"], r["depth"], r["index"]): r.get("kv_bytes_by_layer_type") or {}
        for r in records if r["policy"] == "none"
    }
    entries = []
    for spec in specs:
        rows = [r for r in records if r["label"] == spec.label]
        by_length: dict[str, list[float]] = defaultdict(list)
        by_depth: dict[str, list[float]] = defaultdict(list)
        grid: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        fractions = []
        type_fractions: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            by_length[_key(r["length"])].append(r["score"])
            if r["depth"] is not None:
                by_depth[_key(r["depth"])].append(r["score"])
                grid[_key(r["depth"])][_key(r["length"])].append(r["score"])
            full = baseline_bytes.get((r["length"], r["depth"], r["index"]))
            if full:
                fractions.append(r["kv_bytes"] / full)
            for kind, full_kind in baseline_types.get((r["length"], r["depth"], r["index"]), {}).items():
                held = (r.get("kv_bytes_by_layer_type") or {}).get(kind)
                if full_kind and held is not None:
                    type_fractions[kind].append(held / full_kind)
        # A record's seconds include its own prefill, except under fan-out where the prefill is shared: add it
        # back, so each entry's seconds are what the configuration would cost alone.
        seconds = sum(r["seconds"] + (r["prefill_seconds"] if r["fanout"] else 0.0) for r in rows)
        entries.append({
            "label": spec.label,
            "policy": spec.name,
            "parameters": spec.parameters(),
            "compression_ratio": spec.compression_ratio,
            "score": _score_x100([r["score"] for r in rows]),
            "per_length": {k: _score_x100(v) for k, v in by_length.items()},
            "per_depth": {k: _score_x100(v) for k, v in by_depth.items()} or None,
            "grid": {d: {k: _score_x100(v) for k, v in row.items()} for d, row in grid.items()} or None,
            "n_samples": len(rows),
            "empty_answers": sum(r["empty"] for r in rows),
            "kv_bytes": _mean([r["kv_bytes"] for r in rows]),
            "kv_bytes_end": _mean([r["kv_bytes_end"] for r in rows]),
            "kv_fraction": None if not fractions else round(_mean(fractions), 4),
            # the same per layer type: a policy acting on full-attention layers is sized by that fraction, the
            # memory saved is kv_fraction (whole cache)
            "kv_fraction_by_layer_type": {k: round(_mean(v), 4) for k, v in type_fractions.items()} or None,
            "seconds": round(seconds, 3),
            "prefill_seconds": round(sum(r["prefill_seconds"] for r in rows), 3),
            "mean_prompt_tokens": _mean([r["prompt_tokens"] for r in rows]),
        })
    return entries


def evaluate(
    model,
    tokenizer,
    task: Task,
    specs: Sequence[PolicyConfig],
    lengths: Sequence[int],
    samples: int,
    *,
    depths: Sequence[float] | None = None,
    mode: str = "query-agnostic",
    seed: int = 0,
    fanout: bool = True,
    model_name: str = "",
    out_dir: str | Path | None = None,
    config: dict[str, Any] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Run ``task`` for every length (x depth) x sample under every configuration in ``specs``.

    With ``out_dir`` the per-sample JSONL is written as the run goes, then metrics, summaries, the resolved
    configuration and plots (see :func:`kvpress.eval.results.write_run`).
    """
    from kvpress.eval.results import RecordWriter, write_run

    if depths and not task.uses_depth:
        raise ValueError(f"task {task.name!r} places no needle: depths do not apply")
    if samples < 1 or not lengths or not specs:
        raise ValueError("need samples >= 1, at least one length and one configuration")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate configurations: {labels}")
    cells = [(length, depth) for length in lengths for depth in (depths or [None])]
    writer = RecordWriter(out_dir) if out_dir is not None else None
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = _progress(total=len(cells) * samples, enabled=progress, desc=task.name)
    try:
        for length, depth in cells:
            for index in range(samples):
                sample = task.make_sample(tokenizer, length, seed=seed, index=index, depth=depth)
                for spec, policy, gen in run_sample(model, tokenizer, sample, specs, mode, fanout):
                    record = make_record(sample, spec, policy, gen, mode, model_name)
                    records.append(record)
                    if writer:
                        writer.write(record)
                bar.update(1)
                base = [r["score"] for r in records if r["label"] == labels[0]]
                bar.set_postfix_str(f"{labels[0]}={100 * _mean(base):.0f} L={length}")
    finally:
        bar.close()
        if writer:
            writer.close()
    seconds = time.perf_counter() - started
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "task": task.name,
        "task_config": task.config(),
        "model": model_name,
        "mode": mode,
        "seed": seed,
        "lengths": list(lengths),
        "depths": list(depths) if depths else None,
        "samples": samples,
        "fanout": fanout,
        "policies": list(dict.fromkeys(s.name for s in specs)),
        "baseline": "none" if any(s.is_baseline for s in specs) else None,
        "entries": summarize(records, specs),
        "seconds": round(seconds, 2),
    }
    result = EvalResult(records, metrics)
    if out_dir is not None:
        result.out_dir = Path(out_dir)
        result.files = write_run(out_dir, records, metrics, {**(config or {}), "task_config": task.config()})
    return result


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="sample", dynamic_ncols=True, leave=True)

