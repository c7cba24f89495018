"""Fused Triton decode attention over ragged heads (the varlen layout of ``RaggedStorage``), no padding read.

Grid ``(batch * kv_heads, splits)``: program ``(s, j)`` reads tokens ``[j * SPLIT, (j + 1) * SPLIT)`` of segment
``s`` only (``offsets[s] .. offsets[s + 1]`` in the flat ``[total_tokens, head_dim]`` tensors), for all ``M``
query rows of that KV head; splits past a short head's end exit with an empty state. Dots in the keys' dtype
(tensor cores for float16 / bfloat16, float32 FMA for float32) accumulated in float32, online softmax in float32,
then the log-sum-exp merge of :func:`~kvpress.kernels.partial.merge_splits`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvpress.kernels.partial import AttentionPartial, merge_splits
from kvpress.kernels.quant_decode_triton import _DOTS, _dot
from kvpress.kernels.ragged_decode_torch import segment_offsets


@triton.jit
def _ragged_decode_kernel(
    Q, s_qb, s_qh, s_qm,
    K, V, s_kt, s_vt,
    OFF,
    MASK, s_mt,
    ACC, RMAX, RSUM,
    H, SPLIT_TOKENS, L, N_SPLITS,
    M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT: tl.constexpr, EMULATE_BF16: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.arange(0, M_PAD)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < M
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    seg_start = tl.load(OFF + pid_bh)
    seg_len = tl.load(OFF + pid_bh + 1) - seg_start
    row_max = tl.full([M_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([M_PAD], tl.float32)
    acc = tl.zeros([M_PAD, D], tl.float32)
    start = pid_s * SPLIT_TOKENS
    stop = tl.minimum(start + SPLIT_TOKENS, seg_len)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tok_ok = offs_n < stop
        rows = seg_start + offs_n
        keys = tl.load(K + rows[:, None] * s_kt + offs_d[None, :], mask=tok_ok[:, None], other=0.0).to(tl.float32)
        logits = _dot(q, tl.trans(keys), DOT, EMULATE_BF16)
        allowed = tok_ok[None, :] & row_ok[:, None]
        if HAS_MASK:
            mptr = MASK + rows[None, :] * s_mt + (offs_m % L)[:, None]
            allowed = allowed & (tl.load(mptr, mask=allowed, other=0) != 0)
        logits = tl.where(allowed, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(row_max - safe)
        p = tl.exp(logits - safe[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        row_max = new_max
        values = tl.load(V + rows[:, None] * s_vt + offs_d[None, :], mask=tok_ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + _dot(p, values, DOT, EMULATE_BF16)
    out = (pid_bh * N_SPLITS + pid_s) * M_PAD
    tl.store(ACC + (out + offs_m[:, None]) * D + offs_d[None, :], acc)
    tl.store(RMAX + out + offs_m, row_max)
    tl.store(RSUM + out + offs_m, row_sum)


def ragged_decode_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    mask: torch.Tensor | None = None,
    splits: int | None = None,
    max_length: int | None = None,
) -> AttentionPartial:
    """Same contract as :func:`~kvpress.kernels.ragged_decode_torch.ragged_decode_torch`.

    ``max_length`` (the longest segment) sizes the split grid; pass it when known to avoid a host sync.
    """
    b, h, m, d = query.shape
    q = query.float().contiguous()
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("ragged_decode_triton: keys and values must be contiguous along head_dim")
    offsets = segment_offsets(lengths)
    longest = int(lengths.max()) if max_length is None else max_length
    block = 64 if d <= 128 else 32
    if longest == 0:
        return AttentionPartial(q.new_zeros(b, h, m, d), q.new_full((b, h, m), float("-inf")))
    if splits is None:
        target = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        splits = max(1, min(triton.cdiv(longest, block), triton.cdiv(target, b * h)))
    split_tokens = triton.cdiv(triton.cdiv(longest, splits), block) * block
    n_splits = triton.cdiv(longest, split_tokens)
    m_pad = max(16, triton.next_power_of_2(m))
    acc = torch.empty(b * h * n_splits * m_pad * d, device=q.device, dtype=torch.float32)
    row_max = torch.empty(b * h * n_splits * m_pad, device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    if mask is not None:
        mask_t = mask.view(torch.int8) if mask.dtype == torch.bool else mask
        mask_t = mask_t.contiguous()
        q_len, s_mt = mask.shape[1], mask_t.stride(0)
    else:
        mask_t, q_len, s_mt = q, 1, 0
    _ragged_decode_kernel[(b * h, n_splits)](
        q, q.stride(0), q.stride(1), q.stride(2),
        keys, values, keys.stride(0), values.stride(0),
        offsets,
        mask_t, s_mt,
        acc, row_max, row_sum,
        h, split_tokens, q_len, n_splits,
        M=m, M_PAD=m_pad, D=d, BLOCK_N=block, HAS_MASK=mask is not None, DOT=_DOTS.get(keys.dtype, 0),
        EMULATE_BF16=os.environ.get("TRITON_INTERPRET", "0") == "1",
    )  # fmt: skip
    shape = (b, h, n_splits, m_pad)
    part = merge_splits(acc.view(*shape, d), row_max.view(shape), row_sum.view(shape))
    return AttentionPartial(part.out[:, :, :m], part.lse[:, :, :m])
