"""Bit packing of b-bit integer codes into 32-bit words.

Layout (read by the fused kernels; keep it stable)
---------------------------------------------------
Read in place by ``kvpress/kernels/quant_decode_triton.py`` (``_unpack``), ``kvpress/kernels/unpack.py`` (the
chunked torch path) and written by ``kvpress/kernels/quant_pack_triton.py``; tests check both against
:func:`pack` / :func:`unpack`.

Codes are packed along the **last axis** of the code tensor. Each row of ``n`` codes becomes
``packed_words(n, bits) = ceil(n * bits / 32)`` words of dtype ``torch.int32``; a word is to be read as an
*unsigned* 32-bit integer (``int32`` is used only because torch has no general ``uint32`` arithmetic; a kernel
should bit-cast to ``uint32`` or mask after shifting).

The words of one row form a little-endian bit stream: bit ``k`` of the stream is bit ``k % 32`` of word
``k // 32``, and code ``i`` occupies stream bits ``[bits * i, bits * i + bits)``, least significant bit first.
So code 0 sits in the low bits of word 0. Concretely:

* ``bits`` in {2, 4, 8}: no code straddles a word. Word ``w`` holds codes ``w*c .. w*c + c - 1`` with
  ``c = 32 // bits`` (16, 8, 4 codes per word); code ``i`` is ``(word[i // c] >> (bits * (i % c))) & mask``.
* ``bits == 3``: dense, 32 codes fill exactly 3 words (96 bits). Code ``i`` starts at stream bit ``3 * i``;
  codes 10 and 21 of every 32-code block straddle a word boundary (code 10 = bits 30..31 of word 0 and bit 0
  of word 1; code 21 = bit 31 of word 1 and bits 0..1 of word 2). Decode as
  ``((word[w] | word[w + 1] << 32) >> s) & 7`` with ``w = (3 * i) // 32`` and ``s = (3 * i) % 32``.

Padding: a row whose length is not a multiple of the block (``32 / gcd(32, bits)`` codes) is padded with zero
codes in the last word(s); :func:`unpack` takes the true length and drops the padding, so the round trip is
exact for any length. The length is not stored in the words: the caller (e.g.
:class:`~kvpress.quant.quantizer.QuantizedTensor`) remembers it.
"""

from __future__ import annotations

import math

import torch

ALLOWED_BITS = (2, 3, 4, 8)
WORD_BITS = 32
_WORD_DTYPE = torch.int32


def check_bits(bits: int, name: str = "bits") -> int:
    """Validate a bit width; returns it as an ``int``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"{name} must be one of {ALLOWED_BITS}, got {bits!r}")
    return bits


def _block(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest whole block: 32 codes / 3 words for 3-bit, 16 / 1 for 2-bit, ..."""
    g = math.gcd(WORD_BITS, bits)
    return WORD_BITS // g, bits // g


def packed_words(length: int, bits: int) -> int:
    """Number of 32-bit words one row of ``length`` codes packs into."""
    check_bits(bits)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    return -(-length * bits // WORD_BITS)


def _layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per code of one block: index of its first word and its bit shift inside that word."""
    n_codes, _ = _block(bits)
    start = torch.arange(n_codes, device=device, dtype=torch.int64) * bits
    return start // WORD_BITS, start % WORD_BITS


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into ``int32`` words (layout above).

    Args:
        codes: integer tensor ``[..., n]`` (any integer dtype); values outside ``[0, 2**bits)`` raise.
        bits: 2, 3, 4 or 8.

    Returns:
        ``[..., packed_words(n, bits)]`` int32.
    """
    check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    n_words = packed_words(n, bits)
    if n == 0:
        return torch.zeros(*lead, 0, dtype=_WORD_DTYPE, device=codes.device)
    c = codes.to(torch.int64)
    if bool(((c < 0) | (c >= (1 << bits))).any()):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    block_codes, block_words = _block(bits)
    n_blocks = -(-n // block_codes)
    pad = n_blocks * block_codes - n
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, n_blocks, block_codes)
    word, shift = _layout(bits, codes.device)
    shifted = c << shift  # < 2**(31 + bits): fits int64 without touching the sign bit
    low = shifted & 0xFFFFFFFF
    high = shifted >> WORD_BITS  # non-zero only for codes straddling into the next word
    # One extra word receives the (always zero) spill of the block's last code.
    out = torch.zeros(*lead, n_blocks, block_words + 1, dtype=torch.int64, device=codes.device)
    idx = word.expand_as(low)
    out.scatter_add_(-1, idx, low)  # bits never overlap, so a sum is a bitwise or
    out.scatter_add_(-1, idx + 1, high)
    out = out[..., :block_words].reshape(*lead, n_blocks * block_words)[..., :n_words]
    # Reinterpret unsigned 32-bit values as int32 (two's complement).
    out = torch.where(out >= (1 << 31), out - (1 << 32), out)
    return out.to(_WORD_DTYPE).contiguous()


def unpack(words: torch.Tensor, bits: int, length: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[..., packed_words(length, bits)]`` int32 -> ``[..., length]`` codes."""
    check_bits(bits)
    if words.dtype != _WORD_DTYPE:
        raise TypeError(f"words must be int32, got {words.dtype}")
    if words.shape[-1] != packed_words(length, bits):
        raise ValueError(
            f"length={length} at bits={bits} needs {packed_words(length, bits)} words, got {words.shape[-1]}"
        )
    lead = words.shape[:-1]
    if length == 0:
        return torch.zeros(*lead, 0, dtype=dtype, device=words.device)
    block_codes, block_words = _block(bits)
    n_blocks = -(-length // block_codes)
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, n_blocks * block_words - w.shape[-1]))
    # A zero word after each block: the last code's "next word" read, whose bits the mask always drops.
    blocks = torch.nn.functional.pad(w.reshape(*lead, n_blocks, block_words), (0, 1))
    word, shift = _layout(bits, words.device)
    lo = blocks.index_select(-1, word)
    hi = blocks.index_select(-1, word + 1)
    codes = ((lo | (hi << WORD_BITS)) >> shift) & ((1 << bits) - 1)
    return codes.reshape(*lead, n_blocks * block_codes)[..., :length].to(dtype)
