"""The evaluation text: one loader for every perplexity run, the prose haystacks and the quantization probes.

The default is the standard library's own prose: every ``pydoc`` help topic, in sorted topic order, joined by a
blank line (~465k characters, ~110k SmolLM2 tokens). It ships with every CPython, so it is available offline and
identical across machines of one Python version.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DEFAULT_TEXT_SOURCE = "pydoc_data.topics"


@functools.lru_cache(maxsize=1)
def default_text() -> str:
    """Every ``pydoc_data.topics`` help topic, sorted by name, joined by ``"\\n\\n"``."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def load_text(path: str | Path | None = None) -> tuple[str, str]:
    """``(text, source label)``: the file at ``path`` (UTF-8), or :func:`default_text` when ``None``."""
    if path is None:
        return default_text(), DEFAULT_TEXT_SOURCE
    return Path(path).read_text(encoding="utf-8", errors="replace"), str(path)


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """``[1, N]`` token ids of ``text`` (no special tokens added), cut to the first ``max_tokens``.

    With ``max_tokens`` only a prefix of the text is tokenized (grown until long enough), so a cap on a
    huge file does not tokenize the whole file.
    """
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (one token to read, one to predict), got {max_tokens}")
    n_chars = len(text) if max_tokens is None else min(len(text), 8 * max_tokens)
    while True:
        ids = tokenizer(text[:n_chars], add_special_tokens=False)["input_ids"]
        if max_tokens is None or len(ids) > max_tokens or n_chars >= len(text):
            break
        n_chars = min(len(text), 2 * n_chars)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    return torch.tensor([ids], dtype=torch.long)
