"""Quantized decode attention (kvpress.kernels): the chunked torch path and the fused Triton kernel (through
TRITON_INTERPRET=1 without a GPU) against float64 references on fresh random inputs; the storage's decode path
against a float64 reference of the whole layer (sinks, body, window, exact new tokens, rotation, dtypes).

Tolerances: kernels compute in float32 from the same codes, so outputs and log-sum-exps agree with float64 to
about 1e-6 relative; 5e-5 absolute is asserted (values are O(1)). Storage outputs are cast to the model dtype:
compared at that dtype's resolution.
"""

import pytest
import torch
from kernels_reference import (
    attention64,
    dequantize64,
    make_body,
    ragged_take,
    storage_reference64,
    triton_missing,
)

from kvpress import kernels
from kvpress.kernels.quant_decode_torch import quant_decode_torch
from kvpress.kernels.unpack import unpack_codes
from kvpress.quant import KVQuant
from kvpress.quant.packing import pack, unpack
from kvpress.quant.storage import packed_body

needs_triton = pytest.mark.skipif(triton_missing() is not None, reason=str(triton_missing()))
ATOL = 5e-5
GQA = (1, 3, 4, 8)


def _query(b, h, m, d, seed):
    return torch.randn(b, h, m, d, generator=torch.Generator().manual_seed(seed)) * d**-0.5


def _mask(b, h, q_len, n, seed):
    """Left padding on row 1 (its first slots masked) and different held lengths per head (trailing slots of
    head 1 masked); every row keeps at least one slot."""
    mask = torch.ones(b, h, q_len, n, dtype=torch.bool)
    if b > 1:
        mask[1, :, :, : min(3, n - 1)] = False
    if h > 1:
        mask[:, 1, :, max(1, n - 4) :] = False
    if q_len > 1:  # causal inside the step: the first query token does not see the last slot
        mask[:, :, 0, -1] = False if n > 1 else True
    return mask


