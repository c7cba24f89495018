"""Variable tracking (RULER's VT): chains of assignments hidden in noise; name every variable holding a value.

A chain reads ``VAR ABCDE = 12345.``, ``VAR FGHIJ = VAR ABCDE.``, ... (``num_hops`` re-assignments), its
statements spread in order through a noise haystack. Further chains with other values distract. The answer
must list every variable of the queried chain ("all" metric).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from kvpress.eval.tasks.base import Rendered, Task
from kvpress.eval.tasks.haystack import NOISE, distinct, insert_at_depths, random_number


@dataclass
class _State:
    chains: list[list[str]]  # chain 0 is queried
    values: list[str]
    placed: list[tuple[float, str]]


class VariableTracking(Task):
    instruction = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    max_new_tokens = 40

    def __init__(self, name: str = "vt", description: str = "", num_chains: int = 1, num_hops: int = 4):
        self.name, self.description = name, description or (
            f"variable tracking: {num_chains} chain(s) of {num_hops} hops in noise; name all variables of one value"
        )
        self.num_chains, self.num_hops = num_chains, num_hops
        self.min_units = 2

    def config(self) -> dict:
        return {**super().config(), "num_chains": self.num_chains, "num_hops": self.num_hops}

    def draw(self, rng: random.Random, depth: float | None) -> _State:
        size = self.num_hops + 1
        names = distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), self.num_chains * size)
        chains = [names[i * size:(i + 1) * size] for i in range(self.num_chains)]
        values = distinct(lambda: random_number(rng, 5), self.num_chains)
        placed: list[tuple[float, str]] = []
        for chain, value in zip(chains, values):
            depths = sorted(rng.random() for _ in chain)  # statements appear in assignment order
            statements = [f"VAR {chain[0]} = {value}."]
            statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
            placed += list(zip(depths, statements))
        return _State(chains, values, placed)

    def render(self, state: _State, n_units: int) -> Rendered:
        context = insert_at_depths([NOISE] * n_units, sorted(state.placed, key=lambda item: item[0]))
        value, chain = state.values[0], state.chains[0]
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        answer_prefix = (
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(chain)} variables "
            f"are assigned the value {value}, they are:"
        )
        return Rendered(context, question, answer_prefix, list(chain), [text for _, text in state.placed])
