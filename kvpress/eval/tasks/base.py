"""Task interface: a seeded sample generator that sizes its prompt to a token budget.

A task draws its random content once per sample (:meth:`Task.draw`), then renders a context of ``n``
haystack units (:meth:`Task.render`). :meth:`Task.make_sample` searches the largest ``n`` for which
``tokens(prompt) + answer budget <= length`` in the tokenizer of the model under test, with the model's
chat template when it has one.

The prompt is kept in two token pieces so both evaluation modes see the same tokens:

* ``prefix_ids``: the chat header, the instruction and the context (no hint of the question);
* ``suffix_ids``: the question, the end of the user turn, the assistant header and an answer prefix.

Query-agnostic evaluation prefills (and compresses) ``prefix_ids`` before it sees ``suffix_ids``;
query-aware evaluation runs both in the first forward.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

SPLIT = "\u0000KVPRESS-QUESTION\u0000"


@dataclass
class Rendered:
    """One rendering of a sample's content with a given haystack size."""

    context: str
    question: str
    answer_prefix: str
    references: list[str]
    needles: list[str] = field(default_factory=list)  # strings the context must contain
    needle_depth: float | None = None  # where the (first queried) needle sits, for tasks that place one


@dataclass
class Sample:
    task: str
    index: int
    seed: int
    length: int  # target length in tokens (prompt + answer budget)
    depth: float | None  # the depth asked for (None: drawn at random per sample)
    prefix: str
    suffix: str
    prefix_ids: list[int]
    suffix_ids: list[int]
    references: list[str]
    metric: str
    max_new_tokens: int
    haystack_units: int
    needle_depth: float | None = None  # the depth actually used

    @property
    def prompt_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids)

    @property
    def context_tokens(self) -> int:
        return len(self.prefix_ids)

    def describe(self) -> dict[str, Any]:
        """The sample without its token ids (for result files)."""
        out = asdict(self)
        for key in ("prefix_ids", "suffix_ids", "prefix", "suffix"):
            out.pop(key)
        out["prompt_tokens"] = self.prompt_tokens
        return out


def build_prompt(tokenizer, instruction: str, context: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """``(prefix, suffix)`` prompt strings; with a chat template, the whole request is one user turn."""
    body = f"{instruction}\n\n{context}" if instruction else context
    user = f"{body}{SPLIT}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = user + "\n\n"
    if text.count(SPLIT) != 1:
        raise ValueError("the chat template did not keep the user message intact")
    prefix, suffix = text.split(SPLIT)
    return prefix, suffix + answer_prefix


def encode_prompt(tokenizer, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """Token ids of both prompt pieces; a template-less prompt gets the tokenizer's own special tokens."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    prefix_ids = tokenizer(prefix, add_special_tokens=not chat)["input_ids"]
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    return list(prefix_ids), list(suffix_ids)


class Task(ABC):
    """A synthetic task. Subclasses set the class attributes and implement :meth:`draw` / :meth:`render`."""

    name: str = "task"
    description: str = ""
    metric: str = "all"
    max_new_tokens: int = 32
    instruction: str = ""
    uses_depth: bool = False  # whether ``depth`` places something (needle tasks)
    min_units: int = 1

    @abstractmethod
    def draw(self, rng: random.Random, depth: float | None) -> Any:
        """Draw the random content of one sample (independent of its length in units)."""

    @abstractmethod
    def render(self, state: Any, n_units: int) -> Rendered:
        """Render the sample with ``n_units`` haystack units."""

    def max_units(self, state: Any) -> int | None:
        """Upper bound on haystack units (``None``: unbounded)."""
        return None

    def config(self) -> dict[str, Any]:
        """Parameters of this task (recorded in result files)."""
        return {"name": self.name, "metric": self.metric, "max_new_tokens": self.max_new_tokens}

    # ------------------------------------------------------------------ sample construction
    def make_sample(self, tokenizer, length: int, seed: int = 0, index: int = 0, depth: float | None = None) -> Sample:
        """Sample ``index`` of this task at ``length`` tokens (prompt + answer budget), fully determined by
        ``(task, seed, length, index, depth)``."""
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        rng = random.Random(f"{self.name}|{seed}|{length}|{index}|{depth}")
        state = self.draw(rng, depth)
        cache: dict[int, tuple[Rendered, str, str, list[int], list[int]]] = {}

        def build(n: int):
            if n not in cache:
                rendered = self.render(state, n)
                prefix, suffix = build_prompt(
                    tokenizer, self.instruction, rendered.context, rendered.question, rendered.answer_prefix
                )
                cache[n] = (rendered, prefix, suffix, *encode_prompt(tokenizer, prefix, suffix))
            return cache[n]

        def count(n: int) -> int:
            _, _, _, p, s = build(n)
            return len(p) + len(s)

        def fits(n: int) -> bool:
            return count(n) + self.max_new_tokens <= length

        lo = self.min_units
        if not fits(lo):
            raise ValueError(
                f"{self.name}: length {length} is too small; the shortest prompt takes {count(lo)} tokens "
                f"plus {self.max_new_tokens} answer tokens"
            )
        cap = self.max_units(state)
        # Tokens grow about linearly with units: jump to the estimate from two probes, then search locally
        # (gallop outwards from the last size that fits, bisect the last gap).
        probe = lo + 4 if cap is None else min(lo + 4, cap)
        if probe > lo and fits(probe):
            per_unit = (count(probe) - count(lo)) / (probe - lo)
            guess = lo + int((length - self.max_new_tokens - count(lo)) / max(per_unit, 1e-6))
            guess = guess if cap is None else min(guess, cap)
            lo = guess if guess > probe and fits(guess) else probe
        step = 1
        while (cap is None or lo + step <= cap) and fits(lo + step):
            lo += step
            step *= 2
        hi = lo + step if cap is None else min(lo + step, cap + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        rendered, prefix, suffix, prefix_ids, suffix_ids = build(lo)
        sample = Sample(
            task=self.name, index=index, seed=seed, length=length, depth=depth, prefix=prefix, suffix=suffix,
            prefix_ids=prefix_ids, suffix_ids=suffix_ids, references=list(rendered.references),
            metric=self.metric, max_new_tokens=self.max_new_tokens, haystack_units=lo,
            needle_depth=rendered.needle_depth,
        )
        self.check(sample, rendered)
        return sample

    def check(self, sample: Sample, rendered: Rendered) -> None:
        """Sanity checks every sample passes (raises ``AssertionError``, also under ``python -O``): references
        present, needles inside the context and not in the question, prompt + answer budget within the length."""
        _require(bool(sample.references) and all(r.strip() for r in sample.references), f"{self.name}: empty reference")
        for needle in rendered.needles:
            _require(needle in sample.prefix, f"{self.name}: needle {needle!r} missing from the context")
            _require(needle not in sample.suffix, f"{self.name}: needle {needle!r} leaked into the question")
        _require(sample.prompt_tokens + sample.max_new_tokens <= sample.length, f"{self.name}: prompt exceeds length")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
