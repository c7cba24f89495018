"""The fused C++ CPU decode kernels (kvpress/kernels/cpu/decode.cpp) against float64 references on fresh random
inputs: every bit width (3-bit included), key groups smaller and larger than a 32-token block, GQA ratios 1/3/4/8,
batch > 1 with masks (left padding, uneven heads), lengths 1 and off the block / split boundaries, evicted bodies
(per-token key groups), scale dtypes float16 / bfloat16 / float32, rotations, the exact segment merged in the same
call, ragged heads (empty, 1 token, long enough to split) with a dense tail; and the storages' decode through the
kernel against their float64 references in float32 / float16 / bfloat16.

Tolerances as for the other kernels: float32 math from the same codes, so 5e-5 absolute against float64.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from kernels_reference import attention64, dequantize64, make_body, ragged64, ragged_take
from test_kernels_quant_decode import _decode_vs_reference, _filled_storage, _mask, _query
from test_kernels_ragged_decode import _inputs

from kvpress import kernels
from kvpress.kernels import cpu_decode
from kvpress.quant import KVQuant
from kvpress.quant.storage import packed_body

pytestmark = pytest.mark.skipif(cpu_decode.load_error() is not None, reason=str(cpu_decode.load_error()))
ATOL = 5e-5

CASES = [  # key_bits, value_bits, group, head_dim, gqa, q_len, scale dtype
    (2, 2, 32, 64, 1, 1, torch.float16),
    (3, 3, 64, 128, 3, 1, torch.float16),
    (4, 4, 128, 64, 4, 2, torch.bfloat16),
    (4, 2, 32, 128, 8, 1, torch.float32),
    (8, 8, 8, 64, 3, 1, torch.float16),  # groups smaller than a block
    (3, 2, 16, 16, 4, 3, torch.float32),
    (2, 4, 64, 256, 1, 1, torch.float16),
]


def _check(part, q, keys, values, mask):
    out, lse = attention64(q, keys, values, mask)
    assert torch.isfinite(part.out).all()
    torch.testing.assert_close(part.out.double(), out, rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(part.lse.double(), lse, rtol=1e-5, atol=ATOL)


def _cast_scales(body, dtype):
    return dataclasses.replace(body, **{n: getattr(body, n).to(dtype) for n in ("k_scale", "k_zero", "v_scale", "v_zero")})


@pytest.mark.parametrize("case", CASES, ids=lambda c: "K{}V{}-g{}-d{}-gqa{}-q{}-{}".format(*c[:6], str(c[6])[6:]))
def test_body_matches_float64(case):
    kb, vb, group, d, gqa, q_len, scale_dtype = case
    n_held = max(2 * group, 600)  # long enough for several token splits
    n_held = -(-n_held // group) * group
    body = _cast_scales(make_body(kb, vb, group, d, 2, 3, n_held, seed=group + d), scale_dtype)
    for n in (1, 31, 33, n_held - 5, n_held):
        pb = packed_body(body, n)
        q = _query(2, 3, gqa * q_len, d, seed=n)
        mask = _mask(2, 3, q_len, n, seed=n)
        keys, values = dequantize64(pb)
        with kernels.force_backend("cpp"):
            _check(kernels.quantized_decode(q, pb, mask), q, keys, values, mask)
            _check(kernels.quantized_decode(q, pb, None), q, keys, values, None)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("bits", "d", "fraction", "gqa"), [(2, 64, 0.02, 3), (3, 64, 0.05, 1), (4, 128, 0.01, 4),
                                                            (2, 256, 0.01, 4)])
def test_body_with_gear_outliers_matches_float64(bits, d, fraction, gqa, scale_dtype):
    """GEAR's exact outlier entries (a few per token row) through the C++ kernel: keys corrected in the logits,
    values written back; batch 2, lengths off the group and split sizes, evicted (token-grouped) too."""
    body = _cast_scales(make_body(bits, bits, 32, d, 2, 3, 640, outlier_fraction=fraction, seed=bits + d),
                        scale_dtype)
    assert body.k_out_val is not None and body.k_out_val.shape[-1] >= 1
    body = dataclasses.replace(body, k_out_val=body.k_out_val.to(scale_dtype), v_out_val=body.v_out_val.to(scale_dtype))
    taken, valid = ragged_take(body, torch.tensor([[600, 31, 64], [5, 640, 1]]), seed=bits)
    for pb, mask in ((packed_body(body, 1), None), (packed_body(body, 333), _mask(2, 3, 1, 333, seed=d)),
                     (packed_body(taken), valid.unsqueeze(2))):
        assert pb.n_outliers >= 1
        q = _query(2, 3, gqa, d, seed=pb.n_tokens)
        keys, values = dequantize64(pb)
        with kernels.force_backend("cpp"):
            _check(kernels.quantized_decode(q, pb, mask), q, keys, values, mask)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_evicted_body_with_token_groups_matches_float64(bits):
    body = make_body(bits, bits, 32, 64, 2, 3, 320, seed=bits)
    taken, valid = ragged_take(body, torch.tensor([[300, 31, 64], [5, 320, 1]]), seed=bits)
    pb = packed_body(taken)
    assert pb.group_ids is not None
    q = _query(2, 3, 4, 64, seed=bits)
    mask = valid.unsqueeze(2)
    keys, values = dequantize64(pb)
    with kernels.force_backend("cpp"):
        _check(kernels.quantized_decode(q, pb, mask), q, keys, values, mask)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("n_exact", [0, 1, 37])
def test_layer_call_merges_body_and_exact_segment_with_rotations(rotate, n_exact):
    """One call: query rotated into the body's basis, body output rotated back, exact tokens merged."""
    from kvpress.quant.rotation import rotation_matrix

    d, b, h, gqa = 64, 2, 3, 3
    body = make_body(2, 2, 32, d, b, h, 256, seed=4)
    pb = packed_body(body, 250)
    g = torch.Generator().manual_seed(9)
    rk = rotation_matrix(d, seed=1) if rotate else None
    rv = rotation_matrix(d, seed=2) if rotate else None
    ex_k = torch.randn(b, h, n_exact, d, generator=g)
    ex_v = torch.randn(b, h, n_exact, d, generator=g)
    q = _query(b, h, gqa, d, seed=11)
    body_mask = _mask(b, h, 1, 250, seed=1)
    ex_mask = torch.rand(b, h, 1, n_exact, generator=g) > 0.3
    with kernels.force_backend("cpp"):
        part = kernels.quantized_layer_decode(q, pb, ex_k, ex_v, 1, body_mask, ex_mask, rk, rv)
    bk, bv = dequantize64(pb)
    if rotate:  # the body holds K @ R and V @ Rv: back to the plain basis
        bk, bv = bk @ rk.double().T, bv @ rv.double().T
    keys = torch.cat([bk, ex_k.double()], 2)
    values = torch.cat([bv, ex_v.double()], 2)
    _check(part, q, keys, values, torch.cat([body_mask, ex_mask], -1))
    with kernels.force_backend("cpp"):  # no body yet: the exact tokens alone
        only = kernels.quantized_layer_decode(q, None, ex_k, ex_v, 1, exact_mask=ex_mask)
    if n_exact:
        _check(only, q, ex_k.double(), ex_v.double(), ex_mask)
    else:
        assert torch.isinf(only.lse).all() and (only.lse < 0).all() and not only.out.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[[5, 40, 0], [33, 1, 700]], [[31], [97]], [[1, 1, 64, 1000]]],
                         ids=["b2h3", "b2h1", "b1h4"])  # fmt: skip
