"""Decode attention over ragged heads in torch: the varlen layout of ``RaggedStorage``, no padding read.

Layout: the tokens of all ``(batch, kv_head)`` segments concatenated in row-major order, ``keys``/``values``
``[total_tokens, head_dim]``, segment ``s`` holding ``lengths.flatten()[s]`` tokens. Tokens are visited in
chunks of the flat axis with one online softmax per segment (scatter max / index-add), so temporaries are
``O(chunk * M * head_dim)`` and no padded ``[batch, kv_heads, max_len, head_dim]`` tensor is ever built.
"""

from __future__ import annotations

import torch

from kvpress.kernels.partial import AttentionPartial

DEFAULT_CHUNK = 2048


def segment_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` lengths -> ``[B * H + 1]`` int64 start offsets of each segment in the flat layout."""
    flat = lengths.flatten().long()
    return torch.cat([flat.new_zeros(1), flat.cumsum(0)])


def ragged_decode_torch(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> AttentionPartial:
    """Attention of ``query`` ``[B, H, M, D]`` (float32, scaled) over ragged ``keys``/``values`` ``[T, D]``.

    Args:
        lengths: ``[B, H]`` tokens per segment (summing to ``T``).
        mask: ``[T, L]`` bool per token and query token (``L`` divides ``M``; row ``m`` uses column ``m % L``),
            or ``None``.
    """
    b, h, m, d = query.shape
    q = query.float().reshape(b * h, m, d)
    offsets = segment_offsets(lengths)
    total = int(offsets[-1])
    row_max = q.new_full((b * h, m), float("-inf"))
    row_sum = q.new_zeros(b * h, m)
    acc = q.new_zeros(b * h, m, d)
    cols = None if mask is None else torch.arange(m, device=q.device) % mask.shape[1]
    for c0 in range(0, total, chunk):
        c1 = min(total, c0 + chunk)
        tok = torch.arange(c0, c1, device=q.device)
        seg = torch.searchsorted(offsets[1:], tok, right=True)  # [C]
        logits = torch.einsum("cmd,cd->cm", q[seg], keys[c0:c1].float())
        if mask is not None:
            logits = logits.masked_fill(~mask[c0:c1][:, cols], float("-inf"))
        chunk_max = row_max.new_full(row_max.shape, float("-inf"))
        chunk_max = chunk_max.scatter_reduce(0, seg.unsqueeze(-1).expand_as(logits), logits, "amax")
        new_max = torch.maximum(row_max, chunk_max)
        safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        alpha = torch.exp(row_max - safe)
        p = torch.exp(logits - safe[seg])  # [C, M]
        row_sum = (row_sum * alpha).index_add(0, seg, p)
        acc = (acc * alpha.unsqueeze(-1)).index_add(0, seg, p.unsqueeze(-1) * values[c0:c1].float().unsqueeze(1))
        row_max = new_max
    norm = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    safe = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    out = (acc / norm.unsqueeze(-1)).view(b, h, m, d)
    return AttentionPartial(out, (safe + torch.log(row_sum)).view(b, h, m))
