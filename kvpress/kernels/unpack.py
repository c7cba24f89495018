"""Unpack b-bit codes from 32-bit words in torch, chunk by chunk (the layout of ``kvpress.quant.packing``).

Kept here, below ``kvpress.quant``, so the kernels package imports nothing from the rest of kvpress. The layout
(little-endian bit stream per row, code ``i`` at stream bits ``[bits*i, bits*i + bits)``) is documented in
``kvpress/quant/packing.py``; ``tests/test_kernels_quant_decode.py`` checks this unpacker against it.
"""

from __future__ import annotations

import torch

_SHIFTS: dict[tuple[int, str], torch.Tensor] = {}


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    key = (bits, str(device))
    if key not in _SHIFTS:
        _SHIFTS[key] = torch.arange(0, 32, bits, dtype=torch.int32, device=device)
    return _SHIFTS[key]


def unpack_codes(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """``[..., words]`` int32 -> ``[..., length]`` int32 codes in ``[0, 2**bits)``.

    2/4/8 bits: a shift and a mask per code in int32 (the arithmetic shift's sign bits are masked away).
    3 bits: codes straddle words, decoded from the 64-bit pair ``word[w] | word[w + 1] << 32``.
    """
    if bits in (2, 4, 8):
        per_word = 32 // bits
        codes = (words.unsqueeze(-1) >> _shifts(bits, words.device)) & ((1 << bits) - 1)
        return codes.flatten(-2)[..., :length] if words.shape[-1] * per_word != length else codes.flatten(-2)
    if bits != 3:
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits!r}")
    start = torch.arange(length, device=words.device) * 3
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, 1))
    lo = w.index_select(-1, start // 32)
    hi = w.index_select(-1, start // 32 + 1)
    return (((lo | (hi << 32)) >> (start % 32)) & 7).to(torch.int32)
