"""Decode attention over a packed quantized body in torch, chunk by chunk (the CPU path and the kernels' twin).

Never dequantizes the whole body: tokens are visited in chunks of ``chunk`` tokens (a multiple of the key group
size), with an online softmax in float32 across chunks, so the temporaries are ``O(chunk * head_dim)`` whatever
the context length. Per chunk:

* keys, groups aligned (no eviction): the per-channel scale is folded into the query and the zero into a
  per-group bias, ``logit = (q * scale_g) . code + q . zero_g``: codes are read as small integers and never
  turned into keys. Groups thinned by eviction (``group_ids``) gather each token's scale row instead.
* values: per-token groups dequantized for the chunk only, accumulated into the running output.
* GEAR low-rank terms are folded, never expanded into the error: keys add ``(q R_b) . L_t`` (``q R`` computed once
  per step), values accumulate ``sum_t p_t L_t`` per block and multiply by ``R_b^T`` once at the end.
* GEAR outliers correct the logits and the output at their channels only (exact value minus its quantized one).

Input ``query`` ``[B, H, M, D]`` float32 is already scaled and in the body's rotated key basis; the returned
partial's ``out`` is in the body's (rotated) value basis. See :mod:`kvpress.kernels.partial` for rows and masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvpress.kernels.layout import PackedBody
from kvpress.kernels.partial import AttentionPartial, expand_mask
from kvpress.kernels.unpack import unpack_codes

DEFAULT_CHUNK = 1024


def _gather_rows(table: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``table[b, h, rows[b, h, c], cols[b, h, c, k]]`` for ``table`` ``[B, H, n, D]`` -> ``[B, H, C, K]``."""
    b, h, n, d = table.shape
    flat = (rows.unsqueeze(-1) * d + cols).reshape(b, h, -1)
    return table.reshape(b, h, n * d).gather(2, flat).view(cols.shape)


