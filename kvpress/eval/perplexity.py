"""Perplexity measured *through* a (compressed) KV cache.

Eviction changes what the model attends to, so the only faithful perplexity for an evicting cache is teacher
forcing through that cache (StreamingLLM's protocol): feed the text, score each next token from the logits the
model produced while reading the cache as it was held at that moment. :func:`score_through_cache` is the one
routine that does it (the harness, the sweep, the lm-eval adapter and :mod:`kvpress.eval.cache_probes` call it).
In either mode an optional first piece of ``prefill`` tokens goes in one forward. Two modes:

``token``
    After the optional prefill, feed one token per forward and score the next. A policy that evicts at every
    forward (StreamingLLM) keeps the cache bounded, so this runs to arbitrarily long texts in bounded memory. No
    attention mask is passed (the model derives positions from the cache) and only the per-step logits are kept,
    so a step costs the same at token 100 000 as at token 1000 once the cache is full.
``chunked``
    Feed ``chunk_size`` (C) tokens per forward (after the optional prefill), score all C next-token predictions of
    the chunk, let the policy compress, continue. Each chunk attends to the compressed past plus itself,
    uncompressed. Score policies (SnapKV, ...) are built with ``every_chunk=True`` so they compress after every
    chunk, not only the first.

Both modes score the same tokens: every token of the text but the first (``tokens_scored = N - 1``), so a
compressed run and a full-cache run on the same text are directly comparable.

KV bytes (counted by :func:`kvpress.eval.kv_bytes.cache_nbytes`): ``peak_kv_bytes`` is the maximum of the bytes
the cache holds *between forwards*, read every ``kv_check_every`` forwards, after the first forward and after the
last one. For a growing cache the peak is the final value; for a bounded cache (StreamingLLM) the size is constant once the window filled, so the
sampled maximum is the true one. Transient buffers inside a forward (attention scores, the new tokens before
eviction) are not counted.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvpress.compat import cache_kwargs, output_cache
from kvpress.eval.kv_bytes import cache_nbytes

MODES = ("token", "chunked")


# Parameters every policy stage that takes them is built with, per mode (``PolicyConfig.build(overrides=...)``):
# chunked perplexity needs score policies to compress after every chunk, not only the first forward.
MODE_OVERRIDES: dict[str, dict[str, Any]] = {"token": {}, "chunked": {"every_chunk": True}}


@contextlib.contextmanager
def open_cache(model, policy=None, *, cache: str | Callable[[], Any] = "kvpress") -> Iterator[Any]:
    """An empty cache to feed ``model`` with, under ``policy``.

    ``cache="kvpress"``: the model is patched with :func:`kvpress.patch` for the duration and the cache is a
    ``KVPressCache`` (policy ``None`` = uncompressed). ``cache="dynamic"``: a plain transformers
    ``DynamicCache`` on the unpatched model (uncompressed reference; ``policy`` must be ``None``). A callable:
    the cache it builds (a transformers baseline such as ``QuantizedCache``), on the unpatched model.
    """
    if callable(cache) or cache == "dynamic":
        if policy is not None:
            raise ValueError("a transformers cache cannot apply a policy; use cache='kvpress'")
        if callable(cache):
            yield cache()
            return
        from transformers import DynamicCache

        yield DynamicCache(config=model.config)
        return
    if cache != "kvpress":
        raise ValueError(f"cache must be 'kvpress' or 'dynamic', got {cache!r}")
    import kvpress

    with kvpress.patch(model, policy) as session:
        yield session.new_cache()


# ------------------------------------------------------------------------------------------------- result


@dataclass
class PerplexityResult:
    """One perplexity run. ``perplexity = exp(mean NLL)`` over ``tokens_scored`` next-token predictions."""

    perplexity: float
    mean_nll: float
    tokens_scored: int
    tokens_total: int
    seconds: float
    tokens_per_second: float
    peak_kv_bytes: int
    final_kv_bytes: int
    mode: str
    chunk_size: int | None
    prefill_tokens: int
    kv_check_every: int
    cache: str
    policy: str = "none"
    policy_params: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    text_source: str = ""
    segments: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    effective_bits: float | None = None  # with measure_bits: at the end
    mean_effective_bits: float | None = None  # with measure_bits: mean over the forwards after the prefill

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """How the number was measured, in one line."""
        how = f"chunks of C={self.chunk_size}" if self.mode == "chunked" else "token by token"
        if self.prefill_tokens:
            how += f" after a {self.prefill_tokens}-token prefill"
        return f"{self.policy} ({self.cache}), {how}"


def write_json(path: str | Path, results: PerplexityResult | dict[str, PerplexityResult], **extra: Any) -> Path:
    """Write one result, or a ``{label: result}`` mapping, as JSON (plus any ``extra`` top-level keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(results, PerplexityResult):
        payload: dict[str, Any] = results.to_dict()
    else:
        payload = {label: r.to_dict() for label, r in results.items()}
    payload.update(extra)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------------- scoring


@dataclass
class _Scores:
    """NLL accumulated in float64, with per-segment sums (a curve of perplexity along the text) and the time
    at which each segment was done (its throughput shows that a bounded cache costs the same at every depth)."""

    segment_tokens: int
    started: float = field(default_factory=time.perf_counter)
    nll_sum: float = 0.0
    count: int = 0
    segments: list[dict[str, float]] = field(default_factory=list)
    _seg_sum: float = 0.0
    _seg_count: int = 0

    def add(self, nll: torch.Tensor) -> None:
        values = nll.double()
        start = 0
        while start < values.numel():
            take = min(values.numel() - start, self.segment_tokens - self._seg_count)
            part = float(values[start : start + take].sum())
            self.nll_sum += part
            self._seg_sum += part
            self._seg_count += take
            self.count += take
            start += take
            if self._seg_count == self.segment_tokens:
                self._close_segment()

    def _close_segment(self) -> None:
        if self._seg_count:
            self.segments.append(
                {
                    "end_token": self.count,
                    "tokens": self._seg_count,
                    "perplexity": math.exp(self._seg_sum / self._seg_count),
                    "elapsed_s": round(time.perf_counter() - self.started, 3),
                }
            )
        self._seg_sum, self._seg_count = 0.0, 0

    def finish(self) -> None:
        self._close_segment()


def _piece_sizes(n_inputs: int, mode: str, chunk_size: int, prefill: int) -> Iterator[int]:
    """How many tokens each forward feeds: a first piece of ``prefill`` tokens (when > 0), then 1 (token mode) or
    C (chunked)."""
    step = 1 if mode == "token" else chunk_size
    first = prefill if prefill > 0 else step
    fed = 0
    size = first
    while fed < n_inputs:
        size = min(size, n_inputs - fed)
        yield size
        fed += size
        size = step


def score_through_cache(
    model,
    input_ids: torch.Tensor,
    cache,
    *,
    mode: str = "token",
    chunk_size: int = 512,
    prefill: int = 0,
    score_from: int = 1,
    feed_last: bool = False,
    on_forward: Callable[[Any, int, int], None] | None = None,
    kv_check_every: int = 32,
    segment_tokens: int = 1024,
    progress: bool = False,
    desc: str = "perplexity",
) -> dict[str, Any]:
    """Teacher-force ``input_ids`` (``[1, N]``) through ``cache`` and score the next tokens: the one perplexity
    routine of kvpress (the harness, the sweep, the lm-eval adapter and the quantization probes call it).

    The model reads ``input_ids`` piece by piece (see :func:`_piece_sizes`), each forward with ``cache`` as its
    cache argument; the logits of each piece score the tokens that follow it. Tokens at positions ``>=
    score_from`` are scored (default 1: every token but the first; the quantization probe scores only what follows
    its prefill). ``feed_last``: also feed the last token (whose logits predict nothing), so the cache ends holding
    all N tokens. ``on_forward(cache, start, stop)`` is called after each forward that fed tokens
    ``start..stop-1``. Returns the raw statistics (NLL sum, count, timings, KV bytes);
    :func:`evaluate_perplexity` wraps them in a result.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, N], got {tuple(input_ids.shape)}")
    if chunk_size < 1 or prefill < 0 or kv_check_every < 1:
        raise ValueError("chunk_size and kv_check_every must be >= 1, prefill >= 0")
    n = input_ids.shape[1]
    if not 1 <= score_from < n:
        raise ValueError(f"score_from must be in [1, {n}) (a token to score), got {score_from}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    inputs, targets = (input_ids if feed_last else input_ids[:, :-1]), input_ids[0, 1:]
    n_inputs = inputs.shape[1]
    peak = 0
    n_checks = 0
    pos = 0
    step = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_inputs, desc=desc, unit="tok", dynamic_ncols=True)
    scores = _Scores(segment_tokens=segment_tokens)
    start = scores.started
    with torch.inference_mode():
        for size in _piece_sizes(n_inputs, mode, chunk_size, prefill):
            out = model(input_ids=inputs[:, pos : pos + size], **cache_kwargs(model, cache), use_cache=True)
            returned = output_cache(out)
            cache = returned if returned is not None else cache
            logits = out.logits[0]
            # row i predicts token pos + i + 1: score those at positions in [score_from, n)
            lo, hi = max(pos, score_from - 1), min(pos + size, n - 1)
            if hi > lo:
                scores.add(F.cross_entropy(logits[lo - pos : hi - pos].float(), targets[lo:hi], reduction="none"))
            del out, logits
            pos += size
            step += 1
            if on_forward is not None:
                on_forward(cache, pos - size, pos)
            if step == 1 or step % kv_check_every == 0 or pos == n_inputs:
                peak = max(peak, cache_nbytes(cache))
                n_checks += 1
            if bar is not None:
                bar.update(size)
                if scores.count and (step % 256 == 0 or pos == n_inputs):
                    bar.set_postfix(ppl=f"{math.exp(scores.nll_sum / scores.count):.2f}", refresh=False)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    scores.finish()
    return {
        "nll_sum": scores.nll_sum,
        "tokens_scored": scores.count,
        "tokens_total": int(input_ids.shape[1]),
        "seconds": seconds,
        "peak_kv_bytes": peak,
        "final_kv_bytes": cache_nbytes(cache),
        "kv_checks": n_checks,
        "forwards": step,
        "segments": scores.segments,
        "cache_type": type(cache).__name__,
    }


def evaluate_perplexity(
    model,
    input_ids: torch.Tensor,
    *,
    policy=None,
    policy_name: str | None = None,
    mode: str = "token",
    chunk_size: int = 512,
    prefill: int = 0,
    score_from: int = 1,
    feed_last: bool = False,
    measure_bits: bool = False,
    cache: str | Callable[[], Any] = "kvpress",
    kv_check_every: int = 32,
    segment_tokens: int = 1024,
    progress: bool = False,
    model_name: str = "",
    text_source: str = "",
) -> PerplexityResult:
    """Perplexity of ``input_ids`` under ``policy`` (a :class:`kvpress.policies.Policy`, a storage spec such as
    :class:`~kvpress.quant.KVQuant`, or ``None``).

    ``cache="kvpress"`` patches the model with :func:`kvpress.patch` (``policy=None`` gives the uncompressed
    KVPressCache); ``cache="dynamic"`` runs the unpatched model with a transformers ``DynamicCache`` (the
    uncompressed reference, cheapest in chunked mode: with nothing evicted, chunked and token-by-token
    teacher forcing compute the same thing up to float rounding); a callable builds a transformers cache.
    ``score_from`` / ``feed_last``: see :func:`score_through_cache`. ``measure_bits``: also report the effective
    bits per key/value element (:func:`kvpress.eval.kv_bytes.effective_bits`) at the end and their mean over the
    states after each forward that starts at or after ``prefill``.
    """
    label = policy_name or (getattr(policy, "name", type(policy).__name__) if policy is not None else "none")
    bits: list[float] = []
    on_forward = None
    if measure_bits:
        from kvpress.eval.kv_bytes import effective_bits

        config = model.config.get_text_config(decoder=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (input_ids.shape[0], config.num_key_value_heads, head_dim)

        def on_forward(kv: Any, start: int, stop: int) -> None:
            if start >= prefill:
                bits.append(effective_bits(kv, *shape))

    with open_cache(model, policy, cache=cache) as kv:
        stats = score_through_cache(
            model,
            input_ids,
            kv,
            mode=mode,
            chunk_size=chunk_size,
            prefill=prefill,
            score_from=score_from,
            feed_last=feed_last,
            on_forward=on_forward,
            kv_check_every=kv_check_every,
            segment_tokens=segment_tokens,
            progress=progress,
            desc=f"{label} [{mode}]",
        )
    mean_nll = stats["nll_sum"] / stats["tokens_scored"]
    notes = [
        f"peak_kv_bytes sampled every {kv_check_every} forwards, after the first and after the last "
        f"({stats['kv_checks']} reads of {stats['forwards']} forwards); bytes held between forwards",
    ]
    if mode == "token" and policy is not None and hasattr(policy, "every_chunk"):
        notes.append(
            "a prefill policy compresses only the first forward: in token mode only the prefill chunk "
            f"({prefill} tokens) is compressed, later tokens accumulate"
        )
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        tokens_scored=stats["tokens_scored"],
        tokens_total=stats["tokens_total"],
        seconds=stats["seconds"],
        tokens_per_second=stats["tokens_scored"] / stats["seconds"] if stats["seconds"] > 0 else float("inf"),
        peak_kv_bytes=stats["peak_kv_bytes"],
        final_kv_bytes=stats["final_kv_bytes"],
        mode=mode,
        chunk_size=chunk_size if mode == "chunked" else None,
        prefill_tokens=prefill,
        kv_check_every=kv_check_every,
        cache=stats["cache_type"],
        policy=label,
        policy_params=policy.params() if policy is not None else {},
        model=model_name,
        text_source=text_source,
        segments=stats["segments"],
        notes=notes,
        effective_bits=bits[-1] if bits else None,
        mean_effective_bits=sum(bits) / len(bits) if bits else None,
    )


def full_forward_perplexity(model, input_ids: torch.Tensor) -> float:
    """Reference perplexity from one cache-less forward over the whole text (short texts only)."""
    with torch.inference_mode():
        logits = model(input_ids=input_ids[:, :-1], use_cache=False).logits[0]
        return math.exp(float(F.cross_entropy(logits.float(), input_ids[0, 1:]).double()))
