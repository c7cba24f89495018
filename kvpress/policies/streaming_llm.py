"""StreamingLLM (Xiao et al., 2023): attention sinks + a window of recent tokens, at every step."""

from __future__ import annotations

from typing import Any

import torch

from kvpress.context import LayerContext
from kvpress.policies.base import Policy, RatioSized, check_int, check_ratio, window_for_ratio


class StreamingLLM(RatioSized, Policy):
    """Keep the first ``n_sink`` tokens and the ``window`` most recent ones; evict everything between.

    Applied after every forward (prefill, extend and each decoding step), so each head holds at most
    ``n_sink + window`` tokens: a bounded cache for unbounded generation. With left padding, the sinks are the
    first *real* tokens of each row.

    ``reposition=True`` (the paper's method, default) attends at positions within the cache: the held tokens
    sit at ``0..held-1`` and a new token right after them, so distances never exceed ``n_sink + window`` however
    long the stream (see :mod:`kvpress.reposition`). ``reposition=False`` keeps the original positions: the
    distance to the sinks then grows with the text and passes the model's trained context on long streams.

    ``compression_ratio`` (instead of ``window``, as in NVIDIA kvpress): the window is sized at the first forward
    on each fresh cache (``n`` tokens), to ``window = max(1, round(n * (1 - r)) - n_sink)``, so that the first
    forward keeps ``1 - r`` of its tokens; :meth:`size_for` fixes it from a known length instead.
    """

    name = "streaming_llm"
    size_parameters = ("compression_ratio", "window")

    def __init__(self, n_sink: int = 4, window: int | None = None, reposition: bool = True,
                 compression_ratio: float | None = None):
        if window is not None and compression_ratio is not None:
            raise ValueError("give either window or compression_ratio, not both")
        self.n_sink = check_int("n_sink", n_sink, 0)
        self.compression_ratio = None if compression_ratio is None else check_ratio("compression_ratio",
                                                                                    compression_ratio)
        self.window: int | None = None
        self._fixed = compression_ratio is None
        if compression_ratio is None:
            self.window = check_int("window", 1024 if window is None else window, 1)
        if not isinstance(reposition, bool):
            raise ValueError(f"reposition must be True or False, got {reposition!r}")
        self.reposition = reposition

    def _size(self, n_tokens: int) -> None:
        self.window = window_for_ratio(self.compression_ratio, n_tokens, self.n_sink)

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        self.size_at(ctx, self.window is None)
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
        out: dict[str, Any] = {"n_sink": self.n_sink, "window": self.window, "reposition": self.reposition}
        if self.compression_ratio is not None:
            out["compression_ratio"] = self.compression_ratio
        return out
