"""Attention over an evicted (dense or ragged) cache equals full attention with the evicted slots masked."""

import pytest
import torch
from tiny_models import left_padded_batch, tiny_model

import kvpress
from kvpress.compat import cache_kwargs
from kvpress.policies import Policy
from kvpress.storage import DenseStorage, RaggedStorage
from kvpress.storage.ragged import TAIL_TOKENS


class DropPositions(Policy):
    """Test policy: at prefill, each (batch, kv head) drops a fixed random set of positions."""

    def __init__(self, drop: torch.Tensor):
        self.drop = drop  # [batch, kv_heads, prompt_len] bool, True = evict

    def select(self, ctx):
        if ctx.phase != "prefill":
            return None
        return ~self.drop


def _reference_logits(model, ids, mask, drop, next_ids):
    """Unpatched forward over prompt + next tokens with a 4D per-head mask that blocks dropped slots
    for every query after the prompt."""
    batch, width = ids.shape
    full = torch.cat([ids, next_ids], dim=1)
    total = full.shape[1]
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    attn = torch.cat([mask, torch.ones_like(next_ids)], dim=1).bool()
    allowed = torch.tril(torch.ones(total, total, dtype=torch.bool))[None, None] & attn[:, None, None, :]
    allowed = allowed.expand(batch, model.config.num_attention_heads, total, total).clone()
    blocked = drop.repeat_interleave(groups, dim=1)  # [batch, q_heads, prompt]
    allowed[:, :, width:, :width] &= ~blocked[:, :, None, :]
    # padding query rows attend to themselves so no row is empty
    allowed |= torch.eye(total, dtype=torch.bool)
    float_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
    return model(full, attention_mask=float_mask, position_ids=position_ids).logits[:, width:]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_evicted_attention_matches_masked_reference(arch, ragged, attn):
    model = tiny_model(arch, attn=attn)
    ids, mask = left_padded_batch([20, 14], seed=3)
    batch, width = ids.shape
    kv_heads = model.config.num_key_value_heads
    gen = torch.Generator().manual_seed(7)
    if ragged:
        drop = torch.rand(batch, kv_heads, width, generator=gen) < 0.4
    else:  # exactly 8 drops per head
        drop = torch.zeros(batch, kv_heads, width, dtype=torch.bool)
        for b in range(batch):
            for h in range(kv_heads):
                drop[b, h, torch.randperm(width - 1, generator=gen)[:8]] = True
    drop[..., -1] = False  # keep the last prompt token
    next_ids = torch.randint(3, 100, (batch, 3), generator=gen)

    expected = _reference_logits(model, ids, mask, drop, next_ids)
    prompt_positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with kvpress.patch(model, DropPositions(drop)) as session:
        cache = session.new_cache()
        model(ids, attention_mask=mask, position_ids=prompt_positions, **cache_kwargs(model, cache), use_cache=True)
        storage = cache.layers[0].storage
        assert isinstance(storage, RaggedStorage if ragged else DenseStorage)
        assert torch.equal(storage.lengths(), (~drop).sum(-1))
        got = []
        attn_mask = mask
        for t in range(next_ids.shape[1]):  # decode step by step
            attn_mask = torch.cat([attn_mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            position_ids = attn_mask.cumsum(-1)[:, -1:] - 1
            out = model(next_ids[:, t : t + 1], attention_mask=attn_mask, position_ids=position_ids,
                        **cache_kwargs(model, cache), use_cache=True)
            got.append(out.logits)
        got = torch.cat(got, dim=1)
        # a multi-token forward after eviction (causal inside the chunk)
        chunk_cache = session.new_cache()
        model(ids, attention_mask=mask, position_ids=prompt_positions, **cache_kwargs(model, chunk_cache), use_cache=True)
        full_mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        position_ids = full_mask.cumsum(-1)[:, width:] - 1
        chunk = model(next_ids, attention_mask=full_mask, position_ids=position_ids,
                      **cache_kwargs(model, chunk_cache), use_cache=True).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(chunk, expected, atol=2e-5, rtol=1e-4)


def test_ragged_storage_holds_no_padding_and_reads_back():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 10, 8, generator=gen)
    values = torch.randn(2, 3, 10, 8, generator=gen)
    dense = DenseStorage()
    dense.append(keys, values, 0)
    keep = torch.rand(2, 3, 10, generator=gen) < 0.5
    keep[..., 0] = True
    ragged = dense.select(keep)
    assert isinstance(ragged, RaggedStorage)
    n = int(keep.sum())
    assert ragged.keys.shape == (n, 8) and ragged.values.shape == (n, 8)
    assert ragged.nbytes() == n * 8 * 4 * 2 + n * 4 + 6 * 8  # K, V fp32; positions int32; lengths int64
    assert ragged.storage_nbytes() == ragged.nbytes()
    view = ragged.view()
    for b in range(2):
        for h in range(3):
            idx = keep[b, h].nonzero().flatten()
            m = len(idx)
            assert torch.equal(view.keys[b, h, :m], keys[b, h, idx])
            assert torch.equal(view.positions[b, h, :m], idx)
            assert view.valid[b, h, :m].all() and not view.valid[b, h, m:].any()
    # append one token to every head, then select again
    new_k, new_v = torch.randn(2, 3, 1, 8, generator=gen), torch.randn(2, 3, 1, 8, generator=gen)
    ragged.append(new_k, new_v, 10)
    view = ragged.view()
    for b in range(2):
        for h in range(3):
            m = int(keep[b, h].sum())
            assert torch.equal(view.keys[b, h, m], new_k[b, h, 0])
            assert int(view.positions[b, h, m]) == 10
    # keeping the same count everywhere turns it back into dense storage
    uniform = torch.zeros_like(view.valid)
    uniform[..., :2] = True
    assert isinstance(ragged.select(uniform), DenseStorage)


@pytest.mark.parametrize("steps", [1, 63, 64, 65, 150])
def test_ragged_tail_appends_fold_and_select_like_one_flat_layout(steps):
    """Decode tokens go to the dense tail and fold into the flat layout every TAIL_TOKENS steps; at every
    point the view, the bytes held and a later select equal those of the tokens held in one flat layout."""
    gen = torch.Generator().manual_seed(steps)
    dense = DenseStorage()
    dense.append(torch.randn(2, 3, 12, 8, generator=gen), torch.randn(2, 3, 12, 8, generator=gen), 0)
    keep = torch.rand(2, 3, 12, generator=gen) < 0.5
    keep[0, 0, :] = True
    ragged = dense.select(keep)
    assert isinstance(ragged, RaggedStorage)
    # reference: each head's held tokens as a python list, extended per step
    ref_view = ragged.view()
    held = {(b, h): (ref_view.keys[b, h, ref_view.valid[b, h]], ref_view.positions[b, h, ref_view.valid[b, h]])
            for b in range(2) for h in range(3)}
    for step in range(steps):
        k, v = torch.randn(2, 3, 1, 8, generator=gen), torch.randn(2, 3, 1, 8, generator=gen)
        ragged.append(k, v, 12 + step)
        for (b, h), (hk, hp) in held.items():
            held[(b, h)] = (torch.cat([hk, k[b, h]]), torch.cat([hp, torch.tensor([12 + step])]))
    view = ragged.view()
    n_total = sum(len(p) for _, p in held.values())
    n_tail = ragged.n_tail
    assert n_tail == steps % TAIL_TOKENS
    # K, V fp32 for every token; int32 positions: one per flat token, one per tail step (shared by all heads)
    assert ragged.nbytes() == n_total * 8 * 4 * 2 + (n_total - 6 * n_tail) * 4 + n_tail * 4 + 6 * 8
    for (b, h), (hk, hp) in held.items():
        m = len(hp)
        assert torch.equal(view.keys[b, h, :m], hk)
        assert torch.equal(view.positions[b, h, :m], hp)
        assert view.valid[b, h, :m].all() and not view.valid[b, h, m:].any()
    assert int(ragged.lengths().sum()) == n_total
    # evict every other held slot: same result as selecting from the reference
    sel = torch.zeros_like(view.valid)
    sel[..., ::2] = True
    out = ragged.select(sel)
    out_view = out.view()
    for (b, h), (hk, hp) in held.items():
        m = len(hp)
        expect = hk[0:m:2]
        got = out_view.keys[b, h][out_view.valid[b, h]] if out_view.valid is not None else out_view.keys[b, h]
        assert torch.equal(got, expect)
