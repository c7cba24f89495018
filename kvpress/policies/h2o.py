"""H2O (Zhang et al., 2023): heavy hitters by attention mass accumulated over every query seen, plus recent tokens."""

from __future__ import annotations

from typing import Any

import torch

from kvpress.context import LayerContext
from kvpress.policies.base import ScorePolicy, check_int, keep_topk, recent_mask

_MASS = "h2o.mass"
_BUDGET = "h2o.budget"


class H2O(ScorePolicy):
    """Keep the ``window`` most recent tokens and the heavy hitters: the tokens that received the most attention
    mass, summed over every query so far (prefill queries and every decoding step) and over the query heads of
    each KV head (GQA).

    The budget is fixed at prefill (``compression_ratio`` of the prompt's real tokens, or ``budget`` tokens) and
    enforced at every later step, so the cache stays at the budget for unbounded generation. Accumulated mass
    lives in the layer's policy state, aligned to the held slots whatever evicted them. Prefill column sums are
    computed ``chunk_size`` queries at a time from queries and keys (no ``[q, k]`` matrix, any attention
    implementation).

    Args:
        compression_ratio / budget: as for every :class:`ScorePolicy`.
        window: recent tokens always kept; default half the budget (the paper's even split).
        chunk_size: queries per chunk when summing prefill attention.
    """

    name = "h2o"
    wants_attention_mass = True

    def __init__(
        self,
        compression_ratio: float | None = None,
        budget: int | None = None,
        window: int | None = None,
        chunk_size: int = 256,
    ):
        super().__init__(compression_ratio=compression_ratio, budget=budget)
        self.window = None if window is None else check_int("window", window, 0)
        self.chunk_size = check_int("chunk_size", chunk_size, 1)

    def observe(self, ctx: LayerContext) -> None:
        mass = ctx.recall(_MASS)
        if ctx.attention_mass is not None:  # computed with the attention output (see kvpress.attention_mass)
            mass += ctx.attention_mass
        else:
            for _, probs in ctx.iter_attention_probs(self.chunk_size):
                mass[..., : probs.shape[-1]] += probs.sum(dim=(2, 3))  # the group's query heads, chunk's queries
        ctx.remember(_MASS, mass)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return ctx.recall(_MASS)

    def applies_to(self, ctx: LayerContext) -> bool:
        return True  # accumulates, and holds the budget, at every step

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        self.observe(ctx)
        n_real = ctx.real_tokens
        budget = self.held_budget(ctx, _BUDGET).minimum(n_real)
        if bool((n_real <= budget).all()):
            return None
        valid = ctx.key_valid
        window = budget // 2 if self.window is None else budget.clamp(max=self.window)
        recent = recent_mask(valid, window)
        heavy = self.score(ctx).masked_fill(~valid | recent, float("-inf"))
        keep = keep_topk(heavy, (budget - window).clamp(min=0)) & valid & ~recent
        return keep | recent

    def max_held(self) -> int | None:
        return self.budget  # a fixed budget is held at every step; a ratio's depends on the prompt

    def params(self) -> dict[str, Any]:
        out = {**super().params(), "chunk_size": self.chunk_size}
        if self.window is not None:
            out["window"] = self.window
        return out
