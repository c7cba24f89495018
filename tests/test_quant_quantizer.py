"""Asymmetric min/max group quantization against a float64 reference."""

import dataclasses

import pytest
import torch

from kvpress.quant.packing import packed_words
from kvpress.quant.quantizer import quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference_groups(x64: torch.Tensor, group_size: int, axis: str):
    """Yield (index, slice-of-x) for every group, by explicit slicing (independent of the implementation)."""
    t, d = x64.shape[-2], x64.shape[-1]
    if axis == "channel":
        for gi, start in enumerate(range(0, t, group_size)):
            yield (gi, slice(None)), (slice(start, start + group_size), slice(None))
    else:
        for gi, start in enumerate(range(0, d, group_size)):
            yield (slice(None), gi), (slice(None), slice(start, start + group_size))


def _check_against_reference(x: torch.Tensor, bits: int, group_size: int, axis: str, scale_dtype=torch.float16):
    q = quantize(x, bits, group_size, axis, scale_dtype=scale_dtype)
    x64 = x.double()
    y64 = q.dequantize(torch.float64)
    codes = q.unpacked_codes().long()
    levels = 2**bits - 1
    assert y64.shape == x.shape
    assert codes.max() <= levels
    n_groups = 0
    for (gsel_t, gsel_d), (xs_t, xs_d) in _reference_groups(x64, group_size, axis):
        n_groups += 1
        xg = x64[..., xs_t, xs_d]
        red = (-2,) if axis == "channel" else (-1,)
        mn, mx = xg.amin(red), xg.amax(red)
        scale = q.scale[..., gsel_t, gsel_d].double()
        zero = q.zero[..., gsel_t, gsel_d].double()
        # stored zero is min rounded down, stored scale is (max - min) / (2**b - 1) rounded up (fp16 precision)
        ref_scale = (mx - mn) / levels
        tol = 2.0**-10 if scale_dtype == torch.float16 else 1e-6
        assert (zero <= mn).all()
        assert ((mn - zero) <= tol * mn.abs() + 1e-7).all()
        assert (scale >= ref_scale * (1 - 1e-6)).all()
        assert (scale <= ref_scale * (1 + 2 * tol) + tol * (mn.abs() + mx.abs()) / levels + 1e-7).all()
        # error: at most half a stored step per element (+ float32 arithmetic rounding)
        s = scale.unsqueeze(red[0])
        z = zero.unsqueeze(red[0])
        err = (x64[..., xs_t, xs_d] - y64[..., xs_t, xs_d]).abs()
        eps = 1e-6 * (x64[..., xs_t, xs_d].abs() + 1)
        assert (err <= s / 2 + eps).all(), float((err - s / 2).max())
        # codes are round-to-nearest of the float64 reference except at exact ties
        ref = ((x64[..., xs_t, xs_d] - z) / torch.where(s > 0, s, torch.ones_like(s))).clamp(0, levels)
        frac = ref - ref.floor()
        clear = (frac - 0.5).abs() > 1e-3
        assert torch.equal(codes[..., xs_t, xs_d][clear], ref.round()[clear].long())
    return q, n_groups


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [4, 16, 32])
def test_per_channel_keys_against_float64(bits, dtype, group_size):
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    x = (torch.randn(2, 3, 37, 64, generator=g) * 2 + 0.5).to(dtype)  # 37 tokens: a partial last group
    q, n_groups = _check_against_reference(x, bits, group_size, "channel")
    assert n_groups == -(-37 // group_size)
    assert q.scale.shape == (2, 3, n_groups, 64)
    assert q.codes.shape == (2, 3, 37, packed_words(64, bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [8, 32, 64])
def test_per_token_values_against_float64(bits, dtype, group_size):
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    x = (torch.randn(3, 2, 19, 64, generator=g) * 3 - 1).to(dtype)
    q, n_groups = _check_against_reference(x, bits, group_size, "token")
    assert n_groups == 64 // group_size
    assert q.scale.shape == (3, 2, 19, 64 // group_size)


@pytest.mark.parametrize("axis", ["channel", "token"])
def test_float32_scales(axis):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 40, 32, generator=g) * 100 + 1000  # large offset: fp16 zero would be coarse
    _check_against_reference(x, 3, 8, axis, scale_dtype=torch.float32)


def test_three_bit_uses_eight_levels():
    # 2**3 - 1 = 7 steps, not 3**2 - 1 = 8: values 0..7 map to codes 0..7 and reconstruct exactly.
    x = torch.arange(8, dtype=torch.float32).reshape(1, 8)
    q = quantize(x, 3, 8, "token")
    assert q.scale.item() == 1.0
    assert q.unpacked_codes().long().tolist() == [list(range(8))]
    assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_all_levels_exact_on_grid(bits):
    # a group holding exactly the grid zero + k * step reconstructs exactly at every level
    levels = 2**bits - 1
    x = (torch.arange(levels + 1, dtype=torch.float32) * 0.25 - 3.0).reshape(-1, 1).repeat(1, 4)
    q = quantize(x, bits, levels + 1, "channel")
    assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_exact(axis, dtype):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2, 16, 16, generator=g).to(torch.float16).to(dtype)  # fp16-representable values
    if axis == "channel":
        x[:, :, :8, 3] = x[:, :, :1, 3]  # first token group of channel 3 constant
        x[0, 1, :8, 5] = 0.0
        sel = (slice(None), slice(None), slice(0, 8), 3)
    else:
        x[:, :, 4, :8] = x[:, :, 4, :1]  # first channel group of token 4 constant
        x[1, 0, 7, :8] = 0.0
        sel = (slice(None), slice(None), 4, slice(0, 8))
    q = quantize(x, 2, 8, axis)
    y = q.dequantize(torch.float32)
    assert torch.isfinite(y).all()
    assert torch.equal(y[sel], x.float()[sel])
    assert (q.scale == 0).any()


def test_constant_fp32_value_not_in_fp16_is_within_tiny_error():
    x = torch.full((1, 4, 8), 0.1)
    q = quantize(x, 4, 4, "channel")
    y = q.dequantize()
    assert torch.isfinite(y).all()
    assert (y - x).abs().max() < 1e-6


def test_dequantize_dtype_and_shape_and_frozen():
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    q = quantize(x, 4, 8, "token")
    assert q.dequantize().dtype == torch.bfloat16
    assert q.dequantize(torch.float32).shape == (2, 5, 16)
    assert q.scale.dtype == torch.float16
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.bits = 2  # type: ignore[misc]


def test_exclude_keeps_spikes_out_of_the_range():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 32, 16, generator=g)
    spikes = torch.zeros_like(x, dtype=torch.bool)
    spikes[0, 5, 2] = spikes[0, 20, 9] = True
    x[spikes] = 50.0
    plain = quantize(x, 4, 16, "token")
    masked = quantize(x, 4, 16, "token", exclude=spikes)
    err_plain = (plain.dequantize() - x).abs()[~spikes].max()
    err_masked = (masked.dequantize() - x).abs()[~spikes].max()
    assert err_masked < err_plain / 5
    everything = quantize(x, 4, 16, "token", exclude=torch.ones_like(spikes))
    assert torch.isfinite(everything.dequantize()).all()


