"""Ragged decode attention (varlen layout of RaggedStorage): torch path and Triton kernel (interpreter without a
GPU) against a per-head float64 reference; the storage's decode path against its padded (materialised) view."""

import pytest
import torch
from kernels_reference import ragged64, triton_missing
from tiny_models import tiny_model

from kvpress import kernels
from kvpress.attention import attend
from kvpress.kernels.ragged_decode_torch import ragged_decode_torch
from kvpress.storage import DenseStorage, RaggedStorage

needs_triton = pytest.mark.skipif(triton_missing() is not None, reason=str(triton_missing()))


def _inputs(lengths, d, gqa, q_len, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    b, h = lengths.shape
    total = int(lengths.sum())
    keys = torch.randn(total, d, generator=g).to(dtype)
    values = torch.randn(total, d, generator=g).to(dtype)
    q = torch.randn(b, h, gqa * q_len, d, generator=g) * d**-0.5
    mask = torch.rand(total, q_len, generator=g) > 0.25  # per token and query token: padding, causality
    return q, keys, values, lengths, mask


# lengths per (batch, kv_head): empty heads, length 1, 31, 33, lengths off the 64-token tile
LENGTHS = [[[5, 40, 0], [33, 1, 70]], [[31], [97]], [[1, 1, 64, 65]]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lengths", LENGTHS, ids=["b2h3", "b2h1", "b1h4"])
@pytest.mark.parametrize("head_dim,gqa,q_len", [(64, 1, 1), (128, 3, 2), (64, 4, 1), (128, 8, 1)])
def test_torch_path_matches_float64(dtype, lengths, head_dim, gqa, q_len):
    q, keys, values, lengths, mask = _inputs(lengths, head_dim, gqa, q_len, dtype, seed=head_dim + gqa)
    for m in (mask, None):
        part = ragged_decode_torch(q, keys, values, lengths, m, chunk=16)
        ref = ragged64(q, keys, values, lengths, m)
        torch.testing.assert_close(part.out.double(), ref, rtol=1e-4, atol=2e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,gqa,q_len,lengths", [
    (64, 1, 1, LENGTHS[0]), (128, 3, 2, LENGTHS[1]), (64, 4, 1, LENGTHS[2]), (128, 8, 1, LENGTHS[0]),
])  # fmt: skip
def test_triton_kernel_matches_float64(dtype, head_dim, gqa, q_len, lengths):
    from kvpress.kernels.ragged_decode_triton import ragged_decode_triton

    q, keys, values, lengths, mask = _inputs(lengths, head_dim, gqa, q_len, dtype, seed=3)
    # dots in the keys' dtype (tensor cores on a GPU): the query and probabilities are rounded to it
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for m, splits in ((mask, 2), (None, None)):
        part = ragged_decode_triton(q, keys, values, lengths, m, splits=splits)
        ref = ragged64(q, keys, values, lengths, m)
        torch.testing.assert_close(part.out.double(), ref, rtol=tol, atol=tol)


def _ragged_storage(dtype=torch.float32, b=2, h=2, n=50, d=16, seed=0) -> RaggedStorage:
    g = torch.Generator().manual_seed(seed)
    dense = DenseStorage()
    dense.append(torch.randn(b, h, n, d, generator=g).to(dtype), torch.randn(b, h, n, d, generator=g).to(dtype), 0)
    keep = torch.rand(b, h, n, generator=g) < torch.linspace(0.2, 0.9, b * h).view(b, h, 1)
    keep[..., -1] = True
    st = dense.select(keep)
    assert isinstance(st, RaggedStorage)
    st.append(torch.randn(b, h, 1, d, generator=g).to(dtype), torch.randn(b, h, 1, d, generator=g).to(dtype), n)
    return st


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_storage_decode_equals_padded_view(backend, dtype):
    st = _ragged_storage(dtype)
    q = torch.randn(2, 6, 1, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    view = st.view()
    allowed = view.valid.unsqueeze(2).clone()
    allowed[1, :, :, :3] = False  # left padding on row 1
    with kernels.force_backend(backend):
        out = attend(q, view, allowed, 0.25)
    assert not view.is_materialised  # read from the flat layout
    padded = st.view()
    _ = padded.keys  # materialise: the SDPA path over the padded tensors
    expected = attend(q.double(), _double_view(padded), allowed, 0.25)
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def _double_view(view):
    from kvpress.storage import AttentionView

    return AttentionView(view.keys.double(), view.values.double(), view.positions, view.valid)


def test_ragged_decode_in_a_model_equals_materialised(monkeypatch):
    """Generation over a ragged cache: the flat decode path gives the logits of the padded SDPA path."""
    import kvpress
    import kvpress.attention
    from kvpress.compat import cache_kwargs, output_cache
    from kvpress.policies import Policy

    class Uneven(Policy):
        def select(self, ctx):
            if ctx.phase != "prefill":
                return None
            keep = torch.ones(ctx.keys.shape[:3], dtype=torch.bool)
            for h in range(keep.shape[1]):
                keep[:, h, 1 : 1 + 4 * (h + 1)] = False
            return keep

    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, limit in (("decode", kvpress.attention.DECODE_MAX_QUERIES), ("materialised", 0)):
        monkeypatch.setattr(kvpress.attention, "DECODE_MAX_QUERIES", limit)
        with torch.no_grad(), kvpress.patch(model, Uneven()):
            out = model(ids, use_cache=True)
            cache = output_cache(out)
            assert any(isinstance(layer.storage, RaggedStorage) for layer in cache.layers)
            steps = []
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out = model(token, **cache_kwargs(model, cache), use_cache=True)
                steps.append(out.logits)
                token = out.logits[:, -1:].argmax(-1)
        logits[name] = torch.cat(steps, 1)
    torch.testing.assert_close(logits["decode"], logits["materialised"], rtol=1e-5, atol=1e-5)
