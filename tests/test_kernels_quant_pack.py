"""The Triton quantize-and-pack kernel (interpreter without a GPU) is bit-exact with kvpress.quant's quantizer:
codes, scales and zeros, every bit width, both axes, partial key groups, every input and scale dtype; and a
storage flushed through it holds exactly what the torch flush holds."""

import pytest
import torch
from kernels_reference import triton_missing

from kvpress import kernels
from kvpress.quant import KVQuant, quantize

pytestmark = pytest.mark.skipif(triton_missing() is not None, reason=str(triton_missing()))


def _x(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3
    x[..., 5] = 1.5  # a constant channel: scale 0 in key groups
    x[..., 0, :] *= 40  # a large token: wide value groups
    return x.to(dtype)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a.view(torch.int32), b.view(torch.int32)) if a.dtype == torch.float32 else torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_exact_with_torch_quantizer(dtype, scale_dtype, bits):
    from kvpress.kernels.quant_pack_triton import quantize_pack_triton

    i = (2, 3, 4, 8).index(bits)
    head_dim = (64, 128)[i % 2]
    # keys: groups of 8/32/64/128 tokens with a partial last group; values: groups of 32/64 channels
    key_group = (32, 64, 128, 8)[i]
    cases = (("channel", key_group, key_group + key_group // 2 + 3), ("token", (32, 64)[i % 2], 19))
    for axis, group, tokens in cases:
        x = _x((1, 2, tokens, head_dim), dtype, seed=bits)
        ref = quantize(x, bits, group, axis, scale_dtype=scale_dtype)
        codes, scale, zero = quantize_pack_triton(x, bits, group, axis, scale_dtype)
        assert torch.equal(codes, ref.codes), (axis, group)
        assert _bits_equal(scale, ref.scale) and _bits_equal(zero, ref.zero), (axis, group)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow notes inside the interpreter
def test_out_of_range_raises_like_torch():
    from kvpress.kernels.quant_pack_triton import quantize_pack_triton

    x = torch.randn(1, 1, 16, 64) * 1e6
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize(x, 2, 16, "channel")
    with pytest.raises(ValueError, match="scale_dtype"):
        quantize_pack_triton(x, 2, 16, "channel", torch.float16)


@pytest.mark.parametrize("spec", [
    KVQuant(bits=2, group_size=32, residual=8, rotate=True),
    KVQuant(key_bits=4, value_bits=2, group_size=16, residual=4, n_sink=2),
    KVQuant(bits=3, group_size=64, residual=16, value_group_size=32),
], ids=["2bit-rotated", "K4V2", "3bit"])  # fmt: skip
def test_storage_flush_through_the_kernel_is_identical(spec):
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 150, 64, generator=g), torch.randn(2, 2, 150, 64, generator=g)
    bodies = {}
    for backend in ("torch", "triton"):
        with kernels.force_backend(backend):
            st = spec.create_storage(0)
            st.append(keys[:, :, :100], values[:, :, :100], 0)
            for t in range(100, 150, 25):
                st.append(keys[:, :, t : t + 25], values[:, :, t : t + 25], t)
        bodies[backend] = st.body
    a, b = bodies["torch"], bodies["triton"]
    for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        assert _bits_equal(getattr(a, name), getattr(b, name)), name
