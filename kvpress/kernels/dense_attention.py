"""Attention over dense ``[batch, kv_heads, seq, head_dim]`` keys and values with grouped query heads.

The one SDPA call every dense read goes through (kvpress's attention over an evicted view, and the dense parts of
head-split storage at decode): the query heads sharing a KV head are folded into the query length, so K/V are
read once and never repeated per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float,
    key_rotation: torch.Tensor | None = None,
    value_rotation: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA, without repeating K/V.

    Args:
        query: ``[batch, q_heads, q_len, head_dim]`` (unrotated).
        keys, values: ``[batch, kv_heads, seq, head_dim]`` (held as ``K @ R`` / ``V @ Rv`` when rotations given).
        allowed: ``[batch, kv_heads, q_len, seq]`` bool, or ``None`` (every query sees every slot).
        scaling: softmax scale.
        key_rotation, value_rotation: ``[head_dim, head_dim]`` orthonormal or ``None``.
        causal: plain causal attention of ``q_len == seq`` queries over their own tokens (a prefill with nothing
            evicted; ``allowed`` must be ``None``): SDPA's causal kernel, with no mask built.

    Returns:
        ``[batch, q_len, q_heads, head_dim]`` in the query's dtype.
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads = keys.shape[1]
    groups = q_heads // kv_heads
    if key_rotation is not None:
        query = query @ key_rotation.to(query.dtype)
    if causal:
        if allowed is not None or q_len != keys.shape[2]:
            raise ValueError("causal attention takes no mask and as many queries as keys")
        k, v = keys.to(query.dtype), values.to(query.dtype)
        if groups > 1:  # the causal kernel needs one query row per position, so K/V are shared by expansion
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
        if value_rotation is not None:
            out = out @ value_rotation.to(out.dtype).transpose(-1, -2)
        return out.transpose(1, 2).contiguous()
    q = query.reshape(batch, kv_heads, groups * q_len, query.shape[-1])
    mask = None
    if allowed is not None:
        mask = allowed.unsqueeze(2).expand(batch, kv_heads, groups, q_len, allowed.shape[-1])
        mask = mask.reshape(batch, kv_heads, groups * q_len, allowed.shape[-1])
    out = F.scaled_dot_product_attention(q, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask,
                                         scale=scaling)
    out = out.reshape(batch, q_heads, q_len, values.shape[-1])
    if value_rotation is not None:
        out = out @ value_rotation.to(out.dtype).transpose(-1, -2)
    return out.transpose(1, 2).contiguous()
