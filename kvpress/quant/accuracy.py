"""Accuracy probes of a KV cache: perplexity through the cache and a needle-retrieval score.

Used by ``benchmarks/quant_accuracy.py`` and the slow tests. Text comes from the standard library
(``pydoc_data.topics``), so nothing is downloaded.

Perplexity through the cache (teacher forcing): the first ``prefill`` tokens go in one forward, the rest in
forwards of ``chunk`` tokens, each reading the cache as stored (plus its own tokens, attended exactly, as a
decoding step attends its own token) and appending to it. Only the tokens after the prefill are scored, so every
scored token was predicted by a forward that read the compressed cache. ``chunk=1`` is token-by-token decoding.
Bytes: ``kv_bytes`` / ``effective_bits`` are what the cache holds at the end; ``mean_effective_bits`` averages
the effective bits after each scored forward, since caches with a full-precision window (kvpress' residual,
transformers' ``QuantizedCache`` residual) hold more or fewer exact tokens depending on where the end falls in
their flush cycle.

Needle: a sentence ``The secret number is NNNNN.`` is hidden at several depths of a haystack; the haystack goes
in one forward (the cache stores it), the question plus the start of the answer (``The secret number is``) in a
second forward that reads the compressed haystack, then greedy decoding. Scores: the fraction of trials whose
answer starts with the number, and the mean log-probability per token of the number's tokens (teacher-forced
from a copy of the same cache; less noisy than the accuracy for a 135M-parameter model).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from kvpress.compat import cache_kwargs

CacheFactory = Callable[[], Any]  # builds an empty transformers Cache (e.g. a QuantizedCache) for a baseline


def haystack_text() -> str:
    """Plain English/Python prose from the standard library's pydoc topics (about 460k characters)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@contextlib.contextmanager
def _cache_for(model, policy: Any, cache_factory: CacheFactory | None) -> Iterator[Any]:
    """An empty cache: a transformers baseline cache, or a kvpress cache under ``patch(model, policy)``."""
    if cache_factory is not None:
        yield cache_factory()
        return
    import kvpress

    with kvpress.patch(model, policy) as session:
        yield session.new_cache()