def _check(part, q, pb, mask):
    keys, values = dequantize64(pb)
    out, lse = attention64(q, keys, values, mask)
    assert torch.isfinite(part.out).all()
    torch.testing.assert_close(part.out.double(), out, rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(part.lse.double(), lse, rtol=1e-5, atol=ATOL)


def test_unpacker_matches_the_documented_layout():
    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        for d in (16, 64, 80, 128):
            codes = torch.randint(0, 1 << bits, (2, 3, 5, d), generator=g)
            words = pack(codes, bits)
            assert torch.equal(unpack_codes(words, bits, d), unpack(words, bits, d).int())


CASES = [(kb, vb, g, d) for kb, vb in ((2, 2), (3, 3), (4, 4), (4, 2)) for g in (32, 64, 128) for d in (64, 128)]


@pytest.mark.parametrize("key_bits,value_bits,group,head_dim", CASES)
def test_torch_path_matches_float64(key_bits, value_bits, group, head_dim):
    i = CASES.index((key_bits, value_bits, group, head_dim))
    gqa, q_len = GQA[i % 4], 1 + i % 2
    body = make_body(key_bits, value_bits, group, head_dim, 2, 2, 2 * group, seed=i)
    for n in (1, 31, 33, 2 * group - 5, 2 * group):  # lengths off the group / chunk boundaries
        pb = packed_body(body, n)
        q = _query(2, 2, gqa * q_len, head_dim, seed=n)
        mask = _mask(2, 2, q_len, n, seed=n)
        _check(quant_decode_torch(q, pb, mask, chunk=group), q, pb, mask)
        _check(quant_decode_torch(q, pb, None), q, pb, None)
    # eviction: heads hold different numbers of tokens from thinned key groups (per-token group ids)
    counts = torch.tensor([[group + 7, 40], [2 * group - 3, 1]])
    taken, valid = ragged_take(body, counts, seed=i)
    pb = packed_body(taken)
    q = _query(2, 2, gqa, head_dim, seed=99)
    mask = valid.unsqueeze(2)
    _check(quant_decode_torch(q, pb, mask, chunk=group), q, pb, mask)


@pytest.mark.parametrize("rank,outliers", [(2, 0.0), (0, 0.05), (3, 0.04)])
@pytest.mark.parametrize("bits", [(2, 2), (4, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_torch_path_gear_terms_match_float64(rank, outliers, bits, head_dim):
    body = make_body(*bits, 32, head_dim, 2, 3, 128, rank=rank, outlier_fraction=outliers, seed=rank)
    assert (body.k_left is not None) == (rank > 0) and (body.k_out_val is not None) == (outliers > 0)
    for n in (33, 128):
        pb = packed_body(body, n)
        q = _query(2, 3, 4, head_dim, seed=n)
        mask = _mask(2, 3, 1, n, seed=n)
        _check(quant_decode_torch(q, pb, mask, chunk=64), q, pb, mask)
    taken, valid = ragged_take(body, torch.tensor([[100, 31, 64], [5, 128, 77]]))
    pb = packed_body(taken)
    q = _query(2, 3, 4, head_dim, seed=5)
    _check(quant_decode_torch(q, pb, valid.unsqueeze(2), chunk=32), q, pb, valid.unsqueeze(2))


# Interpreter cases (each ~1 s): every bit width, group size, GQA ratio and head dim, the unaligned-group,
# evicted (per-token group ids), low-rank and outlier paths, and a split count > 1 at least once.
TRITON_CASES = [
    # key_bits, value_bits, group, head_dim, gqa, q_len, rank, outliers, evict
    (2, 2, 32, 64, 1, 1, 0, 0.0, False),
    (3, 3, 64, 128, 3, 1, 0, 0.0, True),
    (4, 4, 128, 64, 4, 2, 0, 0.0, False),
    (4, 2, 32, 128, 8, 1, 0, 0.0, True),
    (4, 4, 8, 64, 3, 1, 0, 0.0, False),  # groups smaller than a tile
    (8, 8, 32, 64, 1, 1, 0, 0.0, False),
    (2, 2, 32, 64, 3, 1, 2, 0.05, False),
    (2, 3, 32, 64, 4, 1, 2, 0.05, True),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "K{}V{}-g{}-d{}-gqa{}-q{}-r{}-o{}-{}".format(
    *c[:7], c[7], "evict" if c[8] else "full"))  # fmt: skip
def test_triton_kernel_matches_float64_and_torch(case):
    from kvpress.kernels.quant_decode_triton import quant_decode_triton

    kb, vb, group, d, gqa, q_len, rank, outliers, evict = case
    n_held = max(2 * group, 64)
    body = make_body(kb, vb, group, d, 2, 2, n_held, rank=rank, outlier_fraction=outliers, seed=group + d)
    if evict:
        body, valid = ragged_take(body, torch.tensor([[n_held - 9, 33], [1, n_held - 1]]), seed=1)
        lengths = [body.n_tokens]
    else:
        valid = None
        lengths = [1, 31, n_held - 3] if group >= 32 else [33, n_held]
    for n in lengths:
        pb = packed_body(body, n)
        q = _query(2, 2, gqa * q_len, d, seed=n)
        mask = _mask(2, 2, q_len, n, seed=n)
        if valid is not None:
            mask = mask & valid[:, :, None, :n]
        part = quant_decode_triton(q, pb, mask, splits=2 if n > 64 else None)
        _check(part, q, pb, mask)
        ref = quant_decode_torch(q, pb, mask)
        torch.testing.assert_close(part.out, ref.out, rtol=1e-4, atol=2e-5)
    if not evict:  # no mask at all (the fast path of a plain decode step)
        pb = packed_body(body)
        q = _query(2, 2, gqa * q_len, d, seed=7)
        _check(quant_decode_triton(q, pb, None), q, pb, None)


@needs_triton
@pytest.mark.parametrize("dot_dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2.5e-2)])
def test_triton_half_precision_dots(dot_dtype, tol):
    """On a float16 / bfloat16 model the kernel's dots run in that dtype (tensor cores): dequantized keys and
    values, the query and the probabilities rounded to it, float32 accumulation."""
    from kvpress.kernels.quant_decode_triton import quant_decode_triton

    body = make_body(4, 2, 32, 128, 2, 2, 96, seed=11)
    pb = packed_body(body)
    q = _query(2, 2, 8, 128, seed=1)
    mask = _mask(2, 2, 1, 96, seed=1)
    part = quant_decode_triton(q, pb, mask, dot_dtype=dot_dtype)
    keys, values = dequantize64(pb)
    out, lse = attention64(q, keys, values, mask)
    torch.testing.assert_close(part.out.double(), out, rtol=tol, atol=tol)
    torch.testing.assert_close(part.lse.double(), lse, rtol=tol, atol=tol)


def _filled_storage(spec: KVQuant, dtype: torch.dtype, n: int, b: int = 2, h: int = 2, d: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    st = spec.create_storage(0)
    keys = torch.randn(b, h, n + 1, d, generator=g).to(dtype)
    values = torch.randn(b, h, n + 1, d, generator=g).to(dtype)
    st.append(keys[:, :, :n], values[:, :, :n], 0)
    st.view()  # the prefill's exact view, consumed
    st.append(keys[:, :, n:], values[:, :, n:], n)  # a decode step: one exact new token
    return st


def _decode_vs_reference(st, q_heads: int, q_len: int = 1, allowed=None, backend: str = "torch"):
    fresh = st.fresh
    view = st.view()
    b, h, n, d = view.shape
    q = torch.randn(b, q_heads, q_len, d, generator=torch.Generator().manual_seed(3)).to(st.dtype)
    scaling = d**-0.5
    with kernels.force_backend(backend):
        out = view.decode(q, allowed, scaling)
    assert not view.is_materialised
    ref = storage_reference64(st, fresh, q, allowed, scaling)
    assert out.shape == (b, q_len, q_heads, d) and out.dtype == st.dtype
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[st.dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rotate", [False, True])
def test_storage_decode_matches_float64(dtype, rotate):
    spec = KVQuant(bits=2, group_size=32, residual=16, n_sink=3, rotate=rotate)
    st = _filled_storage(spec, dtype, n=130)
    assert st.n_body_slots > 0 and (st.key_rotation is not None) == rotate
    allowed = torch.ones(2, 2, 1, st.n_slots, dtype=torch.bool)
    allowed[1, :, :, :6] = False  # left padding of row 1
    _decode_vs_reference(st, q_heads=6, allowed=allowed)
    _decode_vs_reference(st, q_heads=2, q_len=3)  # a short multi-token step (speculative / chunked decode)


@pytest.mark.parametrize("spec", [
    KVQuant(bits=4, group_size=16, residual=0, n_sink=0),  # the new token lands in the body: shown exactly
    KVQuant(bits=2, group_size=32, residual=8, rank=2, outlier_fraction=0.05, lowrank_block=64, rotate=True),
    KVQuant(key_bits=4, value_bits=2, group_size=64, residual=32, fp_dtype=torch.float16),
], ids=["residual0", "gear-rotated", "K4V2-fp16-window"])  # fmt: skip
def test_storage_decode_segments_and_gear(spec):
    st = _filled_storage(spec, torch.float32, n=159)
    _decode_vs_reference(st, q_heads=8)


@pytest.mark.parametrize(("backend", "n"), [("torch", 100), ("cpp", 300)])  # cpp: long enough for token splits
def test_storage_decode_after_uneven_eviction(backend, n):
    """Heads keep different numbers of tokens (padded slots, thinned key groups): valid slots only."""
    st = _filled_storage(KVQuant(bits=3, group_size=16, residual=8, n_sink=2), torch.float32, n=n)
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(2, 2, st.n_slots, generator=g) < torch.tensor([0.3, 0.9]).view(1, 2, 1)
    keep[..., -1] = True
    st = st.select(keep)
    assert st.valid is not None and st.body.group_len is not None
    _decode_vs_reference(st, q_heads=4, allowed=st.valid.unsqueeze(2), backend=backend)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_storage_decode_through_triton(dtype):
    spec = KVQuant(bits=2, group_size=32, residual=16, n_sink=3, rotate=True)
    st = _filled_storage(spec, dtype, n=100)
    allowed = torch.ones(2, 2, 1, st.n_slots, dtype=torch.bool)
    allowed[0, :, :, :4] = False
    _decode_vs_reference(st, q_heads=6, allowed=allowed, backend="triton")
