"""Hadamard rotations: orthonormality, attention invariance, outlier spreading, channel reordering."""

import pytest
import torch

from kvpress.quant.quantizer import quantize
from kvpress.quant.rotation import (
    block_hadamard,
    hadamard,
    outlier_permutation,
    rotate,
    rotation_matrix,
    unrotate,
)

EYE = torch.eye


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_hadamard_orthonormal_and_flat(n):
    h = hadamard(n)
    assert h.dtype == torch.float64
    assert torch.allclose(h.T @ h, EYE(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5), atol=1e-15, rtol=0)


@pytest.mark.parametrize("head_dim", [64, 128, 96, 80, 48])
@pytest.mark.parametrize("seed", [None, 0, 3])
@pytest.mark.parametrize("with_perm", [False, True])
def test_rotation_matrix_orthonormal(head_dim, seed, with_perm):
    perm = torch.randperm(head_dim, generator=torch.Generator().manual_seed(head_dim)) if with_perm else None
    r = rotation_matrix(head_dim, seed=seed, perm=perm, dtype=torch.float64)
    assert r.shape == (head_dim, head_dim)
    assert torch.allclose(r.T @ r, EYE(head_dim, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(r @ r.T, EYE(head_dim, dtype=torch.float64), atol=1e-12, rtol=0)


def test_block_diagonal_for_non_power_of_two():
    r = block_hadamard(96)  # 3 blocks of 32
    assert torch.equal(r[:32, 32:], torch.zeros(32, 64, dtype=torch.float64))
    assert torch.allclose(r[:32, :32], hadamard(32))
    assert torch.allclose(r[64:, 64:], hadamard(32))
    assert torch.count_nonzero(block_hadamard(64, block_size=16)) == 4 * 16 * 16


def test_seed_changes_signs_deterministically():
    a, b, c = rotation_matrix(64, seed=1), rotation_matrix(64, seed=1), rotation_matrix(64, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.allclose(a.abs(), c.abs())


def _attention64(q, k, v):
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v


@pytest.mark.parametrize("head_dim", [64, 96])
def test_attention_invariant_under_rotation_float64(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(2, 4, 5, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, 4, 9, head_dim, generator=g, dtype=torch.float64) * 3
    v = torch.randn(2, 4, 9, head_dim, generator=g, dtype=torch.float64)
    rk = rotation_matrix(head_dim, seed=0, dtype=torch.float64)
    rv = rotation_matrix(head_dim, seed=1, perm=torch.randperm(head_dim, generator=g), dtype=torch.float64)
    logits = q @ k.transpose(-1, -2)
    assert torch.allclose((q @ rk) @ (k @ rk).transpose(-1, -2), logits, atol=1e-10, rtol=0)
    ref = _attention64(q, k, v)
    out = _attention64(q @ rk, k @ rk, v @ rv) @ rv.T
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)


def test_attention_invariant_under_rotation_sdpa_float32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 7, 64, generator=g) for _ in range(3))
    r = rotation_matrix(64, seed=5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        rotate(q, r), rotate(k, r), rotate(v, r), is_causal=True
    )
    assert torch.allclose(unrotate(out, r), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotate_unrotate_round_trip(dtype):
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    r = rotation_matrix(64, seed=0)
    y = rotate(x, r)
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 5e-2}[dtype]
    assert torch.allclose(unrotate(y, r).double(), x.double(), atol=tol * 4, rtol=tol)


def test_rotation_reduces_quantization_error_with_outlier_channels():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 64, 64, generator=g)
    x[..., [3, 17, 40]] *= 20.0  # outlier channels, as in real keys/values
    r = rotation_matrix(64, seed=0)
    plain = (quantize(x, 2, 32, "token").dequantize() - x).norm()
    rotated = (unrotate(quantize(rotate(x, r), 2, 32, "token").dequantize(), r) - x).norm()
    assert rotated < 0.7 * plain


def test_outlier_permutation_spreads_outliers_across_blocks():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 64, generator=g)
    x[:, :4] *= torch.tensor([30.0, 25.0, 20.0, 15.0])  # four outlier channels, all in block 0 by default
    perm = outlier_permutation(x, block_size=16)
    assert torch.equal(torch.sort(perm).values, torch.arange(64))
    blocks = [int((perm == c).nonzero()) // 16 for c in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3]
    # the heaviest block holds far less energy than with the identity order (all four outliers in block 0)
    energy = x.pow(2).mean(0)
    per_block = energy[perm].reshape(4, 16).sum(1)
    identity = energy.reshape(4, 16).sum(1)
    assert per_block.max() < 0.5 * identity.max()
    # and block rotation then quantization loses less than without the reordering
    plain_r = rotation_matrix(64, seed=0, block_size=16)
    perm_r = rotation_matrix(64, seed=0, block_size=16, perm=perm)

    def err(r):
        return (unrotate(quantize(rotate(x, r), 2, 16, "token").dequantize(), r) - x).norm()

    assert err(perm_r) < err(plain_r)


def test_bad_inputs_raise():
    for n in (0, 3, 12, 2.0):
        with pytest.raises(ValueError, match="power of two"):
            hadamard(n)
    with pytest.raises(ValueError, match="head_dim=63"):
        rotation_matrix(63)
    with pytest.raises(ValueError, match="block_size"):
        rotation_matrix(64, block_size=12)
    with pytest.raises(ValueError, match="block_size"):
        rotation_matrix(96, block_size=64)
    with pytest.raises(ValueError, match="perm"):
        rotation_matrix(8, perm=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="perm"):
        rotation_matrix(8, perm=torch.arange(4))
