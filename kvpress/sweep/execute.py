"""Running work units on a loaded model: the part every backend shares (the local process, a Ray actor).

A unit's cells run through the eval harness (synthetic tasks: :func:`kvpress.eval.evaluate`, with fan-out over
the ratios of one score policy; perplexity: :func:`kvpress.eval.perplexity.evaluate_perplexity`; lm-eval:
:class:`kvpress.eval.lm_eval_adapter.KVPressLM`). Each finished cell becomes one record; a unit that fails is
re-run cell by cell so that one failing configuration does not take its neighbours down, and a cell that
still fails becomes an error entry (message and traceback) instead of a record.
"""

from __future__ import annotations

import math
import os
import platform
import time
import traceback
from typing import Any, Sequence

from kvpress.sweep.cells import Cell, kvpress_version
from kvpress.sweep.tasks import LM_EVAL, LM_EVAL_PREFIX, PPL, build_task

RECORD_SCHEMA = 1
# Per-sample fields of the eval harness's records kept in a cell record (the rest is in the cell's config).
SAMPLE_FIELDS = ("index", "needle_depth", "prompt_tokens", "context_tokens", "haystack_units", "prediction", "gold",
                 "metric", "score", "empty", "kv_bytes", "kv_bytes_end", "parameters", "seconds", "prefill_seconds",
                 "fanout")
TIME_FIELDS = ("seconds", "prefill_seconds", "decode_seconds", "fanout", "environment", "finished_at", "worker")


def environment(backend: str, model: Any = None) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "kvpress": kvpress_version(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "device": str(getattr(model, "device", "cpu")), "backend": backend,
    }


