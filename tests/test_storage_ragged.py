"""RaggedStorage: evictions of a few tokens are masked, then dropped together, and attention never tells."""

from __future__ import annotations

import torch
from storage_helpers import select_at_once

from kvpress.storage.base import DEFER_FRACTION, DEFER_SLOTS
from kvpress.storage.dense import DenseStorage
from kvpress.storage.ragged import RaggedStorage


def _ragged(batch=2, heads=3, n=320, dim=16, seed=0) -> tuple[RaggedStorage, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(batch, heads, n, dim, generator=g), torch.randn(batch, heads, n, dim, generator=g)
    positions = torch.arange(n).expand(batch, heads, n)
    keep = torch.rand(batch, heads, n, generator=g) < 0.9
    return RaggedStorage.from_padded(keys, values, positions, keep), g


def _tokens(view, b, h):
    """(positions, keys, values) of the tokens the view shows in head (b, h), in slot order."""
    valid = view.valid[b, h]
    return view.positions[b, h][valid], view.keys[b, h][valid], view.values[b, h][valid]


def _decode(view, query):
    allowed = None if view.decode_masks_padding else view.valid.unsqueeze(2)  # what attention passes
    return view.decode(query, allowed, 0.25)


def test_one_eviction_per_step_is_masked_until_the_limit_then_dropped():
    st, g = _ragged()
    reference = st
    dim = 16
    for step in range(40):
        view = st.view()
        # evict one random held token per head (H2O-like), then append a decode token
        scores = torch.rand(view.valid.shape, generator=g).masked_fill(~view.valid, 2.0)
        keep = view.valid & (scores != scores.amin(-1, keepdim=True))
        before, st = st, st.select(keep)
        ref_view = reference.view()
        ref_keep = torch.zeros_like(ref_view.valid)
        for b in range(2):
            for h in range(3):
                wanted = view.positions[b, h][keep[b, h]]
                ref_keep[b, h] = ref_view.valid[b, h] & torch.isin(ref_view.positions[b, h], wanted)
        reference = select_at_once(reference, ref_keep)
        limit = min(DEFER_SLOTS, view.valid.shape[-1] // DEFER_FRACTION)
        if before.masked_slots + 1 <= limit:
            assert st.masked_slots == before.masked_slots + 1 and st.keys is before.keys  # nothing moved
        else:
            assert st.masked_slots == 0 and st.masked is None
        assert torch.equal(st.lengths(), reference.lengths())
        got, want = st.view(), reference.view()
        for b in range(2):
            for h in range(3):
                for x, y in zip(_tokens(got, b, h), _tokens(want, b, h)):
                    assert torch.equal(x, y)
        query = torch.randn(2, 6, 1, dim, generator=g)
        torch.testing.assert_close(_decode(got, query), _decode(want, query), rtol=1e-5, atol=1e-6)
        new = torch.randn(2, 3, 1, dim, generator=g)
        st.append(new, -new, 1000 + step)
        reference.append(new, -new, 1000 + step)


def test_masked_tokens_count_in_bytes_not_in_lengths_and_survive_a_state_round_trip():
    st, g = _ragged(n=640)
    view = st.view()
    keep = view.valid.clone()
    first = view.valid.long().argmax(-1, keepdim=True)  # each head's first held slot
    keep.scatter_(-1, first, False)
    masked = st.select(keep)
    assert masked.masked_slots == 1 and masked.nbytes() >= st.nbytes()
    assert torch.equal(masked.lengths(), st.lengths() - 1)
    tensors, meta = masked.state()
    back = RaggedStorage.from_state(tensors, meta)
    a, b = masked.view(), back.view()
    assert torch.equal(a.valid, b.valid) and torch.equal(a.keys, b.keys) and back.masked_slots == 1


def test_equal_lengths_after_a_real_drop_become_dense():
    st, _ = _ragged(n=64)
    view = st.view()
    target = int(view.valid.sum(-1).min()) - 5
    rank = view.valid.long().cumsum(-1)
    kept = st.select(view.valid & (rank <= target))  # 5+ tokens per head: past the limit of 64 // 32 slots
    assert isinstance(kept, DenseStorage) and kept.keys.shape[2] == target
