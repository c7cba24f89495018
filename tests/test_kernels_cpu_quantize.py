"""The fused C++ quantize-and-pack (kvpress/kernels/cpu/quantize.cpp) is bit-exact with the torch quantizer."""

from __future__ import annotations

import pytest
import torch

from kvpress.kernels import cpu_decode
from kvpress.quant.quantizer import quantize

pytestmark = pytest.mark.skipif(cpu_decode.load_error() is not None, reason=str(cpu_decode.load_error()))


def _check(x: torch.Tensor, bits: int, group: int, axis: str, scale_dtype: torch.dtype) -> None:
    codes, scale, zero = cpu_decode.quantize_pack_cpu(x, bits, group, axis, scale_dtype)
    ref = quantize(x, bits, group, axis, scale_dtype=scale_dtype)
    assert codes.dtype == torch.int32 and scale.dtype == scale_dtype
    assert torch.equal(codes, ref.codes)
    assert torch.equal(scale, ref.scale) and torch.equal(zero, ref.zero)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("lead", "tokens", "dim"), [((2, 3), 64, 64), ((1, 1), 37, 16), ((3,), 1, 128),
                                                     ((1, 2), 100, 256), ((2, 1), 5, 24)])
def test_bit_exact_with_the_torch_quantizer(bits, axis, scale_dtype, lead, tokens, dim):
    g = torch.Generator().manual_seed(bits * 1000 + tokens + dim)
    x = torch.randn(*lead, tokens, dim, generator=g) * torch.rand(dim, generator=g) * 4
    x[..., 1] *= 8  # an outlier channel
    group = 8 if axis == "token" else 32
    _check(x, bits, group, axis, scale_dtype)


def test_constant_groups_ties_and_signs():
    x = torch.zeros(1, 2, 40, 32)
    x[0, 1] = 0.5  # a constant group: scale 0, reconstructed exactly
    x[0, 0, :, 3] = torch.linspace(-1, 1, 40)  # exact half-way codes: round half to even
    x[0, 0, :, 5] = -1e-9  # rounded down to a negative subnormal zero
    for axis, group in (("channel", 16), ("token", 8)):
        for bits in (2, 3, 4, 8):
            for scale_dtype in (torch.float16, torch.bfloat16, torch.float32):
                _check(x, bits, group, axis, scale_dtype)


def test_non_finite_or_unfit_input_raises_like_the_torch_quantizer():
    x = torch.randn(1, 16, 16)
    x[0, 3, 4] = float("nan")
    for bad in (x, torch.full((1, 16, 16), 1e6)):  # NaN; a range past float16
        with pytest.raises(ValueError, match="scale_dtype"):
            quantize(bad, 2, 8, "channel", scale_dtype=torch.float16)
        with pytest.raises(ValueError, match="scale_dtype"):
            cpu_decode.quantize_pack_cpu(bad, 2, 8, "channel", torch.float16)
