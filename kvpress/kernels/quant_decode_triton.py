"""Fused Triton decode attention over a packed quantized body (flash-decoding split-K, GQA, GEAR terms).

Grid ``(batch * kv_heads, splits)``: each program reads one KV head's codes over one contiguous split of the
body's tokens, ``BLOCK_N`` tokens at a time, for all ``M = G * L`` query rows of that head (the query heads
sharing it and the decode tokens), so every code is read from memory once per step. Codes are unpacked in
registers (the bit stream of ``kvpress/quant/packing.py``: code ``i`` at bits ``[bits*i, bits*i + bits)``,
little-endian; 3-bit codes straddling two words are joined from both), dequantized in float32
(``zero + code * scale``, keys with one per-channel scale row per key group, values with per-token groups).
GEAR outliers are written over their channels in registers; GEAR low rank is folded (``q . L_t R_b^T =
(q R_b) . L_t`` for keys, ``(sum_t p_t L_t) R_b^T`` for values), so the error ``L R^T`` is never built (a tile
spanning several low-rank blocks, as in an evicted body, adds each token's row instead). ``q . k`` and ``p @ v``
run as dots accumulated in float32 (float32 FMA for float32 models, tensor cores in the model's half dtype
otherwise) with an online softmax. Each split writes its unnormalised output, running max and sum;
:func:`merge_splits` reduces them (the log-sum-exp merge). Rotation is handled by the caller: it rotates the
query once and un-rotates the output once.

``query`` is float32 ``[B, H, M, D]``, scaled by the softmax scale, in the rotated key basis. ``D`` must be a
power of two in [16, 256] (``tl.arange``); ``value_group`` a power of two dividing ``D``. The tile loop is
``BLOCK_N`` tokens; query rows are padded to 16 (``tl.dot``'s minimum).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvpress.kernels.layout import PackedBody
from kvpress.kernels.partial import AttentionPartial, merge_splits


@triton.jit
def _unpack(row_ptr, row_ok, offs_d, BITS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Codes ``[BLOCK_N, D]`` int32 of the rows at ``row_ptr`` ``[BLOCK_N]`` (pointers to each row's words)."""
    if 32 % BITS == 0:  # 2/4/8 bits: each word loaded once, its codes split off in registers
        PER: tl.constexpr = 32 // BITS
        W: tl.constexpr = D // PER
        offs_w = tl.arange(0, W)
        words = tl.load(row_ptr[:, None] + offs_w[None, :], mask=row_ok[:, None], other=0).to(tl.uint32, bitcast=True)
        shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
        codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        return tl.reshape(codes, (BLOCK_N, D)).to(tl.int32)
    else:  # 3 bits: 32 codes per 3 words, some straddling two words: gather both words of each code
        bitpos = offs_d * BITS
        word = bitpos // 32
        shift = (bitpos % 32).to(tl.uint32)
        ptr = row_ptr[:, None] + word[None, :]
        lo = tl.load(ptr, mask=row_ok[:, None], other=0).to(tl.uint32, bitcast=True)
        straddle = (bitpos % 32 + BITS) > 32
        hi = tl.load(ptr + 1, mask=row_ok[:, None] & straddle[None, :], other=0).to(tl.uint32, bitcast=True)
        back = ((32 - bitpos % 32) % 32).to(tl.uint32)  # never 32: no undefined shift
        val = (lo >> shift[None, :]) | tl.where(straddle[None, :], hi << back[None, :], 0)
        return (val & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _dot(a, b, DOT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``a @ b`` accumulated in float32: float32 FMA (DOT 0), or float16 / bfloat16 tensor cores (DOT 1 / 2).

    ``EMULATE_BF16`` (Triton's CPU interpreter, whose bfloat16 ``tl.dot`` returns garbage in triton 3.9): the
    operands are rounded to bfloat16 and multiplied in float32, which is what the tensor cores compute (products
    of bfloat16 values are exact in float32).
    """
    if DOT == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT == 2:
        if EMULATE_BF16:
            a16 = a.to(tl.bfloat16).to(tl.float32)
            b16 = b.to(tl.bfloat16).to(tl.float32)
            return tl.dot(a16, b16, input_precision="ieee")
        else:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _quant_decode_kernel(
    Q, s_qb, s_qh, s_qm,
    KC, s_kcb, s_kch, s_kcn,
    KS, KZ, s_ksb, s_ksh, s_ksg,
    VC, s_vcb, s_vch, s_vcn,
    VS, VZ, s_vsb, s_vsh, s_vsn,
    GID, s_gb, s_gh,
    GBLK,
    KL, s_klb, s_klh, s_kln, s_klr,
    VL, s_vlb, s_vlh, s_vln, s_vlr,
    KR, s_krb, s_krh, s_krk, s_krd, s_krr,
    VR, s_vrb, s_vrh, s_vrk, s_vrd, s_vrr,
    KOV, KOI, VOV, VOI, s_ob, s_oh, s_on,
    MASK, s_mb, s_mh, s_ml,
    ACC, RMAX, RSUM,
    H, N, SPLIT_TOKENS, L, N_SPLITS,
    M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    KBITS: tl.constexpr, VBITS: tl.constexpr, G: tl.constexpr, GV: tl.constexpr,
    HAS_GID: tl.constexpr, ALIGNED: tl.constexpr, R: tl.constexpr, KO: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT: tl.constexpr, EMULATE_BF16: tl.constexpr, FOLD: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.arange(0, M_PAD)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < M
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    row_max = tl.full([M_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([M_PAD], tl.float32)
    acc = tl.zeros([M_PAD, D], tl.float32)

    start = pid_s * SPLIT_TOKENS
    stop = tl.minimum(start + SPLIT_TOKENS, N)
    kc_base = KC + b * s_kcb + h * s_kch
    vc_base = VC + b * s_vcb + h * s_vch
    ks_base = b * s_ksb + h * s_ksh
    vs_base = b * s_vsb + h * s_vsh
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tok_ok = offs_n < stop
        # -- keys: unpack, dequantize with the token's key group, low-rank rows, outliers --------------------
        kcodes = _unpack(kc_base + offs_n * s_kcn, tok_ok, offs_d, KBITS, BLOCK_N, D).to(tl.float32)
        if HAS_GID:
            gid = tl.load(GID + b * s_gb + h * s_gh + offs_n, mask=tok_ok, other=0)
        else:
            gid = offs_n // G
        if ALIGNED:  # the whole tile lies in one key group: one scale row
            g0 = n0 // G
            kscale = tl.load(KS + ks_base + g0 * s_ksg + offs_d).to(tl.float32)
            kzero = tl.load(KZ + ks_base + g0 * s_ksg + offs_d).to(tl.float32)
            keys = kzero[None, :] + kcodes * kscale[None, :]
        else:
            sptr = ks_base + gid[:, None] * s_ksg + offs_d[None, :]
            kscale = tl.load(KS + sptr, mask=tok_ok[:, None], other=0.0).to(tl.float32)
            kzero = tl.load(KZ + sptr, mask=tok_ok[:, None], other=0.0).to(tl.float32)
            keys = kzero + kcodes * kscale
        if R > 0:
            blk = tl.load(GBLK + gid, mask=tok_ok, other=0)  # low-rank block of each token
            kl_ptr = KL + b * s_klb + h * s_klh + offs_n * s_kln
            kr_base = KR + b * s_krb + h * s_krh
            if not FOLD:  # a tile spanning several blocks (evicted body): add each token's low-rank row
                kr_ptr = kr_base + blk[:, None] * s_krk + offs_d[None, :] * s_krd
                for r in tl.static_range(R):
                    left = tl.load(kl_ptr + r * s_klr, mask=tok_ok, other=0.0).to(tl.float32)
                    right = tl.load(kr_ptr + r * s_krr, mask=tok_ok[:, None], other=0.0).to(tl.float32)
                    keys += left[:, None] * right
        if KO > 0:
            o_ptr = b * s_ob + h * s_oh + offs_n * s_on
            for o in tl.static_range(KO):
                idx = tl.load(KOI + o_ptr + o, mask=tok_ok, other=0).to(tl.int32)
                val = tl.load(KOV + o_ptr + o, mask=tok_ok, other=0.0).to(tl.float32)
                if FOLD:  # the folded low-rank term is added below: hold the outlier minus it at its channel
                    for r in tl.static_range(R):
                        left = tl.load(kl_ptr + r * s_klr, mask=tok_ok, other=0.0).to(tl.float32)
                        right = tl.load(kr_base + blk * s_krk + idx * s_krd + r * s_krr, mask=tok_ok, other=0.0)
                        val -= left * right.to(tl.float32)
                keys = tl.where(offs_d[None, :] == idx[:, None], val[:, None], keys)
        logits = _dot(q, tl.trans(keys), DOT, EMULATE_BF16)  # [M_PAD, BLOCK_N]
        if FOLD:  # GEAR low rank folded: q . (L_t R_b^T) = (q R_b) . L_t, the error L R^T is never built
            blk0 = tl.load(GBLK + n0 // G)
            for r in tl.static_range(R):
                right = tl.load(kr_base + blk0 * s_krk + offs_d * s_krd + r * s_krr).to(tl.float32)  # [D]
                left = tl.load(kl_ptr + r * s_klr, mask=tok_ok, other=0.0).to(tl.float32)  # [BLOCK_N]
                logits += tl.sum(q * right[None, :], axis=1)[:, None] * left[None, :]
        allowed = tok_ok[None, :] & row_ok[:, None]
        if HAS_MASK:
            mptr = MASK + b * s_mb + h * s_mh + (offs_m % L)[:, None] * s_ml + offs_n[None, :]
            allowed = allowed & (tl.load(mptr, mask=allowed, other=0) != 0)
        logits = tl.where(allowed, logits, float("-inf"))
        # -- online softmax ----------------------------------------------------------------------------------
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(row_max - safe)
        p = tl.exp(logits - safe[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        row_max = new_max
        # -- values: unpack, per-token groups, low-rank rows, outliers ---------------------------------------
        vcodes = _unpack(vc_base + offs_n * s_vcn, tok_ok, offs_d, VBITS, BLOCK_N, D).to(tl.float32)
        NG: tl.constexpr = D // GV
        vptr = vs_base + offs_n[:, None] * s_vsn + tl.arange(0, NG)[None, :]  # one scale per value group
        vscale = tl.load(VS + vptr, mask=tok_ok[:, None], other=0.0).to(tl.float32)
        vzero = tl.load(VZ + vptr, mask=tok_ok[:, None], other=0.0).to(tl.float32)
        values = tl.reshape(
            tl.reshape(vcodes, (BLOCK_N, NG, GV)) * vscale[:, :, None] + vzero[:, :, None], (BLOCK_N, D)
        )
        if R > 0:
            vl_ptr = VL + b * s_vlb + h * s_vlh + offs_n * s_vln
            vr_base = VR + b * s_vrb + h * s_vrh
            if not FOLD:
                vr_ptr = vr_base + blk[:, None] * s_vrk + offs_d[None, :] * s_vrd
                for r in tl.static_range(R):
                    left = tl.load(vl_ptr + r * s_vlr, mask=tok_ok, other=0.0).to(tl.float32)
                    right = tl.load(vr_ptr + r * s_vrr, mask=tok_ok[:, None], other=0.0).to(tl.float32)
                    values += left[:, None] * right
        if KO > 0:
            for o in tl.static_range(KO):
                idx = tl.load(VOI + o_ptr + o, mask=tok_ok, other=0).to(tl.int32)
                val = tl.load(VOV + o_ptr + o, mask=tok_ok, other=0.0).to(tl.float32)
                if FOLD:
                    for r in tl.static_range(R):
                        left = tl.load(vl_ptr + r * s_vlr, mask=tok_ok, other=0.0).to(tl.float32)
                        right = tl.load(vr_base + blk * s_vrk + idx * s_vrd + r * s_vrr, mask=tok_ok, other=0.0)
                        val -= left * right.to(tl.float32)
                values = tl.where(offs_d[None, :] == idx[:, None], val[:, None], values)
        acc = acc * alpha[:, None] + _dot(p, values, DOT, EMULATE_BF16)
        if FOLD:  # sum_t p_t L_t R_b^T = (p L) R_b^T
            for r in tl.static_range(R):
                left = tl.load(vl_ptr + r * s_vlr, mask=tok_ok, other=0.0).to(tl.float32)
                right = tl.load(vr_base + blk0 * s_vrk + offs_d * s_vrd + r * s_vrr).to(tl.float32)
                acc += tl.sum(p * left[None, :], axis=1)[:, None] * right[None, :]

    out = (pid_bh * N_SPLITS + pid_s) * M_PAD
    tl.store(ACC + (out + offs_m[:, None]) * D + offs_d[None, :], acc)
    tl.store(RMAX + out + offs_m, row_max)
    tl.store(RSUM + out + offs_m, row_sum)


def _block_n(body: PackedBody) -> tuple[int, bool]:
    """Tokens per tile and whether a tile always lies in one key group."""
    if body.group_ids is None:
        for block in (64, 32, 16):
            if body.group_size % block == 0:
                return block, True
    return 32, False


def _splits(b: int, h: int, n: int, block: int, target_programs: int) -> int:
    """Flash-decoding: enough splits over the sequence that ``b * h * splits`` fills the device."""
    tiles = -(-n // block)
    return max(1, min(tiles, -(-target_programs // (b * h))))


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: fewest programs (it runs them one after the other)


_DOTS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def quant_decode_triton(
    query: torch.Tensor,
    body: PackedBody,
    mask: torch.Tensor | None = None,
    splits: int | None = None,
    dot_dtype: torch.dtype = torch.float32,
) -> AttentionPartial:
    """Fused decode attention (same contract as :func:`~kvpress.kernels.quant_decode_torch.quant_decode_torch`).

    Args:
        query: ``[B, H, M, D]`` float32, scaled, rotated key basis.
        body: the packed body; ``body.n_tokens`` tokens are attended.
        mask: ``[B, H, L, n_tokens]`` bool (any strides; broadcast dims may have stride 0) or ``None``.
        splits: sequence splits per head (default: enough to give every SM a few programs on CUDA).
        dot_dtype: precision of the two dots: float32 (FMA, exact to float32), or the model's float16 /
            bfloat16 (tensor cores; keys and values rounded to it after dequantization, as the model's own
            attention reads them, and probabilities rounded as flash attention does; accumulation in float32).
    """
    b, h, m, d = query.shape
    n = body.n_tokens
    if n == 0:
        return AttentionPartial(query.new_zeros(b, h, m, d), query.new_full((b, h, m), float("-inf")))
    q = query.float().contiguous()
    block, aligned = _block_n(body)
    n_splits = splits or _splits(b, h, n, block, _target_programs(q.device))
    split_tokens = triton.cdiv(triton.cdiv(n, n_splits), block) * block  # a multiple of the tile
    n_splits = triton.cdiv(n, split_tokens)
    m_pad = max(16, triton.next_power_of_2(m))
    acc = torch.empty(b * h * n_splits * m_pad * d, device=q.device, dtype=torch.float32)
    row_max = torch.empty(b * h * n_splits * m_pad, device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    for t in (body.k_codes, body.v_codes, body.k_scale, body.v_scale):
        if t.stride(-1) != 1:
            raise ValueError("quant_decode_triton: body tensors must be contiguous along their last axis")
    dummy = q  # placeholder pointer for absent optional tensors (never read: guarded by constexpr flags)
    gid = body.group_ids if body.group_ids is not None else dummy
    rank, n_out = body.rank, body.n_outliers
    kl = body.k_left if rank else dummy
    vl = body.v_left if rank else dummy
    kr = body.k_right if rank else dummy
    vr = body.v_right if rank else dummy
    gblk = body.group_block if rank else dummy
    kov = body.k_out_val if n_out else dummy
    koi = body.k_out_idx if n_out else dummy
    vov = body.v_out_val if n_out else dummy
    voi = body.v_out_idx if n_out else dummy
    if mask is not None:
        mask_t = mask if mask.dtype != torch.bool else mask.view(torch.int8)
        if mask_t.stride(-1) != 1:
            mask_t = mask_t.contiguous()
        q_len = mask.shape[2]
        ms = (mask_t.stride(0), mask_t.stride(1), mask_t.stride(2))
    else:
        mask_t, q_len, ms = dummy, 1, (0, 0, 0)
    if n_out and len({kov.stride(), koi.stride(), vov.stride(), voi.stride()}) > 1 or (n_out and kov.stride(-1) != 1):
        # one stride set serves the four outlier tensors (a copy only if a caller built them differently)
        kov, koi, vov, voi = (t.contiguous() for t in (kov, koi, vov, voi))
    k_scale, k_zero, v_scale, v_zero = body.k_scale, body.k_zero, body.v_scale, body.v_zero
    if k_scale.stride() != k_zero.stride():
        k_scale, k_zero = k_scale.contiguous(), k_zero.contiguous()
    if v_scale.stride() != v_zero.stride():
        v_scale, v_zero = v_scale.contiguous(), v_zero.contiguous()
    _quant_decode_kernel[(b * h, n_splits)](
        q, q.stride(0), q.stride(1), q.stride(2),
        body.k_codes, *body.k_codes.stride()[:3],
        k_scale, k_zero, *k_scale.stride()[:3],
        body.v_codes, *body.v_codes.stride()[:3],
        v_scale, v_zero, *v_scale.stride()[:3],
        gid, *(gid.stride()[:2] if body.group_ids is not None else (0, 0)),
        gblk,
        kl, *(kl.stride() if rank else (0,) * 4),
        vl, *(vl.stride() if rank else (0,) * 4),
        kr, *(kr.stride() if rank else (0,) * 5),
        vr, *(vr.stride() if rank else (0,) * 5),
        kov, koi, vov, voi, *(kov.stride()[:3] if n_out else (0, 0, 0)),
        mask_t, *ms,
        acc, row_max, row_sum,
        h, n, split_tokens, q_len, n_splits,
        M=m, M_PAD=m_pad, D=d, BLOCK_N=block, KBITS=body.key_bits, VBITS=body.value_bits,
        G=body.group_size, GV=body.value_group, HAS_GID=body.group_ids is not None, ALIGNED=aligned,
        R=rank, KO=n_out, HAS_MASK=mask is not None, DOT=_DOTS[dot_dtype],
        EMULATE_BF16=os.environ.get("TRITON_INTERPRET", "0") == "1", FOLD=aligned and rank > 0,
    )  # fmt: skip
    shape = (b, h, n_splits, m_pad)
    part = merge_splits(acc.view(*shape, d), row_max.view(shape), row_sum.view(shape))
    return AttentionPartial(part.out[:, :, :m], part.lse[:, :, :m])
