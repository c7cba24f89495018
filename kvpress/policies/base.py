"""Score-based policies and the checks every policy shares: :class:`ScorePolicy` (keep the best-scored tokens of
each head), budgets from a ratio, argument checks. The interface itself, :class:`Policy`, and its composition,
:class:`Pipeline`, live in :mod:`kvpress.policies.interface` (re-exported here)."""

from __future__ import annotations

import math
from abc import abstractmethod
from numbers import Real
from typing import Any

import torch

from kvpress.context import LayerContext
from kvpress.policies.interface import SIZE_PARAMETERS, Pipeline, Policy, is_storage_spec

__all__ = ["SIZE_PARAMETERS", "Policy", "Pipeline", "is_storage_spec", "ScorePolicy", "check_ratio", "check_int",
           "check_fraction", "window_for_ratio", "RatioSized", "recent_mask", "keep_topk", "keep_count"]


def check_ratio(name: str, value: Any) -> float:
    """Validate a compression ratio: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of tokens removed), got {value!r}")
    return float(value)


def window_for_ratio(compression_ratio: float, n_tokens: int, n_fixed: int = 0) -> int:
    """Tokens a recent window keeps so that a first forward of ``n_tokens`` tokens keeps ``1 - compression_ratio``
    of them, ``n_fixed`` (sinks) included: ``max(1, round(n_tokens * (1 - r)) - n_fixed)``. How the policies whose
    native size is a token count (StreamingLLM's window, DecodingBudget's budget) read a ratio."""
    check_int("n_tokens", n_tokens, 1)
    return max(1, round(n_tokens * (1.0 - compression_ratio)) - n_fixed)


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
    finite = scores > float("-inf")
    if bool((n_keep == finite.sum(-1) - 1).all()):
        # Decoding under a budget drops exactly one scored token per head each step: the lowest score, the last
        # of equal lowest scores (what the stable descending sort below would leave out), in O(seq).
        lowest = scores.masked_fill(~finite, float("inf")).amin(dim=-1, keepdim=True)
        slots = torch.arange(seq, device=scores.device)
        last = torch.where((scores == lowest) & finite, slots, -1).argmax(dim=-1, keepdim=True)
        return finite.scatter(-1, last, False)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank_ok = torch.arange(seq, device=scores.device) < n_keep.unsqueeze(-1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, rank_ok)


def keep_count(n_real: torch.Tensor, compression_ratio: float | None, budget: int | None) -> torch.Tensor:
    """Tokens each head keeps (``[batch, kv_heads]``) given its real tokens: a fraction or a budget, at least 1."""
    if budget is not None:
        return n_real.clamp(max=budget)
    kept = (n_real.double() * (1.0 - compression_ratio)).floor().long()
    return kept.clamp(min=1).minimum(n_real)


class RatioSized:
    """Mixin of the policies whose native size is not a ratio (StreamingLLM's window, DecodingBudget's budget,
    DuoAttention's head sparsity) but that also take ``compression_ratio``: they size themselves from it at the first
    forward on each fresh cache (``n`` = that forward's tokens), or once for good from a known length with
    :meth:`size_for`. A subclass sets ``_fixed`` (True when sized by its native parameter) and implements ``_size``."""

    compression_ratio: float | None = None
    _fixed: bool = True

    def _size(self, n_tokens: int) -> None:
        raise NotImplementedError

    def size_for(self, n_tokens: int) -> None:
        """Fix the size from ``compression_ratio`` for a first forward of ``n_tokens`` tokens (no-op when the policy
        was sized by its own parameter)."""
        if self.compression_ratio is not None:
            self._size(n_tokens)
        self._fixed = True

    def size_at(self, ctx: LayerContext, unsized: bool) -> None:
        """Size from this forward when it is a fresh cache's first one (or nothing is sized yet), unless fixed."""
        if unsized or ctx.phase == "prefill":
            self.size_at_first_forward(ctx.seq_len)

    def size_at_first_forward(self, n_tokens: int) -> None:
        """Size from a fresh cache's first forward of ``n_tokens`` tokens, unless fixed (``kvpress.patch`` calls
        this before the layers run, so storage that depends on the size can be built)."""
        if not self._fixed:
            self._size(n_tokens)


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

    def acts_at(self, phase: str) -> bool:
        if phase != "decode":
            return True
        # Plain scorers compress the prompt only; one that observes every forward (H2O's mass), decides per
        # step (applies_to) or selects its own way acts while decoding too.
        cls = type(self)
        return (cls.applies_to is not ScorePolicy.applies_to or cls.observe is not ScorePolicy.observe
                or cls.select is not ScorePolicy.select)

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
