"""Haystack material: the repeated noise line, real prose, and needle-inserting helpers."""

from __future__ import annotations

import bisect
import functools
import random
import re
from typing import Sequence

from kvpress.eval.tasks.words import ADJECTIVES, NOUNS

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."


def random_key(rng: random.Random) -> str:
    """A two-word key such as ``"brave-lantern"``."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def distinct(draw, n: int, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` distinct results of ``draw()`` that are not in ``exclude``."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        item = draw()
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_sentences(text: str, min_chars: int = 20, max_chars: int = 250) -> list[str]:
    """Whitespace-normalised sentences of ``text``, keeping those of [min_chars, max_chars] characters that are
    mostly letters (tables and code listings of documentation text are dropped)."""
    text = " ".join(text.split())
    return [
        s for s in _SENTENCE_END.split(text)
        if min_chars <= len(s) <= max_chars and sum(c.isalpha() or c.isspace() for c in s) >= 0.85 * len(s)
    ]


@functools.lru_cache(maxsize=4)
def prose_sentences(path: str | None = None) -> tuple[str, ...]:
    """Sentences of a text file, or of the Python documentation topics shipped with the standard library."""
    from kvpress.eval.text import load_text

    text, _ = load_text(path)  # split_sentences normalises whitespace: the topics' separator does not matter
    sentences = split_sentences(text)
    # Prose that talks about magic numbers would be a needle itself.
    sentences = [s for s in sentences if "magic number" not in s.lower()]
    if len(sentences) < 50:
        raise ValueError(f"haystack text {path or 'pydoc_data.topics'} has too few sentences ({len(sentences)})")
    return tuple(sentences)


def prose_units(n: int, start: int, path: str | None = None) -> list[str]:
    """``n`` consecutive sentences starting at sentence ``start`` (wrapping around the text)."""
    sentences = prose_sentences(path)
    return [sentences[(start + i) % len(sentences)] for i in range(n)]


def insert_at_depths(units: Sequence[str], items: Sequence[tuple[float, str]], sep: str = " ") -> str:
    """Join ``units`` with ``sep``, inserting each ``(depth, text)`` at the unit boundary nearest to
    ``depth`` (0 = start, 1 = end) of the haystack's characters. Items at one boundary keep their order."""
    bounds = [0]
    for unit in units:
        bounds.append(bounds[-1] + len(unit) + len(sep))
    total = bounds[-1]
    inserts: dict[int, list[str]] = {}
    for depth, text in items:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        target = depth * total
        i = bisect.bisect_left(bounds, target)
        if i > 0 and (i == len(bounds) or target - bounds[i - 1] <= bounds[i] - target):
            i -= 1
        inserts.setdefault(i, []).append(text)
    pieces: list[str] = []
    for i in range(len(units) + 1):
        pieces.extend(inserts.get(i, ()))
        if i < len(units):
            pieces.append(units[i])
    return sep.join(pieces)