def test_bad_inputs_raise():
    x = torch.randn(2, 8, 64)
    for bits in (1, 5, 16, 2.0, True):
        with pytest.raises(ValueError, match=r"bits.*\(2, 3, 4, 8\)"):
            quantize(x, bits, 8, "token")
    with pytest.raises(ValueError, match="group_size=24.*head_dim=64"):
        quantize(x, 4, 24, "token")
    for gs in (0, -4, 8.0):
        with pytest.raises(ValueError, match="group_size"):
            quantize(x, 4, gs, "channel")
    with pytest.raises(ValueError, match="axis"):
        quantize(x, 4, 8, "row")
    with pytest.raises(TypeError):
        quantize(torch.ones(2, 8, 64, dtype=torch.int32), 4, 8, "token")
    with pytest.raises(ValueError, match="shape"):
        quantize(torch.randn(8), 4, 8, "token")
    with pytest.raises(ValueError, match="exclude"):
        quantize(x, 4, 8, "token", exclude=torch.zeros(2, 8, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize(torch.tensor([[-1e6, 1e6]]), 4, 2, "token")  # a min of -1e6 does not fit fp16
    with pytest.raises(ValueError, match="not finite"):
        quantize(torch.tensor([[0.0, float("nan")]]), 4, 2, "token")
