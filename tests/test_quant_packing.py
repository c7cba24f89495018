"""Bit packing: exact round trips and the documented little-endian bit-stream layout."""

import pytest
import torch

from kvpress.quant.packing import ALLOWED_BITS, pack, packed_words, unpack


def _reference_words(codes: list[int], bits: int) -> list[int]:
    """The documented layout built with Python integers: code i at stream bits [bits*i, bits*i + bits)."""
    stream = 0
    for i, c in enumerate(codes):
        stream |= c << (bits * i)
    n_words = -(-len(codes) * bits // 32)
    return [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]


@pytest.mark.parametrize("bits", ALLOWED_BITS)
@pytest.mark.parametrize("length", [0, 1, 3, 7, 10, 11, 31, 32, 33, 63, 64, 97])
def test_round_trip_exact(bits, length):
    g = torch.Generator().manual_seed(1000 * bits + length)
    codes = torch.randint(0, 2**bits, (2, 3, length), generator=g)
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (2, 3, packed_words(length, bits))
    assert torch.equal(unpack(words, bits, length).long(), codes)


@pytest.mark.parametrize("bits", ALLOWED_BITS)
@pytest.mark.parametrize("length", [1, 5, 10, 21, 32, 45])
def test_layout_matches_documented_bit_stream(bits, length):
    g = torch.Generator().manual_seed(7 * bits + length)
    codes = torch.randint(0, 2**bits, (length,), generator=g)
    words = pack(codes, bits)
    unsigned = [w & 0xFFFFFFFF for w in words.tolist()]
    assert unsigned == _reference_words(codes.tolist(), bits)


def test_three_bit_straddling_codes():
    # code 10 occupies bits 30..31 of word 0 and bit 0 of word 1; code 21: bit 31 of word 1, bits 0..1 of word 2
    codes = torch.zeros(32, dtype=torch.int64)
    codes[10] = 0b101
    codes[21] = 0b011
    w = [x & 0xFFFFFFFF for x in pack(codes, 3).tolist()]
    assert w == [0b01 << 30, 0b1 | (0b1 << 31), 0b01]


def test_extreme_codes_and_sign_bit():
    # all-ones codes fill every bit of every word, including the int32 sign bit
    for bits in ALLOWED_BITS:
        n = 96
        codes = torch.full((n,), 2**bits - 1)
        words = pack(codes, bits)
        assert all(w == -1 for w in words.tolist())
        assert torch.equal(unpack(words, bits, n).long(), codes)


def test_dense_word_counts():
    assert packed_words(64, 3) == 6  # 192 bits exactly, no waste
    assert packed_words(32, 3) == 3
    assert packed_words(10, 3) == 1
    assert packed_words(11, 3) == 2
    assert packed_words(64, 2) == 4
    assert packed_words(64, 4) == 8
    assert packed_words(64, 8) == 16
    assert packed_words(0, 4) == 0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(4, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack(torch.tensor([-1, 0]), 2)
    with pytest.raises(TypeError):
        pack(torch.zeros(4), 4)
    with pytest.raises(ValueError, match="length"):
        unpack(torch.zeros(2, dtype=torch.int32), 4, 20)
    with pytest.raises(TypeError):
        unpack(torch.zeros(2, dtype=torch.int64), 4, 16)
