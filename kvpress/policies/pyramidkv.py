"""PyramidKV (Cai et al., 2024): per-layer budgets that shrink with depth, the same total as uniform."""

from __future__ import annotations

from typing import Any

import torch

from kvpress.context import LayerContext
from kvpress.policies.base import ScorePolicy, check_int, keep_count, keep_topk


def pyramid_budgets(mean_keep: torch.Tensor, n_real: torch.Tensor, num_layers: int, beta: int) -> torch.Tensor:
    """Per-layer keep counts ``[num_layers, *mean_keep.shape]`` decreasing linearly with depth.

    The profile runs from ``2k - k/beta`` at the first layer to ``k/beta`` at the last (``k`` = ``mean_keep``),
    so its mean is ``k``. Layers that would keep more than they hold are capped at ``n_real`` and their excess is
    spread over the others in proportion to their budgets, so the total stays ``num_layers * k`` whenever it can.
    """
    k = mean_keep.double()
    n = n_real.double()
    low = k / beta
    high = 2 * k - low
    depth = torch.arange(num_layers, dtype=torch.float64).view(-1, *([1] * k.dim())) / max(1, num_layers - 1)
    budgets = high - (high - low) * depth
    total = k * num_layers
    capped = torch.zeros_like(budgets, dtype=torch.bool)
    for _ in range(num_layers):
        capped = capped | (budgets >= n)
        budgets = torch.where(capped, n.expand_as(budgets), budgets)
        free = (~capped) * budgets
        room = total - (capped * n).sum(0)
        scale = torch.where(free.sum(0) > 0, room / free.sum(0).clamp(min=1e-9), torch.ones_like(room))
        budgets = torch.where(capped, budgets, budgets * scale)
        if not bool((budgets > n).any()):
            break
    return budgets.floor().long().clamp(min=1).minimum(n_real.long())


class PyramidKV(ScorePolicy):
    """Wrap a :class:`ScorePolicy` with pyramid-shaped budgets: lower layers (broad attention) keep more, upper
    layers (focused attention) fewer, with the same total as the uniform policy at ``compression_ratio``.

    Args:
        scorer: the scoring policy (its own ratio is not used).
        compression_ratio / budget: the mean per-head budget over layers.
        beta: the last layer keeps ``1/beta`` of the mean budget (the paper's default 20).
    """

    name = "pyramidkv"

    def __init__(
        self,
        scorer: ScorePolicy,
        compression_ratio: float | None = None,
        budget: int | None = None,
        beta: int = 20,
    ):
        super().__init__(compression_ratio=compression_ratio, budget=budget)
        if not isinstance(scorer, ScorePolicy):
            raise ValueError(f"scorer must be a kvpress ScorePolicy (e.g. SnapKV()), got {scorer!r}")
        self.scorer = scorer
        self.beta = check_int("beta", beta, 1)
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
        mean_keep = keep_count(n_real, self.compression_ratio, self.budget)
        n_keep = pyramid_budgets(mean_keep, n_real, num_layers, self.beta)[layer_idx]
        if bool((n_keep == n_real).all()):
            return None
        return keep_topk(scores.float().masked_fill(~valid, float("-inf")), n_keep) & valid

    def params(self) -> dict[str, Any]:
        return {"scorer": repr(self.scorer), **super().params(), "beta": self.beta}
