"""Common-words extraction (RULER's CWE): a numbered word list in which ``num_common`` words repeat often.

The common words appear ``freq_common`` times each, the others ``freq_rare`` times each; the haystack grows
by adding rare words. The answer must name every common word ("all" metric). Answer words are chosen so
that none is a substring of another word of the list (substring scoring would credit it wrongly).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvpress.eval.tasks.base import Rendered, Task
from kvpress.eval.tasks.words import COMMON_WORDS

# Words that contain no other word of the list and are contained in none: safe under substring scoring.
_SAFE = [w for w in COMMON_WORDS if not any(w != o and (w in o or o in w) for o in COMMON_WORDS)]


@dataclass
class _State:
    common: list[str]
    rare: list[str]
    shuffle_seed: int


class CommonWords(Task):
    instruction = "Below is a numbered list of words. In these words, some appear more often than others."
    max_new_tokens = 80

    def __init__(self, name: str = "cwe", description: str = "", num_common: int = 10, freq_common: int = 6,
                 freq_rare: int = 2):
        self.name = name
        self.description = description or (
            f"common-words extraction: name the {num_common} words repeated {freq_common}x in a numbered list"
        )
        self.num_common, self.freq_common, self.freq_rare = num_common, freq_common, freq_rare
        self.min_units = 0

    def config(self) -> dict:
        return {**super().config(), "num_common": self.num_common, "freq_common": self.freq_common,
                "freq_rare": self.freq_rare}

    def draw(self, rng: random.Random, depth: float | None) -> _State:
        common = rng.sample(_SAFE, self.num_common)
        rare = [w for w in COMMON_WORDS if w not in common]
        rng.shuffle(rare)
        return _State(common, rare, rng.randrange(2**31))

    def max_units(self, state: _State) -> int:
        return len(state.rare)

    def render(self, state: _State, n_units: int) -> Rendered:
        words = state.common * self.freq_common + state.rare[:n_units] * self.freq_rare
        random.Random(f"{state.shuffle_seed}|{n_units}").shuffle(words)
        context = "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1))
        question = f"Question: What are the {self.num_common} most common words in the above list?"
        answer_prefix = f"Answer: The top {self.num_common} words that appear most often in the list are:"
        return Rendered(context, question, answer_prefix, list(state.common), [])
