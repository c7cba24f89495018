"""A needle-retrieval probe through any KV cache (kvpress or a transformers baseline such as ``QuantizedCache``),
used by ``benchmarks/quant_accuracy.py`` with :func:`kvpress.eval.perplexity.evaluate_perplexity` (``measure_bits``).

A sentence ``The secret number is NNNNN.`` is hidden at evenly spaced depths of a haystack of the evaluation text
(:func:`kvpress.eval.text.default_text`); the haystack goes in one forward (the cache stores it), the question
plus the start of the answer (``The secret number is``) in a second forward that reads the compressed haystack,
then greedy decoding. Scores: the fraction of trials whose answer starts with the number, and the mean
log-probability per token of the number's tokens (teacher-forced from a copy of the same cache; less noisy than
the accuracy for a 135M-parameter model).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvpress.compat import cache_kwargs
from kvpress.eval.perplexity import open_cache
from kvpress.eval.text import default_text

CacheFactory = Callable[[], Any]  # builds an empty transformers Cache (e.g. a QuantizedCache) for a baseline


@dataclass
class NeedleResult:
    accuracy: float  # fraction of trials whose greedy answer starts with the number
    logprob: float  # mean log-probability per token of the number (teacher-forced)
    answers: list[str]


def _needle_prompts(tokenizer, n_trials: int, haystack_tokens: int,
                    seed: int) -> list[tuple[list[int], list[int], str]]:
    text = default_text()
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
        with open_cache(model, policy, cache=cache_factory or "kvpress") as cache:
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
