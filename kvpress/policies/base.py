"""The policy interface: decide, per layer and KV head, which cached tokens stay."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from numbers import Real
from typing import Any, ClassVar

import torch

from kvpress.context import ForwardContext, LayerContext

# The parameters through which a policy is sized (how much it keeps); everything else says how it scores.
SIZE_PARAMETERS: tuple[str, ...] = ("compression_ratio", "budget")


class Policy(ABC):
    """An eviction policy. Implement :meth:`select`; everything else is optional.

    ``select`` is called for every compressible layer after attention ran in a forward pass, with a
    :class:`~kvpress.context.LayerContext` (``ctx.phase`` says prefill / extend / decode). It returns a keep
    mask ``[batch, kv_heads, seq]`` (bool over the cached slots) or ``None`` to keep everything. Heads may keep
    different numbers of tokens: the cache then switches that layer to ragged storage (no padding held).
    """

    name: ClassVar[str] = "policy"
    # True: after eviction, attend at positions within the cache (see kvpress.reposition), not the original ones.
    reposition: bool = False
    # True: heads keep different numbers of tokens by design, which saves memory only in ragged storage.
    needs_ragged: ClassVar[bool] = False
    # True: attention computes ctx.attention_mass (per-slot attention received) along with its output.
    wants_attention_mass: bool = False
    # Which layers the policy evicts from: full-attention layers only (False, the default: a sliding-window layer
    # is already bounded by its window, so a ratio there saves little and cuts the local context the model was
    # trained with), or sliding-window layers too (True, set with :meth:`on_sliding_layers`).
    sliding_layers: bool = False

    @abstractmethod
    def select(self, ctx: LayerContext) -> torch.Tensor | None: ...

    def attach(self, model: Any) -> None:
        """Called once by :func:`kvpress.patch` with the model, before any forward: a policy that needs the model
        (a predictor trained for it) loads and checks what it needs here; the default does nothing."""

    def after_forward(self, fwd: ForwardContext) -> None:
        """Called once the whole model finished a forward (after every layer's :meth:`select`), with a handle
        that can run extra forwards on the cache. Policies that need the whole model (KVzip's context
        reconstruction) evict here; the default does nothing."""

    def params(self) -> dict[str, Any]:
        """Parameters that identify this configuration (for reports and result files)."""
        return {}

    def on_sliding_layers(self, include: bool = True) -> "Policy":
        """Also evict from sliding-window layers (``include=True``), inside their window; returns ``self``.

        By default a policy acts on full-attention layers only. Its ratio or budget then applies to each sliding
        layer's window as it does to a full layer's tokens (``ctx.layer_type`` tells the layers apart).
        """
        if not isinstance(include, bool):
            raise ValueError(f"include must be a bool, got {include!r}")
        self.sliding_layers = include
        return self

    def acts_on(self, layer_type: str) -> bool:
        """Whether :meth:`select` is called for a layer of ``layer_type`` (``"full_attention"`` /
        ``"sliding_attention"``)."""
        return layer_type == "full_attention" or (layer_type == "sliding_attention" and self.sliding_layers)

    def __or__(self, other: Any) -> "Any":
        from kvpress.policies.pipeline import Pipeline

        return Pipeline(self, other)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def check_ratio(name: str, value: Any) -> float:
    """Validate a compression ratio: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of tokens removed), got {value!r}")
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """Validate an integer parameter ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_fraction(name: str, value: Any) -> float:
    """Validate a fraction in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def recent_mask(valid: torch.Tensor, window: int | torch.Tensor) -> torch.Tensor:
    """``[batch, kv_heads, seq]`` bool: the last ``window`` real slots of each head (slots are in position order)."""
    from_end = valid.flip(-1).long().cumsum(-1).flip(-1)  # 1 for the newest real slot
    window = window.unsqueeze(-1) if isinstance(window, torch.Tensor) else window
    return valid & (from_end <= window)


def keep_topk(scores: torch.Tensor, n_keep: int | torch.Tensor) -> torch.Tensor:
    """Keep mask ``[batch, kv_heads, seq]`` of the ``n_keep`` highest ``scores`` of each head.

    ``n_keep`` is one count for every head, or a ``[batch, kv_heads]`` tensor of counts per head.
    """
    seq = scores.shape[-1]
    if not isinstance(n_keep, torch.Tensor):
        n_keep = max(0, min(int(n_keep), seq))
        index = scores.topk(n_keep, dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)
    n_keep = n_keep.clamp(0, seq).to(scores.device)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank_ok = torch.arange(seq, device=scores.device) < n_keep.unsqueeze(-1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank_ok)


