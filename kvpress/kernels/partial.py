"""Partial attention states and their log-sum-exp merge (the reduction of split / segmented attention).

Attention of a query row over a set of slots is summarised by ``(out, lse)``: ``out`` the softmax-weighted mean
of the values (float32) and ``lse`` the log of the softmax denominator (``-inf`` when no slot is allowed).
Two disjoint slot sets merge exactly: ``lse = logaddexp(lse_a, lse_b)`` and
``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``. Decode attention over a layer held in several
segments (exact sinks and residual window, a quantized body, ragged heads) is computed segment by segment and
merged here; flash-decoding's split-K reduction is the same merge over splits of one segment.

Query rows: attention of the ``G = q_heads / kv_heads`` query heads sharing a KV head and their ``L`` query
tokens is computed together as ``M = G * L`` rows ``[batch, kv_heads, M, head_dim]`` (row ``m`` is query head
``m // L`` of the group and query token ``m % L``), so each K/V element is read once for all of them (GQA).
Masks are given per query token, ``[batch, kv_heads, L, slots]`` bool, and shared by the ``G`` heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionPartial:
    """Attention of ``M`` query rows over some slots.

    Attributes:
        out: ``[batch, kv_heads, M, head_dim]`` float32, normalised over those slots (0 where none allowed).
        lse: ``[batch, kv_heads, M]`` float32, log of the softmax denominator (``-inf`` where none allowed).
    """

    out: torch.Tensor
    lse: torch.Tensor


def merge(parts: list[AttentionPartial]) -> AttentionPartial:
    """Merge partial states over disjoint slot sets (exact, in float32)."""
    if not parts:
        raise ValueError("merge needs at least one partial state")
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([p.lse for p in parts])  # [P, B, H, M]
    top = lse.amax(0)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse - safe)  # 0 for empty parts
    total = w.sum(0)
    norm = torch.where(total > 0, total, torch.ones_like(total))
    out = sum(p.out * (wi / norm).unsqueeze(-1) for p, wi in zip(parts, w, strict=True))
    return AttentionPartial(out, safe + torch.log(total))


def merge_splits(acc: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor) -> AttentionPartial:
    """Reduce flash-decoding splits: unnormalised ``acc`` ``[B, H, S, M, D]``, running max and sum ``[B, H, S, M]``
    (max ``-inf`` and sum 0 for a split with no allowed slot)."""
    top = row_max.amax(2, keepdim=True)
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(row_max - safe)  # [B, H, S, M]
    total = (row_sum * w).sum(2)  # [B, H, M]
    out = (acc * w.unsqueeze(-1)).sum(2)
    norm = torch.where(total > 0, total, torch.ones_like(total))
    return AttentionPartial(out / norm.unsqueeze(-1), safe.squeeze(2) + torch.log(total))


def expand_mask(mask: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """``[B, H, L, S]`` per-token mask -> ``[B, H, G * L, S]`` per query row (a broadcast view, no copy)."""
    if mask is None:
        return None
    b, h, q_len, s = mask.shape
    return mask.unsqueeze(2).expand(b, h, groups, q_len, s).reshape(b, h, groups * q_len, s)


def dense_partial(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> AttentionPartial:
    """Attention of ``query`` ``[B, H, M, D]`` (float32, already scaled) over full-precision ``keys``/``values``
    ``[B, H, S, D]`` with ``mask`` ``[B, H, L, S]`` bool (``M`` a multiple of ``L``) or ``None``. Float32 math.

    Used for the small exact segments (sinks, residual window, this step's tokens) next to a quantized body.
    """
    b, h, m, _ = query.shape
    if keys.shape[2] == 0:
        return AttentionPartial(
            query.new_zeros(b, h, m, values.shape[-1]), query.new_full((b, h, m), float("-inf"))
        )
    logits = query @ keys.float().transpose(-1, -2)  # [B, H, M, S]
    if mask is not None:
        logits = logits.masked_fill(~expand_mask(mask, m // mask.shape[2]), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(logits - safe.unsqueeze(-1))
    return AttentionPartial(probs @ values.float(), lse)
