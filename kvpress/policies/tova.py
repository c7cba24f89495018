"""TOVA (Oren et al., 2024): at every step, drop the token the current query attends to least."""

from __future__ import annotations

import torch

from kvpress.context import LayerContext
from kvpress.policies.base import ScorePolicy, keep_topk

_BUDGET = "tova.budget"


class TOVA(ScorePolicy):
    """A fixed budget of tokens; whenever a head holds more, the ones with the lowest attention from the newest
    query are evicted (one per decoding step once the budget is reached).

    Attention is averaged over all query heads of the layer, as in the paper, so every head of the layer keeps
    the same tokens; if the heads already hold different tokens (a ragged cache), each KV head averages its own
    query heads instead. The budget is ``compression_ratio`` of the prompt's real tokens (applied at prefill
    with the prompt's last query) or ``budget`` tokens, then held for the rest of the generation.
    """

    name = "tova"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        probs = ctx.attention_probs(last_n=1)[:, :, :, -1]  # [batch, kv_heads, groups, seq]
        per_head = probs.mean(dim=2)
        if not bool((ctx.positions == ctx.positions[:, :1]).all()):
            return per_head  # heads hold different tokens: slot i is not the same token in every head
        return per_head.mean(dim=1, keepdim=True).expand_as(per_head)

    def max_held(self) -> int | None:
        return self.budget  # a fixed budget is held at every step; a ratio's depends on the prompt

    def applies_to(self, ctx: LayerContext) -> bool:
        return True

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        n_real = ctx.real_tokens
        budget = self.held_budget(ctx, _BUDGET).minimum(n_real)
        if bool((n_real <= budget).all()):
            return None
        valid = ctx.key_valid
        return keep_topk(self.score(ctx).masked_fill(~valid, float("-inf")), budget) & valid
