"""The policy interface: decide, per layer and KV head, which cached tokens stay."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from numbers import Real
from typing import Any, ClassVar

import torch

from kvpress.context import LayerContext


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

    @abstractmethod
    def select(self, ctx: LayerContext) -> torch.Tensor | None: ...

    def params(self) -> dict[str, Any]:
        """Parameters that identify this configuration (for reports and result files)."""
        return {}

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


def keep_topk(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Keep mask ``[batch, kv_heads, seq]`` of the ``n_keep`` highest ``scores`` of each head."""
    n_keep = max(0, min(n_keep, scores.shape[-1]))
    index = scores.topk(n_keep, dim=-1).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, index, True)


class ScorePolicy(Policy):
    """A policy that scores every cached token and keeps the best ones of each head.

    Configure it by exactly one of:
        compression_ratio: fraction of the cached tokens removed, in [0, 1) (NVIDIA kvpress's convention);
        budget: number of tokens each head keeps.

    By default it compresses once, at the end of prefill (the first forward on a fresh cache). With
    ``every_chunk=True`` it also compresses after every later multi-token forward (chunked prefill).
    Subclasses implement :meth:`score`; slots a query may not attend to (padding) always score lowest.
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

    def n_keep(self, n_cached: int) -> int:
        if self.budget is not None:
            return min(self.budget, n_cached)
        return max(1, int(n_cached * (1.0 - self.compression_ratio)))

    def applies_to(self, ctx: LayerContext) -> bool:
        return ctx.phase == "prefill" or (self.every_chunk and ctx.phase == "extend")

    def select(self, ctx: LayerContext) -> torch.Tensor | None:
        if not self.applies_to(ctx):
            return None
        n_keep = self.n_keep(ctx.num_cached)
        if n_keep >= ctx.num_cached:
            return None
        scores = self.score(ctx).float().masked_fill(~ctx.key_valid, float("-inf"))
        return keep_topk(scores, n_keep)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.budget is not None:
            out["budget"] = self.budget
        else:
            out["compression_ratio"] = self.compression_ratio
        if self.every_chunk:
            out["every_chunk"] = True
        return out