@pytest.mark.parametrize("head_dim,gqa,q_len", [(64, 1, 1), (128, 3, 2), (64, 4, 1), (32, 8, 1)])
def test_ragged_with_tail_matches_float64(dtype, lengths, head_dim, gqa, q_len):
    q, keys, values, lengths, mask = _inputs(lengths, head_dim, gqa, q_len, dtype, seed=head_dim + gqa)
    b, h = lengths.shape
    g = torch.Generator().manual_seed(head_dim + gqa + 1)  # the tail's
    with kernels.force_backend("cpp"):
        for m in (mask, None):
            part = kernels.ragged_decode(q, keys, values, lengths, m)
            ref = ragged64(q, keys, values, lengths, m)
            torch.testing.assert_close(part.out.double(), ref, rtol=1e-4, atol=ATOL)
        tail_k = torch.randn(b, h, 3, head_dim, generator=g).to(dtype)
        tail_v = torch.randn(b, h, 3, head_dim, generator=g).to(dtype)
        tail_mask = torch.rand(b, h, q_len, 3, generator=g) > 0.3
        part = kernels.ragged_decode(q, keys, values, lengths, mask, tail=(tail_k, tail_v, tail_mask))
    # reference: each head's segment followed by its tail, one softmax
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.flatten().cumsum(0)])
    for i in range(b):
        for j in range(h):
            s = i * h + j
            seg = slice(int(offsets[s]), int(offsets[s + 1]))
            k = torch.cat([keys[seg].double(), tail_k[i, j].double()])[None, None]
            v = torch.cat([values[seg].double(), tail_v[i, j].double()])[None, None]
            allowed = torch.cat([mask[seg].T, tail_mask[i, j]], -1)[None, None]
            out, _ = attention64(q[i : i + 1, j : j + 1], k, v, allowed)
            torch.testing.assert_close(part.out[i, j].double(), out[0, 0], rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rotate", [False, True])
def test_storage_decode_through_cpp_matches_float64(dtype, rotate):
    spec = KVQuant(bits=2, group_size=32, residual=16, n_sink=3, rotate=rotate)
    st = _filled_storage(spec, dtype, n=700)
    allowed = torch.ones(2, 2, 1, st.n_slots, dtype=torch.bool)
    allowed[1, :, :, :6] = False  # left padding of row 1
    _decode_vs_reference(st, q_heads=6, allowed=allowed, backend="cpp")
    _decode_vs_reference(st, q_heads=2, q_len=3, backend="cpp")
    _decode_vs_reference(st, q_heads=16, backend="cpp")  # GQA 8



@pytest.mark.parametrize("spread", [50.0, 200.0, 2000.0])
def test_ragged_logits_far_below_the_maximum_underflow_to_zero_not_nan(spread):
    """Real attention has logits hundreds below the row's maximum (sinks); the kernel's exp must give ~0 there,
    never NaN or garbage (the base-2 exponent is clamped, not x)."""
    g = torch.Generator().manual_seed(int(spread))
    lengths = torch.tensor([[300, 77]])
    total = int(lengths.sum())
    keys = torch.randn(total, 64, generator=g)
    keys[::7] *= spread / 8  # some keys dominate by up to `spread` logits
    values = torch.randn(total, 64, generator=g)
    q = torch.randn(1, 2, 3, 64, generator=g)
    with kernels.force_backend("cpp"):
        part = kernels.ragged_decode(q, keys, values, lengths, None)
    assert torch.isfinite(part.out).all() and torch.isfinite(part.lse).all()
    torch.testing.assert_close(part.out.double(), ragged64(q, keys, values, lengths, None), rtol=1e-4, atol=ATOL)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """torch waits forever on a build lock; one left by a killed build (old) is removed, a running build's kept."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory("kvpress_lock_test", verbose=False)) / "lock"
    lock.touch()
    assert not cpu_decode.clear_stale_lock("kvpress_lock_test") and lock.exists()  # a build running now
    old = time.time() - cpu_decode.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale C\\+\\+ kernel build lock"):
        assert cpu_decode.clear_stale_lock("kvpress_lock_test")
    assert not lock.exists() and not cpu_decode.clear_stale_lock("kvpress_lock_test")
