"""Attention that also returns the attention mass each key receives, for policies that accumulate it (H2O).

The column sums of ``softmax(Q K^T)`` cost about as much as attention itself if computed separately (the same
``[q, k]`` logits and exponentials). Computed together with the attention output they are almost free: the
exponentiated logits of each query chunk serve both ``P V`` and ``1^T P``. This module does that, ``chunk`` queries
at a time (peak memory ``O(chunk * seq)``), with the query heads that share a KV head read together (GQA).
It replaces the model's attention only in forwards whose policy asked for the mass (``Policy.wants_attention_mass``),
so the uncompressed and other paths keep transformers' own attention.
"""

from __future__ import annotations

from typing import Callable

import torch

from kvpress.storage import AttentionView


@torch.no_grad()
def attention_with_mass(
    query: torch.Tensor,
    view: AttentionView,
    allowed_rows: Callable[[int, int], torch.Tensor | None],
    scaling: float,
    causal_from: int | None,
    chunk: int = 64,
    reduce: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and per-key attention mass (inference only: no autograd graph is built).

    Args:
        query: ``[batch, q_heads, q_len, head_dim]`` post-RoPE queries (unrotated).
        view: the layer's keys/values ``[batch, kv_heads, seq, head_dim]`` (possibly held rotated).
        allowed_rows: ``allowed_rows(a, b)`` -> ``[batch, kv_heads, b - a, seq]`` bool or ``None`` for queries
            ``a..b-1`` (causality, padding, ragged filler).
        scaling: softmax scale.
        causal_from: when the only constraint is causality over contiguous positions (no padding, nothing evicted),
            the slot of the first query (``seq - q_len``): only the diagonal block is masked, no mask is built;
            ``None`` to use ``allowed_rows``.
        chunk: queries per block.
        reduce: ``"sum"``: the mass is summed over queries and group heads (H2O); ``"max"``: the largest attention
            any of them paid (KVzip).

    Returns:
        ``(out, mass)``: ``out`` ``[batch, q_len, q_heads, head_dim]`` in the query's dtype (transformers' layout)
        and ``mass`` ``[batch, kv_heads, seq]`` float32, the attention each slot received from these queries and
        the query heads of its KV head, summed or maxed (``reduce``).
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    batch, q_heads, q_len, dim = query.shape
    keys, values = view.keys, view.values
    kv_heads, seq = keys.shape[1], keys.shape[2]
    groups = q_heads // kv_heads
    if view.key_rotation is not None:
        query = query @ view.key_rotation.to(query.dtype)
    q = query.float().reshape(batch * kv_heads, groups, q_len, dim)
    k = keys.float().reshape(batch * kv_heads, seq, dim)
    v = values.float().reshape(batch * kv_heads, seq, values.shape[-1])
    out = torch.empty(batch * kv_heads, groups, q_len, values.shape[-1], dtype=torch.float32, device=query.device)
    mass = torch.zeros(batch * kv_heads, 1, seq, dtype=torch.float32, device=query.device)
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        n = stop - start
        if causal_from is not None:
            width = causal_from + stop  # keys past the chunk's last query are in the future of all its queries
            allowed = None
        else:
            allowed = allowed_rows(start, stop)
            width = seq
        qc = q[:, :, start:stop].reshape(batch * kv_heads, groups * n, dim)
        logits = torch.bmm(qc, k[:, :width].transpose(1, 2)).mul_(scaling)  # [B*H, G*n, width]
        blocks = logits.view(batch * kv_heads, groups, n, width)
        if causal_from is not None:
            diagonal = torch.ones(n, n, dtype=torch.bool, device=query.device).triu_(1)
            blocks[..., causal_from + start : causal_from + stop].masked_fill_(diagonal, float("-inf"))
        elif allowed is not None:
            allowed = allowed.reshape(batch * kv_heads, 1, n, seq)
            blocks.masked_fill_(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # one fused pass (max, exp, sum, scale) instead of four
        if causal_from is None:  # a query with no allowed key at all (padding) gives NaN: it attends to nothing
            probs.nan_to_num_(0.0)
        chunk_out = torch.bmm(probs, v[:, :width])
        out[:, :, start:stop] = chunk_out.view(batch * kv_heads, groups, n, -1)
        if reduce == "sum":
            mass[..., :width] += probs.sum(dim=1, keepdim=True)
        else:
            torch.maximum(mass[..., :width], probs.amax(dim=1, keepdim=True), out=mass[..., :width])
    out = out.reshape(batch, q_heads, q_len, -1)
    if view.value_rotation is not None:
        out = out @ view.value_rotation.float().transpose(-1, -2)
    return out.to(query.dtype).transpose(1, 2).contiguous(), mass.view(batch, kv_heads, seq)
