"""Growable dense storage (kvpress.storage.dense): appends written into room past the held tokens give exactly the
tensors concatenation gives, a shallow copy never writes into its original's room, and the patch picks growable
storage only where no policy evicts during decoding (DuoAttention: its retrieval heads)."""

import copy

import pytest
import torch
from tiny_models import tiny_model

import kvpress
from kvpress.compat import cache_kwargs
from kvpress.duo import DuoPattern
from kvpress.policies import DuoAttention, SnapKV, StreamingLLM
from kvpress.storage import DenseStorage
from kvpress.storage.dense import GROW_TOKENS
from kvpress.storage.head_split import HeadSplitStorage


def _kv(b, h, n, d, g):
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


@pytest.mark.parametrize(("b", "h", "d", "dtype"), [(1, 3, 64, torch.float32), (2, 1, 16, torch.float16),
                                                    (3, 4, 8, torch.bfloat16)])
def test_growable_appends_equal_concatenation(b, h, d, dtype):
    g = torch.Generator().manual_seed(b * 100 + d)
    plain, grow = DenseStorage(), DenseStorage(growable=True)
    start = 0
    sizes = [37, 1, 1, GROW_TOKENS, 5, *([1] * 150), 2 * GROW_TOKENS + 3, 1]
    for i, n in enumerate(sizes):
        k, v = (t.to(dtype) for t in _kv(b, h, n, d, g))
        if i == 20:
            start += 7  # a gap in positions (as after eviction): positions become held from here on
        for s in (plain, grow):
            s.append(k, v, start)
        start += n
        assert torch.equal(grow.keys, plain.keys) and torch.equal(grow.values, plain.values)
        assert (grow.positions is None) == (plain.positions is None)
        if plain.positions is not None:
            assert torch.equal(grow.positions, plain.positions)
        # tokens held are what nbytes counts; the allocation holds less than GROW_TOKENS more per head
        assert grow.nbytes() == plain.nbytes()
        per_token = b * h * (2 * d * grow.keys.element_size() + (0 if grow.positions is None else 4))
        assert 0 <= grow.storage_nbytes() - grow.nbytes() < GROW_TOKENS * per_token
    assert grow.keys.shape[-2] == sum(sizes)
    assert torch.equal(grow.view().keys, plain.view().keys)
    state, meta = grow.state()
    assert all(t.is_contiguous() for t in state.values()) and meta == {"growable": True}
    assert DenseStorage.from_state(state, meta).growable


def test_a_shallow_copy_never_writes_into_the_original():
    g = torch.Generator().manual_seed(0)
    base = DenseStorage(growable=True)
    for n in (10, 1, 1):
        base.append(*_kv(1, 2, n, 8, g), 0 if base.keys is None else base.keys.shape[-2])
    before_k, before_v = base.keys.clone(), base.values.clone()
    seen = base.view()  # a view attention already read
    twin = copy.copy(base)
    ka, va = _kv(1, 2, 1, 8, g)
    kb, vb = _kv(1, 2, 1, 8, g)
    twin.append(ka, va, 12)  # the copy moves its tokens out before writing
    base.append(kb, vb, 12)  # the original writes into its own room
    assert twin.keys.data_ptr() != base.keys.data_ptr()
    assert torch.equal(base.keys[..., :12, :], before_k) and torch.equal(base.keys[..., 12:, :], kb)
    assert torch.equal(twin.keys[..., :12, :], before_k) and torch.equal(twin.keys[..., 12:, :], ka)
    assert torch.equal(twin.values[..., 12:, :], va) and torch.equal(base.values[..., 12:, :], vb)
    assert torch.equal(seen.keys, before_k) and torch.equal(seen.values, before_v)
    base.crop(2)  # 13 -> 11 tokens; crop gives up the room, so no append writes over a view of the cropped ones
    kept = base.view()
    base.append(ka, va, 11)
    assert torch.equal(kept.keys, before_k[..., :11, :]) and torch.equal(base.keys[..., 11:, :], ka)


def _storages(model, policy):
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(1))
    with kvpress.patch(model, policy) as session:
        cache = session.new_cache()
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache), use_cache=True)
    return [cache.layers[i].storage for i in cache.compressed_layers]


def test_the_patch_makes_storage_growable_only_where_no_policy_evicts_while_decoding():
    model = tiny_model("llama")
    assert not any(s.growable for s in _storages(model, None))  # no policy: concatenation, as transformers
    assert all(s.growable for s in _storages(model, SnapKV(compression_ratio=0.5)))
    assert not any(s.growable for s in _storages(model, StreamingLLM(n_sink=2, window=8)))
    gates = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    duo = DuoAttention(DuoPattern(gates, {"model": "tiny"}), sparsity=0.5, n_sink=2, window=8)
    for storage in _storages(model, duo):
        assert isinstance(storage, HeadSplitStorage)
        streaming, retrieval = storage.parts
        assert not streaming.inner.growable and retrieval.growable  # streaming heads: sinks + window, trimmed