def keep_count(n_real: torch.Tensor, compression_ratio: float | None, budget: int | None) -> torch.Tensor:
    """Tokens each head keeps (``[batch, kv_heads]``) given its real tokens: a fraction or a budget, at least 1."""
    if budget is not None:
        return n_real.clamp(max=budget)
    kept = (n_real.double() * (1.0 - compression_ratio)).floor().long()
    return kept.clamp(min=1).minimum(n_real)


class ScorePolicy(Policy):
    """A policy that scores every cached token and keeps the best ones of each head.

    Configure it by exactly one of:
        compression_ratio: fraction of the cached tokens removed, in [0, 1) (NVIDIA kvpress's convention);
        budget: number of tokens each head keeps.

    Ratios apply to each row's real tokens (padding is never counted nor kept), so rows of a left-padded batch
    keep their own share. By default it compresses once, at the end of prefill (the first forward on a fresh
    cache). With ``every_chunk=True`` it also compresses after every later multi-token forward (chunked prefill).
    Subclasses implement :meth:`score`; budget-shaping wrappers (AdaKV, PyramidKV) override
    :meth:`keep_from_scores`. Slots a query may not attend to (padding) always score lowest.
    """

    def __init__(
        self, compression_ratio: float | None = None, budget: int | None = None, every_chunk: bool = False
    ):
        if compression_ratio is not None and budget is not None:
            raise ValueError("give either compression_ratio or budget, not both")
        if compression_ratio is None and budget is None:
            compression_ratio = 0.5
        self.compression_ratio = None if compression_ratio is None else check_ratio("compression_ratio", compression_ratio)
        self.budget = None if budget is None else check_int("budget", budget, 1)
        self.every_chunk = bool(every_chunk)

    @abstractmethod
    def score(self, ctx: LayerContext) -> torch.Tensor:
        """``[batch, kv_heads, seq]`` importance of every cached slot (higher is kept)."""

    def observe(self, ctx: LayerContext) -> None:
        """Update any memory the scores depend on, at every forward (H2O accumulates attention here). Wrappers
        that evict on their own schedule (:class:`~kvpress.policies.DecodingBudget`) call it between evictions."""

    def n_keep(self, n_cached: int) -> int:
        """Tokens a head holding ``n_cached`` real tokens keeps."""
        return int(keep_count(torch.tensor([[n_cached]]), self.compression_ratio, self.budget)[0, 0])

    def applies_to(self, ctx: LayerContext) -> bool:
        return ctx.phase == "prefill" or (self.every_chunk and ctx.phase == "extend")

    def held_budget(self, ctx: LayerContext, key: str) -> torch.Tensor:
        """``[batch, kv_heads]`` tokens each head holds from the first forward on, for policies that evict while
        decoding: ``budget``, or ``compression_ratio`` of the prompt's real tokens; kept in ``ctx.state[key]``."""
        n_real = ctx.real_tokens
        held = ctx.state.get(key)
        if held is None or held.shape != n_real.shape:
            if self.budget is not None:
                held = torch.full_like(n_real, self.budget)
            else:
                held = keep_count(n_real, self.compression_ratio, None)
            ctx.state[key] = held
        return held

    def keep_from_scores(
        self, scores: torch.Tensor, valid: torch.Tensor, layer_idx: int, num_layers: int
    ) -> torch.Tensor | None:
        """Keep mask ``[batch, kv_heads, seq]`` from ``scores`` and the ``valid`` (real-token) slots, or ``None``
        when nothing is evicted. Separate from :meth:`score` so one prefill's scores can serve many ratios."""
        n_real = valid.sum(-1)
        n_keep = keep_count(n_real, self.compression_ratio, self.budget)
        if bool((n_keep == n_real).all()):
            return None  # nothing real to evict (padding, if any, stays: ratio 0 changes nothing)
        return keep_topk(scores.float().masked_fill(~valid, float("-inf")), n_keep) & valid

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        if not self.applies_to(ctx):
            return None
        return self.keep_from_scores(self.score(ctx), ctx.key_valid, ctx.layer_idx, ctx.num_layers)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.budget is not None:
            out["budget"] = self.budget
        else:
            out["compression_ratio"] = self.compression_ratio
        if self.every_chunk:
            out["every_chunk"] = True
        return out