def cache_bytes(cache: Any) -> int:
    """Bytes held by a cache: kvpress caches report them; for others, every tensor reachable from each layer."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    seen: set[int] = set()
    total = 0
    for layer in cache.layers:
        for t in _reachable_tensors(vars(layer)):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _reachable_tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if depth > 4:
        return
    if isinstance(obj, torch.Tensor):
        inner = getattr(obj, "__tensor_flatten__", None)
        if inner is not None and type(obj) is not torch.Tensor:  # tensor subclasses (quanto) hold inner tensors
            names, _ = inner()
            for name in names:
                yield from _reachable_tensors(getattr(obj, name), depth + 1)
        else:
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _reachable_tensors(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _reachable_tensors(v, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        yield from _reachable_tensors(vars(obj), depth + 1)


def cache_elements(cache: Any, batch: int, kv_heads: int, head_dim: int) -> int:
    """K and V elements the cache represents (tokens held x kv heads x head_dim x 2), over every layer."""
    total = 0
    for layer in cache.layers:
        storage = getattr(layer, "storage", None)
        if storage is not None:  # kvpress: what each head really holds
            total += int(storage.lengths().sum()) * head_dim * 2 if layer.is_initialized else 0
        else:
            total += batch * kv_heads * layer.get_seq_length() * head_dim * 2
    return total


def _kv_shape(model) -> tuple[int, int]:
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_key_value_heads, head_dim


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood (nats) of the scored tokens
    n_scored: int
    kv_bytes: int  # held at the end
    effective_bits: float  # at the end
    mean_effective_bits: float = 0.0  # mean over the states after each forward past the prefill


@torch.no_grad()
def cache_perplexity(
    model,
    ids: torch.Tensor,
    prefill: int,
    chunk: int = 16,
    policy: Any = None,
    cache_factory: CacheFactory | None = None,
) -> PerplexityResult:
    """Teacher-forced perplexity of ``ids`` ``[1, n]`` through a cache (see the module docstring)."""
    n = ids.shape[1]
    if not 0 < prefill < n:
        raise ValueError(f"prefill must be in (0, {n}), got {prefill}")
    nll = torch.zeros((), dtype=torch.float64)
    kv_shape = _kv_shape(model)
    step_bits: list[float] = []
    with _cache_for(model, policy, cache_factory) as cache:
        logits = model(ids[:, :prefill], **cache_kwargs(model, cache), use_cache=True).logits[:, -1:]
        start = prefill
        while start < n:
            stop = min(start + chunk, n)
            targets = ids[:, start:stop]
            # logits predicting ids[start:stop]: the last one of the previous forward, then this forward's
            out = model(targets, **cache_kwargs(model, cache), use_cache=True).logits
            pred = torch.cat([logits, out[:, :-1]], dim=1)
            nll += torch.nn.functional.cross_entropy(pred[0].double(), targets[0], reduction="sum")
            logits = out[:, -1:]
            start = stop
            kv_bytes = cache_bytes(cache)
            elements = cache_elements(cache, ids.shape[0], *kv_shape)
            step_bits.append(8.0 * kv_bytes / max(elements, 1))
    scored = n - prefill
    mean = float(nll) / scored
    return PerplexityResult(math.exp(mean), mean, scored, kv_bytes, step_bits[-1], sum(step_bits) / len(step_bits))


@dataclass
class NeedleResult:
    accuracy: float  # fraction of trials whose greedy answer starts with the number
    logprob: float  # mean log-probability per token of the number (teacher-forced)
    answers: list[str]


def _needle_prompts(tokenizer, n_trials: int, haystack_tokens: int, seed: int) -> list[tuple[list[int], list[int], str]]:
    text = haystack_text()
    rng = random.Random(seed)
    prompts = []
    for trial in range(n_trials):
        start = rng.randrange(0, len(text) // 2)
        hay_ids = tokenizer(text[start:start + haystack_tokens * 8]).input_ids[:haystack_tokens]
        hay = tokenizer.decode(hay_ids)
        number = str(rng.randint(10000, 99999))
        depth = (trial + 0.5) / n_trials
        cut = hay.rfind("\n", 0, int(len(hay) * depth))
        cut = cut if cut > 0 else int(len(hay) * depth)
        context = hay[:cut] + f"\nThe secret number is {number}.\n" + hay[cut:]
        question = "\n\nWhat is the secret number in the text above? Answer with the number only."
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + question}], add_generation_prompt=True, tokenize=False
        ) + "The secret number is"
        split = full.index(question)
        first = tokenizer(full[:split], add_special_tokens=False).input_ids
        second = tokenizer(full[split:], add_special_tokens=False).input_ids
        prompts.append((first, second, number))
    return prompts


@torch.no_grad()
def needle_score(
    model,
    tokenizer,
    policy: Any = None,
    cache_factory: CacheFactory | None = None,
    n_trials: int = 4,
    haystack_tokens: int = 600,
    max_new_tokens: int = 8,
    seed: int = 0,
) -> NeedleResult:
    """Needle retrieval through a cache (see the module docstring)."""
    correct, logprobs, answers = 0, [], []

    def prompt(cache: Any, first: list[int], second: list[int]) -> torch.Tensor:
        model(torch.tensor([first]), **cache_kwargs(model, cache), use_cache=True)
        return model(torch.tensor([second]), **cache_kwargs(model, cache), use_cache=True).logits[:, -1]

    for first, second, number in _needle_prompts(tokenizer, n_trials, haystack_tokens, seed):
        answer_ids = tokenizer(" " + number, add_special_tokens=False).input_ids
        with _cache_for(model, policy, cache_factory) as cache:
            logits = prompt(cache, first, second)
            try:
                forced = copy.deepcopy(cache)
            except RuntimeError:  # some backends' tensors (quanto) cannot be copied: replay the prompt
                forced = cache_factory() if cache_factory is not None else None
                if forced is None:
                    raise
                prompt(forced, first, second)
            out = model(torch.tensor([answer_ids[:-1]]), **cache_kwargs(model, forced), use_cache=True).logits[0]
            del forced
            pred = torch.cat([logits, out], dim=0)
            lp = torch.log_softmax(pred.double(), -1).gather(-1, torch.tensor(answer_ids).view(-1, 1))
            logprobs.append(float(lp.mean()))
            generated: list[int] = []
            for _ in range(max_new_tokens):
                nxt = int(logits.argmax(-1))
                if nxt == tokenizer.eos_token_id:
                    break
                generated.append(nxt)
                logits = model(torch.tensor([[nxt]]), **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
        text = tokenizer.decode(generated)
        answers.append(text)
        correct += int(text.strip().replace(",", "").startswith(number))
    n = max(len(answers), 1)
    return NeedleResult(correct / n, sum(logprobs) / n, answers)