class ModelHolder:
    """Keeps the model of the current cells loaded (one at a time), so that consecutive cells reuse it."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.name: tuple[str, str] | None = None
        self.model = self.tokenizer = None
        self.loads = 0

    def get(self, name: str, dtype: str):
        if self.name != (name, dtype):
            import torch

            from kvpress.models import load_model

            self.model = self.tokenizer = None
            self.model, self.tokenizer = load_model(name, dtype=getattr(torch, dtype), device=self.device)
            self.name = (name, dtype)
            self.loads += 1
        return self.model, self.tokenizer


# ------------------------------------------------------------------------------------------------- KV bytes


_FULL_BYTES: dict[tuple, int] = {}


def full_cache_nbytes(model, n_tokens: int) -> int:
    """Bytes an uncompressed cache of ``model`` holds after ``n_tokens`` tokens (the reference of "bytes held vs
    full"): a :class:`kvpress.KVPressCache` filled with ``n_tokens`` uninitialised keys and values per layer,
    so every layer type counts by its own rules (sliding-window layers hold their window)."""
    import torch

    from kvpress.cache import KVPressCache

    config = model.config.get_text_config(decoder=True)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    key = (id(config), model.dtype, kv_heads, head_dim, n_tokens)
    if key not in _FULL_BYTES:
        cache = KVPressCache(model.config)
        empty = torch.empty(1, kv_heads, n_tokens, head_dim, dtype=model.dtype)
        for layer in cache.layers:
            layer.update(empty, empty)
        _FULL_BYTES[key] = cache.nbytes()
    return _FULL_BYTES[key]


# ------------------------------------------------------------------------------------------------- running


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _record(cell: Cell, result: dict[str, Any], samples: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    return {
        "record_schema": RECORD_SCHEMA,
        "key": cell.key,
        "status": "ok",
        "model": cell.model,
        "policy": cell.policy.label,
        "policy_name": cell.policy.name,
        "compression_ratio": cell.policy.compression_ratio,
        "task": cell.task,
        "length": cell.length,
        "depth": cell.depth,
        "mode": cell.mode,
        "seed": cell.seed,
        **result,
        "n_samples": len(samples),
        "samples": samples,
        "environment": env,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cell.config,
    }


def _synthetic(model, tokenizer, unit: list[Cell], fanout: bool, env: dict[str, Any]) -> list[dict[str, Any]]:
    from kvpress.eval import evaluate

    first = unit[0]
    task = build_task(first.task, first.task_params)
    result = evaluate(
        model, tokenizer, task, [c.policy for c in unit], [first.length], first.samples,
        depths=None if first.depth is None else [first.depth], mode=first.mode, seed=first.seed, fanout=fanout,
        model_name=first.model, progress=False,
    )
    out = []
    for cell in unit:
        rows = [r for r in result.records if r["label"] == cell.policy.label]
        samples = []
        for r in rows:
            n_first = r["context_tokens"] if cell.mode == "query-agnostic" else r["prompt_tokens"]
            full = full_cache_nbytes(model, n_first)
            samples.append({**{k: r[k] for k in SAMPLE_FIELDS}, "full_kv_bytes": full,
                            "kv_fraction": r["kv_bytes"] / full})
        # Under fan-out a record's seconds exclude the shared prefill: count it for each, as if run alone.
        seconds = sum(r["seconds"] + (r["prefill_seconds"] if r["fanout"] else 0.0) for r in rows)
        prefill = sum(r["prefill_seconds"] for r in rows)
        out.append(_record(cell, {
            "metric": task.metric, "higher_is_better": True,
            "score": round(100.0 * _mean([r["score"] for r in rows]), 4),
            "empty_answers": sum(bool(r["empty"]) for r in rows),
            "kv_bytes": _mean([s["kv_bytes"] for s in samples]),
            "kv_bytes_end": _mean([s["kv_bytes_end"] for s in samples]),
            "full_kv_bytes": _mean([s["full_kv_bytes"] for s in samples]),
            "kv_fraction": round(_mean([s["kv_fraction"] for s in samples]), 6),
            "seconds": round(seconds, 4), "prefill_seconds": round(prefill, 4),
            "decode_seconds": round(seconds - prefill, 4),
        }, samples, env))
    return out


_TEXT_IDS: dict[tuple, Any] = {}


def _text_ids(tokenizer, path: str | None, n_tokens: int):
    from kvpress.eval.text import load_text, tokenize_text

    key = (id(tokenizer), path, n_tokens)
    if key not in _TEXT_IDS:
        text, _ = load_text(path)
        _TEXT_IDS.clear()
        _TEXT_IDS[key] = tokenize_text(tokenizer, text, n_tokens)
    return _TEXT_IDS[key]


def _perplexity(model, tokenizer, cell: Cell, env: dict[str, Any]) -> dict[str, Any]:
    from kvpress.eval.perplexity import MODE_OVERRIDES, evaluate_perplexity

    p = cell.task_params
    length, n = cell.length, cell.samples
    ids = _text_ids(tokenizer, p["text"], length * n)
    if ids.shape[1] < length * n:
        raise ValueError(f"perplexity: the text has {ids.shape[1]} tokens, fewer than samples x length = {n * length}")
    overrides = MODE_OVERRIDES[p["mode"]]
    samples = []
    nll = tokens = 0.0
    full = full_cache_nbytes(model, length - 1)
    for i in range(n):
        policy = cell.policy.build(length, overrides)
        r = evaluate_perplexity(model, ids[:, i * length:(i + 1) * length], policy=policy, policy_name=cell.policy.label,
                                mode=p["mode"], chunk_size=p["chunk_size"], prefill=p["prefill"],
                                model_name=cell.model)
        nll += r.mean_nll * r.tokens_scored
        tokens += r.tokens_scored
        samples.append({"index": i, "perplexity": r.perplexity, "tokens_scored": r.tokens_scored,
                        "kv_bytes": r.peak_kv_bytes, "kv_bytes_end": r.final_kv_bytes, "full_kv_bytes": full,
                        "kv_fraction": r.peak_kv_bytes / full, "parameters": r.policy_params,
                        "seconds": round(r.seconds, 4)})
    seconds = sum(s["seconds"] for s in samples)
    return _record(cell, {
        "metric": "perplexity", "higher_is_better": False, "score": round(math.exp(nll / tokens), 6),
        "empty_answers": None, "kv_bytes": _mean([s["kv_bytes"] for s in samples]),
        "kv_bytes_end": _mean([s["kv_bytes_end"] for s in samples]), "full_kv_bytes": full,
        "kv_fraction": round(_mean([s["kv_fraction"] for s in samples]), 6),
        "seconds": round(seconds, 4), "prefill_seconds": None, "decode_seconds": None,
    }, samples, env)


def _lm_eval(model, tokenizer, cell: Cell, env: dict[str, Any]) -> dict[str, Any]:
    import lm_eval

    from kvpress.eval.lm_eval_adapter import KVPressLM, kvpress_task_manager

    name = cell.task[len(LM_EVAL_PREFIX):]
    policy = cell.policy.build(cell.task_params["nominal_tokens"])
    lm = KVPressLM(pretrained=model, tokenizer=tokenizer, policy=policy, device=str(model.device))
    seed = cell.seed or 0
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[name], task_manager=kvpress_task_manager(metadata={"tokenizer": tokenizer}),
        limit=cell.samples, log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=0,
    )
    seconds = time.perf_counter() - started
    metrics = results["results"][name]
    higher = results.get("higher_is_better", {}).get(name, {})
    metric = next(k for k, v in metrics.items() if "," in k and "stderr" not in k and isinstance(v, (int, float)))
    value = float(metrics[metric])
    base = metric.split(",")[0]
    # Accuracy-like metrics in [0, 1] are shown x100 like every other score; others (perplexities) as they are.
    scale = 100.0 if base in ("acc", "acc_norm", "exact_match") else 1.0
    samples = [{"index": s.get("doc_id"), "target": s.get("target"), "prediction": s.get("filtered_resps"),
                **{k: s[k] for k in s if k.split(",")[0] == base}} for s in results.get("samples", {}).get(name, [])]
    return _record(cell, {
        "metric": base, "higher_is_better": bool(higher.get(base, True)), "score": round(value * scale, 6),
        "empty_answers": None, "kv_bytes": None, "kv_bytes_end": None, "full_kv_bytes": None, "kv_fraction": None,
        "seconds": round(seconds, 4), "prefill_seconds": None, "decode_seconds": None,
    }, samples, env)


def _run(model, tokenizer, unit: list[Cell], fanout: bool, env: dict[str, Any]) -> list[dict[str, Any]]:
    kind = unit[0].kind
    if kind == PPL:
        return [_perplexity(model, tokenizer, c, env) for c in unit]
    if kind == LM_EVAL:
        return [_lm_eval(model, tokenizer, c, env) for c in unit]
    return _synthetic(model, tokenizer, unit, fanout, env)


def error_entry(cell: Cell, err: BaseException, env: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": cell.key, "status": "error", "cell": cell.describe(), "error": f"{type(err).__name__}: {err}",
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
        "environment": env, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": cell.config,
    }


def run_unit(holder: ModelHolder, unit: list[Cell], *, fanout: bool = True, backend: str = "local") -> list[dict[str, Any]]:
    """Run ``unit`` (cells of one model); one outcome per cell: a record (``status == "ok"``) or an error entry."""
    first = unit[0]
    env = environment(backend)
    try:
        model, tokenizer = holder.get(first.model, first.dtype)
    except Exception as err:  # noqa: BLE001 - a model that does not load fails its cells, the sweep goes on
        return [error_entry(cell, err, env) for cell in unit]
    env = environment(backend, model)
    try:
        return _run(model, tokenizer, unit, fanout, env)
    except Exception as err:  # noqa: BLE001 - a failing cell is recorded, the sweep goes on
        if len(unit) == 1:
            return [error_entry(first, err, env)]
    outcomes: list[dict[str, Any]] = []
    for cell in unit:  # isolate the failing configuration(s)
        try:
            outcomes.extend(_run(model, tokenizer, [cell], fanout, env))
        except Exception as err:  # noqa: BLE001
            outcomes.append(error_entry(cell, err, env))
    return outcomes
