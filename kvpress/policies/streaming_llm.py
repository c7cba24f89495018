"""StreamingLLM (Xiao et al., 2023): attention sinks + a window of recent tokens, at every step."""

from __future__ import annotations

from typing import Any

import torch

from kvpress.context import LayerContext
from kvpress.policies.base import Policy, check_int


class StreamingLLM(Policy):
    """Keep the first ``n_sink`` tokens and the ``window`` most recent ones; evict everything between.

    Applied after every forward (prefill, extend and each decoding step), so each head holds at most
    ``n_sink + window`` tokens: a bounded cache for unbounded generation. With left padding, the sinks are the
    first *real* tokens of each row.

    ``reposition=True`` (the paper's method, default) attends at positions within the cache: the held tokens
    sit at ``0..held-1`` and a new token right after them, so distances never exceed ``n_sink + window`` however
    long the stream (see :mod:`kvpress.reposition`). ``reposition=False`` keeps the original positions: the
    distance to the sinks then grows with the text and passes the model's trained context on long streams.
    """

    name = "streaming_llm"

    def __init__(self, n_sink: int = 4, window: int = 1024, reposition: bool = True):
        self.n_sink = check_int("n_sink", n_sink, 0)
        self.window = check_int("window", window, 1)
        if not isinstance(reposition, bool):
            raise ValueError(f"reposition must be True or False, got {reposition!r}")
        self.reposition = reposition

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        valid = ctx.key_valid
        if ctx.num_cached <= self.n_sink + self.window and bool(valid.all()):
            return None
        rank_among_valid = valid.long().cumsum(dim=-1) - 1
        sinks = valid & (rank_among_valid < self.n_sink)
        recent = valid & (ctx.positions >= ctx.seq_len - self.window)
        keep = sinks | recent
        if bool(keep.all()):
            return None
        return keep

    def max_held(self) -> int:
        return self.n_sink + self.window

    def params(self) -> dict[str, Any]:
        return {"n_sink": self.n_sink, "window": self.window, "reposition": self.reposition}
