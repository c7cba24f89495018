"""GEAR error correction: low-rank power iteration per batch/head, sparse outliers, byte accounting."""

import math

import pytest
import torch

from kvpress.quant.lowrank import gear_quantize, lowrank, select_outliers
from kvpress.quant.quantizer import quantize


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_error_non_increasing_in_rank():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(2, 3, 48, 32, generator=g)
    errs = [(lowrank(e, r, iters=2, factor_dtype=torch.float32).reconstruct() - e).norm() for r in range(13)]
    for a, b in zip(errs, errs[1:]):
        assert b <= a * (1 + 1e-6)
    assert errs[-1] < 0.8 * errs[0]
    assert errs[0] == e.norm()  # rank 0 corrects nothing


def test_gear_error_decreases_with_rank_fp16_factors():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 128, 64, generator=g)
    x[..., 7] *= 8
    errs = [_rel(gear_quantize(x, 2, 32, "channel", rank=r).dequantize(), x) for r in (0, 1, 2, 4, 8)]
    for a, b in zip(errs, errs[1:]):
        assert b < a
    assert errs[-1] < 0.85 * errs[0]


def test_each_batch_element_and_head_gets_its_own_basis():
    # E[b, h] = u_bh v_bh^T with unrelated vectors: rank 1 must recover every (b, h), not only batch 0's basis.
    g = torch.Generator().manual_seed(2)
    u = torch.randn(3, 2, 40, 1, generator=g)
    v = torch.randn(3, 2, 24, 1, generator=g)
    e = u @ v.transpose(-1, -2)
    approx = lowrank(e, 1, iters=2, factor_dtype=torch.float32).reconstruct()
    for b in range(3):
        for h in range(2):
            assert _rel(approx[b, h], e[b, h]) < 1e-5
    # reusing batch 0's left basis for batch 1 would fail badly
    low = lowrank(e, 1, factor_dtype=torch.float32)
    wrong = low.left[0, 0] @ (low.left[0, 0].T @ e[1, 0])
    assert _rel(wrong, e[1, 0]) > 0.5


def test_power_iteration_close_to_truncated_svd():
    g = torch.Generator().manual_seed(3)
    a = torch.linalg.qr(torch.randn(2, 64, 64, generator=g, dtype=torch.float64)).Q
    b = torch.linalg.qr(torch.randn(2, 32, 32, generator=g, dtype=torch.float64)).Q
    sv = 0.7 ** torch.arange(32, dtype=torch.float64)
    e = (a[..., :32] * sv) @ b.transpose(-1, -2)  # known singular values 0.7**i
    for r in (1, 4, 8):
        err = (lowrank(e, r, iters=10, factor_dtype=torch.float64).reconstruct(torch.float64) - e).norm(dim=(-2, -1))
        optimal = sv[r:].norm()
        assert torch.all(err <= optimal * 1.01)


def test_rank_capped_and_factor_shapes():
    e = torch.randn(2, 5, 8)
    low = lowrank(e, 16)
    assert low.left.shape == (2, 5, 5) and low.right.shape == (2, 8, 5)
    assert low.left.dtype == torch.float16
    assert _rel(low.reconstruct(), e) < 2e-3  # full rank: exact up to fp16 factors
    zero = lowrank(torch.zeros(1, 6, 4), 2)
    assert torch.equal(zero.reconstruct(), torch.zeros(1, 6, 4))


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1])
def test_outliers_are_the_largest_of_each_row_and_kept_exactly(fraction):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 50, 64, generator=g).to(torch.bfloat16)
    out = select_outliers(x, fraction)
    k = math.ceil(fraction * 64)
    assert out.values.shape == (2, 3, 50, k) and out.indices.shape == (2, 3, 50, k)
    assert out.values.dtype == torch.bfloat16 and out.indices.dtype == torch.uint8
    mask = out.mask(x.shape)
    assert torch.equal(mask.sum(-1), torch.full((2, 3, 50), k))
    absx = x.float().abs()
    kept_min = absx.masked_fill(~mask, float("inf")).amin(-1)
    other_max = absx.masked_fill(mask, float("-inf")).amax(-1)
    assert (kept_min >= other_max).all()
    gt = gear_quantize(x, 2, 16, "token", outlier_fraction=fraction)
    y = gt.dequantize()
    assert torch.equal(y[mask], x[mask])
    assert select_outliers(torch.randn(2, 300), 0.01).indices.dtype == torch.int16  # D > 256


def test_exclude_marks_padding_rows():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2, 32, 16, generator=g)
    pad = torch.zeros_like(x, dtype=torch.bool)
    pad[:, :, 20:] = True
    x_padded = x.masked_fill(pad, 1000.0)  # garbage that must not widen any key group
    gt = gear_quantize(x_padded, 4, 32, "channel", rank=2, exclude=pad)
    ref = gear_quantize(x[:, :, :20], 4, 20, "channel", rank=0)
    y = gt.dequantize()[:, :, :20]
    assert _rel(y, x[:, :, :20]) <= _rel(ref.dequantize(), x[:, :, :20]) + 1e-6


def test_outliers_tighten_the_other_groups():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 64, 64, generator=g)
    spikes = torch.rand(x.shape, generator=g) < 0.01
    x[spikes] = 40.0
    plain = gear_quantize(x, 3, 32, "token")
    sparse = gear_quantize(x, 3, 32, "token", outlier_fraction=0.02)
    assert _rel(sparse.dequantize(), x) < 0.3 * _rel(plain.dequantize(), x)


def test_bytes_count_every_term():
    x = torch.randn(2, 3, 64, 32)
    q = quantize(x, 4, 32, "channel")
    gt = gear_quantize(x, 4, 32, "channel", rank=2, outlier_fraction=0.05)
    k = math.ceil(0.05 * 32)  # per token row
    # fp16 factors (64 tokens + 32 channels, rank 2); per outlier an fp32 value and a uint8 channel index
    expected = q.nbytes() + 2 * 3 * (64 + 32) * 2 * 2 + 2 * 3 * 64 * k * (4 + 1)
    assert gt.nbytes() == expected
    assert sum(t.numel() * t.element_size() for t in gt.tensors()) == expected


def test_bad_inputs_raise():
    e = torch.randn(4, 8)
    for rank in (-1, 1.5, True):
        with pytest.raises(ValueError, match="rank"):
            lowrank(e, rank)
        with pytest.raises(ValueError, match="rank"):
            gear_quantize(e, 4, 8, "token", rank=rank)
    for frac in (-0.1, 1.0, 1.5, "0.1"):
        with pytest.raises(ValueError, match="outlier_fraction"):
            gear_quantize(e, 4, 8, "token", outlier_fraction=frac)
        with pytest.raises(ValueError, match="outlier_fraction"):
            select_outliers(e, frac)
    with pytest.raises(ValueError, match="iters"):
        lowrank(e, 2, iters=-1)
