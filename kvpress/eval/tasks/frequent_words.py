"""Frequent-words extraction (RULER's FWE): coded words drawn from a Zipf law; name the ``top_k`` most frequent.

The text is ``n`` words sampled with probability proportional to ``1 / rank**alpha`` from a vocabulary of
random lower-case codes; the references are the ``top_k`` most frequent words of the rendered text.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from dataclasses import dataclass

from kvpress.eval.tasks.base import Rendered, Task
from kvpress.eval.tasks.haystack import distinct


@dataclass
class _State:
    vocab: list[str]
    sub_seed: int


class FrequentWords(Task):
    instruction = (
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words."
    )
    max_new_tokens = 40

    def __init__(self, name: str = "fwe", description: str = "", top_k: int = 3, alpha: float = 2.0,
                 vocab_size: int = 200):
        self.name = name
        self.description = description or f"frequent-words extraction: the {top_k} most frequent Zipf-coded words"
        self.top_k, self.alpha, self.vocab_size = top_k, alpha, vocab_size
        self.min_units = 8 * top_k
        if top_k != 3:
            self.instruction = self.instruction.replace("three", str(top_k))

    def config(self) -> dict:
        return {**super().config(), "top_k": self.top_k, "alpha": self.alpha, "vocab_size": self.vocab_size}

    def draw(self, rng: random.Random, depth: float | None) -> _State:
        vocab = distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 6))), self.vocab_size)
        # No code may contain another one: substring scoring must not credit a wrong word.
        vocab = [w for w in vocab if not any(w != o and w in o for o in vocab)]
        return _State(vocab, rng.randrange(2**31))

    def words(self, state: _State, n: int) -> list[str]:
        weights = [1.0 / (rank**self.alpha) for rank in range(1, len(state.vocab) + 1)]
        return random.Random(state.sub_seed).choices(state.vocab, weights=weights, k=n)

    def render(self, state: _State, n_units: int) -> Rendered:
        words = self.words(state, n_units)
        ranked = Counter(words).most_common()
        references = [w for w, _ in ranked[: self.top_k]]
        context = " ".join(words)
        question = (
            f"Question: Do not provide any explanation. What are the {self.top_k} most frequently appeared words "
            "in the above coded text?"
        )
        answer_prefix = f"Answer: According to the coded text above, the {self.top_k} most frequently appeared words are:"
        return Rendered(context, question, answer_prefix, references, [])
