"""Key-norm (Devoto et al., 2024): keys with a low L2 norm draw more attention, so they are kept."""

from __future__ import annotations

import torch

from kvpress.context import LayerContext
from kvpress.policies.base import ScorePolicy


class KeyNorm(ScorePolicy):
    """Score = minus the L2 norm of each cached key: the largest-norm keys are evicted first.

    Query-agnostic and nearly free (one norm per key). Norms are invariant to the orthonormal rotation of
    rotated quantized storage, so the score is the same on a ``KVQuant`` cache.
    """

    name = "knorm"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1)
