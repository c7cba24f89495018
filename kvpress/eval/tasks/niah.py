"""Needle-in-a-haystack retrieval (RULER's NIAH family).

Needles read "One of the special magic numbers for {key} is: {value}." and hide in a haystack of a
repeated noise line, of real prose, or of other needles only. Variants: one needle; several keys with one
queried (the others distract); several values of the queried key (all are required); several queried keys.
The first queried needle sits at ``depth`` (random when not given); other needles at random depths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvpress.eval.tasks.base import Rendered, Task
from kvpress.eval.tasks.haystack import (
    NEEDLE,
    NOISE,
    distinct,
    insert_at_depths,
    prose_sentences,
    prose_units,
    random_key,
    random_number,
)

HAYSTACKS = ("noise", "prose", "needles")


@dataclass
class _State:
    queried: list[str]
    values: dict[str, list[str]]
    needles: list[tuple[float, str]]
    sub_seed: int
    prose_start: int


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class NeedleTask(Task):
    instruction = (
        "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about the numbers afterwards."
    )
    uses_depth = True

    def __init__(
        self,
        name: str,
        description: str,
        haystack: str = "noise",
        num_keys: int = 1,
        num_values: int = 1,
        num_queries: int = 1,
        haystack_file: str | None = None,
        max_new_tokens: int | None = None,
    ):
        if haystack not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
        if not 1 <= num_queries <= num_keys or num_values < 1:
            raise ValueError("need 1 <= num_queries <= num_keys and num_values >= 1")
        self.name, self.description = name, description
        self.haystack, self.haystack_file = haystack, haystack_file
        self.num_keys, self.num_values, self.num_queries = num_keys, num_values, num_queries
        answers = num_queries * num_values
        self.max_new_tokens = max_new_tokens or (24 if answers == 1 else 16 + 12 * answers)
        self.min_units = 1 if haystack == "needles" else 2

    def config(self) -> dict:
        return {
            **super().config(), "haystack": self.haystack, "haystack_file": self.haystack_file,
            "num_keys": self.num_keys, "num_values": self.num_values, "num_queries": self.num_queries,
        }

    def draw(self, rng: random.Random, depth: float | None) -> _State:
        keys = distinct(lambda: random_key(rng), self.num_keys)
        queried = keys[: self.num_queries]
        values: dict[str, list[str]] = {}
        for key in keys:
            count = self.num_values if key in queried else 1
            values[key] = distinct(lambda: random_number(rng), count, exclude=[v for vs in values.values() for v in vs])
        needles = [(rng.random(), NEEDLE.format(key=key, value=value)) for key in keys for value in values[key]]
        if depth is not None:
            needles[0] = (depth, needles[0][1])
        start = rng.randrange(len(prose_sentences(self.haystack_file))) if self.haystack == "prose" else 0
        return _State(queried, values, needles, rng.randrange(2**31), start)

    def _units(self, state: _State, n: int) -> list[str]:
        if self.haystack == "noise":
            return [NOISE] * n
        if self.haystack == "prose":
            return prose_units(n, state.prose_start, self.haystack_file)
        rng = random.Random(state.sub_seed)  # distractor needles, the same first ones for every n
        taken = set(state.values)
        units = []
        for _ in range(n):
            key = distinct(lambda: random_key(rng), 1, exclude=taken)[0]
            taken.add(key)
            units.append(NEEDLE.format(key=key, value=random_number(rng)))
        return units

    def render(self, state: _State, n_units: int) -> Rendered:
        context = insert_at_depths(self._units(state, n_units), state.needles)
        keys = _join(state.queried)
        if len(state.queried) == 1 and self.num_values == 1:
            question = f"What is the special magic number for {keys} mentioned in the provided text?"
            answer_prefix = f"The special magic number for {keys} mentioned in the provided text is"
        else:
            question = f"What are all the special magic numbers for {keys} mentioned in the provided text?"
            answer_prefix = f"The special magic numbers for {keys} mentioned in the provided text are"
        references = [v for key in state.queried for v in state.values[key]]
        return Rendered(context, question, answer_prefix, references, [text for _, text in state.needles],
                        needle_depth=state.needles[0][0])
