"""A token budget held during decoding, for any score policy: bounded memory for long generations."""

from __future__ import annotations

from typing import Any

import torch

from kvpress.context import LayerContext
from kvpress.policies.base import (Policy, RatioSized, ScorePolicy, check_int, check_ratio, keep_topk, recent_mask,
                                   window_for_ratio)


class DecodingBudget(RatioSized, Policy):
    """Re-apply a :class:`ScorePolicy` while generating, so that no head ever holds more than
    ``budget + interval`` tokens.

    At prefill the wrapped policy compresses as it always does, then anything above ``budget`` is evicted by its
    scores. While decoding, every ``interval`` new tokens (when a head reaches ``budget + interval``) the heads are
    cut back to ``budget``: the ``window`` newest tokens, then the best by ``policy.score``. Between cuts,
    ``policy.observe`` runs at every step, so policies that accumulate (H2O) keep counting.

    Args:
        policy: the scoring policy.
        budget: tokens per head after each cut (>= 1).
        compression_ratio: instead of ``budget``: the budget is sized at the first forward on each fresh cache
            (``n`` tokens), to ``max(1, round(n * (1 - r)))``; :meth:`size_for` fixes it from a known length.
        interval: decoding steps between cuts (>= 1; 1 keeps the cache exactly at the budget).
        window: newest tokens always kept (< budget).
    """

    name = "decoding_budget"

    def __init__(self, policy: ScorePolicy, budget: int | None = None, interval: int = 1, window: int = 16,
                 compression_ratio: float | None = None):
        if not isinstance(policy, ScorePolicy):
            raise ValueError(f"policy must be a kvpress ScorePolicy (e.g. H2O(), SnapKV()), got {policy!r}")
        if (budget is None) == (compression_ratio is None):
            raise ValueError("give exactly one of budget or compression_ratio")
        self.policy = policy
        self.compression_ratio = None if compression_ratio is None else check_ratio("compression_ratio",
                                                                                    compression_ratio)
        self.interval = check_int("interval", interval, 1)
        self.window = check_int("window", window, 0)
        self.budget: int | None = None
        self._fixed = budget is not None
        if budget is not None:
            self._set_budget(check_int("budget", budget, 1))
        self.reposition = policy.reposition
        self.wants_attention_mass = getattr(policy, "wants_attention_mass", False)

    def _set_budget(self, budget: int) -> None:
        if self.window >= budget:
            raise ValueError(f"window must be smaller than budget ({budget}), got {self.window!r}")
        self.budget = budget

    def _size(self, n_tokens: int) -> None:
        self._set_budget(window_for_ratio(self.compression_ratio, n_tokens))

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        self.size_at(ctx, self.budget is None)
        keep = None
        if ctx.phase == "prefill" or (self.policy.every_chunk and ctx.phase == "extend"):
            keep = self.policy.select(ctx)  # its own prefill compression
        else:
            self.policy.observe(ctx)  # its memory only: this wrapper decides when to evict
        n_real = ctx.real_tokens if keep is None else (keep & ctx.key_valid).sum(-1)
        due = ctx.phase != "decode" or bool((n_real >= self.budget + self.interval).any())
        if not due or bool((n_real <= self.budget).all()):
            return keep
        valid = ctx.key_valid if keep is None else ctx.key_valid & keep
        recent = recent_mask(valid, self.window)
        scores = self.policy.score(ctx).float().masked_fill(~valid, float("-inf")).masked_fill(recent, float("inf"))
        return keep_topk(scores, n_real.clamp(max=self.budget)) & valid

    def max_held(self) -> int:
        return self.budget + self.interval

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": repr(self.policy), "budget": self.budget, "interval": self.interval,
                               "window": self.window}
        if self.compression_ratio is not None:
            out["compression_ratio"] = self.compression_ratio
        return out
