"""SnapKV (Li et al., 2024): score the prompt by the attention of its last queries, at the end of prefill."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kvpress.context import LayerContext
from kvpress.policies.base import ScorePolicy, check_int


class SnapKV(ScorePolicy):
    """Keep the tokens the observation window (the last ``window`` queries) attends to most.

    Score of a token = softmax attention from the window's queries, averaged over the window, smoothed by a
    1-D average pool of width ``kernel_size`` (neighbours of an important token matter too), then averaged over
    the query heads that share each KV head (GQA-aware: one decision per KV head). The window itself is always
    kept.
    """

    name = "snapkv"

    def __init__(
        self,
        compression_ratio: float | None = None,
        budget: int | None = None,
        window: int = 32,
        kernel_size: int = 5,
        every_chunk: bool = False,
    ):
        super().__init__(compression_ratio=compression_ratio, budget=budget, every_chunk=every_chunk)
        self.window = check_int("window", window, 1)
        self.kernel_size = check_int("kernel_size", kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        window = min(self.window, ctx.queries.shape[2])
        probs = ctx.attention_probs(last_n=window)  # [batch, kv_heads, groups, window, seq]
        scores = probs.mean(dim=3)  # [batch, kv_heads, groups, seq]
        if self.kernel_size > 1:
            b, h, g, s = scores.shape
            scores = F.avg_pool1d(
                scores.reshape(b * h * g, 1, s), self.kernel_size, stride=1, padding=self.kernel_size // 2,
                count_include_pad=False,
            ).reshape(b, h, g, s)
        scores = scores.mean(dim=2)
        in_window = ctx.positions >= ctx.seq_len - window
        return scores.masked_fill(in_window, float("inf"))

    def params(self) -> dict[str, Any]:
        return {**super().params(), "window": self.window, "kernel_size": self.kernel_size}
