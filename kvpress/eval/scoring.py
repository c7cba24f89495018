"""Scoring of generated answers: case-insensitive substring match against reference strings.

``string_match_all`` (RULER's metric for retrieval, tracking and extraction tasks): the fraction of the
references found in the prediction. ``string_match_part``: 1 if any reference is found. Both return a
fraction in [0, 1]; reports multiply averages by 100.
"""

from __future__ import annotations

from typing import Callable, Sequence


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` that occur (case-insensitively) in ``prediction``; 0 for no references."""
    if not references:
        return 0.0
    pred = _normalise(prediction)
    return sum(_normalise(ref) in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any of ``references`` occurs (case-insensitively) in ``prediction``, else 0.0."""
    pred = _normalise(prediction)
    return float(any(_normalise(ref) in pred for ref in references))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "all": string_match_all,
    "part": string_match_part,
}


def score(prediction: str, references: Sequence[str], metric: str = "all") -> float:
    """Score one prediction with the named metric (``"all"`` or ``"part"``)."""
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}") from None
    return fn(prediction, references)