def _lowrank_at(left: torch.Tensor, right: torch.Tensor, blk: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Low-rank term at channels ``cols`` ``[B, H, C, K]``: ``sum_r left[t, r] * right[blk_t, col, r]``."""
    b, h, nb, d, r = right.shape
    c, k = cols.shape[2:]
    flat = ((blk.view(b, h, c, 1, 1) * d + cols.unsqueeze(-1)) * r + torch.arange(r, device=cols.device))
    rows = right.reshape(b, h, nb * d * r).gather(2, flat.reshape(b, h, -1)).view(b, h, c, k, r).float()
    return (rows * left.float().unsqueeze(3)).sum(-1)


def quant_decode_torch(
    query: torch.Tensor, body: PackedBody, mask: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK
) -> AttentionPartial:
    """Attention of ``query`` ``[B, H, M, D]`` over the first ``body.n_tokens`` body tokens.

    Args:
        query: float32, scaled by the softmax scale, in the rotated key basis.
        body: the packed body (:class:`~kvpress.kernels.layout.PackedBody`).
        mask: ``[B, H, L, n_tokens]`` bool (True = may attend; ``L`` divides ``M``) or ``None``.
        chunk: tokens per chunk (rounded down to a multiple of the key group size, at least one group).
    """
    b, h, m, d = query.shape
    n = body.n_tokens
    if n == 0:
        return AttentionPartial(query.new_zeros(b, h, m, d), query.new_full((b, h, m), float("-inf")))
    g = body.group_size
    step = max(g, chunk // g * g)
    q = query.float()
    row_max = q.new_full((b, h, m), float("-inf"))
    row_sum = q.new_zeros(b, h, m)
    acc = q.new_zeros(b, h, m, d)
    rank = body.rank
    if rank:
        q_right = torch.einsum("bhmd,bhndr->bhmnr", q, body.k_right.float())  # [B, H, M, n_blocks, r]
        p_left = q.new_zeros(b, h, m, body.v_right.shape[2], rank)
        block_of = body.group_block.long()
    ngv = d // body.value_group
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        c = c1 - c0
        gid = body.token_groups(c0, c1) if (body.group_ids is not None or rank or body.k_out_val is not None) else None
        codes = unpack_codes(body.k_codes[:, :, c0:c1], body.key_bits, d).float()  # [B, H, C, D]
        if body.group_ids is None:
            g0, ng = c0 // g, -(-c // g)
            scale = body.k_scale[:, :, g0 : g0 + ng].float()  # [B, H, ng, D]
            zero = body.k_zero[:, :, g0 : g0 + ng].float()
            grouped = F.pad(codes, (0, 0, 0, ng * g - c)).view(b, h, ng, g, d)
            logits = (q.unsqueeze(2) * scale.unsqueeze(3)) @ grouped.transpose(-1, -2)  # [B, H, ng, M, G]
            logits = logits + (q @ zero.transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
            logits = logits.permute(0, 1, 3, 2, 4).reshape(b, h, m, ng * g)[..., :c]
        else:
            index = gid.unsqueeze(-1).expand(b, h, c, d)
            keys = torch.addcmul(body.k_zero.gather(2, index).float(), codes, body.k_scale.gather(2, index).float())
            logits = q @ keys.transpose(-1, -2)
        if rank:
            blk = block_of[gid]  # [B, H, C]
            qr = q_right.gather(3, blk.view(b, h, 1, c, 1).expand(b, h, m, c, rank))
            logits = logits + (qr * body.k_left[:, :, c0:c1].float().unsqueeze(2)).sum(-1)
        if body.k_out_val is not None:
            idx = body.k_out_idx[:, :, c0:c1].long()  # [B, H, C, K]
            held = _gather_rows(body.k_zero, gid, idx).float() + codes.gather(-1, idx) * _gather_rows(
                body.k_scale, gid, idx
            ).float()
            if rank:
                held = held + _lowrank_at(body.k_left[:, :, c0:c1], body.k_right, blk, idx)
            delta = body.k_out_val[:, :, c0:c1].float() - held
            k = idx.shape[-1]
            q_at = q.gather(-1, idx.view(b, h, 1, c * k).expand(b, h, m, c * k)).view(b, h, m, c, k)
            logits = logits + (q_at * delta.unsqueeze(2)).sum(-1)
        if mask is not None:
            logits = logits.masked_fill(~expand_mask(mask[..., c0:c1], m // mask.shape[2]), float("-inf"))
        new_max = torch.maximum(row_max, logits.amax(-1))
        safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        alpha = torch.exp(row_max - safe)
        p = torch.exp(logits - safe.unsqueeze(-1))  # [B, H, M, C]
        row_sum = row_sum * alpha + p.sum(-1)
        row_max = new_max
        vcodes = unpack_codes(body.v_codes[:, :, c0:c1], body.value_bits, d).float()  # [B, H, C, D]
        if body.v_out_val is not None:  # outlier corrections need the raw codes: before the in-place dequant
            v_idx = body.v_out_idx[:, :, c0:c1].long()
            k = v_idx.shape[-1]
            tok = torch.arange(c, device=v_idx.device).expand(b, h, c)
            grp = v_idx // body.value_group
            held = _gather_rows(body.v_zero[:, :, c0:c1], tok, grp).float() + vcodes.gather(-1, v_idx) * _gather_rows(
                body.v_scale[:, :, c0:c1], tok, grp
            ).float()
            if rank:
                held = held + _lowrank_at(body.v_left[:, :, c0:c1], body.v_right, blk, v_idx)
            v_delta = body.v_out_val[:, :, c0:c1].float() - held  # [B, H, C, K]
        values = vcodes.view(b, h, c, ngv, body.value_group)
        values.mul_(body.v_scale[:, :, c0:c1].float().unsqueeze(-1))
        values.add_(body.v_zero[:, :, c0:c1].float().unsqueeze(-1))
        acc = acc * alpha.unsqueeze(-1) + p @ vcodes
        if rank:
            p_left.mul_(alpha.view(b, h, m, 1, 1))
            contrib = p.unsqueeze(-1) * body.v_left[:, :, c0:c1].float().unsqueeze(2)  # [B, H, M, C, r]
            p_left.scatter_add_(3, blk.view(b, h, 1, c, 1).expand(b, h, m, c, rank), contrib)
        if body.v_out_val is not None:
            contrib = (p.unsqueeze(-1) * v_delta.unsqueeze(2)).reshape(b, h, m, c * k)
            acc.scatter_add_(-1, v_idx.view(b, h, 1, c * k).expand(b, h, m, c * k), contrib)
    if rank:
        acc = acc + torch.einsum("bhmnr,bhndr->bhmd", p_left, body.v_right.float())
    norm = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    safe = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return AttentionPartial(acc / norm.unsqueeze(-1), safe + torch.log(row_sum))
