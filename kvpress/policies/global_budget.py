"""Policies that score every layer first and then evict across layers at once (KVzip, the learned scorer)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Literal

import torch

from kvpress.context import ForwardContext
from kvpress.policies.base import Policy, check_int, check_ratio, keep_count, keep_topk

BudgetScope = Literal["global", "layer", "head"]
SCOPES = ("global", "layer", "head")


class GlobalScorePolicy(Policy):
    """Scores for every layer's prefill entries, then one eviction shared out by ``scope``.

    Scores live over absolute positions (``[batch, kv_heads, n_ctx]`` per layer), so any storage or an earlier
    pipeline stage that already thinned a layer is handled. Subclasses implement :meth:`prefill_scores`.

    Args:
        compression_ratio: fraction of the prefill's real tokens removed, in [0, 1); or
        budget: tokens kept per head on average.
        scope: ``"global"``: the best entries over all layers and heads of a row (heads and layers keep different
            amounts; ragged storage); ``"layer"``: each layer keeps its share, its heads compete (as AdaKV);
            ``"head"``: every head keeps the same number.
        n_sink: the first real tokens of each row, always kept (attention sinks, the system prompt's start).
    """

    def __init__(
        self,
        compression_ratio: float | None = None,
        budget: int | None = None,
        scope: BudgetScope = "global",
        n_sink: int = 4,
    ):
        if compression_ratio is not None and budget is not None:
            raise ValueError("give either compression_ratio or budget, not both")
        if compression_ratio is None and budget is None:
            compression_ratio = 0.5
        self.compression_ratio = None if compression_ratio is None else check_ratio("compression_ratio", compression_ratio)
        self.budget = None if budget is None else check_int("budget", budget, 1)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self.n_sink = check_int("n_sink", n_sink, 0)

    @property
    def fanout_ready(self) -> bool:
        """True when the decision is a ratio/budget of the prefill scores (one scoring serves every ratio)."""
        return True

    @abstractmethod
    def prefill_scores(self, fwd: ForwardContext) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Per compressed layer, over the prefill's positions ``0..n-1``: scores ``[batch, kv_heads, n]`` (higher is
        kept) and which positions each head holds as a real token."""

    def after_forward(self, fwd: ForwardContext) -> None:
        if fwd.phase != "prefill":
            return
        scores, valid = self.prefill_scores(fwd)
        self.evict(fwd.cache, scores, valid)

    def evict(self, cache: Any, scores: dict[int, torch.Tensor], valid: dict[int, torch.Tensor]) -> None:
        """Apply :meth:`keep_masks` to ``cache``."""
        for layer_idx, keep in self.keep_masks(scores, valid).items():
            cache.layers[layer_idx].keep_positions(keep)

    def keep_masks(self, scores: dict[int, torch.Tensor], valid: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Keep masks over positions ``[batch, kv_heads, n]`` per layer (none for a layer that keeps everything).
        Separate from scoring so one scoring pass can serve several ratios (evaluation fan-out)."""
        if not scores:
            return {}
        layers = sorted(scores)
        stacked = torch.stack([scores[i].float() for i in layers])  # [layers, batch, heads, n]
        ok = torch.stack([valid[i] for i in layers])
        sinks = ok & (ok.long().cumsum(-1) <= self.n_sink)
        stacked = stacked.masked_fill(~ok, float("-inf")).masked_fill(sinks, float("inf"))
        n_real = ok.sum(-1)  # [layers, batch, heads]
        per_head = keep_count(n_real, self.compression_ratio, self.budget).maximum(sinks.sum(-1)).minimum(n_real)
        if bool((per_head == n_real).all()):
            return {}
        n_layers, batch, heads, seq = stacked.shape
        if self.scope == "head":
            keep = keep_topk(stacked, per_head)
        elif self.scope == "layer":
            pooled = stacked.reshape(n_layers, batch, 1, heads * seq)
            keep = keep_topk(pooled, per_head.sum(-1, keepdim=True)).reshape(stacked.shape)
        else:
            pooled = stacked.permute(1, 0, 2, 3).reshape(batch, 1, n_layers * heads * seq)
            total = per_head.sum(dim=(0, 2)).view(batch, 1)
            keep = keep_topk(pooled, total).reshape(batch, n_layers, heads, seq).permute(1, 0, 2, 3)
        keep = keep & ok
        return {layer: keep[i] for i, layer in enumerate(layers)}

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"budget": self.budget} if self.budget is not None else {
            "compression_ratio": self.compression_ratio}
        return {**out, "scope": self.scope, "n_sink": self.n_sink}
