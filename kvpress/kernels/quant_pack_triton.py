"""Fused Triton quantize-and-pack: full-precision K/V -> packed codes, scales and zeros, bit-exact with torch.

Its reference is ``kvpress.quant.quantizer.quantize`` (the storage's quantizer, the source of truth), which it
reproduces bit for bit (``tests/test_kernels_quant_pack.py``): min/max in float32, ``zero`` rounded down and
``scale = (max - zero) / levels`` rounded up to the scale dtype (round-to-nearest, then one step with
``nextafter`` when it went the wrong way), IEEE-rounded divisions, round-half-to-even codes clamped to
``[0, 2**bits - 1]``, then the bit stream of ``kvpress/quant/packing.py`` (code ``i`` at bits
``[bits*i, bits*i + bits)``, little-endian, words read as unsigned).

* ``axis="channel"`` (keys): grid ``(rows, key groups)``, one program per group of ``group_size`` tokens; a
  last partial group takes the min/max of the tokens it has.
* ``axis="token"`` (values): grid ``(rows, token tiles)``, groups of ``group_size`` channels per token.

Limits (the caller falls back to torch otherwise): float16/bfloat16/float32 input, head_dim and the value group
powers of two, no ``exclude`` mask (GEAR outliers quantize in torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpress.kernels.layout import check_scale_range

_SCALE_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@triton.jit
def _round_toward(v, UP: tl.constexpr, SDT: tl.constexpr):
    """``v`` (float32) rounded to the scale dtype in a fixed direction; returned in that dtype."""
    if SDT == 2:
        return v
    else:
        if SDT == 0:
            r = v.to(tl.float16)
        else:
            r = v.to(tl.bfloat16)
        back = r.to(tl.float32)
        if UP:
            wrong = back < v
        else:
            wrong = back > v
        bits = r.to(tl.int16, bitcast=True).to(tl.int32)
        negative = bits < 0
        is_zero = (bits & 0x7FFF) == 0
        if UP:  # toward +inf: positive grows (+1), negative shrinks in magnitude (-1), zero -> +min subnormal
            moved = tl.where(is_zero, 1, tl.where(negative, bits - 1, bits + 1))
        else:  # toward -inf: positive shrinks (-1), negative grows (+1), zero -> -min subnormal (0x8001)
            moved = tl.where(is_zero, -32767, tl.where(negative, bits + 1, bits - 1))
        out = tl.where(wrong, moved, bits).to(tl.int16)
        if SDT == 0:
            return out.to(tl.float16, bitcast=True)
        else:
            return out.to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_half_even(y):
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _codes(x, zero32, scale32, LEVELS: tl.constexpr):
    divisor = tl.where(scale32 > 0, scale32, 1.0)
    c = _round_half_even(tl.div_rn(x - zero32, divisor))
    return tl.minimum(tl.maximum(c, 0.0), LEVELS * 1.0).to(tl.int32)


@triton.jit
def _store_packed(OUT, row_words, row_ok, codes, offs_d, BITS: tl.constexpr, W: tl.constexpr, T: tl.constexpr,
                  D: tl.constexpr):  # fmt: skip
    """Pack ``codes`` ``[T, D]`` along D into ``W`` int32 words per row, stored at ``OUT + row_words + w``."""
    c = codes.to(tl.uint32)
    if 32 % BITS == 0:  # 2/4/8 bits: word w holds codes w*P .. w*P + P - 1, no straddling
        PER: tl.constexpr = 32 // BITS
        shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
        words = tl.sum(tl.reshape(c, (T, W, PER)) << shifts[None, None, :], axis=2)  # disjoint bits: sum == or
        offs_w = tl.arange(0, W)
        tl.store(OUT + row_words[:, None] + offs_w[None, :], words.to(tl.int32, bitcast=True), mask=row_ok[:, None])
    else:  # 3 bits: some codes straddle two words; build each word from the codes overlapping it
        bitpos = offs_d * BITS
        for w in tl.static_range(W):
            rel = bitpos - 32 * w
            low = (rel >= 0) & (rel < 32)  # the code starts in this word
            high = (rel < 0) & (rel > -BITS)  # the code started in the previous word and spills into this one
            sh_low = tl.where(low, rel, 0).to(tl.uint32)
            sh_high = tl.where(high, -rel, 0).to(tl.uint32)
            part = tl.where(low[None, :], c << sh_low[None, :], tl.where(high[None, :], c >> sh_high[None, :], 0))
            word = tl.sum(part.to(tl.int64), axis=1)  # disjoint bit fields: the sum is the bitwise or
            tl.store(OUT + row_words + w, word.to(tl.int32), mask=row_ok)


@triton.jit
def _pack_channel_kernel(
    X, CODES, SCALE, ZERO, T, n_groups,
    D: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr,
    SDT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    grp = tl.program_id(1)
    offs_t = grp * G + tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    tok_ok = (tl.arange(0, G_PAD) < G) & (offs_t < T)
    x = tl.load(X + (row * T + offs_t[:, None]) * D + offs_d[None, :], mask=tok_ok[:, None], other=0.0)
    x = x.to(tl.float32)
    mn = tl.min(tl.where(tok_ok[:, None], x, float("inf")), axis=0)
    mx = tl.max(tl.where(tok_ok[:, None], x, float("-inf")), axis=0)
    zero = _round_toward(mn, False, SDT)
    zero32 = zero.to(tl.float32)
    scale = _round_toward(tl.div_rn(tl.maximum(mx - zero32, 0.0), (1 << BITS) - 1.0), True, SDT)
    scale32 = scale.to(tl.float32)
    sg = (row * n_groups + grp) * D + offs_d
    tl.store(SCALE + sg, scale)
    tl.store(ZERO + sg, zero)
    codes = _codes(x, zero32[None, :], scale32[None, :], (1 << BITS) - 1)
    _store_packed(CODES, (row * T + offs_t) * W, tok_ok, codes, offs_d, BITS, W, G_PAD, D)


@triton.jit
def _pack_token_kernel(
    X, CODES, SCALE, ZERO, T,
    D: tl.constexpr, GV: tl.constexpr, NG: tl.constexpr, BLOCK_T: tl.constexpr, BITS: tl.constexpr,
    W: tl.constexpr, SDT: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    tile = tl.program_id(1)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    tok_ok = offs_t < T
    x = tl.load(X + (row * T + offs_t[:, None]) * D + offs_d[None, :], mask=tok_ok[:, None], other=0.0)
    x3 = tl.reshape(x.to(tl.float32), (BLOCK_T, NG, GV))
    mn = tl.min(x3, axis=2)
    mx = tl.max(x3, axis=2)
    zero = _round_toward(mn, False, SDT)
    zero32 = zero.to(tl.float32)
    scale = _round_toward(tl.div_rn(tl.maximum(mx - zero32, 0.0), (1 << BITS) - 1.0), True, SDT)
    scale32 = scale.to(tl.float32)
    offs_g = tl.arange(0, NG)
    sg = (row * T + offs_t[:, None]) * NG + offs_g[None, :]
    tl.store(SCALE + sg, scale, mask=tok_ok[:, None])
    tl.store(ZERO + sg, zero, mask=tok_ok[:, None])
    codes = tl.reshape(_codes(x3, zero32[:, :, None], scale32[:, :, None], (1 << BITS) - 1), (BLOCK_T, D))
    _store_packed(CODES, (row * T + offs_t) * W, tok_ok, codes, offs_d, BITS, W, BLOCK_T, D)


def quantize_pack_triton(
    x: torch.Tensor, bits: int, group_size: int, axis: str, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and pack ``x`` ``[..., T, D]`` as :func:`kvpress.quant.quantizer.quantize` does.

    Returns:
        ``(codes, scale, zero)``: codes ``[..., T, words(D, bits)]`` int32; scale and zero ``[..., ceil(T/G), D]``
        (``axis="channel"``) or ``[..., T, D // G]`` (``axis="token"``) in ``scale_dtype``.

    Raises:
        ValueError: the range of a group does not fit ``scale_dtype`` (as the torch quantizer does).
    """
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {tuple(_SCALE_DTYPES)}, got {scale_dtype}")
    *lead, t, d = x.shape
    rows = 1
    for n in lead:
        rows *= n
    xc = x.contiguous().view(rows, t, d)
    words = -(-d * bits // 32)
    codes = torch.empty(rows, t, words, dtype=torch.int32, device=x.device)
    sdt = _SCALE_DTYPES[scale_dtype]
    if axis == "channel":
        n_groups = -(-t // group_size)
        scale = torch.empty(rows, n_groups, d, dtype=scale_dtype, device=x.device)
        zero = torch.empty_like(scale)
        if rows and n_groups:
            _pack_channel_kernel[(rows, n_groups)](
                xc, codes, scale, zero, t, n_groups,
                D=d, G=group_size, G_PAD=max(16, triton.next_power_of_2(group_size)), BITS=bits, W=words, SDT=sdt,
            )  # fmt: skip
        shape = (*lead, n_groups, d)
    elif axis == "token":
        ng = d // group_size
        scale = torch.empty(rows, t, ng, dtype=scale_dtype, device=x.device)
        zero = torch.empty_like(scale)
        block_t = 16
        if rows and t:
            _pack_token_kernel[(rows, triton.cdiv(t, block_t))](
                xc, codes, scale, zero, t,
                D=d, GV=group_size, NG=ng, BLOCK_T=block_t, BITS=bits, W=words, SDT=sdt,
            )  # fmt: skip
        shape = (*lead, t, ng)
    else:
        raise ValueError(f"axis must be 'channel' or 'token', got {axis!r}")
    check_scale_range(zero, scale, scale_dtype)
    return codes.view(*lead, t, words), scale.view(shape), zero.view(shape)
