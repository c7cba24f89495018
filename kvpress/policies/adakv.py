"""AdaKV (Feng et al., 2024): one budget per layer, shared by its heads and allocated jointly by score."""

from __future__ import annotations

from typing import Any

import torch

from kvpress.context import LayerContext
from kvpress.policies.base import ScorePolicy, check_fraction, keep_count, keep_topk


class AdaKV(ScorePolicy):
    """Wrap a :class:`ScorePolicy`: each layer keeps as many tokens in total as the uniform policy would, but
    the heads compete for them, so heads whose attention is spread keep more and peaky heads fewer.

    Per row, every head first keeps its ``floor`` share (``floor`` x the uniform per-head budget, by its own
    scores: the paper's safeguard), then the rest of the layer's budget goes to the highest-scoring remaining
    tokens of any head. Heads end with different lengths: the layer is stored ragged (no padding held), so the
    saving is in bytes, not a mask.

    Args:
        scorer: the scoring policy (its own ratio is not used: this wrapper's ``compression_ratio``/``budget``
            set the layer budget).
        compression_ratio / budget: per-head budget of the uniform policy; the layer keeps heads x that.
        floor: fraction of the uniform per-head budget every head keeps, in [0, 1].
    """

    name = "adakv"
    needs_ragged = True

    def __init__(
        self,
        scorer: ScorePolicy,
        compression_ratio: float | None = None,
        budget: int | None = None,
        floor: float = 0.2,
    ):
        super().__init__(compression_ratio=compression_ratio, budget=budget)
        if not isinstance(scorer, ScorePolicy):
            raise ValueError(f"scorer must be a kvpress ScorePolicy (e.g. SnapKV()), got {scorer!r}")
        self.scorer = scorer
        self.floor = check_fraction("floor", floor)
        self.reposition = scorer.reposition
        self.wants_attention_mass = getattr(scorer, "wants_attention_mass", False)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return self.scorer.score(ctx)

    def observe(self, ctx: LayerContext) -> None:
        self.scorer.observe(ctx)

    def keep_from_scores(
        self, scores: torch.Tensor, valid: torch.Tensor, layer_idx: int, num_layers: int
    ) -> torch.Tensor | None:
        n_real = valid.sum(-1)
        per_head = keep_count(n_real, self.compression_ratio, self.budget)  # [batch, heads]
        if bool((per_head == n_real).all()):
            return None
        scores = scores.float().masked_fill(~valid, float("-inf"))
        floor = (per_head.double() * self.floor).ceil().long().minimum(per_head)
        guaranteed = keep_topk(scores, floor) & valid
        batch, heads, seq = scores.shape
        pooled = scores.masked_fill(guaranteed, float("inf")).reshape(batch, 1, heads * seq)
        layer_budget = per_head.sum(-1, keepdim=True)  # [batch, 1]
        return keep_topk(pooled, layer_budget).reshape(batch, heads, seq) & valid

    def params(self) -> dict[str, Any]:
        return {"scorer": repr(self.scorer), **super().params(), "floor": self.floor}
