"""A learned query-agnostic scorer (KVzap-style): a tiny per-layer model predicts KVzip scores from hidden states.

The predictor (:mod:`kvpress.scorer.predictor`) maps each token's attention input to one score per KV head, in the
teacher's log space, so scoring costs one small matrix product per layer instead of a second forward over the
context. Two modes:

* ``compression_ratio`` / ``budget``: at prefill, the predicted scores of every layer are ranked and shared out
  like KVzip's (``scope="global"`` by default), then the lowest are evicted.
* ``threshold``: keep the entries whose predicted score exceeds it, plus the ``window`` newest tokens and the
  ``n_sink`` first ones, at every forward: new tokens are scored as they are appended and pruned once they leave
  the window, so long generations stay bounded by content, not by a fixed size (stored ragged). The achieved
  ratio per layer and head is :meth:`Learned.achieved`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from kvpress.context import ForwardContext, LayerContext
from kvpress.policies.base import check_int, recent_mask
from kvpress.policies.global_budget import BudgetScope, GlobalScorePolicy

_SCORES = "learned.scores"
_PREFILL = "learned.prefill"
_SEEN = "learned.seen_real"


class Learned(GlobalScorePolicy):
    """Evict by a trained predictor of KVzip scores (see the module docstring).

    Args:
        predictor: ``"auto"`` (the predictor shipped for the patched model, e.g. SmolLM2-135M), a path to a
            predictor file, or a :class:`~kvpress.scorer.ScorePredictor`.
        kind: with ``"auto"``: ``"mlp"`` or ``"linear"``.
        compression_ratio / budget / scope / n_sink: as for :class:`~kvpress.policies.KVzip` (ratio mode).
        threshold: keep entries whose predicted (log) score exceeds it; excludes ``compression_ratio``/``budget``.
        window: with ``threshold``, the newest tokens always kept.
    """

    name = "learned"
    size_parameters = ("compression_ratio", "budget", "threshold")
    wants_hidden_states = True

    def __init__(
        self,
        predictor: Any = "auto",
        kind: str = "mlp",
        compression_ratio: float | None = None,
        budget: int | None = None,
        threshold: float | None = None,
        scope: BudgetScope = "global",
        n_sink: int = 4,
        window: int = 16,
    ):
        if threshold is not None:
            if compression_ratio is not None or budget is not None:
                raise ValueError("threshold cannot be combined with compression_ratio or budget: give one of them")
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
                raise ValueError(f"threshold must be a finite number (a predicted log score), got {threshold!r}")
            compression_ratio = 0.0  # unused in threshold mode
        super().__init__(compression_ratio=compression_ratio, budget=budget, scope=scope, n_sink=n_sink)
        self.threshold = None if threshold is None else float(threshold)
        self.window = check_int("window", window, 0)
        self.kind = kind
        self.predictor_spec = predictor
        self.predictor = None if isinstance(predictor, (str, Path)) else predictor
        if isinstance(predictor, (str, Path)) and str(predictor) != "auto":
            from kvpress.scorer.predictor import load_predictor

            self.predictor = load_predictor(predictor)  # a missing or malformed file fails here, at construction

    @property
    def fanout_ready(self) -> bool:
        return self.threshold is None

    def attach(self, model: Any) -> None:
        from kvpress.scorer.predictor import embedded_predictor, load_predictor

        if self.predictor is None:
            self.predictor = load_predictor(embedded_predictor(model, self.kind))
        self.predictor.check(model)

    # -- scoring ---------------------------------------------------------------------------------------------
    def _new_scores(self, ctx: LayerContext) -> torch.Tensor:
        """Scores ``[batch, kv_heads, seq]`` over the view's slots, this forward's tokens predicted now."""
        if ctx.hidden_states is None:
            raise RuntimeError("the learned scorer needs hidden states: use it through kvpress.patch")
        if self.predictor is None:
            raise RuntimeError("the learned scorer has no predictor: kvpress.patch attaches it to the model")
        with torch.no_grad():
            predicted = self.predictor(ctx.layer_idx, ctx.hidden_states)  # [batch, kv_heads, q_len]
        first_new = ctx.seq_len - ctx.q_len
        offset = ctx.positions.long() - first_new  # index of each slot's token among this forward's tokens
        is_new = offset >= 0
        new = predicted.gather(-1, offset.clamp(0, ctx.q_len - 1))
        if self.threshold is None:
            return new.masked_fill(~is_new, float("-inf"))
        return torch.where(is_new, new, ctx.recall(_SCORES, fill=float("-inf")))

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        scores = self._new_scores(ctx)
        valid = ctx.key_valid
        if self.threshold is None:
            if ctx.phase == "prefill":  # ratio mode: rank every layer together after the forward
                n = ctx.seq_len
                at = ctx.positions.long().clamp(max=n - 1)
                by_pos = torch.full((*valid.shape[:2], n), float("-inf"), device=scores.device)
                held = torch.zeros(*valid.shape[:2], n, dtype=torch.uint8, device=scores.device)
                ctx.model_state.setdefault(_PREFILL, {})[ctx.layer_idx] = (
                    by_pos.scatter_reduce(-1, at, scores.masked_fill(~valid, float("-inf")), reduce="amax"),
                    held.scatter_reduce(-1, at, valid.to(torch.uint8), reduce="amax").bool(),
                )
            return None
        new_real = (valid & (ctx.positions >= ctx.seq_len - ctx.q_len)).sum(-1)
        seen = ctx.model_state.setdefault(_SEEN, {})
        seen[ctx.layer_idx] = seen.get(ctx.layer_idx, 0) + new_real
        keep = valid & ((scores > self.threshold) | recent_mask(valid, self.window)
                        | (valid.long().cumsum(-1) <= self.n_sink))
        ctx.remember(_SCORES, scores.masked_fill(~keep, float("-inf")).to(torch.float16))
        return None if bool((keep == valid).all()) and bool(valid.all()) else keep

    def prefill_scores(self, fwd: ForwardContext) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        recorded = fwd.cache.model_state.pop(_PREFILL, {})
        return {i: s for i, (s, _) in recorded.items()}, {i: v for i, (_, v) in recorded.items()}

    def after_forward(self, fwd: ForwardContext) -> None:
        if self.threshold is None:
            super().after_forward(fwd)

    # -- reporting -------------------------------------------------------------------------------------------
    @staticmethod
    def achieved(cache: Any) -> dict[int, torch.Tensor]:
        """Threshold mode: per compressed layer, the compression ratio ``[batch, kv_heads]`` achieved so far
        (1 - tokens held / real tokens seen)."""
        seen = cache.model_state.get(_SEEN, {})
        out = {}
        for idx, real in seen.items():
            held = cache.layers[idx].storage.lengths().to(real.device)
            out[idx] = 1.0 - held.double() / real.clamp(min=1).double()
        return out

    def params(self) -> dict[str, Any]:
        predictor = str(self.predictor_spec) if isinstance(self.predictor_spec, (str, Path)) else "custom"
        out: dict[str, Any] = {"predictor": predictor, "kind": self.kind}
        if self.threshold is not None:
            return {**out, "threshold": self.threshold, "window": self.window, "n_sink": self.n_sink}
        return {**out, **super().params()}
